"""`linscale doctor`: pre-flight checks on every process of a job (see cluster/doctor.py)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from linscale.cli.common import add_launch_args, check_launcher, error, launch_spec, role, run_as_worker
from linscale.runtime import topology
from linscale.runtime.launch import LaunchError, spawn


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="check rendezvous, devices, all-reduce bandwidth and links before a job",
        description="Run on every node as a job would (same launch options as train). Measures each "
        "device's matrix-product rate, all-reduce latency and bus bandwidth over a range of sizes, and the "
        "bandwidth between every pair of nodes; names slow devices, nodes and links with the fix to try.",
    )
    add_launch_args(p)
    p.add_argument("--min-bytes", type=int, default=4 * 1024, help="smallest all-reduce (default: 4 KiB)")
    p.add_argument("--max-bytes", type=int, default=16 * 2**20, help="largest all-reduce (default: 16 MiB)")
    p.add_argument("--pair-bytes", type=int, default=4 * 2**20, help="all-reduce size between node pairs")
    p.add_argument("--budget", type=float, default=0.5, help="seconds to spend on each measurement")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a collective may take")
    p.add_argument("--output", default="", help="JSON report (default: runs/doctor-<time>.json)")
    p.set_defaults(func=run_cli)


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "linscale" / "doctor.json"


def run_cli(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    if rest:
        return error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        if role(args) == "worker":
            return run_as_worker(lambda: _checks(args), (ValueError, LaunchError))
        from linscale.runtime.device import local_device_count

        spec = launch_spec(args, args.nproc_per_node or local_device_count())
        check_launcher(spec)
        output = args.output or f"runs/doctor-{time.strftime('%Y%m%d-%H%M%S')}.json"
        worker_argv = argv if args.output else [*argv, f"--output={output}"]
        spawn(spec, worker_argv, log_dir=str(Path(output).with_suffix("")) + "-workers")
        return 0
    except (ValueError, LaunchError) as e:
        return error(str(e))
    except KeyboardInterrupt:
        return error("interrupted")


def _checks(args: argparse.Namespace) -> None:
    from linscale.cluster import doctor
    from linscale.runtime import device as devmod
    from linscale.runtime import dist as ldist

    topo = topology.detect()
    device = devmod.resolve("auto", topo.local_rank, 0, topo.local_world_size)
    t0 = time.perf_counter()
    ldist.init(topo, device, args.timeout)
    try:
        report = doctor.run_checks(
            topo, device, time.perf_counter() - t0, args.min_bytes, args.max_bytes, args.pair_bytes, args.budget
        )
        if topo.is_main:
            print(doctor.format_report(report), flush=True)
            for path in (Path(args.output), cache_path()):
                doctor.save(report, path)
            print(f"  report saved to {args.output} and {cache_path()}", flush=True)
    finally:
        ldist.shutdown()
