"""`linscale preprocess` end to end: the real CLI in subprocesses, 1 and 3 workers, kill and resume."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from linscale.data.preprocess import EXIT_AFTER_ENV, SUMMARY_FILE

from .conftest import files_of, index_without_timing
from linscale.data.tokenizer import EOS, Tokenizer, train_bpe

pytestmark = pytest.mark.dist

TIMEOUT = 180
QUIET = ["--no-progress"]


def make_corpus(root: Path) -> Path:
    """About 300 kB: skewed text files, a file cut into many ranges, JSONL, a binary and a latin-1 file."""
    rng = random.Random(0)
    corpus = root / "corpus"
    (corpus / "sub").mkdir(parents=True)
    words = ["alpha", "beta", "gamma", "δέλτα", "数据", "train", "\t", "def f(x):", "return"]
    for i in range(12):
        n = rng.choice([1, 5, 20, 200, 800])
        text = "".join(" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) + "\n" for _ in range(n))
        (corpus / f"doc{i:02d}.txt").write_text(text)
    big = "".join(
        f"line {j}: " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 20))) + "\n" for j in range(4000)
    )
    (corpus / "sub" / "big.md").write_text(big)
    with open(corpus / "sub" / "records.jsonl", "w") as f:
        for i in range(1500):
            f.write(json.dumps({"text": f"record {i} " + rng.choice(words)} if i % 7 else {"id": i}) + "\n")
    (corpus / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (corpus / "latin1.txt").write_bytes("déjà vu".encode("latin-1"))
    return corpus


def split_stream(out: Path, split: str) -> np.ndarray:
    index = json.loads((out / "index.json").read_text())
    dtype = np.dtype(index["dtype"])
    parts = [np.fromfile(out / e["file"], dtype=dtype) for e in index["splits"][split]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def documents(out: Path) -> list[str]:
    """Every document of both splits, decoded, as the shards hold them."""
    tok = Tokenizer.load(out / "tokenizer.json")
    docs = []
    for split in ("train", "val"):
        stream = split_stream(out, split)
        ends = np.flatnonzero(stream == tok.eos_id)
        assert len(stream) == 0 or ends[-1] == len(stream) - 1, "a split does not end with EOS"
        starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else []
        docs += [tok.decode(stream[a:b]) for a, b in zip(starts, ends, strict=True)]
    return docs


def unit_tokens(out: Path, rel: str) -> np.ndarray:
    """The tokens of one corpus file, gathered from its units' shards in file order."""
    index = json.loads((out / "index.json").read_text())
    markers = [json.loads(p.read_text()) for p in sorted((out / ".units").glob("u*.json"))]
    mine = sorted((m for m in markers if m["file"] == rel and m["entry"]), key=lambda m: m["start"])
    return np.concatenate([np.fromfile(out / m["entry"]["file"], dtype=np.dtype(index["dtype"])) for m in mine])


