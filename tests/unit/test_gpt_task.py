"""The built-in gpt task: named sizes, model options, and training on `linscale preprocess` shards."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from linscale.data.shards import ShardError, write_index, write_shard
from linscale.data.tokenizer import byte_tokenizer
from linscale.models.gpt import GPT, GPTConfig
from linscale.task import DataShard
from linscale.tasks.gpt import GPTTask, GPTTaskConfig

SHARD = DataShard(rank=0, size=1, seed=0)


def make_shards(
    root, train: list[np.ndarray], val: list[np.ndarray] | None = None, vocab_size: int = 257, tokenizer: bool = True
):
    """A finished preprocess output: shard files, index.json and (optionally) a byte tokenizer."""
    splits = {"train": [write_shard(root, f"train/{i}.bin", t, np.uint16) for i, t in enumerate(train)]}
    if val is not None:
        splits["val"] = [write_shard(root, f"val/{i}.bin", t, np.uint16) for i, t in enumerate(val)]
    if tokenizer:
        byte_tokenizer().save(root / "tokenizer.json")
    index = {
        "format": "linscale-shards",
        "version": 1,
        "dtype": "uint16",
        "vocab_size": vocab_size,
        "eos_id": vocab_size - 1,
        "tokenizer": "tokenizer.json",
        "splits": splits,
    }
    write_index(root, index)
    return root


def count_flops(task: GPTTask, model: torch.nn.Module, batch: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        task.loss(model, batch).backward()
    return counter.get_total_flops() / batch.shape[0]


# --- without task.data: the byte corpus, as before ---


def test_default_task_keeps_the_byte_model():
    task = GPTTask()
    assert task.model_cfg == GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, d_model=128)
    assert task.tokens_per_sample == 128
    assert task.flops_per_sample() == task.model_cfg.train_flops_per_token() * 128


def test_pos_and_tie_embeddings_reach_the_model():
    task = GPTTask(GPTTaskConfig(n_layer=1, n_head=2, d_model=16, block_size=8, pos="rotary", tie_embeddings=False))
    assert (task.model_cfg.pos, task.model_cfg.tie_embeddings) == ("rotary", False)
    model = task.build_model()
    assert model.pos_emb is None and model.lm_head is not None


def test_bad_pos_is_refused():
    with pytest.raises(ValueError, match="pos must be one of learned, rotary"):
        GPTTask(GPTTaskConfig(pos="alibi"))


# --- task.size ---


def test_gpt2_124m_with_a_gpt2_vocabulary_has_the_published_parameter_count(tmp_path):
    data = make_shards(tmp_path / "d", [np.arange(300) % 50257], vocab_size=50257, tokenizer=False)
    task = GPTTask(GPTTaskConfig(size="gpt2-124m", data=str(data), sample_tokens=0))
    cfg = task.model_cfg
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.block_size, cfg.vocab_size) == (12, 12, 768, 1024, 50257)
    assert cfg.num_params() == 124_439_808
    with torch.device("meta"):  # the real module, without allocating its weights
        model = task.build_model()
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


def test_size_wins_over_the_explicit_shape_but_not_block_size_or_tying():
    task = GPTTask(
        GPTTaskConfig(
            size="yuan-4.7b", n_layer=2, n_head=2, d_model=32, pos="learned", block_size=512, tie_embeddings=False
        )
    )
    cfg = task.model_cfg
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.pos) == (40, 24, 3072, "rotary")
    assert cfg.block_size == 2048  # the model keeps the size's context ...
    assert task.tokens_per_sample == 512  # ... and trains on windows of block_size
    assert cfg.tie_embeddings is False
    assert cfg.vocab_size == 256  # from the data (bytes here), not the size's 53,005


def test_block_size_longer_than_the_size_context_names_the_fix():
    with pytest.raises(ValueError, match=r"task.block_size=2048 .* task.size=gpt2-124m \(1024 tokens\); set task"):
        GPTTask(GPTTaskConfig(size="gpt2-124m", block_size=2048))


def test_unknown_size_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown task.size='gpt5'; known sizes: tiny, gpt2-124m"):
        GPTTask(GPTTaskConfig(size="gpt5"))


@pytest.mark.parametrize("pos", ["learned", "rotary"])
def test_flops_per_sample_match_the_counter_for_windows_shorter_than_the_context(pos, monkeypatch):
    from linscale.models import gpt as gpt_model

    # A small named size, so the model is cheap to run: context 64, windows of 24.
    small = dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, d_model=32, pos=pos)
    monkeypatch.setitem(gpt_model.SIZES, "small-test", small)
    task = GPTTask(GPTTaskConfig(size="small-test", block_size=24))
    assert task.model_cfg.block_size == 64
    model = task.build_model()
    batch = torch.randint(0, 256, (2, 25))
    assert task.flops_per_sample() == count_flops(task, model, batch)
    full = dataclasses.replace(task.model_cfg, block_size=24)
    assert task.flops_per_sample() == full.train_flops_per_token() * 24


def test_flops_per_sample_at_full_context_of_a_size():
    task = GPTTask(GPTTaskConfig(size="gpt2-124m", block_size=1024))
    assert task.flops_per_sample() == GPTConfig.named("gpt2-124m", vocab_size=256).train_flops_per_token() * 1024


# --- task.data ---


def test_train_windows_are_the_shard_tokens(tmp_path):
    parts = [np.arange(0, 50) % 257, np.arange(50, 85) % 257]  # two files: windows cross the boundary
    data = make_shards(tmp_path / "d", parts, val=[np.arange(40) % 257])
    task = GPTTask(GPTTaskConfig(data=str(data), block_size=16, n_layer=1, n_head=2, d_model=16))
    stream = np.concatenate(parts)
    windows = task.train_data(SHARD)
    assert len(windows) == (85 - 1) // 16
    for i in range(len(windows)):
        assert windows[i].tolist() == stream[i * 16 : i * 16 + 17].tolist()
    assert task.model_cfg.vocab_size == 257  # from the index
    val = task.eval_data(SHARD)
    assert val is not None and val[0].tolist() == list(range(17))
    # A batch goes through the model and the loss.
    batch = torch.stack([windows[0], windows[1]])
    assert torch.isfinite(task.loss(task.build_model(), batch))


def test_vocab_follows_the_index(tmp_path):
    data = make_shards(tmp_path / "d", [np.arange(100)], vocab_size=1000, tokenizer=False)
    task = GPTTask(GPTTaskConfig(data=str(data), block_size=8, sample_tokens=0))
    assert task.model_cfg.vocab_size == 1000
    assert task.flops_per_sample() == task.model_cfg.train_flops_per_token() * 8


@pytest.mark.parametrize("val", [None, [], [np.arange(8)]], ids=["no-split", "empty", "under-a-window"])
def test_no_usable_val_split_means_no_evaluation(tmp_path, val):
    data = make_shards(tmp_path / "d", [np.arange(100)], val=val)
    task = GPTTask(GPTTaskConfig(data=str(data), block_size=16))
    assert task.eval_data(SHARD) is None


def test_missing_data_directory_names_the_fix(tmp_path):
    with pytest.raises(ShardError, match=r"task.data='.*nowhere': no such directory; run `linscale preprocess"):
        GPTTask(GPTTaskConfig(data=str(tmp_path / "nowhere")))


def test_unfinished_data_directory_names_the_fix(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)  # shards being written, no index.json yet
    with pytest.raises(ShardError, match=r"task.data=.*no index.json: it is not a finished `linscale preprocess`"):
        GPTTask(GPTTaskConfig(data=str(tmp_path / "d")))


def test_missing_shard_file_is_reported_when_the_task_is_built(tmp_path):
    data = make_shards(tmp_path / "d", [np.arange(100)])
    (data / "train" / "0.bin").unlink()
    with pytest.raises(ShardError, match=r"task.data=.*shard .*0.bin is missing; rerun `linscale preprocess`"):
        GPTTask(GPTTaskConfig(data=str(data)))


def test_train_split_shorter_than_a_window_names_the_fix(tmp_path):
    data = make_shards(tmp_path / "d", [np.arange(10)])
    with pytest.raises(ShardError, match="fewer than one window .* lower the sequence length or preprocess more"):
        GPTTask(GPTTaskConfig(data=str(data), block_size=16))


def test_missing_tokenizer_is_reported_before_training(tmp_path):
    data = make_shards(tmp_path / "d", [np.arange(100)], tokenizer=False)
    with pytest.raises(ShardError, match="tokenizer.json does not exist.*--task.sample_tokens=0"):
        GPTTask(GPTTaskConfig(data=str(data), block_size=16))
    GPTTask(GPTTaskConfig(data=str(data), block_size=16, sample_tokens=0))  # no sample: no tokenizer needed


def test_final_report_decodes_with_the_data_tokenizer(tmp_path, monkeypatch):
    data = make_shards(tmp_path / "d", [np.arange(100)])
    task = GPTTask(GPTTaskConfig(data=str(data), block_size=8, n_layer=1, n_head=2, d_model=16, sample_tokens=6))
    torch.manual_seed(0)
    model = GPT(task.model_cfg)
    seen = []
    decode = task._tokenizer.decode
    monkeypatch.setattr(task._tokenizer, "decode", lambda ids: seen.append(list(ids)) or decode(ids))
    report = task.final_report(model)
    assert report.startswith("generated sample:\n")
    assert len(seen) == 1 and len(seen[0]) == 6 and all(0 <= i < 257 for i in seen[0])
    assert report == "generated sample:\n" + decode(seen[0])


def test_packed_images_given_to_the_gpt_task_are_named_as_such(tmp_path):
    import json

    (tmp_path / "index.json").write_text(json.dumps({"format": "linscale-image-shards", "kind": "images"}))
    with pytest.raises(ShardError, match="holds packed images, not token shards.*linscale train image"):
        GPTTask(GPTTaskConfig(data=str(tmp_path)))
