"""`linscale doctor`: a pre-flight check run on every process of a job.

It measures what decides whether a job will scale: that the rendezvous works, each device's
matrix-product rate (to find a slow GPU or node), all-reduce latency and bus bandwidth over a
range of sizes, and the bandwidth between every pair of nodes (to find a slow link). The
analysis functions are pure, so what counts as an outlier is unit-tested without processes.

Bus bandwidth follows the nccl-tests definition: busbw = algbw * 2(n-1)/n, where algbw is
bytes / time; it is the figure to compare against the link rate.
"""

from __future__ import annotations

import itertools
import json
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from linscale.runtime import dist as ldist
from linscale.runtime.device import Device
from linscale.runtime.topology import Topology

SLOW_DEVICE = 0.7  # a device below 70% of the median matrix-product rate is an outlier
SLOW_VS_DATASHEET = 0.5  # a GPU's fp32 matrix product below half its data-sheet peak is suspect
SLOW_LINK = 0.5  # a node pair below 50% of the best pair's bandwidth is slow


@dataclass
class DeviceResult:
    rank: int
    node: int
    host: str
    ip: str
    device: str
    flops: float
    expected: float | None = None  # the data-sheet peak, for devices in the table (GPUs)


@dataclass
class SweepPoint:
    bytes: int
    time_s: float
    algbw: float  # bytes/s
    busbw: float  # bytes/s


@dataclass
class PairResult:
    nodes: tuple[int, int]
    ranks: tuple[int, int]
    bytes: int
    time_s: float
    busbw: float


@dataclass
class Report:
    world_size: int
    num_nodes: int
    backend: str
    interface: str | None
    rendezvous_s: float
    devices: list[DeviceResult]
    sweep: list[SweepPoint]
    pairs: list[PairResult] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)

    @property
    def latency_s(self) -> float:
        return min(p.time_s for p in self.sweep) if self.sweep else float("nan")

    @property
    def peak_busbw(self) -> float:
        return max((p.busbw for p in self.sweep), default=float("nan"))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["latency_s"] = self.latency_s
        out["peak_busbw_bytes_per_s"] = self.peak_busbw
        return out


def bus_bandwidth(nbytes: int, seconds: float, world: int) -> tuple[float, float]:
    """(algbw, busbw) in bytes/s of an all-reduce of `nbytes` on `world` ranks (nccl-tests)."""
    algbw = nbytes / seconds
    return algbw, algbw * 2 * (world - 1) / world if world > 1 else algbw


def slow_devices(devices: list[DeviceResult], threshold: float = SLOW_DEVICE) -> list[DeviceResult]:
    median = statistics.median(d.flops for d in devices) if len(devices) > 1 else None
    return [
        d
        for d in devices
        if (median is not None and d.flops < threshold * median)
        or (d.expected and d.flops < SLOW_VS_DATASHEET * d.expected)
    ]


def slow_nodes(pairs: list[PairResult], num_nodes: int, threshold: float = SLOW_LINK) -> dict[int, float]:
    """Nodes every one of whose pairs is slow, with the best bandwidth seen on any of its pairs.

    With three or more nodes a slow link shows as one node whose every pair is slow while the
    pairs of the other nodes are not; with two nodes there is one pair and nothing to compare.
    """
    if num_nodes < 3 or not pairs:
        return {}
    # The best pair is the reference: with one slow node among three, two of the three pairs
    # are slow, so the median would be a slow pair.
    best = max(p.busbw for p in pairs)
    slow_pairs = {p.nodes for p in pairs if p.busbw < threshold * best}
    out = {}
    for node in range(num_nodes):
        mine = [p for p in pairs if node in p.nodes]
        if mine and all(p.nodes in slow_pairs for p in mine):
            out[node] = max(p.busbw for p in mine)
    return out


