"""`linscale data`: built-in datasets and checks of image data.

linscale data digits --out DIR     the built-in handwritten digits as an image-folder tree
linscale data check DIR            decode every image of a tree (or checksum packed shards)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="write the built-in digits as an image folder; check an image folder for unreadable files",
        description="Built-in data and checks of image data (see docs/images.md).",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    d = actions.add_parser(
        "digits",
        help="write the built-in handwritten digits as DIR/{train,test}/<digit>/<n>.png",
        description="Write the 1,797 handwritten digits (8 x 8, UCI test set, CC BY 4.0) shipped with linscale as an "
        "image-folder tree: DIR/train (1,433 images) and DIR/test (364: every fifth image of each digit). "
        "`linscale train image --task.data=DIR` trains on it; without --task.data the image task writes it to "
        "runs/data/digits itself.",
    )
    d.add_argument("--out", default="runs/data/digits", help="output folder (default: runs/data/digits)")
    c = actions.add_parser(
        "check",
        help="decode every image of an image-folder tree and list the unreadable ones",
        description="Decode every image of DIR (DIR/<split>/<class>/<images> or DIR/<class>/<images>) in parallel "
        "and list those that fail, so they can be fixed or removed before training. For a directory written by "
        "`linscale preprocess`, check every shard's size and checksum instead.",
    )
    c.add_argument("dir", help="an image-folder tree, or packed image shards")
    c.add_argument("--workers", type=int, default=0, help="decoding processes (default: one per core)")
    c.add_argument("--list", default="", help="also write the unreadable files, one path per line, to this file")
    p.set_defaults(func=run_cli, parser=p)


def run_cli(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    from linscale.cli.common import error
    from linscale.data.images import ImageFolderError
    from linscale.data.shards import ShardError

    if rest:
        return error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        if args.action == "digits":
            return _digits(Path(args.out))
        if args.action == "check":
            return _check(Path(args.dir), args.workers, args.list)
        args.parser.print_help()
        return 2
    except (ImageFolderError, ShardError, FileExistsError, ValueError) as e:
        return error(str(e))
    except KeyboardInterrupt:
        return error("interrupted")


def _digits(out: Path) -> int:
    from linscale.data import digits

    existed = digits.is_complete(out)
    digits.write_digits(out)
    counts = {s: sum(1 for _ in (out / s).glob("*/*.png")) for s in ("train", "test")}
    state = "already there" if existed else "written"
    print(f"linscale: digits {state} in {out}: train {counts['train']}, test {counts['test']} images, 10 classes")
    print(f"linscale: train on them with `linscale train image --task.data={out}`")
    return 0


def _check(root: Path, workers: int, list_file: str) -> int:
    from linscale.data import image_shards
    from linscale.data import images as img
    from linscale.train.metrics import format_summary

    t0 = time.perf_counter()
    if image_shards.is_packed_images(root):
        image_shards.verify_packed(root, full=True)
        print(f"linscale: {root}: every packed shard has its indexed size and checksum")
        return 0
    if not root.is_dir():
        raise img.ImageFolderError(f"{root} is not a directory; give an image-folder tree or packed image shards")
    splits = [p.name for p in sorted(root.iterdir()) if p.is_dir() and p.name.lower() in img.SPLIT_NAMES]
    indexes = [img.scan_image_folder(root, split=s) for s in splits] if splits else [img.scan_image_folder(root)]
    workers = workers if workers > 0 else (os.cpu_count() or 1)
    bad: dict[str, str] = {}
    images = 0
    for index in indexes:
        images += len(index)
        bad.update(img.find_bad_images(index, workers=workers if len(index) > 64 else 0))
    for path, problem in sorted(bad.items()):
        print(f"unreadable: {path}: {problem}")
    if list_file:
        Path(list_file).write_text("".join(f"{p}\n" for p in sorted(bad)))
    summary = {
        "images": images,
        "unreadable": len(bad),
        "splits": ", ".join(f"{Path(i.root).name} {len(i)}" for i in indexes),
        "classes": len(indexes[0].classes),
        "workers": workers,
        "seconds": time.perf_counter() - t0,
    }
    print(format_summary(summary, "image check"), flush=True)
    if bad:
        print(
            f"linscale: {len(bad)} unreadable image(s): fix or delete them, or train with --task.verify=true to leave "
            "them out (training also skips them when met)"
        )
    return 1 if bad else 0
