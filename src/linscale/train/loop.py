"""The training loop: flat, small functions, one code path for every device and world size."""

from __future__ import annotations

import math
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
from linscale.train import metrics as mx
from linscale.train.batching import BatchPlan, StepSampler, plan_batch, tokens_to_samples
from linscale.train.optim import build_optimizer, build_scheduler, check_schedule
from linscale.train.precision import Precision, check_combination, resolve_precision
from linscale.train.rundir import default_run_dir, write_run_dir


def make_task(task_cls: type, cfg: RunConfig) -> Task:
    return task_cls(cfg.task) if getattr(task_cls, "Config", None) is not None else task_cls()


def plan_run(task: Task, cfg: RunConfig, replicas: int) -> tuple[BatchPlan, int | None]:
    """The batch split and the step limit, with every check that needs no process group."""
    tokens_per_sample = getattr(task, "tokens_per_sample", None)
    if cfg.train.global_batch_tokens:
        samples = tokens_to_samples(cfg.train.global_batch_tokens, tokens_per_sample)
    else:
        samples = cfg.train.global_batch
    plan = plan_batch(samples, replicas, cfg.train.micro_batch)
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


def _loader_workers(setting: int, device: Device) -> int:
    if setting >= 0:
        return setting
    # On CPU the loader's workers would take cores from the compute; on GPU hosts they are free.
    return 0 if device.type == "cpu" else 4


def make_train_loader(
    data: Any, plan: BatchPlan, topo: Topology, seed: int, device: Device, workers: int
) -> tuple[DataLoader, int | None]:
    """A loader that yields this rank's micro-batches forever, and the epoch size in samples."""
    common = dict(num_workers=workers, pin_memory=device.pin_memory, persistent_workers=workers > 0)
    if isinstance(data, IterableDataset):
        # The task shards an iterable itself (it was given the DataShard).
        return DataLoader(data, batch_size=plan.micro_batch, drop_last=True, **common), None
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TaskError(
            "train_data must return a torch Dataset (with __len__ and __getitem__) or an IterableDataset; "
            f"got {type(data).__name__}"
        )
    sampler = StepSampler(len(data), plan, topo.rank, seed)
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


@dataclass
class EvalSet:
    data: Any
    indices: list[list[int]]  # this rank's micro-batches


def make_eval_set(data: Any, micro_batch: int, batches: int, topo: Topology) -> EvalSet | None:
    """The same held-out samples every time, split evenly over the replicas."""
    if data is None or isinstance(data, IterableDataset):
        return None
    per_rank = min(batches * micro_batch, len(data) // topo.world_size)
    if per_rank == 0:
        return None
    start = topo.rank * per_rank
    idx = list(range(start, start + per_rank))
    return EvalSet(data, [idx[i : i + micro_batch] for i in range(0, per_rank, micro_batch)])


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, ev: EvalSet, precision: Precision, device: Device) -> float:
    model.eval()
    total = torch.zeros(2, device=device.torch_device, dtype=torch.float64)
    for idx in ev.indices:
        batch = to_device(torch.utils.data.default_collate([ev.data[i] for i in idx]), device.torch_device, True)
        with precision.autocast():
            loss = task.loss(model, batch)
        total[0] += loss.detach().double() * len(idx)
        total[1] += len(idx)
    model.train()
    ldist.all_reduce(total)
    return (total[0] / total[1]).item()


