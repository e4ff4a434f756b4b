"""Applying the data-parallel strategy to a model, and measuring its exposed communication.

Strategies (`parallel.strategy`):
  ddp    replicated model, bucketed all-reduce overlapped with backward (DistributedDataParallel)
  zero1  ddp, with the optimizer states sharded across replicas (ZeroRedundancyOptimizer)
  zero2  optimizer states and gradients sharded; parameters stay whole from forward to backward
         (FSDP2 `fully_shard` with reshard_after_forward=False)
  zero3  everything sharded, each block gathered when needed (FSDP2, per block then the root);
  fsdp   the same as zero3
  hsdp   zero3 inside a node, replicated across nodes: a 2-D mesh (replicate x shard) from the
         topology, so the slow inter-node links carry one gradient all-reduce
  auto   the simplest of these whose model states fit the device memory (see `choose_strategy`)

The model's repeated blocks come from the task (`Task.blocks`); nothing here names a model class.
"""

import contextlib
import functools
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint, noop_context_fn

from linscale.config import ParallelConfig
from linscale.runtime import dist as ldist
from linscale.runtime.device import Device
from linscale.runtime.topology import Topology

SHARDED = ("zero2", "zero3", "fsdp", "hsdp")


class CommClock:
    """The communication a training step did not hide behind compute: the exposed communication.

    DDP launches each bucket's all-reduce as soon as its gradients are ready, overlapping it with
    the rest of backward, and `backward()` returns only once every reduction has finished. The
    time from the last launch to the end of backward is the exposed communication.

    Sharded strategies (FSDP2) gather parameters and reduce-scatter gradients through collectives
    that linscale times (`TimedAllGather`, `TimedReduceScatter`, the all-reduce hook of hsdp's
    replica reduction). Where a collective blocks the training thread (gloo on CPU) its whole time
    is exposed and counts in `blocked`; where it is queued on a stream (NCCL) the call returns at
    once, and what is exposed is the wait from the last gradient reduction to the end of backward,
    as for DDP. On GPUs both figures are taken on the host, so queued compute can count as exposed:
    treat them as an upper bound there.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        self.last_launch: float | None = None
        self.launches = 0  # gradient reductions started, for tests and diagnostics
        self.blocked = 0.0  # seconds the training thread spent inside sharded collectives
        self.gathers = 0  # parameter all-gathers of sharded strategies

    def take(self) -> float | None:
        t, self.last_launch = self.last_launch, None
        return t

    def take_blocked(self) -> float:
        t, self.blocked = self.blocked, 0.0
        return t

    def reduced(self, started: float | None = None) -> None:
        """A gradient reduction returned; `started`: when it was called, if it blocked until now."""
        now = time.perf_counter()
        if started is not None:
            self.blocked += now - started
            self.launches += 1
        elif self.last_launch is not None:  # hsdp: the replica all-reduce ran since the reduce-scatter
            self.blocked += now - self.last_launch
        self.last_launch = now


def timed_collectives(clock: CommClock):
    """An all-gather, a reduce-scatter and an all-reduce hook for FSDP2 that report to `clock`."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    class TimedAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            t0 = time.perf_counter()
            try:
                return super().__call__(output_tensor, input_tensor, group, async_op)
            finally:
                clock.blocked += time.perf_counter() - t0
                clock.gathers += 1

    class TimedReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            t0 = time.perf_counter()
            try:
                return super().__call__(output_tensor, input_tensor, group, op, async_op)
            finally:
                clock.reduced(started=t0)

    def after_all_reduce(_output: torch.Tensor) -> None:
        clock.reduced()  # hsdp: after the replica all-reduce (FSDP: right after the reduce-scatter)

    return TimedAllGather(), TimedReduceScatter(), after_all_reduce


def _timed_allreduce(clock: CommClock, bucket: dist.GradBucket):
    clock.last_launch = time.perf_counter()
    clock.launches += 1
    return default_hooks.allreduce_hook(clock.process_group, bucket)


def bf16_allreduce(process_group: dist.ProcessGroup | None, bucket: dist.GradBucket):
    """Average a gradient bucket with an all-reduce in bf16: half the bytes of fp32, fp32's range.

    torch's own `bf16_compress_hook` is refused by DDP unless the backend is NCCL 2.10+ on CUDA;
    gloo all-reduces bf16 too, so this is the same few steps for every backend. The bf16 sum is
    cast back into the fp32 bucket in place and divided there."""
    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16)

    def decompress(fut):
        return buffer.copy_(fut.value()[0]).div_(group.size())

    return dist.all_reduce(compressed, group=group, async_op=True).get_future().then(decompress)


