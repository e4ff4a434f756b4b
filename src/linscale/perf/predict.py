"""Step time, throughput, MFU and scaling of a data-parallel strategy on a cluster, and the recommendation.

The model follows what linscale runs (runtime/parallel.py), block by block:

* compute: a sample's training FLOPs at the profile's peak x efficiency; forward 1/3, backward 2/3,
  split over the blocks by their forward FLOPs; the rest (embeddings, head, loss) counts after the last
  block in forward and first in backward, where the emulated device speed (perf/virtual.py) puts it.
  A checkpointed block runs its forward again in backward.
* ddp, zero1: DDP's buckets (`parallel.bucket_mb`, filled in the order gradients become ready: the last
  block's first) are all-reduced one after another as soon as their gradients are ready, overlapping the
  rest of backward; what runs past the end of backward is exposed. Only the last micro-step of an
  accumulation communicates. zero1 then broadcasts every parameter from the rank that updated it.
* zero2, zero3, fsdp, hsdp: FSDP2 per block then the root: an all-gather per block in forward with the
  next block's prefetched (zero3 gathers again in backward), a reduce-scatter per block in backward in
  `reduce_dtype` (hsdp: inside the node, then an all-reduce of the shard across nodes). With NCCL
  (`overlap_sharded`) they run beside compute, one after another; with gloo they hold the training thread.
  gloo's reduce-scatter is an all-reduce of the whole input followed by a copy of this rank's part
  (ProcessGroupGloo::reduce_scatter_tensor_coalesced), and it is costed so.
* collectives: ring all-reduce 2(n-1) steps of latency alpha and 2(n-1)/n x bytes / bandwidth; all-gather
  and reduce-scatter (n-1) steps and (n-1)/n x bytes / bandwidth; NCCL's double binary tree for all-reduce
  (2 log2(n) steps, 2 x bytes / bandwidth) when faster. Across nodes the bandwidth is the lower of the
  intra-node bus bandwidth and the node's total inter-node bandwidth, the latency the inter-node one.
* optimizer: memory-bound AdamW (28 bytes per parameter) and gradient clipping (12 bytes per gradient)
  on what the rank holds, at the device's memory bandwidth.

docs/plan.md gives the formulas and the limits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from linscale.perf.clusters import OPTIMIZER_BYTES_PER_PARAM, ClusterProfile

SHARDED = ("zero2", "zero3", "fsdp", "hsdp")
STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "hsdp")  # fsdp is zero3
DTYPE_OF_PRECISION = {"fp32": "fp32", "bf16-mixed": "bf16", "bf16-true": "bf16", "fp16-mixed": "fp16"}
CLIP_BYTES_PER_GRAD = 12  # clip_grad_norm_: read every gradient for the norm, then scale it in place
SCALER_BYTES_PER_GRAD = 12  # fp16-mixed: unscale in place and check for inf/NaN
FIT = 0.9  # a configuration fits when its estimated peak is at most this fraction of the device memory
TIE = 0.01  # step times within 1% count as equal: the simpler configuration wins


#: Worker threads of a gloo process group (ProcessGroupGloo's default): asynchronous collectives run this many at once.
GLOO_THREADS = 2

# --- collective costs (seconds) ---------------------------------------------------------------------------


def ring_allreduce(nbytes: float, n: int, alpha: float, bw: float) -> float:
    """Ring all-reduce: reduce-scatter then all-gather, 2(n-1) steps, each rank sends 2(n-1)/n x bytes."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / bw


def tree_allreduce(nbytes: float, n: int, alpha: float, bw: float) -> float:
    """NCCL's double binary tree: reduce up and broadcast down, log2(n) levels each, pipelined."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * alpha + 2 * nbytes / bw


def ring_allgather(nbytes: float, n: int, alpha: float, bw: float) -> float:
    """Ring all-gather (or reduce-scatter) of `nbytes` in total: (n-1) steps of bytes/n each."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) * alpha + (n - 1) / n * nbytes / bw


ring_reduce_scatter = ring_allgather


def broadcast(nbytes: float, n: int, alpha: float, bw: float, pipelined: bool) -> float:
    """A broadcast: pipelined (NCCL: log2(n) steps of latency, the bytes once) or gloo's binomial tree
    (log2(n) rounds, each sending the whole buffer)."""
    if n <= 1:
        return 0.0
    rounds = math.ceil(math.log2(n))
    return rounds * alpha + nbytes / bw if pipelined else rounds * (alpha + nbytes / bw)


@dataclass(frozen=True)
class Group:
    """The ranks of one collective: how many, over how many nodes, how many such groups share a node's NICs."""

    size: int
    nodes: int
    concurrent: int = 1