def _scalar(t: torch.Tensor | None) -> float:
    if t is None:
        return float("nan")
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


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
    loss_sum: torch.Tensor,
    memory: dict[str, int] | None = None,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """One optimizer step over `plan.accum_steps` micro-batches; returns phase times and grad norm."""
    t_data = t_fb = 0.0
    t_comm = 0.0
    clock.take_blocked()  # what an evaluation or an earlier step left
    for k in range(plan.accum_steps):
        t0 = time.perf_counter()
        batch = to_device(next(batches), device.torch_device, device.pin_memory)
        t1 = time.perf_counter()
        last = k == plan.accum_steps - 1
        with parallel.sync_gradients(model, sync=last):
            with precision.autocast():
                loss = _check_loss(task.loss(model, batch))
            # Gradients add up over micro-steps, a SUM; we want the MEAN over the global
            # batch, so each micro-step's loss is scaled by 1/accumulation.
            precision.backward(loss / plan.accum_steps)
        loss_sum += loss.detach()
        device.synchronize()
        t2 = time.perf_counter()
        t_data += t1 - t0
        launched = clock.take() if last else None
        if launched is not None:
            t_comm = max(0.0, t2 - launched)
        t_fb += t2 - t1
    t_comm += clock.take_blocked()  # sharded strategies: collectives that held up the step
    t3 = time.perf_counter()

    def clip() -> torch.Tensor | None:
        # The global norm: for sharded parameters clip_grad_norm_ reduces the shards' norms.
        return torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True) if grad_clip > 0 else None

    # fp16-mixed unscales before clipping and skips a step with inf/NaN gradients; the LR
    # schedule follows the step number either way.
    norm = precision.step(opt, clip)
    sched.step()
    if memory is not None:  # once, while gradients and optimizer states all exist
        held = parallel.model_state_memory(model, opt)
        if held["optimizer"] or precision.scaler is None:  # a skipped first fp16 step creates no states
            memory.update(held)
    opt.zero_grad(set_to_none=True)
    device.synchronize()
    t4 = time.perf_counter()
    return {"data": t_data, "fwd_bwd": t_fb - t_comm, "comm": t_comm, "optim": t4 - t3}, norm


def run(task_spec: str, task_cls: type, cfg: RunConfig) -> dict[str, Any]:
    """Train on this process's share of the job. Every process of the job calls this."""
    topo = topology.detect()
    device = devmod.resolve(cfg.runtime.device, topo.local_rank, cfg.runtime.threads_per_proc, topo.local_world_size)
    ldist.init(topo, device, cfg.runtime.timeout)
    try:
        return _train(task_spec, task_cls, cfg, topo, device)
    finally:
        ldist.shutdown()


