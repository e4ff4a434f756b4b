"""Residual networks for image classification, with exact parameter and FLOP counts.

The layout of He et al. 2016 ("Deep Residual Learning for Image Recognition"): a stem, stages of
residual blocks whose widths double while the resolution halves, global average pooling and a
linear head. Two blocks: `basic` (two 3x3 convolutions; ResNet-18 and -34) and `bottleneck`
(1x1 reduce, 3x3, 1x1 expand by 4; ResNet-50 and deeper). A block that changes the resolution
strides in its 3x3 convolution (for the bottleneck the placement often called "v1.5", rather than
in the first 1x1 as in the paper), with a strided 1x1 convolution and BatchNorm on the shortcut.
Convolutions have no bias; each is followed by BatchNorm.

Two stems: the standard one (7x7 convolution of stride 2, then 3x3 max-pooling of stride 2) for
ImageNet-sized images, and `small_input=True` (a 3x3 convolution of stride 1, no pooling) for
images of 8x8 to 32x32 pixels, which the standard stem would shrink to almost nothing.

`model.blocks` lists the residual blocks in order, the units of sharding and activation
checkpointing. Note that a checkpointed block runs its forward again in backward, in training
mode, so its BatchNorm running statistics get two updates per step (the gradients are exact;
only the running averages weight recent batches more). `SIZES` names the standard shapes;
`ResNetConfig.named("resnet50")` builds one. Inputs may be in either memory format
(`torch.channels_last` included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from linscale.models import named_config

BLOCK_KINDS = ("basic", "bottleneck")
EXPANSION = {"basic": 1, "bottleneck": 4}  # output channels of a block per channel of its 3x3 convolution

#: Named shapes; 224 x 224 images and 1000 classes unless stated.
#: * tiny: a test model for 32 x 32 images and 10 classes (one basic block per stage, width 16).
#: * resnet18-cifar: ResNet-18 with the small-input stem for 32 x 32 images and 10 classes
#:   (11,173,962 parameters).
#: * resnet18, resnet34, resnet50, resnet101, resnet152: He et al. 2016, table 1 (11,689,512,
#:   21,797,672, 25,557,032, 44,549,160 and 60,192,808 parameters).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(block="basic", layers=(1, 1, 1, 1), width=16, small_input=True, image_size=32, num_classes=10),
    "resnet18-cifar": dict(block="basic", layers=(2, 2, 2, 2), small_input=True, image_size=32, num_classes=10),
    "resnet18": dict(block="basic", layers=(2, 2, 2, 2)),
    "resnet34": dict(block="basic", layers=(3, 4, 6, 3)),
    "resnet50": dict(block="bottleneck", layers=(3, 4, 6, 3)),
    "resnet101": dict(block="bottleneck", layers=(3, 4, 23, 3)),
    "resnet152": dict(block="bottleneck", layers=(3, 8, 36, 3)),
}


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution or pooling window along one dimension."""
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(kw_only=True)
class ResNetConfig:
    block: str = "basic"  # "basic" or "bottleneck"
    layers: tuple[int, ...] = (2, 2, 2, 2)  # residual blocks per stage
    width: int = 64  # channels of the stem; stage i's 3x3 convolutions have width * 2**i
    channels: int = 3
    num_classes: int = 1000
    small_input: bool = False  # 3x3 stride-1 stem without max-pooling, for 8x8..32x32 images
    image_size: int = 224  # the (square) resolution the FLOP counts are for; forward takes any size
    zero_init_residual: bool = False  # start each block as the identity (last BatchNorm's scale 0)

    def __post_init__(self) -> None:
        for name in ("width", "channels", "num_classes", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.block not in BLOCK_KINDS:
            raise ValueError(f"block must be one of {', '.join(BLOCK_KINDS)}; got {self.block!r}")
        if isinstance(self.layers, list):
            self.layers = tuple(self.layers)
        if (
            not isinstance(self.layers, tuple)
            or not self.layers
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in self.layers)
        ):
            raise ValueError(
                f"layers must be a non-empty sequence of positive block counts per stage, such as (2, 2, 2, 2); "
                f"got {self.layers!r}"
            )

    @property
    def expansion(self) -> int:
        return EXPANSION[self.block]

    @property
    def features(self) -> int:
        """Channels entering the head."""
        return self.width * 2 ** (len(self.layers) - 1) * self.expansion

    @property
    def stem_kernel(self) -> int:
        return 3 if self.small_input else 7

    def block_specs(self) -> list[tuple[int, int, int]]:
        """(input channels, 3x3 channels, stride) of each residual block, in order."""
        specs = []
        inplanes = self.width
        for stage, count in enumerate(self.layers):
            planes = self.width * 2**stage
            for i in range(count):
                specs.append((inplanes, planes, 2 if stage > 0 and i == 0 else 1))
                inplanes = planes * self.expansion
        return specs

    @classmethod
    def named(cls, name: str, **overrides: Any) -> ResNetConfig:
        """The named shape from `SIZES`, with fields replaced by `overrides`."""
        return named_config(cls, SIZES, name, overrides)

    def num_params(self) -> int:
        """Exact parameter count, from the configuration alone (BatchNorm: scale and shift; its
        running statistics are buffers, not parameters)."""
        w, e = self.width, self.expansion
        total = self.channels * w * self.stem_kernel**2 + 2 * w
        for inplanes, planes, stride in self.block_specs():
            if self.block == "basic":
                total += 9 * inplanes * planes + 2 * planes + 9 * planes * planes + 2 * planes
            else:
                total += inplanes * planes + 2 * planes + 9 * planes * planes + 2 * planes
                total += planes * e * planes + 2 * e * planes
            if stride != 1 or inplanes != planes * e:
                total += inplanes * planes * e + 2 * planes * e
        return total + self.features * self.num_classes + self.num_classes

    def stem_flops(self) -> int:
        """Forward FLOPs of the stem convolution for one image."""
        k = self.stem_kernel
        side = self.image_size if self.small_input else conv_out(self.image_size, 7, 2, 3)
        return 2 * self.channels * self.width * k * k * side * side

    def forward_flops(self) -> int:
        """Matrix-product FLOPs of one image's forward pass at `image_size`: the convolutions
        (2 * in * out * k*k per output position) and the head (2 * features * classes).
        BatchNorm, ReLU, pooling and the residual additions are not counted (nor does
        `FlopCounterMode` count them)."""
        total = self.stem_flops()
        side = self.image_size if self.small_input else conv_out(conv_out(self.image_size, 7, 2, 3), 3, 2, 1)
        e = self.expansion
        for inplanes, planes, stride in self.block_specs():
            out = conv_out(side, 3, stride, 1)
            if self.block == "basic":
                total += 2 * inplanes * planes * 9 * out * out + 2 * planes * planes * 9 * out * out
            else:
                total += 2 * inplanes * planes * side * side  # 1x1 reduce, at the input resolution
                total += 2 * planes * planes * 9 * out * out + 2 * planes * planes * e * out * out
            if stride != 1 or inplanes != planes * e:
                short = conv_out(side, 1, stride, 0)
                total += 2 * inplanes * planes * e * short * short
            side = out
        return total + 2 * self.features * self.num_classes

    def train_flops_per_sample(self) -> int:
        """Matrix-product FLOPs of forward + backward for one image at `image_size`.

        Backward costs twice forward (gradients of the inputs and of the weights) except for the
        stem convolution: the image needs no gradient, so its backward computes only the weight
        gradient, once its forward. This is what `FlopCounterMode` counts on a forward+backward
        with an input that does not require grad, as training data does not."""
        return 3 * self.forward_flops() - self.stem_flops()


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = _bn(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), _bn(planes))

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + shortcut)


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * EXPANSION["bottleneck"]
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = _bn(out)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), _bn(out))

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + shortcut)


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        k = cfg.stem_kernel
        stem: list[nn.Module] = [
            nn.Conv2d(cfg.channels, cfg.width, k, stride=1 if cfg.small_input else 2, padding=k // 2, bias=False),
            _bn(cfg.width),
            nn.ReLU(),
        ]
        if not cfg.small_input:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        block_cls = BasicBlock if cfg.block == "basic" else Bottleneck
        self.blocks = nn.ModuleList(block_cls(*spec) for spec in cfg.block_specs())
        self.fc = nn.Linear(cfg.features, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He et al. 2015 initialisation
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if cfg.zero_init_residual:  # Goyal et al. 2017: each block starts as the identity
            for block in self.blocks:
                nn.init.zeros_(block.last_bn.weight)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) for images (B, channels, H, W) of any size."""
        x = self.stem(images_BCHW)
        for block in self.blocks:
            x = block(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
