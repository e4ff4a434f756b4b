"""Image classification data: a folder of class folders, decoded with Pillow, augmented in plain torch.

Layout: ``ROOT/<class>/<image files>``, or ``ROOT/<split>/<class>/<image files>`` with ``split=``.

    index = scan_image_folder(root, split="train")          # classes, labels, paths: compact arrays
    check_same_classes(index, scan_image_folder(root, split="val"))
    data = ImageFolderDataset(index, train_transform(224), seed=shard.seed, report_dir=run_dir / "bad-images")
    image, label = data[(epoch, i)]                          # float32 (3, 224, 224), int

Randomness. An item's augmentation draws from its own generator, ``numpy.random.default_rng([seed,
epoch, index])``, never from a global RNG: the same sample at the same epoch gets the same crop and
flip whatever the DataLoader worker, the number of replicas or a restart from a checkpoint. The
epoch travels with the index: ``data[(epoch, index)]``. A plain ``data[index]`` uses ``data.epoch``
(``set_epoch``), which suits evaluation and single-process use only, because DataLoader workers
hold copies of the dataset that do not see a later ``set_epoch`` of the parent.

Unreadable files (corrupt, truncated, missing since the scan): the item is served by the next
readable index (wrapping around), deterministically, with the label of the image actually
returned; each process records the bad path in ``data.bad_files``, and the first process to meet it
warns (with ``report_dir``, once among all processes that share it). Workers' records
do not reach the parent process, so with ``report_dir`` every process also appends a JSON line per
bad file to a file of its own in that directory, and ``data.all_bad_files()`` (or
``read_bad_file_reports``) merges them. ``find_bad_images`` decodes a whole index up front, in
parallel, for when a run should know before it starts; ``index.without(paths)`` drops them.
"""

from __future__ import annotations

import json
import math
import os
import socket
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Folder names that mean ROOT holds splits, not classes.
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "eval", "dev"})
# Per process, this many unreadable files are announced one by one; the rest only recorded.
MAX_BAD_FILE_WARNINGS = 5
_REPORT_GLOB = "bad-images.*.jsonl"


class ImageFolderError(ValueError):
    """An image folder that does not have the expected layout; the message says what to change."""


class ImageFolderWarning(UserWarning):
    """A class folder without images, or an unreadable image that was skipped."""


class SampleKey(NamedTuple):
    """What the training sampler hands the dataset: an index and the epoch it is read in."""

    epoch: int
    index: int


# --------------------------------------------------------------------------------------------
# Scanning


def _show(names: Iterable[str], limit: int = 10) -> str:
    names = list(names)
    text = ", ".join(names[:limit])
    return text + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _show_ignored(ignored: dict[str, int]) -> str:
    if not ignored:
        return "no other files"
    top = sorted(ignored.items(), key=lambda kv: (-kv[1], kv[0]))
    return f"{sum(ignored.values())} other file(s) ignored: " + _show(f"{ext} x{n}" for ext, n in top)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images_under(top: str, ignored: Counter) -> list[str]:
    """Image files under `top` (subfolders included), as sorted paths relative to `top`.

    Hidden entries are skipped: `._x.jpg` files are macOS metadata, not images. Folders reached
    twice through symbolic links are read once."""
    found: list[str] = []
    seen: set[str] = set()
    stack = [""]
    while stack:
        rel = stack.pop()
        folder = os.path.join(top, rel)
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(folder) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                path = os.path.join(rel, e.name)
                if e.is_dir():
                    stack.append(path)
                elif e.is_file():
                    if _is_image(e.name):
                        found.append(path)
                    else:
                        ignored[os.path.splitext(e.name)[1].lower() or "(no extension)"] += 1
    found.sort()
    return found


