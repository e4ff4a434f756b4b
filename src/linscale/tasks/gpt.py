"""Built-in `gpt` task: pretrain a GPT on token shards, or a small byte-level GPT on the standard library.

By default the corpus is the Python standard library's source, which every machine with Python
has, so the task runs offline anywhere: bytes are the tokens (vocabulary 256), and files are
split into train and validation by a hash of their path, so the split does not depend on the
corpus size setting.

With `task.data=DIR` (a directory written by `linscale preprocess`) the task trains on DIR's
"train" split, evaluates on its "val" split, takes the vocabulary from DIR/index.json and
decodes the final sample with DIR's tokenizer. `task.size` picks a named model shape from
`linscale.models.gpt.SIZES`; `task.block_size` stays the training window length.
"""

from __future__ import annotations

import dataclasses
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linscale.config import opt
from linscale.models.gpt import GPT, POS_SCHEMES, SIZES, GPTConfig
from linscale.task import DataShard, Task

if TYPE_CHECKING:
    from linscale.data import loader as shard_loader
    from linscale.data.tokenizer import Tokenizer


@dataclass(kw_only=True)
class GPTTaskConfig:
    size: str = opt(
        "",
        f"A named model shape ({', '.join(SIZES)}); when set it fixes n_layer, n_head, d_model, pos and the "
        "model's context, and those settings are ignored. block_size may still be set, up to the size's context. "
        "The vocabulary always comes from the data, never from the size.",
    )
    n_layer: int = opt(4, "Transformer blocks (ignored when task.size is set).")
    n_head: int = opt(4, "Attention heads (ignored when task.size is set).")
    d_model: int = opt(128, "Model width (ignored when task.size is set).")
    block_size: int = opt(
        128,
        "Tokens per training window. Without task.size it is also the model's context; with task.size the model "
        "keeps the size's context and block_size must not exceed it.",
    )
    pos: str = opt(
        "learned",
        f"Position scheme: {' or '.join(POS_SCHEMES)} (ignored when task.size is set: the size's scheme is used).",
    )
    tie_embeddings: bool = opt(
        True, "Share the token embedding with the output head (applies with task.size too; the sizes are tied)."
    )
    dropout: float = opt(0.0, "Dropout probability.")
    data: str = opt(
        "",
        "A directory written by `linscale preprocess`: train on its 'train' split, evaluate on its 'val' split "
        "(none when empty), take the vocabulary from its index and decode samples with its tokenizer. "
        "Empty: bytes of the standard library (or task.corpus_dir).",
    )
    corpus_mb: float = opt(8.0, "Megabytes of the standard library's source to read (0 = all; without task.data).")
    corpus_dir: str = opt("", "Directory of text files to train on (default: the standard library; without task.data).")
    val_fraction: float = opt(0.05, "Fraction of files held out for evaluation (without task.data).")
    sample_tokens: int = opt(200, "Tokens generated at the end of the run (0 = none).")


def _corpus_files(root: Path) -> list[Path]:
    suffixes = (".py", ".txt", ".md", ".rst")
    files = [p for p in root.rglob("*") if p.suffix in suffixes and "site-packages" not in p.parts and p.is_file()]
    # A fixed, content-independent order: sort by a hash of the relative path.
    return sorted(files, key=lambda p: zlib.crc32(str(p.relative_to(root)).encode()))


