"""A task for the precision tests: its gradient holds an inf at one step, in one parameter shard.

Before each forward every rank appends the parameters it holds (its shard, under the sharded
strategies) to $LINSCALE_TEST_OUT/rank<R>.txt, so the test can see which steps changed them.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import linscale


@dataclass
class InfConfig:
    inf_step: int = 3  # at this step (0-based) ...
    inf_rank: int = 1  # ... this rank's loss is inf (-1: every rank's)


class Poisonable(nn.Module):
    """A small MLP whose forward can add inf * (sum of the first row of the first weight).

    Only that row's gradient becomes inf: sharded on dim 0 over 2 ranks it lives on rank 0 alone,
    so the other rank sees finite gradients and must learn about the inf from rank 0."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.poison = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x).sum(1)  # not a view: FSDP2 warns about views returned from forward
        # Computed inside forward, where sharded parameters are gathered.
        extra = self.net[0].weight[0].sum() * math.inf if self.poison else out.new_zeros(())
        return out, extra


class InfAtStep(linscale.Task):
    Config = InfConfig

    def __init__(self, config):
        super().__init__(config)
        self.calls = 0

    def build_model(self):
        return Poisonable()

    def train_data(self, shard):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 4, generator=g)
        return torch.utils.data.TensorDataset(x, x.sum(1).sin())

    def flops_per_sample(self):
        return 6.0 * 49  # stated, so linscale runs no extra counting batch through `loss`

    def loss(self, model, batch):
        rank = int(os.environ.get("RANK", "0"))
        held = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
        flat = torch.cat([t.detach().double().flatten() for t in held])
        with (Path(os.environ["LINSCALE_TEST_OUT"]) / f"rank{rank}.txt").open("a") as f:
            f.write(" ".join(repr(v) for v in flat.tolist()) + "\n")
        inner = getattr(model, "module", model)  # DDP wraps the module; FSDP2 keeps it
        inner.poison = self.calls == self.config.inf_step and self.config.inf_rank in (-1, rank)
        self.calls += 1
        x, y = batch
        out, extra = model(x)
        # Scaled down so the scaler's first scale (2**16) does not overflow fp16: only the forced inf is skipped.
        return 0.01 * F.mse_loss(out.float(), y) + extra