@dataclass(frozen=True, eq=False)
class ImageFolderIndex:
    """The samples of one split: class names, and per sample a label and a path, in arrays.

    Label ids are positions in `classes` (sorted folder names). Paths are stored relative to their
    class folder as one UTF-8 byte buffer plus offsets, so an index of a million images pickles
    to DataLoader workers in one copy of a few tens of MB and, after a fork, shares its pages
    instead of copying them the way Python lists of strings are copied when touched.
    """

    root: str  # the folder holding the class folders (ROOT or ROOT/<split>)
    classes: tuple[str, ...]
    labels: np.ndarray  # (n,) int32
    names: np.ndarray  # uint8: the paths relative to the class folders, back to back
    offsets: np.ndarray  # (n + 1,) int64: sample i's path is names[offsets[i]:offsets[i + 1]]
    ignored: dict[str, int] = field(default_factory=dict)  # files skipped for their extension, by extension

    @classmethod
    def from_samples(
        cls, root: str | os.PathLike, classes: Sequence[str], samples: Iterable[tuple[str, int]], ignored=None
    ) -> ImageFolderIndex:
        """An index of (path relative to its class folder, label) pairs, in the order given."""
        names: list[bytes] = []
        labels: list[int] = []
        for name, label in samples:
            if not 0 <= label < len(classes):
                raise ImageFolderError(f"label {label} of {name!r} is not a class id: there are {len(classes)} classes")
            names.append(os.fsencode(name))
            labels.append(label)
        offsets = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in names], out=offsets[1:])
        blob = np.frombuffer(b"".join(names), dtype=np.uint8).copy()
        return cls(str(root), tuple(classes), np.asarray(labels, dtype=np.int32), blob, offsets, dict(ignored or {}))

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"ImageFolderIndex({self.root!r}, {len(self.classes)} classes, {len(self)} images)"

    def relpath(self, i: int) -> str:
        """Sample i's path relative to `root` (it starts with the class folder)."""
        name = os.fsdecode(self.names[self.offsets[i] : self.offsets[i + 1]].tobytes())
        return os.path.join(self.classes[self.labels[i]], name)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.relpath(i))

    def describe(self, i: int) -> str:
        """Where sample i comes from, for messages: its file."""
        return self.path(i)

    def read(self, i: int) -> torch.Tensor:
        """Sample i decoded: a (3, H, W) uint8 tensor (see `read_image`)."""
        return read_image(self.path(i))

    def class_counts(self) -> np.ndarray:
        """Images per class, indexed by label id."""
        return np.bincount(self.labels, minlength=len(self.classes))

    def without(self, paths: Iterable[str]) -> ImageFolderIndex:
        """The index minus the given files (full paths, as `find_bad_images` reports them); the
        classes and their ids stay. Note that the sample count, so the epoch order, changes."""
        drop = {os.path.normpath(p) for p in paths}
        keep = [i for i in range(len(self)) if os.path.normpath(self.path(i)) not in drop]
        return ImageFolderIndex.from_samples(
            self.root,
            self.classes,
            (
                (os.fsdecode(self.names[self.offsets[i] : self.offsets[i + 1]].tobytes()), int(self.labels[i]))
                for i in keep
            ),
            self.ignored,
        )


def _no_classes(top: Path, files: list[str]) -> str:
    head = f"expected {top}/<class>/<image files>, found "
    if not files:
        return head + f"an empty folder: put each class's images in a folder of {top} named after the class"
    images = [f for f in files if _is_image(f)]
    if images:
        return head + (
            f"{len(images)} image file(s) directly in it ({_show(images, 3)}) and no class folders: move each "
            f"class's images into a folder of {top} named after the class"
        )
    return head + f"no class folders, only {len(files)} other file(s) ({_show(files, 5)})"