def comm_hook(cfg: ParallelConfig, clock: CommClock):
    """The DDP communication hook for `cfg.comm_hook`, stamping `clock` when a bucket is launched
    like `_timed_allreduce`, so exposed communication is measured with compression too."""
    if cfg.comm_hook == "none":
        return _timed_allreduce
    if cfg.comm_hook == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        state = powerSGD_hook.PowerSGDState(
            process_group=clock.process_group,
            matrix_approximation_rank=cfg.powersgd_rank,
            start_powerSGD_iter=cfg.powersgd_warmup,
        )
        inner, inner_state = powerSGD_hook.powerSGD_hook, state
    else:
        inner = bf16_allreduce if cfg.comm_hook == "bf16" else default_hooks.fp16_compress_hook
        inner_state = clock.process_group

    def timed_compressed(clock: CommClock, bucket: dist.GradBucket):
        clock.last_launch = time.perf_counter()
        clock.launches += 1
        return inner(inner_state, bucket)

    return timed_compressed


def describe_communication(strategy: str, cfg: ParallelConfig, world: int, nodes: int = 1) -> str:
    """What a step sends over the network, in words, for the summary block."""
    if world <= 1:
        return "none (one process)"
    if strategy in ("ddp", "zero1"):
        what = f"gradient all-reduce in {cfg.bucket_mb:g} MiB buckets overlapped with backward"
        if cfg.comm_hook in ("bf16", "fp16"):
            what += f", compressed to {cfg.comm_hook}"
        elif cfg.comm_hook == "powersgd":
            what += f", PowerSGD rank {cfg.powersgd_rank} after {cfg.powersgd_warmup} exact steps"
        else:
            what += ", fp32"
        return what + ("; parameter broadcast after the sharded optimizer step" if strategy == "zero1" else "")
    gathers = "in forward" if strategy == "zero2" else "in forward and backward"
    what = f"parameter all-gather {gathers}, gradient reduce-scatter in {cfg.reduce_dtype}"
    if strategy == "hsdp":
        what += f" inside each node, then all-reduce across the {nodes} nodes"
    return what


@dataclass
class Choice:
    strategy: str
    reason: str


def model_state_bytes(num_params: int, world: int, strategy: str) -> float:
    """Rough per-device bytes of fp32 parameters (4), gradients (4) and AdamW states (8) per parameter.

    A lower bound: activations, buffers and communication buckets come on top.
    """
    n = max(1, world)
    params, grads, optim = 4.0 * num_params, 4.0 * num_params, 8.0 * num_params
    if strategy == "ddp":
        return params + grads + optim
    if strategy == "zero1":
        return params + grads + optim / n
    if strategy == "zero2":
        return params + (grads + optim) / n
    return (params + grads + optim) / n


def choose_strategy(num_params: int, world: int, device_memory: float, headroom: float = 0.5) -> Choice:
    """The simplest strategy whose model states take at most `headroom` of the device memory,
    leaving the rest for activations and buffers."""
    budget = headroom * device_memory
    for strategy in ("ddp", "zero1", "zero2", "zero3"):
        need = model_state_bytes(num_params, world, strategy)
        if world == 1 or need <= budget:
            return Choice(
                strategy,
                f"model states take about {need / 2**30:.2f} GiB per device of the "
                f"{budget / 2**30:.2f} GiB allowed ({headroom:.0%} of {device_memory / 2**30:.1f} GiB)"
                + ("; one process needs no sharding" if world == 1 else ""),
            )
    need = model_state_bytes(num_params, world, "zero3")
    return Choice(
        "zero3",
        f"even fully sharded the model states need about {need / 2**30:.2f} GiB per device, more than "
        f"{budget / 2**30:.2f} GiB; expect running out of memory: add devices or use a smaller model",
    )


