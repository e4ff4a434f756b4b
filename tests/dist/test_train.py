"""End-to-end multi-process training on gloo, as a user runs it."""

import math
import tomllib
from pathlib import Path

import pytest

from .conftest import TINY_GPT

pytestmark = pytest.mark.dist

STEPS = ["--train.max_steps=20", "--train.log_every=1", "--train.eval_every=0", "--optim.warmup_steps=5"]


def _rel_close(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b) == 20
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))
    assert worst <= rel, f"loss trajectories differ by up to {worst:.2e} (allowed {rel:.0e})\n{a}\n{b}"


def test_two_processes_and_accumulation_follow_one_process(linscale):
    common = ["train", "gpt", *TINY_GPT, *STEPS, "--train.global_batch=16"]
    ref = linscale(*common, "--nproc-per-node=1")
    assert ref.returncode == 0, ref.output
    two = linscale(*common, "--nproc-per-node=2", "--train.micro_batch=8")
    assert two.returncode == 0, two.output
    accum = linscale(*common, "--nproc-per-node=2", "--train.micro_batch=2")
    assert accum.returncode == 0, accum.output

    assert two.summary()["batch"] == "16 = 8 x 1 x 2"
    assert accum.summary()["batch"] == "16 = 2 x 4 x 2"
    # The loss must actually move, or equal trajectories would prove nothing.
    assert ref.losses()[-1] < ref.losses()[0] - 0.5
    _rel_close(two.losses(), ref.losses(), 1e-4)
    # Accumulation 4 x micro-batch 2 on each replica equals micro-batch 8.
    _rel_close(accum.losses(), two.losses(), 1e-4)


def test_ranks_read_disjoint_samples_covering_the_epoch_once(linscale, tmp_path):
    out = tmp_path / "seen"
    out.mkdir()
    # 64 samples, global batch 8: 8 steps are exactly one epoch.
    run = linscale(
        "train",
        "tests/dist/tasks.py:Recorder",
        "--nproc-per-node=2",
        "--train.global_batch=8",
        "--train.micro_batch=2",
        "--train.max_steps=8",
        "--log.progress=false",
        env={"LINSCALE_TEST_OUT": str(out)},
    )
    assert run.returncode == 0, run.output
    seen = {}
    for rank in (0, 1):
        lines = (out / f"rank{rank}.txt").read_text().split()
        seen[rank] = [int(v) for v in lines]
        assert len(seen[rank]) == 32
    assert not set(seen[0]) & set(seen[1]), "two ranks trained on the same sample"
    assert sorted(seen[0] + seen[1]) == list(range(64))


def test_run_directory_holds_config_versions_metrics_and_tensorboard(linscale):
    run = linscale(
        "train",
        "gpt",
        *TINY_GPT,
        "--train.max_steps=6",
        "--train.log_every=2",
        "--train.eval_every=4",
        "--nproc-per-node=2",
        "--train.global_batch=8",
    )
    assert run.returncode == 0, run.output
    cfg = tomllib.loads((run.run_dir / "config.toml").read_text())
    assert cfg["train"]["max_steps"] == 6 and cfg["task"]["d_model"] == 64
    info = (run.run_dir / "run.json").read_text()
    assert '"torch"' in info and '"git"' in info
    steps = [m["step"] for m in run.metrics() if "train_loss" in m]
    assert steps == [2, 4, 6]
    # Periodic evaluation, and once more at the end.
    assert [m["step"] for m in run.metrics() if "eval_loss" in m] == [4, 6]
    assert list((run.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    summary = run.summary()
    for key in (
        "train_runtime",
        "train_samples",
        "train_samples_per_second",
        "train_steps_per_second",
        "train_loss",
        "train_tokens_per_second",
        "achieved_tflops",
        "mfu",
        "time_data_ms",
        "time_fwd_bwd_ms",
        "time_comm_ms",
        "time_optim_ms",
    ):
        assert key in summary, key
    assert summary["train_samples"] == 48 and summary["world_size"] == 2
    assert 0 < summary["mfu"] < 1.5
    assert "***** train metrics *****" in run.stdout
    # One progress bar and one summary: only rank 0 reports.
    assert run.stdout.count("***** train metrics *****") == 1


def test_max_time_and_max_tokens_stop_every_rank(linscale):
    timed = linscale(
        "train",
        "gpt",
        *TINY_GPT,
        "--nproc-per-node=2",
        "--train.global_batch=8",
        "--train.max_steps=0",
        "--train.max_time=3",
        "--optim.schedule=constant",
    )
    assert timed.returncode == 0, timed.output
    s = timed.summary()
    assert s["train_steps"] >= 1
    assert s["train_runtime"] - s.get("eval_runtime", 0) < 3 + 5 * s["steady_step_time_ms"] / 1e3 + 1
    # 32 tokens per sample, 8 samples per step: 1000 tokens need ceil(1000 / 256) = 4 steps.
    tokens = linscale(
        "train",
        "gpt",
        *TINY_GPT,
        "--nproc-per-node=1",
        "--train.global_batch=8",
        "--train.max_steps=0",
        "--train.max_tokens=1000",
    )
    assert tokens.returncode == 0, tokens.output
    assert tokens.summary()["train_steps"] == math.ceil(1000 / 256)


def test_under_torchrun_linscale_does_not_spawn_again(linscale, tmp_path):
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "torchrun"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "linscale",
            "train",
            "gpt",
            *TINY_GPT,
            "--train.max_steps=3",
            "--train.global_batch=8",
            f"--log.dir={run_dir}",
        ],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (run_dir / "summary.json").read_text()
    assert '"world_size": 2' in summary
    assert proc.stdout.count("***** train metrics *****") == 1


def test_example_task_trains(linscale):
    run = linscale(
        "train",
        "examples/spirals.py:Spirals",
        "--nproc-per-node=2",
        "--train.max_steps=150",
        "--train.eval_every=0",
        "--log.progress=false",
    )
    assert run.returncode == 0, run.output
    losses = run.losses()
    assert losses[-1] < 0.8 * losses[0]


def test_bf16_mixed_precision_trains(linscale):
    run = linscale(
        "train",
        "gpt",
        *TINY_GPT,
        "--runtime.precision=bf16-mixed",
        "--nproc-per-node=1",
        "--train.global_batch=8",
        "--train.max_steps=4",
        "--train.log_every=1",
    )
    assert run.returncode == 0, run.output
    assert run.summary()["precision"] == "bf16-mixed"
    assert all(math.isfinite(v) for v in run.losses())
