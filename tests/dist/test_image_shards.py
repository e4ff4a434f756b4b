"""`linscale preprocess` of an image folder end to end: the real CLI, 1 and 2 workers, kill and resume."""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from linscale.data.image_shards import BAD_FILE, is_packed_images, open_packed_images, verify_packed
from linscale.data.images import ImageFolderDataset, read_image, scan_image_folder, train_transform
from linscale.data.preprocess import EXIT_AFTER_ENV, SUMMARY_FILE

from .conftest import files_of, index_without_timing
from linscale.data.shards import ShardError

pytestmark = pytest.mark.dist

TIMEOUT = 120
QUIET = ["--no-progress"]
UNIT = "--unit-mb=0.002"  # about 2 KB of files per shard: a dozen units from the tree below


def _image(rng: np.random.Generator, mode: str) -> Image.Image:
    h, w = (int(v) for v in rng.integers(6, 20, size=2))
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        return rgba
    return rgb.convert(mode)


def make_tree(root: Path) -> Path:
    """train/{ant,bee,cow} and val/{ant,bee,cow}: PNG and JPEG, RGB, grayscale and RGBA images, a
    nested folder, a text file, a truncated JPEG (train/bee/broken.jpg) and an empty class in val."""
    rng = np.random.default_rng(0)
    src = root / "images"
    kinds = [("png", "RGB"), ("jpg", "RGB"), ("png", "L"), ("png", "RGBA"), ("jpg", "L")]
    for split, per_class in (("train", 7), ("val", 3)):
        for c, cls in enumerate(("ant", "bee", "cow")):
            folder = src / split / cls
            folder.mkdir(parents=True)
            if split == "val" and cls == "cow":
                continue  # an empty class folder stays a class
            for i in range(per_class):
                ext, mode = kinds[(i + c) % len(kinds)]
                sub = folder / "nested" if i == 2 else folder
                sub.mkdir(exist_ok=True)
                _image(rng, mode).save(sub / f"img{i}.{ext}")
    (src / "train" / "ant" / "notes.txt").write_text("not an image\n")
    buf = io.BytesIO()
    _image(rng, "RGB").save(buf, format="JPEG")
    (src / "train" / "bee" / "broken.jpg").write_bytes(buf.getvalue()[:200])
    return src


