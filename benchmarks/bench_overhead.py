"""linscale's training throughput against a hand-written PyTorch DDP loop, side by side.

Both train the built-in gpt task's model on the same data with the same settings (2 processes,
gloo, fp32, the same global batch, AdamW, clipping and schedule). Runs alternate between the
two so that machine noise hits both alike; each run reports its steady-state tokens per
second (warm-up steps excluded, evaluation excluded); the figure is the median over repeats.

    python benchmarks/bench_overhead.py [--repeats 5 --steps 60 --nproc 2]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from linscale.train.metrics import warmup_steps

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"benchmark run failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def raw(args) -> float:
    out = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.nproc}",
            str(ROOT / "benchmarks" / "raw_ddp.py"),
            f"--steps={args.steps}",
            f"--warmup={args.warmup}",
        ]
    )
    line = [ln for ln in out.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)["raw_tokens_per_second"]


def linscale(args, tmp: Path, i: int) -> float:
    run_dir = tmp / f"linscale{i}"
    run(
        [
            sys.executable,
            "-m",
            "linscale",
            "train",
            "gpt",
            f"--nproc-per-node={args.nproc}",
            f"--train.max_steps={args.steps}",
            "--train.eval_every=0",
            "--train.eval_batches=1",
            "--runtime.precision=fp32",
            "--task.sample_tokens=0",
            "--log.progress=false",
            f"--log.dir={run_dir}",
        ]
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["steady_tokens_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    args.warmup = warmup_steps(args.steps)  # the same steps linscale leaves out
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results: dict[str, list[float]] = {"raw": [], "linscale": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            # Alternate the order so neither side always runs on a warmer machine.
            order = ("raw", "linscale") if i % 2 == 0 else ("linscale", "raw")
            for name in order:
                value = raw(args) if name == "raw" else linscale(args, Path(tmp), i)
                results[name].append(value)
                print(f"repeat {i + 1}/{args.repeats} {name:8s} {value:10,.0f} tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["linscale"] / med["raw"]
    print("***** benchmark: linscale vs raw DDP *****")
    print(
        f"  command            = python benchmarks/bench_overhead.py --repeats {args.repeats} "
        f"--steps {args.steps} --nproc {args.nproc}"
    )
    print(f"  raw_tokens_per_s   = {med['raw']:,.0f} (median of {args.repeats})")
    print(f"  linscale_tokens_/s = {med['linscale']:,.0f} (median of {args.repeats})")
    print(f"  ratio              = {ratio:.3f} (goal >= 0.98)")


if __name__ == "__main__":
    main()
