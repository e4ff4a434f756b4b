"""linscale.models.vit and linscale.models.resnet: exact parameter and FLOP counts, named sizes,
config errors, forward shapes, and the `blocks` that sharding and activation checkpointing use."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from linscale.models import resnet as resnet_module
from linscale.models import vit as vit_module
from linscale.models.resnet import BasicBlock, Bottleneck, ResNet, ResNetConfig
from linscale.models.vit import ViT, ViTConfig
from linscale.runtime.parallel import checkpoint_blocks

VIT_CONFIGS = [
    ViTConfig.named("tiny"),
    ViTConfig(image_size=24, patch_size=6, channels=1, num_classes=7, width=48, depth=3, heads=3, mlp_dim=80),
    ViTConfig(image_size=20, patch_size=20, channels=2, num_classes=3, width=20, depth=1, heads=1, mlp_dim=36),
]
VIT_IDS = [f"img{c.image_size}-p{c.patch_size}-d{c.width}-L{c.depth}" for c in VIT_CONFIGS]

RESNET_CONFIGS = [
    ResNetConfig.named("tiny"),
    # Odd resolutions exercise the rounding of strided convolutions and pooling.
    ResNetConfig(block="bottleneck", layers=(1, 2, 1), width=8, num_classes=5, image_size=37),
    ResNetConfig(block="basic", layers=(2, 1, 1), width=8, channels=1, num_classes=4, small_input=True, image_size=15),
]
RESNET_IDS = [f"{c.block}-{'x'.join(map(str, c.layers))}-w{c.width}-img{c.image_size}" for c in RESNET_CONFIGS]


@functools.cache
def real_vit(name: str) -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig.named(name))


@functools.cache
def real_resnet(name: str) -> ResNet:
    torch.manual_seed(0)
    return ResNet(ResNetConfig.named(name))


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_flops(model: torch.nn.Module, images: torch.Tensor) -> int:
    """FLOPs FlopCounterMode counts in one forward+backward, with the math attention kernel."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(images).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def images(cfg, batch: int, requires_grad: bool = False, size: int | None = None) -> torch.Tensor:
    size = size or cfg.image_size
    return torch.randn(batch, cfg.channels, size, size).requires_grad_(requires_grad)


# ---- ViT ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [*VIT_CONFIGS, ViTConfig()], ids=[*VIT_IDS, "default"])
def test_vit_num_params_is_exact(cfg):
    assert cfg.num_params() == numel(ViT(cfg))


def test_vit_b16_num_params_is_exact_and_published():
    assert ViTConfig.named("vit-b16").num_params() == numel(real_vit("vit-b16")) == 86_567_656


@pytest.mark.parametrize("cfg", VIT_CONFIGS, ids=VIT_IDS)
def test_vit_train_flops_match_flop_counter(cfg):
    torch.manual_seed(0)
    assert train_flops(ViT(cfg), images(cfg, 3)) == 3 * cfg.train_flops_per_sample()


def test_vit_forward_flops_match_flop_counter():
    cfg = VIT_CONFIGS[1]
    model = ViT(cfg)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(images(cfg, 2))
    assert counter.get_total_flops() == 2 * cfg.forward_flops()


def test_vit_b16_train_flops_match_flop_counter():
    cfg = ViTConfig.named("vit-b16")
    assert train_flops(real_vit("vit-b16"), images(cfg, 1)) == cfg.train_flops_per_sample()
    # The published 17.6 GFLOPs (multiply-adds) of a ViT-B/16 forward at 224 x 224.
    assert cfg.forward_flops() / 2 == pytest.approx(17.6e9, rel=0.01)


@pytest.mark.parametrize("cfg", VIT_CONFIGS[:2], ids=VIT_IDS[:2])
def test_vit_image_gradient_is_not_counted(cfg):
    # The convention: training images need no gradient, so the patch convolution's backward is
    # its weight gradient only. An image that requires grad adds the input gradient: one more
    # forward's worth of the patch convolution, and nothing else.
    model = ViT(cfg)
    with_grad = train_flops(model, images(cfg, 2, requires_grad=True))
    assert with_grad == 2 * (cfg.train_flops_per_sample() + cfg.patch_embed_flops())
    assert with_grad == 2 * 3 * cfg.forward_flops()