def test_one_and_two_workers_pack_identical_shards_that_read_as_the_folder(linscale, tmp_path):
    src = make_tree(tmp_path)
    common = ["preprocess", str(src), UNIT, *QUIET]
    one = linscale(*common, "--out", str(tmp_path / "one"), "--nproc-per-node=1", timeout=TIMEOUT)
    assert one.returncode == 0, one.output
    two = linscale(*common, "--out", str(tmp_path / "two"), "--nproc-per-node=2", timeout=TIMEOUT)
    assert two.returncode == 0, two.output

    a, b = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    assert sorted(a) == sorted(b) and [name for name in a if a[name] != b[name]] == []
    assert index_without_timing(tmp_path / "one") == index_without_timing(tmp_path / "two")

    out = tmp_path / "one"
    index = index_without_timing(out)
    assert index["kind"] == "images" and index["classes"] == ["ant", "bee", "cow"]
    assert list(index["splits"]) == ["train", "val"]
    assert index["splits"]["val"]["class_counts"] == [3, 3, 0]
    stats = index["stats"]
    assert stats["units"] > 6 and stats["bad_images"] == 1 and stats["ignored_files"] == {".txt": 1}
    assert stats["bytes"] == sum(p.stat().st_size for p in src.rglob("img*"))  # the files' bytes, unchanged
    # The bad file: left out, counted, named in the summary and listed in full.
    bad = [json.loads(line) for line in (out / BAD_FILE).read_text().splitlines()]
    assert [(b["split"], b["path"]) for b in bad] == [("train", str(src / "train" / "bee" / "broken.jpg"))]
    assert re.search(r"bad_images\s+= 1 left out \(.*broken\.jpg", two.stdout), two.stdout
    assert re.search(r"workers\s+= 2", two.stdout) and re.search(r"images\s+= 27\b", two.stdout), two.stdout
    assert "***** preprocess metrics *****" in two.stdout and "ignored 1 non-image file(s): .txt x1" in two.stdout
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["splits"] == "train 21, val 6" and summary["classes"] == 3
    verify_packed(out, full=True)
    assert is_packed_images(out) and not is_packed_images(src)

    transform = train_transform(16)
    for split in ("train", "val"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # val's empty class folder
            folder = scan_image_folder(src, split=split)
        folder = folder.without(b["path"] for b in bad)  # what the packed split holds
        packed = open_packed_images(out, split)
        assert len(packed) == len(folder) and packed.classes == folder.classes
        assert packed.labels.dtype == np.int32 and packed.labels.tolist() == folder.labels.tolist()
        assert packed.class_counts().tolist() == folder.class_counts().tolist()
        for i in range(len(packed)):
            assert packed.relpath(i) == folder.relpath(i)
            assert packed.read_bytes(i) == Path(folder.path(i)).read_bytes()
            assert torch.equal(packed.read(i), read_image(folder.path(i)))
        # The same augmented samples from either form, for (epoch, index) keys.
        from_folder = ImageFolderDataset(folder, transform, seed=5)
        from_packed = ImageFolderDataset(packed, transform, seed=5)
        for epoch in (0, 3):
            for i in range(len(packed)):
                x, y = from_folder[(epoch, i)]
                xp, yp = from_packed[(epoch, i)]
                assert y == yp and torch.equal(x, xp)
    # Without bad files in it, packed sample i is sample i of the folder's scan.
    val = open_packed_images(out, "val")
    assert [val.source(i) for i in range(len(val))] == list(range(6))
    assert re.fullmatch(rf"{re.escape(str(out))}/val/u\d{{6}}\.bin sample \d+ \(bee/img\d\.\w+\)", val.describe(3))


def test_killed_run_resumes_to_the_same_output_and_a_damaged_shard_is_named(linscale, tmp_path):
    src = make_tree(tmp_path)
    common = ["preprocess", str(src), UNIT, *QUIET]
    clean = linscale(*common, "--out", str(tmp_path / "clean"), "--nproc-per-node=1", timeout=TIMEOUT)
    assert clean.returncode == 0, clean.output
    units = index_without_timing(tmp_path / "clean")["stats"]["units"]

    out = tmp_path / "out"
    killed = linscale(*common, "--out", str(out), "--nproc-per-node=2", env={EXIT_AFTER_ENV: "2"}, timeout=TIMEOUT)
    assert killed.returncode != 0 and "exits after 2 unit(s)" in killed.output, killed.output
    assert not (out / "index.json").exists()
    done_before = len(list((out / ".units").glob("u*.json")))
    assert 2 <= done_before < units
    assert is_packed_images(out)
    with pytest.raises(ShardError, match=rf"did not finish; rerun `linscale preprocess {re.escape(str(src))} --out"):
        open_packed_images(out)

    rerun = linscale(*common, "--out", str(out), "--nproc-per-node=2", timeout=TIMEOUT)
    assert rerun.returncode == 0, rerun.output
    assert f"resuming in {out}: {done_before} of {units} unit(s) already done" in rerun.stdout, rerun.output
    assert re.search(rf", {done_before} resumed\)", rerun.stdout), rerun.stdout
    assert files_of(out) == files_of(tmp_path / "clean")
    assert index_without_timing(out) == index_without_timing(tmp_path / "clean")

    again = linscale(*common, "--out", str(out), timeout=TIMEOUT)
    assert again.returncode == 0 and "already done" in again.stdout, again.output

    # A damaged shard: reading refuses it with the fix; the rerun redoes that unit alone.
    shard = out / json.loads((out / "index.json").read_text())["splits"]["train"]["shards"][2]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ShardError, match=rf"{re.escape(str(shard))} is damaged .*rerun `linscale preprocess`"):
        open_packed_images(out, "train")
    repair = linscale(*common, "--out", str(out), "--nproc-per-node=1", timeout=TIMEOUT)
    assert repair.returncode == 0, repair.output
    assert f": {units - 1} of {units} unit(s) already done" in repair.stdout, repair.output
    assert files_of(out) == files_of(tmp_path / "clean")
    assert index_without_timing(out) == index_without_timing(tmp_path / "clean")


def test_wrong_flags_and_mismatched_splits_are_refused_before_any_worker_starts(linscale, tmp_path):
    src = make_tree(tmp_path)
    out = tmp_path / "out"
    text = linscale("preprocess", str(src), "--out", str(out), "--tokenizer=bpe", "--vocab-size=500", *QUIET)
    assert text.returncode == 2, text.output
    assert "--tokenizer, --vocab-size are for text corpora" in text.stderr and "--kind text" in text.stderr
    (src / "val" / "dog").mkdir()  # a class only val has
    (src / "val" / "dog" / "x.png").write_bytes((src / "val" / "ant" / "img0.png").read_bytes())
    mismatch = linscale("preprocess", str(src), "--out", str(out), *QUIET)
    assert mismatch.returncode == 2 and "different class folders" in mismatch.stderr, mismatch.output
    assert "only in" in mismatch.stderr and "dog" in mismatch.stderr
    assert not out.exists()