def load_corpus(cfg: GPTTaskConfig) -> tuple[np.ndarray, np.ndarray]:
    """Byte tokens of the training and validation files."""
    root = Path(cfg.corpus_dir or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"task.corpus_dir={str(root)!r} is not a directory of text files")
    files = _corpus_files(root)
    if not files:
        raise ValueError(f"no .py/.txt/.md/.rst files under {str(root)!r}; point task.corpus_dir at text files")
    budget = int(cfg.corpus_mb * 2**20) if cfg.corpus_mb > 0 else None
    train, val, size = [], [], 0
    every = max(2, round(1 / cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    for i, path in enumerate(files):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        (val if every and i % every == 0 else train).append(data)
        size += len(data)
        if budget is not None and size >= budget:
            break
    as_array = lambda parts: np.frombuffer(b"".join(parts), dtype=np.uint8)  # noqa: E731
    return as_array(train), as_array(val)


class TokenWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of block_size + 1 tokens: inputs and next-token targets."""

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.block_size)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.block_size
        return torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))


def _data_error(data: str, problem: str) -> ValueError:
    from linscale.data.shards import ShardError

    return ShardError(f"task.data={data!r}: {problem}")


def model_config(c: GPTTaskConfig, vocab_size: int) -> GPTConfig:
    """The model's shape: the named `task.size`, or the explicit settings, with the data's vocabulary."""
    if c.size:
        if c.size not in SIZES:
            raise ValueError(f"unknown task.size={c.size!r}; known sizes: {', '.join(SIZES)}")
        cfg = GPTConfig.named(c.size, vocab_size=vocab_size, tie_embeddings=c.tie_embeddings, dropout=c.dropout)
        if c.block_size > cfg.block_size:
            raise ValueError(
                f"task.block_size={c.block_size} is longer than the context of task.size={c.size} "
                f"({cfg.block_size} tokens); set task.block_size <= {cfg.block_size}"
            )
        return cfg
    return GPTConfig(
        vocab_size=vocab_size,
        block_size=c.block_size,
        n_layer=c.n_layer,
        n_head=c.n_head,
        d_model=c.d_model,
        pos=c.pos,
        tie_embeddings=c.tie_embeddings,
        dropout=c.dropout,
    )


class GPTTask(Task):
    Config = GPTTaskConfig
    defaults = {
        "train": {"global_batch": 32, "max_steps": 1000, "eval_every": 250, "log_every": 10},
        "optim": {"lr": 2e-3, "warmup_steps": 20, "weight_decay": 0.1},
    }

    def __init__(self, config: GPTTaskConfig | None = None) -> None:
        super().__init__(config or GPTTaskConfig())
        c = self.config
        if c.block_size < 1:
            raise ValueError(f"task.block_size must be a positive number of tokens, got {c.block_size}")
        self._index: dict | None = None
        self._tokenizer: Tokenizer | None = None
        self._train: shard_loader.TokenWindows | None = None
        vocab_size = 256
        if c.data:
            # Read and check the index and the train split now: the launcher builds the task before
            # it starts workers, so a missing or unfinished directory is one message, not N failures.
            self._index = self._read_index()
            self._train = self._windows("train")
            vocab_size = self._index["vocab_size"]
        self.model_cfg = model_config(c, vocab_size)
        self.tokens_per_sample = c.block_size
        self._corpus: tuple[np.ndarray, np.ndarray] | None = None
        if c.data and c.sample_tokens > 0:
            self._tokenizer = self._load_tokenizer()  # fail before training, not at the end

    # --- token shards (task.data) ---

    def _read_index(self) -> dict:
        from linscale.data.shards import ShardError, read_index

        data = self.config.data
        if not Path(data).is_dir():
            raise _data_error(
                data,
                "no such directory; run `linscale preprocess CORPUS --out DIR` first, or point --task.data "
                "at the directory it wrote",
            )
        try:
            index = read_index(Path(data))
        except ShardError as e:
            raise _data_error(data, str(e)) from None
        return index

    def _windows(self, split: str) -> shard_loader.TokenWindows:
        from linscale.data.loader import TokenWindows as ShardWindows
        from linscale.data.shards import ShardError, ShardSet

        data = self.config.data
        try:
            return ShardWindows(ShardSet(Path(data), split), self.config.block_size)
        except ShardError as e:
            raise _data_error(data, str(e)) from None

    def _has_tokens(self, split: str) -> bool:
        assert self._index is not None
        entries = self._index["splits"].get(split) or []
        return sum(e["tokens"] for e in entries) > self.config.block_size

    def _load_tokenizer(self) -> Tokenizer:
        from linscale.data.tokenizer import Tokenizer

        assert self._index is not None
        path = Path(self.config.data) / (self._index.get("tokenizer") or "tokenizer.json")
        try:
            return Tokenizer.load(path)
        except ValueError as e:
            raise _data_error(
                self.config.data, f"{e}; rerun `linscale preprocess`, or set --task.sample_tokens=0 to skip the sample"
            ) from None

    # --- the byte corpus (default) ---

    def _data(self) -> tuple[np.ndarray, np.ndarray]:
        if self._corpus is None:
            self._corpus = load_corpus(self.config)
        return self._corpus

    def build_model(self) -> nn.Module:
        return GPT(self.model_cfg)

    def train_data(self, shard: DataShard) -> torch.utils.data.Dataset:
        if self._train is not None:
            return self._train
        return TokenWindows(self._data()[0], self.config.block_size)

    def eval_data(self, shard: DataShard) -> torch.utils.data.Dataset | None:
        if self.config.data:
            # A split without a whole window (or no val split at all) means no evaluation.
            return self._windows("val") if self._has_tokens("val") else None
        return TokenWindows(self._data()[1], self.config.block_size)

    def example_batch(self, micro_batch: int) -> torch.Tensor:
        """Windows of block_size + 1 token ids, as the loader yields them, without reading the data."""
        n = self.config.block_size + 1
        return (torch.arange(micro_batch * n, dtype=torch.int64) % self.model_cfg.vocab_size).view(micro_batch, n)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    def flops_per_sample(self) -> float:
        # Attention costs depend on the sequence length, so count at the window, not the model's context.
        window = dataclasses.replace(self.model_cfg, block_size=self.config.block_size)
        return window.train_flops_per_token() * self.config.block_size

    def final_report(self, model: nn.Module) -> str | None:
        if self.config.sample_tokens <= 0:
            return None
        if self.config.data:
            tok = self._tokenizer or self._load_tokenizer()
            prompt = [tok.eos_id]  # the start of a new document
        else:
            tok, prompt = None, list(b"def ")
        device = next(model.parameters()).device
        idx = torch.tensor([prompt], dtype=torch.long, device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        was_training = model.training
        model.eval()
        out = model.generate(idx, self.config.sample_tokens, generator=gen)
        model.train(was_training)
        if tok is None:
            text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
        else:
            text = tok.decode(out[0, len(prompt) :].tolist())
        return "generated sample:\n" + text
