"""Per-device memory of a training step: traced from the real model, never allocated.

`trace(task, precision)` builds `task.build_model()` on the meta device, turns its parameters into
fake CPU tensors (`torch._subclasses.FakeTensorMode`) and runs the task's real `loss` and its
backward on `Task.example_batch` at micro-batches 1, 2 and 3. Nothing is allocated, so a
4.7B-parameter model traces on a laptop in seconds. Gradients exist before the traced step, as in
every step but the first (DDP's buckets, gradient accumulation). The trace records:

* every tensor storage saved for backward (a `saved_tensors_hooks` pack hook, each storage counted
  once, the model's parameters and buffers left out), with the contexts that save it (a block of
  `Task.blocks`, or outside the blocks: before them or after them) and the blocks that take it as
  an argument. From these the activations of any checkpointing setting follow exactly: a
  checkpointed block saves nothing inside but keeps its arguments (what `parallel.checkpoint_blocks`
  does). Micro-batch 1 is exact as traced (size-1 dimensions let some copies be views); 2 and 3
  give the per-sample slope and the constant for larger ones (the batch-independent part: under
  bf16-mixed, autocast's bf16 copies of the weights that backward needs);
* autocast's weight casts (`aten._to_copy` of a parameter), which autocast's cache holds until the
  forward ends even when no backward needs them;
* after every operator, the live bytes of the other storages (weak references on the storages tell
  when they are freed): the forward's and the backward's peaks above what is saved (the loss's
  logits and their gradients, gradients of activations in flight, each parameter's new gradient
  before it is added to the existing one), and the largest such transient;
* the FLOPs of every operator (torch's formulas; CPU's fused attention counted dense, as the math
  kernel computes it), per block of the forward.

`estimate(tr, strategy, ...)` then adds what depends on the strategy, the world and the rank:

* model states, closed-form but exact by construction: parameters, gradients and AdamW states
  (exp_avg, exp_avg_sq and a 4-byte `step` per parameter) of the tensors the rank holds. ddp keeps
  everything; zero1 (ZeroRedundancyOptimizer) gives each parameter's states to one rank, greedily,
  largest parameters first, to the rank with the fewest elements so far (torch's partition); zero2,
  zero3 and fsdp shard every parameter on dim 0 as `torch.chunk` does (FSDP2), so the first ranks
  hold a little more; hsdp shards the same way within a node of world/nodes processes. One process
  wraps nothing. Ranks differ, so the estimate is for one `rank` (default: the one that holds most).
* temporaries of the strategy, closed-form from the traced parameter shapes (each named in
  `MemoryEstimate.breakdown`):
  - ddp/zero1: none with `gradient_as_bucket_view` (gradients are views into the buckets); without
    it the buckets are a second copy of the gradients; a bf16/fp16 compression hook holds a
    half-size copy of one bucket;
  - zero3/fsdp/hsdp (FSDP2 with reshard after forward): the root's parameters outside the blocks
    stay gathered from forward to the end of backward, and their unsharded gradients from the start
    of backward to its end; the gathered current block plus the prefetched next one (in the compute
    dtype: bf16 under bf16-true); in backward, one block's unsharded gradients and its padded
    reduce-scatter input (in `reduce_dtype`);
  - zero2 (no reshard after forward): every parameter stays gathered from forward to backward; in
    backward the root's unsharded gradients and one block's unsharded gradients and reduce-scatter
    input;
  - the optimizer step: the fused AdamW kernel (optim.impl=auto on CPU and CUDA, plain and DTensor
    parameters alike) allocates nothing; foreach AdamW (optim.impl=foreach) one fp32 buffer as large
    as the largest parameter group's local states (`_foreach_sqrt`).
* the peak, the largest of three moments, each with the model states (counted at every moment:
  gradients live through accumulation, DDP's buckets are never freed) and the buffers:
  - the end of forward: the activations, autocast's cache and the forward's traced excess;
  - backward: the activations and the backward's traced excess (its start, as the loss's gradients
    appear); with activation checkpointing, each checkpointed block's recomputation on top of what
    is still kept when backward reaches it, with the largest transient (an upper bound);
  - the optimizer step: its buffer.
  The strategy's gathered parameters and gradient buffers add to the first two (upper bounds: they
  are counted at the moment of the most activations).

Checked against measurements in tests/unit/test_memory_estimate.py (activations against a real
forward's saved tensors; the one-process peak against torch's MemTracker on a real step) and
tests/dist/test_memory_estimate.py (model states of every rank against
`parallel.model_state_memory`); see docs/memory.md.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

#: Strategies the estimate knows (parallel.strategy without auto).
STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp", "hsdp")
SHARDED = ("zero2", "zero3", "fsdp", "hsdp")
PRECISIONS = ("fp32", "bf16-mixed", "bf16-true", "fp16-mixed")
#: A parameter outside every block; a storage saved outside the blocks before the first one (embeddings).
OUTSIDE = -1
#: A storage saved after the last block (the head, the loss): backward releases it first.
AFTER = -2
STEP_BYTES = 4  # AdamW's `step`: a float32 scalar per parameter
TRACED_MICRO_BATCHES = (1, 2, 3)


class TraceError(ValueError):
    """The task's model or loss cannot be traced without data."""


