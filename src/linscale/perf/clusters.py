"""Cluster profiles: what the step-time predictor needs to know about a machine.

A `ClusterProfile` describes nodes of identical devices: their peak FLOP/s per compute dtype, memory
and memory bandwidth, the all-reduce bus bandwidth and per-step latency inside a node and across
nodes, and whether the sharded strategies' collectives overlap compute (NCCL runs them on streams
of their own; gloo blocks the training thread). Profiles come from

* the built-in table `PROFILES` (data-sheet figures, sources beside each entry),
* a JSON file with the same fields (or `{"base": "<profile>", ...}` overriding some of them),
* a `linscale doctor` report (`Report.to_json`): measured FLOP/s, all-reduce latency and bandwidth,
  nodes, processes per node and backend; `doctor` names the last report (~/.cache/linscale/doctor.json).

`load_cluster` resolves any of them; `--emulate-tflops X` turns the devices into ones of exactly X
TFLOP/s at efficiency 1, the speed `runtime.emulate_tflops` gives CPU processes on an emulated cluster.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GB = 1e9


@dataclass(frozen=True)
class ClusterProfile:
    """Nodes of identical devices. Bandwidths in bytes/s, latencies in seconds, memory in bytes."""

    name: str
    nodes: int
    devices_per_node: int
    device: str
    #: Peak FLOP/s of one device by compute dtype: "fp32", "bf16", "fp16".
    peak_flops: dict[str, float]
    device_memory: float
    #: Bytes/s one device's memory moves (read + write), for the optimizer step and buffer copies.
    mem_bandwidth: float
    #: All-reduce bus bandwidth inside a node and latency of one ring step there.
    intra_bw: float
    intra_latency: float
    #: A node's total inter-node bandwidth (all its NICs) and the latency of one step across nodes.
    inter_bw: float
    inter_latency: float
    #: Achieved / peak FLOP/s of the model's matrix products (calibrated or typical).
    efficiency: float
    #: The sharded strategies' collectives overlap compute (NCCL streams) or block the training thread (gloo).
    overlap_sharded: bool
    backend: str
    #: Devices that share one host's memory bandwidth and cores (CPU processes of one machine; all the
    #: ranks of an emulated cluster, whose nodes are namespaces of one machine). 0: each has its own.
    host_devices: int = 0
    #: Fraction of `mem_bandwidth` that the fused AdamW step reaches.
    optimizer_efficiency: float = 0.7
    #: How much longer the foreach AdamW kernel (sharded strategies' DTensor parameters) takes than the fused one.
    foreach_slowdown: float = 1.5
    #: How much longer the slowest rank's compute takes than the stated time: every synchronizing
    #: collective waits for it (0 for devices that keep pace; CPU ranks sharing too few cores lag).
    straggler: float = 0.0
    #: Bytes/s one device's own copies reach at most (CPU ranks: their threads' copy rate; 0: no limit
    #: beyond the shared `mem_bandwidth`).
    rank_bandwidth: float = 0.0
    #: Cores the `host_devices` share (0: each device has its own): host work of ranks that outnumber
    #: them runs that much slower (all ranks do it at once, between the same collectives).
    host_cores: int = 0
    #: Seconds of host work on the training thread per FSDP2 collective call (hooks, views, the
    #: copy-in/out bookkeeping) where it is the device's own work (CPU ranks); on GPUs the host runs
    #: ahead of the device and it hides (0).
    host_call_overhead: float = 0.0
    #: Seconds of host work per sharded (DTensor) parameter in the optimizer step (the gradient norm's
    #: and fused AdamW's per-tensor bookkeeping), where the host work is the device's (CPU ranks).
    host_tensor_overhead: float = 0.0
    #: Where the figures come from.
    source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.devices_per_node < 1:
            raise ValueError(f"cluster {self.name!r}: nodes and devices_per_node must be >= 1")
        if self.backend not in ("nccl", "gloo"):
            raise ValueError(f"cluster {self.name!r}: backend must be nccl or gloo, got {self.backend!r}")
        for key in ("device_memory", "mem_bandwidth", "intra_bw", "inter_bw", "efficiency"):
            if not getattr(self, key) > 0:
                raise ValueError(f"cluster {self.name!r}: {key} must be > 0, got {getattr(self, key)!r}")
        for key in ("intra_latency", "inter_latency"):
            if getattr(self, key) < 0:
                raise ValueError(f"cluster {self.name!r}: {key} must be >= 0, got {getattr(self, key)!r}")
        if not self.peak_flops or not all(v > 0 for v in self.peak_flops.values()):
            raise ValueError(f"cluster {self.name!r}: peak_flops needs positive FLOP/s for fp32, bf16 or fp16")

    @property
    def world(self) -> int:
        return self.nodes * self.devices_per_node

    def with_nodes(self, nodes: int) -> ClusterProfile:
        return dataclasses.replace(self, nodes=nodes)

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for a compute dtype; a ValueError names the dtypes this device has."""
        if dtype not in self.peak_flops:
            raise ValueError(
                f"{self.device} has no {dtype} peak in profile {self.name!r} (it has "
                f"{', '.join(sorted(self.peak_flops))}); choose --precision "
                + " or ".join(PRECISION_OF_DTYPE[d] for d in sorted(self.peak_flops) if d in PRECISION_OF_DTYPE)
            )
        return self.peak_flops[dtype]

    def mem_rate(self, world: int) -> float:
        """Bytes/s of memory traffic one device gets while `world` devices work at once."""
        rate = self.mem_bandwidth
        if self.host_devices > 0:
            rate /= max(1, min(world, self.host_devices))
        return min(rate, self.rank_bandwidth) if self.rank_bandwidth > 0 else rate

    def host_share(self, world: int) -> float:
        """How much slower host work runs while `world` devices do it at once (1: a core each)."""
        if self.host_devices > 0 and self.host_cores > 0:
            return max(1.0, min(world, self.host_devices) / self.host_cores)
        return 1.0

    def link(self, group: int, nodes: int, concurrent: int = 1) -> tuple[float, float]:
        """(latency per step, bandwidth) of a collective over `group` ranks spread over `nodes` nodes, while
        `concurrent` such collectives share each node's inter-node links (hsdp's replicate groups)."""
        if nodes <= 1:
            return self.intra_latency, self.intra_bw
        return self.inter_latency, min(self.intra_bw, self.inter_bw / max(1, concurrent))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["notes"] = list(self.notes)
        return out


