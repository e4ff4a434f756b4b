"""`linscale preprocess` of an image folder: millions of small files -> a few large shard files.

Input: an image-folder tree, ``SRC/<split>/<class>/<images>`` (every split folder becomes a split
of the same name) or ``SRC/<class>/<images>`` (one split, "train"), read exactly as
`linscale.data.images.scan_image_folder` reads it. Sample i of a packed split is sample i of
``scan_image_folder(SRC, split=...)``: same label, same file bytes (unreadable files aside, see below).

Units are contiguous ranges of a split's samples holding about `unit_bytes` of files (at least
one file each), planned once on rank 0 from the scan and broadcast, so the tree is scanned (and
every file stat'ed) once per run, not once per worker. Workers take units largest first (LPT)
from the shared counter of the text preprocessing (`linscale.data.preprocess.Tickets`). A unit
becomes one shard ``OUT/<split>/u<id>.bin``: its files' encoded bytes back to back, unchanged (no
re-encoding: the output is as large as the input), then a done-marker ``OUT/.units/u<id>.json``
holding the unit's per-sample lengths and its unreadable files. A rerun skips the units whose
marker and shard are intact. Once every unit is done, rank 0 writes per split a sample table
``OUT/<split>/samples.npy`` (shard, offset, length, label, source position, name) with the names
in ``OUT/<split>/names.bin``, the list of unreadable files ``OUT/bad-images.jsonl``, and
``OUT/index.json`` last. A unit's output depends only on its files, so the output is
byte-identical whatever the number of workers.

Unreadable files. By default each worker decodes every file it packs (`decode_image`, the code
`read_image` uses) and leaves out those that fail: the packed split then has fewer samples than
the folder and its sample i is the i-th *readable* file (`PackedImageIndex.source` maps it back),
whereas `ImageFolderDataset` over the folder serves the next readable image in place of a bad
one. With ``verify=False`` (``--no-verify``) the bytes are packed unchecked, only files that
cannot be read at all are left out, and the dataset skips undecodable samples at read time.

Reading: ``ImageFolderDataset(open_packed_images(OUT, "train"), transform, seed=...)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import sys
import time
import warnings
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from linscale.data.images import (
    IMAGE_EXTENSIONS,
    SPLIT_NAMES,
    ImageFolderIndex,
    _to_rgb_array,
    check_same_classes,
    scan_image_folder,
)
from linscale.data.preprocess import (
    PLAN_FILE,
    SUMMARY_FILE,
    UNITS_DIR,
    PreprocessError,
    _write_json,
    work_through_units,
)
from linscale.data.shards import INDEX, RERUN, ShardError, atomic_write, file_crc32, fsync_dir

FORMAT = "linscale-image-shards"
VERSION = 1
KIND = "images"
DEFAULT_UNIT_MB = 256.0  # files per shard: 130 GB -> ~520 shards, several units per worker on a big job
BAD_FILE = "bad-images.jsonl"
TABLE_FILE = "samples.npy"
NAMES_FILE = "names.bin"
# One row per packed sample; little-endian, so the table reads the same on any machine.
TABLE_DTYPE = np.dtype(
    [
        ("shard", "<u4"),  # position in the split's shard list
        ("label", "<i4"),
        ("offset", "<u8"),  # of the file's bytes in the shard
        ("length", "<u8"),
        ("source", "<u8"),  # position in scan_image_folder(SRC, split)
        ("name_offset", "<u8"),  # of its path (relative to its class folder) in names.bin
        ("name_length", "<u4"),
    ]
)
# detect_kind looks at this many files in each of this many class folders.
SNIFF_FOLDERS = 32
SNIFF_FILES = 64
STAT_THREADS = 16  # stat calls in flight while planning (a cluster file system answers each slowly)
SHOW_BAD = 5  # unreadable files named in the summary; all are in OUT/bad-images.jsonl


# ---------------------------------------------------------------------------------------------
# Detection


def _subfolders(path: Path) -> list[str]:
    try:
        with os.scandir(path) as it:
            return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except OSError:
        return []


def _count_files(folder: Path, limit: int) -> tuple[int, int]:
    """(image files, other files) among the first `limit` non-hidden files under `folder`, breadth first."""
    images = others = 0
    queue = deque([folder])
    visited = 0
    while queue and images + others < limit and visited < 16:
        current = queue.popleft()
        visited += 1
        try:
            with os.scandir(current) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.is_dir():
                queue.append(Path(e.path))
            elif images + others < limit:
                if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                    images += 1
                else:
                    others += 1
    return images, others


def split_folders(source: str | os.PathLike) -> list[str] | None:
    """The split folder names when SOURCE is ``SOURCE/<split>/<class>/...`` (every non-hidden subfolder
    is a split name such as train, val or test), else None (``SOURCE/<class>/...``, one split)."""
    subs = _subfolders(Path(source))
    if subs and all(s.lower() in SPLIT_NAMES for s in subs):
        return subs
    return None


def detect_kind(source: str | os.PathLike) -> str:
    """ "images" when SOURCE is an image-folder tree, else "text".

    An image-folder tree is a directory of class folders (or of split folders of class folders)
    in which most files are images: a sample of up to 64 files in each of the first 32 class
    folders is looked at, and images must be at least half of it. A file, a directory without
    subfolders, or one whose subfolders hold mostly other files is a text corpus."""
    src = Path(source)
    if not src.is_dir():
        return "text"
    splits = split_folders(src)
    if splits is not None:
        folders = [src / s / c for s in splits for c in _subfolders(src / s)]
    else:
        folders = [src / c for c in _subfolders(src)]
    images = others = 0
    for folder in folders[:SNIFF_FOLDERS]:
        i, o = _count_files(folder, SNIFF_FILES)
        images += i
        others += o
    return KIND if images > 0 and images >= others else "text"


# ---------------------------------------------------------------------------------------------
# Decoding


class _NamedBytes(io.BytesIO):
    """In-memory file bytes whose repr is the sample's name, so Pillow's errors name the sample."""

    def __init__(self, data: bytes, name: str | Callable[[], str]) -> None:
        super().__init__(data)
        self._name = name

    def __repr__(self) -> str:
        return repr(self._name if isinstance(self._name, str) else self._name())


def decode_image(data: bytes, name: str | Callable[[], str] = "image") -> torch.Tensor:
    """Decode an image file's bytes to a (3, H, W) uint8 tensor, exactly as `images.read_image`
    decodes the file (same conversion of every Pillow mode to RGB). `name` (or a function giving
    it, called only for an error message) names the image in Pillow's errors."""
    with Image.open(_NamedBytes(data, name)) as im:
        rgb = _to_rgb_array(im)
    if not rgb.flags.writeable or not rgb.flags.c_contiguous:
        rgb = np.array(rgb, order="C")
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:300]


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass
class SplitPlan:
    name: str  # the split's name in the output (its folder name, or "train")
    folder: str  # the folder holding its class folders, relative to the source ("." for SOURCE/<class>)
    index: ImageFolderIndex
    sizes: np.ndarray  # (n,) int64 bytes per file at planning time
    mtimes: np.ndarray  # (n,) int64 ns


