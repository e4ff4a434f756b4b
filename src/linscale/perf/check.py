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

The compute efficiency (achieved / peak FLOP/s of the model's forward and backward) of a real
device is calibrated by the runs themselves: each run with `runtime.profile=auto` records the
efficiency its forward/backward reached, per device, compute dtype, threads, ranks sharing the
machine, task, model FLOPs and micro-batch, in the user's cache folder; the next run of that
configuration predicts with it (`prediction_efficiency_source` says which). Without one, a typical
DEFAULT_EFFICIENCY stands in.
"""

from __future__ import annotations

import dataclasses
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
    """A ClusterProfile of the machine and job this process runs in (its `source`: "auto", and for a
    real device the calibration key's prefix after a "|")."""
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
    if not emulate_tflops:
        ranks = host.get("host_devices", topo.local_world_size)
        fields["source"] = f"auto|{device.name}|{compute_dtype}|{device.threads} threads|{ranks} ranks"
    return ClusterProfile(**{**fields, **host})


def _efficiency_file():
    from linscale.runtime.device import _cache_file

    return _cache_file().with_name("efficiency.json")


def _calibration_key(profile, task_name: str, flops_per_sample: float, micro_batch: int) -> str | None:
    if not profile.source.startswith("auto|"):
        return None
    return f"{profile.source[5:]}|{task_name}|{flops_per_sample:.6g} FLOP/sample|micro-batch {micro_batch}"


def calibrated_efficiency(key: str | None) -> float | None:
    """The efficiency an earlier run of this configuration reached on this machine, if one did."""
    from linscale.runtime.device import read_json_map

    value = read_json_map(_efficiency_file()).get(key) if key is not None else None
    return float(value) if isinstance(value, (int, float)) and 0 < value <= 1.5 else None


def remember_efficiency(key: str, value: float) -> None:
    """Record a run's achieved efficiency for the next prediction (a damaged file is replaced)."""
    from linscale.runtime.device import remember

    remember(_efficiency_file(), key, value)


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
    tr,
    task_name: str,
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
    """The predicted figures of a run whose model `tr` traced (perf/memory.py), as summary entries."""
    from linscale.perf.predict import predict_step

    key = _calibration_key(profile, task_name, tr.flops_per_sample, micro_batch)
    calibrated = calibrated_efficiency(key)
    if calibrated is not None:
        profile = dataclasses.replace(profile, efficiency=calibrated)
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
    out["prediction_efficiency"] = profile.efficiency
    out["prediction_efficiency_source"] = (
        "emulated device"
        if profile.efficiency == 1.0 and "emulated" in profile.name
        else "calibrated by an earlier run of this configuration"
        if calibrated is not None
        else f"default {DEFAULT_EFFICIENCY:g} (uncalibrated: this run calibrates the next)"
        if key is not None
        else "the profile's"
    )
    if key is not None:  # for `compare`, not the summary
        out["_calibration"] = {"key": key, "flop_ms": 1e3 * (p.compute - p.host)}
    return out


def compare(summary: dict[str, Any], predicted: dict[str, Any]) -> dict[str, Any]:
    """The predicted entries with the errors against what the run measured. A run on this machine's real
    device (runtime.profile=auto) records the efficiency its forward/backward reached for the next one."""
    out = dict(predicted)
    calibration = out.pop("_calibration", None)
    fwd_bwd = summary.get("time_fwd_bwd_ms")
    if calibration and isinstance(fwd_bwd, float):
        # The predicted FLOP time took the profile's efficiency: what was reached scales with the ratio
        # of that time to the measured forward/backward (less the predicted host work around collectives).
        flop_ms = fwd_bwd - (out["predicted_compute_ms"] - calibration["flop_ms"])
        if flop_ms > 0 and calibration["flop_ms"] > 0:
            out["calibrated_efficiency"] = out["prediction_efficiency"] * calibration["flop_ms"] / flop_ms
            remember_efficiency(calibration["key"], out["calibrated_efficiency"])
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
