"""A decoder-only transformer (GPT-2 layout), with exact parameter and FLOP counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True)
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                "pick n_head among the divisors of d_model"
            )

    def num_params(self) -> int:
        """Exact parameter count (the output projection is tied to the token embedding)."""
        d, f, L = self.d_model, self.mlp_ratio * self.d_model, self.n_layer
        block = (2 * 2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        return self.vocab_size * d + self.block_size * d + L * block + 2 * d

    def train_flops_per_token(self) -> int:
        """Matrix-product FLOPs of forward + backward for one token at full context.

        Forward per layer and token: QKV, output, and the two MLP projections (2*d*(3d+d+2f)),
        plus attention scores and their weighted sum over the whole block (2 * 2*T*d, counted
        dense as the kernels compute it). The LM head adds 2*d*V. Backward costs twice forward.
        """
        d, f, L, T, V = self.d_model, self.mlp_ratio * self.d_model, self.n_layer, self.block_size, self.vocab_size
        forward = L * (2 * d * (4 * d + 2 * f) + 4 * T * d) + 2 * d * V
        return 3 * forward


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BTC.shape
        q, k, v = self.qkv(x_BTC).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, C/heads)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(approximate="tanh"),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
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
        pos = torch.arange(T, device=idx_BT.device)
        x = self.tok_emb(idx_BT) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        # The output projection is tied to the token embedding.
        return F.linear(self.ln_f(x), self.tok_emb.weight)

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