@dataclass(frozen=True)
class ImageUnit:
    id: int
    split: str
    start: int  # samples [start, end) of the split's folder index
    end: int
    nbytes: int  # of the files at planning time

    @property
    def shard(self) -> str:
        return f"{self.split}/u{self.id:06d}.bin"


@dataclass
class ImagePlan:
    source: Path  # the image folder, resolved
    classes: tuple[str, ...]
    splits: list[SplitPlan]
    units: list[ImageUnit]
    unit_bytes: int
    verify: bool
    notes: list[str] = field(default_factory=list)  # scanning warnings (empty class folders), said by rank 0

    @property
    def total_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    @property
    def images(self) -> int:
        return sum(len(s.index) for s in self.splits)

    def split(self, name: str) -> SplitPlan:
        return next(s for s in self.splits if s.name == name)

    def lpt_order(self) -> list[ImageUnit]:
        """Largest first (ties by id): the order workers take units in."""
        return sorted(self.units, key=lambda u: (-u.nbytes, u.id))

    def ignored(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for s in self.splits:
            for ext, n in s.index.ignored.items():
                total[ext] = total.get(ext, 0) + n
        return dict(sorted(total.items()))

    def fingerprint(self) -> str:
        """Identity of (files, sizes, times, cutting, checking): a rerun with the same one resumes."""
        h = hashlib.sha256()
        head = {
            "kind": KIND,
            "classes": list(self.classes),
            "splits": [(s.name, s.folder) for s in self.splits],
            "unit_bytes": self.unit_bytes,
            "verify": self.verify,
        }
        h.update(json.dumps(head, sort_keys=True).encode())
        for s in self.splits:
            for a in (s.index.names, s.index.offsets, s.index.labels, s.sizes, s.mtimes):
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def _stat_files(index: ImageFolderIndex) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, mtimes) of the index's files; a file gone since the scan counts 0 bytes (the worker
    packing it finds it unreadable)."""
    n = len(index)

    sizes = np.zeros(n, dtype=np.int64)
    mtimes = np.zeros(n, dtype=np.int64)

    def stat_range(ids: range) -> None:
        for i in ids:
            try:
                st = os.stat(index.path(i))
            except OSError:
                continue
            sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns

    chunks = [range(a, min(n, a + 1024)) for a in range(0, n, 1024)]
    if len(chunks) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(STAT_THREADS) as pool:
            list(pool.map(stat_range, chunks))
    else:
        for ids in chunks:
            stat_range(ids)
    return sizes, mtimes


def cut_units(sizes: np.ndarray, unit_bytes: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of at most `unit_bytes` of files each (a larger file alone)."""
    cum = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=cum[1:])
    ranges = []
    start, n = 0, len(sizes)
    while start < n:
        end = int(np.searchsorted(cum, cum[start] + unit_bytes, side="right")) - 1
        end = min(n, max(start + 1, end))
        ranges.append((start, end))
        start = end
    return ranges


