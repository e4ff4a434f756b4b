"""The optimizer phase of the sharded strategies and zero1: linscale's against torch's defaults.

The optimizer phase of a step is the gradient clipping and the AdamW update (zero1: and the
parameter exchange after it). On N gloo processes of this machine (loopback), for the GPT of the
prediction benchmark (4 layers of width 256, 3.2M parameters, 52 tensors):

* zero3 (FSDP2, DTensor parameters): torch's `clip_grad_norm_` (every DTensor dispatched on its own)
  and foreach AdamW, against `linscale.runtime.parallel.clip_grad_norm` (one foreach kernel on the
  local shards, one reduction) and fused AdamW, which `train/optim.py` now takes;
* zero1 (ZeroRedundancyOptimizer, fused AdamW): one broadcast per parameter against one bucket per rank
  (`parameters_as_bucket_view`).

Both variants run in the same processes, alternating, after warm-up steps; the figure is the median
over steps of the slowest rank's time. The gradients are the same for both (set once, the clip
scales them the same way every step).

    python benchmarks/bench_optimizer_step.py [--procs 2,8 --steps 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WARMUP = 5


def _model():
    from linscale.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=256, n_layer=4, d_model=256, n_head=4, block_size=16))


def _timed(fn, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out[WARMUP:]


def _zero3(steps: int) -> dict[str, list[float]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from linscale.runtime.parallel import clip_grad_norm

    out = {}
    for name, impl, clip in (
        ("torch clip_grad_norm_ + foreach AdamW", "foreach",
         lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=True)),
        ("linscale clip_grad_norm + fused AdamW", "fused", lambda ps: clip_grad_norm(ps, 1.0)),
    ):  # fmt: skip
        model = _model()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = list(model.parameters())
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        opt = torch.optim.AdamW(params, lr=1e-3, **{impl: True})

        def step(params=params, opt=opt, clip=clip) -> None:
            clip(params)
            opt.step()

        out[name] = _timed(step, steps)
    return out


def _zero1(steps: int) -> dict[str, list[float]]:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    out = {}
    for name, bucket in (("one broadcast per parameter", False), ("one bucket per rank", True)):
        model = _model()
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        opt = ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3, fused=True,
            parameters_as_bucket_view=bucket,
        )  # fmt: skip
        out[name] = _timed(opt.step, steps)
    return out


def _worker(rank: int, world: int, port: int, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, {"zero3": _zero3(steps), "zero1": _zero1(steps)}))
    finally:
        dist.destroy_process_group()


def run(world: int, steps: int) -> dict[str, dict[str, float]]:
    """{strategy: {variant: median ms of the slowest rank}} on `world` processes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, steps, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=600)[1] for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    out: dict[str, dict[str, float]] = {}
    for strategy in results[0]:
        out[strategy] = {}
        for variant in results[0][strategy]:
            per_step = zip(*(r[strategy][variant] for r in results), strict=True)
            out[strategy][variant] = 1e3 * statistics.median(max(ts) for ts in per_step)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", default="2,8")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    print("\n## Optimizer phase: linscale against torch's defaults (median ms, slowest rank)\n")
    print("| processes | strategy | torch's default | ms | linscale | ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for world in (int(n) for n in args.procs.split(",")):
        print(f"running {world} processes ...", file=sys.stderr, flush=True)
        for strategy, variants in run(world, args.steps + WARMUP).items():
            (base, b), (ours, o) = variants.items()
            print(f"| {world} | {strategy} | {base} | {b:.1f} | {ours} | {o:.1f} | {b / o:.2f}x |")


if __name__ == "__main__":
    main()