class Network:
    """Collective times on a cluster for a backend: NCCL picks ring or tree for all-reduce, gloo rings only."""

    def __init__(self, cluster: ClusterProfile) -> None:
        self.cluster = cluster
        self.tree = cluster.backend == "nccl"

    def allreduce(self, nbytes: float, g: Group) -> float:
        alpha, bw = self.cluster.link(g.size, g.nodes, g.concurrent)
        ring = ring_allreduce(nbytes, g.size, alpha, bw)
        return min(ring, tree_allreduce(nbytes, g.size, alpha, bw)) if self.tree else ring

    def allgather(self, nbytes: float, g: Group) -> float:
        alpha, bw = self.cluster.link(g.size, g.nodes, g.concurrent)
        return ring_allgather(nbytes, g.size, alpha, bw)

    def reduce_scatter(self, nbytes: float, g: Group) -> float:
        if self.cluster.backend == "gloo":
            # gloo: clone the input, all-reduce all of it, copy this rank's part out.
            return self.allreduce(nbytes, g)
        alpha, bw = self.cluster.link(g.size, g.nodes, g.concurrent)
        return ring_reduce_scatter(nbytes, g.size, alpha, bw)

    def broadcast(self, nbytes: float, g: Group) -> float:
        alpha, bw = self.cluster.link(g.size, g.nodes, g.concurrent)
        return broadcast(nbytes, g.size, alpha, bw, pipelined=self.tree)

    def bucket_broadcasts(self, nbytes: float, g: Group) -> float:
        """Every rank broadcasts its 1/n share of `nbytes` (ZeroRedundancyOptimizer's parameter buckets), all
        issued at once: NCCL runs them one after another on its stream, gloo GLOO_THREADS at a time."""
        if g.size <= 1:
            return 0.0
        waves = g.size if self.tree else math.ceil(g.size / GLOO_THREADS)
        return waves * self.broadcast(nbytes / g.size, g)


# --- the prediction -----------------------------------------------------------------------------------------


@dataclass
class StepPrediction:
    strategy: str
    world: int
    nodes: int
    micro_batch: int
    accum: int
    global_batch: int
    compute: float  # seconds of forward/backward compute per optimizer step (all micro-steps)
    comm: float  # seconds the step's collectives take in all
    comm_exposed: float  # seconds of communication the step waits for (compute did not hide it)
    optimizer: float  # seconds of the optimizer step and gradient clipping
    step_time: float  # compute + comm_exposed + optimizer
    samples_per_second: float
    tokens_per_second: float | None
    mfu: float  # model FLOPs / (devices x peak FLOP/s of the compute dtype)
    memory: Any = None  # MemoryEstimate, or None when not estimated
    precision: str = "bf16-mixed"
    activation_checkpointing: str = "none"
    fits: bool | None = None  # memory.peak <= 0.9 x device memory (None: not estimated)
    #: Seconds per kind of collective in one step ("all-reduce", "all-gather", ...).
    breakdown: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Seconds of `compute` that are the training thread's host work around collectives (CPU ranks), not FLOPs.
    host: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "memory"}
        if self.memory is not None:
            m = self.memory
            out["memory"] = m.to_dict() if hasattr(m, "to_dict") else {"peak": m.peak}
        return out


def compute_dtype(precision: str) -> str:
    if precision not in DTYPE_OF_PRECISION:
        raise ValueError(f"precision must be one of {', '.join(DTYPE_OF_PRECISION)}; got {precision!r}")
    return DTYPE_OF_PRECISION[precision]


@dataclass
class _Compute:
    """Seconds of one micro-step's compute: the rest and each block, forward and backward."""

    rest_fwd: float
    rest_bwd: float
    fwd: list[float]
    bwd: list[float]

    @property
    def total(self) -> float:
        return self.rest_fwd + self.rest_bwd + sum(self.fwd) + sum(self.bwd)

    def scaled(self, factor: float) -> _Compute:
        return _Compute(
            self.rest_fwd * factor,
            self.rest_bwd * factor,
            [f * factor for f in self.fwd],
            [b * factor for b in self.bwd],
        )


def _compute(tr, cluster: ClusterProfile, precision: str, micro_batch: int, ac: str) -> _Compute:
    from linscale.perf.memory import checkpointed_blocks

    rate = cluster.peak(compute_dtype(precision)) * cluster.efficiency
    blocks = [f * micro_batch / rate for f in tr.block_fwd_flops_per_sample]
    total_fwd = tr.flops_per_sample * micro_batch / 3 / rate
    rest = max(0.0, total_fwd - sum(blocks))
    again = checkpointed_blocks(ac, len(blocks))
    return _Compute(rest, 2 * rest, blocks, [(3 if i in again else 2) * f for i, f in enumerate(blocks)])


def _padded(shapes, n: int) -> int:
    """Elements of tensors whose first dimension FSDP pads to a multiple of `n`."""
    total = 0
    for shape in shapes:
        shape = tuple(shape) or (1,)
        total += math.ceil(shape[0] / n) * n * math.prod(shape[1:])
    return total


def _powersgd_bytes(shapes, rank: int = 1) -> float:
    """Bytes PowerSGD sends for these gradients: (rows + cols) x rank per matrix it compresses, the rest whole."""
    total = 0.0
    for s in shapes:
        s = tuple(s) or (1,)
        rows, cols = s[0], math.prod(s[1:])
        small = (rows + cols) * rank
        total += 4 * (small if len(s) >= 2 and 2 * small < rows * cols else rows * cols)
    return total


HEAD = -2  # a gradient ready once the rest's backward (head, loss) is done, before the last block's
END = -1  # a gradient ready at the end of backward (embeddings, tied to the head or not)