def plan_images(source: str | os.PathLike, unit_bytes: int, verify: bool = True) -> ImagePlan:
    """Scan the image folder and cut each split into units (deterministic for a given tree)."""
    if unit_bytes < 1:
        raise PreprocessError(f"the unit size must be at least 1 byte, got {unit_bytes}; raise --unit-mb")
    src = Path(source)
    if not src.is_dir():
        raise PreprocessError(
            f"image folder {src} is not a directory; expected {src}/<class>/<images> or {src}/<split>/<class>/<images>"
        )
    src = src.resolve()
    names = split_folders(src)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if names is None:
            indexes = [("train", ".", scan_image_folder(src))]
        else:
            indexes = [(s, s, scan_image_folder(src, split=s)) for s in names]
    notes = list(dict.fromkeys(str(w.message) for w in caught))
    first = indexes[0][2]
    for _, _, other in indexes[1:]:
        check_same_classes(first, other)
    splits: list[SplitPlan] = []
    units: list[ImageUnit] = []
    for name, folder, index in indexes:
        sizes, mtimes = _stat_files(index)
        splits.append(SplitPlan(name, folder, index, sizes, mtimes))
        for a, b in cut_units(sizes, unit_bytes):
            units.append(ImageUnit(len(units), name, a, b, int(sizes[a:b].sum())))
    return ImagePlan(src, first.classes, splits, units, unit_bytes, verify, notes)


# ---------------------------------------------------------------------------------------------
# One unit


def marker_path(out: Path, unit: ImageUnit) -> Path:
    return out / UNITS_DIR / f"u{unit.id:06d}.json"


