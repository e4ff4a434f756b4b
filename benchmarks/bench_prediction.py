"""How far the predictor is from the measurement: step time and weak-scaling efficiency per strategy.

Each repeat is one `linscale bench scaling` sweep per strategy on an emulated cluster of 4 nodes x 2
processes with 10 Gbit/s links, every rank's compute replaced by the waits of an emulated
0.003 TFLOP/s device (`runtime.emulate_tflops`), the communication real gloo over the shaped links.
Every run's summary holds its own prediction (`predicted_step_time_ms`, from the model's traced
FLOPs and memory, the emulated speed and the job's all-reduce probe). The table gives, per strategy
and size, the median over repeats of the measured and predicted step time and scaling efficiency,
and the errors. Repeats alternate the strategies, so a busy moment of the machine hits all alike.

    python benchmarks/bench_prediction.py [--repeats 3 --strategies ddp,zero1,zero2,zero3]

Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--task.n_layer=4", "--task.d_model=256", "--task.n_head=4", "--task.block_size=16",
         "--task.corpus_mb=0.5", "--task.sample_tokens=0", "--runtime.precision=fp32"]  # fmt: skip


def sweep(strategy: str, devices: str, out: Path, steps: int, tflops: float) -> list[dict]:
    cmd = [sys.executable, "-m", "linscale", "bench", "scaling", "gpt", f"--devices={devices}", "--mode=weak",
           "--cluster=emulated:4x2:10gbit", f"--steps={steps}", f"--out={out}", *MODEL, "--train.global_batch=4",
           "--train.eval_batches=1", f"--runtime.emulate_tflops={tflops}", "--parallel.bucket_mb=4",
           f"--parallel.strategy={strategy}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} sweep failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads((out / "scaling.json").read_text())["rows"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strategies", default="ddp,zero1,zero2,zero3")
    ap.add_argument("--devices", default="1,2,8")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tflops", type=float, default=0.003)
    args = ap.parse_args()
    strategies = args.strategies.split(",")
    runs: dict[str, list[list[dict]]] = {s: [] for s in strategies}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-prediction-") as tmp:
        for r in range(args.repeats):
            order = strategies[r % len(strategies) :] + strategies[: r % len(strategies)]
            for s in order:
                print(f"repeat {r + 1}/{args.repeats}: {s} ...", file=sys.stderr, flush=True)
                runs[s].append(sweep(s, args.devices, Path(tmp) / f"{s}-{r}", args.steps, args.tflops))
    print(f"\n## Prediction error on the emulated cluster ({args.repeats} repeats, median)\n")
    print("| strategy | devices | step ms measured | predicted | error | efficiency measured | predicted | error |")
    print("|---|---|---|---|---|---|---|---|")
    worst_step = worst_eff = 0.0
    for s in strategies:
        for i, row in enumerate(runs[s][0]):

            def med(key: str, i: int = i, s: str = s) -> float:
                return statistics.median(rep[i][key] for rep in runs[s])

            step, pred = med("step_ms"), med("predicted_step_ms")
            eff, peff = med("efficiency_pct"), med("predicted_efficiency_pct")
            err, eerr = 100 * (pred - step) / step, peff - eff
            worst_step, worst_eff = max(worst_step, abs(err)), max(worst_eff, abs(eerr))
            print(f"| {s} | {row['devices']} | {step:.1f} | {pred:.1f} | {err:+.1f}% | {eff:.1f}% | {peff:.1f}% | "
                  f"{eerr:+.1f} pp |")  # fmt: skip
    print(f"\nworst step-time error {worst_step:.1f}% (target 15%), worst efficiency error {worst_eff:.1f} pp "
          f"(target 5 pp); {time.perf_counter() - t0:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
