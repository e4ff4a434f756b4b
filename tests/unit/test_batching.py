"""linscale.train.batching: the batch split, its error messages, and which samples each rank reads."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from linscale.train.batching import BatchPlan, StepSampler, plan_batch, tokens_to_samples


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# --- plan_batch ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("global_batch", "replicas"),
    [(g, r) for g in (1, 6, 8, 24, 48, 96) for r in (1, 2, 3, 4, 8) if g % r == 0],
)
def test_plan_arithmetic(global_batch, replicas):
    share = global_batch // replicas
    for micro in [0, *divisors(share)]:
        plan = plan_batch(global_batch, replicas, micro)
        assert plan.global_batch == global_batch
        assert plan.replicas == replicas
        assert plan.micro_batch * plan.accum_steps * plan.replicas == global_batch
        assert plan.per_replica == share
        if micro == 0:
            assert plan.micro_batch == share and plan.accum_steps == 1
        else:
            assert plan.micro_batch == micro


@pytest.mark.parametrize(("global_batch", "replicas"), [(0, 1), (8, 0), (-4, 2), (4, -1)])
def test_plan_rejects_non_positive(global_batch, replicas):
    with pytest.raises(ValueError, match=">= 1"):
        plan_batch(global_batch, replicas)


NON_DIVISIBLE_GLOBAL = [(g, r) for g in range(1, 41) for r in (2, 3, 4, 5, 8) if g % r]


@pytest.mark.parametrize(("global_batch", "replicas"), NON_DIVISIBLE_GLOBAL)
def test_global_batch_error_proposes_valid_values(global_batch, replicas):
    with pytest.raises(ValueError) as err:
        plan_batch(global_batch, replicas)
    msg = str(err.value)
    assert f"train.global_batch={global_batch}" in msg and f"{replicas} replicas" in msg
    proposed = [int(v) for v in re.findall(r"--train\.global_batch=(\d+)", msg)]
    assert proposed, msg
    for value in proposed:
        plan = plan_batch(value, replicas)  # must not raise
        assert plan.micro_batch * plan.accum_steps * replicas == value
    # The proposals are the nearest multiples of `replicas` on either side (when positive).
    below = global_batch // replicas * replicas
    assert set(proposed) == {v for v in (below, below + replicas) if v > 0}


def test_global_batch_proposals_valid_with_user_micro_batch():
    with pytest.raises(ValueError) as err:
        plan_batch(30, 4, 4)
    for value in re.findall(r"--train\.global_batch=(\d+)", str(err.value)):
        plan_batch(int(value), 4, 4)


NON_DIVISIBLE_MICRO = [
    (g, r, m)
    for g, r in [(12, 1), (24, 2), (36, 3), (40, 4), (64, 2), (30, 5)]
    for m in range(1, g // r + 3)
    if (g // r) % m
]


@pytest.mark.parametrize(("global_batch", "replicas", "micro"), NON_DIVISIBLE_MICRO)
def test_micro_batch_error_proposes_valid_values(global_batch, replicas, micro):
    share = global_batch // replicas
    with pytest.raises(ValueError) as err:
        plan_batch(global_batch, replicas, micro)
    msg = str(err.value)
    assert f"train.micro_batch={micro}" in msg
    nearest = re.findall(r"--train\.micro_batch=(\d+)", msg)
    assert len(nearest) == 1, msg
    value = int(nearest[0])
    plan = plan_batch(global_batch, replicas, value)  # must not raise
    assert plan.micro_batch * plan.accum_steps * replicas == global_batch
    assert value == max(d for d in divisors(share) if d <= micro)
    listed = re.search(r"valid micro-batches: ([\d, ]+);", msg)
    assert listed, msg
    valid = [int(v) for v in listed.group(1).split(",")]
    assert valid == divisors(share)
    for v in valid:
        plan_batch(global_batch, replicas, v)


# --- tokens_to_samples -----------------------------------------------------------------------


@pytest.mark.parametrize(("samples", "tps"), [(1, 1), (32, 128), (7, 100), (64, 1024)])
def test_tokens_to_samples_exact(samples, tps):
    assert tokens_to_samples(samples * tps, tps) == samples


@pytest.mark.parametrize("tps", [None, 0])
def test_tokens_to_samples_needs_tokens_per_sample(tps):
    with pytest.raises(ValueError, match="tokens_per_sample"):
        tokens_to_samples(4096, tps)


@pytest.mark.parametrize(("tokens", "tps"), [(1000, 128), (4097, 128), (50, 128), (64, 128), (129, 2), (7, 3)])
def test_tokens_to_samples_error_proposes_nearest_multiple(tokens, tps):
    with pytest.raises(ValueError) as err:
        tokens_to_samples(tokens, tps)
    msg = str(err.value)
    match = re.search(r"--train\.global_batch_tokens=(\d+) \((\d+) samples\)", msg)
    assert match, msg
    proposed, samples = int(match.group(1)), int(match.group(2))
    assert tokens_to_samples(proposed, tps) == samples  # must not raise
    # Nearest positive multiple of tps.
    best = min((k * tps for k in range(1, tokens // tps + 3)), key=lambda v: abs(v - tokens))
    assert abs(proposed - tokens) == abs(best - tokens)


# --- StepSampler -----------------------------------------------------------------------------


def epoch_indices(num_samples: int, plan: BatchPlan, seed: int, epoch: int = 0) -> dict[int, list[list[int]]]:
    """rank -> the flat list of indices it reads, per global step, over one epoch."""
    out: dict[int, list[list[int]]] = {}
    for rank in range(plan.replicas):
        sampler = StepSampler(num_samples, plan, rank, seed)
        first = epoch * sampler.steps_per_epoch
        out[rank] = [
            [i for k in range(plan.accum_steps) for i in sampler.micro_indices(step, k)]
            for step in range(first, first + sampler.steps_per_epoch)
        ]
    return out


SAMPLER_CASES = [
    # (num_samples, global_batch, replicas, micro_batch)
    (8, 8, 1, 0),
    (64, 8, 1, 2),
    (64, 8, 2, 0),
    (64, 8, 2, 1),
    (100, 12, 3, 2),
    (100, 16, 4, 2),
    (37, 6, 2, 3),
    (1000, 48, 8, 3),
    (17, 17, 1, 1),
    (50, 20, 5, 4),
]


def random_cases(n: int, seed: int = 0) -> list[tuple[int, int, int, int]]:
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        replicas = rng.choice([1, 2, 3, 4, 6, 8])
        share = rng.randint(1, 12)
        micro = rng.choice(divisors(share))
        global_batch = share * replicas
        num_samples = rng.randint(global_batch, 6 * global_batch + 5)
        cases.append((num_samples, global_batch, replicas, micro))
    return cases


@pytest.mark.parametrize(("num_samples", "global_batch", "replicas", "micro"), SAMPLER_CASES + random_cases(40))
def test_epoch_covers_each_index_at_most_once(num_samples, global_batch, replicas, micro):
    plan = plan_batch(global_batch, replicas, micro)
    steps_per_epoch = num_samples // global_batch
    for epoch in (0, 1):
        per_rank = epoch_indices(num_samples, plan, seed=123, epoch=epoch)
        rank_sets = []
        for rank, steps in per_rank.items():
            assert len(steps) == steps_per_epoch
            for step in steps:
                assert len(step) == plan.per_replica, rank
            flat = [i for step in steps for i in step]
            assert all(0 <= i < num_samples for i in flat)
            rank_sets.append(set(flat))
        everything = [i for steps in per_rank.values() for step in steps for i in step]
        assert len(everything) == steps_per_epoch * global_batch
        assert len(set(everything)) == steps_per_epoch * global_batch  # no index twice
        for a, b in itertools.combinations(rank_sets, 2):
            assert not a & b  # ranks disjoint


@pytest.mark.parametrize(
    ("num_samples", "global_batch", "micros"),
    [
        (64, 8, {1: 0, 2: 2, 4: 1}),
        (100, 16, {1: 4, 2: 8, 4: 2}),
        (333, 24, {1: 0, 2: 3, 4: 6}),
        (48, 48, {1: 6, 2: 4, 4: 12}),
    ],
)
def test_global_step_samples_independent_of_world_size(num_samples, global_batch, micros):
    per_world = {}
    for world, micro in micros.items():
        plan = plan_batch(global_batch, world, micro)
        per_rank = epoch_indices(num_samples, plan, seed=7)
        steps = num_samples // global_batch
        # Per global step: ranks in order, each rank's micro-batches in order.
        per_world[world] = [[i for rank in range(world) for i in per_rank[rank][s]] for s in range(steps)]
    reference = per_world[1]
    for world, steps in per_world.items():
        for s, (got, want) in enumerate(zip(steps, reference, strict=True)):
            assert set(got) == set(want), (world, s)
            assert got == want, (world, s)  # contiguous parts, so even the order is shared


def test_same_indices_across_epochs_boundary_for_all_world_sizes():
    # Step numbers past the first epoch map to the same samples whatever the world size.
    for step in range(0, 20, 3):
        flat = {}
        for world in (1, 2, 4):
            plan = plan_batch(16, world, 2)
            flat[world] = [
                i
                for r in range(world)
                for k in range(plan.accum_steps)
                for i in StepSampler(50, plan, r, seed=3).micro_indices(step, k)
            ]
        assert flat[1] == flat[2] == flat[4], step


def test_deterministic_from_seed():
    plan = plan_batch(8, 2, 2)
    a = StepSampler(64, plan, 1, seed=42)
    b = StepSampler(64, plan, 1, seed=42)
    assert [a.micro_indices(s, k) for s in range(20) for k in range(2)] == [
        b.micro_indices(s, k) for s in range(20) for k in range(2)
    ]


def test_other_seed_or_epoch_gives_other_order():
    plan = plan_batch(8, 1)
    num = 64
    steps = num // 8

    def order(seed: int, epoch: int) -> list[int]:
        sampler = StepSampler(num, plan, 0, seed)
        return [i for s in range(epoch * steps, (epoch + 1) * steps) for i in sampler.micro_indices(s, 0)]

    base = order(1, 0)
    assert sorted(base) == list(range(num))  # num divisible by the batch: the whole dataset
    assert order(2, 0) != base
    assert order(1, 1) != base
    assert sorted(order(1, 1)) == sorted(base)


def test_iter_resumes_at_start_step():
    plan = plan_batch(12, 2, 2)  # accum 3
    sampler = StepSampler(40, plan, 1, seed=5)
    sampler.start_step = 4
    it = iter(sampler)
    got = [next(it) for _ in range(3 * plan.accum_steps)]
    want = [sampler.micro_indices(s, k) for s in (4, 5, 6) for k in range(plan.accum_steps)]
    assert got == want
    assert all(len(m) == plan.micro_batch for m in got)


def test_tail_of_epoch_is_skipped():
    plan = plan_batch(8, 2)
    sampler = StepSampler(30, plan, 0, seed=0)
    assert sampler.steps_per_epoch == 3
    used = {i for s in range(3) for r in range(2) for i in StepSampler(30, plan, r, 0).micro_indices(s, 0)}
    assert len(used) == 24
    # Step 3 starts epoch 1 from the beginning of a new permutation, not the 6 left-over samples.
    nxt = sampler.micro_indices(3, 0)
    assert len(nxt) == plan.micro_batch


@pytest.mark.parametrize(("num_samples", "global_batch"), [(0, 1), (7, 8), (31, 32)])
def test_too_small_dataset(num_samples, global_batch):
    plan = plan_batch(global_batch, 1)
    with pytest.raises(
        ValueError, match=f"has {num_samples} samples, fewer than one global batch \\({global_batch}\\)"
    ):
        StepSampler(num_samples, plan, 0, seed=0)


def test_keyed_sampler_yields_epoch_index_pairs_of_the_same_order():
    plan = plan_batch(8, 2, 2)
    plain = StepSampler(20, plan, rank=1, seed=3)
    keyed = StepSampler(20, plan, rank=1, seed=3, keyed=True)
    for step in range(2 * plain.steps_per_epoch + 1):  # three epochs
        for k in range(plan.accum_steps):
            pairs = keyed.micro_indices(step, k)
            assert [i for _, i in pairs] == plain.micro_indices(step, k)
            assert {e for e, _ in pairs} == {step // plain.steps_per_epoch}