def done_marker(out: Path, unit: ImageUnit) -> dict | None:
    """The unit's marker if the unit is done: marker present and matching, shard of the marker's size."""
    try:
        marker = json.loads(marker_path(out, unit).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or [marker.get(k) for k in ("unit", "split", "start", "end")] != [
        unit.id,
        unit.split,
        unit.start,
        unit.end,
    ]:
        return None
    entry = marker.get("entry")
    if entry is not None:
        try:
            if (out / entry["file"]).stat().st_size != entry["bytes"]:
                return None
        except (OSError, KeyError, TypeError):
            return None
    return marker


def process_unit(plan: ImagePlan, unit: ImageUnit, out: Path) -> dict:
    """Pack one unit: its readable files' bytes back to back into its shard (written atomically),
    then its done-marker with the per-sample lengths and the files left out."""
    index = plan.split(unit.split).index
    path = out / unit.shard
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    lengths: list[int] = []
    bad: list[dict] = []
    crc = 0
    try:
        with open(tmp, "wb") as f:
            for i in range(unit.start, unit.end):
                rel = index.relpath(i)
                try:
                    with open(index.path(i), "rb") as src:
                        data = src.read()
                except OSError as e:
                    bad.append({"index": i, "path": rel, "error": f"unreadable: {e.strerror}"})
                    continue
                if plan.verify:
                    try:
                        decode_image(data, rel)
                    except Exception as e:  # any decoder failure makes the file unreadable
                        bad.append({"index": i, "path": rel, "error": _error_text(e)})
                        continue
                f.write(data)
                crc = zlib.crc32(data, crc)
                lengths.append(len(data))
            f.flush()
            os.fsync(f.fileno())
        if lengths:
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    nbytes = sum(lengths)
    entry = {"file": unit.shard, "bytes": nbytes, "samples": len(lengths), "crc32": crc} if lengths else None
    marker = {
        "unit": unit.id,
        "split": unit.split,
        "start": unit.start,
        "end": unit.end,
        "entry": entry,
        "lengths": lengths,
        "bad": bad,
        "stats": {"images": len(lengths), "bytes": nbytes, "bad": len(bad)},
    }
    atomic_write(marker_path(out, unit), json.dumps(marker, separators=(",", ":")).encode())
    return marker


# ---------------------------------------------------------------------------------------------
# Output directory: state, tables, index


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def out_state(out: Path, fingerprint: str) -> str:
    """ "fresh", "resume", "done" or "repair" (finished, but a file is missing or damaged);
    PreprocessError when OUT holds another preprocess."""
    if out.exists() and not out.is_dir():
        raise PreprocessError(f"--out {out} is a file; give a directory (it is created if missing)")
    if (out / INDEX).exists():
        index = _read_json(out / INDEX)
        if not isinstance(index, dict):
            raise PreprocessError(f"{out / INDEX} cannot be read; delete it and rerun, or pick another --out")
        if index.get("format") != FORMAT:
            raise PreprocessError(
                f"{out} already holds a finished preprocess of another kind ({index.get('format', '?')}, not packed "
                f"images); pick another --out or delete {out}"
            )
        source = index.get("source") or {}
        if source.get("fingerprint") != fingerprint:
            raise PreprocessError(
                f"{out} already holds packed images of a different folder or with other options (folder "
                f"{source.get('corpus', '?')}, or other --unit-mb/--no-verify, or files changed since); "
                f"pick another --out or delete {out}"
            )
        try:
            verify_packed(out)
        except ShardError:
            return "repair"
        return "done"
    plan_file = out / UNITS_DIR / PLAN_FILE
    if plan_file.exists():
        previous = _read_json(plan_file)
        previous = previous if isinstance(previous, dict) else {}
        if previous.get("fingerprint") != fingerprint:
            raise PreprocessError(
                f"{out} holds an unfinished preprocess of a different folder, corpus or options (source "
                f"{previous.get('corpus', '?')}, or other --unit-mb/--no-verify, or files changed since); "
                f"pick another --out or delete {out}"
            )
        return "resume"
    return "fresh"


def _file_entry(out: Path, rel: str, data: bytes) -> dict:
    atomic_write(out / rel, data)
    return {"file": rel, "bytes": len(data), "crc32": zlib.crc32(data)}


def build_split(plan: ImagePlan, split: SplitPlan, markers: list[dict], out: Path) -> tuple[dict, list[dict]]:
    """Write the split's sample table and names (rank 0, from the done-markers in unit order):
    (its index.json entry, its unreadable files)."""
    index = split.index
    n = len(index)
    keep = np.ones(n, dtype=bool)
    shard_of = np.zeros(n, dtype=np.int64)
    offset = np.zeros(n, dtype=np.int64)
    length = np.zeros(n, dtype=np.int64)
    shards: list[dict] = []
    bad: list[dict] = []
    for m in markers:
        start, end = m["start"], m["end"]
        for b in m["bad"]:
            keep[b["index"]] = False
            bad.append({"split": split.name, "path": str(Path(index.root) / b["path"]), "error": b["error"]})
        rows = np.flatnonzero(keep[start:end]) + start
        lengths = np.asarray(m["lengths"], dtype=np.int64)
        if len(rows) != len(lengths):
            raise PreprocessError(
                f"done-marker {m['unit']} of split {split.name!r} does not match its unit ({len(lengths)} samples "
                f"for {len(rows)} files); delete {out / UNITS_DIR} and rerun"
            )
        if m["entry"] is not None:
            shard_of[rows] = len(shards)
            length[rows] = lengths
            offset[rows] = np.cumsum(lengths) - lengths
            shards.append(m["entry"])
    rows = np.flatnonzero(keep)
    name_lengths = np.diff(index.offsets)
    names = index.names[np.repeat(keep, name_lengths)]
    table = np.zeros(len(rows), dtype=TABLE_DTYPE)
    table["shard"] = shard_of[rows]
    table["label"] = index.labels[rows]
    table["offset"] = offset[rows]
    table["length"] = length[rows]
    table["source"] = rows
    table["name_length"] = name_lengths[rows]
    table["name_offset"] = np.cumsum(table["name_length"], dtype=np.int64) - table["name_length"]
    buf = io.BytesIO()
    np.save(buf, table, allow_pickle=False)
    entry = {
        "folder": split.folder,
        "samples": int(len(rows)),
        "class_counts": np.bincount(table["label"], minlength=len(plan.classes)).tolist(),
        "scanned": n,
        "bad_images": len(bad),
        "shards": shards,
        "table": _file_entry(out, f"{split.name}/{TABLE_FILE}", buf.getvalue()),
        "names": _file_entry(out, f"{split.name}/{NAMES_FILE}", names.tobytes()),
    }
    return entry, bad


def build_index(plan: ImagePlan, markers: list[dict], out: Path, source: dict, seconds: float) -> tuple[dict, list]:
    """Write every split's table and OUT/bad-images.jsonl; return (index, unreadable files)."""
    by_split: dict[str, list[dict]] = {s.name: [] for s in plan.splits}
    for m in markers:  # in unit-id order, so in sample order within each split
        by_split[m["split"]].append(m)
    splits: dict[str, dict] = {}
    bad: list[dict] = []
    for s in plan.splits:
        splits[s.name], found = build_split(plan, s, by_split[s.name], out)
        bad += found
    if bad:
        atomic_write(out / BAD_FILE, "".join(json.dumps(b) + "\n" for b in bad).encode())
    else:
        (out / BAD_FILE).unlink(missing_ok=True)
    stats = {
        "images": sum(e["samples"] for e in splits.values()),
        "bytes": sum(sh["bytes"] for e in splits.values() for sh in e["shards"]),
        "input_bytes": plan.total_bytes,
        "scanned_images": plan.images,
        "bad_images": len(bad),
        "bad": [f"{b['path']}: {b['error']}" for b in bad[:100]],
        "bad_list": BAD_FILE if bad else None,
        "ignored_files": plan.ignored(),
        "verified": plan.verify,
        "units": len(plan.units),
        "shards": sum(len(e["shards"]) for e in splits.values()),
        "seconds": round(seconds, 3),
    }
    index = {
        "format": FORMAT,
        "version": VERSION,
        "kind": KIND,
        "classes": list(plan.classes),
        "splits": splits,
        "stats": stats,
        "source": source,
    }
    return index, bad


def _unfinished(out: Path) -> str:
    plan = _read_json(out / UNITS_DIR / PLAN_FILE)
    if isinstance(plan, dict) and plan.get("corpus"):
        return (
            f"{out} has no {INDEX}: the `linscale preprocess` of {plan['corpus']} writing there did not finish; "
            f"rerun `linscale preprocess {plan['corpus']} --out {out}`, which resumes it"
        )
    return (
        f"{out} has no {INDEX}: it is not a finished `linscale preprocess` output; "
        f"run `linscale preprocess IMAGE_FOLDER --out {out}` (a rerun resumes an interrupted one)"
    )


def read_image_index(out_dir: str | os.PathLike) -> dict:
    """The parsed, checked index.json of a packed image folder (ShardError naming the fix otherwise)."""
    out = Path(out_dir)
    path = out / INDEX
    if not path.is_file():
        raise ShardError(_unfinished(out))
    index = _read_json(path)
    if not isinstance(index, dict):
        raise ShardError(f"{path} cannot be read; delete it and {RERUN}")
    if index.get("format") != FORMAT:
        what = "token shards of a text corpus" if index.get("format") == "linscale-shards" else "not packed images"
        raise ShardError(
            f"{out} holds {what} (format {index.get('format')!r}, not {FORMAT!r}); give the output of "
            f"`linscale preprocess IMAGE_FOLDER --out DIR`, or an image folder itself"
        )
    if index.get("version") != VERSION:
        raise ShardError(
            f"{path} has version {index.get('version')!r}, this linscale reads version {VERSION}; {RERUN} "
            f"into a new directory"
        )
    splits = index.get("splits")
    if not isinstance(index.get("classes"), list) or not isinstance(splits, dict) or not splits:
        raise ShardError(f"{path} has no classes or no splits; delete it and {RERUN}")
    for name, entry in splits.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("shards"), list)
            and all(isinstance(e, dict) and isinstance(e.get("bytes"), int) for e in entry["shards"])
            and isinstance(entry.get("table"), dict)
            and isinstance(entry.get("names"), dict)
        ):
            raise ShardError(f"{path}: split {name!r} is not a valid entry; delete {path} and {RERUN}")
    return index


