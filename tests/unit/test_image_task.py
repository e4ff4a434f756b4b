"""The built-in image task, the built-in digits, whole-set evaluation batches and BatchNorm under
activation checkpointing."""

from __future__ import annotations

import copy
import gzip
import os

import numpy as np
import pytest
import torch
from PIL import Image

from linscale.data import digits
from linscale.data.images import ImageFolderError, read_image
from linscale.models.resnet import ResNet, ResNetConfig
from linscale.runtime.parallel import checkpoint_blocks
from linscale.task import DataShard, resolve_task
from linscale.tasks.image import ImageTask, ImageTaskConfig, mix_batch
from linscale.train.loop import eval_batches

SHARD = DataShard(rank=0, size=1, seed=0)


def tree(root, splits=("train", "val"), classes=("cat", "dog", "owl"), n=3, size=(20, 12)):
    for split in splits:
        for label, name in enumerate(classes):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", size, (40 * label, 10 * i, 7)).save(folder / f"{i}.png")
    return root


# --- the built-in digits ---


def test_digits_tree_holds_every_image_once_with_its_label(tmp_path):
    out = digits.write_digits(tmp_path / "digits")
    images, labels = digits.load_digits()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,) and images.max() == 16
    files = sorted(out.glob("*/*/*.png"))
    assert len(files) == 1797
    test = digits.split_of(labels)
    for f in files[::97]:
        n = int(f.stem)
        assert f.parent.name == str(labels[n])
        assert f.parent.parent.name == ("test" if test[n] else "train")
        pixels = read_image(f)[0].numpy()
        assert np.array_equal(pixels, np.rint(images[n].astype(float) * 255 / 16).astype(np.uint8))
    # Every digit is in both splits, about a fifth of each in test.
    for d in range(10):
        k = (labels == d).sum()
        assert len(list((out / "test" / str(d)).iterdir())) == -(-k // digits.TEST_EVERY)


def test_digits_are_written_once_and_a_foreign_folder_is_refused(tmp_path):
    out = digits.write_digits(tmp_path / "digits")
    stamp = os.stat(out / digits.MARKER).st_mtime_ns
    assert digits.write_digits(out) == out
    assert os.stat(out / digits.MARKER).st_mtime_ns == stamp
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a digits tree"):
        digits.write_digits(other)
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_the_shipped_file_is_the_uci_test_set(tmp_path):
    with gzip.open(digits.SOURCE, "rt") as f:
        lines = f.read().splitlines()
    assert len(lines) == 1797 and all(len(line.split(",")) == 65 for line in lines)


# --- the task ---


def test_image_is_a_built_in_task_and_defaults_to_the_digits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_task("image") is ImageTask
    task = ImageTask()
    assert (tmp_path / "runs" / "data" / "digits" / digits.MARKER).is_file()
    assert task.classes == tuple(str(d) for d in range(10))
    assert len(task.train_index) + len(task.eval_index) == 1797
    assert task.eval_index.root.endswith("test")
    model = task.build_model()
    data = task.train_data(SHARD)
    x, y = data[(0, 5)]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= y < 10
    batch = torch.utils.data.default_collate([data[(0, i)] for i in range(4)])
    assert torch.isfinite(task.loss(model, batch))
    assert task.flops_per_sample() == task.model_cfg.train_flops_per_sample()
    # Digits are not flipped; the crop keeps most of the digit.
    assert task._flip() == 0 and task._crop_scale() == 0.8


def test_folder_tree_splits_classes_and_model_sizes(tmp_path):
    data = tree(tmp_path / "pets")
    task = ImageTask(ImageTaskConfig(data=str(data), image_size=16))
    assert task.classes == ("cat", "dog", "owl") and task.eval_index.root.endswith("val")
    assert task.model_cfg.num_classes == 3 and task._flip() == 0.5
    # A tree without splits trains on everything and evaluates nothing.
    flat = tree(tmp_path / "flat", splits=(None,))
    task = ImageTask(ImageTaskConfig(data=str(flat), image_size=16))
    assert task.eval_index is None and len(task.train_index) == 9
    # Named sizes pick the family; ResNet defaults to channels-last.
    task = ImageTask(ImageTaskConfig(data=str(data), size="resnet18", image_size=32))
    assert task.family == "resnet" and task.channels_last
    model = task.build_model()
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    task = ImageTask(ImageTaskConfig(data=str(data), size="vit-b16"))
    assert task.family == "vit" and task.model_cfg.width == 768 and task.model_cfg.num_classes == 3
    assert ImageTask(ImageTaskConfig(data=str(data), size="resnet:tiny", image_size=16)).family == "resnet"


def test_bad_settings_and_trees_are_named_with_the_fix(tmp_path):
    data = tree(tmp_path / "pets")
    with pytest.raises(ValueError, match="unknown vit size"):
        ImageTask(ImageTaskConfig(data=str(data), size="vit-x"))
    with pytest.raises(ValueError, match="task.model"):
        ImageTask(ImageTaskConfig(data=str(data), model="mlp"))
    with pytest.raises(ValueError, match="divisible|patch"):
        ImageTask(ImageTaskConfig(data=str(data), image_size=18, patch_size=4))
    with pytest.raises(ImageFolderError, match="not a directory"):
        ImageTask(ImageTaskConfig(data=str(tmp_path / "missing")))
    with pytest.raises(ImageFolderError, match="split 'holdout' not found"):
        ImageTask(ImageTaskConfig(data=str(data), eval_split="holdout"))
    (data / "val" / "emu").mkdir()
    Image.new("RGB", (8, 8)).save(data / "val" / "emu" / "0.png")
    with pytest.raises(ImageFolderError, match="only in .*val: emu"):
        ImageTask(ImageTaskConfig(data=str(data)))
    with pytest.raises(ValueError, match="label_smoothing"):
        ImageTask(ImageTaskConfig(data=str(data), label_smoothing=1.0))


def test_eval_step_counts_top1_and_top5():
    task = ImageTask.__new__(ImageTask)
    task.channels_last = False

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)

    # Sample 0: right at rank 1; sample 1: right at rank 3; sample 2: right at rank 7.
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 1]])
    y = torch.tensor([0, 2, 7])
    out = task.eval_step(Fixed(), (logits, y))
    assert out["top1"].item() == pytest.approx(1 / 3) and out["top5"].item() == pytest.approx(2 / 3)
    assert out["loss"].item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item())
    assert "top5" not in task.eval_step(Fixed(), (logits[:, :3], torch.tensor([0, 1, 2])))