def grad_ready_order(tr) -> list[tuple[int, tuple[int, ...]]]:
    """(when it is ready: HEAD, a block index or END; shape) of every gradient, in the order backward
    finishes them. Parameters outside the blocks that come after them in `model.parameters()` (final
    norm, untied head) are ready first; those before them (embeddings; a tied head shares the embedding,
    listed once, first) last. Without the parameter order every outside parameter counts as last."""
    num_blocks = len(tr.block_param_shapes)
    after: list[tuple[int, ...]] = []
    shapes, where = list(getattr(tr, "param_shapes", []) or []), list(getattr(tr, "param_blocks", []) or [])
    if shapes and len(shapes) == len(where):
        inside = [k for k, w in enumerate(where) if 0 <= w < num_blocks]
        last_inside = inside[-1] if inside else -1
        after = [tuple(s) for s in shapes[last_inside + 1 :]] if inside else []
    before = [tuple(s) for s in tr.other_param_shapes]
    for s in after:
        if s in before:
            before.remove(s)
    out = [(HEAD, s) for s in reversed(after)]
    for i in reversed(range(num_blocks)):
        out += [(i, tuple(s)) for s in reversed(tr.block_param_shapes[i])]
    return out + [(END, tuple(s)) for s in reversed(before)]


def ddp_buckets(tr, bucket_mb: float, bytes_per_grad: float = 4.0) -> list[tuple[int, float, list[tuple]]]:
    """DDP's buckets once rebuilt after the first step, in launch order: (when the bucket is complete:
    HEAD, a block index or END; bytes; shapes).

    DDP fills buckets in the order gradients become ready and closes one as soon as it holds at least
    the cap (`bucket_cap_mb`). linscale passes the cap explicitly, so torch uses it for the first bucket
    too, not dist._DEFAULT_FIRST_BUCKET_BYTES (1 MiB, only when bucket_cap_mb is left unset)."""
    cap = bucket_mb * 2**20
    buckets, size, members, last = [], 0.0, [], END
    for ready, shape in grad_ready_order(tr):
        size += math.prod(shape or (1,)) * bytes_per_grad
        members.append(shape)
        last = ready
        if size >= cap:
            buckets.append((last, size, members))
            size, members = 0.0, []
    if members:
        buckets.append((last, size, members))
    return buckets


def _ddp_microstep(c: _Compute, buckets, ar_times, hook_times) -> tuple[float, float]:
    """(seconds, exposed communication) of DDP's last micro-step: buckets all-reduced one after another
    as soon as their gradients are ready, the communication hook running on the training thread."""
    t = c.rest_fwd + sum(c.fwd) + c.rest_bwd
    queue = 0.0
    by_block: dict[int, list[int]] = {}
    for k, (owner, _, _) in enumerate(buckets):
        by_block.setdefault(owner, []).append(k)

    def launch(k: int) -> None:
        nonlocal t, queue
        t += hook_times[k]
        queue = max(queue, t) + ar_times[k]

    for k in by_block.get(HEAD, []):
        launch(k)
    for i in reversed(range(len(c.bwd))):
        t += c.bwd[i]
        for k in by_block.get(i, []):
            launch(k)
    for k in by_block.get(END, []):
        launch(k)
    return max(t, queue), max(0.0, queue - t)


class _Timeline:
    """A compute cursor and one communication queue; `blocking`: each collective holds the compute thread;
    `host`: seconds of the training thread's own work after each collective call (CPU ranks)."""

    def __init__(self, blocking: bool, host: float = 0.0) -> None:
        self.blocking = blocking
        self.host = host
        self.c = 0.0  # when compute is free
        self.q = 0.0  # when the communication queue is free
        self.comm = 0.0  # seconds of communication
        self.host_busy = 0.0  # seconds of host work around the collectives

    def collective(self, seconds: float, issued: float) -> float:
        start = max(self.q, issued, self.c if self.blocking else 0.0)
        self.q = start + seconds
        self.comm += seconds
        if self.blocking:
            self.c = self.q
        if self.host:
            self.run(self.host)
            self.host_busy += self.host
        return self.q

    def run(self, seconds: float, after: float = 0.0) -> float:
        self.c = max(self.c, after) + seconds
        return self.c