def meta_train_flops(model_cls, cfg) -> int:
    """FlopCounterMode on the meta device: shapes only, no memory and no arithmetic."""
    with torch.device("meta"):
        model = model_cls(cfg)
        return train_flops(model, images(cfg, 2)) // 2


@pytest.mark.parametrize(
    ("model_cls", "cfg"),
    [(ViT, ViTConfig.named("vit-g14")), (ResNet, ResNetConfig.named("resnet152"))],
    ids=["vit-g14", "resnet152"],
)
def test_largest_named_sizes_train_flops_match_flop_counter_on_meta(model_cls, cfg):
    assert meta_train_flops(model_cls, cfg) == cfg.train_flops_per_sample()


@pytest.mark.parametrize("name", list(vit_module.SIZES))
def test_vit_named_sizes_count_exactly_without_allocating(name):
    cfg = ViTConfig.named(name)
    with torch.device("meta"):
        model = ViT(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert cfg.num_params() == numel(model)


def test_vit_named_sizes_have_their_published_shapes():
    assert ViTConfig.named("vit-s16").num_params() == 22_050_664
    assert ViTConfig.named("vit-l16").num_params() == 304_326_632
    assert ViTConfig.named("vit-h14").num_params() == 632_045_800
    g = ViTConfig.named("vit-g14")
    assert (g.image_size, g.patch_size, g.width, g.depth, g.heads, g.mlp_dim) == (224, 14, 1408, 40, 16, 6144)
    print(f"vit-g14: {g.num_params():,} parameters")
    assert 1.0e9 < g.num_params() < 1.05e9
    assert g.num_tokens == 257 and g.num_classes == 1000
    tiny = ViTConfig.named("tiny")
    assert (tiny.image_size, tiny.patch_size, tiny.width, tiny.depth, tiny.heads, tiny.mlp_dim) == (
        32,
        4,
        64,
        2,
        4,
        128,
    )
    # Published multiply-adds of a forward pass: ViT-L/16 61.6G, ViT-H/14 167G.
    assert ViTConfig.named("vit-l16").forward_flops() / 2 == pytest.approx(61.6e9, rel=0.01)
    assert ViTConfig.named("vit-h14").forward_flops() / 2 == pytest.approx(167e9, rel=0.01)


def test_vit_named_sizes_take_overrides_and_reject_unknown_names():
    cfg = ViTConfig.named("vit-b16", num_classes=10, image_size=384)
    assert (cfg.num_classes, cfg.image_size, cfg.width, cfg.num_tokens) == (10, 384, 768, 577)
    assert cfg.num_params() == 86_567_656 - 990 * 769 + (577 - 197) * 768
    with pytest.raises(ValueError, match="unknown model size 'vit-z99'.*tiny, vit-s16, vit-b16"):
        ViTConfig.named("vit-z99")
    with pytest.raises(ValueError, match="unknown ViTConfig field.*patch;"):
        ViTConfig.named("tiny", patch=8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"image_size": 225, "patch_size": 16},
            "image_size=225 is not divisible by patch_size=16; use an image_size that is a multiple of 16 "
            r"\(such as 224 or 240\) or a patch_size among the divisors of 225",
        ),
        ({"image_size": 10, "patch_size": 16}, r"multiple of 16 \(such as 16\)"),
        ({"width": 100, "heads": 3}, "width=100 is not divisible by heads=3; pick heads among the divisors of width"),
        ({"depth": 0}, "depth must be a positive integer, got 0"),
        ({"mlp_dim": 1.5}, "mlp_dim must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_vit_bad_configs_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViTConfig(**kwargs)


def test_vit_forward_shape_and_wrong_resolution():
    cfg = VIT_CONFIGS[1]
    model = ViT(cfg)
    assert model(images(cfg, 5)).shape == (5, cfg.num_classes)
    # channels_last images work as they are.
    x = images(cfg, 2)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), model(x))
    with pytest.raises(
        ValueError, match="images of 32x32 pixels.*for 24x24; resize.*or build the model with image_size=32"
    ):
        model(torch.randn(1, 1, 32, 32))