PRECISION_OF_DTYPE = {"fp32": "fp32", "bf16": "bf16-mixed", "fp16": "fp16-mixed"}


def _data_sheet(device: str) -> dict[str, Any]:
    """The peak FLOP/s and memory bandwidth fields of a GPU from runtime/device.py's data-sheet tables."""
    from linscale.runtime.device import gpu_data_sheet

    peaks, bandwidth = gpu_data_sheet(device)
    return {"peak_flops": peaks, "mem_bandwidth": bandwidth}


# Built-in profiles. Peak FLOP/s and memory bandwidths are runtime/device.py's data-sheet tables
# (dense, no sparsity; the comments give the figures); fp32 is the plain (non-TF32) rate, which PyTorch uses for fp32
# matrix products by default. Bandwidths are the data-sheet link rates per direction times the fraction
# nccl-tests typically reach (about 80% of NVLink, 90% of InfiniBand/Ethernet); efficiencies are typical
# model-FLOPs utilisations of dense transformer training, to be replaced by a calibrated figure
# (--efficiency) when one is known. The optimizer's fused AdamW at 70% of the memory bandwidth and the
# foreach kernel 1.5x slower are estimates, not data-sheet figures.
PROFILES: dict[str, ClusterProfile] = {
    "8xh100-ib": ClusterProfile(
        name="8xh100-ib",
        nodes=1,
        devices_per_node=8,
        device="H100 SXM5 80GB",
        # NVIDIA H100 Tensor Core GPU data sheet: 989 TFLOP/s bf16/fp16 dense, 67 TFLOP/s fp32, 80 GB HBM3
        # at 3.35 TB/s.
        **_data_sheet("H100 SXM5 80GB"),
        device_memory=80 * GB,
        # NVLink 4 through NVSwitch: 900 GB/s per GPU both directions, 450 GB/s each way; 80% of it.
        intra_bw=0.8 * 450 * GB,
        intra_latency=2e-6,
        # 8 x ConnectX-7 400 Gb/s NDR InfiniBand per node (one per GPU): 8 x 50 GB/s; 90% of it.
        inter_bw=0.9 * 8 * 50 * GB,
        inter_latency=5e-6,
        efficiency=0.45,
        overlap_sharded=True,
        backend="nccl",
        source="NVIDIA H100 data sheet; DGX H100 (8 x 400G NDR InfiniBand)",
    ),
    "8xa100": ClusterProfile(
        name="8xa100",
        nodes=1,
        devices_per_node=8,
        device="A100 SXM4 80GB",
        # NVIDIA A100 data sheet: 312 TFLOP/s bf16/fp16 dense, 19.5 TFLOP/s fp32, 80 GB HBM2e at 2.04 TB/s.
        **_data_sheet("A100 SXM4 80GB"),
        device_memory=80 * GB,
        # NVLink 3 through NVSwitch: 600 GB/s per GPU both directions, 300 GB/s each way; 80% of it.
        intra_bw=0.8 * 300 * GB,
        intra_latency=2e-6,
        # DGX A100: 8 x ConnectX-6 200 Gb/s HDR InfiniBand for compute traffic: 8 x 25 GB/s; 90% of it.
        inter_bw=0.9 * 8 * 25 * GB,
        inter_latency=5e-6,
        efficiency=0.45,
        overlap_sharded=True,
        backend="nccl",
        source="NVIDIA A100 data sheet; DGX A100 (8 x 200G HDR InfiniBand)",
    ),
    "dgx-v100": ClusterProfile(
        name="dgx-v100",
        nodes=1,
        devices_per_node=8,
        device="V100 SXM2 32GB",
        # NVIDIA V100 data sheet (SXM2): 125 TFLOP/s fp16 tensor, 15.7 TFLOP/s fp32, no bf16; 32 GB HBM2
        # at 900 GB/s.
        **_data_sheet("V100 SXM2 32GB"),
        device_memory=32 * GB,
        # NVLink 2, hybrid cube-mesh: 6 links x 25 GB/s each way per GPU = 150 GB/s; 80% of it.
        intra_bw=0.8 * 150 * GB,
        intra_latency=3e-6,
        # DGX-1: 4 x 100 Gb/s EDR InfiniBand per node = 50 GB/s; 90% of it.
        inter_bw=0.9 * 4 * 12.5 * GB,
        inter_latency=6e-6,
        efficiency=0.4,
        overlap_sharded=True,
        backend="nccl",
        source="NVIDIA V100 data sheet; DGX-1 with V100 (4 x 100G EDR InfiniBand)",
    ),
    "2x2-v100-25gbe": ClusterProfile(
        name="2x2-v100-25gbe",
        nodes=2,
        devices_per_node=2,
        device="V100 PCIe 32GB",
        # NVIDIA V100 data sheet (PCIe): 112 TFLOP/s fp16 tensor, 14 TFLOP/s fp32, no bf16; 32 GB at 900 GB/s.
        **_data_sheet("V100 PCIe 32GB"),
        device_memory=32 * GB,
        # No NVLink: PCIe 3.0 x16, 15.75 GB/s each way; peer traffic reaches about 10 GB/s.
        intra_bw=10 * GB,
        intra_latency=5e-6,
        # One 25 Gb/s Ethernet port per node (3.125 GB/s), NCCL over TCP sockets: 90% of it.
        inter_bw=0.9 * 25 / 8 * GB,
        inter_latency=25e-6,
        efficiency=0.4,
        overlap_sharded=True,
        backend="nccl",
        source="NVIDIA V100 PCIe data sheet; 25GbE (IEEE 802.3by)",
    ),
}


