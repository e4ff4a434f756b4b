"""A task as a newcomer writes it: classify points of two interleaved spirals with an MLP.

There is no distributed code here. Train it on every local device with

    linscale train examples/spirals.py:Spirals

and change a setting with, for example, `--task.hidden=128` or `--train.max_steps=500`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import linscale


def two_spirals(n: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 3 * math.pi + 0.5
    label = torch.randint(0, 2, (n,), generator=g)
    sign = 1 - 2 * label.float()  # the second spiral is the first one turned by 180 degrees
    xy = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], dim=1) / (3 * math.pi)
    return xy + noise * torch.randn(n, 2, generator=g), label


@dataclass
class SpiralsConfig:
    hidden: int = 64
    samples: int = 8192
    noise: float = 0.02


class Spirals(linscale.Task):
    Config = SpiralsConfig
    defaults = {"train": {"global_batch": 256, "max_steps": 300, "eval_every": 100}, "optim": {"lr": 3e-3}}

    def build_model(self):
        h = self.config.hidden
        return nn.Sequential(nn.Linear(2, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))

    def train_data(self, shard):
        # The same data on every process; linscale gives each one different samples.
        x, y = two_spirals(self.config.samples, self.config.noise, seed=0)
        return torch.utils.data.TensorDataset(x, y)

    def eval_data(self, shard):
        x, y = two_spirals(1024, self.config.noise, seed=1)
        return torch.utils.data.TensorDataset(x, y)

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)
