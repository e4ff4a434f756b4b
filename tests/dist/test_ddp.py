"""The DDP layer itself, in two gloo processes: what crosses the network and when."""

import pytest
import torch
from torch import nn

from linscale.config import ParallelConfig
from linscale.runtime import parallel
from linscale.runtime.device import Device

from .conftest import spawn_ranks

pytestmark = pytest.mark.dist


def _accumulate(rank: int, world: int, out: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    ddp, clock = parallel.wrap(model, ParallelConfig(bucket_mb=25), Device("cpu", 0, "gloo", "cpu", 1))
    torch.manual_seed(1 + rank)  # different data on each rank
    xs = [torch.randn(4, 8) for _ in range(4)]
    for k, x in enumerate(xs):
        with parallel.sync_gradients(ddp, sync=k == len(xs) - 1):
            (ddp(x).pow(2).mean() / len(xs)).backward()
        if k < len(xs) - 1:
            assert clock.launches == 0, "gradients were reduced on a non-final micro-step"
    assert clock.launches == 1  # one bucket, reduced once, on the final micro-step
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.save(grads, f"{out}/grads{rank}.pt")


def test_gradients_sync_only_on_the_final_micro_step_and_match_everywhere(tmp_path):
    spawn_ranks(_accumulate, 2, tmp_path, str(tmp_path))
    g0, g1 = torch.load(tmp_path / "grads0.pt"), torch.load(tmp_path / "grads1.pt")
    assert torch.equal(g0, g1), "replicas disagree after the reduction"
    # The reduced gradient is the mean of the two ranks' local gradients.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    for rank in (0, 1):
        torch.manual_seed(1 + rank)
        for x in [torch.randn(4, 8) for _ in range(4)]:
            (model(x).pow(2).mean() / 4 / 2).backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(g0, expected, rtol=1e-5, atol=1e-7)
