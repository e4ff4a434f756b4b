"""Built-in `gpt` task: pretrain a small byte-level GPT on the Python standard library's source.

Every machine with Python has this corpus, so the task runs offline anywhere. Bytes are the
tokens (vocabulary 256): no tokenizer to train. Files are split into train and validation by
a hash of their path, so the split does not depend on the corpus size setting.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linscale.config import opt
from linscale.models.gpt import GPT, GPTConfig
from linscale.task import DataShard, Task


@dataclass(kw_only=True)
class GPTTaskConfig:
    n_layer: int = opt(4, "Transformer blocks.")
    n_head: int = opt(4, "Attention heads.")
    d_model: int = opt(128, "Model width.")
    block_size: int = opt(128, "Context length in tokens (bytes).")
    dropout: float = opt(0.0, "Dropout probability.")
    corpus_mb: float = opt(8.0, "Megabytes of the standard library's source to read (0 = all).")
    corpus_dir: str = opt("", "Directory of text files to train on (default: the standard library).")
    val_fraction: float = opt(0.05, "Fraction of files held out for evaluation.")
    sample_tokens: int = opt(200, "Bytes generated at the end of the run (0 = none).")


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


class GPTTask(Task):
    Config = GPTTaskConfig
    defaults = {
        "train": {"global_batch": 32, "max_steps": 1000, "eval_every": 250, "log_every": 10},
        "optim": {"lr": 2e-3, "warmup_steps": 20, "weight_decay": 0.1},
    }

    def __init__(self, config: GPTTaskConfig | None = None) -> None:
        super().__init__(config or GPTTaskConfig())
        c = self.config
        self.model_cfg = GPTConfig(
            vocab_size=256,
            block_size=c.block_size,
            n_layer=c.n_layer,
            n_head=c.n_head,
            d_model=c.d_model,
            dropout=c.dropout,
        )
        self.tokens_per_sample = c.block_size
        self._corpus: tuple[np.ndarray, np.ndarray] | None = None

    def _data(self) -> tuple[np.ndarray, np.ndarray]:
        if self._corpus is None:
            self._corpus = load_corpus(self.config)
        return self._corpus

    def build_model(self) -> nn.Module:
        return GPT(self.model_cfg)

    def train_data(self, shard: DataShard) -> TokenWindows:
        return TokenWindows(self._data()[0], self.config.block_size)

    def eval_data(self, shard: DataShard) -> TokenWindows:
        return TokenWindows(self._data()[1], self.config.block_size)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    def flops_per_sample(self) -> float:
        return self.model_cfg.train_flops_per_token() * self.config.block_size

    def final_report(self, model: nn.Module) -> str | None:
        if self.config.sample_tokens <= 0:
            return None
        prompt = b"def "
        device = next(model.parameters()).device
        idx = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        was_training = model.training
        model.eval()
        out = model.generate(idx, self.config.sample_tokens, generator=gen)
        model.train(was_training)
        text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
        return "generated sample:\n" + text
