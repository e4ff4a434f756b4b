"""Predictions checked against measurements on an emulated cluster: 4 nodes x 2 ranks on 10 Gbit/s
links, each rank's compute replaced by the waits of an emulated device, the communication real.
One `linscale bench scaling` sweep per strategy (ddp, zero3) writes the charts and the table; the
test checks the files, the table against each run's own summary, and the predictions against the
measurements at 1 and 8 devices (4 nodes). benchmarks/bench_prediction.py measures every strategy's
errors at 1, 2 and 8 devices as medians of repeats (BENCHMARKS.md). Needs root (network namespaces)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import skip_reason

pytestmark = [pytest.mark.cluster, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]

ROOT = Path(__file__).resolve().parents[2]
# 3.2M parameters (12 MiB of fp32 gradients) on 16-token windows: little real compute per rank,
# a gradient exchange that matters at 10 Gbit/s.
MODEL = ["--task.n_layer=4", "--task.d_model=256", "--task.n_head=4", "--task.block_size=16",
         "--task.corpus_mb=0.5", "--task.sample_tokens=0", "--runtime.precision=fp32"]  # fmt: skip
STEP_TOLERANCE_PCT = 15
# The 5 points hold for the medians of repeats (benchmarks/bench_prediction.py, BENCHMARKS.md:
# 4.2 points at worst). A single run's 8-device step varies by about 5% on a 2-core machine (one CI
# run measured ddp at 507.7 ms where the medians are 525-556 ms: -6.2 points), so a single sweep is
# held to 8 points.
EFFICIENCY_TOLERANCE_PP = 8


def sweep(tmp_path: Path, strategy: str, devices: str) -> tuple[Path, dict]:
    out = tmp_path / strategy
    cmd = [sys.executable, "-m", "linscale", "bench", "scaling", "gpt", f"--devices={devices}", "--mode=weak",
           "--cluster=emulated:4x2:10gbit", "--steps=16", f"--out={out}", "--timeout=240", *MODEL,
           "--train.global_batch=4", "--train.eval_batches=1", "--runtime.emulate_tflops=0.003",
           "--parallel.bucket_mb=4", f"--parallel.strategy={strategy}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "***** scaling sweep *****" in proc.stdout
    return out, json.loads((out / "scaling.json").read_text())


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_bench_scaling_predicts_the_emulated_cluster(tmp_path, strategy):
    devices = "1,8"
    out, report = sweep(tmp_path, strategy, devices)
    for name in ("throughput.png", "efficiency.png", "breakdown.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = (out / "scaling.md").read_text()
    rows = report["rows"]
    assert [r["devices"] for r in rows] == [int(n) for n in devices.split(",")]
    assert [r["nodes"] for r in rows][-1] == 4
    base = rows[0]
    for r in rows:
        s = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        # The table is the runs' own figures.
        assert s["world_size"] == r["devices"] and r["global_batch"] == 4 * r["devices"]
        assert r["step_ms"] == pytest.approx(s["steady_step_time_ms"])
        assert r["predicted_step_ms"] == pytest.approx(s["predicted_step_time_ms"])
        assert f"| {r['devices']} | {r['nodes']} | {r['global_batch']} | {r['step_ms']:,.1f} |" in table
        assert r["efficiency_pct"] == pytest.approx(
            100 * s["steady_tokens_per_second"] / (base["tokens_per_second"] * r["devices"] / base["devices"])
        )
        # The emulation held: the ranks' real compute stayed inside the emulated time.
        assert s["emulation_slowdown"] < 1.1, s
        # The predictions: step time within 15%, weak-scaling efficiency within 8 points (one run).
        assert abs(r["step_error_pct"]) <= STEP_TOLERANCE_PCT, r
        assert abs(r["efficiency_error_pp"]) <= EFFICIENCY_TOLERANCE_PP, r
