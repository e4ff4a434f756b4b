"""`linscale bench scaling TASK`: a scaling sweep with charts, a table and the predictions beside."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from linscale.cli.common import error

STEPS = 30


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure how a task scales: charts, a table and predictions beside",
        description="Benchmarks of a task. `linscale bench scaling TASK --devices 1,2,4,8 --mode weak` trains "
        "TASK at each size (on this machine or on an emulated cluster it brings up and removes), and writes "
        "throughput.png, efficiency.png, breakdown.png, scaling.md and scaling.json with each run's predicted "
        "step time beside the measured one. Other arguments go to `linscale train`.",
    )
    kinds = p.add_subparsers(dest="bench", metavar="KIND", required=True)
    s = kinds.add_parser(
        "scaling",
        help="strong or weak scaling over device counts",
        description="Strong scaling keeps the global batch; weak scaling keeps the batch per device "
        "(--train.global_batch is the batch at the first size). Arguments not listed here go to "
        "`linscale train` (for example --parallel.strategy=zero3 --runtime.emulate_tflops=0.5 --task.size=...).",
    )
    s.add_argument("task", help="the task, as for `linscale train`")
    s.add_argument("--devices", default="1,2", help="device (process) counts, increasing (default: 1,2)")
    s.add_argument("--mode", choices=("strong", "weak"), default="weak", help="scaling mode (default: weak)")
    s.add_argument(
        "--cluster",
        default="local",
        help="local (processes on this machine, the default), emulated:NODESxPER_NODE:RATE[:LATENCY], e.g. "
        "emulated:4x2:10gbit (needs root: network namespaces), or slurm:NODESxPER_NODE: each size a job step "
        "(srun) of the SLURM allocation the sweep runs in",
    )
    s.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps per run (default: {STEPS})")
    s.add_argument("--out", default="", help="output folder (default: runs/scaling-<task>-<time>)")
    s.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take (default: 900)")
    s.add_argument("--config", help="a TOML file of settings, as for `linscale train`")
    s.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    from linscale import config as lconfig
    from linscale.cli.train import prepare
    from linscale.perf import bench
    from linscale.task import TaskError
    from linscale.train.metrics import format_summary

    try:
        devices = [int(x) for x in args.devices.split(",") if x.strip()]
    except ValueError:
        return error(f"--devices takes counts separated by commas, e.g. 1,2,4,8; got {args.devices!r}")
    try:
        spec = bench.parse_cluster(args.cluster)
        bench.layouts(devices, spec)
        if args.steps < 10:
            raise bench.BenchError(f"--steps {args.steps} leaves no steady state to measure; use 10 or more")
        # The settings as `linscale train` resolves them; the sweep sets the step budget itself.
        budget = [] if any(a.split("=")[0] in bench.BUDGETS for a in rest) else [f"--train.max_steps={args.steps}"]
        _, cfg = prepare(argparse.Namespace(task=args.task, config=args.config, resume=None), [*rest, *budget])
        if cfg.train.global_batch_tokens:
            raise bench.BenchError("give the sweep's batch as --train.global_batch (samples), not in tokens")
        extra = list(rest) + ([f"--config={args.config}"] if args.config else [])
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path(args.out or f"runs/scaling-{Path(args.task.split(':')[-1]).stem}-{stamp}")
        for n in devices:
            bench.batch_for(args.mode, n, devices[0], cfg.train.global_batch)
        t0 = time.perf_counter()
        points = bench.sweep(
            args.task, extra, devices, args.mode, spec, cfg.train.global_batch, args.steps, out, args.timeout
        )
        report = bench.write_report(points, args.mode, spec, args.task, out)
    except (bench.BenchError, lconfig.ConfigError, TaskError, ValueError) as e:
        return error(str(e))
    except KeyboardInterrupt:
        return error("interrupted")
    print((out / "scaling.md").read_text())
    last = report["rows"][-1]
    errors = [abs(r["step_error_pct"]) for r in report["rows"]]
    print(
        format_summary(
            {
                "cluster": spec.describe(),
                "mode": args.mode,
                "sizes": ",".join(map(str, devices)),
                f"efficiency_at_{last['devices']}_pct": last["efficiency_pct"],
                f"predicted_efficiency_at_{last['devices']}_pct": last["predicted_efficiency_pct"],
                "max_step_prediction_error_pct": max(errors),
                "sweep_seconds": time.perf_counter() - t0,
                "output": str(out),
                "charts": ", ".join(report["charts"]),
            },
            title="scaling sweep",
        )
    )
    return 0