def scan_image_folder(root: str | os.PathLike, split: str | None = None) -> ImageFolderIndex:
    """Index ``ROOT/<class>/<files>`` (``ROOT/<split>/<class>/<files>`` when `split` is given).

    Classes are the sorted names of the (non-hidden) subfolders, and their positions the label
    ids. A class's images are the files with an image extension (any case) anywhere below its
    folder, sorted by path; the order is Python's string order, not the locale's, so every
    machine builds the same index. Other files are ignored and counted in `index.ignored`.

    A class folder without images is kept, with a warning: dropping it would shift the label ids
    of every later class, so a model trained on this split would disagree with another split, or
    with a later run, about what each output means. Only when no class has any image is the
    folder refused.
    """
    base = Path(root)
    if not base.exists():
        raise ImageFolderError(f"image folder {base} does not exist; expected {base}/<class>/<image files>")
    if not base.is_dir():
        raise ImageFolderError(f"image folder {base} is not a directory; expected {base}/<class>/<image files>")
    top = base
    if split is not None:
        top = base / split
        if not top.is_dir():
            subs = sorted(e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith("."))
            raise ImageFolderError(
                f"split {split!r} not found: expected {top}/<class>/<image files>, but {base} holds "
                + (f"the folders {_show(subs)}" if subs else "no folders")
            )
    with os.scandir(top) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir()]
    if not classes:
        raise ImageFolderError(_no_classes(top, [e.name for e in entries if e.is_file()]))
    if split is None and all(c.lower() in SPLIT_NAMES for c in classes):
        raise ImageFolderError(
            f"{top} holds the folders {_show(classes)}, which look like splits, not classes: pass the split "
            f"(for example split={classes[0]!r}) to read {top}/<split>/<class>/<image files>"
        )
    ignored: Counter = Counter()
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        found = _images_under(str(top / name), ignored)
        if not found:
            empty.append(name)
        samples.extend((f, label) for f in found)
    if not samples:
        raise ImageFolderError(
            f"no image files under the {len(classes)} class folder(s) of {top} ({_show(classes, 5)}); "
            f"{_show_ignored(dict(ignored))}; image extensions are {' '.join(IMAGE_EXTENSIONS)}"
        )
    if empty:
        warnings.warn(
            f"{len(empty)} class folder(s) of {top} hold no image files: {_show(empty)}. They stay classes (with no "
            f"samples) so that label ids match the other splits; {_show_ignored(dict(ignored))}",
            ImageFolderWarning,
            stacklevel=2,
        )
    return ImageFolderIndex.from_samples(top, classes, samples, dict(ignored))


def check_same_classes(train: ImageFolderIndex, other: ImageFolderIndex) -> None:
    """Raise unless both splits have the same class folders, hence the same label ids."""
    if train.classes == other.classes:
        return
    a, b = set(train.classes), set(other.classes)
    parts = []
    if a - b:
        parts.append(f"only in {train.root}: {_show(sorted(a - b))}")
    if b - a:
        parts.append(f"only in {other.root}: {_show(sorted(b - a))}")
    raise ImageFolderError(
        f"the splits have different class folders, so label ids would disagree ({'; '.join(parts)}); give every "
        "split the same class folders (an empty folder is enough for a class with no images in that split)"
    )


# --------------------------------------------------------------------------------------------
# Decoding


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8.

    Transparency is composited on black (colour times alpha): what a transparent pixel stores
    underneath is invisible and often arbitrary, and black is what a premultiplied pixel would
    show. 16-bit and 32-bit integer images are scaled from the 16-bit range (Pillow would clip
    everything above 255 to white); float images are read as 0..1.
    """
    mode = im.mode
    if mode == "RGB":
        return np.array(im)
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.float32)
        return _gray_to_rgb(np.clip(a / 257.0 + 0.5, 0, 255).astype(np.uint8))
    if mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float32))
        return _gray_to_rgb(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA") if mode != "La" else im.convert("LA").convert("RGBA")
        out = Image.new("RGB", im.size, (0, 0, 0))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return np.array(out)
    return np.array(im.convert("RGB"))


def _gray_to_rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[:, :, None], 3, axis=2)


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to a (3, H, W) uint8 tensor (a view of (H, W, 3) memory).

    The first frame of an animated file; no EXIF rotation (as the usual ImageNet pipelines).
    Truncated files raise: Pillow's LOAD_TRUNCATED_IMAGES is left as is (off by default)."""
    with Image.open(path) as im:
        rgb = _to_rgb_array(im)
    if not rgb.flags.writeable or not rgb.flags.c_contiguous:
        rgb = np.array(rgb, order="C")
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _describe(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:300]