def test_vit_blocks_are_the_repeated_blocks():
    cfg = VIT_CONFIGS[1]
    model = ViT(cfg)
    assert isinstance(model.blocks, torch.nn.ModuleList)
    assert len(model.blocks) == cfg.depth and all(type(b) is vit_module.Block for b in model.blocks)
    outside = numel(model) - sum(numel(b) for b in model.blocks)
    d = cfg.width
    # What stays outside the blocks: patch embedding, class token, positions, final norm, head.
    assert outside == (cfg.channels * cfg.patch_size**2 + 1) * d + (1 + cfg.num_tokens) * d + 2 * d + (d + 1) * 7


# ---- ResNet -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [*RESNET_CONFIGS, ResNetConfig(), ResNetConfig(block="bottleneck", layers=(2,), width=4, small_input=True)],
    ids=[*RESNET_IDS, "default", "one-stage"],
)
def test_resnet_num_params_is_exact(cfg):
    assert cfg.num_params() == numel(ResNet(cfg))


@pytest.mark.parametrize(("name", "count"), [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_resnet_published_counts_on_the_real_module(name, count):
    assert ResNetConfig.named(name).num_params() == numel(real_resnet(name)) == count


@pytest.mark.parametrize("cfg", RESNET_CONFIGS, ids=RESNET_IDS)
def test_resnet_train_flops_match_flop_counter(cfg):
    torch.manual_seed(0)
    assert train_flops(ResNet(cfg), images(cfg, 2)) == 2 * cfg.train_flops_per_sample()


@pytest.mark.parametrize(("name", "image_size"), [("resnet18", 112), ("resnet50", 64)])
def test_resnet_named_train_flops_match_flop_counter(name, image_size):
    cfg = ResNetConfig.named(name, image_size=image_size)
    assert train_flops(real_resnet(name), images(cfg, 1)) == cfg.train_flops_per_sample()


def test_resnet_forward_flops_are_published_and_match_flop_counter():
    # Published multiply-adds of a forward pass at 224 x 224: ResNet-18 1.8G; ResNet-50 4.1G with
    # the stride in the 3x3 convolution (3.8G in He et al. 2016, which strides in the first 1x1).
    assert ResNetConfig.named("resnet18").forward_flops() / 2 == pytest.approx(1.81e9, rel=0.01)
    assert ResNetConfig.named("resnet50").forward_flops() / 2 == pytest.approx(4.09e9, rel=0.01)
    cfg = RESNET_CONFIGS[1]
    model = ResNet(cfg)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images(cfg, 2))
    assert counter.get_total_flops() == 2 * cfg.forward_flops()


@pytest.mark.parametrize("cfg", RESNET_CONFIGS[1:], ids=RESNET_IDS[1:])
def test_resnet_image_gradient_is_not_counted(cfg):
    # As for the ViT: the stem convolution's input gradient is counted only if the image requires grad.
    with_grad = train_flops(ResNet(cfg), images(cfg, 2, requires_grad=True))
    assert with_grad == 2 * (cfg.train_flops_per_sample() + cfg.stem_flops()) == 2 * 3 * cfg.forward_flops()


@pytest.mark.parametrize("name", list(resnet_module.SIZES))
def test_resnet_named_sizes_count_exactly_without_allocating(name):
    cfg = ResNetConfig.named(name)
    with torch.device("meta"):
        model = ResNet(cfg)
    assert cfg.num_params() == numel(model)


def test_resnet_named_sizes_have_their_published_shapes():
    assert ResNetConfig.named("resnet34").num_params() == 21_797_672
    assert ResNetConfig.named("resnet101").num_params() == 44_549_160
    assert ResNetConfig.named("resnet152").num_params() == 60_192_808
    cifar = ResNetConfig.named("resnet18-cifar")
    assert cifar.num_params() == 11_173_962 and cifar.small_input and cifar.num_classes == 10
    cfg = ResNetConfig.named("resnet50", num_classes=10, layers=[3, 4, 6, 3])
    assert cfg.layers == (3, 4, 6, 3) and cfg.num_params() == 25_557_032 - 990 * 2049
    with pytest.raises(ValueError, match="unknown model size 'resnet19'.*tiny, resnet18-cifar, resnet18"):
        ResNetConfig.named("resnet19")
    with pytest.raises(ValueError, match="unknown ResNetConfig field.*depth;"):
        ResNetConfig.named("resnet18", depth=34)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block": "wide"}, "block must be one of basic, bottleneck; got 'wide'"),
        ({"layers": ()}, r"layers must be a non-empty sequence of positive block counts per stage, such as \(2, 2"),
        ({"layers": (2, 0, 2)}, r"layers must be .*got \(2, 0, 2\)"),
        ({"width": 0}, "width must be a positive integer, got 0"),
        ({"image_size": -3}, "image_size must be a positive integer"),
    ],
)
def test_resnet_bad_configs_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResNetConfig(**kwargs)


