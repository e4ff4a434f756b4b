"""Strategy choice and model-state arithmetic, without processes."""

import math

import pytest
import torch
from torch import nn

from linscale.config import ConfigError, ParallelConfig
from linscale.runtime.parallel import choose_strategy, clip_grad_norm, describe_communication, model_state_bytes

GIB = 2**30


def test_model_state_bytes_follow_what_each_strategy_shards():
    p = 1_000_000
    assert model_state_bytes(p, 4, "ddp") == 16 * p
    assert model_state_bytes(p, 4, "zero1") == 8 * p + 8 * p / 4
    assert model_state_bytes(p, 4, "zero2") == 4 * p + 12 * p / 4
    assert model_state_bytes(p, 4, "zero3") == 16 * p / 4


def test_auto_picks_the_simplest_strategy_that_fits_and_says_why():
    # A 1B-parameter model: 16 GB of model states when replicated.
    p = 1_000_000_000
    assert choose_strategy(p, 8, 80 * GIB).strategy == "ddp"  # 16 GB <= 40 GiB
    assert choose_strategy(p, 8, 24 * GIB).strategy == "zero1"  # 9 GB <= 12 GiB, 16 GB is not
    assert choose_strategy(p, 8, 16 * GIB).strategy == "zero2"  # 5.5 GB <= 8 GiB
    choice = choose_strategy(p, 8, 8 * GIB)
    assert choice.strategy == "zero3" and "GiB" in choice.reason
    too_big = choose_strategy(100 * p, 8, 8 * GIB)
    assert too_big.strategy == "zero3" and "add devices" in too_big.reason
    assert choose_strategy(p, 1, 1 * GIB).strategy == "ddp"  # one process: nothing to shard


@pytest.mark.parametrize(("value", "every"), [("none", 0), ("full", 1), ("3", 3)])
def test_activation_checkpointing_setting(value, every):
    assert ParallelConfig(activation_checkpointing=value).checkpoint_every == every


@pytest.mark.parametrize("value", ["0", "-1", "some", "1.5"])
def test_activation_checkpointing_rejects_bad_values(value):
    with pytest.raises(ConfigError, match="none, full or a positive integer"):
        ParallelConfig(activation_checkpointing=value)


def test_the_summary_says_what_each_strategy_sends():
    base = ParallelConfig()
    assert describe_communication("ddp", base, 1) == "none (one process)"
    assert "all-reduce in 25 MiB buckets" in describe_communication("ddp", base, 2)
    assert describe_communication("ddp", base, 2).endswith("fp32")
    assert "compressed to bf16" in describe_communication("ddp", ParallelConfig(comm_hook="bf16"), 2)
    psgd = ParallelConfig(comm_hook="powersgd", powersgd_rank=4, powersgd_warmup=7)
    assert "PowerSGD rank 4 after 7 exact steps" in describe_communication("ddp", psgd, 2)
    assert "parameter broadcast" in describe_communication("zero1", base, 2)
    assert "in forward," in describe_communication("zero2", base, 2)
    assert "forward and backward" in describe_communication("zero3", base, 2)
    hsdp = describe_communication("hsdp", ParallelConfig(reduce_dtype="bf16"), 4, nodes=2)
    assert "reduce-scatter in bf16 inside each node" in hsdp and "across the 2 nodes" in hsdp


@pytest.mark.parametrize("max_norm", [0.5, 1e6, math.inf])
def test_clip_grad_norm_matches_torch_on_plain_gradients(max_norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    model[1].bias.requires_grad_(False)  # a parameter without a gradient is left out
    model(torch.randn(3, 8)).square().sum().backward()
    ref = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    holders = [nn.Parameter(torch.zeros_like(g)) for g in ref]
    for h, g in zip(holders, ref, strict=True):
        h.grad = g
    want = torch.nn.utils.clip_grad_norm_(holders, max_norm)
    norm = clip_grad_norm(model.parameters(), max_norm)
    assert norm.dtype == torch.float32 and norm.item() == pytest.approx(want.item(), rel=1e-6)
    got = [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
    assert model[1].bias.grad is None
    assert clip_grad_norm([nn.Parameter(torch.ones(2))], 1.0).item() == 0.0  # no gradients: norm 0