_WORKER_INDEX: ImageFolderIndex | None = None  # find_bad_images: each pool process's copy, sent once


def _set_worker_index(index: ImageFolderIndex) -> None:
    global _WORKER_INDEX
    _WORKER_INDEX = index


def _check_files(ids: range, index: ImageFolderIndex | None = None) -> dict[str, str]:
    if index is None:
        index = _WORKER_INDEX
    assert index is not None
    bad = {}
    for i in ids:
        path = index.path(i)
        try:
            read_image(path)
        except Exception as e:  # any decoder failure makes the file unreadable
            bad[path] = _describe(e)
    return bad


def find_bad_images(index: ImageFolderIndex, workers: int = 0, chunk: int = 512) -> dict[str, str]:
    """Decode every image of `index` (in `workers` processes; 0: this one): {path: error} of
    those that fail. A full decode is the only check that finds truncated JPEGs; it costs about
    one epoch of decoding divided by `workers`."""
    n = len(index)
    if workers <= 0:
        return _check_files(range(n), index)
    chunk = max(1, min(chunk, math.ceil(n / (4 * workers))))
    bad: dict[str, str] = {}
    with ProcessPoolExecutor(workers, initializer=_set_worker_index, initargs=(index,)) as pool:
        for found in pool.map(_check_files, [range(s, min(s + chunk, n)) for s in range(0, n, chunk)]):
            bad.update(found)
    return bad


