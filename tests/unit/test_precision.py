"""The precision policy object and the precision/communication settings, without processes."""

import math

import pytest
import torch
from torch import nn

from linscale.config import ConfigError, ParallelConfig, load_config
from linscale.runtime.device import Device
from linscale.train.precision import Precision, check_combination, resolve_precision

STOP = {"train": {"max_steps": "1"}}


def _model_and_opt(fused: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused or None, foreach=None if fused else True)
    return model, opt


def _loss(model, scale: float = 1.0):
    torch.manual_seed(1)
    x = torch.randn(16, 4)
    return model(x).pow(2).mean() * scale


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("fp32", torch.float32),
        ("bf16-true", torch.float32),
        ("bf16-mixed", torch.bfloat16),
        ("fp16-mixed", torch.float16),
    ],
)
def test_autocast_runs_matrix_products_in_the_policy_dtype(name, dtype):
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with Precision(name, "cpu").autocast():
        assert (a @ b).dtype == dtype


def test_only_fp16_scales_and_only_bf16_true_changes_the_parameter_dtype():
    assert Precision("fp16-mixed", "cpu").scaler is not None
    for name in ("fp32", "bf16-mixed", "bf16-true"):
        assert Precision(name, "cpu").scaler is None
    assert Precision("bf16-true", "cpu").param_dtype == torch.bfloat16
    assert Precision("bf16-mixed", "cpu").param_dtype is None
    dtypes = {n: Precision(n, "cpu").compute_dtype for n in ("fp32", "bf16-mixed", "bf16-true", "fp16-mixed")}
    assert dtypes == {"fp32": "fp32", "bf16-mixed": "bf16", "bf16-true": "bf16", "fp16-mixed": "fp16"}


def test_auto_picks_bf16_mixed_only_where_bf16_is_fast(monkeypatch):
    dev = Device("cpu", 0, "gloo", "cpu", 1)
    monkeypatch.setattr(Device, "supports_fast_bf16", lambda self: True)
    assert resolve_precision("auto", dev).name == "bf16-mixed"
    monkeypatch.setattr(Device, "supports_fast_bf16", lambda self: False)
    assert resolve_precision("auto", dev).name == "fp32"
    assert resolve_precision("fp16-mixed", dev).name == "fp16-mixed"


def test_fp32_step_clips_then_steps():
    model, opt = _model_and_opt()
    p = Precision("fp32", "cpu")
    p.backward(_loss(model))
    before = [q.detach().clone() for q in model.parameters()]
    calls = []
    norm, ok = p.step(opt, lambda: calls.append("clip") or torch.tensor(1.0))
    assert calls == ["clip"] and norm == 1.0 and ok is True
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert p.skipped_steps == 0


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_scales_the_loss_and_clips_the_unscaled_gradients(fused):
    # The reference: the same step in fp32 without a scaler.
    ref_model, ref_opt = _model_and_opt(fused)
    _loss(ref_model).backward()
    true_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.1)
    ref_opt.step()

    model, opt = _model_and_opt(fused)
    p = Precision("fp16-mixed", "cpu")
    p.backward(_loss(model))  # no autocast: only the scaling is under test here
    scale = p.scaler.get_scale()
    assert scale == 2.0**16
    scaled = [q.grad.clone() for q in model.parameters()]
    seen = {}

    def clip():
        seen["grads"] = [q.grad.clone() for q in model.parameters()]
        return torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)

    norm, ok = p.step(opt, clip, check_finite=True)
    assert ok is True
    # backward produced scaled gradients; clipping saw (and the norm reports) the true ones.
    for s, g in zip(scaled, seen["grads"], strict=True):
        torch.testing.assert_close(s / scale, g)
    torch.testing.assert_close(norm, true_norm)
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert p.skipped_steps == 0


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_fp16_skips_a_step_with_inf_or_nan_gradients(fused, bad):
    model, opt = _model_and_opt(fused)
    p = Precision("fp16-mixed", "cpu")
    p.backward(_loss(model))
    p.step(opt, lambda: None)  # a good step first, so that the optimizer has states
    opt.zero_grad()
    before = [q.detach().clone() for q in model.parameters()]
    states = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    scale = p.scaler.get_scale()
    p.backward(_loss(model) + model[0].weight[0, 0] * bad)
    norm, ok = p.step(opt, lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    assert not math.isfinite(norm) and not bool(ok)
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b), "the update was not skipped"
    for k, v in opt.state[model[0].weight].items():
        assert torch.equal(v, states[k]), f"optimizer state {k} changed"
    assert p.skipped_steps == 1
    assert p.scaler.get_scale() == scale / 2  # the scale backs off
    opt.zero_grad()
    p.backward(_loss(model))
    p.step(opt, lambda: None)
    assert p.skipped_steps == 1  # and the next good step goes through
    assert not torch.equal(before[0], model[0].weight)


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["ddp", "zero1"])
def test_bf16_true_needs_a_sharded_strategy(strategy):
    with pytest.raises(ConfigError) as err:
        check_combination("bf16-true", strategy, ParallelConfig(), 2)
    msg = str(err.value)
    assert "bf16-true" in msg and f"parallel.strategy={strategy}" in msg and "--runtime.precision=bf16-mixed" in msg
    assert "zero3" in msg
    assert isinstance(err.value, ValueError)


