"""Every run predicts itself: the summary's predicted step time and memory beside the measured ones,
the automatic micro-batch and the LR scaling rule, in one 2-process run as a user runs it."""

import json

import pytest

from .conftest import TINY_GPT

pytestmark = pytest.mark.dist


def test_auto_micro_batch_lr_rule_and_predictions_in_the_summary(linscale):
    run = linscale("train", "gpt", *TINY_GPT, "--nproc-per-node=2", "--train.max_steps=12", "--train.global_batch=16",
                   "--train.micro_batch=auto", "--optim.lr=1e-3", "--optim.lr_scaling=linear", "--optim.base_batch=8",
                   "--parallel.strategy=zero2", "--checkpoint.at_end=false", "--runtime.profile=auto")  # fmt: skip
    assert run.returncode == 0, run.output
    meta = json.loads((run.run_dir / "run.json").read_text())
    # A tiny model fits whole on a host: the whole share of 8 per replica, no accumulation.
    assert meta["batch"] == {"global": 16, "micro": 8, "accum": 1, "replicas": 2}
    assert "train.micro_batch=auto: 8" in run.stdout
    assert meta["lr"] == pytest.approx(2e-3)  # 1e-3 x 16 / 8
    assert "linear rule" in run.stdout
    s = run.summary()
    assert s["prediction_profile"].startswith("this machine")
    assert s["predicted_step_time_ms"] > 0 and s["predicted_compute_ms"] > 0
    # The summary's error is the prediction against this run's measurement.
    want = 100 * (s["predicted_step_time_ms"] - s["steady_step_time_ms"]) / s["steady_step_time_ms"]
    assert s["step_time_error_pct"] == pytest.approx(want)
    # Model states are predicted per rank as zero2 shards them: within 1% of what the ranks hold.
    measured = sum(s[f"model_state_{k}_mb"] for k in ("params", "grads", "optimizer"))
    assert s["predicted_model_state_mb"] == pytest.approx(measured, rel=0.01)
    assert abs(s["model_state_error_pct"]) < 1
    assert s["prediction_efficiency_source"].startswith("default")


def test_a_run_calibrates_the_next_runs_compute(linscale):
    args = ["train", "gpt", *TINY_GPT, "--train.global_batch=8", "--checkpoint.at_end=false", "--runtime.profile=auto"]
    args += ["--nproc-per-node=1", "--train.micro_batch=8"]
    s = linscale(*args, "--train.max_steps=10").summary()
    # Nothing calibrated this configuration yet: the typical efficiency, and this run records what it reached.
    assert s["prediction_efficiency_source"].startswith("default") and s["prediction_efficiency"] == 0.5
    assert 0 < s["calibrated_efficiency"] <= 1.5
    # The next run of the same configuration predicts its compute at that efficiency: exactly the
    # forward/backward time the first run measured.
    again = linscale(*args, "--train.max_steps=6").summary()
    assert again["prediction_efficiency_source"].startswith("calibrated")
    assert again["prediction_efficiency"] == pytest.approx(s["calibrated_efficiency"])
    assert again["predicted_compute_ms"] == pytest.approx(s["time_fwd_bwd_ms"], rel=1e-6)
    # Another configuration (micro-batch) is not calibrated by it.
    other = linscale(*args, "--train.max_steps=2", "--train.micro_batch=2").summary()
    assert other["prediction_efficiency_source"].startswith("default")
