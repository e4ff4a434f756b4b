"""linscale.data.image_shards in one process: detection, cutting, reading, pickling, errors."""

from __future__ import annotations

import io
import json
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from linscale.data import image_shards
from linscale.data.image_shards import (
    ImageOptions,
    check,
    cut_units,
    decode_image,
    detect_kind,
    is_packed_images,
    open_packed_images,
    packed_splits,
    plan_images,
)
from linscale.data.images import ImageFolderDataset, ImageFolderWarning, read_image, scan_image_folder
from linscale.data.preprocess import PreprocessError
from linscale.data.shards import ShardError


def save(path, seed: int, mode: str = "RGB", fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (9 + seed % 5, 7 + seed % 3, 3), dtype=np.uint8)
    Image.fromarray(a).convert(mode).save(path, format=fmt)


def tree(root):
    """root/{cat,dog}: 5 images each, cat/c.jpg garbage; returns root."""
    for i in range(5):
        save(root / "cat" / f"{i}.png", i, "LA" if i == 1 else "RGB")
        save(root / "dog" / f"{i}.jpg", 10 + i, "L" if i % 2 else "RGB")
    (root / "cat" / "c.jpg").write_bytes(b"garbage " * 20)
    return root


def pack(src, out, **kw):
    image_shards.run(ImageOptions(src, out, progress=False, **{"unit_mb": 0.001, **kw}))
    return out


def test_detect_kind(tmp_path):
    images = tree(tmp_path / "flat")
    assert detect_kind(images) == "images"
    split = tmp_path / "split"
    save(split / "train" / "a" / "1.png", 1)
    save(split / "val" / "a" / "2.png", 2)
    assert detect_kind(split) == "images"
    text = tmp_path / "text"
    (text / "pkg" / "icons").mkdir(parents=True)
    for i in range(4):
        (text / "pkg" / f"m{i}.py").write_text("x = 1\n")
    save(text / "pkg" / "icons" / "i.png", 3)
    assert detect_kind(text) == "text"  # mostly text, a few images
    assert detect_kind(text / "pkg" / "m0.py") == "text"
    assert detect_kind(tmp_path / "missing") == "text"
    (tmp_path / "nosub").mkdir()
    (tmp_path / "nosub" / "a.txt").write_text("x")
    assert detect_kind(tmp_path / "nosub") == "text"


@pytest.mark.parametrize("unit", [1, 5, 10, 35, 10**9])
def test_units_are_contiguous_ranges_cut_by_bytes(unit):
    sizes = np.array([3, 9, 1, 1, 12, 4, 4, 4, 0, 7], dtype=np.int64)
    ranges = cut_units(sizes, unit)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(sizes)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    for a, b in ranges:
        assert b > a and (b - a == 1 or sizes[a:b].sum() <= unit)
        if b < len(sizes):  # greedy: the next file would not have fitted
            assert sizes[a : b + 1].sum() > unit


def test_plan_of_a_class_folder_is_one_train_split_in_scan_order(tmp_path):
    src = tree(tmp_path / "src")
    plan = plan_images(src, 600)
    assert [s.name for s in plan.splits] == ["train"] and plan.classes == ("cat", "dog")
    index = scan_image_folder(src)
    assert plan.splits[0].index.relpath(3) == index.relpath(3)
    assert [(u.start, u.end) for u in plan.units] == cut_units(plan.splits[0].sizes, 600)
    assert plan.fingerprint() == plan_images(src, 600).fingerprint()
    assert plan.fingerprint() != plan_images(src, 600, verify=False).fingerprint()
    with pytest.raises(PreprocessError, match="inside the image folder"):
        check(ImageOptions(src, src / "out"))


def test_unchecked_packing_keeps_bad_files_and_the_dataset_skips_them(tmp_path):
    src = tree(tmp_path / "src")
    out = pack(src, tmp_path / "out", verify=False)
    index = json.loads((out / "index.json").read_text())
    assert index["stats"]["bad_images"] == 0 and not index["stats"]["verified"]
    assert not (out / image_shards.BAD_FILE).exists()
    packed, folder = open_packed_images(out), scan_image_folder(src)
    assert len(packed) == len(folder) == 11 and packed_splits(out) == ["train"]
    bad = [i for i in range(len(folder)) if folder.relpath(i) == "cat/c.jpg"][0]
    data = ImageFolderDataset(packed, seed=1)
    with pytest.warns(ImageFolderWarning, match=r"out/train/u\d+\.bin sample \d+ \(cat/c\.jpg\)"):
        x, y = data[bad]
    assert torch.equal(x, read_image(folder.path(bad + 1)).float().div(255)) and y == folder.labels[bad + 1]


def test_checked_packing_leaves_bad_files_out(tmp_path):
    src = tree(tmp_path / "src")
    out = pack(src, tmp_path / "out")
    packed = open_packed_images(out)
    assert len(packed) == 10 and "cat/c.jpg" not in [packed.relpath(i) for i in range(10)]
    (line,) = (out / image_shards.BAD_FILE).read_text().splitlines()
    assert json.loads(line)["error"] == "UnidentifiedImageError: cannot identify image file 'cat/c.jpg'"
    summary = json.loads((out / "preprocess_summary.json").read_text())
    assert summary["bad_images"].startswith(f"1 left out ({src / 'cat' / 'c.jpg'}")


def test_pickled_index_reopens_its_maps_and_serves_dataloader_workers(tmp_path):
    src = tree(tmp_path / "src")
    packed = open_packed_images(pack(src, tmp_path / "out"))
    expected = [packed.read(i) for i in range(len(packed))]
    state = pickle.dumps(packed)
    assert len(state) < 4000  # the labels and a few sizes, no table, no maps
    copy = pickle.loads(state)
    assert all(torch.equal(copy.read(i), expected[i]) for i in range(len(copy)))
    data = ImageFolderDataset(packed)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2)
    got = [x for x, _ in loader]
    assert all(torch.equal(g, e.float().div(255)) for g, e in zip(got, expected, strict=True))


def test_decode_errors_name_the_sample():
    with pytest.raises(Exception, match="cannot identify image file 'train/u000001.bin sample 3'"):
        decode_image(b"nope", lambda: "train/u000001.bin sample 3")
    buf = io.BytesIO()
    Image.new("RGBA", (3, 2), (200, 100, 50, 128)).save(buf, format="PNG")
    assert decode_image(buf.getvalue()).shape == (3, 2, 3)


def test_reader_errors_name_the_fix(tmp_path):
    with pytest.raises(ShardError, match=r"has no index.json: .* run `linscale preprocess IMAGE_FOLDER --out"):
        open_packed_images(tmp_path)
    assert not is_packed_images(tmp_path)
    text = tmp_path / "text"
    text.mkdir()
    (text / "index.json").write_text(json.dumps({"format": "linscale-shards", "version": 1}))
    with pytest.raises(ShardError, match="holds token shards of a text corpus"):
        open_packed_images(text)
    with pytest.raises(PreprocessError, match="another kind .* pick another --out"):
        check(ImageOptions(tree(tmp_path / "src"), text))

    out = pack(tmp_path / "src", tmp_path / "out")
    with pytest.raises(ShardError, match=r"has no split 'val' \(it has: train\)"):
        open_packed_images(out, "val")
    index = json.loads((out / "index.json").read_text())
    (out / index["splits"]["train"]["shards"][0]["file"]).unlink()
    with pytest.raises(ShardError, match=re.escape("u000000.bin is missing; rerun `linscale preprocess`")):
        open_packed_images(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about in a rerun that repairs it
        pack(tmp_path / "src", out)
    assert len(open_packed_images(out)) == 10
