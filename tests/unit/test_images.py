"""Image folders: scanning, decoding any mode to RGB, unreadable files, per-sample randomness, transforms."""

from __future__ import annotations

import io
import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, features

from linscale.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CenterCrop,
    ImageFolderDataset,
    ImageFolderError,
    ImageFolderIndex,
    ImageFolderWarning,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    SampleKey,
    check_same_classes,
    eval_transform,
    find_bad_images,
    read_bad_file_reports,
    read_image,
    scan_image_folder,
    train_transform,
)
from linscale.train.batching import StepSampler, plan_batch


def noise(h: int = 24, w: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def save(path, im: Image.Image, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)


def jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return buf.getvalue()


def with_bad_files(root):
    """cat: 0 good, 1 truncated JPEG, 2 garbage named .jpg; dog: 3 good, 4 good."""
    save(root / "cat" / "a.jpg", noise(seed=1))
    (root / "cat" / "b.jpg").write_bytes(jpeg_bytes(noise(seed=2))[:300])
    (root / "cat" / "c.jpg").write_bytes(b"this is not an image" * 10)
    save(root / "dog" / "d.png", noise(seed=3))
    save(root / "dog" / "e.png", noise(seed=4))
    return scan_image_folder(root)


# ---------------------------------------------------------------------------------------- scanning


def test_scan_classes_labels_and_sorted_order(tmp_path):
    for rel in ["b/z.png", "b/a.PNG", "a/y.JPG", "a/sub/x.jpeg", "a/m.webp", "C/k.bmp"]:
        save(tmp_path / rel, noise())
    (tmp_path / "a" / "notes.txt").write_text("hello")
    (tmp_path / "a" / "README").write_text("hello")
    (tmp_path / "b" / "._z.png").write_bytes(b"macOS metadata")  # hidden: skipped, not counted
    (tmp_path / ".cache").mkdir()  # hidden folder: not a class
    (tmp_path / "top.txt").write_text("ignored: not in a class folder")
    index = scan_image_folder(tmp_path)
    assert index.classes == ("C", "a", "b")  # code-point order: upper case first
    assert [index.relpath(i) for i in range(len(index))] == [
        "C/k.bmp",
        "a/m.webp",
        "a/sub/x.jpeg",
        "a/y.JPG",
        "b/a.PNG",
        "b/z.png",
    ]
    assert index.labels.tolist() == [0, 1, 1, 1, 2, 2]
    assert index.path(0) == str(tmp_path / "C" / "k.bmp")
    assert index.class_counts().tolist() == [1, 3, 2]
    assert index.ignored == {".txt": 1, "(no extension)": 1}
    assert index.labels.dtype == np.int32


def test_scan_a_split(tmp_path):
    save(tmp_path / "train" / "cat" / "1.png", noise())
    save(tmp_path / "val" / "cat" / "2.png", noise())
    index = scan_image_folder(tmp_path, split="val")
    assert index.root == str(tmp_path / "val") and index.relpath(0) == "cat/2.png"
    with pytest.raises(ImageFolderError, match=r"split 'test' not found: .* holds the folders train, val"):
        scan_image_folder(tmp_path, split="test")
    # Without the split, the split folders would pass for classes: refused with the fix.
    with pytest.raises(ImageFolderError, match=r"look like splits, not classes: pass the split \(for example split="):
        scan_image_folder(tmp_path)


def test_missing_root_and_no_class_folders(tmp_path):
    with pytest.raises(ImageFolderError, match=r"does not exist; expected .*/nope/<class>/<image files>"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ImageFolderError, match="is not a directory"):
        scan_image_folder(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageFolderError, match=r"expected .*/<class>/<image files>, found an empty folder"):
        scan_image_folder(empty)
    flat = tmp_path / "flat"
    save(flat / "1.png", noise())
    save(flat / "2.png", noise())
    with pytest.raises(ImageFolderError, match=r"found 2 image file\(s\) directly in it .* no class folders: move"):
        scan_image_folder(flat)
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("x")
    with pytest.raises(ImageFolderError, match=r"found no class folders, only 1 other file\(s\) \(data.csv\)"):
        scan_image_folder(other)


def test_class_folders_without_any_image(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "photo.heic").write_bytes(b"x")
    with pytest.raises(ImageFolderError, match=r"no image files under the 2 class folder.*\.heic x1"):
        scan_image_folder(tmp_path)


def test_an_empty_class_is_kept_with_one_warning(tmp_path):
    save(tmp_path / "train" / "ant" / "1.png", noise())
    (tmp_path / "train" / "bee").mkdir()
    (tmp_path / "train" / "cow").mkdir()
    save(tmp_path / "train" / "dog" / "2.png", noise())
    save(tmp_path / "val" / "bee" / "3.png", noise())
    (tmp_path / "val" / "ant").mkdir()
    (tmp_path / "val" / "cow").mkdir()
    (tmp_path / "val" / "dog").mkdir()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        train = scan_image_folder(tmp_path, "train")
    assert len(got) == 1 and issubclass(got[0].category, ImageFolderWarning)
    assert "2 class folder(s)" in str(got[0].message) and "bee, cow" in str(got[0].message)
    assert train.classes == ("ant", "bee", "cow", "dog") and train.labels.tolist() == [0, 3]  # dog keeps id 3
    with pytest.warns(ImageFolderWarning, match="ant, cow, dog"):
        val = scan_image_folder(tmp_path, "val")
    check_same_classes(train, val)  # same folders, same ids
    assert val.labels.tolist() == [1]


def test_differing_splits_are_named(tmp_path):
    for rel in ["train/ant/1.png", "train/bee/1.png", "train/cow/1.png", "val/ant/1.png", "val/dog/1.png"]:
        save(tmp_path / rel, noise())
    train, val = scan_image_folder(tmp_path, "train"), scan_image_folder(tmp_path, "val")
    with pytest.raises(ImageFolderError) as e:
        check_same_classes(train, val)
    msg = str(e.value)
    assert f"only in {tmp_path / 'train'}: bee, cow" in msg and f"only in {tmp_path / 'val'}: dog" in msg
    assert "an empty folder is enough" in msg


def test_index_pickles_compactly():
    n = 20_000
    index = ImageFolderIndex.from_samples("/data", ["a", "b"], ((f"img_{i:06d}.jpg", i % 2) for i in range(n)))
    ds = ImageFolderDataset(index, train_transform(8))
    blob = pickle.dumps(ds)
    assert len(blob) < n * (14 + 4 + 8) + 4_000  # names + int32 label + int64 offset per image
    back = pickle.loads(blob)
    assert back.index.path(12345) == "/data/b/img_012345.jpg" and len(back) == n
    fewer = index.without(["/data/a/img_000000.jpg", "/data/b/img_000003.jpg"])
    assert len(fewer) == n - 2 and [fewer.relpath(i) for i in range(3)] == [
        "b/img_000001.jpg",
        "a/img_000002.jpg",
        "a/img_000004.jpg",
    ]


# ---------------------------------------------------------------------------------------- decoding

MODES = {
    "rgb.png": lambda: noise(),
    "rgb.jpg": lambda: noise(),
    "gray.png": lambda: noise().convert("L"),
    "bw.bmp": lambda: noise().convert("1"),
    "la.png": lambda: noise().convert("LA"),
    "rgba.png": lambda: noise().convert("RGBA"),
    "palette.gif": lambda: noise().convert("P"),
    "cmyk.jpg": lambda: noise().convert("CMYK"),
    "cmyk.tiff": lambda: noise().convert("CMYK"),
    "rgb.ppm": lambda: noise(),
    "gray.pgm": lambda: noise().convert("L"),
    "rgba.webp": lambda: noise().convert("RGBA"),
    "gray16.png": lambda: Image.fromarray(np.full((24, 32), 40000, dtype=np.uint16)),
    "float.tif": lambda: Image.fromarray(np.full((24, 32), 0.5, dtype=np.float32)),
}


@pytest.mark.parametrize("name", sorted(MODES))
def test_every_mode_decodes_to_rgb(tmp_path, name):
    if name.endswith(".webp") and not features.check("webp"):
        pytest.skip("Pillow without WebP")
    save(tmp_path / name, MODES[name]())
    x = read_image(tmp_path / name)
    assert x.dtype == torch.uint8 and x.shape == (3, 24, 32)
    if name == "gray16.png":  # scaled from 16 bits, not clipped to white
        assert (x == round(40000 / 257)).all()
    if name == "float.tif":
        assert (x == 128).all()


def test_transparency_is_composited_on_black(tmp_path):
    a = np.zeros((2, 3, 4), dtype=np.uint8)
    a[..., :3] = (200, 100, 50)
    a[0, :, 3] = (0, 128, 255)
    a[1, :, 3] = 255
    save(tmp_path / "t.png", Image.fromarray(a, "RGBA"))
    x = read_image(tmp_path / "t.png")
    np.testing.assert_array_equal(x[:, 0, 0], [0, 0, 0])  # transparent: black, not the hidden colour
    np.testing.assert_allclose(x[:, 0, 1].float(), [100, 50, 25], atol=1)  # half: half
    np.testing.assert_array_equal(x[:, 0, 2], [200, 100, 50])
    # A palette image with a transparent index behaves the same.
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 255, 0])
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    save(tmp_path / "p.png", p, transparency=0)
    np.testing.assert_array_equal(read_image(tmp_path / "p.png")[:, 0].T, [[0, 0, 0], [0, 255, 0]])