def _fsdp_microstep(
    c: _Compute, costs: dict[str, Any], zero3: bool, sync: bool, blocking: bool
) -> tuple[float, float, float]:
    """(seconds, communication seconds, host seconds) of one FSDP2 micro-step: the root's and each block's all-gather in
    forward (next block prefetched, at most two blocks unsharded), again in backward for zero3, and when
    `sync` each block's reduce-scatter (and hsdp all-reduce) after its backward, the root's last."""
    tl = _Timeline(blocking, costs.get("host", 0.0))
    n = len(c.fwd)
    ag, rs, ag_root, rs_root = costs["ag"], costs["rs"], costs["ag_root"], costs["rs_root"]
    # forward: the root's gather, then the blocks; the rest's compute counts at the model's output
    tl.run(0.0, after=tl.collective(ag_root, 0.0))
    gathered = [0.0] * n
    ends = [0.0] * n
    if n:
        gathered[0] = tl.collective(ag[0], 0.0)
    for i in range(n):
        if i + 1 < n:  # prefetched in block i's pre-forward, once block i-1 is resharded
            gathered[i + 1] = tl.collective(ag[i + 1], ends[i - 1] if i else 0.0)
        ends[i] = tl.run(c.fwd[i], after=gathered[i])
    tl.run(c.rest_fwd)
    # backward
    start = tl.c
    if zero3:
        tl.run(0.0, after=tl.collective(ag_root, start))  # the root resharded after forward
        if n:
            gathered[n - 1] = tl.collective(ag[n - 1], start)  # the root's pre-backward prefetches the last block
    tl.run(c.rest_bwd)
    done = [0.0] * n
    for i in reversed(range(n)):
        if zero3 and i > 0:  # block i's pre-backward prefetches block i-1 once block i+1 is resharded
            gathered[i - 1] = tl.collective(ag[i - 1], done[i + 1] if i + 1 < n else start)
        done[i] = tl.run(c.bwd[i], after=gathered[i] if zero3 else 0.0)
        if sync:
            tl.collective(rs[i], done[i])
    if sync:
        tl.collective(rs_root, tl.c)
    return max(tl.c, tl.q), tl.comm, tl.host_busy


@dataclass
class _Comm:
    """A strategy's communication in one optimizer step, and what its optimizer step works on."""

    comm: float = 0.0
    exposed: float = 0.0
    owned: int = 0  # parameters whose AdamW states this rank updates
    held: int = 0  # gradients this rank holds (clipped)
    host: float = 0.0  # seconds of the training thread's own work around the collectives (CPU ranks)
    dtensors: int = 0  # sharded (DTensor) parameters: the optimizer step's per-tensor host work
    breakdown: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, kind: str, seconds: float) -> None:
        self.breakdown[kind] = self.breakdown.get(kind, 0.0) + seconds


def _all_shapes(tr) -> list:
    return [s for block in tr.block_param_shapes for s in block] + list(tr.other_param_shapes)


def _ddp_comm(tr, cluster, kind, world, nodes, c, accum, bucket_mb, comm_hook) -> _Comm:
    net = Network(cluster)
    group = Group(world, nodes)
    out = _Comm(owned=tr.num_params if kind == "ddp" else math.ceil(tr.num_params / world), held=tr.num_params)
    buckets = ddp_buckets(tr, bucket_mb, 4.0)
    ar = []
    for _, nbytes, shapes in buckets:
        if comm_hook == "powersgd":  # two all-reduces (P, then Q) of the low-rank factors
            ar.append(2 * net.allreduce(_powersgd_bytes(shapes) / 2, group))
        else:
            ar.append(net.allreduce(nbytes / 2 if comm_hook in ("bf16", "fp16") else nbytes, group))
    # The hook divides (or casts) each fp32 bucket on the training thread: one read and one write.
    hooks = [2 * nbytes / cluster.mem_rate(world) for _, nbytes, _ in buckets]
    # The slowest rank sets the pace: its lag shows as waiting in the last micro-step's collectives.
    lag = c.scaled(1 + cluster.straggler)
    _, tail = _ddp_microstep(lag, buckets, ar, hooks)
    out.comm, out.exposed = sum(ar), tail + sum(hooks) + accum * (lag.total - c.total)
    out.add("all-reduce", sum(ar))
    out.notes.append(
        f"{len(buckets)} gradient bucket(s) of up to {bucket_mb:g} MiB all-reduced during the last micro-step's "
        f"backward; {1e3 * tail:.3g} ms of it runs past the end of backward"
    )
    buffers = getattr(tr, "buffer_bytes", 0)
    if buffers:
        # DDP broadcasts the buffers from rank 0 before the first micro-step's forward of every step.
        bcast = net.broadcast(buffers, group)
        out.add("broadcast", bcast)
        out.comm += bcast
        out.exposed += bcast
        out.notes.append(f"DDP broadcasts {buffers / 2**20:.3g} MiB of buffers from rank 0 once per step")
    if kind == "zero1":
        bcast = net.bucket_broadcasts(4 * tr.num_params, group)
        out.add("broadcast", bcast)
        out.comm += bcast
        out.exposed += bcast
        out.notes.append("zero1: each rank broadcasts its bucket of updated parameters after the step")
    return out


