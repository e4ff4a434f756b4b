"""Weak scaling from 1 to 2 emulated nodes on a 1gbit link: plain DDP against linscale's best setting.

A 2-node emulated cluster (network namespaces, each node's link shaped to --link) trains the
built-in gpt task, one process per node, with the same per-node batch as a 1-node baseline.
Weak-scaling efficiency = steady tokens/s of 2 nodes / (2 x steady tokens/s of 1 node).

The two cores of the machine are shared out: each emulated node is pinned to its own core
(`taskset`), so a node has one core for compute and communication, like a one-device node. The
baseline is the same command on node 0 alone, pinned to core 0: the same per-node compute,
nothing to communicate (one process trains without DDP). A control runs two independent 1-node
jobs at once, one per core: the efficiency the machine allows with no communication at all
(memory bandwidth, caches, the hypervisor).

Runs of the settings alternate (their order rotates every repeat) and each figure is the median
over repeats. The machine may be shared: each run counts the CPU time used by other processes
while it ran and is repeated (after waiting for a quiet machine) when they took more than
--max-foreign of a core.

    python benchmarks/bench_scaling.py [--repeats 3 --steps 40 --link 1gbit]
    python benchmarks/bench_scaling.py --explore    # every candidate setting, to find the best

Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "lsscale"
SUBNET = "10.213.251.0/24"
PORT = 29820

# 2-node settings: name -> extra arguments. "ddp" is plain DDP with default settings; BEST is the
# setting the exploration picked (see BENCHMARKS.md).
CANDIDATES: dict[str, list[str]] = {
    "ddp": [],
    "ddp bucket 4": ["--parallel.bucket_mb=4"],
    "ddp bucket 100": ["--parallel.bucket_mb=100"],
    "bf16 hook": ["--parallel.comm_hook=bf16"],
    "bf16 hook bucket 4": ["--parallel.comm_hook=bf16", "--parallel.bucket_mb=4"],
    "bf16 hook bucket 2": ["--parallel.comm_hook=bf16", "--parallel.bucket_mb=2"],
    "bf16 hook bucket 1": ["--parallel.comm_hook=bf16", "--parallel.bucket_mb=1"],
    "fp16 hook": ["--parallel.comm_hook=fp16"],
    # PowerSGD's warm-up (exact steps) is 2 here so that the steady steps measure the compressed steady state.
    "powersgd r2": ["--parallel.comm_hook=powersgd", "--parallel.powersgd_rank=2", "--parallel.powersgd_warmup=2"],
    "powersgd r1": ["--parallel.comm_hook=powersgd", "--parallel.powersgd_rank=1", "--parallel.powersgd_warmup=2"],
    "powersgd r4": ["--parallel.comm_hook=powersgd", "--parallel.powersgd_rank=4", "--parallel.powersgd_warmup=2"],
    "powersgd r8": ["--parallel.comm_hook=powersgd", "--parallel.powersgd_rank=8", "--parallel.powersgd_warmup=2"],
    "accum 2": ["--train.micro_batch=HALF"],
    "hsdp": ["--parallel.strategy=hsdp"],
    "hsdp bf16 reduce": ["--parallel.strategy=hsdp", "--parallel.reduce_dtype=bf16"],
    "zero2": ["--parallel.strategy=zero2"],
}
BEST = "bf16 hook"


def clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / clock_ticks()


def our_seconds() -> float:
    """CPU seconds of the processes this benchmark started and waited for (children and theirs)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime + own.ru_utime + own.ru_stime


def wait_quiet(limit: float, seconds: int, max_wait: float = 900) -> float:
    """Wait until other processes use less than `limit` of a core for `seconds` in a row; returns the
    seconds waited. A test suite running beside the benchmark has short gaps between its tests, so
    a few seconds of quiet do not mean that it has ended."""
    start = time.monotonic()
    quiet = 0
    while time.monotonic() - start < max_wait:
        b0, o0 = busy_seconds(), our_seconds()
        time.sleep(1.0)
        foreign = (busy_seconds() - b0) - (our_seconds() - o0)
        quiet = quiet + 1 if foreign < limit else 0
        if quiet >= seconds:
            break
    return time.monotonic() - start


