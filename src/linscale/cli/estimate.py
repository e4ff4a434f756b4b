"""`linscale estimate-memory TASK`: per-device memory of a training step, traced without allocating.

The task and its settings resolve as for `linscale train` (`--config FILE`, `--section.field=value`);
the model is traced on fake tensors (`linscale.perf.memory`), so a 4.7B-parameter model takes seconds
on a laptop. One row per strategy: parameters, gradients, optimizer states, activations saved for
backward, temporaries (gathered parameters, buckets, transient buffers) and the peak, in GiB.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from linscale.cli.common import error

DEFAULT_STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
DEVICES_PER_NODE = 8  # the default world: one node of 8 devices per --nodes
UNITS = {
    "": 2**30,  # a bare number is GiB
    "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimate-memory",
        help="per-device memory of a training step for several strategies, traced without allocating",
        description="Estimate the memory of one device when training TASK: parameters, gradients, optimizer "
        "states, activations saved for backward, temporary buffers and the peak, for each strategy side by side. "
        "The model is traced on fake tensors (nothing is allocated), so large models take seconds. Task settings "
        "come from --config FILE.toml and --section.field=value overrides, as for `linscale train`; "
        "--parallel.bucket_mb, --parallel.reduce_dtype, --parallel.gradient_as_bucket_view and "
        "--parallel.comm_hook apply too. See docs/memory.md.",
    )
    p.add_argument("task", nargs="?", default="gpt", help="the task (default: gpt)")
    p.add_argument("--config", help="a TOML file of settings ([train], [task], [parallel], ...)")
    p.add_argument(
        "--strategy",
        help="a strategy or a comma-separated list of ddp, zero1, zero2, zero3, fsdp, hsdp "
        "(default: ddp,zero1,zero2,zero3, and hsdp when --nodes > 1)",
    )
    p.add_argument(
        "--precision",
        help="fp32, bf16-mixed, bf16-true or fp16-mixed (default: --runtime.precision when set, else bf16-mixed, "
        "what GPUs run)",
    )
    p.add_argument("--world", type=int, help=f"processes (devices) in all (default: {DEVICES_PER_NODE} per node)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the world spans (default: 1)")
    p.add_argument(
        "--micro-batch",
        type=int,
        help="samples per forward/backward on one device, the same as --train.micro_batch (default: the "
        "task's, or the whole share of a replica)",
    )
    p.add_argument(
        "--activation-checkpointing",
        metavar="none|full|K",
        help="recompute the activations of every block (full) or every K-th block (default: "
        "--parallel.activation_checkpointing, none)",
    )
    p.add_argument(
        "--device-memory",
        metavar="SIZE",
        help="memory of one device, such as 32GB (10^9 bytes), 80GiB or 24 (GiB): says what fits and the "
        "largest micro-batch that does",
    )
    p.add_argument(
        "--reserve",
        type=float,
        default=0.1,
        help="fraction of the device memory kept free for the allocator's fragmentation and the runtime (default: 0.1)",
    )
    p.add_argument("--rank", type=int, help="estimate this rank (default: the rank that holds the most)")
    p.add_argument("--details", action="store_true", help="also list the temporaries at each peak by name")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON")
    p.set_defaults(func=run_cli)


def parse_size(text: str) -> float:
    """Bytes in `text`: 32GB = 32e9, 80GiB = 80 * 2**30, 24 = 24 GiB.

    >>> parse_size("80GiB") == 80 * 2**30
    True
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in UNITS:
        raise ValueError(
            f"--device-memory {text!r} is not a size; write for example 32GB (10^9 bytes), 80GiB or 24 (GiB)"
        )
    return float(m.group(1)) * UNITS[unit]


def parse_strategies(text: str | None, nodes: int) -> list[str]:
    from linscale.perf.memory import STRATEGIES

    if not text:
        return [*DEFAULT_STRATEGIES, *(["hsdp"] if nodes > 1 else [])]
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise ValueError(
            f"unknown strategy {', '.join(map(repr, unknown)) or repr(text)}; choose from {', '.join(STRATEGIES)} "
            "(a comma-separated list for several, such as --strategy ddp,zero3)"
        )
    return list(dict.fromkeys(names))