def test_bf16_true_needs_several_processes():
    with pytest.raises(ConfigError, match="2 or more processes.*bf16-mixed"):
        check_combination("bf16-true", "zero3", ParallelConfig(), 1)


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp", "hsdp", "auto"])
def test_bf16_true_with_sharded_strategies_is_fine(strategy):
    check_combination("bf16-true", strategy, ParallelConfig(reduce_dtype="bf16"), 2)


def test_comm_hooks_and_reduce_dtype_belong_to_their_strategies():
    for hook in ("bf16", "fp16", "powersgd"):
        for strategy in ("ddp", "zero1"):
            check_combination("fp32", strategy, ParallelConfig(comm_hook=hook), 2)
        with pytest.raises(ConfigError, match="applies to ddp and zero1.*reduce_dtype=bf16"):
            check_combination("fp32", "zero3", ParallelConfig(comm_hook=hook), 2)
    with pytest.raises(ConfigError, match="applies to zero2, zero3, fsdp and hsdp.*comm_hook=bf16"):
        check_combination("bf16-mixed", "ddp", ParallelConfig(reduce_dtype="bf16"), 2)
    # One process communicates nothing: the settings are harmless there.
    check_combination("fp32", "zero3", ParallelConfig(comm_hook="fp16"), 1)


def test_new_settings_are_checked_and_list_their_choices():
    cfg = load_config(None, {**STOP, "runtime": {"precision": "fp16-mixed"}}, None)
    assert cfg.runtime.precision == "fp16-mixed" and cfg.parallel.comm_hook == "none"
    assert (cfg.parallel.powersgd_rank, cfg.parallel.powersgd_warmup, cfg.parallel.reduce_dtype) == (1, 10, "fp32")
    with pytest.raises(ConfigError) as err:
        load_config(None, {**STOP, "parallel": {"comm_hook": "int8"}}, None)
    for choice in ("none", "bf16", "fp16", "powersgd", "'int8'", "parallel.comm_hook"):
        assert choice in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, {**STOP, "runtime": {"precision": "fp8"}}, None)
    for choice in ("auto", "fp32", "bf16-mixed", "bf16-true", "fp16-mixed"):
        assert choice in str(err.value)
    with pytest.raises(ConfigError, match="parallel.reduce_dtype must be one of fp32, bf16"):
        ParallelConfig(reduce_dtype="fp16")
    with pytest.raises(ConfigError, match="powersgd_warmup must be >= 2"):
        ParallelConfig(powersgd_warmup=1)
    with pytest.raises(ConfigError, match="powersgd_rank must be >= 1"):
        ParallelConfig(powersgd_rank=0)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_fp32_check_finite_skips_a_nonfinite_step(bad):
    model, opt = _model_and_opt()
    p = Precision("fp32", "cpu")
    p.backward(_loss(model) + model[0].weight[0, 0] * bad)
    before = [q.detach().clone() for q in model.parameters()]
    norm, ok = p.step(opt, lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), check_finite=True)
    assert ok is False and not math.isfinite(norm)
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b), "the update was not skipped"
    assert not opt.state, "the optimizer took a step"
