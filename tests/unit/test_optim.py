"""linscale.train.optim: the LR schedule and the AdamW parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from linscale.config import OptimConfig
from linscale.models.gpt import GPT, GPTConfig
from linscale.train.optim import build_optimizer, build_scheduler, lr_factor


@pytest.mark.parametrize("warmup", [1, 2, 5, 10, 37])
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_warmup_is_linear_and_reaches_one(warmup, schedule):
    cfg = OptimConfig(warmup_steps=warmup, schedule=schedule)
    values = [lr_factor(s, cfg, 1000) for s in range(warmup)]
    assert values[-1] == pytest.approx(1.0)
    assert values[0] == pytest.approx(1 / warmup)
    steps = [b - a for a, b in zip(values, values[1:], strict=False)]
    for d in steps:
        assert d == pytest.approx(1 / warmup)
    assert all(0 < v <= 1 for v in values)


@pytest.mark.parametrize("min_ratio", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize(("warmup", "total"), [(0, 50), (10, 100), (5, 6), (3, 1000)])
def test_cosine_decays_to_min_ratio(min_ratio, warmup, total):
    cfg = OptimConfig(warmup_steps=warmup, min_lr_ratio=min_ratio, schedule="cosine")
    assert lr_factor(warmup, cfg, total) == pytest.approx(1.0)  # decay starts from the peak
    assert lr_factor(total, cfg, total) == pytest.approx(min_ratio)
    assert lr_factor(total + 500, cfg, total) == pytest.approx(min_ratio)  # and stays there
    after = [lr_factor(s, cfg, total) for s in range(warmup, total + 1)]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:], strict=False))  # non-increasing
    assert all(min_ratio - 1e-12 <= v <= 1 + 1e-12 for v in after)


def test_cosine_midpoint_is_halfway():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.2, schedule="cosine")
    # Half of the decay span after warm-up: cos(pi/2) = 0, so halfway between 1 and min.
    assert lr_factor(10 + 45, cfg, 100) == pytest.approx(0.2 + 0.8 * 0.5)
    # A quarter of the way: cos(pi/4).
    assert lr_factor(10 + 22, cfg, 10 + 88) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize("total", [None, 0, 10, 1000])
def test_constant_stays_one_after_warmup(total):
    cfg = OptimConfig(warmup_steps=4, schedule="constant", min_lr_ratio=0.1)
    assert [lr_factor(s, cfg, total) for s in range(4, 2000, 97)] == [1.0] * len(range(4, 2000, 97))


def test_build_scheduler_needs_steps_for_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0)
    for total in (None, 0):
        with pytest.raises(ValueError, match="optim.schedule=cosine needs a known number of steps"):
            build_scheduler(opt, OptimConfig(schedule="cosine"), total)
    build_scheduler(opt, OptimConfig(schedule="constant"), None)  # fine without a step count


def test_scheduler_drives_optimizer_lr():
    cfg = OptimConfig(lr=0.5, warmup_steps=3, schedule="cosine", min_lr_ratio=0.1)
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, 20)
    for step in range(25):
        assert opt.param_groups[0]["lr"] == pytest.approx(cfg.lr * lr_factor(step, cfg, 20)), step
        opt.step()
        sched.step()


def expected_groups(model: nn.Module) -> tuple[set[str], set[str]]:
    """By module type: weights of linear layers and embeddings decay; biases and norm gains do not."""
    decay, no_decay = set(), set()
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(module, nn.Linear | nn.Embedding) and pname == "weight":
                decay.add(full)
            elif isinstance(module, nn.Linear | nn.LayerNorm):
                no_decay.add(full)
            else:
                raise AssertionError(f"unexpected parameter {full}")
    return decay, no_decay


@pytest.mark.parametrize("impl", ["auto", "fused", "foreach"])
def test_build_optimizer_groups(impl):
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, d_model=16))
    cfg = OptimConfig(weight_decay=0.3, impl=impl, lr=1e-2, beta1=0.8, beta2=0.9, eps=1e-6)
    opt = build_optimizer(model, cfg, "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(opt.param_groups) == 2
    decayed, undecayed = opt.param_groups
    assert decayed["weight_decay"] == 0.3
    assert undecayed["weight_decay"] == 0.0
    want_decay, want_no_decay = expected_groups(model)
    assert {names[id(p)] for p in decayed["params"]} == want_decay
    assert {names[id(p)] for p in undecayed["params"]} == want_no_decay
    assert (
        "tok_emb.weight" in want_decay and "ln_f.weight" in want_no_decay and "blocks.0.attn.qkv.bias" in want_no_decay
    )
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))  # every parameter exactly once
    for g in opt.param_groups:
        assert g["lr"] == 1e-2 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6
        if impl == "foreach":
            assert g["foreach"] and not g["fused"]
        else:  # auto on CPU means fused
            assert g["fused"]


def test_frozen_parameters_are_left_out():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig(impl="foreach"), "cpu")
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model[0].weight) not in in_opt and id(model[1].bias) not in in_opt
    assert len(in_opt) == 4


def test_only_decayed_group_shrinks_under_zero_gradient():
    # With a zero gradient Adam's update is 0, so only decoupled weight decay moves parameters.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = OptimConfig(lr=0.1, weight_decay=0.5, impl="foreach")
    opt = build_optimizer(model, cfg, "cpu")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if n == "0.weight":
            torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5))
        else:
            torch.testing.assert_close(p, before[n])


def test_model_without_biases_gets_single_group():
    model = nn.Linear(4, 4, bias=False)
    opt = build_optimizer(model, OptimConfig(impl="foreach", weight_decay=0.2), "cpu")
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["weight_decay"] == 0.2


def test_lr_scaling_rules_follow_the_global_batch():
    from linscale.train.optim import scaled_lr

    cfg = OptimConfig(lr=1e-3, lr_scaling="linear", warmup_steps=5)
    assert scaled_lr(cfg, 128, 32)[0] == pytest.approx(4e-3)  # base = the task's default batch
    lr, note = scaled_lr(OptimConfig(lr=1e-3, lr_scaling="sqrt", base_batch=64), 16, 32)
    assert lr == pytest.approx(5e-4) and "sqrt" in note and "64" in note
    assert scaled_lr(OptimConfig(lr=1e-3, lr_scaling="none"), 128, 32) == (1e-3, "")
    assert scaled_lr(cfg, 32, 32) == (1e-3, "")  # the batch the LR was tuned for: unchanged
    assert "warmup" in scaled_lr(OptimConfig(lr=1e-3, lr_scaling="linear", warmup_steps=0), 64, 32)[1]
