"""`linscale export`: a checkpoint of any strategy becomes one safetensors file that loads without linscale."""

import json

import pytest
import torch

from .conftest import TINY_GPT

RUN = [*TINY_GPT, "--train.max_steps=4", "--train.eval_every=0", "--log.save_model=true",
       "--task.tie_embeddings=true"]  # fmt: skip


@pytest.mark.parametrize("nproc, strategy", [(1, "ddp"), (2, "zero3")])
def test_export_loads_with_safetensors_alone_and_equals_the_trained_model(linscale, tmp_path, nproc, strategy):
    run = linscale("train", "gpt", *RUN, f"--parallel.strategy={strategy}", "--nproc-per-node", str(nproc))
    assert run.returncode == 0, run.output
    out = linscale("export", str(run.run_dir))
    assert out.returncode == 0, out.output
    assert "***** export *****" in out.stdout
    # The reader needs only safetensors and the model class: no process group, no linscale runtime.
    from safetensors.torch import load_model

    from linscale.models.gpt import GPT, GPTConfig

    desc = json.loads((run.run_dir / "export" / "config.json").read_text())
    assert desc["step"] == 4 and desc["model_class"] == "linscale.models.gpt.GPT"
    model = GPT(GPTConfig(**desc["model_config"]))
    load_model(model, str(run.run_dir / "export" / "model.safetensors"))
    trained = torch.load(run.run_dir / "model.pt", weights_only=True)
    state = model.state_dict()
    assert state.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(state[key], value), key
    assert model.lm_head is None  # tied: the output layer reads the embedding


def test_export_in_bf16_and_from_a_named_checkpoint(linscale, tmp_path):
    run = linscale("train", "gpt", *RUN, "--checkpoint.interval=2", "--checkpoint.keep_last=0")
    assert run.returncode == 0, run.output
    out = linscale("export", str(run.run_dir), "--checkpoint", str(run.run_dir / "checkpoints" / "step_00000002"),
                   "--dtype", "bf16", "--out", str(tmp_path / "exp"))  # fmt: skip
    assert out.returncode == 0, out.output
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "exp" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["step"] == 2


def test_export_of_a_run_without_checkpoints_says_what_to_do(linscale, tmp_path):
    run = linscale("train", "gpt", *RUN, "--checkpoint.at_end=false")
    assert run.returncode == 0, run.output
    out = linscale("export", str(run.run_dir))
    assert out.returncode == 2
    assert "no complete checkpoint" in out.stderr and "--checkpoint" in out.stderr
    not_a_run = linscale("export", str(tmp_path))
    assert not_a_run.returncode == 2 and "is not a run directory" in not_a_run.stderr
