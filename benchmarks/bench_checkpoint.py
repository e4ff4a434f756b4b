"""How long a checkpoint stalls training: synchronous against asynchronous saves.

For two models, the demo's GPT (1.3M parameters, vocabulary 4,096) and a GPT of a few hundred MB
(width 768, 12 blocks: 87M parameters, 350 MB of weights, about 1 GB with AdamW's states), one
process with a one-rank gloo group (the asynchronous path needs a process group of its own) runs
linscale's `Checkpointer` on the model and its AdamW states after a real step:

  sync   save() writes the shards, checksums them and commits: training waits for all of it
  async  save() copies the states to host memory and returns; a background thread writes and
         commits. Training waits for the copy only (the stall); the write time is reported too.

The second figure is what asynchronous saving costs the steps that run while it writes: on a
machine with few cores the writer competes with compute, so the benchmark also times training
steps during the background write against steps with no save in flight (same process, alternating).

Every figure is the median over repeats, after one warm-up save of each kind.

    python benchmarks/bench_checkpoint.py [--repeats 5] [--big-width 768 --big-layers 12]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from linscale.models.gpt import GPT, GPTConfig  # noqa: E402
from linscale.runtime.device import CPU  # noqa: E402
from linscale.train.checkpoint import Checkpointer  # noqa: E402


def model_and_optimizer(width: int, layers: int, heads: int, vocab: int, block: int):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=layers, n_head=heads, d_model=width))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return model, opt


def train_step(model, opt, x) -> None:
    logits = model(x[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(name: str, width: int, layers: int, heads: int, repeats: int, root: Path) -> dict:
    vocab, block = 4096, 64
    model, opt = model_and_optimizer(width, layers, heads, vocab, block)
    x = torch.randint(0, vocab, (4, block + 1))
    train_step(model, opt, x)  # AdamW's states exist from here on
    params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    figures = {"sync_stall": [], "async_stall": [], "async_write": [], "step_idle": [], "step_during_write": []}
    say = lambda text: None  # noqa: E731 - quiet
    for kind in ("sync", "async"):
        ck = Checkpointer(root / kind, keep_last=1, async_save=kind == "async", rank=0, device=CPU, log=say)
        step = 0
        for rep in range(repeats + 1):  # the first of each kind warms up the writer
            step += 1
            t0 = time.perf_counter()
            ck.save(step, model, opt, {"samples_consumed": step, "global_batch": 1})
            stall = time.perf_counter() - t0
            if kind == "async":
                # Train while the background thread writes; then wait for the commit.
                t1 = time.perf_counter()
                train_step(model, opt, x)
                during = time.perf_counter() - t1
                ck.wait()
                write = time.perf_counter() - t0
                t2 = time.perf_counter()
                train_step(model, opt, x)
                idle = time.perf_counter() - t2
            if rep == 0:
                continue
            figures[f"{kind}_stall"].append(stall)
            if kind == "async":
                figures["async_write"].append(write)
                figures["step_during_write"].append(during)
                figures["step_idle"].append(idle)
        ck.close()
    med = {k: statistics.median(v) for k, v in figures.items()}
    ckpt_mb = sum(f.stat().st_size for f in (root / "sync").rglob("*") if f.is_file()) / 2**20
    return {"model": name, "params_mb": params_mb, "checkpoint_mb": ckpt_mb, **med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--big-width", type=int, default=768)
    ap.add_argument("--big-layers", type=int, default=12)
    ap.add_argument("--dir", default="", help="where checkpoints are written (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="linscale-bench-ckpt-"))
    store = dist.FileStore(str(base / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        rows = [
            measure("demo gpt (4x128)", 128, 4, 4, args.repeats, base / "demo"),
            measure(
                f"gpt {args.big_layers}x{args.big_width}",
                args.big_width,
                args.big_layers,
                args.big_width // 64,
                args.repeats,
                base / "big",
            ),  # fmt: skip
        ]
    finally:
        dist.destroy_process_group()
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\ncheckpoint stall, median of {args.repeats} saves after a warm-up (one process, {base})")
    head = (
        f"{'model':<18} {'weights MB':>10} {'ckpt MB':>8} {'sync stall s':>12} {'async stall s':>13} "
        f"{'async/sync':>10} {'async write s':>13} {'step idle s':>11} {'step during write s':>19}"
    )
    print(head)
    for r in rows:
        ratio = r["async_stall"] / r["sync_stall"]
        print(
            f"{r['model']:<18} {r['params_mb']:>10.1f} {r['checkpoint_mb']:>8.1f} {r['sync_stall']:>12.3f} "
            f"{r['async_stall']:>13.3f} {ratio:>10.1%} {r['async_write']:>13.3f} {r['step_idle']:>11.3f} "
            f"{r['step_during_write']:>19.3f}"
        )
    worst = max(r["async_stall"] / r["sync_stall"] for r in rows)
    print(f"goal: asynchronous stall < 10% of the synchronous save: {'met' if worst < 0.10 else 'NOT met'} "
          f"(worst {worst:.1%})")  # fmt: skip


if __name__ == "__main__":
    main()
