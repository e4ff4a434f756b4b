"""The on-disk token format written by `linscale preprocess` and read by training.

An output directory OUT holds shard files of raw little-endian token ids (uint16 or uint32, no
header; each document is followed by the EOS id) and `OUT/index.json`, written last:

    {"format": "linscale-shards", "version": 1, "dtype": "uint16", "vocab_size": V, "eos_id": E,
     "tokenizer": "tokenizer.json",
     "splits": {"train": [{"file": "train/u000123.bin", "tokens": N, "crc32": C}, ...], "val": [...]},
     "stats": {...}}

Every file is written atomically (temp file in the same directory, fsync, rename), so a crash
leaves either the old file or the new one, and a directory without index.json is unfinished.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "linscale-shards"
VERSION = 1
INDEX = "index.json"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
RERUN = "rerun `linscale preprocess` with the same arguments"


class ShardError(ValueError):
    """Token shards that are missing, damaged or not in the expected format."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def file_crc32(path: Path) -> int:
    """CRC-32 of a file's bytes, read in 4 MiB chunks."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write `path` whole or not at all: a temp file beside it, fsync, rename, fsync of the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_shard(out_dir: Path, rel_file: str, tokens: np.ndarray, dtype: np.dtype | None = None) -> dict:
    """Write `tokens` to OUT/rel_file atomically and return its index entry.

    `tokens` must be uint16 or uint32 (see `token_dtype`), or pass `dtype` to convert an integer
    array after checking that its values fit.
    """
    rel = Path(rel_file)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ShardError(f"shard file {rel_file!r} must be a relative path inside the output directory")
    arr = np.asarray(tokens)
    if dtype is not None:
        dtype = np.dtype(dtype)
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(dtype).max):
            raise ShardError(f"token ids of {rel_file} do not fit in {dtype} (range {arr.min()}..{arr.max()})")
        arr = arr.astype(dtype, copy=False)
    if arr.dtype.name not in DTYPES:
        raise ShardError(
            f"write_shard needs uint16 or uint32 tokens, got {arr.dtype}; "
            f"pass dtype=token_dtype(vocab_size) or convert with .astype(token_dtype(vocab_size))"
        )
    data = np.ascontiguousarray(arr.ravel(), dtype=DTYPES[arr.dtype.name]).tobytes()
    atomic_write(Path(out_dir) / rel, data)
    return {"file": rel.as_posix(), "tokens": int(arr.size), "crc32": zlib.crc32(data)}


def write_index(out_dir: Path, index: dict) -> None:
    """Write OUT/index.json atomically; call it last, once every shard is written."""
    _check_index(index, Path(out_dir) / INDEX)
    atomic_write(Path(out_dir) / INDEX, (json.dumps(index, indent=1) + "\n").encode())


def _check_index(index: Any, where: Path) -> None:
    bad = f"{where} is not a linscale-shards index (version {VERSION})"
    if isinstance(index, dict) and index.get("kind") == "images":
        raise ShardError(
            f"{where.parent} holds packed images, not token shards: train on it with the image task "
            f"(`linscale train image --task.data={where.parent}`), or preprocess a text corpus for a token task"
        )
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ShardError(f"{bad}: format is not {FORMAT!r}; {RERUN}")
    if index.get("version") != VERSION:
        raise ShardError(
            f"{bad}: it has version {index.get('version')!r}, this linscale reads version {VERSION}; {RERUN}"
        )
    if index.get("dtype") not in DTYPES:
        raise ShardError(f"{bad}: dtype {index.get('dtype')!r} is not one of {', '.join(DTYPES)}; {RERUN}")
    for key in ("vocab_size", "eos_id"):
        if not isinstance(index.get(key), int):
            raise ShardError(f"{bad}: {key} is missing or not an integer; {RERUN}")
    splits = index.get("splits")
    if not isinstance(splits, dict):
        raise ShardError(f"{bad}: no 'splits' mapping; {RERUN}")
    for name, entries in splits.items():
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("tokens"), int) for e in entries
        ):
            raise ShardError(f"{bad}: split {name!r} is not a list of {{file, tokens, crc32}} entries; {RERUN}")


def read_index(out_dir: Path) -> dict:
    """The parsed, checked index of a finished preprocess output."""
    out_dir = Path(out_dir)
    path = out_dir / INDEX
    if not path.is_file():
        raise ShardError(
            f"{out_dir} has no {INDEX}: it is not a finished `linscale preprocess` output; "
            f"run or rerun `linscale preprocess` writing to {out_dir}"
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path} cannot be read ({e}); delete it and {RERUN}") from None
    _check_index(index, path)
    return index


def _damaged(path: Path, problem: str) -> ShardError:
    return ShardError(f"shard {path} is damaged ({problem}); delete that file and {RERUN}, which redoes that unit")


def _check_entry(out_dir: Path, entry: dict, itemsize: int, full: bool) -> None:
    path = out_dir / entry["file"]
    expected = entry["tokens"] * itemsize
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ShardError(f"shard {path} is missing; {RERUN}, which redoes the missing unit") from None
    if size != expected:
        raise _damaged(path, f"{size} bytes, the index says {entry['tokens']} tokens = {expected} bytes")
    if full and "crc32" in entry:
        crc = file_crc32(path)
        if crc != entry["crc32"]:
            raise _damaged(path, f"crc32 {crc} does not match the index's {entry['crc32']}")


def verify(out_dir: Path, full: bool = False) -> None:
    """Check every shard exists with the indexed size; `full=True` also checks the crc32 of its bytes."""
    out_dir = Path(out_dir)
    index = read_index(out_dir)
    itemsize = DTYPES[index["dtype"]].itemsize
    for entries in index["splits"].values():
        for entry in entries:
            _check_entry(out_dir, entry, itemsize, full)


class ShardSet:
    """One split of a preprocess output as a single memory-mapped token stream.

    Files are mapped on first read, so a pickled ShardSet (without its maps) reopens them lazily.
    """

    def __init__(self, out_dir: Path, split: str = "train") -> None:
        self.out_dir = Path(out_dir)
        self.split = split
        index = read_index(self.out_dir)
        splits = index["splits"]
        if split not in splits:
            raise ShardError(
                f"{self.out_dir / INDEX} has no split {split!r} (it has: {', '.join(splits) or 'none'}); "
                f"use one of those or rerun `linscale preprocess`"
            )
        self.dtype = DTYPES[index["dtype"]]
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int = index["eos_id"]
        self.tokenizer: str | None = index.get("tokenizer")
        entries = [e for e in splits[split] if e["tokens"] > 0]
        if not entries:
            raise ShardError(
                f"split {split!r} of {self.out_dir} holds no tokens; give `linscale preprocess` more data "
                f"(or a larger validation fraction for 'val')"
            )
        for e in entries:
            _check_entry(self.out_dir, e, self.dtype.itemsize, full=False)
        self.files = [e["file"] for e in entries]
        # offsets[k] = first stream position of file k; offsets[-1] = total
        self.offsets = np.zeros(len(entries) + 1, dtype=np.int64)
        np.cumsum([e["tokens"] for e in entries], out=self.offsets[1:])
        self.tokens = int(self.offsets[-1])
        self._maps: list[np.memmap | None] = [None] * len(self.files)

    def __repr__(self) -> str:
        return f"ShardSet({str(self.out_dir)!r}, split={self.split!r}, tokens={self.tokens}, files={len(self.files)})"

    def __len__(self) -> int:
        return self.tokens

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self.files)
        return state

    def _map(self, k: int) -> np.memmap:
        m = self._maps[k]
        if m is None:
            m = np.memmap(self.out_dir / self.files[k], dtype=self.dtype, mode="r")
            self._maps[k] = m
        return m

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the split's stream, across file boundaries, as int64."""
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > self.tokens:
            raise ShardError(f"read of tokens [{start}, {start + length}) is outside the split's 0..{self.tokens}")
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        done = 0
        while done < length:
            lo = start + done - int(self.offsets[k])
            n = min(length - done, int(self.offsets[k + 1]) - (start + done))
            out[done : done + n] = self._map(k)[lo : lo + n]
            done += n
            k += 1
        return out
