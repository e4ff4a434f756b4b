"""`linscale preprocess`: a text corpus -> token shards, load-balanced over the job's workers, resumable.

The work is cut into *units*, planned identically on every rank from the corpus alone: a file,
or for a file larger than the unit size, byte ranges [a, b) of it. A range owns the lines (and
JSONL records) that *start* inside it, so no line or record is ever split. Each unit has a stable
id (its position in the plan, which is sorted by path and offset) and a split (train or val)
chosen from a hash of its path and offset.

Workers take units largest first (LPT) from a shared counter in the job's torch.distributed
store, so a skewed corpus still finishes in about total/workers. Each unit becomes one shard
`OUT/<split>/u<id>.bin` and, after it, a done-marker `OUT/.units/u<id>.json`; a rerun skips the
units whose marker and shard are intact. A unit's tokens depend only on the unit and the
tokenizer, so the output is the same whatever the number of workers. Rank 0 writes
`OUT/index.json` last, once every unit is done.

Documents: a JSONL line's "text" field, or a whole text file. Text files are encoded line by
line (each line with its newline), and their EOS follows the last line, so a file's tokens do
not depend on how it was cut into units: they are exactly the concatenation of its encoded
lines, then EOS.
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

JSONL_SUFFIXES = (".jsonl",)
SNIFF_BYTES = 64 * 1024  # planning checks this much of each file for binary / non-UTF-8 content
BATCH_BYTES = 1 << 20  # texts handed to the tokenizer at once
UNITS_DIR = ".units"
PLAN_FILE = "plan.json"
TICKET_KEY = "linscale/preprocess/ticket"
# Test hook: a worker exits (as if killed) after writing this many units in this run.
EXIT_AFTER_ENV = "LINSCALE_TEST_PREPROCESS_EXIT_AFTER"
SUMMARY_FILE = "preprocess_summary.json"  # the figures of the last run that finished, beside index.json
LOOKED_FOR = (
    'text files (one document each: .txt, .md, .py, any UTF-8 text) and JSONL files (.jsonl, a "text" field per line)'
)


class PreprocessError(ValueError):
    """Bad input to `linscale preprocess`; the message says what and how to fix it."""


@dataclass(frozen=True)
class CorpusFile:
    rel: str  # path relative to the corpus root, "/"-separated
    size: int
    mtime_ns: int
    kind: str  # "text" or "jsonl"


@dataclass(frozen=True)
class Unit:
    id: int
    rel: str
    kind: str
    start: int
    end: int
    file_size: int
    split: str

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def last(self) -> bool:
        """Holds the end of its file (a text file's EOS goes here)."""
        return self.end == self.file_size

    @property
    def shard(self) -> str:
        return f"{self.split}/u{self.id:06d}.bin"


@dataclass
class Plan:
    root: Path  # the directory the relative paths start from
    corpus: Path  # what the user named
    files: list[CorpusFile]
    units: list[Unit]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (rel, reason)
    unit_bytes: int = 0
    val_fraction: float = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    def lpt_order(self) -> list[Unit]:
        """Largest first (ties by id): the order workers take units in."""
        return sorted(self.units, key=lambda u: (-u.nbytes, u.id))

    def path(self, unit: Unit) -> Path:
        return self.root / unit.rel

    def fingerprint(self, tokenizer_spec: str) -> str:
        """Identity of (corpus, cutting, tokenizer): a rerun with the same one resumes, another is refused."""
        data = {
            "files": [(f.rel, f.size, f.mtime_ns, f.kind) for f in self.files],
            "unit_bytes": self.unit_bytes,
            "val_fraction": self.val_fraction,
            "tokenizer": tokenizer_spec,
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Planning


def sniff(path: Path, size: int) -> str | None:
    """Why a file is not usable text ("empty", "binary", "not UTF-8", "unreadable"), or None."""
    if size == 0:
        return "empty"
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        return f"unreadable: {e.strerror}"
    if b"\0" in head:
        return "binary"
    try:
        # A multi-byte character cut at the end of the head is not an error unless the head is the whole file.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) >= size)
    except UnicodeDecodeError:
        return "not UTF-8"
    return None


def _walk(corpus: Path, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> Iterator[tuple[str, Path]]:
    """(relative path, path) of every non-hidden file under `corpus`, sorted; `include`/`exclude` are
    glob patterns matched against the relative path (`*` also crosses directories: `*.py`, `test/*`)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(corpus):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                p = Path(dirpath) / name
                rel = p.relative_to(corpus).as_posix()
                if include and not any(fnmatch.fnmatchcase(rel, g) for g in include):
                    continue
                if any(fnmatch.fnmatchcase(rel, g) for g in exclude):
                    continue
                found.append((rel, p))
    yield from sorted(found)


def split_key(rel: str, start: int) -> float:
    """A number in [0, 1) from (path, offset), the same on every machine and run."""
    digest = hashlib.blake2b(f"{rel}\0{start}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def plan_corpus(
    corpus: Path, unit_bytes: int, val_fraction: float, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
) -> Plan:
    """Cut the corpus into units (deterministic: the same corpus gives the same plan everywhere)."""
    corpus = Path(corpus)
    if unit_bytes < 1:
        raise PreprocessError(f"the unit size must be at least 1 byte, got {unit_bytes}; raise --unit-mb")
    if not 0 <= val_fraction < 1:
        raise PreprocessError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not corpus.exists():
        raise PreprocessError(f"corpus {corpus} does not exist; give a text or JSONL file or a directory of them")
    if corpus.is_dir():
        root, listing = corpus, list(_walk(corpus, include, exclude))
    else:
        root, listing = corpus.parent, [(corpus.name, corpus)]
    files: list[CorpusFile] = []
    skipped: list[tuple[str, str]] = []
    for rel, p in listing:
        try:
            st = p.stat()
        except OSError as e:
            skipped.append((rel, f"unreadable: {e.strerror}"))
            continue
        if not p.is_file():
            continue
        reason = sniff(p, st.st_size)
        if reason:
            skipped.append((rel, reason))
            continue
        kind = "jsonl" if p.suffix.lower() in JSONL_SUFFIXES else "text"
        files.append(CorpusFile(rel, st.st_size, st.st_mtime_ns, kind))
    if not files:
        found = f"; the {len(skipped)} file(s) found were skipped ({_describe_skipped(skipped)})" if skipped else ""
        filters = "".join(
            f" {flag} {' '.join(globs)}" for flag, globs in (("--include", include), ("--exclude", exclude)) if globs
        )
        chosen = f" (with{filters}: check the patterns, matched against paths under the corpus)" if filters else ""
        raise PreprocessError(f"corpus {corpus} holds nothing usable{chosen}: looked for {LOOKED_FOR}{found}")

    units: list[Unit] = []
    keys: list[float] = []
    for f in files:
        starts = range(0, f.size, unit_bytes) if f.size > unit_bytes else [0]
        for a in starts:
            b = min(f.size, a + unit_bytes) if f.size > unit_bytes else f.size
            units.append(Unit(len(units), f.rel, f.kind, a, b, f.size, "train"))
            # A text file is one document: all its ranges share the file's split.
            keys.append(split_key(f.rel, a if f.kind == "jsonl" else 0))
    splits = ["val" if k < val_fraction else "train" for k in keys]
    distinct = sorted(set(keys))
    if val_fraction > 0 and len(units) >= 2 and len(distinct) >= 2:
        if "val" not in splits:  # the smallest key's units go to val
            splits = ["val" if k == distinct[0] else s for k, s in zip(keys, splits, strict=True)]
        if "train" not in splits:  # and the largest key's stay in train
            splits = ["train" if k == distinct[-1] else s for k, s in zip(keys, splits, strict=True)]
    units = [Unit(u.id, u.rel, u.kind, u.start, u.end, u.file_size, s) for u, s in zip(units, splits, strict=True)]
    return Plan(root, corpus, files, units, skipped, unit_bytes, val_fraction)


def _describe_skipped(skipped: list[tuple[str, str]], limit: int = 5) -> str:
    text = ", ".join(f"{rel}: {why}" for rel, why in skipped[:limit])
    return text + (f", and {len(skipped) - limit} more" if len(skipped) > limit else "")


# ---------------------------------------------------------------------------------------------
# Reading and encoding one unit


def owned_lines(path: Path, start: int, end: int) -> Iterator[bytes]:
    """The lines (with their b"\\n") that start inside [start, end) of the file."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the line running into the range belongs to the previous one
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                return
            yield line
            pos += len(line)


def _text_batches(path: Path, unit: Unit, stats: dict) -> Iterator[list[str]]:
    """Batches of the unit's texts: a text file's lines, or JSONL records' "text" fields.

    Counts skipped records (JSONL lines without a string "text", invalid JSON, undecodable lines)."""
    batch: list[str] = []
    size = 0
    for raw in owned_lines(path, unit.start, unit.end):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats["skipped"] += 1
            continue
        if unit.kind == "jsonl":
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                stats["skipped"] += 1
                continue
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                stats["skipped"] += 1
                continue
            stats["documents"] += 1
            line = text
        batch.append(line)
        size += len(raw)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_unit(root: Path, unit: Unit, tokenizer: Any, dtype: np.dtype) -> tuple[np.ndarray, dict]:
    """The unit's tokens (each JSONL document followed by EOS; a text file's EOS after its last
    line, in the unit holding the file's end) and its stats (bytes, documents, skipped)."""
    stats = {"bytes": unit.nbytes, "documents": 0, "skipped": 0}
    eos = tokenizer.eos_id
    parts: list[np.ndarray] = []
    for batch in _text_batches(root / unit.rel, unit, stats):
        if unit.kind == "text" and tokenizer.name == "bytes":  # the ids are the UTF-8 bytes
            parts.append(np.frombuffer("".join(batch).encode("utf-8"), dtype=np.uint8).astype(dtype))
            continue
        ids = tokenizer.encode_batch(batch)
        if unit.kind == "jsonl":
            flat = itertools.chain.from_iterable(itertools.chain(seq, (eos,)) for seq in ids)
        else:
            flat = itertools.chain.from_iterable(ids)
        parts.append(np.fromiter(flat, dtype=dtype))
    if unit.kind == "text" and unit.last:
        parts.append(np.array([eos], dtype=dtype))
        stats["documents"] = 1
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return tokens, stats


def sample_texts(plan: Plan, max_bytes: int) -> Iterator[str]:
    """The corpus's first `max_bytes` of text in plan order (for training a tokenizer)."""
    seen = 0
    for unit in plan.units:
        stats = {"bytes": 0, "documents": 0, "skipped": 0}
        for batch in _text_batches(plan.path(unit), unit, stats):
            for text in batch:
                yield text
                seen += len(text.encode("utf-8"))
                if seen >= max_bytes:
                    return


# ---------------------------------------------------------------------------------------------
# Output directory: done-markers, state, index


def _write_json(path: Path, data: dict) -> None:
    from linscale.data.shards import atomic_write

    atomic_write(path, json.dumps(data, indent=1).encode("utf-8"))


def marker_path(out: Path, unit: Unit) -> Path:
    return out / UNITS_DIR / f"u{unit.id:06d}.json"


def done_marker(out: Path, unit: Unit, itemsize: int) -> dict | None:
    """The unit's marker if the unit is done: marker present and matching, shard of the marker's size."""
    try:
        marker = json.loads(marker_path(out, unit).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or [marker.get(k) for k in ("unit", "file", "start", "end", "split")] != [
        unit.id,
        unit.rel,
        unit.start,
        unit.end,
        unit.split,
    ]:
        return None
    entry = marker.get("entry")
    if entry is not None:
        try:
            if (out / entry["file"]).stat().st_size != entry["tokens"] * itemsize:
                return None
        except (OSError, KeyError, TypeError):
            return None
    return marker


def process_unit(plan: Plan, unit: Unit, out: Path, tokenizer: Any, dtype: np.dtype) -> dict:
    """Encode one unit, write its shard (when it has tokens), then its done-marker."""
    from linscale.data.shards import write_shard

    tokens, stats = encode_unit(plan.root, unit, tokenizer, dtype)
    stats["tokens"] = int(tokens.size)
    entry = write_shard(out, unit.shard, tokens) if tokens.size else None
    marker = {
        "unit": unit.id,
        "file": unit.rel,
        "start": unit.start,
        "end": unit.end,
        "split": unit.split,
        "entry": entry,
        "stats": stats,
    }
    _write_json(marker_path(out, unit), marker)
    return marker


def tokenizer_spec(choice: str, vocab_size: int, sample_mb: float) -> str:
    """What identifies the tokenizer in the fingerprint."""
    if choice == "bytes":
        return "bytes"
    if choice == "bpe":
        return f"bpe vocab_size={vocab_size} sample_mb={sample_mb:g}"
    path = Path(choice)
    try:
        return "file sha256=" + hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise PreprocessError(
            f"--tokenizer {choice}: cannot read it ({e.strerror}); give bytes, bpe or the path of a tokenizer.json"
        ) from None


def out_state(out: Path, fingerprint: str) -> str:
    """ "fresh", "resume", "done" or "repair" (finished, but a shard is missing or damaged);
    PreprocessError when OUT holds the output of another corpus or tokenizer."""
    from linscale.data.shards import INDEX, ShardError, read_index, verify

    if out.exists() and not out.is_dir():
        raise PreprocessError(f"--out {out} is a file; give a directory (it is created if missing)")
    if (out / INDEX).exists():
        try:
            index = read_index(out)
        except ShardError as e:
            raise PreprocessError(f"{e}; or pick another --out") from None
        source = index.get("source") or {}
        if source.get("fingerprint") != fingerprint:
            raise PreprocessError(
                f"{out} already holds a finished preprocess of a different corpus, tokenizer or cutting "
                f"(corpus {source.get('corpus', '?')}, tokenizer {source.get('tokenizer', '?')}, or other "
                f"--unit-mb/--val-fraction); "
                f"pick another --out or delete {out}"
            )
        try:
            verify(out)
        except ShardError:
            return "repair"
        return "done"
    plan_file = out / UNITS_DIR / PLAN_FILE
    if plan_file.exists():
        try:
            previous = json.loads(plan_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = {}
        if previous.get("fingerprint") != fingerprint:
            raise PreprocessError(
                f"{out} holds an unfinished preprocess of a different corpus, tokenizer or cutting "
                f"(corpus {previous.get('corpus', '?')}, tokenizer {previous.get('tokenizer', '?')}, or other "
                f"--unit-mb/--val-fraction); "
                f"pick another --out or delete {out}"
            )
        return "resume"
    return "fresh"


def build_index(plan: Plan, markers: list[dict], tokenizer: Any, dtype: np.dtype, source: dict, seconds: float) -> dict:
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    totals = {"bytes": 0, "documents": 0, "tokens": 0, "skipped_records": 0}
    for m in markers:  # in unit-id order
        if m["entry"] is not None:
            splits[m["split"]].append(m["entry"])
        s = m["stats"]
        totals["bytes"] += s["bytes"]
        totals["documents"] += s["documents"]
        totals["tokens"] += s["tokens"]
        totals["skipped_records"] += s["skipped"]
    stats = {
        **totals,
        "train_tokens": sum(e["tokens"] for e in splits["train"]),
        "val_tokens": sum(e["tokens"] for e in splits["val"]),
        "files": len(plan.files),
        "skipped_files": len(plan.skipped),
        "skipped": [f"{rel}: {why}" for rel, why in plan.skipped[:100]],
        "units": len(plan.units),
        "shards": sum(len(v) for v in splits.values()),
        "seconds": round(seconds, 3),
    }
    return {
        "format": "linscale-shards",
        "version": 1,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer": "tokenizer.json",
        "splits": splits,
        "stats": stats,
        "source": source,
    }


# ---------------------------------------------------------------------------------------------
# The job


@dataclass(frozen=True)
class Options:
    corpus: Path
    out: Path
    tokenizer: str = "bytes"  # "bytes", "bpe" or the path of a tokenizer.json
    vocab_size: int = 4096
    val_fraction: float = 0.01
    unit_mb: float = 64.0
    sample_mb: float = 64.0
    timeout: float = 1800.0
    progress: bool = True
    include: tuple[str, ...] = ()  # glob patterns of relative paths to take (default: every file)
    # "dynamic": workers take the next unit, largest first, from the shared counter; "static": worker r
    # takes units r, r + W, r + 2W, ... of the plan, a fixed split kept for comparison (make bench).
    schedule: str = "dynamic"
    exclude: tuple[str, ...] = ()  # glob patterns of relative paths to leave out

    @property
    def unit_bytes(self) -> int:
        return max(1, int(self.unit_mb * 2**20))

    def plan(self) -> Plan:
        return plan_corpus(self.corpus, self.unit_bytes, self.val_fraction, self.include, self.exclude)


def check(opts: Options) -> tuple[Plan, str, str]:
    """Everything checkable before workers start: (plan, fingerprint, state of OUT)."""
    if opts.tokenizer == "bpe":
        from linscale.data.tokenizer import MIN_BPE_VOCAB

        if opts.vocab_size < MIN_BPE_VOCAB:
            raise PreprocessError(
                f"--vocab-size {opts.vocab_size} is too small for BPE (minimum {MIN_BPE_VOCAB}); "
                "raise it or use --tokenizer bytes"
            )
        if opts.sample_mb <= 0:
            raise PreprocessError(f"--sample-mb must be > 0, got {opts.sample_mb}")
    elif opts.tokenizer != "bytes" and not Path(opts.tokenizer).is_file():
        raise PreprocessError(
            f"--tokenizer {opts.tokenizer}: no such file; give bytes, bpe or the path of a tokenizer.json"
        )
    if opts.unit_mb <= 0:
        raise PreprocessError(f"--unit-mb must be > 0, got {opts.unit_mb}")
    plan = opts.plan()
    out, corpus = opts.out.resolve(), opts.corpus.resolve()
    if corpus.is_dir() and out.is_relative_to(corpus):
        raise PreprocessError(f"--out {opts.out} is inside the corpus {opts.corpus}; write the shards elsewhere")
    fingerprint = plan.fingerprint(tokenizer_spec(opts.tokenizer, opts.vocab_size, opts.sample_mb))
    return plan, fingerprint, out_state(opts.out, fingerprint)


def done_message(out: Path) -> str:
    from linscale.data.shards import read_index

    s = read_index(out)["stats"]
    return (
        f"linscale: {out} is already done ({s.get('tokens', '?')} tokens in {s.get('shards', '?')} shards from "
        f"the same corpus and tokenizer); nothing to do. Delete {out / 'index.json'} to redo it."
    )


class Tickets:
    """The next unit to take: a counter in the job's store, or a local one for a single process."""

    def __init__(self, local: bool = False) -> None:
        from linscale.runtime import dist as ldist

        self.store = None
        self.local = 0
        if ldist.active() and not local:
            from torch.distributed.distributed_c10d import _get_default_store

            self.store = _get_default_store()

    def take(self) -> int:
        if self.store is None:
            self.local += 1
            return self.local - 1
        return int(self.store.add(TICKET_KEY, 1)) - 1


def _resolve_tokenizer(opts: Options, plan: Plan, state: str) -> Any:
    """Rank 0: the tokenizer, saved as OUT/tokenizer.json."""
    from linscale.data.tokenizer import Tokenizer, byte_tokenizer, train_bpe

    path = opts.out / "tokenizer.json"
    if opts.tokenizer == "bytes":
        tok = byte_tokenizer()
    elif opts.tokenizer == "bpe":
        if state != "fresh" and path.exists():  # resuming: the units already done used this one
            return Tokenizer.load(path)
        print(
            f"linscale: training a BPE tokenizer (vocab {opts.vocab_size}) on the first {opts.sample_mb:g} MB",
            flush=True,
        )
        tok = train_bpe(sample_texts(plan, int(opts.sample_mb * 2**20)), opts.vocab_size)
    else:
        source = Path(opts.tokenizer)
        tok = Tokenizer.load(source)  # a ValueError naming the file when it is not a tokenizer
        if not (path.exists() and path.samefile(source)):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            shutil.copyfile(source, tmp)
            os.replace(tmp, path)
        return tok
    tok.save(path)
    return tok


@dataclass
class WorkDone:
    """What the job's workers did, summed over all of them (the same on every rank)."""

    counts: dict[str, int]  # the keys `process` returns, summed
    units: int  # units written in this run
    resumed: int  # units found done
    busy: float  # seconds spent writing units, all workers together
    seconds: float  # the makespan of the units
    workers: int

    def summary(self, planned: int, schedule: str) -> dict[str, Any]:
        """The summary block's entries about the work and its balance."""
        # Balance: the ideal makespan (all busy time spread evenly over the workers) / the measured one.
        balance = self.busy / self.workers / self.seconds if self.seconds > 0 and self.busy > 0 else float("nan")
        return {
            "units": f"{planned} ({self.units} done now, {self.resumed} resumed)",
            "workers": self.workers,
            "schedule": schedule + (" (largest first, shared counter)" if schedule == "dynamic" else ""),
            "units_seconds": self.seconds,
            "busy_seconds_all_workers": self.busy,
            "balance": balance,
        }


def work_through_units(
    units: list[Any],
    order: list[Any],
    topo: Any,
    schedule: str,
    bar: Any,
    total_bytes: int,
    is_done: Callable[[Any], bool],
    process: Callable[[Any], dict[str, int]],
    keys: tuple[str, ...],
) -> WorkDone:
    """Every worker's loop over the units: take the next ticket (`order`, largest first, from the
    shared counter; or, with schedule "static", units r, r + W, ... of `units`), skip units already
    done, `process` the others (it returns counts under `keys`), then wait for all and sum.
    `bar` (rank 0's progress bar over bytes, or None) follows the bytes taken by all workers."""
    from linscale.runtime import dist as ldist

    exit_after = int(os.environ.get(EXIT_AFTER_ENV, "0") or 0)
    done = dict.fromkeys(keys, 0)
    units_done = resumed = 0
    busy = 0.0
    if schedule == "static":
        order = units[topo.rank :: topo.world_size]
        tickets = Tickets(local=True)
        taken = list(itertools.accumulate(u.nbytes * topo.world_size for u in order))  # rank 0's share, scaled
    else:
        tickets = Tickets()
        taken = list(itertools.accumulate(u.nbytes for u in order))
    ldist.barrier()
    work_start = time.perf_counter()
    while (t := tickets.take()) < len(order):
        if bar is not None:
            bar.update(min(total_bytes, taken[t]) - bar.n)  # bytes taken by all workers so far
        unit = order[t]
        if is_done(unit):
            resumed += 1
            continue
        u0 = time.perf_counter()
        for key, value in process(unit).items():
            done[key] += value
        busy += time.perf_counter() - u0
        units_done += 1
        if exit_after and units_done >= exit_after:
            from linscale.runtime.dist import hard_exit

            print(
                f"linscale: test hook {EXIT_AFTER_ENV}: rank {topo.rank} exits after {units_done} unit(s)", flush=True
            )
            hard_exit(1)
    ldist.barrier()  # every ticket is taken and every unit written
    seconds = time.perf_counter() - work_start
    import torch

    totals = ldist.all_reduce(torch.tensor([*done.values(), units_done, resumed, busy], dtype=torch.float64)).tolist()
    if bar is not None:
        bar.update(total_bytes - bar.n)
        bar.close()
    counts = {k: int(v) for k, v in zip(keys, totals, strict=False)}
    n = len(keys)
    return WorkDone(counts, int(totals[n]), int(totals[n + 1]), totals[n + 2], seconds, topo.world_size)


def run(opts: Options) -> None:
    """One worker's part of `linscale preprocess` (also the whole job in a single process)."""
    run_job(lambda topo, t0: _run(opts, topo, t0), opts.timeout)


def run_job(body: Callable[[Any, float], None], timeout: float) -> None:
    """Join the job's process group (CPU, gloo), run `body(topology, start time)`, leave the group.

    Shared by the text and the image preprocessing (linscale.data.image_shards)."""
    from linscale.runtime import device as devmod
    from linscale.runtime import topology

    t0 = time.perf_counter()
    topo = topology.detect()
    # Before tokenizers is imported: its Rust thread pool gets this process's share of the cores.
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, devmod.cpu_cores() // max(1, topo.local_world_size))))
    device = devmod.resolve("cpu", topo.local_rank, 0, topo.local_world_size)
    from linscale.runtime import dist as ldist

    ldist.init(topo, device, timeout)
    try:
        body(topo, t0)
    finally:
        ldist.shutdown()


def _run(opts: Options, topo: Any, t0: float) -> None:

    from linscale.data.shards import INDEX, token_dtype, write_index
    from linscale.data.tokenizer import Tokenizer
    from linscale.runtime import dist as ldist

    main = topo.is_main
    out = opts.out
    plan = opts.plan()  # every rank, from the corpus alone
    spec = tokenizer_spec(opts.tokenizer, opts.vocab_size, opts.sample_mb)
    fingerprint = plan.fingerprint(spec)
    state = out_state(out, fingerprint) if main else None
    state = ldist.broadcast_object(state)
    if state == "done":
        if main:
            print(done_message(out), flush=True)
        return
    if main:
        if state == "repair":
            (out / INDEX).unlink()  # index.json only ever describes a complete output
        _write_json(
            out / UNITS_DIR / PLAN_FILE,
            {
                "fingerprint": fingerprint,
                "corpus": str(plan.corpus.resolve()),
                "tokenizer": spec,
                "units": len(plan.units),
            },
        )
        tokenizer = _resolve_tokenizer(opts, plan, state)
        # Before the barrier, while no worker is writing: temp files of units a killed run was
        # writing go, and the units already done are counted.
        if state != "fresh":
            for sub in ("train", "val", UNITS_DIR):
                for tmp in (out / sub).glob(".*.tmp-*"):
                    tmp.unlink(missing_ok=True)
        itemsize = token_dtype(tokenizer.vocab_size).itemsize
        already = sum(done_marker(out, u, itemsize) is not None for u in plan.units) if state != "fresh" else 0
    ldist.barrier()  # rank 0 has written tokenizer.json
    if not main:
        if not (out / "tokenizer.json").exists():
            raise PreprocessError(
                f"{out / 'tokenizer.json'}, written by rank 0, is not visible on this node ({topo.node_rank}); "
                "--out must be on a file system every node sees"
            )
        tokenizer = Tokenizer.load(out / "tokenizer.json")
    dtype = token_dtype(tokenizer.vocab_size)
    order = plan.lpt_order()

    bar = None
    if main:
        workers = topo.world_size
        print(
            f"linscale: preprocess {plan.corpus} | {len(plan.files)} file(s), {plan.total_bytes / 1e6:.2f} MB in "
            f"{len(plan.units)} unit(s) | {workers} worker(s) | tokenizer {tokenizer.name} "
            f"(vocab {tokenizer.vocab_size}, {dtype.name}) | out {out}",
            flush=True,
        )
        if dtype.itemsize > 2:
            print(f"linscale: vocabulary {tokenizer.vocab_size} > 65536: tokens are stored as uint32", flush=True)
        if plan.skipped:
            print(f"linscale: skipped {len(plan.skipped)} file(s): {_describe_skipped(plan.skipped)}", flush=True)
        if state != "fresh":
            print(f"linscale: resuming in {out}: {already} of {len(plan.units)} unit(s) already done", flush=True)
        if opts.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=plan.total_bytes, desc="preprocess", unit="B", unit_scale=True, dynamic_ncols=True)

    def process(unit: Unit) -> dict[str, int]:
        return {"bytes": unit.nbytes, "tokens": process_unit(plan, unit, out, tokenizer, dtype)["stats"]["tokens"]}

    work = work_through_units(
        plan.units,
        order,
        topo,
        opts.schedule,
        bar,
        plan.total_bytes,
        lambda unit: done_marker(out, unit, dtype.itemsize) is not None,
        process,
        ("bytes", "tokens"),
    )
    if not main:
        return
    markers = []
    for unit in plan.units:
        marker = done_marker(out, unit, dtype.itemsize)
        if marker is None:
            raise PreprocessError(
                f"unit {unit.id} ({unit.rel} bytes {unit.start}..{unit.end}) has no shard after every worker finished; "
                f"is {out} on a file system every node sees? Rerun to finish it"
            )
        markers.append(marker)
    seconds = time.perf_counter() - t0
    source = {"corpus": str(plan.corpus.resolve()), "tokenizer": spec, "fingerprint": fingerprint}
    index = build_index(plan, markers, tokenizer, dtype, source, seconds)
    write_index(out, index)
    s = index["stats"]
    summary = {
        "preprocess_runtime": seconds,
        "input_mb": s["bytes"] / 1e6,
        "mb_per_second": work.counts["bytes"] / 1e6 / seconds,
        "documents": s["documents"],
        "tokens": s["tokens"],
        "tokens_per_second": work.counts["tokens"] / seconds,
        "train_tokens": s["train_tokens"],
        "val_tokens": s["val_tokens"],
        "shards": s["shards"],
        "skipped_files": s["skipped_files"],
        "skipped_records": s["skipped_records"],
        **work.summary(len(plan.units), opts.schedule),
        "tokenizer": f"{tokenizer.name} (vocab {tokenizer.vocab_size})",
        "dtype": dtype.name,
        "output": str(out),
    }
    from linscale.train.metrics import format_summary

    _write_json(out / SUMMARY_FILE, summary)
    print(format_summary(summary, "preprocess metrics"), flush=True)
    sys.stdout.flush()