def _train(task_spec: str, task_cls: type, cfg: RunConfig, topo: Topology, device: Device) -> dict[str, Any]:
    tc = cfg.train
    precision = resolve_precision(cfg.runtime.precision, device)
    task = make_task(task_cls, cfg)
    tokens_per_sample = getattr(task, "tokens_per_sample", None)
    plan, total_steps = plan_run(task, cfg, topo.world_size)

    run_dir = Path(cfg.log.dir) if cfg.log.dir else None
    if topo.is_main:
        run_dir = run_dir or default_run_dir(task_spec)
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
            },
        )
    run_dir = Path(ldist.broadcast_object(str(run_dir)))

    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    model = task.build_model().to(device.torch_device)
    shard = DataShard(topo.rank, topo.world_size, tc.seed)
    train_data = task.train_data(shard)
    flops_per_sample = task.flops_per_sample() or count_flops_per_sample(
        task, model, train_data, plan.micro_batch, device
    )
    loader, epoch_samples = make_train_loader(
        train_data, plan, topo, tc.seed, device, _loader_workers(tc.loader_workers, device)
    )
    eval_set = make_eval_set(task.eval_data(shard), plan.micro_batch, tc.eval_batches, topo)
    if tc.target_loss and eval_set is None:
        raise ConfigError(
            f"train.target_loss={tc.target_loss} needs evaluation, but the task's eval_data is empty, iterable or "
            f"smaller than one sample per replica ({topo.world_size}); give it held-out samples or leave "
            "train.target_loss at 0"
        )
    num_params = sum(p.numel() for p in model.parameters())
    strategy, why = cfg.parallel.strategy, ""
    if strategy == "auto":
        choice = parallel.choose_strategy(num_params, topo.world_size, device.total_memory(topo.local_world_size))
        strategy, why = choice.strategy, f" (auto: {choice.reason})"
    blocks = task.blocks(model) if hasattr(task, "blocks") else list(getattr(model, "blocks", []))
    check_combination(precision.name, strategy, cfg.parallel, topo.world_size, auto=bool(why))
    model, clock = parallel.wrap(model, cfg.parallel, device, topo, blocks, strategy, precision.param_dtype)
    opt = build_optimizer(model, cfg.optim, device.type, strategy)
    sched = build_scheduler(opt, cfg.optim, total_steps)
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
    report = mx.Reporter(run_dir, topo.is_main, cfg.log.progress, cfg.log.tensorboard, total_steps, unit)
    warm = mx.warmup_steps(total_steps)
    times = mx.StepTimes(warmup_steps=warm)
    batches = forever(loader)
    loss_sum = torch.zeros((), device=device.torch_device)
    totals = {"loss": 0.0, "steps": 0}
    sync_every = 1 if tc.max_time else tc.log_every
    eval_loss = float("nan")
    eval_time = 0.0
    target = tc.target_loss
    target_at: tuple[int, float] | None = None  # (step, seconds since start) of the evaluation that reached it
    grad_norm = None
    start = steady_start = time.perf_counter()
    eval_time_at_warm = 0.0
    window_start, window_steps = start, 0
    step = 0
    try:
        while total_steps is None or step < total_steps:
            t0 = time.perf_counter()
            phases, grad_norm = train_step(
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
                loss_sum,
                memory=None if memory else memory,
            )
            times.add(step, phases, time.perf_counter() - t0)
            step += 1
            if step == warm:
                # Steady-state wall clock starts here: logging and reductions count, evaluation not.
                steady_start, eval_time_at_warm = time.perf_counter(), eval_time
            window_steps += 1
            last = step == total_steps
            eval_due = eval_set is not None and tc.eval_every > 0 and step % tc.eval_every == 0
            # With a target every evaluation may end the run: reduce and log the loss window first.
            target_sync = bool(target) and eval_due
            if step % sync_every == 0 or last or target_sync:
                stop = float(bool(tc.max_time) and time.perf_counter() - start - eval_time >= tc.max_time)
                red = torch.stack(
                    [
                        loss_sum.double(),
                        torch.tensor(
                            float(window_steps * plan.accum_steps), dtype=torch.float64, device=loss_sum.device
                        ),
                        torch.tensor(stop, dtype=torch.float64, device=loss_sum.device),
                    ]
                )
                ldist.all_reduce(red, "sum")
                mean_loss = (red[0] / red[1]).item()
                totals["loss"] += mean_loss * window_steps
                totals["steps"] += window_steps
                now = time.perf_counter()
                rate = window_steps * plan.global_batch * (tokens_per_sample or 1) / (now - window_start)
                if step % tc.log_every == 0 or last or red[2] > 0 or target_sync:
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
                report.progress(step, mean_loss, rate)
                loss_sum.zero_()
                window_start, window_steps = now, 0
                last = last or red[2] > 0
            if eval_set is not None and (last or eval_due):
                t_eval = time.perf_counter()
                eval_loss = evaluate(task, model, eval_set, precision, device)  # all-reduced: one value everywhere
                values = {"eval_loss": eval_loss}
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
            if last:
                break
        runtime = time.perf_counter() - start
        steady = None
        if step > warm:
            steady_wall = time.perf_counter() - steady_start - (eval_time - eval_time_at_warm)
            steady = (step - warm, steady_wall)
        summary = _summary(
            step,
            runtime,
            eval_time,
            totals,
            eval_loss,
            times,
            steady,
            plan,
            tokens_per_sample,
            flops_per_sample,
            device,
            precision,
            topo,
            epoch_samples,
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
        return summary
    finally:
        report.close()


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
    times: mx.StepTimes,
    steady: tuple[int, float] | None,
    plan: BatchPlan,
    tokens_per_sample: int | None,
    flops_per_sample: float | None,
    device: Device,
    precision: Precision,
    topo: Topology,
    epoch_samples: int | None,
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
    if epoch_samples:
        s["epoch"] = samples / epoch_samples
    if not math.isnan(eval_loss):
        s["eval_loss"] = eval_loss
        if tokens_per_sample:
            s["eval_perplexity"] = mx.perplexity(eval_loss)
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