def test_unreadable_files_are_replaced_counted_and_reported(tmp_path):
    index = with_bad_files(tmp_path / "data")
    report = tmp_path / "bad"
    ds = ImageFolderDataset(index, seed=3, report_dir=report)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        x, label = ds[1]  # truncated -> 2 garbage -> 3, a dog
        again = [ds[i] for i in range(len(ds))] + [ds[2]]
    assert label == 1 and torch.equal(x, ds[3][0]) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    assert [lab for _, lab in again] == [0, 1, 1, 1, 1, 1]
    bad = {str(index.path(1)), str(index.path(2))}
    assert set(ds.bad_files) == bad and "truncated" in ds.bad_files[index.path(1)].lower()
    assert len(got) == 2 and all(issubclass(w.category, ImageFolderWarning) for w in got)  # once per file
    assert set(read_bad_file_reports(report)) == bad == set(ds.all_bad_files())
    lines = [json.loads(line) for f in report.iterdir() for line in f.read_text().splitlines()]
    assert len(lines) == 2 and {rec["path"] for rec in lines} == bad
    # The last index wraps around to the first readable one.
    (tmp_path / "data" / "dog" / "f.jpg").write_bytes(b"\xff\xd8garbage")
    wrapped = ImageFolderDataset(scan_image_folder(tmp_path / "data"))
    with pytest.warns(ImageFolderWarning):
        assert wrapped[5][1] == 0 and torch.equal(wrapped[5][0], wrapped[0][0])


