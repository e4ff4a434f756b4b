"""train.target_loss: stop at the first evaluation at or below a target, on every rank at the same step."""

import math

import pytest

from .conftest import TINY_GPT

pytestmark = pytest.mark.dist

# 8 samples of 32 tokens per step: max_tokens=2048 is a budget of 8 steps (and the cosine schedule's length).
BUDGET = [
    "--nproc-per-node=2",
    "--train.global_batch=8",
    "--train.max_steps=0",
    "--train.max_tokens=2048",
    "--train.eval_every=2",
    "--train.eval_batches=2",
    "--train.log_every=4",
    "--optim.warmup_steps=2",
]


def _evals(run) -> dict[int, float]:
    return {m["step"]: m["eval_loss"] for m in run.metrics() if "eval_loss" in m}


def test_target_stops_at_the_first_evaluation_at_or_below_it(linscale):
    # An unreachable target: the run uses its whole token budget and says so.
    ref = linscale("train", "gpt", *TINY_GPT, *BUDGET, "--train.target_loss=0.001", timeout=180)
    assert ref.returncode == 0, ref.output
    s = ref.summary()
    assert s["train_steps"] == 8 and s["train_tokens"] == 2048
    assert s["target_loss"] == 0.001 and s["target_reached"] is False
    assert s["steps_to_target"] is None and s["time_to_target"] is None and s["tokens_to_target"] is None
    evals = _evals(ref)
    assert list(evals) == [2, 4, 6, 8]
    # Perplexity of a token task's evaluation, in metrics.jsonl and the summary.
    ppl = [m["eval_perplexity"] for m in ref.metrics() if "eval_loss" in m]
    assert ppl == pytest.approx([math.exp(v) for v in evals.values()], rel=1e-12)
    assert s["eval_perplexity"] == pytest.approx(math.exp(s["eval_loss"]), rel=1e-12)

    # A target between the evaluations of steps 4 and 6 must stop the same run right after step 6.
    assert evals[2] > evals[4] > evals[6], evals
    target = (evals[4] + evals[6]) / 2
    run = linscale("train", "gpt", *TINY_GPT, *BUDGET, f"--train.target_loss={target!r}", timeout=180)
    assert run.returncode == 0, run.output
    s = run.summary()
    assert s["target_reached"] is True and s["steps_to_target"] == 6 and s["train_steps"] == 6
    assert s["tokens_to_target"] == 6 * 8 * 32
    assert 0 < s["time_to_target"] <= s["train_runtime"]
    assert list(_evals(run)) == [2, 4, 6]
    assert _evals(run)[6] == pytest.approx(evals[6], rel=1e-4)
    # The loss of the steps before the stop is reduced and logged although step 6 is no log step.
    assert [m["step"] for m in run.metrics() if "train_loss" in m] == [2, 4, 6]
    assert "<= train.target_loss" in run.stdout


PROBE = '''
import os
from pathlib import Path

import torch
from torch import nn

import linscale


class Probe(linscale.Task):
    """Evaluation loss = mean of the rank's eval samples + 40 / steps trained.

    Rank 0 holds eval samples near 0 and rank 1 samples near 32, so each rank's own loss is far
    from the mean over both: a decision taken on a rank's own loss would stop the ranks at
    different steps (and hang or fail the job)."""

    tokens_per_sample = 4

    def build_model(self):
        return nn.Linear(1, 1)

    def train_data(self, shard):
        self.rank, self.steps = shard.rank, 0
        return torch.utils.data.TensorDataset(torch.ones(64, 1))

    def eval_data(self, shard):
        # Each rank evaluates its own slice (rank 0 the first two samples, rank 1 the next two).
        return torch.utils.data.TensorDataset(torch.tensor([0.0, 1.0] + [32.0, 33.0] * 31).unsqueeze(1))

    def flops_per_sample(self):
        return 1.0  # no counting pass, which would call loss once more

    def loss(self, model, batch):
        (x,) = batch
        if model.training:
            self.steps += 1
            with open(Path(os.environ["LINSCALE_TEST_OUT"]) / f"rank{self.rank}.txt", "a") as f:
                f.write(f"{self.steps}\\n")
            return model(x).pow(2).mean()
        return model(x).mean() * 0 + x.mean() + 40.0 / self.steps
'''


def test_every_rank_stops_at_the_same_step_on_the_reduced_loss(linscale, tmp_path):
    task = tmp_path / "probe.py"
    task.write_text(PROBE)
    out = tmp_path / "out"
    out.mkdir()
    run = linscale(
        "train",
        f"{task}:Probe",
        "--nproc-per-node=2",
        "--train.global_batch=4",
        "--train.max_steps=40",
        "--train.eval_every=1",
        "--train.eval_batches=1",
        "--train.target_loss=25",
        "--optim.schedule=constant",
        "--runtime.timeout=60",
        "--log.progress=false",
        # The probe records every call of its loss; the run's prediction would trace it too.
        "--runtime.profile=off",
        env={"LINSCALE_TEST_OUT": str(out)},
        timeout=120,
    )
    assert run.returncode == 0, run.output
    # Eval samples 0, 1 on rank 0 and 32, 33 on rank 1: the mean loss is 16.5 + 40/s, <= 25 first at s = 5
    # (rank 0's own loss 0.5 + 40/s would stop it at step 2; rank 1's own 32.5 + 40/s never).
    s = run.summary()
    assert s["steps_to_target"] == 5 and s["train_steps"] == 5 and s["tokens_to_target"] == 5 * 4 * 4
    assert s["eval_loss"] == pytest.approx(16.5 + 40 / 5)
    for rank in (0, 1):
        assert (out / f"rank{rank}.txt").read_text().split() == [str(i) for i in range(1, 6)], rank


def test_target_without_evaluation_is_refused_before_spawning(linscale):
    run = linscale("train", "gpt", *TINY_GPT, "--train.max_steps=5", "--train.eval_every=0", "--train.target_loss=2")
    assert run.returncode != 0
    assert "set train.eval_every=N" in run.output
    assert "Traceback" not in run.output