def machine_id() -> str:
    """What identifies the machine (kernel) this process runs on: network namespaces of one host share it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def probe_turns(machines: list[str]) -> list[int]:
    """The turn of each rank's device probe: ranks on one machine take turns (CPU ranks share its cores
    and memory bandwidth, so probing at once would make some look slow), ranks on different machines
    probe at the same time."""
    seen: dict[str, int] = {}
    turns = []
    for m in machines:
        turns.append(seen.get(m, 0))
        seen[m] = turns[-1] + 1
    return turns


def findings(report: Report) -> list[str]:
    """What looks wrong, with the fix to try."""
    out = []
    for d in slow_devices(report.devices):
        median = statistics.median(x.flops for x in report.devices)
        versus = f"{100 * d.flops / median:.0f}% of the median"
        if d.expected:
            versus += f", {100 * d.flops / d.expected:.0f}% of its data sheet"
        out.append(
            f"slow device: rank {d.rank} on node {d.node} ({d.host}) reaches {d.flops / 1e9:.1f} GFLOP/s, "
            f"{versus}: check its clocks, temperature, other jobs on it"
        )
    if report.pairs:
        top = max(p.busbw for p in report.pairs)
        for node, best in slow_nodes(report.pairs, report.num_nodes).items():
            host = next((d.host + " " + d.ip for d in report.devices if d.node == node), "?")
            out.append(
                f"slow link: node {node} ({host}) reaches at most {8 * best / 1e9:.2f} Gbit/s to the others, "
                f"{100 * best / top:.0f}% of the best pair ({8 * top / 1e9:.2f} Gbit/s): check its NIC, "
                "cable and switch port, and that GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME name its fast interface"
            )
    if report.num_nodes > 1 and report.interface == "lo":
        out.append(
            "wrong interface: the processes talk over 'lo' across nodes; give --master-addr the master's "
            "network address (not localhost) or set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME"
        )
    return out


def time_collective(fn, device: Device, budget_s: float, max_iters: int = 20) -> float:
    """Median seconds of `fn()` (a collective), the same iteration count on every rank."""
    fn()  # warm-up: connections, buffers
    device.synchronize()
    t0 = time.perf_counter()
    fn()
    device.synchronize()
    first = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    ldist.all_reduce(first, "max")
    iters = int(min(max_iters, max(2, budget_s / max(first.item(), 1e-6))))
    times = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        device.synchronize()
        times.append(time.perf_counter() - t0)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
    ldist.all_reduce(slowest, "max")  # a collective is as fast as its slowest rank
    return slowest.item()


def sizes_between(lo: int, hi: int) -> list[int]:
    """Powers of 4 from `lo` to `hi` bytes."""
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= 4
    return out


def run_checks(
    topo: Topology,
    device: Device,
    rendezvous_s: float,
    min_bytes: int,
    max_bytes: int,
    pair_bytes: int,
    budget_s: float,
) -> Report:
    """Every rank calls this; rank 0 gets the full report."""
    from linscale.runtime.network import interface_for, local_ip_toward

    ip = local_ip_toward(topo.master_addr)
    machines: list[Any] = [None] * topo.world_size
    dist.all_gather_object(machines, machine_id())
    # GPUs are one per rank; CPU ranks of one machine share it, so they probe one after the other.
    turns = probe_turns(machines) if device.type == "cpu" else [0] * topo.world_size
    flops = 0.0
    for turn in range(max(turns) + 1):
        if turns[topo.rank] == turn:
            flops = device.matmul_rate("fp32", size=1024 if device.type == "cpu" else 8192)
        dist.barrier()
    # GPUs have a data-sheet peak to compare with; a CPU's peak is this same probe.
    expected = device.peak_flops("fp32")[0] if device.type == "cuda" else None
    expected = expected if expected and expected == expected else None  # NaN: a GPU not in the table
    mine = DeviceResult(topo.rank, topo.node_rank, socket.gethostname(), ip, device.name, flops, expected)
    devices: list[Any] = [None] * topo.world_size
    dist.all_gather_object(devices, mine)

    sweep = []
    for nbytes in sizes_between(min_bytes, max_bytes):
        t = torch.ones(nbytes // 4, dtype=torch.float32, device=device.torch_device)
        seconds = time_collective(lambda t=t: dist.all_reduce(t), device, budget_s)
        sweep.append(SweepPoint(nbytes, seconds, *bus_bandwidth(nbytes, seconds, topo.world_size)))

    pairs = []
    leaders = {d.node: d.rank for d in sorted(devices, key=lambda d: (d.node, d.rank))}
    if len(leaders) > 1:
        t = torch.ones(pair_bytes // 4, dtype=torch.float32, device=device.torch_device)
        for a, b in itertools.combinations(sorted(leaders), 2):
            ranks = (leaders[a], leaders[b])
            group = dist.new_group(list(ranks))  # every rank takes part in creating every group
            seconds = float("nan")
            if topo.rank in ranks:
                seconds = _timed_pair(lambda g=group: dist.all_reduce(t, group=g), device, budget_s, group)
            box = torch.tensor([seconds if topo.rank == ranks[0] else 0.0], dtype=torch.float64)
            ldist.all_reduce(box, "sum")
            pairs.append(PairResult((a, b), ranks, pair_bytes, box.item(), bus_bandwidth(pair_bytes, box.item(), 2)[1]))
    report = Report(
        topo.world_size,
        len(leaders),
        device.backend,
        interface_for(ip),
        rendezvous_s,
        sorted(devices, key=lambda d: d.rank),
        sweep,
        pairs,
    )
    report.findings = findings(report)
    return report


def _timed_pair(fn, device: Device, budget_s: float, group) -> float:
    fn()
    device.synchronize()
    t0 = time.perf_counter()
    fn()
    device.synchronize()
    first = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(first, op=dist.ReduceOp.MAX, group=group)
    iters = int(min(10, max(2, budget_s / max(first.item(), 1e-6))))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        device.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_report(r: Report) -> str:
    lines = [
        "***** linscale doctor *****",
        f"  rendezvous      = ok, {r.world_size} processes on {r.num_nodes} node(s) in {r.rendezvous_s:.1f} s "
        f"({r.backend}, interface {r.interface or '?'})",
        "",
        "  devices (fp32 matrix product)",
        "  rank  node  host             address          GFLOP/s",
    ]
    lines += [f"  {d.rank:>4}  {d.node:>4}  {d.host[:15]:<15}  {d.ip:<15}  {d.flops / 1e9:>7.1f}" for d in r.devices]
    lines += ["", "  all-reduce over all processes", "  size         time (us)   algbw (Gbit/s)  busbw (Gbit/s)"]
    lines += [
        f"  {_fmt_bytes(p.bytes):>10}  {1e6 * p.time_s:>10.1f}  {8 * p.algbw / 1e9:>14.3f}  {8 * p.busbw / 1e9:>14.3f}"
        for p in r.sweep
    ]
    lines.append(
        f"  latency (smallest size) = {1e6 * r.latency_s:.1f} us, peak busbw = {8 * r.peak_busbw / 1e9:.3f} Gbit/s"
    )
    if r.pairs:
        lines += [
            "",
            f"  node pairs ({_fmt_bytes(r.pairs[0].bytes)} all-reduce between one process of each)",
            "  nodes   busbw (Gbit/s)",
        ]
        lines += [f"  {p.nodes[0]}-{p.nodes[1]:<5} {8 * p.busbw / 1e9:>14.3f}" for p in r.pairs]
    lines.append("")
    lines += [f"  ! {f}" for f in r.findings] or ["  no outliers found"]
    return "\n".join(lines)


def save(report: Report, path: Path) -> None:
    """Write the report as JSON (atomically) where predictions can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    tmp.replace(path)