def test_mixup_and_cutmix_mix_a_batch_with_its_reversal():
    torch.manual_seed(0)
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    y = torch.tensor([0, 1, 2, 3])
    mixed, y_b, lam = mix_batch(x, y, mixup=0.4, cutmix=0)
    assert torch.equal(y_b, y.flip(0)) and 0 <= lam <= 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0))
    for _ in range(5):
        mixed, y_b, lam = mix_batch(x, y, mixup=0, cutmix=1.0)
        kept = (mixed == x).all(dim=1).float().mean(dim=(1, 2))  # per sample: pixels left as they were
        assert torch.allclose(kept[:2], torch.full((2,), lam))  # samples 0, 1 differ from their partners


@pytest.mark.parametrize("n,world,micro", [(10, 1, 4), (10, 3, 2), (7, 2, 3), (5, 4, 1), (2, 3, 4), (360, 2, 32)])
def test_whole_set_evaluation_covers_every_sample_once_in_equal_batch_counts(n, world, micro):
    seen, counts = [], set()
    for rank in range(world):
        idx, counted = eval_batches(n, micro, 0, world, rank)
        counts.add(len(idx))
        assert all(len(b) <= micro for b in idx)
        for b, c in zip(idx, counted, strict=True):
            assert c == (len(b) if c else 0) and len(b) >= 1
            seen += b[:c]
    assert len(counts) == 1  # every rank runs the same number of batches
    assert sorted(seen) == list(range(n))


def test_evaluation_with_a_batch_limit_keeps_equal_shares():
    idx, counted = eval_batches(100, 4, 2, 3, 1)
    assert idx == [[8, 9, 10, 11], [12, 13, 14, 15]] and counted == [4, 4]


def test_activation_checkpointing_updates_batchnorm_statistics_once():
    torch.manual_seed(0)
    plain = ResNet(ResNetConfig.named("tiny", image_size=16))
    ckpt = copy.deepcopy(plain)
    assert checkpoint_blocks(list(ckpt.blocks), 1) == len(ckpt.blocks)
    x = torch.randn(8, 3, 16, 16)
    for model in (plain, ckpt):
        for _ in range(2):
            model(x).sum().backward()
    for (name, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


# --- linscale data ---


def test_data_digits_and_check_commands(tmp_path, capsys):
    from linscale.cli import main

    out = tmp_path / "digits"
    assert main(["data", "digits", "--out", str(out)]) == 0
    assert "train 1433, test 364" in capsys.readouterr().out
    assert main(["data", "check", str(out)]) == 0
    assert "unreadable = 0" in capsys.readouterr().out
    victim = sorted((out / "train" / "4").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:25])
    listing = tmp_path / "bad.txt"
    assert main(["data", "check", str(out), "--list", str(listing)]) == 1
    text = capsys.readouterr().out
    assert f"unreadable: {victim}" in text and "unreadable = 1" in text
    assert listing.read_text().splitlines() == [str(victim)]
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
