"""Tasks used by the multi-process tests. They read RANK only to record what each rank saw."""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import linscale


class IndexData(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor(i), torch.tensor([float(i % 7), 1.0])


@dataclass
class RecorderConfig:
    samples: int = 64
    crash_rank: int = -1  # this rank raises at step crash_step
    crash_step: int = 3


class Recorder(linscale.Task):
    """Writes the sample indices each rank trains on to $LINSCALE_TEST_OUT/rank<R>.txt."""

    Config = RecorderConfig

    def __init__(self, config):
        super().__init__(config)
        self.calls = 0

    def build_model(self):
        return nn.Linear(2, 1)

    def train_data(self, shard):
        return IndexData(self.config.samples)

    def flops_per_sample(self):
        # Stated, so that linscale does not run one extra counting batch through `loss`.
        return 6.0

    def loss(self, model, batch):
        idx, x = batch
        rank = int(os.environ.get("RANK", "0"))
        self.calls += 1
        if rank == self.config.crash_rank and self.calls >= self.config.crash_step:
            raise RuntimeError("deliberate failure in the test task")
        out = Path(os.environ["LINSCALE_TEST_OUT"]) / f"rank{rank}.txt"
        with out.open("a") as f:
            f.write(" ".join(map(str, idx.tolist())) + "\n")
        return F.mse_loss(model(x).squeeze(1), x[:, 0])
