"""The baseline: a hand-written PyTorch DDP loop on the same model, data and settings as
`linscale train gpt`. Launched by bench_overhead.py through torch.distributed.run.

Prints one JSON line on rank 0 with the steady-state tokens per second (the steps after
warm-up, wall clock, the same definition linscale's summary uses).
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from linscale.models.gpt import GPT, GPTConfig
from linscale.tasks.gpt import GPTTaskConfig, TokenWindows, load_corpus


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["LOCAL_WORLD_SIZE"])))
    task_cfg = GPTTaskConfig()
    data = TokenWindows(load_corpus(task_cfg)[0], task_cfg.block_size)
    torch.manual_seed(1337)
    model = GPT(
        GPTConfig(
            block_size=task_cfg.block_size, n_layer=task_cfg.n_layer, n_head=task_cfg.n_head, d_model=task_cfg.d_model
        )
    )
    model = DDP(model, bucket_cap_mb=args.bucket_mb, gradient_as_bucket_view=True)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=True,
    )
    warm_lr = 20

    def lr_lambda(s: int) -> float:
        if s < warm_lr:
            return (s + 1) / warm_lr
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm_lr) / (args.steps - warm_lr))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    per_rank = args.global_batch // world
    rng = np.random.default_rng(1337)
    perm = rng.permutation(len(data))
    t_start = time.perf_counter()
    loss_acc = torch.zeros(())
    for step in range(args.steps):
        if step == args.warmup:
            t_start = time.perf_counter()
        idx = perm[step * args.global_batch + rank * per_rank : step * args.global_batch + (rank + 1) * per_rank]
        batch = torch.stack([data[i] for i in idx])
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_acc += loss.detach()
        if (step + 1) % 10 == 0:
            dist.all_reduce(loss_acc)
            if rank == 0:
                print(f"step {step + 1} loss {loss_acc.item() / (10 * world):.4f}", flush=True)
            loss_acc.zero_()
    elapsed = time.perf_counter() - t_start
    if rank == 0:
        tokens = (args.steps - args.warmup) * args.global_batch * task_cfg.block_size
        print(json.dumps({"raw_tokens_per_second": tokens / elapsed}), flush=True)
    dist.destroy_process_group()
    # As linscale's workers do: leave without interpreter teardown, which can abort in gloo.
    os._exit(0)


if __name__ == "__main__":
    main()
