"""The training loop: flat, small functions, one code path for every device and world size."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.flop_counter import FlopCounterMode

from linscale.config import ConfigError, RunConfig
from linscale.runtime import device as devmod
from linscale.runtime import dist as ldist
from linscale.runtime import parallel, topology
from linscale.runtime.device import Device
from linscale.runtime.topology import Topology
from linscale.task import DataShard, Task, TaskError
from linscale.train import checkpoint as ckptmod
from linscale.train import metrics as mx
from linscale.train.batching import BatchPlan, StepSampler, plan_batch, tokens_to_samples
from linscale.train.optim import build_optimizer, build_scheduler, check_schedule, resolve_impl, scaled_lr
from linscale.train.precision import Precision, check_combination, host_float, resolve_precision
from linscale.train.rundir import default_run_dir, write_run_dir


def make_task(task_cls: type, cfg: RunConfig) -> Task:
    return task_cls(cfg.task) if getattr(task_cls, "Config", None) is not None else task_cls()


_last_trace: tuple[tuple, Any] | None = None


def traced(task_cls: type, cfg: RunConfig, precision: str):
    """The task's model traced on fake tensors (perf/memory.py) in a task instance of its own, the run's
    random numbers left alone; the last one is kept, so micro_batch=auto and the run's prediction share it."""
    global _last_trace
    from linscale.perf.memory import trace

    key = (task_cls, repr(cfg.task), precision)
    if _last_trace is None or _last_trace[0] != key:
        with torch.random.fork_rng(devices=[]):
            _last_trace = (key, trace(make_task(task_cls, cfg), precision))
    return _last_trace[1]


def default_global_batch(task_cls: type) -> int:
    """The global batch a task's learning rate is tuned for: its default, else linscale's."""
    from linscale.config import TrainConfig

    default = getattr(task_cls, "defaults", {}).get("train", {}).get("global_batch")
    return int(default) if default else TrainConfig.__dataclass_fields__["global_batch"].default


def plan_run(task: Task, cfg: RunConfig, replicas: int) -> tuple[BatchPlan, int | None]:
    """The batch split and the step limit, with every check that needs no process group."""
    tokens_per_sample = getattr(task, "tokens_per_sample", None)
    if cfg.train.global_batch_tokens:
        samples = tokens_to_samples(cfg.train.global_batch_tokens, tokens_per_sample)
    else:
        samples = cfg.train.global_batch
    # auto: the whole share for now; the run picks the micro-batch once the strategy is known.
    micro = 0 if cfg.train.micro_batch == "auto" else cfg.train.micro_batch
    plan = plan_batch(samples, replicas, micro)
    limits = []
    if cfg.train.max_steps:
        limits.append(cfg.train.max_steps)
    if cfg.train.max_tokens:
        if not tokens_per_sample:
            raise ValueError("train.max_tokens needs a task with tokens_per_sample; use train.max_steps")
        limits.append(math.ceil(cfg.train.max_tokens / (plan.global_batch * tokens_per_sample)))
    total_steps = min(limits) if limits else None
    if cfg.train.target_loss and getattr(type(task), "eval_data", None) in (None, Task.eval_data):
        raise ConfigError(
            f"train.target_loss={cfg.train.target_loss} needs evaluation, but this task has no eval_data; "
            "define eval_data(shard) in the task or leave train.target_loss at 0"
        )
    check_schedule(cfg.optim, total_steps)
    check_combination(cfg.runtime.precision, cfg.parallel.strategy, cfg.parallel, replicas)
    return plan, total_steps


