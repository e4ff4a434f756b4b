"""Scaling sweeps: run a task at several device counts, measure it, and draw the charts.

`linscale bench scaling TASK --devices 1,2,4,8 --mode strong|weak` runs `linscale train` once per
size, on this machine (`--cluster local`) or on an emulated cluster of network namespaces that the
sweep brings up and removes again (`--cluster emulated:NODESxPER_NODE:RATE[:LATENCY]`). Each run's
summary holds the measured steady-state step time, its breakdown and the step time the predictor
gave for that run (`predicted_step_time_ms`); the sweep puts them side by side in `scaling.md`,
`scaling.json` and three charts:

* throughput.png: samples (or tokens) per second against devices, with the ideal line and the
  predicted points;
* efficiency.png: scaling efficiency in percent, measured and predicted;
* breakdown.png: the step time split into data, compute, exposed communication and optimizer, one
  stacked bar per size.

Scaling efficiency at n devices is throughput(n) / (throughput(n0) x n / n0), n0 the smallest size:
for strong scaling the global batch stays fixed, for weak scaling it grows with the devices.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BUDGETS = ("--train.max_steps", "--train.max_time", "--train.max_tokens")  # a user's own budget replaces --steps
PHASES = ("data", "fwd_bwd", "comm", "optim")
PHASE_LABELS = {"data": "data wait", "fwd_bwd": "forward/backward", "comm": "exposed comm", "optim": "optimizer"}


class BenchError(ValueError):
    """A sweep that cannot run as asked; the message names the fix."""


@dataclass(frozen=True)
class ClusterSpec:
    kind: str  # "local" or "emulated"
    nodes: int = 1
    per_node: int = 0  # emulated: processes per node; local: 0 (all on this machine)
    link: str = ""
    latency: str = ""

    def describe(self) -> str:
        if self.kind == "local":
            return "this machine"
        if self.kind == "slurm":
            return f"SLURM allocation: {self.nodes} nodes x {self.per_node} processes"
        lat = f", {self.latency} latency" if self.latency else ""
        return f"emulated cluster: {self.nodes} nodes x {self.per_node} processes, {self.link} links{lat}"


def parse_cluster(text: str) -> ClusterSpec:
    """`local`, `emulated:NODESxPER_NODE:RATE[:LATENCY]` (e.g. `emulated:4x2:10gbit:50us`) or
    `slurm:NODESxPER_NODE` (job steps of the SLURM allocation the sweep runs in)."""
    if text in ("", "local"):
        return ClusterSpec("local")
    m = re.fullmatch(r"slurm:(\d+)x(\d+)", text.strip().lower())
    if m:
        if int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise BenchError(f"--cluster {text!r}: nodes and processes per node must be >= 1")
        return ClusterSpec("slurm", int(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r"emulated:(\d+)x(\d+):([0-9.]+[kmg]?bit)(?::([0-9.]+(?:us|ms)))?", text.strip().lower())
    if not m:
        raise BenchError(
            f"--cluster {text!r} is not understood; use local, emulated:NODESxPER_NODE:RATE[:LATENCY] (for example "
            "emulated:4x2:10gbit or emulated:2x2:1gbit:100us) or slurm:NODESxPER_NODE inside an allocation"
        )
    nodes, per_node = int(m.group(1)), int(m.group(2))
    if nodes < 1 or per_node < 1:
        raise BenchError(f"--cluster {text!r}: nodes and processes per node must be >= 1")
    return ClusterSpec("emulated", nodes, per_node, m.group(3), m.group(4) or "")


@dataclass(frozen=True)
class Layout:
    devices: int
    nodes: int
    per_node: int


def layouts(devices: list[int], spec: ClusterSpec) -> list[Layout]:
    """Where each size runs: on one node while it fits, else on whole nodes."""
    if not devices or any(n < 1 for n in devices):
        raise BenchError(f"--devices must list positive counts, e.g. 1,2,4,8; got {devices}")
    if sorted(set(devices)) != list(devices):
        raise BenchError(f"--devices must be increasing and without repeats, got {','.join(map(str, devices))}")
    if spec.kind == "local":
        return [Layout(n, 1, n) for n in devices]
    # Emulated or SLURM nodes: fill one node, then whole nodes.
    out = []
    for n in devices:
        if n <= spec.per_node:
            out.append(Layout(n, 1, n))
        elif n % spec.per_node == 0 and n // spec.per_node <= spec.nodes:
            out.append(Layout(n, n // spec.per_node, spec.per_node))
        else:
            raise BenchError(
                f"{n} devices do not fill whole nodes of the {spec.describe()}; use sizes up to {spec.per_node} "
                f"or multiples of {spec.per_node} up to {spec.nodes * spec.per_node}"
            )
    return out


def batch_for(mode: str, devices: int, first: int, global_batch: int) -> int:
    """The global batch at `devices`: fixed (strong) or growing with the devices from `first` (weak)."""
    if mode == "strong":
        return global_batch
    if global_batch % first:
        raise BenchError(
            f"weak scaling keeps {global_batch} / {first} samples per device, which is not whole; "
            f"give --train.global_batch a multiple of {first}"
        )
    return global_batch // first * devices


@dataclass
class Point:
    layout: Layout
    global_batch: int
    run_dir: str
    summary: dict[str, Any] = field(default_factory=dict)

    def figure(self, key: str) -> float:
        value = self.summary.get(key)
        return float(value) if isinstance(value, int | float) else float("nan")

    @property
    def step_ms(self) -> float:
        return self.figure("steady_step_time_ms")

    @property
    def predicted_ms(self) -> float:
        return self.figure("predicted_step_time_ms")

    @property
    def unit(self) -> str:
        return "tokens" if "steady_tokens_per_second" in self.summary else "samples"

    @property
    def throughput(self) -> float:
        return self.figure(f"steady_{self.unit}_per_second")

    @property
    def per_sample(self) -> float:
        return self.throughput / self.figure("steady_samples_per_second")

    @property
    def predicted_throughput(self) -> float:
        return self.global_batch * self.per_sample / (self.predicted_ms / 1e3)


def efficiencies(points: list[Point], predicted: bool = False) -> list[float]:
    """Scaling efficiency (0..1) of each point against the first."""
    if not points:
        return []

    def thr(p: Point) -> float:
        return p.predicted_throughput if predicted else p.throughput

    base = points[0]
    return [thr(p) / (thr(base) * p.layout.devices / base.layout.devices) for p in points]


def rows(points: list[Point]) -> list[dict[str, Any]]:
    """One row per size: what was measured and what was predicted."""
    measured, predicted = efficiencies(points), efficiencies(points, predicted=True)
    out = []
    for p, eff, peff in zip(points, measured, predicted, strict=True):
        row: dict[str, Any] = {
            "devices": p.layout.devices,
            "nodes": p.layout.nodes,
            "global_batch": p.global_batch,
            "step_ms": p.step_ms,
            "predicted_step_ms": p.predicted_ms,
            "step_error_pct": 100 * (p.predicted_ms - p.step_ms) / p.step_ms,
            f"{p.unit}_per_second": p.throughput,
            f"predicted_{p.unit}_per_second": p.predicted_throughput,
            "efficiency_pct": 100 * eff,
            "predicted_efficiency_pct": 100 * peff,
            "efficiency_error_pp": 100 * (peff - eff),
        }
        for phase in PHASES:
            row[f"{phase}_ms"] = p.figure(f"time_{phase}_ms")
        for key in ("predicted_compute_ms", "predicted_comm_exposed_ms", "predicted_optimizer_ms", "mfu"):
            if key in p.summary:
                row[key] = p.summary[key]
        row["run_dir"] = p.run_dir
        out.append(row)
    return out


def _fmt(v: Any, digits: int = 1, suffix: str = "") -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:,.{digits}f}{suffix}"
    return str(v)


def markdown(table: list[dict[str, Any]], mode: str, title: str) -> str:
    unit = "tokens" if table and "tokens_per_second" in table[0] else "samples"
    head = [
        "devices",
        "nodes",
        "global batch",
        "step ms",
        "predicted ms",
        "error",
        f"{unit}/s",
        "efficiency",
        "predicted eff.",
        "data / fwd-bwd / comm / optim ms",
    ]
    lines = [f"# {title}", "", f"{mode} scaling; efficiency against {table[0]['devices']} device(s).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        phases = " / ".join(_fmt(r[f"{p}_ms"]) for p in PHASES)
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["devices"]),
                    str(r["nodes"]),
                    str(r["global_batch"]),
                    _fmt(r["step_ms"]),
                    _fmt(r["predicted_step_ms"]),
                    _fmt(r["step_error_pct"], suffix="%"),
                    _fmt(r[f"{unit}_per_second"], 0),
                    _fmt(r["efficiency_pct"], suffix="%"),
                    _fmt(r["predicted_efficiency_pct"], suffix="%"),
                    phases,
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def charts(table: list[dict[str, Any]], mode: str, out: Path, title: str) -> list[Path]:
    """throughput.png, efficiency.png and breakdown.png in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = "tokens" if "tokens_per_second" in table[0] else "samples"
    n = [r["devices"] for r in table]
    thr = [r[f"{unit}_per_second"] for r in table]
    pthr = [r[f"predicted_{unit}_per_second"] for r in table]
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ideal = [thr[0] * d / n[0] for d in n]
    ax.plot(n, ideal, "k--", label="ideal (linear)")
    ax.plot(n, thr, "o-", label="measured")
    if not all(math.isnan(v) for v in pthr):
        ax.plot(n, pthr, "s:", label="predicted")
    ax.set(xlabel="devices", ylabel=f"{unit}/s", title=f"{title}: {mode} scaling throughput", xticks=n)
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "throughput.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(n, [r["efficiency_pct"] for r in table], "o-", label="measured")
    peff = [r["predicted_efficiency_pct"] for r in table]
    if not all(math.isnan(v) for v in peff):
        ax.plot(n, peff, "s:", label="predicted")
    ax.axhline(100, color="k", ls="--", lw=1)
    ax.set(xlabel="devices", ylabel="scaling efficiency (%)", title=f"{title}: {mode} scaling efficiency", xticks=n)
    ax.set_ylim(0, max(110, *[v for v in peff if not math.isnan(v)], *[r["efficiency_pct"] for r in table]))
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "efficiency.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(table)
    labels = [str(d) for d in n]
    for phase in PHASES:
        values = [0.0 if math.isnan(r[f"{phase}_ms"]) else r[f"{phase}_ms"] for r in table]
        ax.bar(labels, values, bottom=bottom, label=PHASE_LABELS[phase])
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    pred = [r["predicted_step_ms"] for r in table]
    if not all(math.isnan(v) for v in pred):
        ax.plot(labels, pred, "kD", label="predicted step")
    ax.set(xlabel="devices", ylabel="ms per step", title=f"{title}: step time breakdown")
    ax.legend(fontsize="small")
    paths.append(_save(fig, out / "breakdown.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _drop_option(args: list[str], names: tuple[str, ...]) -> list[str]:
    """`args` without the options `names` (as --name=value or --name value)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0]
        if key in names:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def train_args(task: str, extra: list[str], point_batch: int, steps: int, run_dir: Path) -> list[str]:
    """The arguments of `linscale train` for one point of the sweep."""
    own = ("--train.global_batch", "--train.global_batch_tokens", "--log.dir", "--nproc-per-node", "--log.progress")
    args = [task, *_drop_option(extra, own)]
    if not any(a.split("=", 1)[0] in BUDGETS for a in extra):
        args.append(f"--train.max_steps={steps}")
    return [
        *args,
        f"--train.global_batch={point_batch}",
        f"--log.dir={run_dir}",
        "--log.progress=false",
        "--checkpoint.interval=0",
        "--checkpoint.at_end=false",
        "--checkpoint.resume=none",
    ]


def srun_command(layout: Layout, args: list[str]) -> list[str]:
    """One job step of the allocation: a task per process, each a linscale worker (runtime/topology.py
    reads its rank from SLURM, the rendezvous port from the job and step)."""
    return [
        "srun",
        f"--nodes={layout.nodes}",
        f"--ntasks={layout.devices}",
        f"--ntasks-per-node={layout.per_node}",
        "--kill-on-bad-exit=1",
        sys.executable,
        "-m",
        "linscale",
        "train",
        *args,
        # A lone task launches like a plain command (its node's default process count): one process.
        *(["--nproc-per-node=1"] if layout.devices == 1 else []),
    ]


class Runner:
    """Runs one `linscale train` per point: here, or on the nodes of an emulated cluster."""

    def __init__(self, spec: ClusterSpec, log, timeout: float, master_port: int = 29811) -> None:
        self.spec, self.log, self.timeout, self.port = spec, log, timeout, master_port
        self.cluster = None

    def __enter__(self) -> Runner:
        if self.spec.kind == "slurm" and not os.environ.get("SLURM_JOB_ID"):
            raise BenchError(
                "--cluster slurm:... runs each size as a job step of the allocation it runs in; start the sweep "
                "inside one: salloc --nodes=N --ntasks-per-node=P linscale bench scaling ... (or in an sbatch script)"
            )
        if self.spec.kind == "emulated":
            from linscale.cluster.netns import Cluster, check_host

            check_host()
            name = f"bench{uuid.uuid4().hex[:4]}"
            subnet = f"10.214.{100 + int(uuid.uuid4().hex[:2], 16) % 150}.0/24"
            self.cluster = Cluster.up(
                self.spec.nodes, self.spec.link, latency=self.spec.latency or None, name=name, subnet=subnet
            )
        return self

    def __exit__(self, *exc) -> None:
        if self.cluster is not None:
            self.cluster.down()
            self.cluster = None

    def run(self, layout: Layout, args: list[str], log_path: Path) -> int:
        with open(log_path, "w") as log:
            if self.spec.kind == "slurm":
                cmd = srun_command(layout, args)
                try:
                    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=self.timeout).returncode
                except subprocess.TimeoutExpired:
                    return 124
            if self.cluster is None:
                cmd = [sys.executable, "-m", "linscale", "train", *args, f"--nproc-per-node={layout.per_node}"]
                try:
                    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=self.timeout).returncode
                except subprocess.TimeoutExpired:
                    return 124
            from linscale.cluster.netns import node_command

            self.port += 1  # a fresh port per run: the last one may linger in TIME_WAIT
            c, port = self.cluster, self.port
            node_args = [*args, f"--nproc-per-node={layout.per_node}"]
            result = c.run(
                lambda r: node_command("train", node_args, layout.nodes, r, c.master_addr, port),
                node=list(range(layout.nodes)),
                timeout=self.timeout,
                stdout=log,
                stderr=log,
            )
            return result.returncode


def sweep(
    task: str,
    extra: list[str],
    devices: list[int],
    mode: str,
    spec: ClusterSpec,
    global_batch: int,
    steps: int,
    out: Path,
    timeout: float,
    progress: bool = True,
) -> list[Point]:
    """Run every point and return them with their summaries; a failed point stops the sweep."""
    from tqdm import tqdm

    plan = layouts(devices, spec)
    out.mkdir(parents=True, exist_ok=True)
    points = []
    bar = tqdm(total=len(plan), desc="scaling sweep", unit="run", disable=not progress, file=sys.stderr)
    with Runner(spec, bar.write, timeout) as runner:
        for layout in plan:
            batch = batch_for(mode, layout.devices, plan[0].devices, global_batch)
            run_dir = out / "runs" / f"{layout.devices:03d}-devices"
            bar.set_postfix_str(f"{layout.devices} device(s), global batch {batch}")
            log = out / "runs" / f"{layout.devices:03d}-devices.log"
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            code = runner.run(layout, train_args(task, extra, batch, steps, run_dir), log)
            summary_file = run_dir / "summary.json"
            if code != 0 or not summary_file.exists():
                tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:]) if log.exists() else ""
                raise BenchError(
                    f"the run on {layout.devices} device(s) failed (exit {code}); its log {log} ends:\n{tail}"
                )
            points.append(Point(layout, batch, str(run_dir), json.loads(summary_file.read_text())))
            bar.update(1)
    bar.close()
    return points


def write_report(points: list[Point], mode: str, spec: ClusterSpec, task: str, out: Path) -> dict[str, Any]:
    """scaling.md, scaling.json and the charts; returns the JSON written."""
    table = rows(points)
    title = f"{task} on {spec.describe()}"
    (out / "scaling.md").write_text(markdown(table, mode, title))
    pngs = charts(table, mode, out, task)
    report = {
        "task": task,
        "mode": mode,
        "cluster": asdict(spec),
        "rows": table,
        "charts": [p.name for p in pngs],
    }
    tmp = out / f".scaling.json.{os.getpid()}"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "scaling.json")
    return report