@dataclass(frozen=True)
class SavedStorage:
    """One storage that a traced forward saved for backward, took as a block's argument, or cast."""

    nbytes: int
    #: Contexts that save it for backward: block indices, OUTSIDE (before the blocks) or AFTER.
    savers: frozenset[int]
    #: Blocks that take it as an argument (a checkpointed block keeps its arguments instead).
    block_inputs: frozenset[int]
    #: Autocast's low-precision copy of a parameter.
    cast: bool = False

    def holders(self, checkpointed: frozenset[int]) -> list[int]:
        """What keeps it for backward when the blocks in `checkpointed` are recomputed."""
        return [c for c in self.savers if c not in checkpointed] + [b for b in self.block_inputs if b in checkpointed]


def _released_after(context: int) -> float:
    """Backward runs the head first, then the blocks in reverse, then what came before them:
    a storage is released once its last holder in that order is done."""
    return math.inf if context == AFTER else context


@dataclass(frozen=True)
class ActivationProfile:
    """What one traced forward/backward at `micro_batch` samples held, without checkpointing."""

    micro_batch: int
    storages: tuple[SavedStorage, ...]
    #: The traced forward's peak above everything saved and every weight cast (its live bytes at
    #: their largest, less those).
    forward_extra: int
    #: The traced backward's peak above everything saved: its live bytes (saved tensors not yet
    #: released, plus transients) at their largest, less all saved bytes. Parameters' gradients
    #: are left out: they are model states.
    backward_extra: int
    #: Most bytes of live transient tensors at any point of backward (activation gradients, workspace).
    backward_transient: int = 0
    #: Most bytes of live transient tensors at any point of forward (not saved, not weight casts).
    forward_transient: int = 0

    def saved(self, checkpointed: frozenset[int]) -> int:
        """Bytes kept for backward when the blocks in `checkpointed` are recomputed."""
        return sum(s.nbytes for s in self.storages if s.holders(checkpointed))

    def unsaved_casts(self, checkpointed: frozenset[int]) -> int:
        """Weight casts that only autocast's cache holds until the end of forward."""
        return sum(s.nbytes for s in self.storages if s.cast and not s.holders(checkpointed))

    def recomputed(self, block: int) -> int:
        """Bytes a checkpointed block saves again while it is recomputed in backward."""
        return sum(s.nbytes for s in self.storages if block in s.savers and block not in s.block_inputs)

    def alive_at(self, block: int, checkpointed: frozenset[int]) -> int:
        """Kept bytes not yet released when backward reaches `block`."""
        total = 0
        for s in self.storages:
            holders = s.holders(checkpointed)
            if holders and min(_released_after(c) for c in holders) <= block:
                total += s.nbytes
        return total

    def recomputation_peak(self, checkpointed: frozenset[int]) -> int:
        """Bytes above the model states while a checkpointed block is recomputed in backward: what is
        still kept when backward reaches the block, its activations saved again, and the largest
        transient of backward (an upper bound). 0 without checkpointing."""
        return max(
            (self.alive_at(b, checkpointed) + self.recomputed(b) + self.backward_transient for b in checkpointed),
            default=0,
        )


@dataclass(frozen=True)
class ModelTrace:
    """One trace of the task's model, with no real allocation."""

    num_params: int
    param_tensors: int  # number of parameter tensors
    block_params: list[int]  # parameters (numel) of each block of task.blocks(model), forward order
    block_param_shapes: list[list[tuple[int, ...]]]  # per block, the parameter shapes (for FSDP padding)
    other_param_shapes: list[tuple[int, ...]]  # parameters outside the blocks
    flops_per_sample: float  # training FLOPs (forward + backward) of one sample
    block_fwd_flops_per_sample: list[float]  # forward FLOPs of each block per sample
    tokens_per_sample: int | None
    #: The precision the activations were traced in.
    precision: str = "fp32"
    #: Every parameter in `model.parameters()` order: shape, block index (OUTSIDE: none), trainable.
    param_shapes: list[tuple[int, ...]] = field(default_factory=list)
    param_blocks: list[int] = field(default_factory=list)
    param_trainable: list[bool] = field(default_factory=list)
    param_element_size: int = 4
    buffer_bytes: int = 0
    #: Traced activations at TRACED_MICRO_BATCHES (1, 2 and 3).
    profiles: tuple[ActivationProfile, ...] = ()
    #: FLOPs of one sample's forward outside the blocks (embeddings, head, loss).
    other_fwd_flops_per_sample: float = 0.0
    seconds: float = 0.0  # how long the trace took
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_blocks(self) -> int:
        return len(self.block_params)

    def activations(self, micro_batch: int, activation_checkpointing: str = "none") -> int:
        """Bytes saved for backward at `micro_batch` samples: as traced at 1, 2 and 3, on the line
        through 2 and 3 beyond."""
        ckpt = checkpointed_blocks(activation_checkpointing, self.num_blocks)
        return _extrapolate(self.profiles, micro_batch, lambda p: p.saved(ckpt))


