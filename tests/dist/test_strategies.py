"""Every strategy trains the same model as one process: losses and final parameters."""

import pytest
import torch

from .conftest import TINY_GPT

pytestmark = pytest.mark.dist

COMMON = [
    "train", "gpt", *TINY_GPT, "--train.max_steps=20", "--train.log_every=1", "--train.global_batch=16",
    "--optim.warmup_steps=5", "--log.save_model=true",
]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, no strategy: the model every strategy must reproduce."""
    import subprocess
    import sys
    from pathlib import Path

    run_dir = tmp_path_factory.mktemp("reference")
    proc = subprocess.run([sys.executable, "-m", "linscale", *COMMON, "--nproc-per-node=1", f"--log.dir={run_dir}"],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    import json

    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    # Clipping must act in these runs, or equal results would not show a correct global norm.
    assert max(m["grad_norm"] for m in metrics if "grad_norm" in m) > 1.0
    return losses, torch.load(run_dir / "model.pt")


def _same_model(run, reference) -> None:
    losses, params = reference
    got = run.losses()
    assert len(got) == len(losses) == 20
    worst = max(abs(a - b) / b for a, b in zip(got, losses, strict=True))
    assert worst < 1e-4, f"losses differ by {worst:.2e}"
    final = torch.load(run.run_dir / "model.pt")
    assert final.keys() == params.keys()
    diff = max((final[k].float() - params[k].float()).abs().max().item() for k in params)
    assert diff < 1e-4, f"final parameters differ by up to {diff:.2e}"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3", "hsdp"])
def test_strategy_reproduces_one_process(linscale, reference, strategy, world):
    run = linscale(*COMMON, f"--nproc-per-node={world}", f"--parallel.strategy={strategy}")
    assert run.returncode == 0, run.output
    summary = run.summary()
    assert summary["strategy"] == strategy and summary["world_size"] == world
    _same_model(run, reference)


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_activation_checkpointing_changes_nothing_but_memory(linscale, reference, strategy):
    run = linscale(*COMMON, "--nproc-per-node=2", f"--parallel.strategy={strategy}",
                   "--parallel.activation_checkpointing=full")  # fmt: skip
    assert run.returncode == 0, run.output
    _same_model(run, reference)


def test_sharded_states_shrink_with_the_number_of_processes(linscale):
    mb = {}
    for strategy in ("ddp", "zero1", "zero2", "zero3"):
        run = linscale(*COMMON, "--nproc-per-node=4", f"--parallel.strategy={strategy}", "--train.max_steps=2",
                       "--log.save_model=false")  # fmt: skip
        assert run.returncode == 0, run.output
        s = run.summary()
        mb[strategy] = (s["model_state_params_mb"], s["model_state_grads_mb"], s["model_state_optimizer_mb"])
    params, grads, optim = mb["ddp"]
    # zero1 shards the optimizer states; zero2 also the gradients; zero3 everything (a quarter
    # each, give or take the padding of uneven shards).
    assert mb["zero1"][0] == params and mb["zero1"][1] == grads
    # ZeRO-1 hands out whole tensors, so the fullest rank holds a little more than a quarter.
    assert mb["zero1"][2] == pytest.approx(optim / 4, rel=0.2)
    for strategy in ("zero2", "zero3"):
        assert mb[strategy][1] == pytest.approx(grads / 4, rel=0.1)
        assert mb[strategy][2] == pytest.approx(optim / 4, rel=0.1)
    assert mb["zero3"][0] == pytest.approx(params / 4, rel=0.1)
