"""The image task end to end: the digits to 90% with no arguments, every strategy on 2 processes
equal to 1 process, loader workers that change nothing, corrupt files skipped and named once."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.dist

SMALL = [
    "--runtime.precision=fp32", "--log.progress=false", "--train.global_batch=32", "--train.max_steps=12",
    "--train.log_every=1", "--train.eval_every=0", "--optim.warmup_steps=3", "--log.save_model=true",
    "--task.depth=2", "--task.width=32", "--task.mlp_dim=64", "--checkpoint.at_end=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    from linscale.data.digits import write_digits

    return write_digits(tmp_path_factory.mktemp("data") / "digits")


def test_train_image_with_no_arguments_reaches_90_percent_on_the_digits(linscale, tmp_path):
    run = linscale("train", "image", cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.output
    s = run.summary()
    assert s["eval_top1"] >= 0.90, s
    assert s["eval_top5"] >= s["eval_top1"]
    # The whole test split is evaluated, and the digits were written where the docs say.
    assert (tmp_path / "runs" / "data" / "digits" / "digits.json").is_file()
    evals = [m for m in run.metrics() if "eval_top1" in m]
    assert len(evals) >= 2 and evals[-1]["eval_top1"] == pytest.approx(s["eval_top1"])


@pytest.fixture(scope="module")
def reference(digits_dir, tmp_path_factory):
    """One process, no loader workers: what every 2-process run must reproduce."""
    import json
    import subprocess
    import sys

    run_dir = tmp_path_factory.mktemp("reference")
    args = ["train", "image", f"--task.data={digits_dir}", *SMALL, "--nproc-per-node=1", "--train.loader_workers=0"]
    proc = subprocess.run([sys.executable, "-m", "linscale", *args, f"--log.dir={run_dir}"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    return losses, torch.load(run_dir / "model.pt")


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3", "hsdp"])
def test_every_strategy_on_two_processes_equals_one_process(linscale, digits_dir, reference, strategy):
    # One loader worker per process: decoding and augmentation move to another process and the
    # batches stay the same, since each sample's augmentation depends on (seed, epoch, index) only.
    run = linscale("train", "image", f"--task.data={digits_dir}", *SMALL, "--nproc-per-node=2",
                   f"--parallel.strategy={strategy}", "--train.loader_workers=1")  # fmt: skip
    assert run.returncode == 0, run.output
    losses, params = reference
    got = run.losses()
    assert len(got) == len(losses) == 12
    worst = max(abs(a - b) / b for a, b in zip(got, losses, strict=True))
    assert worst < 1e-5, f"losses differ by {worst:.2e}"
    final = torch.load(run.run_dir / "model.pt")
    diff = max((final[k] - params[k]).abs().max().item() for k in params)
    assert diff < 1e-5, f"final parameters differ by up to {diff:.2e}"
    assert run.summary()["strategy"] == strategy


def test_resnet_with_activation_checkpointing_trains_on_two_processes(linscale, digits_dir):
    run = linscale("train", "image", f"--task.data={digits_dir}", *SMALL, "--nproc-per-node=2",
                   "--task.size=resnet:tiny", "--parallel.activation_checkpointing=full",
                   "--train.eval_batches=2")  # fmt: skip
    assert run.returncode == 0, run.output
    s = run.summary()
    assert s["train_steps"] == 12 and 0 <= s["eval_top1"] <= 1 and "eval_top5" in s


def test_corrupt_images_are_skipped_counted_and_named_once(linscale, digits_dir, tmp_path):
    data = tmp_path / "digits"
    shutil.copytree(digits_dir, data)
    bad = [sorted((data / "train" / d).iterdir())[0] for d in ("3", "7")]
    for path in bad:
        path.write_bytes(path.read_bytes()[:30])  # truncated
    gray = sorted((data / "train" / "1").iterdir())[0]
    Image.open(gray).convert("RGBA").save(gray)  # another mode: converted, not refused
    # Enough steps that both files are met more than once, by both processes and their workers.
    run = linscale("train", "image", f"--task.data={data}", *SMALL, "--nproc-per-node=2", "--train.max_steps=60",
                   "--train.loader_workers=1", "--train.global_batch=64")  # fmt: skip
    assert run.returncode == 0, run.output
    for path in bad:
        warned = [line for line in run.output.splitlines() if "skipping unreadable image" in line and str(path) in line]
        assert len(warned) == 1, run.output
    assert "2 unreadable image(s) were skipped" in run.output
    from linscale.data.images import read_bad_file_reports

    assert set(read_bad_file_reports(run.run_dir / "bad-images")) == {str(p) for p in bad}


def test_packed_shards_train_exactly_like_the_folder_tree(linscale, digits_dir, reference, tmp_path):
    packed = tmp_path / "packed"
    run = linscale("preprocess", str(digits_dir), "--out", str(packed), "--nproc-per-node=2", "--no-progress")
    assert run.returncode == 0, run.output
    # The digits' own settings, which a packed copy does not imply.
    run = linscale("train", "image", f"--task.data={packed}", *SMALL, "--nproc-per-node=1", "--task.image_size=16",
                   "--task.crop_scale=0.8", "--task.flip=0", "--train.loader_workers=1")  # fmt: skip
    assert run.returncode == 0, run.output
    losses, params = reference
    assert run.losses() == losses
    final = torch.load(run.run_dir / "model.pt")
    assert all(torch.equal(final[k], params[k]) for k in params)


def test_killed_image_run_with_mixup_resumes_bit_identical(linscale_bg, digits_dir, tmp_path):
    # Mixup and CutMix draw from each process's generator, which the checkpoint restores; the
    # augmentation of each sample depends on (seed, epoch, index), which the resumed sampler keeps.
    args = ["train", "image", f"--task.data={digits_dir}", *SMALL, "--nproc-per-node=2", "--task.mixup=0.4",
            "--task.cutmix=1.0", "--train.loader_workers=1", "--checkpoint.interval=3"]  # fmt: skip
    ref_bg = linscale_bg(*args, run_dir=tmp_path / "ref")
    killed_bg = linscale_bg(*args, run_dir=tmp_path / "run", env={"LINSCALE_TEST_KILL_AT_STEP": "1:7"})
    ref, killed = ref_bg.finish(), killed_bg.finish()
    assert ref.returncode == 0, ref.output
    assert killed.returncode != 0, killed.output
    resumed = linscale_bg(*args, run_dir=killed.run_dir).finish()
    assert resumed.returncode == 0, resumed.output
    assert resumed.summary()["resumed_from_step"] == 6
    assert resumed.losses() == ref.losses()
    final, expected = torch.load(resumed.run_dir / "model.pt"), torch.load(ref.run_dir / "model.pt")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