def describe(p: ClusterProfile) -> str:
    """One line: nodes, devices, peaks, memory, links."""
    peaks = ", ".join(f"{k} {v / 1e12:g}" for k, v in sorted(p.peak_flops.items()))
    return (
        f"{p.nodes} node(s) x {p.devices_per_node} {p.device} (TFLOP/s {peaks}; {p.device_memory / GB:.3g} GB), "
        f"intra {p.intra_bw / GB:.3g} GB/s, inter {p.inter_bw / GB:.3g} GB/s per node, {p.backend}"
    )


def doctor_cache_path() -> Path:
    """Where `linscale doctor` keeps its last report (the same place as cli/doctor.cache_path)."""
    from linscale.cli.doctor import cache_path

    return cache_path()


def load_cluster(spec: str, nodes: int | None = None, emulate_tflops: float = 0.0) -> ClusterProfile:
    """A profile name, a JSON profile file, a `linscale doctor` report, or `doctor` (the last report).

    `nodes` replaces the profile's node count; `emulate_tflops` > 0 makes every device exactly that
    fast at efficiency 1 (the emulated device speed of `runtime.emulate_tflops`)."""
    if spec in PROFILES:
        profile = PROFILES[spec]
    else:
        path = doctor_cache_path() if spec == "doctor" else Path(spec)
        if not path.is_file():
            if spec == "doctor":
                raise ValueError(f"no `linscale doctor` report at {path}; run `linscale doctor` on the cluster first")
            raise ValueError(
                f"unknown cluster {spec!r}: use one of {', '.join(PROFILES)} (`linscale plan --list-clusters`), "
                "a JSON profile file, a `linscale doctor` report, or `doctor` for the last report"
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cluster file {str(path)!r} is not readable JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"cluster file {str(path)!r} must hold a JSON object")
        profile = profile_from_doctor(data, name=path.name) if is_doctor_report(data) else profile_from_json(data)
    if nodes is not None:
        if nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {nodes}")
        profile = profile.with_nodes(nodes)
    if emulate_tflops:
        profile = emulated(profile, emulate_tflops)
    return profile


