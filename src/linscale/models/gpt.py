"""A decoder-only transformer (GPT-2 layout), with exact parameter and FLOP counts.

Options beyond GPT-2: rotary position embeddings (`pos="rotary"`, RoPE on queries and keys,
no position parameters) and an untied output head (`tie_embeddings=False`). `SIZES` names the
standard shapes; `GPTConfig.named("gpt2-124m")` builds one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from linscale.models import named_config

POS_SCHEMES = ("learned", "rotary")

#: Named shapes. All use the GPT-2 block (pre-LayerNorm, GELU MLP of 4 x width, biases).
#: * tiny: the `make demo` model (0.84M parameters, byte vocabulary), trains on 2 CPU cores.
#: * gpt2-124m / gpt2-350m: GPT-2 small and medium (124,439,808 and 354,823,168 parameters).
#: * gpt2-1.3b: GPT-3 XL's shape (Brown et al. 2020, table 2.1: 24 layers, width 2048, context
#:   2048, head size 128) with 2048 / 128 = 16 heads, as GPT-Neo 1.3B and Megatron's 1.3B use
#:   (the table's "24 heads" does not divide the width); GPT-2 vocabulary and learned positions.
#: * yuan-4.7b: Yuan 1.0's 4.7B shape (40 layers, hidden 3072, 24 heads, context 2048,
#:   vocabulary 53,005) with rotary positions and a tied head: 4.69e9 parameters.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, block_size=128, n_layer=4, n_head=4, d_model=128),
    "gpt2-124m": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768),
    "gpt2-350m": dict(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, d_model=1024),
    "gpt2-1.3b": dict(vocab_size=50257, block_size=2048, n_layer=24, n_head=16, d_model=2048),
    "yuan-4.7b": dict(vocab_size=53005, block_size=2048, n_layer=40, n_head=24, d_model=3072, pos="rotary"),
}


@dataclass(kw_only=True)
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    pos: str = "learned"  # "learned" (position embedding table) or "rotary" (RoPE on q and k)
    tie_embeddings: bool = True  # the output head shares the token embedding's weight
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.pos not in POS_SCHEMES:
            raise ValueError(f"pos must be one of {', '.join(POS_SCHEMES)}; got {self.pos!r}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                "pick n_head among the divisors of d_model"
            )
        if self.pos == "rotary" and self.head_dim % 2:
            raise ValueError(
                f"pos='rotary' needs an even head size, got d_model/n_head = {self.d_model}/{self.n_head} = "
                f"{self.head_dim}; change n_head or d_model so that their quotient is even"
            )
        if self.rope_base <= 1:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def named(cls, name: str, **overrides: Any) -> GPTConfig:
        """The named shape from `SIZES`, with fields replaced by `overrides`."""
        return named_config(cls, SIZES, name, overrides)

    def num_params(self) -> int:
        """Exact parameter count, from the configuration alone."""
        d, f, L = self.d_model, self.mlp_ratio * self.d_model, self.n_layer
        block = (2 * 2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        embeddings = self.vocab_size * d
        if self.pos == "learned":
            embeddings += self.block_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return embeddings + L * block + 2 * d + head

    def train_flops_per_token(self) -> int:
        """Matrix-product FLOPs of forward + backward for one token at full context.

        Forward per layer and token: QKV, output, and the two MLP projections (2*d*(3d+d+2f)),
        plus attention scores and their weighted sum over the whole block (2 * 2*T*d, counted
        dense as the kernels compute it). The LM head adds 2*d*V. Backward costs twice forward.
        Rotary positions and an untied head add no matrix products (RoPE is elementwise, and
        `FlopCounterMode` counts only matrix products and convolutions), so the count is the
        same for every `pos` and `tie_embeddings`.
        """
        d, f, L, T, V = self.d_model, self.mlp_ratio * self.d_model, self.n_layer, self.block_size, self.vocab_size
        forward = L * (2 * d * (4 * d + 2 * f) + 4 * T * d) + 2 * d * V
        return 3 * forward


def rope_tables(T: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, (T, head_dim/2) each, in float32."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + h/2]) of x (B, heads, T, h) by position-dependent angles (RoPE)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with scaled-dot-product attention: causal for the GPT, full for
    the ViT (models/vit.py); optional rotary positions on queries and keys."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0, causal: bool = True) -> None:
        super().__init__()
        self.n_head = heads
        self.causal = causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x_BTC: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x_BTC.shape
        q, k, v = self.qkv(x_BTC).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, C/heads)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.n_head, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(approximate="tanh"),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), rope)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # Rotary positions have no parameters: the rotation is computed in forward.
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        # GPT-2: scale the residual projections by 1/sqrt(2 * layers).
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx_BT: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T)."""
        T = idx_BT.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context block_size={self.cfg.block_size}")
        x = self.tok_emb(idx_BT)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx_BT.device))
        else:
            rope = rope_tables(T, self.cfg.head_dim, self.cfg.rope_base, idx_BT.device)
        for block in self.blocks:
            x = block(x, rope)
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.ln_f(x), head)

    @torch.no_grad()
    def generate(
        self,
        idx_BT: torch.Tensor,
        num_new: int,
        temperature: float = 0.8,
        top_k: int = 40,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        for _ in range(num_new):
            logits = self(idx_BT[:, -self.cfg.block_size :])[:, -1, :] / temperature
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx_BT = torch.cat([idx_BT, nxt], dim=1)
        return idx_BT
