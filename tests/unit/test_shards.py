"""Token shards: atomic writes, index checks, damage detection, reads across files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from linscale.data.shards import (
    ShardError,
    ShardSet,
    read_index,
    token_dtype,
    verify,
    write_index,
    write_shard,
)


def make_out(out, splits: dict[str, list[np.ndarray]], vocab: int = 1000, eos: int = 0) -> dict:
    """Write `splits` (lists of per-file token arrays) as a preprocess output."""
    dtype = token_dtype(vocab)
    index = {
        "format": "linscale-shards",
        "version": 1,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "eos_id": eos,
        "tokenizer": "tokenizer.json",
        "splits": {
            name: [write_shard(out, f"{name}/u{k:06d}.bin", a.astype(dtype)) for k, a in enumerate(arrays)]
            for name, arrays in splits.items()
        },
        "stats": {"documents": 3},
    }
    write_index(out, index)
    return index


def test_token_dtype():
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(70000) == np.uint32


def test_round_trip_across_files(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 1000, n) for n in (5, 1, 17, 0, 9, 30)]
    stream = np.concatenate(parts)
    index = make_out(tmp_path, {"train": parts, "val": []})
    assert read_index(tmp_path) == index
    assert index["splits"]["train"][0] == {
        "file": "train/u000000.bin",
        "tokens": 5,
        "crc32": index["splits"]["train"][0]["crc32"],
    }
    assert (tmp_path / "train/u000002.bin").stat().st_size == 17 * 2
    verify(tmp_path, full=True)
    s = ShardSet(tmp_path, "train")
    assert (s.tokens, s.vocab_size, s.eos_id, s.dtype) == (len(stream), 1000, 0, np.uint16)
    for start in range(len(stream)):
        for length in (0, 1, 2, 7, 25, len(stream) - start):
            if start + length <= len(stream):
                got = s.read(start, length)
                assert got.dtype == np.int64
                np.testing.assert_array_equal(got, stream[start : start + length])
    with pytest.raises(ShardError, match="outside"):
        s.read(len(stream) - 2, 3)


def test_uint32_for_large_vocab(tmp_path):
    tokens = np.array([0, 65535, 65536, 69999, 7], dtype=np.int64)
    index = make_out(tmp_path, {"train": [tokens[:2], tokens[2:]]}, vocab=70000)
    assert index["dtype"] == "uint32"
    assert (tmp_path / "train/u000001.bin").stat().st_size == 3 * 4
    s = ShardSet(tmp_path)
    np.testing.assert_array_equal(s.read(0, 5), tokens)


def test_write_shard_checks_dtype(tmp_path):
    with pytest.raises(ShardError, match="uint16 or uint32"):
        write_shard(tmp_path, "a.bin", np.arange(5))
    with pytest.raises(ShardError, match="do not fit"):
        write_shard(tmp_path, "a.bin", np.array([70000]), dtype=np.uint16)
    entry = write_shard(tmp_path, "a.bin", np.array([1, 2, 3]), dtype=np.uint16)
    assert entry["tokens"] == 3 and (tmp_path / "a.bin").read_bytes() == b"\x01\x00\x02\x00\x03\x00"


def test_truncated_shard_is_named(tmp_path):
    make_out(tmp_path, {"train": [np.arange(10), np.arange(20), np.arange(5)]})
    bad = tmp_path / "train/u000001.bin"
    bad.write_bytes(bad.read_bytes()[:-2])
    for check in (lambda: verify(tmp_path), lambda: ShardSet(tmp_path, "train")):
        with pytest.raises(ShardError, match="u000001.bin") as e:
            check()
        assert "linscale preprocess" in str(e.value) and "delete" in str(e.value)


def test_missing_shard_is_named(tmp_path):
    make_out(tmp_path, {"train": [np.arange(10), np.arange(20)]})
    (tmp_path / "train/u000000.bin").unlink()
    with pytest.raises(ShardError, match="u000000.bin is missing"):
        verify(tmp_path)


def test_corrupt_byte_needs_full_verify(tmp_path):
    make_out(tmp_path, {"train": [np.arange(10), np.arange(20)]})
    bad = tmp_path / "train/u000001.bin"
    data = bytearray(bad.read_bytes())
    data[7] ^= 0x10
    bad.write_bytes(bytes(data))
    verify(tmp_path)  # sizes are right
    with pytest.raises(ShardError, match="u000001.bin.*crc32"):
        verify(tmp_path, full=True)


def test_no_index_refused(tmp_path):
    write_shard(tmp_path, "train/u000000.bin", np.arange(10, dtype=np.uint16))
    for check in (lambda: read_index(tmp_path), lambda: verify(tmp_path), lambda: ShardSet(tmp_path)):
        with pytest.raises(ShardError, match="has no index.json: it is not a finished `linscale preprocess` output"):
            check()


def test_wrong_format_or_version(tmp_path):
    index = make_out(tmp_path, {"train": [np.arange(10)]})
    (tmp_path / "index.json").write_text(json.dumps({**index, "version": 2}))
    with pytest.raises(ShardError, match="version 2"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ShardError, match="not a linscale-shards index"):
        read_index(tmp_path)
    with pytest.raises(ShardError):
        write_index(tmp_path, {"format": "linscale-shards"})


def test_empty_and_unknown_split(tmp_path):
    make_out(tmp_path, {"train": [np.arange(10)], "val": []})
    verify(tmp_path, full=True)  # an empty split is fine on disk
    with pytest.raises(ShardError, match="'val'.*holds no tokens"):
        ShardSet(tmp_path, "val")
    with pytest.raises(ShardError, match="no split 'test'"):
        ShardSet(tmp_path, "test")


def test_atomic_writes_leave_no_temp_files(tmp_path):
    make_out(tmp_path, {"train": [np.arange(10), np.arange(3)], "val": [np.arange(4)]})
    write_index(tmp_path, read_index(tmp_path))  # rewrite over an existing index
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["index.json", "train/u000000.bin", "train/u000001.bin", "val/u000000.bin"]