def emulated(profile: ClusterProfile, tflops: float) -> ClusterProfile:
    """Devices of exactly `tflops` TFLOP/s in every dtype at efficiency 1: the emulation waits flops / speed."""
    if tflops <= 0:
        raise ValueError(f"--emulate-tflops must be > 0, got {tflops}")
    peak = tflops * 1e12
    return dataclasses.replace(
        profile,
        name=f"{profile.name} (emulated {tflops:g} TFLOP/s)",
        peak_flops={"fp32": peak, "bf16": peak, "fp16": peak},
        efficiency=1.0,
    )


def profile_from_json(data: dict[str, Any]) -> ClusterProfile:
    """A profile from a JSON object of ClusterProfile fields, or `{"base": NAME, field: value, ...}`."""
    data = dict(data)
    known = {f.name for f in dataclasses.fields(ClusterProfile)}
    base_name = data.pop("base", None)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown profile field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "notes" in data:
        data["notes"] = tuple(data["notes"])
    if base_name is not None:
        if base_name not in PROFILES:
            raise ValueError(f"unknown base profile {base_name!r}; known: {', '.join(PROFILES)}")
        data.setdefault("name", f"{base_name} (modified)")
        return dataclasses.replace(PROFILES[base_name], **data)
    missing = sorted(
        f.name
        for f in dataclasses.fields(ClusterProfile)
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ValueError(
            f"the profile lacks {', '.join(missing)}; give every field, or start from a built-in with "
            f'"base": one of {", ".join(PROFILES)}'
        )
    return ClusterProfile(**data)


def is_doctor_report(data: dict[str, Any]) -> bool:
    return {"world_size", "num_nodes", "backend", "devices", "sweep"} <= set(data)


def ring_fit(sweep: list[dict[str, Any]], world: int) -> tuple[float, float]:
    """(latency per ring step, bus bandwidth) of a ring all-reduce fitted to a sweep of sizes.

    time = 2(n-1) alpha + 2(n-1)/n bytes / bw, fitted by least squares on the relative error, so the
    small sizes set the latency and the large ones the bandwidth."""
    if not sweep:
        raise ValueError("the doctor report has no all-reduce sweep")
    points = sorted(sweep, key=lambda p: p["bytes"])
    busbw = max(float(p["busbw"]) for p in points)
    if world <= 1 or len(points) == 1:
        return 0.0, busbw
    steps = 2 * (world - 1)
    # Minimise sum(((a + b x_i) - t_i) / t_i)^2 over a (latency) and b (seconds per byte sent).
    xs = [steps / world * p["bytes"] for p in points]
    ts = [float(p["time_s"]) for p in points]
    s11 = sum(1 / t**2 for t in ts)
    s12 = sum(x / t**2 for x, t in zip(xs, ts, strict=True))
    s22 = sum(x * x / t**2 for x, t in zip(xs, ts, strict=True))
    r1 = sum(1 / t for t in ts)
    r2 = sum(x / t for x, t in zip(xs, ts, strict=True))
    det = s11 * s22 - s12 * s12
    a = (r1 * s22 - r2 * s12) / det
    b = (s11 * r2 - s12 * r1) / det
    if a < 0 or b <= 0:  # a sweep that does not look like a ring: latency from the smallest, bandwidth the best
        return max(0.0, ts[0] - xs[0] / busbw) / steps, busbw
    return a / steps, 1 / b


def profile_from_doctor(
    report: dict[str, Any], name: str = "doctor", host_rates: tuple[float, float, float] | None = None
) -> ClusterProfile:
    """A profile from `linscale doctor`'s report (`Report.to_json`).

    Devices: the median measured fp32 matrix-product rate, for every dtype unless the device is a GPU of
    the data-sheet table (then its bf16/fp16 peaks scale by the same measured/data-sheet ratio). Network:
    the latency per ring step and the bus bandwidth fitted to the all-reduce sweep; the sweep spans every
    process, so across nodes it is the inter-node figure, and the intra-node figure is taken equal to it
    (a lower bound: measure one node alone for the other). `host_rates` (copy bytes/s, fused AdamW
    efficiency, foreach slowdown) describe CPU hosts; None measures this machine."""
    world, num_nodes = int(report["world_size"]), max(1, int(report["num_nodes"]))
    devices = report["devices"]
    if not devices:
        raise ValueError("the doctor report lists no devices")
    backend = report["backend"]
    device_name = str(devices[0]["device"])
    measured = statistics.median(float(d["flops"]) for d in devices)
    alpha, bw = ring_fit(report["sweep"], world)
    notes = [f"doctor report: {world} processes on {num_nodes} node(s), {backend}"]
    is_cpu = backend == "gloo" and not any(d.get("expected") for d in devices)
    if is_cpu:
        # One machine's CPU processes share its cores and memory; ranks name their host.
        per_host: dict[str, int] = {}
        for d in devices:
            per_host[d["host"]] = per_host.get(d["host"], 0) + 1
        host = cpu_host_fields(max(per_host.values()), host_rates)
        if host_rates is None:
            notes.append("memory and optimizer rates measured on this machine")
        # Every rank probed alone, with all its threads: the measured rate is the host's.
        # bf16 is taken at the fp32 rate: the doctor probes fp32 only (a lower bound where AVX-512 BF16 or
        # AMX compute bf16 faster).
        peak_flops = {"fp32": measured, "bf16": measured, "fp16": measured}
        memory = _host_memory() / host["host_devices"]
        # A model's matrix products reach about 0.6 of the probe's large one on CPU cores.
        efficiency = 0.6
        notes.append("CPU: efficiency 0.6 of the measured matrix-product rate (set --efficiency when calibrated)")
    else:
        from linscale.runtime.device import GPU_MEMORY_BANDWIDTH, GPU_PEAK_FLOPS, _name_matches

        table = next((t for key, t in GPU_PEAK_FLOPS if _name_matches(key, device_name)), None)
        ratio = measured / table["fp32"] if table else 1.0
        peak_flops = {k: v * ratio for k, v in table.items()} if table else {"fp32": measured}
        host = {"mem_bandwidth": next((v for key, v in GPU_MEMORY_BANDWIDTH if _name_matches(key, device_name)), 1e12)}
        memory = _gpu_memory(device_name)
        # The doctor's fp32 probe is a large matrix product: the model's reach about half of it.
        efficiency = 0.5
        notes.append("GPU memory size from the device name; efficiency 0.5 (set --efficiency when calibrated)")
    notes.append("intra-node bandwidth taken equal to the measured all-process figure")
    return ClusterProfile(
        name=name,
        nodes=num_nodes,
        devices_per_node=max(1, world // num_nodes),
        device=device_name,
        peak_flops=peak_flops,
        device_memory=memory,
        intra_bw=bw,
        intra_latency=alpha,
        inter_bw=bw,
        inter_latency=alpha,
        efficiency=efficiency,
        overlap_sharded=backend == "nccl",
        backend=backend,
        source="linscale doctor",
        notes=tuple(notes),
        **host,
    )


def cpu_host_fields(host_devices: int, host_rates: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """The ClusterProfile fields of CPU ranks, `host_devices` of which share one machine (its memory
    bandwidth and cores): the machine's copy rate, the AdamW kernels' rates (`cpu_host_rates`, or
    `host_rates`), and the lag of the slowest rank when they outnumber the cores."""
    copy_bw, opt_eff, foreach = host_rates or cpu_host_rates()
    threads = max(1, _cores() // max(1, host_devices))  # runtime/device.py's default threads per rank
    return {
        "host_devices": host_devices,
        "mem_bandwidth": copy_bw,
        "rank_bandwidth": 0.0 if host_rates else threads * cpu_thread_copy_rate(),
        "optimizer_efficiency": opt_eff,
        "foreach_slowdown": foreach,
        "straggler": OVERSUBSCRIBED_STRAGGLER if host_devices > _cores() else 0.0,
        "host_cores": _cores(),
        "host_call_overhead": CPU_FSDP_CALL_OVERHEAD,
        "host_tensor_overhead": CPU_DTENSOR_STEP_OVERHEAD,
    }


def _cores() -> int:
    from linscale.runtime.device import cpu_cores

    return cpu_cores()


def _host_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * GB


def _gpu_memory(name: str) -> float:
    """Device memory from a name such as "NVIDIA A100-SXM4-80GB" (the size torch reports in the name)."""
    import re

    m = re.search(r"(\d+)\s*GB", name, re.IGNORECASE)
    return float(m.group(1)) * GB if m else 16 * GB


def cpu_host_rates() -> tuple[float, float, float]:
    """(copy bytes/s, fused AdamW / copy rate, foreach / fused time) of this machine with all its threads.

    CPU ranks' optimizer steps and FSDP's buffer copies run at these rates, shared among the ranks of the
    machine (`_host_rate_table`)."""
    rates = _host_rate_table()
    copy_bw, fused, foreach = rates["copy"], rates["fused"], rates["foreach"]
    return copy_bw, min(1.5, fused / copy_bw), max(1.0, fused / foreach)


def cpu_thread_copy_rate() -> float:
    """Bytes/s one thread of this machine copies: a rank's own copies run at most at its threads' rate."""
    return _host_rate_table()["copy-1-thread"]


def _host_rate_table() -> dict[str, float]:
    """This machine's copy and AdamW rates, measured once per machine, on an idle machine, and remembered
    (runtime/device.py's cache): ranks of one machine take turns (a file lock), and a measurement taken
    while the cores are busy (other ranks starting, another job) is used once but not remembered."""
    import fcntl

    from linscale.runtime.device import _cache_file, _cached_measure, _cpu_name, read_json_map

    key = f"host-rates|{_cpu_name()}|{socket.gethostname()}"
    kinds = ("copy", "fused", "foreach", "copy-1-thread")
    lock = _cache_file().with_name("host-rates.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            known = read_json_map(_cache_file())
            if all(f"{key}|{k}" in known for k in kinds):
                rates = [float(known[f"{key}|{k}"]) for k in kinds]
            elif _busy() < 0.25:
                rates = [_cached_measure(f"{key}|{k}", lambda k=k: _rate(k)) for k in kinds]
            else:
                # Multi-threaded optimizer kernels measured beside other work are far off; the copy rate
                # holds up. Typical ratios (a 2-core EPYC, idle: fused 0.8 of the copy rate, foreach 4.5x
                # slower, one thread half the copy rate of two).
                copy_bw = _rate("copy")
                fused = CPU_FUSED_SHARE * copy_bw
                rates = [copy_bw, fused, fused / CPU_FOREACH_SLOWDOWN, copy_bw / max(1, _cores())]
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return dict(zip(kinds, rates, strict=True))


def _busy(seconds: float = 0.2) -> float:
    """Fraction of this machine's CPU time spent busy over the next `seconds` (1.0 when unknown)."""
    import time

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 1.0
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


CPU_FUSED_SHARE = 0.8
CPU_FOREACH_SLOWDOWN = 4.5
# Ranks sharing too few cores: the slowest one's emulated compute runs about 5% late (8 ranks on 2 cores;
# docs/plan.md), and every synchronizing collective waits for it.
OVERSUBSCRIBED_STRAGGLER = 0.05
# Host work of CPU ranks that the traffic model leaves out, per rank with a core of its own (times
# `host_share` when ranks outnumber the cores): FSDP2's hooks and views around each collective call,
# and the optimizer step's per-tensor bookkeeping on DTensor parameters (the gradient norm, fused
# AdamW's step counters). Measured on a 2-core EPYC (docs/plan.md).
CPU_FSDP_CALL_OVERHEAD = 2e-3
CPU_DTENSOR_STEP_OVERHEAD = 80e-6
OPTIMIZER_BYTES_PER_PARAM = 28  # fused AdamW, fp32: reads param, grad, exp_avg, exp_avg_sq; writes three


def _rate(kind: str, numel: int = 8 * 2**20, reps: int = 7) -> float:
    """Bytes/s of a large copy (read + write; "copy-1-thread": on one thread) or of an AdamW step (28 bytes
    per fp32 parameter)."""
    import time

    import torch

    if kind == "copy-1-thread":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _rate("copy", numel, reps)
        finally:
            torch.set_num_threads(threads)
    if kind == "copy":
        src = torch.ones(numel)
        dst = torch.empty_like(src)
        run, moved = (lambda: dst.copy_(src)), 8 * numel
    else:
        params = [torch.nn.Parameter(torch.zeros(numel // 8)) for _ in range(8)]
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        opt = torch.optim.AdamW(params, lr=1e-3, **{kind: True})
        run, moved = opt.step, OPTIMIZER_BYTES_PER_PARAM * numel
    run()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return moved / best
