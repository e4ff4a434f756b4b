"""Global batch -> micro-batch x accumulation x replicas, and which samples each rank reads.

Pure functions: no processes, no devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int  # samples per optimizer step, all replicas
    micro_batch: int  # samples per forward/backward on one replica
    accum_steps: int  # micro-steps per optimizer step
    replicas: int  # data-parallel replicas

    @property
    def per_replica(self) -> int:
        return self.micro_batch * self.accum_steps


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_batch(global_batch: int, replicas: int, micro_batch: int = 0) -> BatchPlan:
    """Split `global_batch` samples over `replicas`; `micro_batch=0` takes the whole share.

    >>> plan_batch(32, 2, 4)
    BatchPlan(global_batch=32, micro_batch=4, accum_steps=4, replicas=2)
    """
    if global_batch < 1 or replicas < 1:
        raise ValueError(f"global batch ({global_batch}) and replicas ({replicas}) must be >= 1")
    if global_batch % replicas:
        # Proposals keep the user's micro-batch valid too.
        unit = replicas * (micro_batch or 1)
        lo = global_batch // unit * unit
        options = sorted({v for v in (lo, lo + unit) if v > 0})
        raise ValueError(
            f"train.global_batch={global_batch} does not divide over {replicas} replicas; "
            f"use a multiple of {unit}, for example " + " or ".join(f"--train.global_batch={v}" for v in options)
        )
    share = global_batch // replicas
    if micro_batch == 0:
        micro_batch = share
    if share % micro_batch:
        fits = [d for d in _divisors(share) if d <= micro_batch] or [1]
        raise ValueError(
            f"train.micro_batch={micro_batch} does not divide the {share} samples each of the "
            f"{replicas} replicas takes per step (global_batch={global_batch}); valid micro-batches: "
            f"{', '.join(map(str, _divisors(share)))}; the nearest below is --train.micro_batch={fits[-1]}"
        )
    return BatchPlan(global_batch, micro_batch, share // micro_batch, replicas)


def tokens_to_samples(global_batch_tokens: int, tokens_per_sample: int | None) -> int:
    if not tokens_per_sample:
        raise ValueError(
            "train.global_batch_tokens needs a task that states tokens_per_sample; "
            "use train.global_batch (in samples) for this task"
        )
    if global_batch_tokens % tokens_per_sample:
        n = max(1, round(global_batch_tokens / tokens_per_sample))
        raise ValueError(
            f"train.global_batch_tokens={global_batch_tokens} is not a multiple of the "
            f"{tokens_per_sample} tokens in one sample; use --train.global_batch_tokens="
            f"{n * tokens_per_sample} ({n} samples)"
        )
    return global_batch_tokens // tokens_per_sample


class StepSampler:
    """Indices each rank reads at each micro-step, the same for every world size.

    Every epoch is a fresh permutation of the dataset seeded by (seed, epoch). Optimizer step
    `s` of the epoch takes the permutation's slice [s*G, (s+1)*G); replica `r` takes the r-th
    contiguous part of it and micro-step `k` the k-th micro-batch of that part. The samples of
    one optimizer step are therefore the same whatever the number of replicas, which is what
    makes a 2-process run follow the 1-process loss curve, and a position in the data is just
    a count of samples. The tail of an epoch that does not fill a global batch is skipped.

    `keyed=True` yields `(epoch, index)` pairs instead of indices, for datasets whose per-sample
    randomness (augmentation) depends on the epoch: the key carries it to any worker process.
    """

    def __init__(self, num_samples: int, plan: BatchPlan, rank: int, seed: int, keyed: bool = False) -> None:
        if num_samples < plan.global_batch:
            raise ValueError(
                f"the training data has {num_samples} samples, fewer than one global batch "
                f"({plan.global_batch}); lower train.global_batch or add data"
            )
        self.num_samples = num_samples
        self.plan = plan
        self.rank = rank
        self.seed = seed
        self.steps_per_epoch = num_samples // plan.global_batch
        self.start_step = 0
        self.keyed = keyed
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.num_samples)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def micro_indices(self, step: int, micro: int) -> list[int] | list[tuple[int, int]]:
        """Dataset indices (or `(epoch, index)` keys) of micro-batch `micro` of global step `step` on this rank."""
        epoch, s = divmod(step, self.steps_per_epoch)
        p = self.plan
        start = s * p.global_batch + self.rank * p.per_replica + micro * p.micro_batch
        indices = self._permutation(epoch)[start : start + p.micro_batch].tolist()
        return [(epoch, i) for i in indices] if self.keyed else indices

    def __iter__(self):
        """Micro-batches of indices forever, from optimizer step `self.start_step`."""
        step = self.start_step
        while True:
            for k in range(self.plan.accum_steps):
                yield self.micro_indices(step, k)
            step += 1