def test_all_unreadable_is_an_error(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "x.jpg").write_bytes(b"nope")
    ds = ImageFolderDataset(scan_image_folder(tmp_path))
    with pytest.warns(ImageFolderWarning), pytest.raises(ImageFolderError, match="none of the 1 images"):
        ds[0]
    with pytest.raises(IndexError):
        ds[1]


def test_find_bad_images_up_front(tmp_path):
    index = with_bad_files(tmp_path)
    expected = {index.path(1), index.path(2)}
    assert set(find_bad_images(index)) == expected
    assert set(find_bad_images(index, workers=2, chunk=2)) == expected
    clean = index.without(expected)
    assert [clean.relpath(i) for i in range(len(clean))] == ["cat/a.jpg", "dog/d.png", "dog/e.png"]
    assert clean.classes == index.classes and clean.labels.tolist() == [0, 1, 1]


def EpochStepSampler(*args, **kwargs) -> StepSampler:  # noqa: N802 - reads like the class it returns
    """What the loop's sampler yields for this dataset (it declares `epoch_keys`): (epoch, index) keys."""
    assert ImageFolderDataset.epoch_keys
    return StepSampler(*args, keyed=True, **kwargs)


def test_dataloader_workers_report_to_the_parent(tmp_path):
    index = with_bad_files(tmp_path / "data")
    ds = ImageFolderDataset(index, train_transform(8), seed=1, report_dir=tmp_path / "bad")
    sampler = EpochStepSampler(len(ds), plan_batch(4, 1, 2), rank=0, seed=0)  # epoch = 1 step of 4 of the 5
    keys = [sampler.micro_indices(s, m) for s in range(2) for m in range(2)]  # 2 epochs
    assert 1 in {k[1] for batch in keys for k in batch}  # so both bad files are met
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2)
    it = iter(loader)
    got = [next(it) for _ in range(len(keys))]
    del it
    assert ds.bad_files == {}  # what the workers met stays in the workers...
    assert set(ds.all_bad_files()) == {index.path(1), index.path(2)}  # ...and reaches the parent through report_dir
    fresh = ImageFolderDataset(index, train_transform(8), seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = [[fresh[k] for k in batch] for batch in keys]
    for (x, y), want in zip(got, expected, strict=True):
        assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, torch.stack([w[0] for w in want])) and y.tolist() == [w[1] for w in want]