def _world(args: argparse.Namespace) -> tuple[int, int]:
    nodes = args.nodes
    if nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {nodes}")
    world = args.world if args.world is not None else DEVICES_PER_NODE * nodes
    if world < 1:
        raise ValueError(f"--world must be >= 1, got {world}")
    if world % nodes:
        lo = world // nodes * nodes
        options = " or ".join(f"--world {v}" for v in sorted({lo, lo + nodes}) if v > 0)
        raise ValueError(
            f"--world {world} is not divisible by --nodes {nodes}: every node runs the same number of processes; "
            f"use {options}"
        )
    return world, nodes


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def run_cli(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    from linscale.cli.train import USER_ERRORS

    try:
        return _run(args, rest)
    except USER_ERRORS as e:
        return error(str(e))
    except KeyboardInterrupt:
        return error("interrupted")


def _run(args: argparse.Namespace, rest: list[str]) -> int:
    from linscale.cli.train import prepare

    world, nodes = _world(args)
    strategies = parse_strategies(args.strategy, nodes)
    device_memory = parse_size(args.device_memory) if args.device_memory else None
    if not 0 <= args.reserve < 1:
        raise ValueError(f"--reserve is a fraction of the device memory in [0, 1), got {args.reserve}")
    if args.micro_batch is not None:
        if args.micro_batch < 1:
            raise ValueError(f"--micro-batch must be >= 1, got {args.micro_batch}")
        rest = [*rest, f"--train.micro_batch={args.micro_batch}"]
    # The task and its settings resolve exactly as for `linscale train`.
    task_cls, cfg = prepare(argparse.Namespace(task=args.task, config=args.config, resume=None), rest)

    from linscale.config import PRECISIONS
    from linscale.perf import memory
    from linscale.train.batching import plan_batch, tokens_to_samples
    from linscale.train.loop import make_task

    if args.precision and args.precision != "auto":
        precision, why = args.precision, ""
    elif cfg.runtime.precision != "auto":
        precision, why = cfg.runtime.precision, " (--runtime.precision)"
    else:
        precision, why = "bf16-mixed", " (the default, what GPUs run; --precision to change)"
    if precision not in memory.PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(p for p in PRECISIONS[1:])}")
    ac = args.activation_checkpointing or cfg.parallel.activation_checkpointing
    memory.checkpointed_blocks(ac, 0)  # refuse a bad setting before tracing
    if precision == "bf16-true":
        unsharded = [s for s in strategies if s not in memory.SHARDED]
        if world == 1:
            raise ValueError(
                "bf16-true needs 2 or more processes (a sharded strategy's mixed precision); use bf16-mixed"
            )
        if unsharded and args.strategy:
            raise ValueError(
                f"bf16-true needs a sharded strategy (zero2, zero3, fsdp, hsdp), not {', '.join(unsharded)}; "
                "use --precision bf16-mixed for ddp and zero1"
            )
        strategies = [s for s in strategies if s in memory.SHARDED]
    if args.rank is not None and not 0 <= args.rank < world:
        raise ValueError(f"--rank {args.rank} is not in a world of {world} (0 to {world - 1})")

    task = make_task(task_cls, cfg)
    tc = cfg.train
    samples = (
        tokens_to_samples(tc.global_batch_tokens, getattr(task, "tokens_per_sample", None))
        if tc.global_batch_tokens
        else tc.global_batch
    )
    auto = tc.micro_batch == "auto"
    plan = plan_batch(samples, world, 0 if auto else tc.micro_batch)
    micro = 1 if auto else plan.micro_batch

    tr = memory.trace(task, precision)
    kw = dict(
        bucket_mb=cfg.parallel.bucket_mb,
        reduce_dtype=cfg.parallel.reduce_dtype,
        gradient_as_bucket_view=cfg.parallel.gradient_as_bucket_view,
        comm_hook=cfg.parallel.comm_hook,
    )
    usable = (1 - args.reserve) * device_memory if device_memory else None
    rows = []
    for s in strategies:
        e = memory.estimate(tr, s, world, nodes, micro, precision, ac, rank=args.rank, **kw)
        largest = None
        if device_memory:
            largest = memory.largest_micro_batch(
                tr, s, world, nodes, precision, ac, device_memory, plan.per_replica, args.reserve, rank=args.rank, **kw
            )
        rows.append((e, largest))

    if args.json:
        out = {
            "task": args.task,
            "num_params": tr.num_params,
            "num_blocks": tr.num_blocks,
            "tokens_per_sample": tr.tokens_per_sample,
            "precision": precision,
            "world": world,
            "nodes": nodes,
            "micro_batch": micro,
            "per_replica": plan.per_replica,
            "activation_checkpointing": str(ac),
            "device_memory": device_memory,
            "usable_memory": usable,
            "trace_seconds": round(tr.seconds, 2),
            "estimates": [
                {**e.to_dict(), "fits": None if usable is None else e.peak <= usable, "largest_micro_batch": largest}
                for e, largest in rows
            ],
        }
        print(json.dumps(out, indent=2))
        return 0

    per_node = world // nodes
    tokens = f" | {tr.tokens_per_sample} tokens per sample" if tr.tokens_per_sample else ""
    print(
        f"linscale estimate-memory: {args.task} | {_count(tr.num_params)} parameters ({tr.num_params:,}) in "
        f"{tr.num_blocks} blocks{tokens} | traced in {tr.seconds:.1f} s, nothing allocated"
    )
    print(
        f"precision {precision}{why} | world {world} = {nodes} node{'s' if nodes > 1 else ''} x {per_node} | "
        f"micro-batch {micro}"
        f"{' (train.micro_batch=auto: 1 in the table)' if auto else ''} of {plan.per_replica} samples per replica "
        f"per step | activation checkpointing {ac}"
    )
    rank_text = f"rank {args.rank}" if args.rank is not None else "the rank that holds the most"
    memory_text = ""
    if device_memory:
        memory_text = (
            f"; device memory {args.device_memory} = {gib(device_memory)} GiB, {args.reserve:.0%} kept in reserve: "
            f"{gib(usable)} GiB usable"
        )
    print(f"per-device GiB on {rank_text}{memory_text}")
    if not rows:
        print("(no strategy to show)")
        return 0
    header = ["strategy", "params", "grads", "optimizer", "activations", "temporaries", "peak", "peak at", "fits"]
    table = [header]
    for e, _ in rows:
        fits = "-" if usable is None else ("yes" if e.peak <= usable else "no")
        name = e.strategy if args.rank is not None or world == 1 else f"{e.strategy} (rank {e.rank})"
        table.append(
            [name, gib(e.params), gib(e.grads), gib(e.optimizer), gib(e.activations), gib(e.temporaries),
             gib(e.peak), e.peak_at, fits]
        )  # fmt: skip
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:7], widths[1:7], strict=True)]
        cells += [r[7].ljust(widths[7]), r[8]]
        print("  ".join(cells).rstrip())
    if args.details:
        for e, _ in rows:
            parts = ", ".join(f"{k} {gib(v)}" for k, v in e.breakdown.items()) or "none"
            print(
                f"{e.strategy}: temporaries at the {e.peak_at}: {parts}; peaks: end of forward {gib(e.forward_peak)}, "
                f"start of backward {gib(e.backward_peak)}, optimizer step {gib(e.step_peak)}"
            )
    if world == 1:
        print("one process: every strategy runs the plain model (nothing to shard)")
    if precision == "bf16-true" and not args.strategy:
        print("bf16-true comes from the sharded strategies: ddp and zero1 are left out (they run bf16-mixed)")
    if device_memory:
        print(f"largest micro-batch that fits (a divisor of the {plan.per_replica} samples per replica per step):")
        for e, largest in rows:
            if largest is None:
                one = memory.estimate(tr, e.strategy, world, nodes, 1, precision, ac, rank=args.rank, **kw)
                hint = "" if str(ac) == "full" else "; try --activation-checkpointing full"
                print(f"  {e.strategy}: none (micro-batch 1 peaks at {gib(one.peak)} GiB){hint}")
            else:
                print(f"  {e.strategy}: {largest}")
    sys.stdout.flush()
    return 0
