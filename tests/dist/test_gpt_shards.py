"""The gpt task on token shards (`--task.data`), in two processes, as a user runs it."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from linscale.data.shards import token_dtype, write_index, write_shard
from linscale.data.tokenizer import Tokenizer, train_bpe

from .conftest import TINY_GPT

pytestmark = pytest.mark.dist

STEPS = [
    "--nproc-per-node=2",
    "--train.max_steps=20",
    "--train.global_batch=16",
    "--train.log_every=1",
    "--train.eval_every=10",
    "--train.eval_batches=2",
    "--optim.warmup_steps=5",
]


def corpus_texts(limit: int = 300_000) -> list[str]:
    """About `limit` characters of the standard library's source, one text per file, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for path in sorted((root / "json").glob("*.py")) + sorted((root / "email").glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text)
        if size >= limit:
            break
    return texts


def write_bpe_shards(out: Path, vocab_size: int = 320) -> Tokenizer:
    """A finished preprocess output built by hand: BPE tokens, documents ended by EOS, train and val."""
    texts = corpus_texts()
    tok = train_bpe(texts, vocab_size)
    tok.save(out / "tokenizer.json")
    docs = [np.array([*ids, tok.eos_id]) for ids in tok.encode_batch(texts)]
    dtype = token_dtype(tok.vocab_size)
    val, train = docs[:1], docs[1:]
    half = len(train) // 2
    splits = {
        "train": [
            write_shard(out, "train/a.bin", np.concatenate(train[:half]), dtype),
            write_shard(out, "train/b.bin", np.concatenate(train[half:]), dtype),
        ],
        "val": [write_shard(out, "val/a.bin", np.concatenate(val), dtype)],
    }
    write_index(
        out,
        {
            "format": "linscale-shards",
            "version": 1,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "tokenizer": "tokenizer.json",
            "splits": splits,
        },
    )
    return tok


def check_trained(run, vocab_size: int) -> None:
    assert run.returncode == 0, run.output
    losses = run.losses()
    assert len(losses) == 20
    # Starts near ln(vocab) (a uniform guess) and falls.
    assert abs(losses[0] - np.log(vocab_size)) < 0.5, losses
    assert losses[-1] < losses[0] - 0.5, losses
    summary = run.summary()
    assert summary["world_size"] == 2
    # Time spent waiting for data (memory-mapped shards) is measured and shown in the summary block.
    assert 0 <= summary["time_data_pct"] <= 100
    assert "time_data_pct" in run.output
    assert any("eval_loss" in m for m in run.metrics()), "the val split was not evaluated"


def test_gpt_trains_on_token_shards_in_two_processes(linscale, tmp_path):
    data = tmp_path / "shards"
    tok = write_bpe_shards(data)
    run = linscale("train", "gpt", *TINY_GPT, *STEPS, f"--task.data={data}", "--task.sample_tokens=16", timeout=300)
    check_trained(run, tok.vocab_size)
    # The sample is decoded with the directory's tokenizer: BPE pieces, not raw bytes.
    assert "generated sample:" in run.output


def test_missing_data_directory_fails_before_workers_start(linscale, tmp_path):
    run = linscale("train", "gpt", *TINY_GPT, *STEPS, f"--task.data={tmp_path / 'nowhere'}", timeout=120)
    assert run.returncode != 0
    assert "task.data=" in run.output and "run `linscale preprocess" in run.output
    assert "Traceback" not in run.output
    assert not (run.run_dir / "workers").exists()  # the launcher stopped before spawning


def test_preprocess_then_train(linscale, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(corpus_texts()):
        (corpus / f"doc{i:02d}.txt").write_text(text)
    out = tmp_path / "shards"
    prep = linscale(
        "preprocess",
        str(corpus),
        f"--out={out}",
        "--tokenizer=bpe",
        "--vocab-size=320",
        "--val-fraction=0.2",
        "--no-progress",
        "--nproc-per-node=1",
        timeout=180,
    )
    assert prep.returncode == 0, prep.output
    assert (out / "index.json").is_file() and (out / "tokenizer.json").is_file()
    run = linscale("train", "gpt", *TINY_GPT, *STEPS, f"--task.data={out}", timeout=300)
    check_trained(run, Tokenizer.load(out / "tokenizer.json").vocab_size)
