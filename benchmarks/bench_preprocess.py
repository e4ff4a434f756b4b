"""Preprocessing throughput and load balance, and the data path's share of a training step.

1. Throughput: `linscale preprocess` of the Python standard library's source (.py files, tests and
   site-packages left out) with a BPE tokenizer trained once beforehand, with 1 and with 2 workers.
   The figure is MB/s over the units phase (process start-up and tokenizer loading excluded).
2. Load balance on a skewed corpus: a few files much larger than the rest. Dynamic scheduling
   (byte-range units, largest first from the shared counter) against a static round-robin split
   of whole files, side by side. Each run reports its makespan (the units phase) and the ideal,
   the busy time of all workers divided by their number; balance = ideal / makespan.
3. Training on the shards: `linscale train gpt --task.data=...` with 2 processes; steady tokens/s
   and the share of the step spent waiting for data.
4. Packing an image folder (`--image-files` small JPEGs in 10 classes, 0 to skip) into image shards
   with 1 and 2 workers, every image decode-checked: images/s over the units phase.

Runs alternate and each figure is the median over repeats.

    python benchmarks/bench_preprocess.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The demo's corpus (Makefile): the standard library's Python source without tests and site-packages.
STDLIB_FILTER = [
    "--include=*.py",
    "--exclude=site-packages/*",
    "--exclude=test/*",
    "--exclude=*/test/*",
    "--exclude=*/tests/*",
    "--exclude=*/idle_test/*",
]


def linscale(*args: str) -> str:
    cmd = [sys.executable, "-m", "linscale", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"benchmark run failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def preprocess(corpus: Path, out: Path, *extra: str) -> dict:
    linscale("preprocess", str(corpus), f"--out={out}", "--no-progress", *extra)
    return json.loads((out / "preprocess_summary.json").read_text())


def skewed_corpus(root: Path, big: int, big_mb: float, small: int, small_kb: float, seed: int = 0) -> None:
    """`big` files of `big_mb` MB and `small` files of `small_kb` KB of varied English-like lines."""
    rng = random.Random(seed)
    words = [w for w in Path(sysconfig.get_paths()["stdlib"], "this.py").read_text().split() if w.isalpha()]
    words += ["data", "model", "token", "shard", "worker", "queue", "balance", "corpus", "python", "scale"]

    def text(nbytes: int) -> str:
        lines, size = [], 0
        while size < nbytes:
            line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 16))) + "\n"
            lines.append(line)
            size += len(line)
        return "".join(lines)

    root.mkdir(parents=True)
    for i in range(big):
        (root / f"big{i:02d}.txt").write_text(text(int(big_mb * 1e6)))
    for i in range(small):
        (root / f"small{i:03d}.txt").write_text(text(int(small_kb * 1e3)))


def image_folder(root: Path, files: int, classes: int = 10, seed: int = 0) -> None:
    """`files` JPEGs of 64x64 to 160x160 pixels of smooth noise (about 2-8 KB each) in `classes` folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(files):
        h, w = (int(v) for v in rng.integers(64, 161, size=2))
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"img{i:06d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--image-files", type=int, default=4000, help="images in the packing case (0: skip it)")
    args = ap.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # The tokenizer is trained once: the runs below measure tokenization, not BPE training.
        first = preprocess(
            stdlib,
            tmp / "tok",
            *STDLIB_FILTER,
            "--tokenizer=bpe",
            f"--vocab-size={args.vocab_size}",
            "--nproc-per-node=1",
        )
        tokenizer = tmp / "tok" / "tokenizer.json"
        skewed = tmp / "skewed"
        # 3 large files of 4 MB and 60 small ones of 20 KB: with 2 workers and whole files, one worker
        # gets two of the large files.
        skewed_corpus(skewed, big=3, big_mb=4.0, small=60, small_kb=20.0)

        mbs: dict[int, list[float]] = {1: [], 2: []}
        runs: dict[str, list[dict]] = {"dynamic": [], "static": []}
        for r in range(args.repeats):
            for workers in (1, 2) if r % 2 == 0 else (2, 1):
                s = preprocess(
                    stdlib,
                    tmp / f"std-{r}-{workers}",
                    *STDLIB_FILTER,
                    f"--tokenizer={tokenizer}",
                    f"--nproc-per-node={workers}",
                )
                mbs[workers].append(s["input_mb"] / s["units_seconds"])
                print(
                    f"repeat {r + 1}/{args.repeats} stdlib, {workers} worker(s): {mbs[workers][-1]:.2f} MB/s",
                    flush=True,
                )
            for schedule in ("dynamic", "static") if r % 2 == 0 else ("static", "dynamic"):
                # Dynamic cuts the large files into 1 MB ranges; static keeps whole files.
                unit = "--unit-mb=1" if schedule == "dynamic" else "--unit-mb=1000"
                s = preprocess(
                    skewed,
                    tmp / f"skew-{r}-{schedule}",
                    f"--tokenizer={tokenizer}",
                    "--nproc-per-node=2",
                    f"--schedule={schedule}",
                    unit,
                )
                runs[schedule].append(s)
                print(
                    f"repeat {r + 1}/{args.repeats} skewed, {schedule}: makespan {s['units_seconds']:.2f} s, "
                    f"ideal {s['busy_seconds_all_workers'] / 2:.2f} s, balance {s['balance']:.3f}",
                    flush=True,
                )

        images: dict[int, list[float]] = {1: [], 2: []}
        image_mb = 0.0
        if args.image_files:
            image_folder(tmp / "images", args.image_files)
            for r in range(args.repeats):
                for workers in (1, 2) if r % 2 == 0 else (2, 1):
                    s = preprocess(
                        tmp / "images", tmp / f"img-{r}-{workers}", "--unit-mb=2", f"--nproc-per-node={workers}"
                    )
                    images[workers].append(s["images"] / s["units_seconds"])
                    image_mb = s["input_mb"]
                    print(
                        f"repeat {r + 1}/{args.repeats} images, {workers} worker(s): {images[workers][-1]:.0f} "
                        f"images/s, balance {s['balance']:.3f}",
                        flush=True,
                    )

        data = tmp / "std-0-1"
        train_dir = tmp / "train"
        linscale(
            "train",
            "gpt",
            f"--task.data={data}",
            "--nproc-per-node=2",
            f"--train.max_steps={args.train_steps}",
            "--train.eval_every=0",
            "--task.sample_tokens=0",
            "--log.progress=false",
            f"--log.dir={train_dir}",
        )
        train = json.loads((train_dir / "summary.json").read_text())

    one, two = statistics.median(mbs[1]), statistics.median(mbs[2])
    print("***** benchmark: preprocessing and the data path *****")
    print(
        f"  command          = python benchmarks/bench_preprocess.py --repeats {args.repeats} "
        f"--vocab-size {args.vocab_size} --train-steps {args.train_steps}"
    )
    print(f"  stdlib corpus    = {first['input_mb']:.1f} MB, {first['documents']} files, BPE vocab {args.vocab_size}")
    print(f"  1 worker         = {one:.2f} MB/s (median of {', '.join(f'{v:.2f}' for v in mbs[1])})")
    print(
        f"  2 workers        = {two:.2f} MB/s (median of {', '.join(f'{v:.2f}' for v in mbs[2])}), "
        f"speed-up {two / one:.2f}"
    )
    for schedule, rs in runs.items():
        make = statistics.median(s["units_seconds"] for s in rs)
        ideal = statistics.median(s["busy_seconds_all_workers"] / 2 for s in rs)
        balances = [s["balance"] for s in rs]
        per_run = ", ".join(f"{b:.3f}" for b in balances)
        print(
            f"  skewed, {schedule:7s} = makespan {make:.2f} s, ideal {ideal:.2f} s, balance "
            f"{statistics.median(balances):.3f} (per run: {per_run})"
        )
    if args.image_files:
        i1, i2 = statistics.median(images[1]), statistics.median(images[2])
        print(
            f"  image packing    = {args.image_files} JPEGs, {image_mb:.1f} MB, decode-checked: 1 worker {i1:.0f} "
            f"images/s, 2 workers {i2:.0f} images/s, speed-up {i2 / i1:.2f}"
        )
    print(
        f"  training         = {train['steady_tokens_per_second']:,.0f} tokens/s (2 processes, gpt defaults), "
        f"waiting for data {train['time_data_pct']:.2f}% of the step"
    )


if __name__ == "__main__":
    main()