def is_packed_images(out_dir: str | os.PathLike) -> bool:
    """True when DIR is the output of `linscale preprocess` of an image folder, finished or not
    (`open_packed_images` then says how to finish an unfinished one)."""
    out = Path(out_dir)
    index = _read_json(out / INDEX) if (out / INDEX).is_file() else None
    if isinstance(index, dict):
        return index.get("format") == FORMAT
    plan = _read_json(out / UNITS_DIR / PLAN_FILE)
    return isinstance(plan, dict) and plan.get("kind") == KIND


def _check_file(out: Path, entry: dict, full: bool) -> None:
    path = out / entry["file"]
    try:
        size = path.stat().st_size
    except (FileNotFoundError, NotADirectoryError):
        raise ShardError(f"{path} is missing; {RERUN}, which redoes what is missing") from None
    if size != entry["bytes"]:
        raise ShardError(f"{path} is damaged ({size} bytes, the index says {entry['bytes']}); {RERUN}, which redoes it")
    if full and "crc32" in entry:
        crc = file_crc32(path)
        if crc != entry["crc32"]:
            raise ShardError(
                f"{path} is damaged (crc32 {crc} does not match the index's {entry['crc32']}); delete that file "
                f"and {RERUN}, which redoes it"
            )


def verify_packed(out_dir: str | os.PathLike, full: bool = False) -> None:
    """Check that every shard and table exists with its indexed size; `full=True` also checks crc32s."""
    out = Path(out_dir)
    index = read_image_index(out)
    for entry in index["splits"].values():
        for e in [*entry["shards"], entry["table"], entry["names"]]:
            _check_file(out, e, full)