@dataclass
class MemoryEstimate:
    """Bytes on one device (rank) for one strategy, world and micro-batch."""

    strategy: str
    world: int
    nodes: int
    micro_batch: int
    precision: str
    activation_checkpointing: str
    params: int  # bytes on this device (rank)
    grads: int
    optimizer: int
    activations: int  # bytes saved for backward at this micro-batch
    temporaries: int  # comm buckets, gathered blocks, transient buffers at the peak
    peak: int  # bytes at the peak
    peak_at: str  # where, in words
    rank: int = 0
    buffers: int = 0  # the model's buffers (BatchNorm running statistics)
    #: The temporaries at the peak by name (bytes).
    breakdown: dict[str, int] = field(default_factory=dict)
    #: The three candidate moments (bytes).
    forward_peak: int = 0
    backward_peak: int = 0
    step_peak: int = 0

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer

    def to_dict(self) -> dict:
        return {**asdict(self), "model_states": self.model_states}


# --- checkpointing and model states (pure) ---


def checkpointed_blocks(setting: str, num_blocks: int) -> frozenset[int]:
    """The block indices `parallel.checkpoint_blocks` wraps for `setting` (none, full or K)."""
    setting = str(setting)
    if setting == "none":
        return frozenset()
    if setting == "full":
        every = 1
    elif setting.isdigit() and int(setting) >= 1:
        every = int(setting)
    else:
        raise ValueError(f"activation checkpointing must be none, full or a positive integer K, got {setting!r}")
    return frozenset(i for i in range(num_blocks) if i % every == 0)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _chunk_numel(shape: tuple[int, ...], parts: int, index: int) -> int:
    """Elements of chunk `index` when `shape` is split on dim 0 into `parts` as torch.chunk does
    (FSDP2's sharding: ceil-sized chunks, the last ones short or empty)."""
    rows = shape[0] if shape else 1
    size = -(-rows // parts)
    mine = max(0, min(size, rows - index * size))
    return mine * _numel(shape[1:])


def _padded_numel(shape: tuple[int, ...], parts: int) -> int:
    """Elements of FSDP2's all-gather / reduce-scatter buffer for one parameter (dim 0 padded)."""
    rows = shape[0] if shape else 1
    return -(-rows // parts) * parts * _numel(shape[1:])


def zero1_owners(tr: ModelTrace, world: int) -> list[int]:
    """The rank that keeps each parameter's optimizer states under ZeroRedundancyOptimizer (-1: frozen)."""
    key = ("zero1", world)
    if key in tr._cache:
        return tr._cache[key]
    trainable = [i for i, t in enumerate(tr.param_trainable) if t]
    # build_optimizer's groups: decayed matrices first, then vectors; sizes carry over between groups.
    groups = [
        [i for i in trainable if len(tr.param_shapes[i]) >= 2],
        [i for i in trainable if len(tr.param_shapes[i]) < 2],
    ]
    owner = [-1] * len(tr.param_shapes)
    sizes = [0] * world
    for group in groups:
        for i in sorted(group, key=lambda i: _numel(tr.param_shapes[i]), reverse=True):  # stable, as torch's
            r = sizes.index(min(sizes))
            owner[i] = r
            sizes[r] += _numel(tr.param_shapes[i])
    tr._cache[key] = owner
    return owner


def model_state_bytes(tr: ModelTrace, strategy: str, world: int = 1, nodes: int = 1, rank: int = 0) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer states that `rank` holds (what
    `parallel.model_state_memory` measures after an optimizer step)."""
    key = ("states", strategy, world, nodes, rank)
    if key in tr._cache:
        return dict(tr._cache[key])
    es = tr.param_element_size
    shapes = tr.param_shapes
    if world <= 1 or strategy in ("ddp", "zero1"):
        local = [_numel(s) for s in shapes]
    else:
        parts = world // nodes if strategy == "hsdp" else world
        local = [_chunk_numel(s, parts, rank % parts) for s in shapes]
    params = sum(local) * es
    grads = sum(n for n, t in zip(local, tr.param_trainable, strict=True) if t) * es
    if world > 1 and strategy == "zero1":
        owner = zero1_owners(tr, world)
        mine = [i for i, r in enumerate(owner) if r == rank]
        optimizer = sum(2 * local[i] * es + STEP_BYTES for i in mine)
    else:
        optimizer = sum(2 * n * es + STEP_BYTES for n, t in zip(local, tr.param_trainable, strict=True) if t)
    out = {"params": params, "grads": grads, "optimizer": optimizer}
    tr._cache[key] = out
    return dict(out)


def fullest_rank(tr: ModelTrace, strategy: str, world: int, nodes: int = 1) -> int:
    """The rank that holds the most model-state bytes (the first of equals)."""
    if world <= 1 or strategy in ("ddp",):
        return 0
    if strategy in SHARDED:
        return 0  # torch.chunk gives the first ranks the full-sized chunks
    totals = [sum(model_state_bytes(tr, strategy, world, nodes, r).values()) for r in range(world)]
    return totals.index(max(totals))


# --- the estimate ---


def _extrapolate(profiles: tuple[ActivationProfile, ...], micro_batch: int, f) -> int:
    """f at `micro_batch`: the traced value when it was traced, else the line through the last two
    traces (a constant plus a per-sample slope). 0 for a trace without profiles (built by hand)."""
    if not profiles:
        return 0
    for p in profiles:
        if p.micro_batch == micro_batch:
            return f(p)
    a, b = profiles[-2], profiles[-1]
    fa, fb = f(a), f(b)
    slope = (fb - fa) / (b.micro_batch - a.micro_batch)
    return max(0, round(fb + slope * (micro_batch - b.micro_batch)))


def _check(strategy: str, world: int, nodes: int, micro_batch: int, precision: str, reduce_dtype: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if world < 1 or nodes < 1:
        raise ValueError(f"world ({world}) and nodes ({nodes}) must be >= 1")
    if world % nodes:
        lo = world // nodes * nodes
        options = " or ".join(str(v) for v in sorted({lo, lo + nodes}) if v > 0)
        raise ValueError(
            f"world {world} is not divisible by {nodes} nodes: every node runs the same number of processes; "
            f"use a world of {options}, or change the number of nodes"
        )
    if micro_batch < 1:
        raise ValueError(f"micro-batch must be >= 1, got {micro_batch}")
    if reduce_dtype not in ("fp32", "bf16"):
        raise ValueError(f"reduce_dtype must be fp32 or bf16, got {reduce_dtype!r}")
    if precision == "bf16-true" and (strategy in ("ddp", "zero1") or world == 1):
        raise ValueError(
            "bf16-true comes from the sharded strategies' mixed precision (zero2, zero3, fsdp, hsdp) on 2 or "
            f"more processes; with {strategy} on {world} process(es) use bf16-mixed"
        )


def _strategy_buffers(
    tr: ModelTrace,
    strategy: str,
    world: int,
    nodes: int,
    precision: str,
    reduce_dtype: str,
    bucket_mb: float,
    gradient_as_bucket_view: bool,
    comm_hook: str,
    grads: int,
) -> tuple[dict[str, int], dict[str, int]]:
    """Closed-form buffers of the strategy: (at the end of forward, at the start of backward)."""
    fwd: dict[str, int] = {}
    bwd: dict[str, int] = {}
    if world <= 1:
        return fwd, bwd
    if strategy in ("ddp", "zero1"):
        if not gradient_as_bucket_view:
            fwd["DDP buckets (a copy of the gradients)"] = bwd["DDP buckets (a copy of the gradients)"] = grads
        if comm_hook in ("bf16", "fp16"):
            bwd["compressed bucket in flight"] = min(int(bucket_mb * 2**20), grads) // 2
        return fwd, bwd
    parts = world // nodes if strategy == "hsdp" else world
    pe = 2 if precision == "bf16-true" else tr.param_element_size  # gathered (compute) dtype
    re = 2 if reduce_dtype == "bf16" else 4
    # Per block (the last entry: the root, the parameters outside the blocks), in elements.
    gathered = [0] * (tr.num_blocks + 1)
    grad_elems = [0] * (tr.num_blocks + 1)
    padded_grads = [0] * (tr.num_blocks + 1)
    for shape, b, t in zip(tr.param_shapes, tr.param_blocks, tr.param_trainable, strict=True):
        gathered[b] += _numel(shape)  # OUTSIDE (-1) is the last entry
        if t:
            grad_elems[b] += _numel(shape)
            padded_grads[b] += _padded_numel(shape, parts)
    root_params, root_grads = gathered[OUTSIDE] * pe, grad_elems[OUTSIDE] * pe
    blocks = gathered[: tr.num_blocks]
    largest = max(blocks, default=0) * pe
    grad_full = max(grad_elems[: tr.num_blocks], default=0) * pe
    rs_input = max(padded_grads[: tr.num_blocks], default=0) * re
    if strategy == "zero2":
        everything = root_params + sum(blocks) * pe
        fwd["gathered parameters (kept from forward to backward)"] = everything
        bwd["gathered parameters (kept from forward to backward)"] = everything
    else:
        fwd["gathered root parameters"] = bwd["gathered root parameters"] = root_params
        fwd["gathered block + prefetched block"] = bwd["gathered block + prefetched block"] = 2 * largest
    bwd["unsharded root gradients"] = root_grads
    bwd["unsharded block gradients"] = grad_full
    bwd["reduce-scatter input"] = rs_input
    return fwd, bwd


def _optimizer_buffer(tr: ModelTrace, strategy: str, world: int, nodes: int, rank: int, impl: str) -> int:
    """foreach AdamW's temporary (one buffer like the largest group's exp_avg_sq); fused: none."""
    if impl != "foreach":
        return 0  # fused AdamW (build_optimizer's choice on CPU and CUDA) allocates nothing
    parts = 1 if world <= 1 or strategy not in SHARDED else world // nodes if strategy == "hsdp" else world
    es = tr.param_element_size
    groups = [0, 0]
    for shape, t in zip(tr.param_shapes, tr.param_trainable, strict=True):
        if t:
            groups[0 if len(shape) >= 2 else 1] += _chunk_numel(shape, parts, rank % parts) * es
    return max(groups)


def estimate(
    tr: ModelTrace,
    strategy: str,
    world: int = 1,
    nodes: int = 1,
    micro_batch: int = 1,
    precision: str = "fp32",
    activation_checkpointing: str = "none",
    bucket_mb: float = 25.0,
    reduce_dtype: str = "fp32",
    rank: int | None = None,
    *,
    gradient_as_bucket_view: bool = True,
    comm_hook: str = "none",
    optimizer_impl: str = "fused",
) -> MemoryEstimate:
    """Bytes on one device of `world` (`rank`, default: the one holding the most) for `strategy`.

    `optimizer_impl`: the AdamW kernel, fused (optim.impl=auto on CPU and CUDA) or foreach.

    >>> e = estimate(trace(task, "bf16-mixed"), "zero3", world=8, micro_batch=4, precision="bf16-mixed")
    >>> e.peak / 2**30, e.peak_at  # doctest: +SKIP
    """
    _check(strategy, world, nodes, micro_batch, precision, reduce_dtype)
    mixed = ("bf16-mixed", "fp16-mixed")
    if precision != tr.precision and not (precision in mixed and tr.precision in mixed):
        raise ValueError(
            f"this trace holds activations in {tr.precision}; trace again with trace(task, {precision!r}) "
            f"to estimate {precision}"
        )
    if rank is None:
        rank = fullest_rank(tr, strategy, world, nodes)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    ckpt = checkpointed_blocks(activation_checkpointing, tr.num_blocks)
    states = model_state_bytes(tr, strategy, world, nodes, rank)
    held = sum(states.values()) + tr.buffer_bytes
    acts = tr.activations(micro_batch, activation_checkpointing)
    casts = _extrapolate(tr.profiles, micro_batch, lambda p: p.unsaved_casts(ckpt))
    # Above the activations and casts in forward: the traced peak's excess without checkpointing;
    # with it, the largest transient of forward (an upper bound).
    fwd_extra = _extrapolate(tr.profiles, micro_batch, lambda p: p.forward_transient if ckpt else p.forward_extra)
    # Above the activations in backward: the traced peak's excess (at its start, as the loss's
    # gradients appear), or a checkpointed block's recomputation when that is more.
    key = ("recomputation", ckpt)
    if key not in tr._cache:
        tr._cache[key] = {p.micro_batch: p.recomputation_peak(ckpt) - p.saved(ckpt) for p in tr.profiles}
    bwd_extra = _extrapolate(tr.profiles, micro_batch, lambda p: p.backward_extra)
    recompute = _extrapolate(tr.profiles, micro_batch, lambda p: tr._cache[key][p.micro_batch])
    fwd_buf, bwd_buf = _strategy_buffers(
        tr, strategy, world, nodes, precision, reduce_dtype, bucket_mb, gradient_as_bucket_view, comm_hook,
        states["grads"],
    )  # fmt: skip
    fwd = {"forward transients": fwd_extra, "autocast weight cache": casts, **fwd_buf}
    if recompute > bwd_extra:
        backward_at, bwd = "backward of a checkpointed block", {"recomputation and transients": recompute}
    else:
        backward_at, bwd = "start of backward", {"backward transients": bwd_extra}
    bwd.update(bwd_buf)
    step = {"optimizer step buffer": _optimizer_buffer(tr, strategy, world, nodes, rank, optimizer_impl)}
    moments = [
        (backward_at, held + acts + sum(bwd.values()), bwd),
        ("end of forward", held + acts + sum(fwd.values()), fwd),
        ("optimizer step", held + sum(step.values()), step),
    ]
    peak_at, peak, parts = max(moments, key=lambda m: m[1])
    return MemoryEstimate(
        strategy=strategy,
        world=world,
        nodes=nodes,
        micro_batch=micro_batch,
        precision=precision,
        activation_checkpointing=str(activation_checkpointing),
        params=states["params"],
        grads=states["grads"],
        optimizer=states["optimizer"],
        activations=acts,
        temporaries=sum(parts.values()),
        peak=peak,
        peak_at=peak_at,
        rank=rank,
        buffers=tr.buffer_bytes,
        breakdown={k: v for k, v in parts.items() if v},
        forward_peak=moments[1][1],
        backward_peak=moments[0][1],
        step_peak=moments[2][1],
    )


def largest_micro_batch(
    tr: ModelTrace,
    strategy: str,
    world: int,
    nodes: int,
    precision: str,
    activation_checkpointing: str,
    device_memory: float,
    per_replica: int,
    reserve: float = 0.1,
    **kw: Any,
) -> int | None:
    """The largest divisor of `per_replica` (samples per replica per step) whose estimated peak fits
    `(1 - reserve) * device_memory`; None when even 1 does not fit."""
    if per_replica < 1:
        raise ValueError(f"samples per replica must be >= 1, got {per_replica}")
    if not 0 <= reserve < 1:
        raise ValueError(f"reserve is a fraction of the device memory in [0, 1), got {reserve}")
    budget = (1 - reserve) * device_memory
    for mb in sorted((d for d in range(1, per_replica + 1) if per_replica % d == 0), reverse=True):
        e = estimate(tr, strategy, world, nodes, mb, precision, activation_checkpointing, **kw)
        if e.peak <= budget:
            return mb
    return None


# --- the trace ---


def parse_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return precision


def _to_fake(model: nn.Module, mode) -> None:
    """Replace the meta parameters and buffers of `model` by fake CPU tensors, keeping shared ones shared."""
    cpu = torch.device("cpu")
    conv = mode.fake_tensor_converter
    memo: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            f = conv.from_meta_and_device(mode, t.data if isinstance(t, nn.Parameter) else t, cpu)
            memo[id(t)] = nn.Parameter(f, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else f
        return memo[id(t)]

    for m in model.modules():
        for k, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[k] = fake(p)
        for k, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[k] = fake(b)


def _build(task) -> tuple[nn.Module, list[nn.Module]]:
    with torch.device("meta"):
        model = task.build_model()
    if not isinstance(model, nn.Module):
        raise TraceError(f"build_model returned a {type(model).__name__}, not an nn.Module")
    real = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"]
    if real:
        raise TraceError(
            f"build_model made {', '.join(real[:3])} outside the meta device, so tracing would allocate it; "
            "create tensors without an explicit device in build_model"
        )
    model.train()
    blocks = task.blocks(model) if hasattr(task, "blocks") else list(getattr(model, "blocks", []))
    return model, list(blocks)


def _example_batch(task, micro_batch: int) -> Any:
    from linscale.task import Task

    fn = getattr(task, "example_batch", None)
    return fn(micro_batch) if fn is not None else Task.example_batch(task, micro_batch)


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    if precision in ("bf16-mixed", "fp16-mixed"):
        # CPU autocast casts the same operators (matrix products, convolutions, attention) to the
        # same sizes in bf16 and fp16; fp16-mixed is traced as bf16.
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Tracker(TorchDispatchMode):
    """Records when storages appear and disappear, which are weight casts, and the FLOPs of each operator.

    Storages are keyed by their Python object, which torch keeps alive exactly as long as the
    storage (and a weak reference's callback tells when it goes)."""

    def __init__(self, excluded: set[int], count_flops: bool) -> None:
        super().__init__()
        self.excluded = excluded  # parameters' and buffers' storages
        self.ids: dict[int, int] = {}  # live storage -> id
        self.nbytes: list[int] = []
        self.casts: set[int] = set()
        self.events: list[tuple[int, int]] = []  # (id, +1 created / -1 freed), (-1, 0) after each operator
        self._weak: list[weakref.ref] = []
        self.flops = 0
        self._formulas = _flop_formulas() if count_flops else None

    def track(self, t: torch.Tensor) -> int | None:
        st = t.untyped_storage()
        key = id(st)
        if key in self.excluded:
            return None
        sid = self.ids.get(key)
        if sid is None:
            sid = len(self.nbytes)
            self.ids[key] = sid
            self.nbytes.append(st.nbytes())
            self.events.append((sid, 1))

            def freed(_ref, key=key, sid=sid, ids=self.ids, events=self.events) -> None:
                if ids.get(key) == sid:
                    del ids[key]
                events.append((sid, -1))

            self._weak.append(weakref.ref(st, freed))
        return sid

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            sid = self.track(out)
            if func is _TO_COPY and id(args[0].untyped_storage()) in self.excluded and sid is not None:
                self.casts.add(sid)  # autocast's copy of a parameter
        elif isinstance(out, tuple | list):
            for t in out:
                if isinstance(t, torch.Tensor):
                    self.track(t)
        if self._formulas is not None:
            formula = self._formulas.get(getattr(func, "_overloadpacket", None))
            if formula is not None:
                self.flops += formula(*args, **kwargs, out_val=out)
        self.events.append((-1, 0))
        return out


_TO_COPY = torch.ops.aten._to_copy.default


def _flop_formulas() -> dict:
    """torch's FLOP formulas (matrix products, convolutions, attention), plus CPU's fused attention
    counted dense as the math kernel computes it (backward: twice forward, its four matrix products)."""
    from torch.utils.flop_counter import flop_registry, sdpa_flop_count, shape_wrapper

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    return {
        **flop_registry,
        aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(forward),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: shape_wrapper(backward),
    }


@dataclass
class _Flops:
    total: float = 0.0  # forward + backward
    forward: float = 0.0
    blocks: list[float] = field(default_factory=list)  # forward of each block


def _profile(
    task, model: nn.Module, blocks: list[nn.Module], mode, micro_batch: int, precision: str, flops: _Flops | None
) -> ActivationProfile:
    """Run the task's loss and backward on fake tensors at `micro_batch`, recording storages."""
    # The steady state: gradients exist (DDP's buckets, accumulation), so backward adds each new
    # gradient into them and the new one is a transient, as in every step but the first.
    with mode:
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    state = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters() if p.grad is not None)]
    excluded = {id(t.untyped_storage()) for t in state}
    batch = _example_batch(task, micro_batch)
    batch = tree_map_only(torch.Tensor, mode.from_tensor, batch)
    if precision == "bf16-true":  # FSDP2 casts the root's floating-point inputs to the parameter dtype
        batch = tree_map_only(torch.Tensor, lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t, batch)
    tracker = _Tracker(excluded, count_flops=flops is not None)
    savers: dict[int, set[int]] = {}
    inputs: dict[int, set[int]] = {}
    where = [OUTSIDE]
    block_flops = [0.0] * len(blocks)
    flops_at: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sid = tracker.track(t)
        if sid is not None:
            savers.setdefault(sid, set()).add(where[-1])
        return t

    def enter(i: int):
        def hook(_module, args, kwargs):
            where.append(i)
            if flops is not None:
                flops_at.append(tracker.flops)
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor):
                    sid = tracker.track(t)
                    if sid is not None:
                        inputs.setdefault(sid, set()).add(i)

        return hook

    def leave(i: int):
        def hook(_module, _args, _out) -> None:
            where.pop()
            if i == len(blocks) - 1:
                where[0] = AFTER  # past the blocks: the head and the loss
            if flops is not None:
                block_flops[i] += tracker.flops - flops_at.pop()

        return hook

    grads: set[int] = set()

    def on_grad(p: torch.Tensor) -> None:
        sid = tracker.ids.get(id(p.grad.untyped_storage()))
        if sid is not None:
            grads.add(sid)

    handles = []
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(enter(i), with_kwargs=True))
        handles.append(b.register_forward_hook(leave(i)))
    handles += [p.register_post_accumulate_grad_hook(on_grad) for p in model.parameters() if p.requires_grad]
    try:
        with mode, tracker:
            for t in tree_flatten(batch)[0]:
                if isinstance(t, torch.Tensor):
                    tracker.track(t)
            with _autocast(precision), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = task.loss(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TraceError(f"the task's loss returned {type(loss).__name__}, not a scalar tensor")
            backward_from = len(tracker.events)
            forward_flops = tracker.flops
            loss.backward()
            backward_to = len(tracker.events)
            del loss
            model.zero_grad(set_to_none=True)
    except TraceError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the task's code under fake tensors
        raise TraceError(
            f"cannot trace the task's loss on fake tensors ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "the memory estimate runs the forward without data, so a loss that reads tensor values "
            "(.item(), random mixing such as mixup) cannot be traced"
        ) from e
    finally:
        for h in handles:
            h.remove()
    if flops is not None:
        flops.total = float(tracker.flops) / micro_batch
        flops.forward = float(forward_flops) / micro_batch
        flops.blocks = [f / micro_batch for f in block_flops]
    special = set(savers) | set(inputs) | tracker.casts
    # Replay the events: after every operator, the live bytes of transient storages (neither
    # saved, nor casts, nor gradients) and, in backward, of the saved ones not yet released.
    live = live_saved = live_casts = 0
    fwd_peak = fwd_transient = bwd_peak = bwd_transient = 0
    for n, (sid, kind) in enumerate(tracker.events[:backward_to]):
        if kind == 0:
            if n < backward_from:
                fwd_peak = max(fwd_peak, live + live_saved + live_casts)
                fwd_transient = max(fwd_transient, live)
            else:
                bwd_peak = max(bwd_peak, live + live_saved)
                bwd_transient = max(bwd_transient, live)
        elif sid in savers:
            live_saved += kind * tracker.nbytes[sid]
        elif sid in tracker.casts:
            live_casts += kind * tracker.nbytes[sid]
        elif sid not in special and sid not in grads:
            live += kind * tracker.nbytes[sid]
    all_saved = sum(tracker.nbytes[sid] for sid in savers)
    all_casts = sum(tracker.nbytes[sid] for sid in tracker.casts if sid not in savers)
    storages = tuple(
        SavedStorage(
            nbytes=tracker.nbytes[sid],
            savers=frozenset(savers.get(sid, ())),
            block_inputs=frozenset(inputs.get(sid, ())),
            cast=sid in tracker.casts,
        )
        for sid in sorted(special)
    )
    return ActivationProfile(
        micro_batch,
        storages,
        forward_extra=max(0, fwd_peak - all_saved - all_casts),
        backward_extra=max(0, bwd_peak - all_saved),
        backward_transient=bwd_transient,
        forward_transient=fwd_transient,
    )


def trace(task, precision: str = "fp32") -> ModelTrace:
    """Trace `task`'s model, loss and backward at micro-batches 1, 2 and 3 on fake tensors.

    >>> tr = trace(GPTTask(GPTTaskConfig(size="yuan-4.7b")), "bf16-mixed")  # doctest: +SKIP
    >>> tr.num_params, tr.activations(micro_batch=4) / 2**30  # doctest: +SKIP
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    parse_precision(precision)
    t0 = time.perf_counter()
    model, blocks = _build(task)
    params = list(model.parameters())
    block_of: dict[int, int] = {}
    for i, b in enumerate(blocks):
        for p in b.parameters():
            block_of.setdefault(id(p), i)
    shapes = [tuple(p.shape) for p in params]
    where = [block_of.get(id(p), OUTSIDE) for p in params]
    block_shapes: list[list[tuple[int, ...]]] = [[] for _ in blocks]
    for s, w in zip(shapes, where, strict=True):
        if w != OUTSIDE:
            block_shapes[w].append(s)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    element = params[0].element_size() if params else 4
    trainable = [p.requires_grad for p in params]

    mode = FakeTensorMode()
    _to_fake(model, mode)
    if precision == "bf16-true":
        # FSDP2's MixedPrecisionPolicy(param_dtype=bf16): the block computes on bf16 parameters.
        cast: dict[int, nn.Parameter] = {}
        with mode:
            for m in model.modules():
                for k, p in list(m._parameters.items()):
                    if p is not None and p.is_floating_point():
                        if id(p) not in cast:  # shared parameters stay shared
                            cast[id(p)] = nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=p.requires_grad)
                        m._parameters[k] = cast[id(p)]
    flops = _Flops()
    # Micro-batch 1 is exact on its own (size-1 dimensions let some copies be views); 2 and 3 give
    # the constant and the per-sample slope for every larger micro-batch.
    profiles = tuple(
        _profile(task, model, blocks, mode, b, precision, flops if b == 1 else None) for b in TRACED_MICRO_BATCHES
    )
    stated = task.flops_per_sample() if hasattr(task, "flops_per_sample") else None
    return ModelTrace(
        num_params=sum(_numel(s) for s in shapes),
        param_tensors=len(params),
        block_params=[sum(_numel(s) for s in bs) for bs in block_shapes],
        block_param_shapes=block_shapes,
        other_param_shapes=[s for s, w in zip(shapes, where, strict=True) if w == OUTSIDE],
        flops_per_sample=float(stated or flops.total),
        block_fwd_flops_per_sample=flops.blocks,
        tokens_per_sample=getattr(task, "tokens_per_sample", None),
        precision=precision,
        param_shapes=shapes,
        param_blocks=where,
        param_trainable=trainable,
        param_element_size=element,
        buffer_bytes=buffer_bytes,
        profiles=profiles,
        other_fwd_flops_per_sample=flops.forward - sum(flops.blocks),
        seconds=time.perf_counter() - t0,
    )