def read_bad_file_reports(report_dir: str | os.PathLike) -> dict[str, str]:
    """{path: error} merged from the report files every process wrote to `report_dir`."""
    bad: dict[str, str] = {}
    for f in sorted(Path(report_dir).glob(_REPORT_GLOB)):
        for line in f.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
                bad.setdefault(rec["path"], rec["error"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a killed process
    return bad


# --------------------------------------------------------------------------------------------
# Dataset


class ImageFolderDataset(torch.utils.data.Dataset):
    """Map-style dataset of (image, label): image a float32 (3, H, W) tensor from `transform`
    (without one: the decoded image scaled to 0..1), label the int class id.

    Keys: ``data[(epoch, index)]`` (a `SampleKey` or a plain pair), or ``data[index]`` for the
    epoch set by `set_epoch` (0 by default). Item randomness comes from
    ``numpy.random.default_rng([seed, epoch, index])`` and is handed to the transform.

    Unreadable files: see the module docstring. `bad_files` holds {path: error} of the files this
    process failed to decode; `all_bad_files()` adds what other processes wrote to `report_dir`.
    Pickling carries the index arrays, the transform and a few scalars, never an open file.

    `index` is an `ImageFolderIndex` or any object with the same `root`, `classes`, `labels`,
    `__len__`, `read(i)` (a (3, H, W) uint8 tensor) and `describe(i)` (where sample i comes from),
    such as the packed shards of `linscale preprocess`.
    """

    #: Read with (epoch, index) keys: the training sampler should yield SampleKey pairs for it.
    epoch_keys = True
    #: Items are decoded and augmented per read: worth a loader worker even on CPU (see the loop).
    decodes = True

    def __init__(
        self,
        index: ImageFolderIndex,
        transform: Any = None,
        *,
        seed: int = 0,
        report_dir: str | os.PathLike | None = None,
    ) -> None:
        if len(index) == 0:
            raise ImageFolderError(f"{index.root} has no images to read")
        if seed < 0:
            raise ValueError(f"the seed of an ImageFolderDataset must be >= 0, got {seed}")
        self.index = index
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.report_dir = None if report_dir is None else str(report_dir)
        if self.report_dir is not None:
            os.makedirs(self.report_dir, exist_ok=True)
        self.bad_files: dict[str, str] = {}
        self._bad_ids: set[int] = set()

    @property
    def classes(self) -> tuple[str, ...]:
        return self.index.classes

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain-int keys (this copy of the dataset only: not seen by running workers)."""
        self.epoch = int(epoch)

    def _key(self, key: Any) -> tuple[int, int]:
        if isinstance(key, tuple):
            epoch, i = key
        else:
            epoch, i = self.epoch, key
        i, n = int(i), len(self.index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"image {i} out of range: the dataset has {n} images")
        return int(epoch), i

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, int]:
        epoch, i = self._key(key)
        j, image = self._read_from(i)
        if self.transform is None:
            x = image.float().div_(255)
        else:
            x = self.transform(image, np.random.default_rng([self.seed, epoch, i]))
        return x.contiguous(), int(self.index.labels[j])

    def _read_from(self, i: int) -> tuple[int, torch.Tensor]:
        """The first readable image at or after index i (wrapping around), and its index."""
        n = len(self.index)
        for step in range(n):
            j = (i + step) % n
            if j in self._bad_ids:
                continue
            try:
                return j, self.index.read(j)
            except Exception as e:  # any decoder failure makes the file unreadable
                self._record_bad(j, i, e)
        raise ImageFolderError(f"none of the {n} images under {self.index.root} can be read: {_show(self.bad_files)}")

    def _record_bad(self, j: int, wanted: int, e: Exception) -> None:
        path, error = self.index.describe(j), _describe(e)
        self._bad_ids.add(j)
        self.bad_files[path] = error
        if len(self.bad_files) <= MAX_BAD_FILE_WARNINGS and self._first_to_name(path):
            more = (
                "; further unreadable images are only recorded" if len(self.bad_files) == MAX_BAD_FILE_WARNINGS else ""
            )
            warnings.warn(
                f"skipping unreadable image {path} ({error}): sample {wanted} is served by the next readable one{more}",
                ImageFolderWarning,
                stacklevel=3,
            )
        if self.report_dir is not None:
            line = json.dumps({"path": path, "error": error, "host": socket.gethostname(), "pid": os.getpid()}) + "\n"
            name = os.path.join(self.report_dir, f"bad-images.{socket.gethostname()}.{os.getpid()}.jsonl")
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line.encode())  # one short O_APPEND write: lines never interleave
            finally:
                os.close(fd)

    def _first_to_name(self, path: str) -> bool:
        """Whether this process is the first to meet `path`, of all that share `report_dir` (any
        worker or rank may meet a bad file, and every epoch does again): the file is named once."""
        if self.report_dir is None:
            return True
        flag = os.path.join(self.report_dir, f"named.{zlib.crc32(os.fsencode(path)):08x}")
        try:
            os.close(os.open(flag, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return False
        return True

    def all_bad_files(self) -> dict[str, str]:
        """{path: error} of every unreadable image met so far, by this process and, through
        `report_dir`, by DataLoader workers and other ranks writing there."""
        bad = dict(self.bad_files)
        if self.report_dir is not None:
            bad.update(read_bad_file_reports(self.report_dir))
        return bad


# --------------------------------------------------------------------------------------------
# Transforms: (image, rng) -> image. Input a (3, H, W) uint8 tensor; geometric steps convert it to
# float32 in 0..255 once, when they resample; Normalize maps 0..255 to (x / 255 - mean) / std.


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"image size must be >= 1, got {size}")
    return int(h), int(w)


def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    x = img if img.is_floating_point() else img.float()
    if tuple(x.shape[-2:]) == (h, w):
        return x
    # Antialiased bilinear: non-negative weights, so values stay in 0..255 up to rounding.
    y = F.interpolate(x.unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    return y.clamp_(0, 255)


class Compose:
    def __init__(self, *steps: Any) -> None:
        self.steps = steps

    def __call__(self, img: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        for step in self.steps:
            img = step(img, rng)
        return img

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.steps))})"


class RandomResizedCrop:
    """A crop of random area fraction in `scale` and aspect ratio (w / h) in `ratio` (log-uniform),
    resized to `size`; after 10 misses, the central crop closest to `ratio`."""

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        if not 0 < scale[0] <= scale[1] or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}")
        self.size = _pair(size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)

    def params(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the crop."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, max(1, int(round(width / self.ratio[0])))
        elif aspect > self.ratio[1]:
            w, h = max(1, int(round(height * self.ratio[1]))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: torch.Tensor, rng: np.random.Generator | None) -> torch.Tensor:
        if rng is None:
            raise ValueError("RandomResizedCrop needs a numpy Generator (the dataset passes one per item)")
        top, left, h, w = self.params(img.shape[-2], img.shape[-1], rng)
        return _resize(img[..., top : top + h, left : left + w], *self.size)

    def __repr__(self) -> str:
        return f"RandomResizedCrop({self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, img: torch.Tensor, rng: np.random.Generator | None) -> torch.Tensor:
        if rng is None:
            raise ValueError("RandomHorizontalFlip needs a numpy Generator (the dataset passes one per item)")
        return img.flip(-1) if rng.random() < self.p else img

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """`size` int: the shorter side becomes `size`, keeping the aspect ratio; (h, w): exactly that."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = size if isinstance(size, int) else _pair(size)
        _pair(size)

    def __call__(self, img: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        height, width = img.shape[-2:]
        if isinstance(self.size, tuple):
            return _resize(img, *self.size)
        s = self.size
        if height <= width:
            return _resize(img, s, max(1, int(s * width / height)))
        return _resize(img, max(1, int(s * height / width)), s)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class CenterCrop:
    """The central (h, w) window; zero padding where the image is smaller."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size)

    def __call__(self, img: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        h, w = self.size
        height, width = img.shape[-2:]
        if height < h or width < w:
            ph, pw = max(0, h - height), max(0, w - width)
            img = F.pad(img, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            height, width = img.shape[-2:]
        top, left = (height - h) // 2, (width - w) // 2
        return img[..., top : top + h, left : left + w]

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class Normalize:
    """0..255 values (uint8 or float) -> (x / 255 - mean) / std, float32; mean and std in 0..1 units."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need one value per channel and std > 0, got {mean}, {std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._shift = torch.tensor(self.mean).mul(255).view(-1, 1, 1)
        self._scale = torch.tensor(self.std).mul(255).reciprocal().view(-1, 1, 1)

    def __call__(self, img: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        if img.shape[0] != len(self.mean):
            raise ValueError(f"Normalize has {len(self.mean)} channel(s) of mean/std, the image {img.shape[0]}")
        x = img if img.is_floating_point() else img.float()
        return (x - self._shift) * self._scale

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def train_transform(
    size: int | Sequence[int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: float = 0.5,
) -> Compose:
    """Random resized crop to `size`, horizontal flip with probability `flip`, normalisation."""
    return Compose(RandomResizedCrop(size, scale, ratio), RandomHorizontalFlip(flip), Normalize(mean, std))


def eval_transform(
    size: int | Sequence[int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    crop_fraction: float = 0.875,
) -> Compose:
    """Shorter side to size / crop_fraction (256 for 224), central `size` crop, normalisation.
    Deterministic: the same tensor for an image whatever the epoch or seed."""
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    h, w = _pair(size)
    return Compose(Resize(int(round(max(h, w) / crop_fraction))), CenterCrop((h, w)), Normalize(mean, std))