# ---------------------------------------------------------------------------------------------
# Reading


class PackedImageIndex:
    """One split of a packed image folder, with the interface `ImageFolderDataset` uses from an
    `ImageFolderIndex`: `root`, `classes`, `labels`, `len()`, `read(i)`, `describe(i)`, `class_counts()`.

    Shards, the sample table and the names are memory-mapped on first use in each process;
    pickling keeps the labels and a few sizes, so DataLoader workers start fast and share the
    page cache. Sample i is the i-th readable file of the folder's split, in the folder's order
    (`source(i)` is its position in `scan_image_folder`).
    """

    def __init__(self, out_dir: str | os.PathLike, split: str = "train") -> None:
        self.out_dir = Path(out_dir)
        self.split = split
        index = read_image_index(self.out_dir)
        splits = index["splits"]
        if split not in splits:
            raise ShardError(
                f"{self.out_dir / INDEX} has no split {split!r} (it has: {', '.join(splits)}); use one of those, "
                f"or add {split!r} to the image folder and rerun `linscale preprocess`"
            )
        entry = splits[split]
        for e in [*entry["shards"], entry["table"], entry["names"]]:
            _check_file(self.out_dir, e, full=False)
        self.root = str(self.out_dir / split)
        self.classes: tuple[str, ...] = tuple(index["classes"])
        self.shards: list[str] = [e["file"] for e in entry["shards"]]
        self._table_file = entry["table"]["file"]
        self._names_file = entry["names"]["file"]
        # first[k] = the first sample of shard k; first[-1] = the sample count
        self._first = np.zeros(len(self.shards) + 1, dtype=np.int64)
        np.cumsum([e["samples"] for e in entry["shards"]], out=self._first[1:])
        self._pid = os.getpid()
        self._maps: dict[int, mmap.mmap] = {}
        self._table: np.ndarray | None = None
        self._names: np.ndarray | None = None
        table = self._get_table()
        if len(table) != entry["samples"] or len(table) != self._first[-1]:
            raise ShardError(
                f"{self.out_dir / self._table_file} holds {len(table)} samples, the index says {entry['samples']}; "
                f"delete {self.out_dir / INDEX} and {RERUN}"
            )
        self.labels = np.ascontiguousarray(table["label"], dtype=np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"PackedImageIndex({str(self.out_dir)!r}, split={self.split!r}, {len(self.classes)} classes, "
            f"{len(self)} images, {len(self.shards)} shards)"
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}
        state["_table"] = None
        state["_names"] = None
        return state

    def _fresh(self) -> None:
        """After a fork, this process's own maps (a parent's would be shared file positions and counts)."""
        if self._pid != os.getpid():
            self._maps, self._table, self._names = {}, None, None
            self._pid = os.getpid()

    def _get_table(self) -> np.ndarray:
        self._fresh()
        if self._table is None:
            try:
                self._table = np.load(self.out_dir / self._table_file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ShardError(f"{self.out_dir / self._table_file} cannot be read ({e}); {RERUN}") from None
            if self._table.dtype != TABLE_DTYPE:
                raise ShardError(f"{self.out_dir / self._table_file} is not a sample table; {RERUN}")
        return self._table

    def _get_names(self) -> np.ndarray:
        self._fresh()
        if self._names is None:
            path = self.out_dir / self._names_file
            self._names = np.fromfile(path, dtype=np.uint8) if path.stat().st_size == 0 else np.memmap(path, mode="r")
        return self._names

    def _map(self, k: int) -> mmap.mmap:
        self._fresh()
        m = self._maps.get(k)
        if m is None:
            with open(self.out_dir / self.shards[k], "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[k] = m
        return m

    def _check(self, i: int) -> int:
        i = int(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"image {i} out of range: split {self.split!r} of {self.out_dir} has {n} images")
        return i

    def source(self, i: int) -> int:
        """Sample i's position in `scan_image_folder` of the original split."""
        return int(self._get_table()[self._check(i)]["source"])

    def relpath(self, i: int) -> str:
        """Sample i's original path relative to its split folder (it starts with the class folder)."""
        row = self._get_table()[self._check(i)]
        a = int(row["name_offset"])
        name = os.fsdecode(self._get_names()[a : a + int(row["name_length"])].tobytes())
        return os.path.join(self.classes[int(row["label"])], name)

    def describe(self, i: int) -> str:
        """Where sample i is, for messages: its shard, its position there and its original file."""
        i = self._check(i)
        k = int(self._get_table()[i]["shard"])
        return f"{self.out_dir / self.shards[k]} sample {i - int(self._first[k])} ({self.relpath(i)})"

    def read_bytes(self, i: int) -> bytes:
        """Sample i's file bytes, as they were in the image folder."""
        row = self._get_table()[self._check(i)]
        a, n = int(row["offset"]), int(row["length"])
        data = self._map(int(row["shard"]))[a : a + n]
        if len(data) != n:
            raise ShardError(f"{self.out_dir / self.shards[int(row['shard'])]} is shorter than its index; {RERUN}")
        return data

    def read(self, i: int) -> torch.Tensor:
        """Sample i decoded: a (3, H, W) uint8 tensor, as `images.read_image` decodes the original file."""
        i = self._check(i)
        return decode_image(self.read_bytes(i), lambda: self.describe(i))

    def class_counts(self) -> np.ndarray:
        """Images per class, indexed by label id."""
        return np.bincount(self.labels, minlength=len(self.classes))


def open_packed_images(out_dir: str | os.PathLike, split: str = "train") -> PackedImageIndex:
    """One split of a `linscale preprocess` output of an image folder (ShardError naming the fix
    when it is unfinished, damaged or of another kind)."""
    return PackedImageIndex(out_dir, split)


def packed_splits(out_dir: str | os.PathLike) -> list[str]:
    """The split names of a packed image folder, in the order they were packed."""
    return list(read_image_index(out_dir)["splits"])


# ---------------------------------------------------------------------------------------------
# The job


@dataclass(frozen=True)
class ImageOptions:
    source: Path
    out: Path
    unit_mb: float = DEFAULT_UNIT_MB
    verify: bool = True
    timeout: float = 1800.0
    progress: bool = True
    schedule: str = "dynamic"  # as the text preprocessing: "dynamic" (shared counter, LPT) or "static"

    @property
    def unit_bytes(self) -> int:
        return max(1, int(self.unit_mb * 2**20))

    def plan(self) -> ImagePlan:
        return plan_images(self.source, self.unit_bytes, self.verify)


def check(opts: ImageOptions) -> tuple[ImagePlan, str, str]:
    """Everything checkable before workers start: (plan, fingerprint, state of OUT)."""
    if opts.unit_mb <= 0:
        raise PreprocessError(f"--unit-mb must be > 0, got {opts.unit_mb}")
    plan = opts.plan()
    out = opts.out.resolve()
    if out.is_relative_to(plan.source):
        raise PreprocessError(
            f"--out {opts.out} is inside the image folder {opts.source}; write the shards elsewhere "
            f"(inside, they would be scanned as a class)"
        )
    fingerprint = plan.fingerprint()
    return plan, fingerprint, out_state(opts.out, fingerprint)


def done_message(out: Path) -> str:
    s = read_image_index(out)["stats"]
    return (
        f"linscale: {out} is already done ({s.get('images', '?')} images in {s.get('shards', '?')} shards from "
        f"the same image folder); nothing to do. Delete {out / INDEX} to redo it."
    )


def run(opts: ImageOptions, plan: ImagePlan | None = None) -> None:
    """One worker's part of packing an image folder (also the whole job in a single process).
    `plan`: the launcher's, when it runs the job in its own process (saves a second scan)."""
    from linscale.data.preprocess import run_job

    run_job(lambda topo, t0: _run(opts, topo, t0, plan), opts.timeout)


def _describe_bad(bad: list[dict], out: Path) -> str:
    if not bad:
        return "0"
    names = ", ".join(b["path"] for b in bad[:SHOW_BAD])
    more = f" and {len(bad) - SHOW_BAD} more" if len(bad) > SHOW_BAD else ""
    return f"{len(bad)} left out ({names}{more}; all in {out / BAD_FILE})"


def _run(opts: ImageOptions, topo: Any, t0: float, plan: ImagePlan | None) -> None:
    from linscale.runtime import dist as ldist

    main = topo.is_main
    out = opts.out
    # Rank 0 scans the folder and plans; the others get the plan (one scan of the tree per run).
    fingerprint = state = None
    if main:
        plan = plan if plan is not None else opts.plan()
        fingerprint = plan.fingerprint()
        state = out_state(out, fingerprint)
    state = ldist.broadcast_object(state)
    if state == "done":
        if main:
            print(done_message(out), flush=True)
        return
    plan = ldist.broadcast_object(plan if main else None)
    assert plan is not None
    if main:
        if state == "repair":
            (out / INDEX).unlink()  # index.json only ever describes a complete output
        _write_json(
            out / UNITS_DIR / PLAN_FILE,
            {"fingerprint": fingerprint, "kind": KIND, "corpus": str(plan.source), "units": len(plan.units)},
        )
        # Before the barrier, while no worker is writing: temp files of units a killed run was writing go.
        if state != "fresh":
            for sub in [*(s.name for s in plan.splits), UNITS_DIR]:
                for tmp in (out / sub).glob(".*.tmp-*"):
                    tmp.unlink(missing_ok=True)
        already = sum(done_marker(out, u) is not None for u in plan.units) if state != "fresh" else 0
    ldist.barrier()  # rank 0 has written the plan file
    if not main and not (out / UNITS_DIR / PLAN_FILE).exists():
        raise PreprocessError(
            f"{out / UNITS_DIR / PLAN_FILE}, written by rank 0, is not visible on this node ({topo.node_rank}); "
            "--out must be on a file system every node sees"
        )
    order = plan.lpt_order()

    bar = None
    if main:
        split_text = ", ".join(f"{s.name} {len(s.index)}" for s in plan.splits)
        print(
            f"linscale: preprocess {plan.source} (image folder: {len(plan.classes)} classes; {split_text} images) | "
            f"{plan.total_bytes / 1e6:.2f} MB in {len(plan.units)} unit(s) | {topo.world_size} worker(s) | "
            f"{'decode-checking every image' if plan.verify else 'no decode check (--no-verify)'} | out {out}",
            flush=True,
        )
        for note in plan.notes:
            print(f"linscale: warning: {note}", flush=True)
        ignored = plan.ignored()
        if ignored:
            shown = ", ".join(f"{ext} x{n}" for ext, n in sorted(ignored.items(), key=lambda kv: (-kv[1], kv[0])))
            print(f"linscale: ignored {sum(ignored.values())} non-image file(s): {shown}", flush=True)
        if state != "fresh":
            print(f"linscale: resuming in {out}: {already} of {len(plan.units)} unit(s) already done", flush=True)
        if opts.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=plan.total_bytes, desc="preprocess", unit="B", unit_scale=True, dynamic_ncols=True)

    def process(unit: Any) -> dict[str, int]:
        stats = process_unit(plan, unit, out)["stats"]
        return {"bytes": stats["bytes"], "images": stats["images"]}

    work = work_through_units(
        plan.units,
        order,
        topo,
        opts.schedule,
        bar,
        plan.total_bytes,
        lambda unit: done_marker(out, unit) is not None,
        process,
        ("bytes", "images"),
    )
    if not main:
        return
    markers = []
    for unit in plan.units:
        marker = done_marker(out, unit)
        if marker is None:
            raise PreprocessError(
                f"unit {unit.id} (split {unit.split}, images {unit.start}..{unit.end}) has no shard after every "
                f"worker finished; is {out} on a file system every node sees? Rerun to finish it"
            )
        markers.append(marker)
    seconds = time.perf_counter() - t0
    source = {
        "corpus": str(plan.source),
        "fingerprint": fingerprint,
        "unit_bytes": plan.unit_bytes,
        "verify": plan.verify,
    }
    index, bad = build_index(plan, markers, out, source, seconds)
    atomic_write(out / INDEX, (json.dumps(index, indent=1) + "\n").encode())  # last
    s = index["stats"]
    summary = {
        "preprocess_runtime": seconds,
        "images": s["images"],
        "input_mb": s["input_bytes"] / 1e6,
        "packed_mb": s["bytes"] / 1e6,
        "images_per_second": work.counts["images"] / seconds,
        "mb_per_second": work.counts["bytes"] / 1e6 / seconds,
        "shards": s["shards"],
        "splits": ", ".join(f"{name} {e['samples']}" for name, e in index["splits"].items()),
        "classes": len(plan.classes),
        "bad_images": _describe_bad(bad, out),
        "verified": "every image decoded" if plan.verify else "no (--no-verify)",
        **work.summary(len(plan.units), opts.schedule),
        "output": str(out),
    }
    from linscale.train.metrics import format_summary

    _write_json(out / SUMMARY_FILE, summary)
    print(format_summary(summary, "preprocess metrics"), flush=True)
    sys.stdout.flush()
