"""linscale.data.preprocess without processes: planning, byte ranges, splits, skipping, one unit's tokens."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from linscale.data.preprocess import (
    PreprocessError,
    encode_unit,
    out_state,
    owned_lines,
    plan_corpus,
    process_unit,
)
from linscale.data.tokenizer import byte_tokenizer


def _lines_file(path: Path, seed: int = 0) -> bytes:
    """Lines of very different lengths: empty, one long one, non-ASCII, no final newline."""
    rng = random.Random(seed)
    lines = []
    for i in range(300):
        n = rng.choice([0, 1, 3, 10, 40, 200])
        lines.append(("é" * (n // 2) + "x" * (n - n // 2) + f" {i}\n").encode())
    lines.insert(17, b"L" * 5000 + b"\n")  # longer than several units
    data = b"".join(lines) + "last line without newline ü".encode()
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("unit_bytes", [1, 7, 64, 1000, 4096, 10**9])
def test_ranges_partition_the_file_exactly(tmp_path, unit_bytes):
    data = _lines_file(tmp_path / "a.txt")
    plan = plan_corpus(tmp_path, unit_bytes, 0.0)
    units = plan.units
    expected = max(1, -(-len(data) // unit_bytes))
    assert len(units) == expected
    assert [u.start for u in units] == sorted(u.start for u in units)
    assert units[0].start == 0 and units[-1].end == len(data)
    assert all(a.end == b.start for a, b in zip(units, units[1:], strict=False))
    pieces = [b"".join(owned_lines(tmp_path / "a.txt", u.start, u.end)) for u in units]
    assert b"".join(pieces) == data
    # Every piece is whole lines, the first of which starts inside the unit's range.
    pos = 0
    for u, piece in zip(units, pieces, strict=True):
        if piece:
            assert u.start <= pos < u.end
            assert pos == 0 or data[pos - 1 : pos] == b"\n"
        pos += len(piece)


def test_a_text_file_cut_in_ranges_gives_the_bytes_of_its_lines_then_one_eos(tmp_path):
    data = _lines_file(tmp_path / "a.txt", seed=3)
    tok = byte_tokenizer()
    plan = plan_corpus(tmp_path, 500, 0.0)
    assert len(plan.units) > 5
    parts, docs = [], 0
    for u in plan.units:
        tokens, stats = encode_unit(plan.root, u, tok, np.dtype(np.uint16))
        parts.append(tokens)
        docs += stats["documents"]
        assert stats["bytes"] == u.nbytes
    stream = np.concatenate(parts)
    assert docs == 1
    assert stream[-1] == tok.eos_id and (stream[:-1] != tok.eos_id).all()
    assert stream[:-1].astype(np.uint8).tobytes() == data


def test_same_corpus_same_plan_and_fingerprint(tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}.txt").write_text("hello\n" * (i * 100 + 1))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "r.jsonl").write_text('{"text": "x"}\n' * 500)
    one = plan_corpus(tmp_path, 1000, 0.1)
    two = plan_corpus(tmp_path, 1000, 0.1)
    assert one.units == two.units
    assert [u.id for u in one.units] == list(range(len(one.units)))
    assert [(u.rel, u.start) for u in one.units] == sorted((u.rel, u.start) for u in one.units)
    assert {u.kind for u in one.units} == {"text", "jsonl"}
    assert one.fingerprint("bytes") == two.fingerprint("bytes")
    assert one.fingerprint("bytes") != one.fingerprint("bpe vocab_size=4096 sample_mb=64")
    assert plan_corpus(tmp_path, 2000, 0.1).fingerprint("bytes") != one.fingerprint("bytes")
    (tmp_path / "f0.txt").write_text("changed\n")
    assert plan_corpus(tmp_path, 1000, 0.1).fingerprint("bytes") != one.fingerprint("bytes")


def test_lpt_order_is_largest_first(tmp_path):
    sizes = [5, 3000, 40, 3000, 700, 1]
    for i, n in enumerate(sizes):
        (tmp_path / f"f{i}.txt").write_text("a" * (n - 1) + "\n")
    plan = plan_corpus(tmp_path, 10**6, 0.0)
    order = plan.lpt_order()
    assert [u.nbytes for u in order] == sorted(sizes, reverse=True)
    assert [u.rel for u in order[:2]] == ["f1.txt", "f3.txt"]  # ties by id
    assert sorted(u.id for u in order) == list(range(len(sizes)))


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_lpt_makespan_is_near_the_lower_bound_with_skewed_sizes(tmp_path, workers):
    import heapq

    rng = random.Random(workers)
    for i in range(40):
        n = int(rng.paretovariate(1.2) * 300)  # a few large files, many small ones
        (tmp_path / f"f{i:02d}.txt").write_text("a" * n + "\n")
    big = sum(p.stat().st_size for p in tmp_path.iterdir())
    (tmp_path / "zz.txt").write_text("z" * big + "\n")  # last in the plan: taken last in id order
    plan = plan_corpus(tmp_path, 10**6, 0.0)
    # Equal workers; the next free one takes the next ticket, as with the store's counter.
    free = [0] * workers
    for u in plan.lpt_order():
        heapq.heappush(free, heapq.heappop(free) + u.nbytes)
    bound = max(plan.total_bytes / workers, max(u.nbytes for u in plan.units))
    assert max(free) <= (4 / 3 - 1 / (3 * workers)) * bound  # Graham's bound for LPT


def test_val_split_is_deterministic_and_not_empty(tmp_path):
    for i in range(20):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i}\n")
    (tmp_path / "big.txt").write_text("line\n" * 2000)  # 10 kB: several ranges of one document
    (tmp_path / "r.jsonl").write_text('{"text": "record"}\n' * 2000)
    plans = [plan_corpus(tmp_path, 1000, 0.001) for _ in range(2)]
    assert plans[0].units == plans[1].units
    splits = [u.split for u in plans[0].units]
    assert "val" in splits and "train" in splits  # 0.1% of ~40 units would give none
    # A text file is one document: all of its ranges are in the same split.
    big = {u.split for u in plans[0].units if u.rel == "big.txt"}
    assert len([u for u in plans[0].units if u.rel == "big.txt"]) == 10 and len(big) == 1
    # A larger fraction holds out about that share; 0 holds out nothing.
    half = [u.split for u in plan_corpus(tmp_path, 1000, 0.5).units]
    assert 0.2 < half.count("val") / len(half) < 0.8
    assert {u.split for u in plan_corpus(tmp_path, 1000, 0.0).units} == {"train"}


def test_binary_non_utf8_and_empty_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "good.txt").write_text("héllo\n")
    (tmp_path / "good.md").write_text("# title\n")
    (tmp_path / "r.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / ".hidden.txt").write_text("not looked at\n")
    plan = plan_corpus(tmp_path, 1000, 0.0)
    assert [f.rel for f in plan.files] == ["good.md", "good.txt", "r.jsonl"]
    assert dict(plan.skipped) == {"empty.txt": "empty", "image.png": "binary", "latin1.txt": "not UTF-8"}


def test_jsonl_records_without_text_are_skipped_and_counted(tmp_path):
    lines = ['{"text": "one"}', '{"id": 2}', "not json", '{"text": 3}', "", '{"text": "two ü"}', '["text"]']
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    plan = plan_corpus(tmp_path, 1000, 0.0)
    tok = byte_tokenizer()
    tokens, stats = encode_unit(plan.root, plan.units[0], tok, np.dtype(np.uint16))
    assert stats["documents"] == 2 and stats["skipped"] == 4
    assert tok.decode(tokens) == "one<|endoftext|>two ü<|endoftext|>"


@pytest.mark.parametrize("what", ["missing", "empty dir", "only binary"])
def test_empty_or_missing_corpus_is_an_error_naming_it(tmp_path, what):
    corpus = tmp_path / "corpus"
    if what != "missing":
        corpus.mkdir()
    if what == "only binary":
        (corpus / "a.bin").write_bytes(b"\0" * 10)
    with pytest.raises(PreprocessError) as err:
        plan_corpus(corpus, 1000, 0.01)
    msg = str(err.value)
    assert str(corpus) in msg
    if what == "missing":
        assert "does not exist" in msg
    else:
        assert "nothing usable" in msg and ".jsonl" in msg and "text files" in msg
    if what == "only binary":
        assert "a.bin: binary" in msg


def test_out_state_fresh_resume_done_and_refusal(tmp_path):
    from linscale.data.preprocess import PLAN_FILE, UNITS_DIR, _write_json, build_index, done_marker
    from linscale.data.shards import write_index

    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text("abc\n" * 100)
    out = tmp_path / "out"
    plan = plan_corpus(corpus, 100, 0.0)
    fp = plan.fingerprint("bytes")
    assert out_state(out, fp) == "fresh"
    _write_json(out / UNITS_DIR / PLAN_FILE, {"fingerprint": fp})
    assert out_state(out, fp) == "resume"
    with pytest.raises(PreprocessError, match="unfinished preprocess of a different"):
        out_state(out, "other")
    tok = byte_tokenizer()
    markers = [process_unit(plan, u, out, tok, np.dtype(np.uint16)) for u in plan.units]
    assert all(done_marker(out, u, 2) == m for u, m in zip(plan.units, markers, strict=True))
    write_index(out, build_index(plan, markers, tok, np.dtype(np.uint16), {"fingerprint": fp}, 1.0))
    assert out_state(out, fp) == "done"
    with pytest.raises(PreprocessError, match="pick another --out or delete"):
        out_state(out, "other")
    # A damaged shard: the marker no longer counts and a rerun repairs.
    shard = out / plan.units[1].shard
    shard.write_bytes(shard.read_bytes()[:-2])
    assert done_marker(out, plan.units[1], 2) is None
    assert out_state(out, fp) == "repair"
    json.loads((out / "index.json").read_text())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"val_fraction": 1.0}, "--val-fraction must be in [0, 1)"),
        ({"unit_mb": 0.0}, "--unit-mb must be > 0"),
        ({"tokenizer": "bpe", "vocab_size": 100}, "--vocab-size 100 is too small for BPE"),
        ({"tokenizer": "nope.json"}, "--tokenizer nope.json: no such file"),
        ({"out": "INSIDE"}, "is inside the corpus"),
    ],
)
def test_options_are_checked_before_the_job(tmp_path, change, message):
    from linscale.data.preprocess import Options, check

    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text("text\n")
    if change.get("out") == "INSIDE":
        change = {"out": corpus / "shards"}
    opts = Options(**{"corpus": corpus, "out": tmp_path / "out", **change})
    with pytest.raises(PreprocessError) as err:
        check(opts)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists() and not (corpus / "shards").exists()
    assert check(Options(corpus=corpus, out=tmp_path / "out"))[2] == "fresh"


def test_include_and_exclude_globs_choose_the_files(tmp_path):
    for rel in ("a.py", "pkg/b.py", "pkg/notes.txt", "site-packages/c.py", "pkg/test/d.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"text of {rel}\n")
    everything = {f.rel for f in plan_corpus(tmp_path, 1000, 0.0).files}
    assert everything == {"a.py", "pkg/b.py", "pkg/notes.txt", "site-packages/c.py", "pkg/test/d.py"}
    py = plan_corpus(tmp_path, 1000, 0.0, include=("*.py",), exclude=("site-packages/*", "*/test/*"))
    assert {f.rel for f in py.files} == {"a.py", "pkg/b.py"}
    with pytest.raises(PreprocessError, match="nothing usable"):
        plan_corpus(tmp_path, 1000, 0.0, include=("*.rs",))
