"""The prediction beside the measurement: every real run predicts its own step time and memory.

At the start of a run (every rank, after the model is wrapped) linscale traces the task's model
on the meta device, describes the machine it runs on (`runtime.profile`), and asks the predictor
for this very run: strategy, world size, micro-batch and accumulation, precision. The summary
then shows `predicted_step_time_ms` next to `steady_step_time_ms`, the predicted model-state and
peak memory next to the measured ones, and the error in percent, so the predictor is checked by
every run.

`runtime.profile=auto` describes this machine: the device's peak FLOP/s (the data sheet on GPUs,
a matrix-product probe on CPUs; `runtime.emulate_tflops` when set, at efficiency 1), its memory
bandwidth, and the network as this job's process group sees it, from a short all-reduce probe at
two sizes (the latency per ring step and the bus bandwidth). A profile name, a JSON profile or a
`linscale doctor` report describe another machine instead (see docs/plan.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from linscale.runtime import dist as ldist
from linscale.runtime.device import Device
from linscale.runtime.topology import Topology

#: Achieved / peak FLOP/s of real compute when nothing calibrates it (typical dense training).
DEFAULT_EFFICIENCY = 0.5
PROBE_BYTES = (4 * 2**10, 4 * 2**20)


def probe_network(device: Device, topo: Topology, budget_s: float = 0.1) -> tuple[float, float] | None:
    """(seconds per ring step, bus bandwidth in bytes/s) of this job's all-reduce; None for one process.

    Two sizes, timed as `linscale doctor` times its sweep (median, the slowest rank counts): the
    small one is latency-bound (2(n-1) ring steps), the large one gives the bandwidth once the
    latency is taken off."""
    if not ldist.active() or topo.world_size == 1:
        return None
    from linscale.cluster.doctor import time_collective

    n = topo.world_size
    times = []
    for nbytes in PROBE_BYTES:
        t = torch.zeros(nbytes // 4, device=device.torch_device)
        times.append(time_collective(lambda t=t: dist.all_reduce(t), device, budget_s, max_iters=5))
    steps = 2 * (n - 1)
    alpha = times[0] / steps
    moved = steps / n * PROBE_BYTES[1]
    bw = moved / max(times[1] - steps * alpha, 1e-9)
    return alpha, bw


def this_machine(device: Device, topo: Topology, compute_dtype: str, emulate_tflops: float, network):
    """A ClusterProfile of the machine and job this process runs in."""
    from linscale.perf.clusters import ClusterProfile

    if emulate_tflops:
        peak, efficiency, name = emulate_tflops * 1e12, 1.0, f"emulated {emulate_tflops:g} TFLOP/s device"
    else:
        peak, source = device.peak_flops(compute_dtype)
        efficiency, name = DEFAULT_EFFICIENCY, f"this machine ({device.name}, peak from {source})"
    alpha, bw = network if network else (0.0, float("inf"))
    host: dict[str, Any] = {}
    if device.type == "cpu":  # CPU ranks share their machine's cores and memory bandwidth
        from linscale.perf.clusters import cpu_host_fields

        host = cpu_host_fields(ranks_on_this_machine(topo))
    fields: dict[str, Any] = dict(
        name=name,
        nodes=topo.num_nodes,
        devices_per_node=max(1, topo.world_size // max(1, topo.num_nodes)),
        device=device.name,
        peak_flops={"fp32": peak, "bf16": peak, "fp16": peak},
        device_memory=device.total_memory(topo.local_world_size),
        mem_bandwidth=0.0 if device.type == "cpu" else device.memory_bandwidth(),  # CPU: from `host`
        # The probe measured the job's own process group: one figure for inside and across nodes.
        intra_bw=bw,
        intra_latency=alpha,
        inter_bw=bw,
        inter_latency=alpha,
        efficiency=efficiency,
        overlap_sharded=device.backend == "nccl",
        backend=device.backend,
    )
    return ClusterProfile(**{**fields, **host})


def ranks_on_this_machine(topo: Topology) -> int:
    """How many ranks of the job run on this machine (emulated nodes of one host share it): a collective."""
    if not ldist.active() or topo.world_size == 1:
        return 1
    from linscale.cluster.doctor import machine_id

    mine = machine_id()
    every: list[str] = [""] * topo.world_size
    dist.all_gather_object(every, mine)
    return sum(m == mine for m in every)


def resolve_profile(setting: str, device: Device, topo: Topology, compute_dtype: str, emulate_tflops: float):
    """The profile for `runtime.profile` (None for off). Collective for `auto`: every rank calls it."""
    if setting == "off":
        return None
    if setting == "auto":
        return this_machine(device, topo, compute_dtype, emulate_tflops, probe_network(device, topo))
    from linscale.perf.clusters import load_cluster

    return load_cluster(setting, nodes=topo.num_nodes, emulate_tflops=emulate_tflops)


def predict_run(
    task,
    profile,
    strategy: str,
    world: int,
    global_batch: int,
    micro_batch: int,
    precision: str,
    activation_checkpointing: str,
    bucket_mb: float,
    reduce_dtype: str,
    optimizer_impl: str = "fused",
) -> dict[str, Any]:
    """The predicted figures of a run, as summary entries."""
    from linscale.perf.memory import trace
    from linscale.perf.predict import predict_step

    tr = trace(task, precision)
    p = predict_step(
        tr,
        profile,
        strategy,
        world,
        global_batch,
        micro_batch,
        precision=precision,
        activation_checkpointing=activation_checkpointing,
        bucket_mb=bucket_mb,
        reduce_dtype=reduce_dtype,
        optimizer_impl=optimizer_impl,
    )
    out: dict[str, Any] = {
        "predicted_step_time_ms": 1e3 * p.step_time,
        "predicted_compute_ms": 1e3 * p.compute,
        "predicted_comm_exposed_ms": 1e3 * p.comm_exposed,
        "predicted_optimizer_ms": 1e3 * p.optimizer,
    }
    if p.memory is not None:
        m = p.memory
        out["predicted_model_state_mb"] = (m.params + m.grads + m.optimizer) / 2**20
        out["predicted_peak_memory_gb"] = m.peak / 2**30
    out["prediction_profile"] = profile.name
    return out


def compare(summary: dict[str, Any], predicted: dict[str, Any]) -> dict[str, Any]:
    """The predicted entries with the errors against what the run measured."""
    out = dict(predicted)
    measured = summary.get("steady_step_time_ms")
    if isinstance(measured, float) and measured > 0 and "predicted_step_time_ms" in out:
        out["step_time_error_pct"] = 100 * (out["predicted_step_time_ms"] - measured) / measured
    states = [summary.get(f"model_state_{k}_mb") for k in ("params", "grads", "optimizer")]
    if all(isinstance(v, float) for v in states) and sum(states) > 0 and "predicted_model_state_mb" in out:
        out["model_state_error_pct"] = 100 * (out["predicted_model_state_mb"] - sum(states)) / sum(states)
    peak = summary.get("peak_memory_gb")
    if isinstance(peak, float) and peak > 0 and "predicted_peak_memory_gb" in out:
        out["peak_memory_error_pct"] = 100 * (out["predicted_peak_memory_gb"] - peak) / peak
    return out