def test_one_and_three_workers_write_identical_shards(linscale, tmp_path):
    corpus = make_corpus(tmp_path)
    common = ["preprocess", str(corpus), "--unit-mb=0.02", "--val-fraction=0.1", *QUIET]
    one = linscale(*common, "--out", str(tmp_path / "one"), "--nproc-per-node=1", timeout=TIMEOUT)
    assert one.returncode == 0, one.output
    three = linscale(*common, "--out", str(tmp_path / "three"), "--nproc-per-node=3", timeout=TIMEOUT)
    assert three.returncode == 0, three.output

    a, b = files_of(tmp_path / "one"), files_of(tmp_path / "three")
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []
    assert index_without_timing(tmp_path / "one") == index_without_timing(tmp_path / "three")

    index = index_without_timing(tmp_path / "one")
    stats = index["stats"]
    assert stats["units"] > 10 and index["splits"]["val"] and index["splits"]["train"]
    assert stats["skipped_files"] == 2 and stats["skipped_records"] == 1500 // 7 + 1
    assert stats["documents"] == 12 + 1 + 1500 - (1500 // 7 + 1)
    assert "***** preprocess metrics *****" in three.stdout and re.search(r"workers\s+= 3", three.stdout)
    assert "blob.bin: binary" in three.stdout and "latin1.txt: not UTF-8" in three.stdout
    # The byte tokenizer's stream of a file cut in ranges is the file's bytes, then one EOS.
    big = (corpus / "sub" / "big.md").read_bytes()
    tokens = unit_tokens(tmp_path / "one", "sub/big.md")
    assert len({m for m in a if m.startswith(".units/u")}) == stats["units"]
    assert tokens[-1] == 256 and tokens[:-1].astype(np.uint8).tobytes() == big
    # Every document comes out whole.
    expected = [p.read_text() for p in sorted(corpus.rglob("doc*.txt"))] + [big.decode()]
    got = documents(tmp_path / "one")
    assert all(doc in got for doc in expected)


def test_static_split_writes_what_the_queue_writes_and_both_report_their_balance(linscale, tmp_path):
    corpus = make_corpus(tmp_path)
    common = ["preprocess", str(corpus), "--unit-mb=0.02", "--val-fraction=0.1", "--nproc-per-node=2", *QUIET]
    summaries = {}
    for schedule in ("dynamic", "static"):
        run = linscale(*common, "--out", str(tmp_path / schedule), f"--schedule={schedule}", timeout=TIMEOUT)
        assert run.returncode == 0, run.output
        summaries[schedule] = json.loads((tmp_path / schedule / SUMMARY_FILE).read_text())
    a, b = files_of(tmp_path / "dynamic"), files_of(tmp_path / "static")
    assert sorted(a) == sorted(b) and [name for name in a if a[name] != b[name]] == []
    for schedule, s in summaries.items():
        assert s["schedule"].startswith(schedule) and s["workers"] == 2
        # The units' busy time spread over 2 workers cannot exceed the time the units took.
        assert 0 < s["busy_seconds_all_workers"] / 2 <= s["units_seconds"] * 1.001, s
        assert 0 < s["balance"] <= 1.001


def test_killed_run_leaves_no_index_and_the_rerun_resumes(linscale, tmp_path):
    corpus = make_corpus(tmp_path)
    common = ["preprocess", str(corpus), "--unit-mb=0.02", *QUIET]
    clean = linscale(*common, "--out", str(tmp_path / "clean"), "--nproc-per-node=1", timeout=TIMEOUT)
    assert clean.returncode == 0, clean.output

    out = tmp_path / "out"
    killed = linscale(*common, "--out", str(out), "--nproc-per-node=2", env={EXIT_AFTER_ENV: "2"}, timeout=TIMEOUT)
    assert killed.returncode != 0, killed.output
    assert "exits after 2 unit(s)" in killed.output
    assert not (out / "index.json").exists()
    done_before = len(list((out / ".units").glob("u*.json")))
    assert 2 <= done_before < index_without_timing(tmp_path / "clean")["stats"]["units"]

    rerun = linscale(*common, "--out", str(out), "--nproc-per-node=2", timeout=TIMEOUT)
    assert rerun.returncode == 0, rerun.output
    match = re.search(r"resuming in .*: (\d+) of (\d+) unit\(s\) already done", rerun.stdout)
    assert match and int(match.group(1)) == done_before, rerun.output
    assert re.search(rf", {done_before} resumed\)", rerun.stdout), rerun.stdout
    assert files_of(out) == files_of(tmp_path / "clean")
    assert index_without_timing(out) == index_without_timing(tmp_path / "clean")

    # A lost shard: the rerun redoes that unit alone and writes the index again.
    lost = json.loads((out / "index.json").read_text())["splits"]["train"][3]["file"]
    (out / lost).unlink()
    repair = linscale(*common, "--out", str(out), "--nproc-per-node=2", timeout=TIMEOUT)
    assert repair.returncode == 0, repair.output
    units = index_without_timing(out)["stats"]["units"]
    assert f": {units - 1} of {units} unit(s) already done" in repair.stdout, repair.output
    assert files_of(out) == files_of(tmp_path / "clean")
    assert index_without_timing(out) == index_without_timing(tmp_path / "clean")

    # Finished: a rerun only says so; another tokenizer is refused.
    again = linscale(*common, "--out", str(out), "--nproc-per-node=2", timeout=TIMEOUT)
    assert again.returncode == 0 and "already done" in again.stdout, again.output
    other = linscale(*common, "--out", str(out), "--tokenizer=bpe", timeout=TIMEOUT)
    assert other.returncode == 2 and "different corpus" in other.stderr and "another --out" in other.stderr


def test_chinese_corpus_round_trips_through_bpe(linscale, tmp_path):
    rng = random.Random(1)
    chars = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面"
    corpus = tmp_path / "zh"
    corpus.mkdir()
    texts = []
    for i in range(40):
        paragraphs = ["".join(rng.choice(chars) for _ in range(rng.randint(20, 300))) + "。" for _ in range(3)]
        texts.append("\n".join(paragraphs) + ("\n" if i % 2 else ""))
        (corpus / f"{i:02d}.txt").write_text(texts[-1])
    out = tmp_path / "out"
    args = ["preprocess", str(corpus), "--out", str(out), "--tokenizer=bpe", "--vocab-size=500", "--unit-mb=0.004"]
    run = linscale(*args, "--nproc-per-node=2", *QUIET, timeout=TIMEOUT)
    assert run.returncode == 0, run.output
    index = json.loads((out / "index.json").read_text())
    assert index["vocab_size"] > 300 and index["dtype"] == "uint16"
    assert index["stats"]["tokens"] < 0.6 * index["stats"]["bytes"], "BPE did not merge anything"
    assert sorted(documents(out)) == sorted(texts)


def test_jsonl_corpus(linscale, tmp_path):
    corpus = tmp_path / "data.jsonl"
    texts = [f"record {i}: " + "ü" * (i % 13) + "\n" * (i % 3) + ("x" * 900 if i % 50 == 0 else "") for i in range(600)]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    lines[10:10] = ['{"id": "no text"}', "{broken json", '{"text": null}']
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    run = linscale("preprocess", str(corpus), "--out", str(out), "--unit-mb=0.01", "--nproc-per-node=2", *QUIET)
    assert run.returncode == 0, run.output
    stats = json.loads((out / "index.json").read_text())["stats"]
    assert stats["units"] > 3 and stats["documents"] == 600 and stats["skipped_records"] == 3
    assert sorted(documents(out)) == sorted(texts)


def test_large_file_in_ranges_equals_its_lines_encoded_in_order(linscale, tmp_path):
    rng = random.Random(2)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = ["the", "quick", "brown", "fox", "jumps", "über", "数据", "  ", "\t", "lazy", "dog."]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 30))) + "\n" for _ in range(3000)]
    lines[100] = "y" * 30000 + "\n"  # one line longer than a unit: the units it covers own nothing
    text = "".join(lines) + "no newline at the end"
    (corpus / "big.txt").write_text(text)
    tok = train_bpe(lines[:500], 400)
    tok.save(tmp_path / "tok.json")
    tok = Tokenizer.load(tmp_path / "tok.json")
    common = ["preprocess", str(corpus), "--tokenizer", str(tmp_path / "tok.json"), "--val-fraction=0", *QUIET]
    cut = linscale(*common, "--out", str(tmp_path / "cut"), "--unit-mb=0.005", "--nproc-per-node=2", timeout=TIMEOUT)
    assert cut.returncode == 0, cut.output
    whole = linscale(*common, "--out", str(tmp_path / "whole"), "--nproc-per-node=1", timeout=TIMEOUT)
    assert whole.returncode == 0, whole.output
    assert json.loads((tmp_path / "cut" / "index.json").read_text())["stats"]["units"] > 10
    assert (tmp_path / "cut" / "tokenizer.json").read_bytes() == (tmp_path / "tok.json").read_bytes()

    expected = [t for line in text.splitlines(keepends=True) for t in tok.encode(line)] + [tok.eos_id]
    got = unit_tokens(tmp_path / "cut", "big.txt")
    assert got.tolist() == expected
    assert unit_tokens(tmp_path / "whole", "big.txt").tolist() == expected
    assert tok.decode(got[:-1]) == text and EOS not in tok.decode(got[:-1])


