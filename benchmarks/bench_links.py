"""All-reduce bus bandwidth on emulated links, next to the link rate.

Brings up a 2-node emulated cluster (`linscale cluster up`) for each link rate, runs
`linscale doctor` on it (one process per node), and reports the all-reduce bus bandwidth
(nccl-tests definition) of a 32 MiB all-reduce, the median of several repeats, and its ratio
to the link rate: how close gloo gets to the wire. Needs root (network namespaces).

    python benchmarks/bench_links.py [--rates 1gbit 10gbit --repeats 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "lsbench"
SUBNET = "10.213.250.0/24"


def linscale(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "linscale", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def rate_bits(text: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, scale in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise SystemExit(f"unknown rate {text!r}; use for example 1gbit or 500mbit")


def measure(rate: str, tmp: Path, i: int) -> float:
    up = linscale("cluster", "up", "--nodes", "2", "--link", rate, "--name", NAME, "--subnet", SUBNET)
    if up.returncode != 0:
        raise SystemExit(f"cluster up failed:\n{up.stderr}")
    try:
        out = tmp / f"doctor-{rate}-{i}.json"
        run = linscale(
            "cluster",
            "doctor",
            "--name",
            NAME,
            "--",
            "--nproc-per-node=1",
            f"--output={out}",
            "--max-bytes=33554432",
            "--budget=1.0",
        )
        if run.returncode != 0:
            raise SystemExit(f"doctor failed on {rate}:\n{run.stdout}\n{run.stderr}")
        # The largest size: small transfers fit in the shaper's burst bucket and briefly
        # exceed the link rate, which is not what a training step sees.
        return json.loads(out.read_text())["sweep"][-1]["busbw"] * 8
    finally:
        linscale("cluster", "down", "--name", NAME)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_links: skipped, it needs root for network namespaces (run as root or with sudo)")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rate in args.rates:
            values = []
            for i in range(args.repeats):
                values.append(measure(rate, Path(tmp), i))
                print(f"{rate:>8} repeat {i + 1}/{args.repeats}: busbw {values[-1] / 1e9:.3f} Gbit/s", flush=True)
            rows.append((rate, statistics.median(values)))
    print("***** benchmark: all-reduce bus bandwidth on emulated links (2 nodes x 1 process, gloo) *****")
    print(f"  command = python benchmarks/bench_links.py --rates {' '.join(args.rates)} --repeats {args.repeats}")
    print("  link      busbw (Gbit/s, median)   busbw / link rate")
    for rate, busbw in rows:
        print(f"  {rate:<8}  {busbw / 1e9:>22.3f}   {busbw / rate_bits(rate):>17.2f}")


if __name__ == "__main__":
    main()
