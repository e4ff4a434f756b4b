"""The built-in real image data: 1,797 handwritten digits (8 x 8 grayscale), shipped with linscale.

`write_digits(out)` writes them as an image-folder tree, the layout the `image` task reads:

    OUT/train/<0..9>/<n>.png      1,437 images
    OUT/test/<0..9>/<n>.png         360 images (every fifth image of each digit, in file order)

`n` is the image's line in the source file, so a file names its origin. Pixel values 0..16 are
scaled to 0..255 (v * 255 / 16, rounded). The tree is written to a temporary folder beside OUT and
renamed into place, so OUT is either complete or absent, and processes that race to write it
(every worker of a job) all end with the same tree. See data/builtin/README.md for the source and
licence.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).parent / "builtin" / "digits.csv.gz"
TEST_EVERY = 5  # every fifth image of each digit is a test image
MARKER = "digits.json"  # written last, inside the tree: its presence means the tree is complete


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8) in 0..16, labels int64 (1797,)) from the shipped file."""
    with gzip.open(SOURCE, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return table[:, :64].reshape(-1, 8, 8).astype(np.uint8), table[:, 64]


def split_of(labels: np.ndarray) -> np.ndarray:
    """True for the test images: within each digit, every TEST_EVERY-th image in file order."""
    test = np.zeros(len(labels), dtype=bool)
    for digit in np.unique(labels):
        where = np.flatnonzero(labels == digit)
        test[where[::TEST_EVERY]] = True
    return test


def is_complete(out: str | os.PathLike) -> bool:
    return (Path(out) / MARKER).is_file()


def write_digits(out: str | os.PathLike) -> Path:
    """Write the digits as OUT/{train,test}/<digit>/<n>.png unless OUT already holds them; return OUT."""
    from PIL import Image

    out = Path(out)
    if is_complete(out):
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists and is not a digits tree written by linscale (no {MARKER}); remove it or choose "
            "another folder"
        )
    images, labels = load_digits()
    test = split_of(labels)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for split in ("train", "test"):
        for digit in range(10):
            (tmp / split / str(digit)).mkdir(parents=True)
    pixels = np.rint(images.astype(np.float32) * (255 / 16)).astype(np.uint8)
    for n, (image, label) in enumerate(zip(pixels, labels, strict=True)):
        split = "test" if test[n] else "train"
        Image.fromarray(image).save(tmp / split / str(label) / f"{n:04d}.png")
    counts = {"train": int((~test).sum()), "test": int(test.sum())}
    (tmp / MARKER).write_text(json.dumps({"images": len(labels), "classes": 10, **counts}) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if out.exists():
            out.rmdir()  # an empty folder, checked above
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_complete(out):  # another process did not win the race either
            raise
    return out
