"""TokenWindows: packed windows, cheap pickling, DataLoader workers, StepSampler sharding."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from linscale.data.loader import TokenWindows
from linscale.data.shards import ShardError, ShardSet, token_dtype, write_index, write_shard
from linscale.train.batching import StepSampler, plan_batch


def make_set(out, sizes: list[int], vocab: int = 50000) -> tuple[ShardSet, np.ndarray]:
    """A train split of files with `sizes` tokens; returns the set and its whole stream."""
    rng = np.random.default_rng(len(sizes))
    dtype = token_dtype(vocab)
    parts = [rng.integers(1, vocab, n).astype(dtype) for n in sizes]
    entries = [write_shard(out, f"train/u{k:06d}.bin", p) for k, p in enumerate(parts)]
    index = {"format": "linscale-shards", "version": 1, "dtype": dtype.name, "vocab_size": vocab, "eos_id": 0}
    write_index(out, {**index, "tokenizer": "tokenizer.json", "splits": {"train": entries, "val": []}, "stats": {}})
    return ShardSet(out, "train"), np.concatenate(parts).astype(np.int64)


def test_windows_are_packed(tmp_path):
    shards, stream = make_set(tmp_path, [7, 3, 11, 1, 13])  # 35 tokens
    seq = 4
    ds = TokenWindows(shards, seq)
    assert len(ds) == (35 - 1) // seq == 8
    items = [ds[i] for i in range(len(ds))]
    for i, w in enumerate(items):
        assert w.dtype == torch.int64 and w.shape == (seq + 1,)
        np.testing.assert_array_equal(w.numpy(), stream[i * seq : i * seq + seq + 1])
    for a, b in zip(items, items[1:], strict=False):
        assert a[-1] == b[0]  # the last target is the next window's first input
    assert (torch.cat([w[:-1] for w in items]) != 0).all()  # no padding: all real tokens
    with pytest.raises(IndexError):
        ds[len(ds)]


@pytest.mark.parametrize("tokens,seq,windows", [(9, 4, 2), (8, 4, 1), (5, 4, 1), (10, 1, 9)])
def test_length_formula(tmp_path, tokens, seq, windows):
    shards, _ = make_set(tmp_path, [tokens])
    assert len(TokenWindows(shards, seq)) == windows


def test_too_short_is_an_error(tmp_path):
    shards, _ = make_set(tmp_path, [4, 4])
    TokenWindows(shards, 7)
    with pytest.raises(ShardError, match="8 tokens, fewer than one window of seq_len \\+ 1 = 9"):
        TokenWindows(shards, 8)


def test_pickles_small_and_reopens(tmp_path):
    shards, stream = make_set(tmp_path, [250_000] * 4)
    ds = TokenWindows(shards, 64)
    ds[3]  # maps opened in this process
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back[len(ds) - 1].numpy(), stream[(len(ds) - 1) * 64 : len(ds) * 64 + 1])


def test_dataloader_with_workers(tmp_path):
    shards, stream = make_set(tmp_path, [500, 300, 700])
    seq = 16
    ds = TokenWindows(shards, seq)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, shuffle=False)
    batches = list(loader)
    got = torch.cat(batches)
    assert got.shape == (len(ds), seq + 1)
    expected = np.stack([stream[i * seq : i * seq + seq + 1] for i in range(len(ds))])
    np.testing.assert_array_equal(got.numpy(), expected)


def test_step_sampler_ranks_split_the_step(tmp_path):
    shards, _ = make_set(tmp_path, [400, 600])
    ds = TokenWindows(shards, 8)
    one = StepSampler(len(ds), plan_batch(8, 1, 2), rank=0, seed=3)
    two = [StepSampler(len(ds), plan_batch(8, 2, 2), rank=r, seed=3) for r in (0, 1)]
    for step in (0, 1, 5, one.steps_per_epoch + 2):  # the last is in the second epoch
        single = [i for k in range(one.plan.accum_steps) for i in one.micro_indices(step, k)]
        per_rank = [[i for k in range(s.plan.accum_steps) for i in s.micro_indices(step, k)] for s in two]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == sorted(single)
    # The loop's way: the sampler as the DataLoader's batch_sampler, micro-batches from step 0.
    for s in two:
        batches = iter(torch.utils.data.DataLoader(ds, batch_sampler=s))
        for k in range(s.plan.accum_steps):
            expected = torch.stack([ds[i] for i in s.micro_indices(0, k)])
            assert torch.equal(next(batches), expected)


def test_a_loader_started_at_a_saved_step_continues_the_stream_exactly(tmp_path):
    shards, _ = make_set(tmp_path, [700, 500])
    ds = TokenWindows(shards, 8)
    plan = plan_batch(8, 2, 2)  # 2 replicas, 2 micro-steps each
    whole = StepSampler(len(ds), plan, rank=1, seed=5)
    uninterrupted = iter(torch.utils.data.DataLoader(ds, batch_sampler=whole))
    steps = whole.steps_per_epoch + 3  # across an epoch boundary
    expected = [next(uninterrupted) for _ in range(steps * plan.accum_steps)]
    saved = 4  # the position a checkpoint holds: the next step to train
    resumed = StepSampler(len(ds), plan, rank=1, seed=5)
    resumed.start_step = saved
    got = iter(torch.utils.data.DataLoader(ds, batch_sampler=resumed))
    for batch in expected[saved * plan.accum_steps :]:
        assert torch.equal(next(got), batch)
