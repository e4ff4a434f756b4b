"""A task for the fault-tolerance tests: its loss is NaN, or ten times too large, at chosen steps.

Steps are counted as linscale numbers them (the first optimizer step is step 1) by this rank's
calls to `loss`, so the tests run it with one micro-batch per replica and step (no accumulation).
It reads RANK only to decide which rank's loss is faulty.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import linscale


@dataclass
class FaultConfig:
    nan_steps: str = ""  # comma-separated steps whose loss is NaN, e.g. "4,5"
    nan_from: int = 0  # the loss is NaN from this step on, for ever (0 = never)
    spike_step: int = 0  # at this step the loss is multiplied by spike_scale (0 = never)
    spike_scale: float = 10.0
    nan_rank: int = 1  # the rank whose loss is NaN (-1: every rank's)
    spike_rank: int = -1  # the rank whose loss spikes (-1: every rank's)


class Faulty(linscale.Task):
    Config = FaultConfig

    def __init__(self, config):
        super().__init__(config)
        self.calls = 0
        self.nan_steps = {int(s) for s in config.nan_steps.split(",") if s.strip()}

    def build_model(self):
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def train_data(self, shard):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, 4, generator=g)
        return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())

    def flops_per_sample(self):
        return 6.0 * 49  # stated, so linscale runs no extra counting batch through `loss`

    def loss(self, model, batch):
        x, y = batch
        loss = F.mse_loss(model(x), y)
        self.calls += 1
        step = self.calls
        c = self.config
        rank = int(os.environ.get("RANK", "0"))
        if c.nan_rank in (-1, rank) and (step in self.nan_steps or 0 < c.nan_from <= step):
            # A product, not a sum: the gradient must be NaN too, as after a real overflow.
            return loss * float("nan")
        if c.spike_rank in (-1, rank) and step == c.spike_step:
            return loss * c.spike_scale
        return loss
