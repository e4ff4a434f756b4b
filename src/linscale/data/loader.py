"""The training data path: fixed-length windows over a split's token stream."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from linscale.data.shards import ShardError, ShardSet


class TokenWindows(torch.utils.data.Dataset):
    """Map-style dataset of packed windows: window i = tokens [i*seq_len, i*seq_len + seq_len + 1).

    Each item is a torch.int64 tensor of seq_len + 1 tokens: inputs `w[:-1]` and next-token
    targets `w[1:]`. Windows overlap by one token, so no token is lost and nothing is padded.
    Pickling keeps only the directory, split and sizes; each process reopens the memory maps
    on its first item, so DataLoader workers start fast and share the page cache.
    """

    def __init__(self, shards: ShardSet, seq_len: int) -> None:
        if seq_len < 1:
            raise ShardError(f"seq_len must be >= 1, got {seq_len}")
        windows = (shards.tokens - 1) // seq_len
        if windows < 1:
            raise ShardError(
                f"split {shards.split!r} of {shards.out_dir} has {shards.tokens} tokens, fewer than one window "
                f"of seq_len + 1 = {seq_len + 1} tokens; lower the sequence length or preprocess more data"
            )
        self.out_dir = Path(shards.out_dir)
        self.split = shards.split
        self.seq_len = seq_len
        self.tokens = shards.tokens
        self.vocab_size = shards.vocab_size
        self.eos_id = shards.eos_id
        self.windows = windows
        self._shards: ShardSet | None = shards
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.windows

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_shards"] = None
        return state

    def _open(self) -> ShardSet:
        shards = ShardSet(self.out_dir, self.split)
        if shards.tokens != self.tokens:
            raise ShardError(
                f"split {self.split!r} of {self.out_dir} changed while in use ({self.tokens} -> {shards.tokens} "
                f"tokens); do not rerun `linscale preprocess` into a directory a training run reads"
            )
        return shards

    def __getitem__(self, i: int) -> torch.Tensor:
        i = int(i)
        if i < 0:
            i += self.windows
        if not 0 <= i < self.windows:
            raise IndexError(f"window {i} out of range: the dataset has {self.windows} windows")
        if self._shards is None or self._pid != os.getpid():
            self._shards = self._open()
            self._pid = os.getpid()
        return torch.from_numpy(self._shards.read(i * self.seq_len, self.seq_len + 1))