class Bench:
    def __init__(self, args, tmp: Path) -> None:
        self.args, self.tmp, self.count = args, tmp, 0
        self.cluster = None
        self.disturbed = 0
        self.last_loss: dict[str, float] = {}

    def common(self, nodes: int) -> list[str]:
        a = self.args
        return [
            "gpt",
            f"--task.d_model={a.d_model}",
            f"--task.n_layer={a.n_layer}",
            f"--task.n_head={a.n_head}",
            f"--train.micro_batch={a.micro_batch}",
            f"--train.global_batch={a.micro_batch * nodes}",
            f"--train.max_steps={a.steps}",
            "--train.eval_every=0",
            "--train.eval_batches=1",
            "--optim.warmup_steps=5",
            "--runtime.precision=fp32",
            "--task.sample_tokens=0",
            "--log.progress=false",
            "--nproc-per-node=1",
        ]

    def command(self, setting: str, nodes: int, run_dir: Path) -> list[str]:
        extra = [x.replace("HALF", str(self.args.micro_batch // 2)) for x in CANDIDATES.get(setting, [])]
        # Later options win, so a setting's --train.micro_batch replaces the default one.
        return [*self.common(nodes), *extra, f"--log.dir={run_dir}"]

    def _run_once(self, setting: str) -> float | tuple[float, float]:
        from linscale.cluster.netns import node_command

        c, py = self.cluster, sys.executable
        self.count += 1
        out = io.StringIO()
        pin = lambda core, argv: ["taskset", "-c", str(core), *argv]  # noqa: E731
        dirs = [self.tmp / f"run{self.count}-{i}" for i in range(2)]
        if setting == "1 node":
            argv = pin(0, [py, "-m", "linscale", "train", *self.command(setting, 1, dirs[0])])
            result = c.run(argv, node=0, timeout=600, stdout=out, stderr=out)
        elif setting == "control":
            # Two independent 1-node jobs at once, each on its own node and core: no communication.
            result = c.run(lambda r: pin(r, [py, "-m", "linscale", "train", *self.command(setting, 1, dirs[r])]),
                           timeout=600, stdout=out, stderr=out)  # fmt: skip
        else:
            args = self.command(setting, 2, dirs[0])
            result = c.run(lambda r: pin(r, node_command("train", args, 2, r, c.addr(0), PORT)),
                           timeout=600, stdout=out, stderr=out)  # fmt: skip
        if result.returncode != 0:
            sys.exit(f"benchmark run {setting!r} failed:\n{out.getvalue()[-4000:]}")
        values = [json.loads((d / "summary.json").read_text())["steady_tokens_per_second"] for d in dirs if d.exists()]
        # The loss logged last (the mean of the last log_every steps): a compressing setting that hurt
        # training would show here against ddp's, which trains on the same samples.
        metrics = [json.loads(line) for line in (dirs[0] / "metrics.jsonl").read_text().splitlines()]
        self.last_loss[setting] = [m["train_loss"] for m in metrics if "train_loss" in m][-1]
        return (values[0], values[1]) if setting == "control" else values[0]

    def run(self, setting: str):
        """One measurement of `setting`, repeated when other processes took CPU time while it ran."""
        limit = self.args.max_foreign
        for _ in range(4):
            waited = wait_quiet(limit, self.args.quiet_seconds)
            b0, o0, t0 = busy_seconds(), our_seconds(), time.monotonic()
            value = self._run_once(setting)
            foreign = ((busy_seconds() - b0) - (our_seconds() - o0)) / (time.monotonic() - t0)
            if foreign < limit:
                return value, foreign, waited
            self.disturbed += 1
            print(f"    ({setting}: other processes used {foreign:.2f} core(s) meanwhile; measuring again)", flush=True)
        return value, foreign, waited  # the machine never stayed quiet: keep the last, flagged in the output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--link", default="1gbit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=16, help="samples per node per step")
    ap.add_argument("--settings", nargs="+", default=["ddp", BEST], help=f"2-node settings: {', '.join(CANDIDATES)}")
    ap.add_argument("--explore", action="store_true", help="measure every candidate setting")
    ap.add_argument("--no-control", action="store_true", help="leave out the two-independent-jobs control")
    ap.add_argument("--max-foreign", type=float, default=0.15, help="cores other processes may use during a run")
    ap.add_argument("--quiet-seconds", type=int, default=10, help="quiet seconds to wait for before each run")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_scaling: skipped, it needs root for network namespaces (run as root or with sudo)")
        return
    if args.micro_batch % 2:
        sys.exit("--micro-batch must be even (the accumulation candidate halves it)")
    settings = list(CANDIDATES) if args.explore else args.settings
    unknown = [s for s in settings if s not in CANDIDATES]
    if unknown:
        sys.exit(f"unknown setting(s) {unknown}: choose from {', '.join(CANDIDATES)}")
    order = ["1 node", *([] if args.no_control else ["control"]), *settings]

    from linscale.cluster.netns import Cluster, down

    results: dict[str, list] = {name: [] for name in order}
    foreign: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        down(NAME)  # whatever an interrupted earlier run left behind (found by its name pattern)
        bench = Bench(args, Path(tmp))
        bench.cluster = Cluster.up(2, args.link, name=NAME, subnet=SUBNET, directory=state)
        try:
            for i in range(args.repeats):
                k = i % len(order)  # rotate, so no setting always runs first or after the same one
                for name in order[k:] + order[:k]:
                    value, other, _ = bench.run(name)
                    results[name].append(value)
                    foreign.append(other)
                    shown = " + ".join(f"{v:,.0f}" for v in value) if isinstance(value, tuple) else f"{value:,.0f}"
                    print(f"repeat {i + 1}/{args.repeats} {name:20s} {shown:>16} tokens/s", flush=True)
        finally:
            bench.cluster.down()

    one = statistics.median(results["1 node"])
    med = {name: statistics.median(v) for name, v in results.items() if name not in ("1 node", "control")}
    a = args
    chosen = "--explore" if a.explore else "--settings " + " ".join(f"'{s}'" for s in settings)
    print(f"***** benchmark: weak scaling, 1 -> 2 emulated nodes, {a.link} link, 1 process and core per node *****")
    print(
        f"  command      = python benchmarks/bench_scaling.py --link {a.link} --repeats {a.repeats} "
        f"--steps {a.steps} --d-model {a.d_model} --n-layer {a.n_layer} --micro-batch {a.micro_batch} {chosen}"
    )
    print(f"  model        = gpt, width {a.d_model}, {a.n_layer} layers, context 128, fp32, {a.micro_batch} per node")
    runs = ", ".join(f"{v:,.0f}" for v in results["1 node"])
    print(f"  1 node       = {one:,.0f} tokens/s (median of {runs})")
    if "control" in results:
        sums = [x + y for x, y in results["control"]]
        runs = ", ".join(f"{x:,.0f}+{y:,.0f}" for x, y in results["control"])
        print(
            f"  control      = efficiency {statistics.median(sums) / (2 * one):.3f} with no communication "
            f"(two independent 1-node jobs at once, tokens/s: {runs})"
        )
    for name, value in med.items():
        runs = ", ".join(f"{v:,.0f}" for v in results[name])
        extra = " ".join(x.replace("HALF", str(a.micro_batch // 2)) for x in CANDIDATES[name]) or "defaults"
        # The machine's speed drifts between repeats: each repeat's 2-node run is also divided by
        # the 1-node run of the same repeat, and the median of those paired ratios is given too.
        paired = [v / (2 * o) for v, o in zip(results[name], results["1 node"], strict=True)]
        print(
            f"  {name:12s} = efficiency {value / (2 * one):.3f} (paired by repeat: median "
            f"{statistics.median(paired):.3f} of {', '.join(f'{x:.3f}' for x in paired)}): {value:,.0f} tokens/s "
            f"(median of {runs}); last loss {bench.last_loss[name]:.4f} [{extra}]"
        )
    print(
        f"  other processes used at most {max(foreign):.2f} core(s) during a kept run; "
        f"runs measured again because of them: {bench.disturbed}"
    )


if __name__ == "__main__":
    main()