def _fsdp_comm(tr, cluster, kind, world, nodes, c, accum, precision, reduce_dtype) -> _Comm:
    net = Network(cluster)
    dpn = cluster.devices_per_node
    shard = min(world, dpn) if kind == "hsdp" else world
    shard_group = Group(shard, 1 if kind == "hsdp" else nodes)
    param_bytes = 2 if precision == "bf16-true" else 4
    red_bytes = 2 if reduce_dtype == "bf16" else 4
    gloo = cluster.backend == "gloo"
    mem_rate = cluster.mem_rate(world)
    one_pass: dict[str, float] = {}

    def unit(shapes) -> tuple[float, float]:
        padded = _padded(shapes, shard)
        full_p, full_r = padded * param_bytes, padded * red_bytes
        # FSDP2 copies the shard in and the whole parameters out (gloo flattens and copies once more);
        # the reduce-scatter copies the gradients in (gloo clones them and copies this rank's part out).
        ag_copy = (2 if gloo else 1) * 2 * (full_p + full_p / shard) / mem_rate
        rs_copy = (2 * full_r + (2 * full_r + 2 * full_r / shard if gloo else 0.0)) / mem_rate
        ag = net.allgather(full_p, shard_group) + ag_copy
        rs = net.reduce_scatter(full_r, shard_group) + rs_copy
        one_pass["all-gather"] = one_pass.get("all-gather", 0.0) + ag
        one_pass["reduce-scatter"] = one_pass.get("reduce-scatter", 0.0) + rs
        if kind == "hsdp" and nodes > 1:
            # The shard's gradient all-reduced across nodes; every local rank's group shares the node's NICs.
            ar = net.allreduce(padded / shard * red_bytes, Group(nodes, nodes, concurrent=shard))
            one_pass["all-reduce"] = one_pass.get("all-reduce", 0.0) + ar
            rs += ar
        return ag, rs

    blocks = [unit(shapes) for shapes in tr.block_param_shapes]
    ag_root, rs_root = unit(tr.other_param_shapes)
    costs = {"ag": [a for a, _ in blocks], "rs": [r for _, r in blocks], "ag_root": ag_root, "rs_root": rs_root}
    costs["host"] = cluster.host_call_overhead * cluster.host_share(world)
    zero3 = kind in ("zero3", "hsdp")
    blocking = not cluster.overlap_sharded
    lag = c.scaled(1 + cluster.straggler)  # the slowest rank sets the pace at every collective
    last, comm_last, host_last = _fsdp_microstep(lag, costs, zero3, sync=True, blocking=blocking)
    other, comm_other, host_other = (
        _fsdp_microstep(lag, costs, zero3, sync=False, blocking=blocking) if accum > 1 else (0, 0, 0)
    )
    owned = math.ceil(_padded(_all_shapes(tr), shard) / shard)
    out = _Comm(owned=owned, held=owned, dtensors=len(_all_shapes(tr)))
    out.comm = comm_last + (accum - 1) * comm_other
    out.host = host_last + (accum - 1) * host_other
    out.exposed = last + (accum - 1) * other - accum * c.total - out.host
    gathers = (2 if zero3 else 1) * accum
    for k, v in one_pass.items():
        out.add(k, v * (gathers if k == "all-gather" else 1))
    # clip_grad_norm_ over sharded gradients all-reduces the norm (hsdp: over both mesh dimensions).
    norm = net.allreduce(8, Group(world, nodes)) * (2 if kind == "hsdp" and nodes > 1 else 1)
    out.add("all-reduce", norm)
    out.comm += norm
    out.exposed += norm
    how = "hold the training thread (gloo)" if blocking else "overlap compute (NCCL streams)"
    out.notes.append(
        f"FSDP2 collectives {how}; {gathers} parameter all-gather pass(es) per step"
        + ("; gloo's reduce-scatter is an all-reduce of the whole gradient" if gloo else "")
    )
    return out


