"""linscale.models.gpt: exact parameter and FLOP counts of the GPT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from linscale.models.gpt import GPT, GPTConfig

CONFIGS = [
    GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32),
    GPTConfig(vocab_size=50, block_size=24, n_layer=3, n_head=3, d_model=48, mlp_ratio=2),
    GPTConfig(vocab_size=17, block_size=8, n_layer=1, n_head=1, d_model=20, mlp_ratio=3),
]
IDS = [f"L{c.n_layer}-d{c.d_model}-V{c.vocab_size}-T{c.block_size}" for c in CONFIGS]


@pytest.mark.parametrize("cfg", [*CONFIGS, GPTConfig()], ids=[*IDS, "default"])
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
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
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