@pytest.mark.parametrize(
    ("cfg", "size"),
    [
        (ResNetConfig.named("tiny"), 16),
        (ResNetConfig.named("tiny"), 8),  # the smallest images the small-input stem is meant for
        (ResNetConfig(block="bottleneck", layers=(1, 1), width=8, num_classes=6), 48),  # the standard stem
    ],
    ids=["small-16", "small-8", "standard-48"],
)
def test_resnet_forward_shape_and_channels_last(cfg, size):
    torch.manual_seed(0)
    model = ResNet(cfg).eval()
    x = torch.randn(3, cfg.channels, size, size)
    logits = model(x)
    assert logits.shape == (3, cfg.num_classes)
    # channels_last model and input: the same logits, and training runs.
    model_cl = ResNet(cfg).eval()
    model_cl.load_state_dict(model.state_dict())
    model_cl = model_cl.to(memory_format=torch.channels_last)
    x_cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model_cl(x_cl), logits, rtol=1e-4, atol=1e-5)
    model_cl.train()(x_cl).sum().backward()
    assert model_cl.stem[0].weight.grad.is_contiguous(memory_format=torch.channels_last)


def test_resnet_blocks_are_the_residual_blocks_in_order():
    cfg = ResNetConfig.named("resnet50")
    with torch.device("meta"):
        model = ResNet(cfg)
    assert isinstance(model.blocks, torch.nn.ModuleList)
    assert len(model.blocks) == sum(cfg.layers) == 16 and all(type(b) is Bottleneck for b in model.blocks)
    # One block with a projection shortcut opens each stage; the stride is in its 3x3 convolution.
    starts = [i for i, b in enumerate(model.blocks) if b.downsample is not None]
    assert starts == [0, 3, 7, 13]
    assert [model.blocks[i].conv2.stride for i in starts] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert [model.blocks[i].conv3.out_channels for i in starts] == [256, 512, 1024, 2048]
    tiny = ResNet(ResNetConfig.named("tiny"))
    assert len(tiny.blocks) == 4 and all(type(b) is BasicBlock for b in tiny.blocks)
    assert len(tiny.stem) == 3  # conv, norm, ReLU: no max-pooling for small images


def test_zero_init_residual_starts_blocks_as_the_identity():
    cfg = dataclasses.replace(ResNetConfig.named("tiny"), zero_init_residual=True)
    model = ResNet(cfg)
    block = model.blocks[0]  # no projection shortcut: width 16 in and out
    assert block.downsample is None
    x = torch.rand(2, 16, 8, 8)
    torch.testing.assert_close(block(x), x)


# ---- both ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_activation_checkpointing_of_blocks_keeps_gradients(kind):
    def build():
        torch.manual_seed(0)
        return ViT(VIT_CONFIGS[1]) if kind == "vit" else ResNet(RESNET_CONFIGS[2])

    x = images(VIT_CONFIGS[1], 4) if kind == "vit" else images(RESNET_CONFIGS[2], 4)
    plain, wrapped = build(), build()
    assert checkpoint_blocks(list(wrapped.blocks), 1) == len(wrapped.blocks)
    plain(x).sum().backward()
    wrapped(x).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_tiny_models_fit_a_small_batch(kind):
    torch.manual_seed(0)
    cfg = VIT_CONFIGS[1] if kind == "vit" else RESNET_CONFIGS[2]
    model = ViT(cfg) if kind == "vit" else ResNet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = images(cfg, 8), torch.randint(0, cfg.num_classes, (8,))
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
