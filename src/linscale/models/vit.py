"""A Vision Transformer for image classification, with exact parameter and FLOP counts.

The layout of Dosovitskiy et al. 2021 ("An Image is Worth 16x16 Words"): the image is cut into
non-overlapping patches by a convolution whose kernel and stride are the patch size, a learned
class token is prepended, learned position embeddings are added, then `depth` pre-LayerNorm
blocks (multi-head self-attention, then a Linear-GELU-Linear MLP), a final LayerNorm, and a
linear head on the class token. `SIZES` names the standard shapes; `ViTConfig.named("vit-b16")`
builds one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from linscale.models import named_config
from linscale.models.gpt import SelfAttention

#: Named shapes, all at 224 x 224 with 1000 classes except `tiny`.
#: * tiny: a test model for 32 x 32 images and 10 classes (75,082 parameters).
#: * vit-s16: ViT-S/16 (Touvron et al. 2021, DeiT-S): 22,050,664 parameters.
#: * vit-b16, vit-l16, vit-h14: ViT-B/16, ViT-L/16, ViT-H/14 (Dosovitskiy et al. 2021, table 1):
#:   86,567,656, 304,326,632 and 632,045,800 parameters.
#: * vit-g14: ViT-g/14 (Zhai et al. 2022, "Scaling Vision Transformers": width 1408,
#:   depth 40, MLP 6144, 16 heads): 1,012,611,432 parameters with a class token and 1000 classes.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=32, patch_size=4, num_classes=10, width=64, depth=2, heads=4, mlp_dim=128),
    "vit-s16": dict(image_size=224, patch_size=16, width=384, depth=12, heads=6, mlp_dim=1536),
    "vit-b16": dict(image_size=224, patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072),
    "vit-l16": dict(image_size=224, patch_size=16, width=1024, depth=24, heads=16, mlp_dim=4096),
    "vit-h14": dict(image_size=224, patch_size=14, width=1280, depth=32, heads=16, mlp_dim=5120),
    "vit-g14": dict(image_size=224, patch_size=14, width=1408, depth=40, heads=16, mlp_dim=6144),
}


@dataclass(kw_only=True)
class ViTConfig:
    image_size: int = 32  # square images of image_size x image_size pixels
    patch_size: int = 4
    channels: int = 3
    num_classes: int = 1000
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "channels", "num_classes", "width", "depth", "heads", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.image_size % self.patch_size:
            p = self.patch_size
            below = self.image_size // p * p
            candidates = [c for c in (below, below + p) if c > 0]
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size={p}; use an image_size that is a "
                f"multiple of {p} (such as {' or '.join(map(str, candidates))}) or a patch_size among the divisors "
                f"of {self.image_size}"
            )
        if self.width % self.heads:
            raise ValueError(
                f"width={self.width} is not divisible by heads={self.heads}; pick heads among the divisors of width"
            )

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Sequence length of the blocks: the patches and the class token."""
        return self.num_patches + 1

    @classmethod
    def named(cls, name: str, **overrides: Any) -> ViTConfig:
        """The named shape from `SIZES`, with fields replaced by `overrides`."""
        return named_config(cls, SIZES, name, overrides)

    def num_params(self) -> int:
        """Exact parameter count, from the configuration alone."""
        d, m, p, C, K = self.width, self.mlp_dim, self.patch_size, self.channels, self.num_classes
        patch_embed = C * p * p * d + d
        tokens = d + self.num_tokens * d  # class token and position embeddings
        block = (2 * 2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
        return patch_embed + tokens + self.depth * block + 2 * d + (d * K + K)

    def patch_embed_flops(self) -> int:
        """Forward FLOPs of the patch convolution for one image: a (C*p*p) x width product per patch."""
        return 2 * self.channels * self.patch_size**2 * self.width * self.num_patches

    def forward_flops(self) -> int:
        """Matrix-product FLOPs of one image's forward pass.

        The patch convolution; per block and token the QKV, output and two MLP projections
        (2*d*(4d + 2*mlp_dim)) and attention scores and their weighted sum over all N tokens
        (2 * 2*N*d, no mask); the head on the class token (2*d*classes). Normalisation, GELU,
        softmax and additions are not matrix products and are not counted (nor does
        `FlopCounterMode` count them)."""
        d, m, N = self.width, self.mlp_dim, self.num_tokens
        block = N * 2 * d * (4 * d + 2 * m) + 4 * N * N * d
        return self.patch_embed_flops() + self.depth * block + 2 * d * self.num_classes

    def train_flops_per_sample(self) -> int:
        """Matrix-product FLOPs of forward + backward for one image.

        Backward costs twice forward (gradients of the inputs and of the weights) except for the
        patch convolution: the image needs no gradient, so its backward computes only the weight
        gradient, once its forward. This is what `FlopCounterMode` counts on a forward+backward
        with an input that does not require grad, as training data does not."""
        return 3 * self.forward_flops() - self.patch_embed_flops()


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = SelfAttention(cfg.width, cfg.heads, cfg.dropout, causal=False)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, cfg.mlp_dim),
            nn.GELU(),
            nn.Linear(cfg.mlp_dim, cfg.width),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.patch_embed = nn.Conv2d(cfg.channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.num_tokens, d))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.num_classes)
        self.apply(self._init)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Conv2d):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) for images (B, channels, image_size, image_size)."""
        S = self.cfg.image_size
        if tuple(images_BCHW.shape[-2:]) != (S, S):
            h, w = images_BCHW.shape[-2:]
            raise ValueError(
                f"images of {h}x{w} pixels, but the model has position embeddings for {S}x{S}; "
                f"resize the images to {S}x{S} or build the model with image_size={h}"
            )
        x = self.patch_embed(images_BCHW).flatten(2).transpose(1, 2)  # (B, patches, width)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.drop(x + self.pos_emb)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, 0]))
