"""Built-in `image` task: image classification with a Vision Transformer or a ResNet.

Data (`task.data`):
* empty (the default): the 1,797 handwritten digits shipped with linscale, written once as an
  image-folder tree to `runs/data/digits` (see `linscale.data.digits`), so `linscale train image`
  trains a small ViT to about 95% test accuracy on two CPU cores in a few minutes;
* an image-folder tree, ``DATA/<split>/<class>/<images>`` (or ``DATA/<class>/<images>``: training
  only), decoded with Pillow and augmented in the loader's worker processes;
* a directory written by ``linscale preprocess IMAGE_TREE --out DIR``: the same images packed into
  a few large shard files, read with the same results as the tree they came from.

Training: cross-entropy with optional label smoothing, random resized crop and horizontal flip,
optional mixup / cutmix; evaluation: loss, top-1 and top-5 accuracy on the evaluation split,
central crop. Each sample's augmentation is drawn from (seed, epoch, index), so it does not depend
on the number of processes, loader workers or restarts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from linscale.config import opt
from linscale.data import digits, image_shards
from linscale.data import images as img
from linscale.models import resnet, vit
from linscale.task import DataShard, Task

DIGITS_DIR = "runs/data/digits"
EVAL_SPLITS = ("val", "validation", "valid", "test", "eval", "dev")
FAMILIES = ("vit", "resnet")


@dataclass(kw_only=True)
class ImageTaskConfig:
    data: str = opt(
        "",
        "An image-folder tree (DATA/<split>/<class>/<images> or DATA/<class>/<images>) or a directory written by "
        f"`linscale preprocess` from one. Empty: the built-in handwritten digits, written to {DIGITS_DIR} once.",
    )
    train_split: str = opt("train", "The split trained on (a folder of task.data, or a split of packed shards).")
    eval_split: str = opt(
        "auto", f"The split evaluated: auto = the first present of {', '.join(EVAL_SPLITS)}; none = no evaluation."
    )
    model: str = opt("vit", "Model family, vit or resnet (implied by task.size when that names a model).")
    size: str = opt(
        "",
        f"A named shape: {', '.join('vit:' + s if s == 'tiny' else s for s in vit.SIZES)}, "
        f"{', '.join(s for s in resnet.SIZES if s != 'tiny')} or resnet:tiny. Empty: a small model (ViT: the "
        "patch_size/width/depth/heads/mlp_dim settings; ResNet: resnet:tiny).",
    )
    image_size: int = opt(0, "Training and evaluation resolution; 0 = the size's (16 for the digits, 224 otherwise).")
    patch_size: int = opt(4, "ViT patch size (without task.size).")
    width: int = opt(64, "ViT width (without task.size).")
    depth: int = opt(4, "ViT blocks (without task.size).")
    heads: int = opt(4, "ViT attention heads (without task.size).")
    mlp_dim: int = opt(128, "ViT MLP hidden size (without task.size).")
    dropout: float = opt(0.0, "ViT dropout probability.")
    label_smoothing: float = opt(0.1, "Label smoothing of the training cross-entropy (0 = off).")
    crop_scale: float = opt(
        0.0, "Smallest area fraction of the random resized crop; 0 = 0.08 (0.8 for the built-in digits)."
    )
    flip: float = opt(-1.0, "Horizontal flip probability; -1 = 0.5 (0 for the digits: a mirrored digit is no digit).")
    mixup: float = opt(0.0, "Mixup: alpha of the Beta(alpha, alpha) mixing weight (0 = off; 0.2 is common).")
    cutmix: float = opt(0.0, "CutMix: alpha of the Beta(alpha, alpha) area weight (0 = off; 1.0 is common).")
    channels_last: str = opt("auto", "Channels-last memory layout: auto (on for ResNet), on or off.")
    verify: bool = opt(
        False,
        "Decode every training image before training and leave unreadable ones out (costs one decode per image); "
        "off: unreadable images are skipped when met, counted and named once.",
    )


def _family(c: ImageTaskConfig) -> tuple[str, str]:
    """(family, named size or "") from task.model and task.size."""
    size = c.size
    if ":" in size:
        family, _, size = size.partition(":")
    elif size.startswith("vit-"):
        family = "vit"
    elif size.startswith("resnet"):
        family = "resnet"
    else:
        family = c.model
    if family not in FAMILIES:
        raise ValueError(f"unknown task.model={family!r}; choose {' or '.join(FAMILIES)}")
    sizes = vit.SIZES if family == "vit" else resnet.SIZES
    if size and size not in sizes:
        raise ValueError(
            f"unknown {family} size task.size={c.size!r}; known: {', '.join(sorted(sizes))} (tiny as {family}:tiny)"
        )
    return family, size


class ImageTask(Task):
    Config = ImageTaskConfig
    defaults = {
        "train": {"global_batch": 64, "max_steps": 600, "eval_every": 100, "eval_batches": 0, "log_every": 20},
        "optim": {"lr": 2e-3, "warmup_steps": 30, "weight_decay": 0.05},
    }

    def __init__(self, config: ImageTaskConfig | None = None) -> None:
        super().__init__(config or ImageTaskConfig())
        c = self.config
        if not 0 <= c.label_smoothing < 1:
            raise ValueError(f"task.label_smoothing must be in [0, 1), got {c.label_smoothing}")
        if c.mixup < 0 or c.cutmix < 0:
            raise ValueError(f"task.mixup and task.cutmix are Beta alphas >= 0 (0 = off); got {c.mixup}, {c.cutmix}")
        if c.channels_last not in ("auto", "on", "off"):
            raise ValueError(f"task.channels_last must be auto, on or off; got {c.channels_last!r}")
        if not (c.flip == -1 or 0 <= c.flip <= 1):
            raise ValueError(f"task.flip is a probability in [0, 1] (or -1 for the default); got {c.flip}")
        if not 0 <= c.crop_scale <= 1:
            raise ValueError(
                f"task.crop_scale is an area fraction in (0, 1] (or 0 for the default); got {c.crop_scale}"
            )
        self.family, self.size = _family(c)
        self._reports: str | None = None  # where every process records unreadable images
        # The built-in digits, here or written by `linscale data digits`: their defaults apply.
        self.digits = not c.data or digits.is_complete(c.data)
        # Found (and, for the digits, written) now: the launcher builds the task before it starts
        # workers, so a bad folder is one message, and the digits are written once.
        self.data_dir = digits.write_digits(DIGITS_DIR) if not c.data else Path(c.data)
        self.packed = image_shards.is_packed_images(self.data_dir)
        self.train_index = self._open(c.train_split)
        self.eval_index = self._eval_index()
        if self.eval_index is not None:
            img.check_same_classes(self.train_index, self.eval_index)
        self.classes = self.train_index.classes
        self.model_cfg = self._model_config()
        self.image_size = self.model_cfg.image_size
        self.channels_last = c.channels_last == "on" or (c.channels_last == "auto" and self.family == "resnet")

    # --- data ---

    def _open(self, split: str) -> Any:
        """The index of `split`: packed shards or a folder tree."""
        root = self.data_dir
        if self.packed:
            return image_shards.open_packed_images(root, split)
        if not root.is_dir():
            raise img.ImageFolderError(
                f"task.data={str(root)!r} is not a directory; give an image-folder tree (DATA/<split>/<class>/"
                "<images>) or a directory written by `linscale preprocess`"
            )
        if (root / split).is_dir():
            return img.scan_image_folder(root, split=split)
        if split == self.config.train_split and not any((root / s).is_dir() for s in img.SPLIT_NAMES):
            return img.scan_image_folder(root)  # DATA/<class>/<images>: one split, training only
        return img.scan_image_folder(root, split=split)  # the error names the folders that are there

    def _splits(self) -> list[str]:
        root = self.data_dir
        if self.packed:
            return image_shards.packed_splits(root)
        return sorted(p.name for p in root.iterdir() if p.is_dir())

    def _eval_index(self) -> Any:
        split = self.config.eval_split
        if split == "none":
            return None
        if split != "auto":
            return self._open(split)
        present = self._splits()
        for name in EVAL_SPLITS:
            if name in present and name != self.config.train_split:
                return self._open(name)
        return None

    def _crop_scale(self) -> float:
        if self.config.crop_scale > 0:
            return self.config.crop_scale
        return 0.8 if self.digits else 0.08

    def _flip(self) -> float:
        if self.config.flip >= 0:
            return self.config.flip
        return 0.0 if self.digits else 0.5

    def train_data(self, shard: DataShard) -> torch.utils.data.Dataset:
        index = self.train_index
        if self.config.verify:
            index = self._verified(index, shard)
        transform = img.train_transform(self.image_size, scale=(self._crop_scale(), 1.0), flip=self._flip())
        return img.ImageFolderDataset(index, transform, seed=shard.seed, report_dir=self._report_dir(shard))

    def eval_data(self, shard: DataShard) -> torch.utils.data.Dataset | None:
        if self.eval_index is None:
            return None
        # Digits are 8 x 8: the whole image, resized; photographs: the usual central 87.5% crop.
        transform = img.eval_transform(self.image_size, crop_fraction=1.0 if self.digits else 0.875)
        return img.ImageFolderDataset(self.eval_index, transform, seed=shard.seed, report_dir=self._report_dir(shard))

    def _report_dir(self, shard: DataShard) -> str | None:
        if shard.run_dir is not None:
            self._reports = str(Path(shard.run_dir) / "bad-images")
        return self._reports

    def _verified(self, index: Any, shard: DataShard) -> Any:
        """The index without the images that do not decode (every rank checks all: the result is the same)."""
        bad = img.find_bad_images(index)
        if bad:
            if shard.rank == 0:
                names = ", ".join(list(bad)[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
                print(f"linscale: task.verify: leaving out {len(bad)} unreadable image(s): {names}", flush=True)
            index = index.without(bad)
        return index

    # --- model ---

    def _model_config(self) -> vit.ViTConfig | resnet.ResNetConfig:
        c = self.config
        over: dict[str, Any] = {"num_classes": len(self.train_index.classes)}
        if c.image_size:
            over["image_size"] = c.image_size
        if self.family == "vit":
            over["dropout"] = c.dropout
            if self.size:
                return vit.ViTConfig.named(self.size, **over)
            over.setdefault("image_size", 16 if self.digits else 224)
            return vit.ViTConfig(
                patch_size=c.patch_size, width=c.width, depth=c.depth, heads=c.heads, mlp_dim=c.mlp_dim, **over
            )
        if not self.size:
            over.setdefault("image_size", 16 if self.digits else 224)
        return resnet.ResNetConfig.named(self.size or "tiny", **over)

    def build_model(self) -> nn.Module:
        if self.family == "vit":
            model: nn.Module = vit.ViT(self.model_cfg)
        else:
            model = resnet.ResNet(self.model_cfg)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def flops_per_sample(self) -> float:
        return float(self.model_cfg.train_flops_per_sample())

    def example_batch(self, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images at the task's resolution and their labels, as the loader yields them, without decoding."""
        images = torch.zeros(micro_batch, self.model_cfg.channels, self.image_size, self.image_size)
        return images, torch.arange(micro_batch, dtype=torch.int64) % len(self.classes)

    # --- loss and evaluation ---

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        x = self._inputs(x)
        c = self.config
        if model.training and (c.mixup > 0 or c.cutmix > 0):
            x, y_b, lam = mix_batch(x, y, c.mixup, c.cutmix)
            logits = model(x).float()
            ce = lambda t: F.cross_entropy(logits, t, label_smoothing=c.label_smoothing)  # noqa: E731
            return lam * ce(y) + (1 - lam) * ce(y_b)
        smoothing = c.label_smoothing if model.training else 0.0
        return F.cross_entropy(model(x).float(), y, label_smoothing=smoothing)

    def eval_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = model(self._inputs(x)).float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = top == y.unsqueeze(-1)
        out = {"loss": F.cross_entropy(logits, y), "top1": hit[:, 0].float().mean()}
        if k == 5:
            out["top5"] = hit.any(dim=-1).float().mean()
        return out

    def final_report(self, model: nn.Module) -> str | None:
        """The unreadable images every process met (they were skipped), named in full once."""
        if self._reports is None:
            return None
        bad = img.read_bad_file_reports(self._reports)
        if not bad:
            return None
        lines = [f"{len(bad)} unreadable image(s) were skipped (each served by the next readable one):"]
        lines += [f"  {path}: {error}" for path, error in sorted(bad.items())[:20]]
        if len(bad) > 20:
            lines.append(f"  ... and {len(bad) - 20} more")
        lines.append(f"list: {self._reports}/bad-images.*.jsonl; `linscale data check DATA` finds them all up front")
        return "\n".join(lines)


def mix_batch(
    x: torch.Tensor, y: torch.Tensor, mixup: float, cutmix: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix (one of them, at random, when both are on) of a batch with its reversal.

    Returns the mixed images, the partner labels and the weight of the original labels. Draws from
    the device's global generator, which checkpoints save and restore, so a resumed run mixes alike."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand((), device="cpu").item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    x_b, y_b = x.flip(0), y.flip(0)
    if not use_cutmix:
        return x * lam + x_b * (1 - lam), y_b, lam
    h, w = x.shape[-2:]
    cut = math.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(h, ()).item()), int(torch.randint(w, ()).item())
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[..., top:bottom, left:right] = x_b[..., top:bottom, left:right]
    lam = 1 - (bottom - top) * (right - left) / (h * w)  # the area actually kept
    return x, y_b, lam