def checkpoint_blocks(blocks: list[nn.Module], every: int) -> int:
    """Recompute the activations of every `every`-th block in backward instead of keeping them.

    The block's forward is wrapped in place, so parameter names and state dicts do not change.
    A block's BatchNorm running statistics are updated by its forward only: the recomputation in
    backward runs the forward again in training mode, and would otherwise apply each batch's
    statistics twice. Returns the number of blocks wrapped."""
    if every <= 0:
        return 0
    wrapped = 0
    for i, block in enumerate(blocks):
        if i % every:
            continue
        inner = block.forward
        norms = [m for m in block.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        context_fn = functools.partial(_recompute_contexts, norms) if norms else noop_context_fn

        def forward(*args, _inner=inner, _context_fn=context_fn, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, context_fn=_context_fn, **kwargs)

        block.forward = forward
        wrapped += 1
    return wrapped


def _recompute_contexts(norms: list[nn.Module]):
    """(forward context, recomputation context): the latter restores the norms' running statistics."""
    return contextlib.nullcontext(), _running_stats_kept(norms)


def _running_stats(norm: nn.Module) -> list[torch.Tensor]:
    return [b for b in (norm.running_mean, norm.running_var, norm.num_batches_tracked) if b is not None]


@contextlib.contextmanager
def _running_stats_kept(norms: list[nn.Module]):
    saved = [[b.clone() for b in _running_stats(m)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, values in zip(norms, saved, strict=True):
                for b, v in zip(_running_stats(m), values, strict=True):
                    b.copy_(v)


def _mesh(strategy: str, topo: Topology, device: Device):
    from torch.distributed.device_mesh import init_device_mesh

    if strategy == "hsdp":
        if topo.world_size % topo.local_world_size:
            raise ValueError("hsdp needs the same number of processes on every node")
        shape = (topo.world_size // topo.local_world_size, topo.local_world_size)
        return init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (topo.world_size,), mesh_dim_names=("shard",))


def wrap(
    model: nn.Module,
    cfg: ParallelConfig,
    device: Device,
    topo: Topology | None = None,
    blocks: list[nn.Module] | None = None,
    strategy: str | None = None,
    param_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, CommClock]:
    """Apply `strategy` (default: cfg.strategy) to `model`; a single process keeps it as is.

    `param_dtype` (sharded strategies): the dtype parameters are gathered and computed in, for
    runtime.precision=bf16-true; the shards, and so the optimizer states, stay as they are."""
    strategy = strategy or cfg.strategy
    clock = CommClock()
    checkpoint_blocks(blocks or [], cfg.checkpoint_every)
    if not ldist.active() or dist.get_world_size() == 1:
        return model, clock
    if strategy in ("ddp", "zero1"):
        ddp = DistributedDataParallel(
            model,
            device_ids=device.ddp_device_ids,
            bucket_cap_mb=cfg.bucket_mb,
            gradient_as_bucket_view=cfg.gradient_as_bucket_view,
        )
        ddp.register_comm_hook(clock, comm_hook(cfg, clock))
        return ddp, clock
    assert strategy in SHARDED, strategy
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    assert topo is not None, "sharded strategies need the topology"
    mesh = _mesh(strategy, topo, device)
    # zero2 keeps the gathered parameters from forward to backward; zero3/fsdp/hsdp free them
    # after each block's forward and gather them again in backward.
    reshard = strategy != "zero2"
    # Gradients are reduced in reduce_dtype (fp32 by default, also under bf16-true).
    reduce_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.reduce_dtype]
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = blocks or []
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    gather, reduce_scatter, after_all_reduce = timed_collectives(clock)
    for module in [*blocks, model]:
        module.set_custom_all_gather(gather)
        module.set_custom_reduce_scatter(reduce_scatter)
        module.set_all_reduce_hook(after_all_reduce)
    # Prefetch: gather the next block's parameters while this one computes, in forward and
    # (in reverse order) in backward, so the all-gathers hide behind compute.
    for i, block in enumerate(blocks):
        if i + 1 < len(blocks):
            block.set_modules_to_forward_prefetch([blocks[i + 1]])
        if i > 0:
            block.set_modules_to_backward_prefetch([blocks[i - 1]])
    return model, clock


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def sync_gradients(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient reduction on non-final micro-steps of an accumulation."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, whole and on the CPU, on every rank (a collective when sharded)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def local_bytes(tensors) -> int:
    """Bytes this rank holds for `tensors` (only the local shard of a sharded tensor)."""
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def model_state_memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer states this rank actually holds."""
    params = list(model.parameters())
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps its shard's optimizer
    states = [v for state in inner.state.values() for v in state.values()]
    return {
        "params": local_bytes(params),
        "grads": local_bytes(p.grad for p in params),
        "optimizer": local_bytes(states),
    }


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global L2 norm is at most `max_norm`; returns that norm (fp32).

    The same figure as `torch.nn.utils.clip_grad_norm_`, for plain and sharded (DTensor) gradients
    alike, with one reduction per group of sharded gradients: the local shards' norms come from one
    foreach kernel, their squares are summed over the mesh dimensions the gradients are sharded on
    (hsdp: the shard dimension only; the replicas already hold equal gradients), the replicated
    gradients' norm is added once, and the scaling runs on the local shards. torch's version
    dispatches each DTensor on its own, which costs more than the arithmetic for small shards.
    `max_norm` inf: only the norm (nothing is scaled)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Shard

    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    grads = [p.grad for p in params]
    if any(isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements) for g in grads):
        # Gradients not yet reduced (no strategy of linscale leaves them so): torch's version.
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            dims = tuple(i for i, pl in enumerate(g.placements) if isinstance(pl, Shard))
            groups.setdefault((g.device_mesh, dims), []).append(g.to_local())
        else:
            groups.setdefault((None, ()), []).append(g)
    total = None
    for (mesh, dims), tensors in groups.items():
        sq = torch.nn.utils.get_total_norm(tensors, 2.0, foreach=True).float() ** 2
        for dim in dims:
            dist.all_reduce(sq, group=mesh.get_group(dim))
        total = sq if total is None else total + sq.to(total.device)
    norm = total.sqrt()
    if math.isinf(max_norm):
        return norm
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for tensors in groups.values():
        for t in tensors:
            by_kind.setdefault((t.device, t.dtype), []).append(t)
    for (device, dtype), tensors in by_kind.items():
        torch._foreach_mul_(tensors, scale.to(device, dtype))
    return norm
