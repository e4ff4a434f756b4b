"""linscale.models.gpt: exact parameter and FLOP counts of the GPT, rotary positions, untied heads, named sizes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from linscale.models.gpt import GPT, SIZES, GPTConfig

CONFIGS = [
    GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32),
    GPTConfig(vocab_size=50, block_size=24, n_layer=3, n_head=3, d_model=48, mlp_ratio=2),
    GPTConfig(vocab_size=17, block_size=8, n_layer=1, n_head=1, d_model=20, mlp_ratio=3),
]
IDS = [f"L{c.n_layer}-d{c.d_model}-V{c.vocab_size}-T{c.block_size}" for c in CONFIGS]
# Every position scheme with every head setting (CONFIGS[2] has an odd head size: learned only).
VARIANTS = [
    dataclasses.replace(c, pos=pos, tie_embeddings=tie)
    for c in CONFIGS[:2]
    for pos in ("learned", "rotary")
    for tie in (True, False)
]
VARIANT_IDS = [f"L{c.n_layer}-d{c.d_model}-{c.pos}-{'tied' if c.tie_embeddings else 'untied'}" for c in VARIANTS]


@pytest.mark.parametrize("cfg", [*CONFIGS, GPTConfig(), *VARIANTS], ids=[*IDS, "default", *VARIANT_IDS])
def test_num_params_is_exact(cfg):
    model = GPT(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


def test_output_head_is_tied():
    cfg = CONFIGS[0]
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    logits = model(x)
    assert logits.shape == (2, cfg.block_size, cfg.vocab_size)
    logits.sum().backward()
    # The head's gradient lands in the token embedding: rows of unused tokens still get one.
    unused = sorted(set(range(cfg.vocab_size)) - set(x.flatten().tolist()))
    assert unused and model.tok_emb.weight.grad[unused].abs().sum() > 0


def counted_flops(cfg: GPTConfig, batch: int, loss_kind: str) -> int:
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    with FlopCounterMode(display=False) as counter:
        logits = model(x)
        if loss_kind == "sum":
            loss = logits.sum()
        else:
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), x.reshape(-1))
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("loss_kind", ["sum", "cross_entropy"])
@pytest.mark.parametrize("cfg", [*CONFIGS, *VARIANTS], ids=[*IDS, *VARIANT_IDS])
def test_train_flops_match_flop_counter(cfg, loss_kind):
    # The math SDPA kernel decomposes attention into matrix products the counter sees; the
    # formula counts attention dense, as that kernel computes it.
    batch = 3
    with sdpa_kernel(SDPBackend.MATH):
        counted = counted_flops(cfg, batch, loss_kind)
    assert cfg.train_flops_per_token() * cfg.block_size * batch == counted


@pytest.mark.xfail(
    strict=True,
    reason="torch's FlopCounterMode has no formula for aten._scaled_dot_product_flash_attention_for_cpu, so with "
    "the default CPU SDPA kernel attention FLOPs (4*T*d per token and layer, x3) are not counted; which is why "
    "linscale.train.loop.count_flops_per_sample counts with the math kernel (tests/unit/test_loop.py)",
)
@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=IDS[:2])
def test_train_flops_match_flop_counter_default_cpu_kernel(cfg):
    assert cfg.train_flops_per_token() * cfg.block_size * 2 == counted_flops(cfg, 2, "cross_entropy")


@pytest.mark.parametrize(("d_model", "n_head"), [(30, 4), (128, 3), (10, 20)])
def test_heads_must_divide_width(d_model, n_head):
    with pytest.raises(ValueError, match=f"d_model={d_model} is not divisible by n_head={n_head}"):
        GPTConfig(d_model=d_model, n_head=n_head)


def test_generate_appends_tokens_within_vocab():
    cfg = CONFIGS[2]
    model = GPT(cfg).eval()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    out = model.generate(prompt, cfg.block_size + 4, generator=gen)  # longer than the context
    assert out.shape == (1, 3 + cfg.block_size + 4)
    assert torch.equal(out[:, :3], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < cfg.vocab_size


def test_untied_head_is_a_separate_weight():
    cfg = dataclasses.replace(CONFIGS[0], tie_embeddings=False)
    model = GPT(cfg)
    assert model.lm_head is not None and model.lm_head.weight is not model.tok_emb.weight
    x = torch.randint(0, cfg.vocab_size // 2, (2, cfg.block_size))  # the upper half of the vocabulary unused
    model(x).sum().backward()
    unused = list(range(cfg.vocab_size // 2, cfg.vocab_size))
    # Only the embedding rows of tokens in the input get a gradient; every head row gets one.
    assert model.tok_emb.weight.grad[unused].abs().sum() == 0
    assert (model.lm_head.weight.grad.abs().sum(dim=1) > 0).all()


def test_rotary_has_no_position_parameters():
    cfg = dataclasses.replace(CONFIGS[0], pos="rotary")
    names = [n for n, _ in GPT(cfg).named_parameters()]
    assert not any("pos" in n for n in names)
    assert "pos_emb.weight" in dict(GPT(CONFIGS[0]).named_parameters())


def _last_logits_after_swapping_two_prefix_tokens(cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():  # sharp attention (at initialisation it is nearly uniform)
        for block in model.blocks:
            block.attn.qkv.weight.mul_(20)
    x = torch.randint(0, cfg.vocab_size, (1, cfg.block_size))
    while x[0, 1] == x[0, 4]:
        x[0, 4] = (x[0, 4] + 1) % cfg.vocab_size
    swapped = x.clone()
    swapped[0, [1, 4]] = x[0, [4, 1]]
    with torch.no_grad():
        return model(x)[0, -1], model(swapped)[0, -1]


def test_rotary_makes_the_output_depend_on_positions(monkeypatch):
    # One layer of causal attention without positions sees its prefix as a set: swapping two
    # earlier tokens leaves the last position's output unchanged. Rotary positions must break that.
    cfg = GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=16, pos="rotary")
    a, b = _last_logits_after_swapping_two_prefix_tokens(cfg)
    assert (a - b).abs().max() > 1e-2
    # The control: with the rotation switched off the output is the same, so the check above can fail.
    import linscale.models.gpt as gpt_module

    monkeypatch.setattr(gpt_module, "apply_rotary", lambda x, cos, sin: x)
    a, b = _last_logits_after_swapping_two_prefix_tokens(cfg)
    torch.testing.assert_close(a, b)


def test_rotary_scores_depend_only_on_relative_position():
    from linscale.models.gpt import apply_rotary, rope_tables

    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 1, 8, dtype=torch.float64)
    cos, sin = rope_tables(12, 8, 10000.0, torch.device("cpu"))

    def score(i: int, j: int) -> float:
        qi = apply_rotary(q, cos[i : i + 1].double(), sin[i : i + 1].double())
        kj = apply_rotary(k, cos[j : j + 1].double(), sin[j : j + 1].double())
        return float((qi * kj).sum())

    assert score(5, 2) == pytest.approx(score(9, 6), rel=1e-6)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-2)


@pytest.mark.parametrize("tie", [True, False])
def test_rotary_model_trains(tie):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=48, block_size=16, n_layer=2, n_head=2, d_model=32, pos="rotary", tie_embeddings=tie)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, cfg.vocab_size, (8, cfg.block_size + 1))
    losses = []
    for _ in range(25):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(cfg.vocab_size), abs=0.3)
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.parametrize("name", list(SIZES))
def test_named_sizes_count_exactly_without_allocating(name):
    cfg = GPTConfig.named(name)
    with torch.device("meta"):
        model = GPT(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


def test_named_sizes_have_their_published_shapes():
    # GPT-2 small and medium as published (Hugging Face counts, tied head).
    assert GPTConfig.named("gpt2-124m").num_params() == 124_439_808
    assert GPTConfig.named("gpt2-350m").num_params() == 354_823_168
    assert 1.25e9 < GPTConfig.named("gpt2-1.3b").num_params() < 1.35e9
    yuan = GPTConfig.named("yuan-4.7b")
    assert (yuan.n_layer, yuan.d_model, yuan.n_head, yuan.block_size, yuan.vocab_size) == (40, 3072, 24, 2048, 53005)
    assert yuan.pos == "rotary"
    assert 4.6e9 < yuan.num_params() < 4.8e9
    tiny = GPTConfig.named("tiny")
    assert 0.8e6 < tiny.num_params() < 0.9e6  # the demo's 0.84M


def test_named_sizes_take_overrides_and_reject_unknown_names():
    cfg = GPTConfig.named("gpt2-124m", block_size=256, tie_embeddings=False)
    assert (cfg.block_size, cfg.d_model, cfg.tie_embeddings) == (256, 768, False)
    assert cfg.num_params() == 124_439_808 - (1024 - 256) * 768 + 50257 * 768
    with pytest.raises(ValueError, match="unknown model size 'gpt5'.*tiny, gpt2-124m, gpt2-350m"):
        GPTConfig.named("gpt5")
    with pytest.raises(ValueError, match="unknown GPTConfig field.*n_layers"):
        GPTConfig.named("tiny", n_layers=3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pos": "alibi"}, "pos must be one of learned, rotary; got 'alibi'"),
        ({"pos": "rotary", "d_model": 30, "n_head": 2}, "pos='rotary' needs an even head size.*= 15"),
        ({"n_layer": 0}, "n_layer must be a positive integer, got 0"),
        ({"vocab_size": -1}, "vocab_size must be a positive integer"),
        ({"n_head": 0}, "n_head must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_configs_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


def test_longer_input_than_the_context_is_refused():
    cfg = dataclasses.replace(CONFIGS[0], pos="rotary")
    with pytest.raises(ValueError, match="longer than the context block_size=16"):
        GPT(cfg)(torch.zeros(1, 17, dtype=torch.long))