def test_two_nodes_write_what_one_worker_writes(linscale, linscale_bg, tmp_path):
    from .test_multinode import free_port_pair

    corpus = make_corpus(tmp_path)
    common = ["preprocess", str(corpus), "--unit-mb=0.05", *QUIET]
    one = linscale(*common, "--out", str(tmp_path / "one"), "--nproc-per-node=1", timeout=TIMEOUT)
    assert one.returncode == 0, one.output
    port = free_port_pair()
    multi = ["--nnodes=2", "--nproc-per-node=1", f"--master-port={port}", "--out", str(tmp_path / "two")]
    nodes = [linscale_bg(*common, *multi, f"--node-rank={r}", timeout=TIMEOUT) for r in (0, 1)]
    results = [n.finish() for n in nodes]
    for r in results:
        assert r.returncode == 0, r.output
    assert re.search(r"workers\s+= 2", results[0].stdout), results[0].output
    assert files_of(tmp_path / "two") == files_of(tmp_path / "one")
    assert index_without_timing(tmp_path / "two") == index_without_timing(tmp_path / "one")


def test_bad_input_is_reported_before_any_worker_starts(linscale, tmp_path):
    missing = linscale("preprocess", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr, missing.output
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.bin").write_bytes(b"\0\1")
    nothing = linscale("preprocess", str(empty), "--out", str(tmp_path / "out"))
    assert nothing.returncode == 2 and f"corpus {empty} holds nothing usable" in nothing.stderr, nothing.output
    (empty / "a.txt").write_text("text\n")
    no_tok = linscale("preprocess", str(empty), "--out", str(tmp_path / "out"), "--tokenizer", "missing.json")
    assert no_tok.returncode == 2 and "--tokenizer missing.json: no such file" in no_tok.stderr, no_tok.output
    assert not (tmp_path / "out").exists()


def test_a_vocabulary_above_uint16_is_stored_as_uint32_and_said_once(linscale, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    # A byte-level BPE whose vocabulary (70,000 tokens, no merges) does not fit uint16: ids of
    # the byte alphabet come after 69,743 filler tokens, so every id in the shards is above 65535.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {f"<filler{i}>": i for i in range(70_000 - len(alphabet))}
    vocab.update({ch: len(vocab) + i for i, ch in enumerate(sorted(alphabet))})
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOS])
    path = tmp_path / "wide.json"
    hf.save(str(path))

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = ["wide vocabulary ü 数据\n", "second document\nwith two lines\n"]
    for i, text in enumerate(texts):
        (corpus / f"d{i}.txt").write_text(text)
    out = tmp_path / "out"
    run = linscale("preprocess", str(corpus), "--out", str(out), f"--tokenizer={path}", "--val-fraction=0",
                   "--nproc-per-node=2", *QUIET, timeout=TIMEOUT)  # fmt: skip
    assert run.returncode == 0, run.output
    assert run.stdout.count("are stored as uint32") == 1, run.stdout
    index = json.loads((out / "index.json").read_text())
    assert index["dtype"] == "uint32" and index["vocab_size"] > 65536
    stream = split_stream(out, "train")
    assert stream.dtype == np.uint32 and stream.max() > 65535
    assert sorted(documents(out)) == sorted(texts)