def predict_step(
    tr,
    cluster: ClusterProfile,
    strategy: str,
    world: int,
    global_batch: int,
    micro_batch: int,
    precision: str = "bf16-mixed",
    activation_checkpointing: str = "none",
    bucket_mb: float = 25.0,
    reduce_dtype: str = "fp32",
    memory: bool = True,
    comm_hook: str = "none",
    memory_fn: Callable[..., Any] | None = None,
    optimizer_impl: str = "fused",
) -> StepPrediction:
    """The predicted optimizer step of `strategy` on `world` devices of `cluster` (nodes filled in order).

    `global_batch` samples per step, `micro_batch` per forward/backward (the accumulation follows).
    `optimizer_impl`: the AdamW kernel, fused (optim.impl=auto on CPU and CUDA) or foreach.
    `memory`: also estimate the memory per device (linscale.perf.memory.estimate, or `memory_fn`)."""
    from linscale.train.batching import plan_batch

    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    plan = plan_batch(global_batch, world, micro_batch)
    nodes = math.ceil(world / cluster.devices_per_node)
    if strategy == "auto":
        from linscale.runtime.parallel import choose_strategy

        strategy = choose_strategy(tr.num_params, world, cluster.device_memory).strategy
    kind = "zero3" if strategy == "fsdp" else strategy
    if kind not in STRATEGIES:
        raise ValueError(f"strategy must be one of ddp, zero1, zero2, zero3, fsdp, hsdp, auto; got {strategy!r}")
    if kind == "hsdp" and world > cluster.devices_per_node and world % cluster.devices_per_node:
        raise ValueError(
            f"hsdp needs the same number of processes on every node: {world} is not a multiple of "
            f"{cluster.devices_per_node}"
        )
    if kind in ("ddp", "zero1") and precision == "bf16-true":
        raise ValueError(f"precision bf16-true needs a sharded strategy (zero2, zero3, fsdp, hsdp), not {strategy}")
    c = _compute(tr, cluster, precision, plan.micro_batch, activation_checkpointing)
    accum = plan.accum_steps
    if world == 1:
        # One process: the model is not wrapped, nothing is communicated.
        comm = _Comm(owned=tr.num_params, held=tr.num_params)
        comm.notes.append("one process: the model is not wrapped and nothing is communicated")
    elif kind in ("ddp", "zero1"):
        comm = _ddp_comm(tr, cluster, kind, world, nodes, c, accum, bucket_mb, comm_hook)
    else:
        comm = _fsdp_comm(tr, cluster, kind, world, nodes, c, accum, precision, reduce_dtype)
    compute = accum * c.total + comm.host
    opt_bytes = OPTIMIZER_BYTES_PER_PARAM * comm.owned + CLIP_BYTES_PER_GRAD * comm.held
    if precision == "fp16-mixed":
        opt_bytes += SCALER_BYTES_PER_GRAD * comm.held
    opt_rate = cluster.mem_rate(world) * cluster.optimizer_efficiency
    optimizer = opt_bytes / opt_rate * (cluster.foreach_slowdown if optimizer_impl == "foreach" else 1.0)
    optimizer += comm.dtensors * cluster.host_tensor_overhead * cluster.host_share(world)
    exposed = max(0.0, comm.exposed)
    step = compute + exposed + optimizer
    samples = plan.global_batch / step
    tps = getattr(tr, "tokens_per_sample", None)
    pred = StepPrediction(
        strategy=strategy,
        world=world,
        nodes=nodes,
        micro_batch=plan.micro_batch,
        accum=accum,
        global_batch=plan.global_batch,
        compute=compute,
        comm=comm.comm,
        comm_exposed=exposed,
        optimizer=optimizer,
        step_time=step,
        samples_per_second=samples,
        tokens_per_second=samples * tps if tps else None,
        mfu=tr.flops_per_sample * samples / (world * cluster.peak(compute_dtype(precision))),
        precision=precision,
        activation_checkpointing=activation_checkpointing,
        breakdown=comm.breakdown,
        notes=comm.notes,
        host=comm.host,
    )
    if memory or memory_fn is not None:
        pred.memory = (memory_fn or functools.partial(_estimate, optimizer_impl=optimizer_impl))(
            tr,
            strategy,
            world=world,
            nodes=nodes,
            micro_batch=plan.micro_batch,
            precision=precision,
            activation_checkpointing=activation_checkpointing,
            bucket_mb=bucket_mb,
            reduce_dtype=reduce_dtype,
            comm_hook=comm_hook,
        )
        pred.fits = pred.memory.peak <= FIT * cluster.device_memory
    return pred


def _estimate(tr, strategy: str, comm_hook: str = "none", **kw):
    from linscale.perf.memory import estimate

    return estimate(tr, strategy, comm_hook=comm_hook if strategy in ("ddp", "zero1") else "none", **kw)


# --- scaling ------------------------------------------------------------------------------------------------


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def scaling(
    tr, cluster: ClusterProfile, strategy: str, devices: list[int], mode: str, global_batch: int, micro_batch: int, **kw
) -> list[dict[str, Any]]:
    """Predicted throughput at each device count, and the scaling efficiency against the first.

    mode "strong": the global batch stays `global_batch`; "weak": every device keeps the share it has at
    `devices[0]` (`global_batch / devices[0]`), so the global batch grows with the devices. The micro-batch
    is the largest divisor of each device's share up to `micro_batch`. Each row: devices, nodes,
    global_batch, micro_batch, accum, step_time, compute, comm_exposed, optimizer, throughput (samples/s),
    tokens_per_second, mfu, fits (None without a memory estimate) and efficiency = throughput /
    (devices x throughput at devices[0] / devices[0]); a row that cannot be planned holds `error`."""
    if mode not in ("strong", "weak"):
        raise ValueError(f"scaling mode must be strong or weak, got {mode!r}")
    if not devices or min(devices) < 1:
        raise ValueError(f"devices must be counts >= 1, got {devices}")
    if mode == "weak" and global_batch % devices[0]:
        raise ValueError(f"weak scaling keeps each device's share: {global_batch} does not divide over {devices[0]}")
    per_device = global_batch // devices[0]
    kw.setdefault("memory", False)
    rows: list[dict[str, Any]] = []
    for d in devices:
        gb = global_batch if mode == "strong" else per_device * d
        row: dict[str, Any] = {"devices": d, "nodes": math.ceil(d / cluster.devices_per_node), "global_batch": gb}
        try:
            if gb % d:
                raise ValueError(f"the global batch {gb} does not divide over {d} devices")
            mb = _largest_divisor(gb // d, micro_batch)
            p = predict_step(tr, cluster, strategy, d, gb, mb, **kw)
        except ValueError as e:
            rows.append({**row, "error": str(e), "efficiency": None})
            continue
        row.update(
            micro_batch=p.micro_batch,
            accum=p.accum,
            step_time=p.step_time,
            compute=p.compute,
            comm_exposed=p.comm_exposed,
            optimizer=p.optimizer,
            throughput=p.samples_per_second,
            tokens_per_second=p.tokens_per_second,
            mfu=p.mfu,
            fits=p.fits,
        )
        rows.append(row)
    base = next((r for r in rows if "error" not in r), None)
    for r in rows:
        if "error" not in r and base is not None:
            r["efficiency"] = r["throughput"] / (r["devices"] * base["throughput"] / base["devices"])
    return rows


def device_counts(world: int, devices_per_node: int) -> list[int]:
    """1, 2, 4, ... up to `world`, with each whole node and `world` itself."""
    counts = {1, world}
    d = 1
    while d < world:
        counts.add(d)
        d *= 2
    counts.update(range(devices_per_node, world + 1, devices_per_node))
    return sorted(c for c in counts if c <= world)


# --- the recommendation -------------------------------------------------------------------------------------


@dataclass
class Recommendation:
    strategy: str
    micro_batch: int
    accum: int
    activation_checkpointing: str
    prediction: StepPrediction
    why: str
    #: Every configuration that fits, fastest first (the first is the recommendation).
    candidates: list[StepPrediction] = field(default_factory=list)
    #: Configurations that did not fit or are not allowed: strategy, micro_batch, activation_checkpointing, reason.
    rejected: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "micro_batch": self.micro_batch,
            "accum": self.accum,
            "activation_checkpointing": self.activation_checkpointing,
            "prediction": self.prediction.to_dict(),
            "why": self.why,
            "runners_up": [c.to_dict() for c in self.candidates[1:6]],
            "rejected": self.rejected,
        }