def to_device(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_size_of(next(iter(batch.values())))
    if isinstance(batch, list | tuple):
        return batch_size_of(batch[0])
    raise TaskError(f"cannot tell the batch size of a {type(batch).__name__}; return tensors from the dataset")


def _loader_workers(setting: int, device: Device, data: Any = None) -> int:
    """Loader worker processes per replica: the setting, or for -1 (auto):

    * GPU: up to 4, one core of the process's share kept for the step (an 8-GPU node with 16
      cores does not start 32 workers);
    * CPU: 1 for a dataset that declares `decodes` (its items are decoded or augmented per read,
      such as image folders: without a worker the step waits for them, 20-25% of the step in
      BENCHMARKS.md, with one the wait is the hand-off, about 2 ms a batch), else 0, since the
      workers would take cores from the compute.

    An IterableDataset that shards by `shard.rank` only would be read in full by each worker, so
    auto gives it at most one."""
    if setting >= 0:
        return setting
    if device.type == "cpu":
        workers = 1 if getattr(data, "decodes", False) else 0
    else:
        workers = min(4, max(1, device.threads - 1))
    return min(workers, 1) if isinstance(data, IterableDataset) else workers


def _loader_generator(seed: int) -> torch.Generator:
    """The loader's own generator. A DataLoader draws its workers' base seed when an iterator
    starts; from the global generator that draw would shift every later random number (dropout,
    mixup) by a different amount in a resumed run, whose loader starts after the restore."""
    return torch.Generator().manual_seed(seed)


def make_train_loader(
    data: Any, plan: BatchPlan, topo: Topology, seed: int, device: Device, workers: int
) -> tuple[DataLoader, int | None]:
    """A loader that yields this rank's micro-batches forever, and the epoch size in samples."""
    common = dict(
        num_workers=workers,
        pin_memory=device.pin_memory,
        persistent_workers=workers > 0,
        generator=_loader_generator(seed),
    )
    if isinstance(data, IterableDataset):
        # The task shards an iterable itself (it was given the DataShard).
        return DataLoader(data, batch_size=plan.micro_batch, drop_last=True, **common), None
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TaskError(
            "train_data must return a torch Dataset (with __len__ and __getitem__) or an IterableDataset; "
            f"got {type(data).__name__}"
        )
    # A dataset that declares `epoch_keys` (augmentation seeded per epoch) reads (epoch, index) keys.
    sampler = StepSampler(len(data), plan, topo.rank, seed, keyed=bool(getattr(data, "epoch_keys", False)))
    return DataLoader(data, batch_sampler=sampler, **common), len(data)


def forever(loader: DataLoader):
    """Micro-batches without end: an iterable dataset restarts when exhausted."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise TaskError("the training data yielded no complete micro-batch; add data or lower train.micro_batch")


def count_flops_per_sample(task: Task, model: nn.Module, data: Any, micro_batch: int, device: Device) -> float | None:
    """Training FLOPs of one sample, counted on one micro-batch (used when the task states none)."""
    if isinstance(data, IterableDataset) or len(data) == 0:
        return None
    n = min(micro_batch, len(data))
    batch = torch.utils.data.default_collate([data[i] for i in range(n)])
    batch = to_device(batch, device.torch_device, False)
    # The math attention kernel: FlopCounterMode has no formula for the fused CPU kernel.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        task.loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / n


def example_batch(data: Any, micro_batch: int, device: Device) -> Any:
    """The first `micro_batch` samples of a map-style dataset, collated and on the device."""
    if isinstance(data, IterableDataset) or not hasattr(data, "__len__") or len(data) == 0:
        raise TaskError(
            "this needs a map-style training dataset with samples (an IterableDataset has no first samples)"
        )
    batch = torch.utils.data.default_collate([data[i % len(data)] for i in range(micro_batch)])
    return to_device(batch, device.torch_device, False)


def auto_micro_batch(
    task_cls: type,
    task: Task,
    model: nn.Module,
    data: Any,
    cfg: RunConfig,
    plan: BatchPlan,
    strategy: str,
    precision: Precision,
    device: Device,
    topo: Topology,
) -> tuple[int, str]:
    """train.micro_batch=auto: the largest micro-batch that divides each replica's share and fits.

    Rank 0 estimates it from the traced model (perf/memory.py) for the device memory; on GPUs
    every rank then confirms it with one forward/backward and steps down on out-of-memory, and
    the smallest answer wins, so every rank runs the same micro-batch. The estimate traces a task
    instance of its own: a task may keep state across `loss` calls (tests count them)."""
    from linscale.perf.memory import largest_micro_batch

    memory = device.total_memory(topo.local_world_size)
    answer: dict[str, Any] = {}
    if topo.is_main:
        micro = largest_micro_batch(
            traced(task_cls, cfg, precision.name),
            strategy,
            topo.world_size,
            topo.num_nodes,
            precision.name,
            cfg.parallel.activation_checkpointing,
            memory,
            plan.per_replica,
            bucket_mb=cfg.parallel.bucket_mb,
            reduce_dtype=cfg.parallel.reduce_dtype,
            comm_hook=cfg.parallel.comm_hook,
        )
        answer = {"micro": micro}
    micro = ldist.broadcast_object(answer)["micro"]
    if micro is None:
        raise ConfigError(
            f"train.micro_batch=auto: even one sample per micro-batch does not fit the {memory / 2**30:.1f} GiB of "
            f"this device with parallel.strategy={strategy} (see `linscale estimate-memory`); shard more "
            "(parallel.strategy=zero3), recompute activations (parallel.activation_checkpointing=full) or add devices"
        )
    source = "estimated"
    if device.type == "cuda":
        micro = _probe_micro_batch(task, model, data, micro, plan.per_replica, precision, device)
        source = "estimated, confirmed by a forward/backward"
    return micro, (
        f"train.micro_batch=auto: {micro} ({source}: the largest that divides the {plan.per_replica} samples per "
        f"replica and fits {memory / 2**30:.1f} GiB per device; accumulation {plan.per_replica // micro})"
    )


def _probe_micro_batch(
    task: Task, model: nn.Module, data: Any, micro: int, share: int, precision: Precision, device: Device
) -> int:
    """GPU only: the largest divisor of `share` up to `micro` whose forward/backward runs, the same on every rank."""
    candidates = [d for d in range(micro, 0, -1) if share % d == 0]
    chosen = candidates[-1]
    for m in candidates:
        try:
            with precision.autocast():
                loss = task.loss(model, example_batch(data, m, device))
            loss.backward()
            chosen = m
            break
        except torch.OutOfMemoryError:
            pass
        finally:
            model.zero_grad(set_to_none=True)
            device.empty_cache()
    t = torch.tensor([chosen], device=device.torch_device)
    ldist.all_reduce(t, "min")
    return int(t.item())


def emulate_speed(
    task: Task, model: nn.Module, blocks: list[nn.Module], data: Any, micro_batch: int, device: Device, tflops: float
):
    """runtime.emulate_tflops: the blocks' forward and backward take the time of a device this fast."""
    from linscale.perf.virtual import EmulatedSpeed

    batch = example_batch(data, micro_batch, device)
    emulation = EmulatedSpeed(tflops)
    emulation.install(model, blocks, lambda: task.loss(model, batch).backward())
    model.zero_grad(set_to_none=True)
    return emulation


def _predict(
    task_cls: type, cfg: RunConfig, plan: BatchPlan, strategy: str, precision: Precision, device: Device, topo: Topology
) -> dict[str, Any]:
    """The predictor's figures for this run (runtime.profile), or nothing when it is off or fails:
    a prediction never stops a run. Collective (the network probe): every rank calls it. The trace
    runs a task instance of its own, so the training task's state is not touched."""
    from linscale.perf import check

    try:
        profile = check.resolve_profile(
            cfg.runtime.profile, device, topo, precision.compute_dtype, cfg.runtime.emulate_tflops
        )
    except Exception as e:  # noqa: BLE001 - reported, the run goes on
        return {"prediction": f"n/a ({e})"}
    if profile is None or not topo.is_main:
        return {}
    try:
        return check.predict_run(
            traced(task_cls, cfg, precision.name),
            task_cls.__name__,
            profile,
            strategy,
            topo.world_size,
            plan.global_batch,
            plan.micro_batch,
            precision.name,
            cfg.parallel.activation_checkpointing,
            cfg.parallel.bucket_mb,
            cfg.parallel.reduce_dtype,
            resolve_impl(cfg.optim.impl, device.type),
        )
    except Exception as e:  # noqa: BLE001
        return {"prediction": f"n/a ({type(e).__name__}: {e})"}


@dataclass
class EvalSet:
    loader: DataLoader  # this rank's micro-batches, the same ones at every evaluation
    counted: list[int]  # samples of each batch that count (0: a stand-in so every rank runs alike)


def eval_batches(n: int, micro_batch: int, batches: int, world: int, rank: int) -> tuple[list[list[int]], list[int]]:
    """This rank's evaluation micro-batches over samples [0, n), and how many samples of each count.

    `batches` > 0: that many micro-batches per rank at most, the same count on every rank, from the
    start of the data. 0: every sample, split over the ranks; ranks whose share is smaller get
    smaller batches, and every rank runs the same number of batches (a sharded model gathers
    its parameters at each one), with a one-sample stand-in that does not count where a share
    runs out."""
    if batches > 0:
        per_rank = min(batches * micro_batch, n // world)
        start = rank * per_rank
        idx = [
            list(range(s, min(s + micro_batch, start + per_rank))) for s in range(start, start + per_rank, micro_batch)
        ]
        return idx, [len(b) for b in idx]
    base, extra = divmod(n, world)
    share = base + (rank < extra)
    start = rank * base + min(rank, extra)
    count = math.ceil((base + (extra > 0)) / micro_batch)
    sizes = [share // count + (i < share % count) for i in range(count)] if count else []
    idx, counted, at = [], [], start
    for size in sizes:
        idx.append(list(range(at, at + size)) if size else [0])
        counted.append(size)
        at += size
    return idx, counted


def make_eval_set(data: Any, micro_batch: int, batches: int, topo: Topology, workers: int, device: Device):
    """The same held-out samples every time, split over the replicas (see `eval_batches`)."""
    if data is None or isinstance(data, IterableDataset):
        return None
    idx, counted = eval_batches(len(data), micro_batch, batches, topo.world_size, topo.rank)
    if not idx:
        return None
    loader = DataLoader(
        data,
        batch_sampler=idx,
        num_workers=workers,
        pin_memory=device.pin_memory,
        persistent_workers=workers > 0,
        generator=_loader_generator(0),
    )
    return EvalSet(loader, counted)


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, ev: EvalSet, precision: Precision, device: Device) -> dict[str, float]:
    """The task's evaluation metrics (`eval_step`), averaged over every replica's samples."""
    model.eval()
    step = getattr(task, "eval_step", None) or (lambda m, b: {"loss": task.loss(m, b)})
    names: list[str] | None = None
    total: torch.Tensor | None = None
    for batch, counted in zip(ev.loader, ev.counted, strict=True):
        batch = to_device(batch, device.torch_device, device.pin_memory)
        with precision.autocast():
            metrics = step(model, batch)
        if not isinstance(metrics, dict) or "loss" not in metrics:
            raise TaskError(f"task.eval_step must return a dict of scalar tensors with a 'loss'; got {metrics!r}")
        if names is None:
            names = sorted(metrics)
            total = torch.zeros(len(names) + 1, device=device.torch_device, dtype=torch.float64)
        assert total is not None
        for i, name in enumerate(names):
            total[i] += metrics[name].detach().double() * counted
        total[-1] += counted
    model.train()
    assert names is not None and total is not None
    ldist.all_reduce(total)
    values = (total[:-1] / total[-1]).tolist()
    return dict(zip(names, values, strict=True))


def _scalar(t: torch.Tensor | None) -> float:
    return float("nan") if t is None else host_float(t)


def _check_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TaskError(f"task.loss must return a scalar tensor (the batch's mean loss); got {shape}")
    return loss


def train_step(
    task: Task,
    model: nn.Module,
    batches,
    plan: BatchPlan,
    precision: Precision,
    device: Device,
    clock: parallel.CommClock,
    opt: torch.optim.Optimizer,
    sched,
    grad_clip: float,
    loss_acc: torch.Tensor,
    memory: dict[str, int] | None = None,
    check_finite: bool = False,
    beat=None,
) -> tuple[dict[str, float], torch.Tensor | None, bool | torch.Tensor]:
    """One optimizer step over `plan.accum_steps` micro-batches.

    Returns phase times, the gradient norm and whether the step was taken (a step with inf/NaN
    gradients is skipped). `loss_acc` gathers [loss sum, micro-steps] of the steps taken.
    `beat(what)` tells the watchdog what the step is doing."""
    t_data = t_fb = 0.0
    t_comm = 0.0
    clock.take_blocked()  # what an evaluation or an earlier step left
    step_loss = torch.zeros((), device=device.torch_device)
    for k in range(plan.accum_steps):
        t0 = time.perf_counter()
        if beat:
            beat("waiting for data")
        batch = to_device(next(batches), device.torch_device, device.pin_memory)
        t1 = time.perf_counter()
        last = k == plan.accum_steps - 1
        if beat:
            beat("forward/backward and gradient reduction" if last else "forward/backward")
        with parallel.sync_gradients(model, sync=last):
            with precision.autocast():
                loss = _check_loss(task.loss(model, batch))
            # Gradients add up over micro-steps, a SUM; we want the MEAN over the global
            # batch, so each micro-step's loss is scaled by 1/accumulation.
            precision.backward(loss / plan.accum_steps)
        step_loss += loss.detach().float()
        device.synchronize()
        t2 = time.perf_counter()
        t_data += t1 - t0
        launched = clock.take() if last else None
        if launched is not None:
            t_comm = max(0.0, t2 - launched)
        t_fb += t2 - t1
    t_comm += clock.take_blocked()  # sharded strategies: collectives that held up the step
    t3 = time.perf_counter()
    if beat:
        beat("gradient norm and optimizer step")
    max_norm = grad_clip if grad_clip > 0 else math.inf if check_finite else 0.0

    def clip() -> torch.Tensor | None:
        # The global norm: for sharded parameters the shards' squared norms are summed in one reduction.
        return parallel.clip_grad_norm(model.parameters(), max_norm) if max_norm else None

    # fp16-mixed unscales before clipping and skips a step with inf/NaN gradients, and so does a
    # non-finite check; the LR schedule follows the step number either way.
    norm, taken = precision.step(opt, clip, check_finite)
    sched.step()
    # The loss of a skipped step is left out of the reported loss (it may be NaN).
    ok = torch.as_tensor(taken, device=loss_acc.device)
    loss_acc[0] += torch.where(ok, step_loss.double(), 0.0)
    loss_acc[1] += ok.double() * plan.accum_steps
    if memory is not None:  # once, while gradients and optimizer states all exist
        held = parallel.model_state_memory(model, opt)
        # A skipped first step creates no optimizer states: measure at a later one.
        if held["optimizer"] or (precision.scaler is None and taken is not False):
            memory.update(held)
    opt.zero_grad(set_to_none=True)
    device.synchronize()
    t4 = time.perf_counter()
    return {"data": t_data, "fwd_bwd": t_fb - t_comm, "comm": t_comm, "optim": t4 - t3}, norm, taken


def run(task_spec: str, task_cls: type, cfg: RunConfig) -> dict[str, Any]:
    """Train on this process's share of the job. Every process of the job calls this."""
    topo = topology.detect()
    device = devmod.resolve(cfg.runtime.device, topo.local_rank, cfg.runtime.threads_per_proc, topo.local_world_size)
    # Installed first: SLURM's pre-timeout SIGUSR1 may come while the job is still starting.
    stop_signal = StopSignal()
    stop_signal.install()
    try:
        # gloo/NCCL's own timeout is a backstop behind the watchdog, which fires at runtime.timeout
        # while the collective still waits, so its report shows where each rank is.
        ldist.init(topo, device, cfg.runtime.timeout + 30)
        try:
            return _train(task_spec, task_cls, cfg, topo, device, stop_signal)
        finally:
            ldist.shutdown()
    finally:
        stop_signal.restore()


def _train(
    task_spec: str, task_cls: type, cfg: RunConfig, topo: Topology, device: Device, stop_signal: StopSignal
) -> dict[str, Any]:
    tc = cfg.train
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts and topo.is_main:
        print(f"linscale: restart {restarts} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')} after a failed "
              "worker or node: every worker starts again from the newest checkpoint", flush=True)  # fmt: skip
    precision = resolve_precision(cfg.runtime.precision, device)
    task = make_task(task_cls, cfg)
    tokens_per_sample = getattr(task, "tokens_per_sample", None)
    plan, total_steps = plan_run(task, cfg, topo.world_size)

    run_dir = Path(ldist.broadcast_object(str(Path(cfg.log.dir) if cfg.log.dir else default_run_dir(task_spec))))
    ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    resume = _find_resume(cfg, ckpt_root, topo)
    if resume is not None:
        plan = _resumed_plan(plan, resume, cfg, topo)
    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    model = task.build_model().to(device.torch_device)
    num_params = sum(p.numel() for p in model.parameters())
    strategy, why = cfg.parallel.strategy, ""
    if strategy == "auto":
        choice = parallel.choose_strategy(num_params, topo.world_size, device.total_memory(topo.local_world_size))
        strategy, why = choice.strategy, f" (auto: {choice.reason})"
    shard = DataShard(topo.rank, topo.world_size, tc.seed, str(run_dir))
    train_data = task.train_data(shard)
    micro_note = ""
    if tc.micro_batch == "auto":
        micro, micro_note = auto_micro_batch(
            task_cls, task, model, train_data, cfg, plan, strategy, precision, device, topo
        )
        plan = plan_batch(plan.global_batch, plan.replicas, micro)
    flops_per_sample = task.flops_per_sample() or count_flops_per_sample(
        task, model, train_data, plan.micro_batch, device
    )
    workers = _loader_workers(tc.loader_workers, device, train_data)
    loader, epoch_samples = make_train_loader(train_data, plan, topo, tc.seed, device, workers)
    eval_set = make_eval_set(task.eval_data(shard), plan.micro_batch, tc.eval_batches, topo, workers, device)
    if tc.target_loss and eval_set is None:
        raise ConfigError(
            f"train.target_loss={tc.target_loss} needs evaluation, but the task's eval_data is empty, iterable or "
            f"smaller than one sample per replica ({topo.world_size}); give it held-out samples or leave "
            "train.target_loss at 0"
        )
    blocks = task.blocks(model) if hasattr(task, "blocks") else list(getattr(model, "blocks", []))
    check_combination(precision.name, strategy, cfg.parallel, topo.world_size, auto=bool(why))
    emulation = None
    if cfg.runtime.emulate_tflops:
        emulation = emulate_speed(task, model, blocks, train_data, plan.micro_batch, device, cfg.runtime.emulate_tflops)
    model, clock = parallel.wrap(model, cfg.parallel, device, topo, blocks, strategy, precision.param_dtype)
    with torch.random.fork_rng(devices=[]):  # probes and the trace leave the run's random numbers alone
        predicted = _predict(task_cls, cfg, plan, strategy, precision, device, topo)
    lr, lr_note = scaled_lr(cfg.optim, plan.global_batch, default_global_batch(task_cls))
    optim_cfg = dataclasses.replace(cfg.optim, lr=lr)
    opt = build_optimizer(model, optim_cfg, device.type, strategy)
    sched = build_scheduler(opt, optim_cfg, total_steps)
    memory: dict[str, int] = {}

    unit = "tok" if tokens_per_sample else "samples"
    if topo.is_main:
        print(
            f"linscale: {task_spec} | {num_params / 1e6:.2f}M params | {topo.world_size} x {device.type} "
            f"({device.backend}, {device.threads} thread(s) each) | {precision.name} | global batch "
            f"{plan.global_batch} = micro {plan.micro_batch} x accum {plan.accum_steps} x replicas "
            f"{plan.replicas} | {strategy}{why} | run dir {run_dir}",
            flush=True,
        )
        for note in (micro_note, lr_note):
            if note:
                print(f"linscale: {note}", flush=True)
    start_step = 0
    if resume is not None:
        start_step = _load_checkpoint(
            resume, model, opt, sched, precision, loader, device, topo, run_dir, ckpt_root, tc.seed
        )
    # Written once the checkpoint loaded: a refused resume leaves the run's config.toml as it was.
    if topo.is_main:
        write_run_dir(
            run_dir,
            cfg,
            task_spec,
            {
                "world_size": topo.world_size,
                "num_nodes": topo.num_nodes,
                "device": device.name,
                "backend": device.backend,
                "threads_per_proc": device.threads,
                "precision": precision.name,
                "batch": {
                    "global": plan.global_batch,
                    "micro": plan.micro_batch,
                    "accum": plan.accum_steps,
                    "replicas": plan.replicas,
                },
                "resumed_from": str(resume[0]) if resume else None,
                "lr": lr,
            },
        )
    report = mx.Reporter(run_dir, topo.is_main, cfg.log.progress, cfg.log.tensorboard, total_steps, unit)
    # Through the reporter: above the progress bar, on rank 0 only (also from the writer thread).
    ckpt = ckptmod.Checkpointer(
        ckpt_root, cfg.checkpoint.keep_last, cfg.checkpoint.async_save, topo.rank, device,
        lambda text: report.print(f"linscale: {text}"),
    )  # fmt: skip
    report.progress(start_step, None, None)
    warm = mx.warmup_steps(total_steps - start_step if total_steps else None)
    times = mx.StepTimes(warmup_steps=warm)
    batches = forever(loader)
    loss_acc = torch.zeros(2, dtype=torch.float64, device=device.torch_device)  # [loss sum, micro-steps]
    totals = {"loss": 0.0, "steps": 0}
    sync_every = 1 if tc.max_time else tc.log_every
    eval_loss = float("nan")
    eval_extra: dict[str, float] = {}  # the task's other evaluation metrics (eval_top1, ...)
    eval_time = ckpt_time = 0.0  # paused time: left out of the steady-state clock
    target = tc.target_loss
    target_at: tuple[int, float] | None = None  # (step, seconds since start) of the evaluation that reached it
    grad_norm = None
    start = steady_start = time.perf_counter()
    paused_at_warm = 0.0
    window_start, window_steps = start, 0
    nonfinite = {"in_a_row": 0, "skipped": 0}
    # Under fp16-mixed the scaler skips overflowing steps while it finds its scale (from 2^16).
    nonfinite_limit = tc.max_nonfinite + (16 if precision.scaler is not None else 0)
    spikes = {"count": 0, "mean": None}
    stopped_by = ""
    step = start_step
    kill_at = _test_kill_step(topo.rank)
    stuck_at = _test_kill_step(topo.rank, "LINSCALE_TEST_STUCK_AT_STEP")
    watchdog = _start_watchdog(cfg.runtime.timeout, topo)

    def beat(what: str, watched: bool = True) -> None:
        if watchdog is not None:  # every rank makes the same calls: progress is compared by their count
            watchdog.phase(step, what, watched)

    try:
        while total_steps is None or step < total_steps:
            if step == kill_at:  # tests: die like a lost node, mid-run
                os.kill(os.getpid(), signal.SIGKILL)
            if step == stuck_at:  # tests: a rank that never reaches the collective
                beat("test hook: stuck before the step")
                threading.Event().wait()
            t0 = time.perf_counter()
            phases, grad_norm, taken = train_step(
                task,
                model,
                batches,
                plan,
                precision,
                device,
                clock,
                opt,
                sched,
                tc.grad_clip,
                loss_acc,
                memory=None if memory else memory,
                check_finite=tc.max_nonfinite > 0,
                beat=beat,
            )
            times.add(step - start_step, phases, time.perf_counter() - t0)
            step += 1
            if tc.max_nonfinite > 0:  # `taken` is a bool here, the same on every rank
                _count_nonfinite(nonfinite, taken, step, nonfinite_limit, tc.max_nonfinite, ckpt, report)
            if step - start_step == warm:
                # Steady-state wall clock starts here: logging and reductions count, evaluation not.
                steady_start, paused_at_warm = time.perf_counter(), eval_time + ckpt_time
            window_steps += 1
            last = step == total_steps
            eval_due = eval_set is not None and tc.eval_every > 0 and step % tc.eval_every == 0
            # With a target every evaluation may end the run: reduce and log the loss window first.
            target_sync = bool(target) and eval_due
            if step % sync_every == 0 or last or target_sync:
                out_of_time = bool(tc.max_time) and time.perf_counter() - start - eval_time - ckpt_time >= tc.max_time
                beat("loss all-reduce")
                flags = torch.tensor([float(out_of_time), float(stop_signal.signum)], dtype=torch.float64)
                red = torch.cat([loss_acc, flags.to(loss_acc.device)])
                ldist.all_reduce(red, "sum")
                mean_loss = (red[0] / red[1]).item() if red[1] > 0 else float("nan")
                totals["loss"] += mean_loss * window_steps
                totals["steps"] += window_steps
                now = time.perf_counter()
                rate = window_steps * plan.global_batch * (tokens_per_sample or 1) / (now - window_start)
                if red[3] > 0 and not stopped_by:
                    stopped_by = f"signal {StopSignal.name(stop_signal.signum or signal.SIGUSR1)}"
                    report.print(f"step {step}: {stopped_by} received: saving a checkpoint and stopping")
                if step % tc.log_every == 0 or last or red[2] > 0 or red[3] > 0 or target_sync:
                    report.log(
                        step,
                        {
                            "train_loss": mean_loss,
                            "lr": sched.get_last_lr()[0],
                            "grad_norm": _scalar(grad_norm),
                            f"train_{unit}_per_s": rate,
                            "elapsed_s": now - start,
                        },
                    )
                    _check_spike(spikes, mean_loss, step, tc.spike_factor, report)
                report.progress(step, mean_loss, rate)
                loss_acc.zero_()
                window_start, window_steps = now, 0
                last = last or red[2] > 0 or red[3] > 0
            if eval_set is not None and (last or eval_due):
                t_eval = time.perf_counter()
                beat("evaluation")
                metrics = evaluate(task, model, eval_set, precision, device)  # all-reduced: one value everywhere
                eval_loss = metrics.pop("loss")
                eval_extra = {f"eval_{k}": v for k, v in metrics.items()}
                values = {"eval_loss": eval_loss, **eval_extra}
                if tokens_per_sample:  # a token task's loss is a mean cross-entropy in nats
                    values["eval_perplexity"] = mx.perplexity(eval_loss)
                report.log(step, values)
                report.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
                # evaluate() all-reduces the loss: every rank compares the same value and stops alike.
                if target and target_at is None and eval_loss <= target:
                    target_at = (step, time.perf_counter() - start)
                    report.print(f"step {step}: eval_loss {eval_loss:.4f} <= train.target_loss={target}, stopping")
                    last = True
                eval_time += time.perf_counter() - t_eval
                window_start += time.perf_counter() - t_eval
            periodic = cfg.checkpoint.interval > 0 and step % cfg.checkpoint.interval == 0
            if periodic or (last and (cfg.checkpoint.at_end or stopped_by)):
                t_ckpt = time.perf_counter()
                beat("checkpoint save", watched=False)  # a large synchronous save may take long
                extra = _checkpoint_extra(step, plan, topo, strategy, task_spec, sched, precision, nonfinite)
                ckpt.save(step, model, opt, extra)
                ckpt_time += time.perf_counter() - t_ckpt
                window_start += time.perf_counter() - t_ckpt
            if last:
                break
        t_close = time.perf_counter()
        beat("waiting for the checkpoint in flight", watched=False)
        ckpt.close()  # the save in flight, if any, is committed before the run reports
        ckpt_time += time.perf_counter() - t_close
        beat("end-of-run reductions")
        runtime = time.perf_counter() - start
        if step == start_step:
            report.print(
                f"the checkpoint is at step {step}, the end of this run (train.max_steps or max_tokens): nothing "
                "to train; raise the limit to continue, or --checkpoint.resume=none to start again"
            )
        steady = None
        if step - start_step > warm:
            steady_wall = time.perf_counter() - steady_start - (eval_time + ckpt_time - paused_at_warm)
            steady = (step - start_step - warm, steady_wall)
        summary = _summary(
            step - start_step,
            runtime,
            eval_time,
            totals,
            eval_loss,
            eval_extra,
            times,
            steady,
            plan,
            tokens_per_sample,
            flops_per_sample,
            device,
            precision,
            topo,
            _target_summary(target, target_at, plan, tokens_per_sample),
        )
        summary["strategy"] = strategy + why
        summary["communication"] = parallel.describe_communication(
            strategy, cfg.parallel, topo.world_size, topo.num_nodes
        )
        state_mb = torch.tensor([memory.get(k, 0) / 2**20 for k in ("params", "grads", "optimizer")],
                                dtype=torch.float64)  # fmt: skip
        ldist.all_reduce(state_mb, "max")  # the fullest device
        for key, value in zip(("params", "grads", "optimizer"), state_mb.tolist(), strict=True):
            summary[f"model_state_{key}_mb"] = value
        summary.update(_fault_summary(step, start_step, resume, ckpt, nonfinite, spikes, stopped_by, epoch_samples,
                                      plan))  # fmt: skip
        if emulation is not None:
            stats = emulation.stats()  # how faithful the emulation was: real compute must stay well below it
            summary.update({f"emulation_{k}": stats[k] for k in ("tflops", "real_share", "overrun_share", "slowdown")})
        if topo.is_main and predicted:
            from linscale.perf.check import compare

            summary.update(compare(summary, predicted))
        report.close()
        final_model = parallel.unwrap(model)
        sharded = parallel.is_sharded(model)
        state = parallel.full_state_dict(model) if sharded or cfg.log.save_model else None  # collective
        if topo.is_main:
            import json

            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            print(mx.format_summary(summary), flush=True)
            if cfg.log.save_model:
                torch.save(state, run_dir / "model.pt")
            if sharded:  # a whole copy on rank 0, so the report needs no other rank
                final_model = task.build_model()
                final_model.load_state_dict(state)
            text = task.final_report(final_model)
            if text:
                print(text, flush=True)
        if watchdog is not None:
            watchdog.stop()
        unfinished = (total_steps is None or step < total_steps) and target_at is None
        if stopped_by and unfinished and topo.is_main:
            from linscale.cluster.slurm import requeue_after_signal

            requeue_after_signal(report.print)
        return summary
    except BaseException:
        if watchdog is not None:
            # A peer's watchdog ending the job breaks this rank's collective: the watchdog reports
            # and exits here instead of a second, misleading error.
            watchdog.stop(failed=True)
        raise
    finally:
        report.close()


def _start_watchdog(timeout: float, topo: Topology):
    """The collective-timeout watchdog of this rank (None for a single process)."""
    if not ldist.active() or topo.world_size == 1:
        return None
    from torch.distributed.distributed_c10d import _get_default_store

    from linscale.runtime.watchdog import Watchdog

    return Watchdog(timeout, topo.rank, topo.world_size, _get_default_store(), poll_s=min(1.0, timeout / 4)).start()


def _test_kill_step(rank: int, var: str = "LINSCALE_TEST_KILL_AT_STEP") -> int | None:
    """LINSCALE_TEST_KILL_AT_STEP=[RANK:]STEP: tests kill a rank with SIGKILL when it reaches STEP,
    in the first attempt of a job only (a restarted or resumed job runs on). The same form in
    LINSCALE_TEST_STUCK_AT_STEP makes the rank wait forever before that step instead."""
    spec = os.environ.get(var)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    who, _, at = spec.rpartition(":")
    return int(at) if not who or int(who) == rank else None


def _find_resume(cfg: RunConfig, root: Path, topo: Topology) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to continue from and its marker, chosen on rank 0 and told to every rank."""
    answer: dict[str, Any] = {}
    if topo.is_main:
        try:
            gone = ckptmod.remove_abandoned(root)
            if gone:
                print(f"linscale: removed {len(gone)} incomplete checkpoint(s) of a stopped save: "
                      + ", ".join(p.name for p in gone), flush=True)  # fmt: skip
            path = ckptmod.resolve_resume(cfg.checkpoint.resume, root, lambda t: print(f"linscale: warning: {t}"))
            if path is None:
                _say_set_aside(ckptmod.set_aside(root, -1))  # a fresh start next to an earlier run's checkpoints
            if path is not None:
                answer = {"path": str(path), "meta": ckptmod.read_marker(path)}
        except ckptmod.CheckpointError as e:
            answer = {"error": str(e)}
    answer = ldist.broadcast_object(answer)
    if "error" in answer:
        raise ckptmod.CheckpointError(answer["error"])
    if not answer:
        return None
    return Path(answer["path"]), answer["meta"]


def _resumed_plan(plan: BatchPlan, resume: tuple[Path, dict[str, Any]], cfg: RunConfig, topo: Topology) -> BatchPlan:
    """The batch split of a resumed run: the same global batch (the same samples per step); the
    checkpoint's micro-batch when it still divides each replica's share, so a smaller world keeps
    its memory per device and raises the accumulation instead."""
    path, meta = resume
    if meta["global_batch"] != plan.global_batch:
        raise ckptmod.CheckpointError(
            f"checkpoint {path} was trained with a global batch of {meta['global_batch']} samples; this run asks "
            f"for {plan.global_batch}, which would change which samples each step reads. Keep "
            f"--train.global_batch={meta['global_batch']} (the number of processes may change: the accumulation "
            "adapts), or start a new run"
        )
    micro = meta.get("micro_batch", 0)
    if cfg.train.micro_batch == 0 and micro and (plan.global_batch // topo.world_size) % micro == 0:
        return plan_batch(plan.global_batch, topo.world_size, micro)
    return plan


def _load_checkpoint(
    resume: tuple[Path, dict[str, Any]],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched,
    precision: Precision,
    loader: DataLoader,
    device: Device,
    topo: Topology,
    run_dir: Path,
    root: Path,
    seed: int,
) -> int:
    """Restore everything from the checkpoint; returns the step to continue from. Checkpoints in
    `root` newer than it belong to another trajectory and are set aside."""
    path, _ = resume
    t0 = time.perf_counter()
    meta = ckptmod.load(path, model, opt, device, topo.rank)
    step = int(meta["step"])
    sched.load_state_dict(meta["scheduler"])
    for group, lr in zip(opt.param_groups, sched.get_last_lr(), strict=True):
        group["lr"] = lr
    precision.load_state_dict(meta.get("precision", {}))
    if not meta["rng_restored"]:
        # A rank the checkpoint's job did not have: a seed of its own, the same on every resume.
        torch.manual_seed(seed + 1_000_003 * (topo.rank + 1) + step)
    sampler = loader.batch_sampler
    if isinstance(sampler, StepSampler):
        sampler.start_step = step  # position = samples consumed = step x global batch
    elif step and topo.is_main:
        print(
            "linscale: warning: the task's training data is an IterableDataset, whose position linscale cannot "
            "restore: it starts again from its beginning",
            flush=True,
        )
    if topo.is_main:
        _truncate_metrics(run_dir / "metrics.jsonl", step)
        _say_set_aside(ckptmod.set_aside(root, step))
        was = f"{meta['world_size']} process(es)"
        print(
            f"linscale: resumed from {path} (step {step}, {meta['samples_consumed']:,} samples consumed, written by "
            f"{was}) in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
    return step


def _say_set_aside(moved: list[Path]) -> None:
    if moved:
        print(f"linscale: moved {len(moved)} checkpoint(s) of another trajectory to {moved[0].parent}: "
              + ", ".join(p.name for p in moved), flush=True)  # fmt: skip


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the metrics of steps after the checkpoint: the resumed run logs them again."""
    import json

    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _checkpoint_extra(
    step: int,
    plan: BatchPlan,
    topo: Topology,
    strategy: str,
    task_spec: str,
    sched,
    precision: Precision,
    nonfinite: dict[str, int],
) -> dict[str, Any]:
    """The checkpoint's non-tensor state, written into its marker by rank 0."""
    return {
        "samples_consumed": step * plan.global_batch,
        "global_batch": plan.global_batch,
        "micro_batch": plan.micro_batch,
        "world_size": topo.world_size,
        "num_nodes": topo.num_nodes,
        "strategy": strategy,
        "task": task_spec,
        "scheduler": sched.state_dict(),
        "precision": precision.state_dict(),
        "nonfinite_skipped": nonfinite["skipped"],
    }


class Diverged(ValueError):
    """Too many steps in a row had a non-finite loss or gradient."""


def _count_nonfinite(
    state: dict[str, int], taken: bool, step: int, limit: int, setting: int, ckpt: ckptmod.Checkpointer, report
) -> None:
    if taken:
        state["in_a_row"] = 0
        return
    state["in_a_row"] += 1
    state["skipped"] += 1
    report.print(f"step {step}: the loss or a gradient is NaN/Inf: step skipped ({state['in_a_row']} in a row)")
    if state["in_a_row"] >= limit:
        ckpt.wait()  # a save in flight finishes: the newest checkpoint is whole
        newest = (
            f"the newest checkpoint, step {ckpt.saved[-1]}, is intact ({ckptmod.step_dir(ckpt.root, ckpt.saved[-1])})"
            if ckpt.saved
            else "no checkpoint was saved"
        )
        raise Diverged(
            f"training diverged: {state['in_a_row']} steps in a row up to step {step} had a NaN/Inf loss or gradient "
            f"(train.max_nonfinite={setting}); {newest}. Resume from it with a lower optim.lr, more "
            "optim.warmup_steps, train.grad_clip, or runtime.precision=fp32/bf16-mixed"
        )


def _check_spike(state: dict[str, Any], loss: float, step: int, factor: float, report) -> None:
    """Report a logged loss above `factor` times the recent mean of logged losses."""
    if not math.isfinite(loss):
        return
    mean = state["mean"]
    if factor and mean is not None and loss > factor * mean:
        state["count"] += 1
        report.print(f"step {step}: loss spike: {loss:.4f} is {loss / mean:.1f}x the recent mean {mean:.4f}")
        return  # a spike does not move the mean
    state["mean"] = loss if mean is None else 0.7 * mean + 0.3 * loss


def _fault_summary(
    step: int,
    start_step: int,
    resume,
    ckpt: ckptmod.Checkpointer,
    nonfinite: dict[str, int],
    spikes: dict[str, Any],
    stopped_by: str,
    epoch_samples: int | None,
    plan: BatchPlan,
) -> dict[str, Any]:
    out: dict[str, Any] = {"global_step": step}
    if epoch_samples:  # of the whole run, the steps before a resume included
        out["epoch"] = step * plan.global_batch / epoch_samples
    if resume is not None:
        out["resumed_from_step"] = start_step
    out["checkpoints_saved"] = len(ckpt.saved)
    if ckpt.saved:
        out["checkpoint_last"] = str(ckptmod.step_dir(ckpt.root, ckpt.saved[-1]))
        out["checkpoint_stall_s"] = ckpt.stall_s
    out["nonfinite_skipped_steps"] = nonfinite["skipped"]
    out["loss_spikes"] = spikes["count"]
    if stopped_by:
        out["stopped_by"] = stopped_by
    return out


class StopSignal:
    """SIGUSR1 (what `sbatch --signal` sends before the time limit) asks for a checkpoint and a
    clean stop at the next step boundary; every rank agrees on it in the loss reduction."""

    SIGNALS = (signal.SIGUSR1,)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name

    def _handle(self, signum, _frame) -> None:
        self.signum = signum

    def install(self) -> None:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        """Put back the previous handlers, except the default action (ending the process): a late or
        repeated signal while the process finishes is ignored instead."""
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_IGN if handler == signal.SIG_DFL else handler)
        self._previous.clear()


def _target_summary(
    target: float, target_at: tuple[int, float] | None, plan: BatchPlan, tokens_per_sample: int | None
) -> dict[str, Any]:
    """The summary entries of train.target_loss; `time_to_target` includes evaluation time."""
    if not target:
        return {}
    step, seconds = target_at if target_at else (None, None)
    out: dict[str, Any] = {
        "target_loss": target,
        "target_reached": target_at is not None,
        "steps_to_target": step,
        "time_to_target": seconds,
    }
    unit, per_sample = ("tokens", tokens_per_sample) if tokens_per_sample else ("samples", 1)
    out[f"{unit}_to_target"] = step * plan.global_batch * per_sample if step is not None else None
    return out


def _summary(
    steps: int,
    runtime: float,
    eval_time: float,
    totals: dict,
    eval_loss: float,
    eval_extra: dict[str, float],
    times: mx.StepTimes,
    steady: tuple[int, float] | None,
    plan: BatchPlan,
    tokens_per_sample: int | None,
    flops_per_sample: float | None,
    device: Device,
    precision: Precision,
    topo: Topology,
    target: dict[str, Any] | None = None,
) -> dict[str, Any]:
    samples = steps * plan.global_batch
    # Steady state: the steps after warm-up, without evaluation. Phase means are averaged
    # over ranks so a straggler's waiting shows up.
    phase = torch.tensor([times.mean(p) for p in mx.PHASES], dtype=torch.float64)
    ldist.all_reduce(phase, "avg")
    # Steady state is the wall clock after warm-up, logging included, evaluation excluded.
    step_s = steady[1] / steady[0] if steady else float("nan")
    steady_samples_s = plan.global_batch / step_s if steady else float("nan")
    s: dict[str, Any] = {
        "train_runtime": runtime,
        "train_samples": samples,
        "train_steps": steps,
        "train_samples_per_second": samples / runtime,
        "train_steps_per_second": steps / runtime,
        "train_loss": totals["loss"] / max(1, totals["steps"]),
    }
    if tokens_per_sample:
        s["train_tokens"] = samples * tokens_per_sample
        s["train_tokens_per_second"] = s["train_tokens"] / runtime
    if not math.isnan(eval_loss):
        s["eval_loss"] = eval_loss
        if tokens_per_sample:
            s["eval_perplexity"] = mx.perplexity(eval_loss)
        s.update(eval_extra)
        s["eval_runtime"] = eval_time
    s.update(target or {})
    s["steady_steps_measured"] = steady[0] if steady else 0
    s["steady_step_time_ms"] = 1e3 * step_s
    s["steady_samples_per_second"] = steady_samples_s
    if tokens_per_sample:
        s["steady_tokens_per_second"] = steady_samples_s * tokens_per_sample
    peak, source = device.peak_flops(precision.compute_dtype)
    if flops_per_sample:
        achieved = flops_per_sample * steady_samples_s
        s["achieved_tflops"] = achieved / 1e12
        s["peak_tflops_per_device"] = peak / 1e12
        s["peak_source"] = source
        s["mfu"] = achieved / (peak * topo.world_size)
    else:
        s["mfu"] = "n/a (define flops_per_sample in the task)"
    total_phase = float(phase.sum()) or 1.0
    for name, value in zip(mx.PHASES, phase.tolist(), strict=True):
        s[f"time_{name}_ms"] = 1e3 * value
        s[f"time_{name}_pct"] = 100 * value / total_phase
    mem = device.max_memory_allocated()
    if mem is not None:
        s["peak_memory_gb"] = mem / 2**30
    s["world_size"] = topo.world_size
    s["batch"] = f"{plan.global_batch} = {plan.micro_batch} x {plan.accum_steps} x {plan.replicas}"
    s["precision"] = precision.name
    if precision.scaler is not None:
        s["skipped_steps"] = precision.skipped_steps  # inf/NaN gradients; the same on every rank
    s["device"] = f"{device.type} ({device.name})"
    return s