def test_same_seed_epoch_index_same_tensor_anywhere(tmp_path):
    for i in range(6):
        save(tmp_path / f"c{i % 2}" / f"{i}.png", noise(40, 56, seed=i))
    index = scan_image_folder(tmp_path)
    ds = ImageFolderDataset(index, train_transform(16), seed=7)
    a = ds[(2, 3)][0]
    assert torch.equal(a, ds[SampleKey(2, 3)][0])
    assert torch.equal(a, ImageFolderDataset(index, train_transform(16), seed=7)[(2, 3)][0])  # a restart
    assert torch.equal(a, pickle.loads(pickle.dumps(ds))[(2, 3)][0])  # a worker's copy
    assert not torch.equal(a, ds[(3, 3)][0])  # another epoch: another crop
    assert not torch.equal(a, ImageFolderDataset(index, train_transform(16), seed=8)[(2, 3)][0])
    ds.set_epoch(2)
    assert torch.equal(a, ds[3][0])
    # Every key of one optimizer step, read by 1 replica or by 2, gets the same tensor.
    one = EpochStepSampler(len(ds), plan_batch(4, 1, 2), rank=0, seed=5)
    two = [EpochStepSampler(len(ds), plan_batch(4, 2, 2), rank=r, seed=5) for r in (0, 1)]
    step = one.steps_per_epoch + 0  # in the second epoch
    keys_one = [k for m in range(2) for k in one.micro_indices(step, m)]
    keys_two = [k for s in two for k in s.micro_indices(step, 0)]
    assert keys_one == keys_two and {k[0] for k in keys_one} == {1}  # same keys, so the same tensors


def test_eval_transform_is_deterministic(tmp_path):
    save(tmp_path / "c" / "x.png", noise(30, 50))
    index = scan_image_folder(tmp_path)
    ds = ImageFolderDataset(index, eval_transform(16), seed=1)
    other = ImageFolderDataset(index, eval_transform(16), seed=2)
    assert torch.equal(ds[(0, 0)][0], ds[(5, 0)][0]) and torch.equal(ds[0][0], other[0][0])


# ---------------------------------------------------------------------------------------- transforms


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8))


def test_train_and_eval_transform_shapes_and_ranges():
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    for h, w in [(50, 70), (70, 50), (9, 9), (3, 200)]:
        for seed in range(5):
            x = train_transform(24)(image(h, w), np.random.default_rng(seed))
            assert x.shape == (3, 24, 24) and x.dtype == torch.float32
            assert lo - 1e-5 <= x.min() and x.max() <= hi + 1e-5
        y = eval_transform((24, 32))(image(h, w))
        assert y.shape == (3, 24, 32) and lo - 1e-5 <= y.min() and y.max() <= hi + 1e-5


def test_random_resized_crop_stays_inside_and_respects_scale():
    crop = RandomResizedCrop(8, scale=(0.25, 0.5), ratio=(0.5, 2.0))
    for seed in range(200):
        top, left, h, w = crop.params(40, 60, np.random.default_rng(seed))
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
        assert 0.2 <= h * w / 2400 <= 0.55 and 0.4 <= w / h <= 2.5
    # An image far outside the ratio range falls back to the central crop closest to it.
    assert RandomResizedCrop(4, ratio=(0.75, 4 / 3)).params(2, 300, np.random.default_rng(0)) == (0, 148, 2, 3)
    whole = RandomResizedCrop((5, 7), scale=(1.0, 1.0), ratio=(7 / 5, 7 / 5))
    x = image(5, 7)
    assert torch.equal(whole(x, np.random.default_rng(0)), x.float())  # no resampling at the same size


def test_flip_resize_center_crop_normalize():
    x = image(6, 10)
    assert torch.equal(RandomHorizontalFlip(1.0)(x, np.random.default_rng(0)), x.flip(-1))
    assert torch.equal(RandomHorizontalFlip(0.0)(x, np.random.default_rng(0)), x)
    flips = [bool(RandomHorizontalFlip()(x, np.random.default_rng(s))[0, 0, 0] != x[0, 0, 0]) for s in range(100)]
    assert 25 < sum(flips) < 75
    assert Resize(3)(x).shape == (3, 3, 5) and Resize(3)(image(10, 6)).shape == (3, 5, 3)
    assert Resize((4, 4))(x).shape == (3, 4, 4)
    flat = torch.full((3, 8, 8), 77, dtype=torch.uint8)
    assert torch.allclose(Resize(3)(flat), torch.full((3, 3, 3), 77.0))  # resampling keeps a flat image flat
    assert torch.equal(CenterCrop((2, 4))(x), x[:, 2:4, 3:7])
    padded = CenterCrop(8)(x)
    assert padded.shape == (3, 8, 8) and torch.equal(padded[:, 1:7, :], x[:, :, 1:9]) and (padded[:, 0] == 0).all()
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 2.0)
    out = Normalize(mean, std)(torch.full((3, 2, 2), 51, dtype=torch.uint8))  # 51 / 255 = 0.2
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([(0.2 - 0.5) / 0.5, (0.2 - 0.25) / 0.25, 0.1]))
    with pytest.raises(ValueError, match="Generator"):
        RandomResizedCrop(4)(x, None)