def _simplicity(p: StepPrediction) -> tuple:
    order = {s: i for i, s in enumerate(STRATEGIES)}
    return (order.get(p.strategy, len(order)), p.activation_checkpointing != "none", -p.micro_batch)


def _label(p: StepPrediction) -> str:
    ac = "" if p.activation_checkpointing == "none" else f", checkpointing {p.activation_checkpointing}"
    return f"{p.strategy} micro-batch {p.micro_batch} x {p.accum}{ac}"


def _least_memory(r: dict[str, Any]) -> tuple:
    return (r["peak"], r["micro_batch"], r["activation_checkpointing"] == "none")


def _secs(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds >= 1 else f"{1e3 * seconds:.3g} ms"


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def recommend(
    tr,
    cluster: ClusterProfile,
    global_batch: int,
    precision: str = "bf16-mixed",
    strategies=None,
    memory_fn: Callable[..., Any] | None = None,
    micro_batches: list[int] | None = None,
    activation_checkpointing: tuple[str, ...] = ("none", "full"),
    world: int | None = None,
    **kw,
) -> Recommendation:
    """The strategy, micro-batch and activation checkpointing that fit the device memory (estimated peak
    <= 0.9 x device memory) and give the shortest predicted step on the whole cluster (`world` devices).

    Candidates: `strategies` (default ddp, zero1, zero2, zero3, and hsdp on several nodes) x `micro_batches`
    (default every divisor of a device's share of the global batch) x `activation_checkpointing`. Step
    times within 1% count as equal, and the simpler configuration wins (strategies in that order, no
    recomputation, the larger micro-batch). `kw` goes to `predict_step` (bucket_mb, reduce_dtype, comm_hook:
    the hook applies to ddp/zero1, reduce_dtype to the sharded ones). `.why` says why, names the runners-up
    and what did not fit."""
    world = world or cluster.world
    nodes = math.ceil(world / cluster.devices_per_node)
    if strategies is None:
        strategies = [s for s in STRATEGIES if s != "hsdp" or nodes > 1]
    from linscale.train.batching import plan_batch

    share = plan_batch(global_batch, world).per_replica  # the ValueError names a global batch that divides
    mbs = micro_batches or [d for d in range(1, share + 1) if share % d == 0]
    fitting: list[StepPrediction] = []
    rejected: list[dict[str, Any]] = []
    comm_hook = kw.pop("comm_hook", "none")
    reduce_dtype = kw.pop("reduce_dtype", "fp32")
    for strategy in strategies:
        sharded = strategy in SHARDED
        for ac in activation_checkpointing:
            for mb in sorted(mbs, reverse=True):
                entry = {"strategy": strategy, "micro_batch": mb, "activation_checkpointing": ac}
                try:
                    p = predict_step(
                        tr,
                        cluster,
                        strategy,
                        world,
                        global_batch,
                        mb,
                        precision=precision,
                        activation_checkpointing=ac,
                        reduce_dtype=reduce_dtype if sharded else "fp32",
                        comm_hook="none" if sharded else comm_hook,
                        memory=True,
                        memory_fn=memory_fn,
                        **kw,
                    )
                except ValueError as e:
                    rejected.append({**entry, "reason": str(e), "peak": None})
                    break  # the same for every micro-batch
                if p.fits:
                    fitting.append(p)
                else:
                    rejected.append({**entry, "reason": "does not fit", "peak": p.memory.peak})
    limit = FIT * cluster.device_memory
    if not fitting:
        least = min((r for r in rejected if r["peak"] is not None), key=_least_memory, default=None)
        detail = (
            f"; the least memory needs {least['strategy']} micro-batch {least['micro_batch']} checkpointing "
            f"{least['activation_checkpointing']}: {_gib(least['peak'])} of {_gib(limit)} allowed"
            if least
            else "; " + "; ".join(sorted({r["reason"] for r in rejected}))
        )
        raise ValueError(
            f"no configuration fits {cluster.device} ({_gib(cluster.device_memory)}, 90% usable) on {world} devices"
            f"{detail}. Add nodes (--nodes), use a sharded strategy on more devices, or a smaller model"
        )
    fitting.sort(key=lambda p: p.step_time)
    best_time = fitting[0].step_time
    tied = [p for p in fitting if p.step_time <= best_time * (1 + TIE)]
    best = min(tied, key=_simplicity)
    fitting.remove(best)
    fitting.insert(0, best)
    why = _why(best, fitting, rejected, cluster, limit, tied)
    return Recommendation(
        strategy=best.strategy,
        micro_batch=best.micro_batch,
        accum=best.accum,
        activation_checkpointing=best.activation_checkpointing,
        prediction=best,
        why=why,
        candidates=fitting,
        rejected=rejected,
    )


def _why(best, fitting, rejected, cluster, limit, tied) -> str:
    lines = [
        f"{_label(best)}: the shortest predicted step ({_secs(best.step_time)}) of the {len(fitting)} "
        f"configuration(s) that fit ({_gib(best.memory.peak)} peak of the {_gib(limit)} allowed, 90% of "
        f"{_gib(cluster.device_memory)})"
    ]
    if len(tied) > 1:
        lines.append(f"{len(tied) - 1} other(s) within 1%, of which this is the simplest")
    parts = {"compute": best.compute, "exposed communication": best.comm_exposed, "optimizer": best.optimizer}
    top = max(parts, key=parts.get)
    lines.append(f"the step is mostly {top} ({100 * parts[top] / best.step_time:.0f}%)")
    fast = {d: v for d, v in cluster.peak_flops.items() if v > 1.5 * cluster.peak_flops.get("fp32", math.inf)}
    if best.precision == "fp32" and fast:
        d, v = max(fast.items(), key=lambda kv: kv[1])
        lines.append(
            f"{cluster.device} computes {d} at {v / 1e12:g} TFLOP/s against {cluster.peak_flops['fp32'] / 1e12:g} in "
            f"fp32: --precision {'bf16-mixed' if d == 'bf16' else 'fp16-mixed'} would be faster"
        )
    too_big = [
        r["micro_batch"]
        for r in rejected
        if r["strategy"] == best.strategy and r["activation_checkpointing"] == best.activation_checkpointing
        and r["peak"] is not None and r["micro_batch"] > best.micro_batch
    ]  # fmt: skip
    if too_big:
        lines.append(f"micro-batch {min(too_big)} and larger do not fit")
    seen = {best.strategy}
    for p in fitting[1:]:
        if p.strategy not in seen:
            seen.add(p.strategy)
            lines.append(
                f"runner-up {_label(p)}: {_secs(p.step_time)} (+{100 * (p.step_time / best.step_time - 1):.0f}%, "
                f"exposed communication {_secs(p.comm_exposed)})"
            )
    for strategy in dict.fromkeys(r["strategy"] for r in rejected):
        if strategy in seen:
            continue
        mine = [r for r in rejected if r["strategy"] == strategy]
        sized = [r for r in mine if r["peak"] is not None]
        if sized:
            least = min(sized, key=_least_memory)
            lines.append(
                f"{strategy} does not fit: even micro-batch {least['micro_batch']} with checkpointing "
                f"{least['activation_checkpointing']} needs {_gib(least['peak'])}"
            )
        else:
            lines.append(f"{strategy} is not possible: {mine[0]['reason']}")
    return "; ".join(lines)


# --- the budget ---------------------------------------------------------------------------------------------


def budget(
    p: StepPrediction,
    tokens: float | None = None,
    epochs: float | None = None,
    dataset_samples: int | None = None,
    tokens_per_sample: int | None = None,
) -> dict[str, Any]:
    """Steps, wall-clock seconds and device-hours to train `tokens` tokens or `epochs` over `dataset_samples`
    (an epoch is the whole global batches it holds: the sampler skips the tail)."""
    if tokens is not None:
        if not tokens_per_sample:
            raise ValueError(
                "a budget in tokens needs a task with tokens_per_sample; use --epochs and --dataset-samples"
            )
        steps = math.ceil(tokens / (p.global_batch * tokens_per_sample))
        what = f"{tokens:,.0f} tokens"
    elif epochs is not None:
        if not dataset_samples:
            raise ValueError("--epochs needs --dataset-samples (the number of training samples)")
        per_epoch = dataset_samples // p.global_batch
        if per_epoch < 1:
            raise ValueError(f"{dataset_samples} samples hold no whole global batch of {p.global_batch}")
        steps = math.ceil(epochs * per_epoch)
        what = f"{epochs:g} epoch(s) of {dataset_samples} samples"
    else:
        raise ValueError("a budget needs tokens, or epochs and dataset_samples")
    seconds = steps * p.step_time
    return {
        "budget": what,
        "steps": steps,
        "seconds": seconds,
        "hours": seconds / 3600,
        "device_hours": seconds * p.world / 3600,
    }
