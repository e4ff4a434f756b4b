"""`linscale plan TASK --cluster CLUSTER`: the strategy, micro-batch and accumulation to use, the predicted
step time and its breakdown, throughput, MFU, memory, scaling from 1 device to the cluster, and the time
and device-hours of a training budget (see docs/plan.md)."""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any

from linscale.cli.common import error


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="predict step time, throughput and scaling on a cluster, and recommend a strategy",
        description="Predict how TASK trains on a cluster: the strategy, micro-batch and activation checkpointing "
        "that fit the device memory and give the shortest step, the step's compute / exposed communication / "
        "optimizer time, throughput, MFU, memory per device, strong and weak scaling from 1 device to the "
        "cluster, and the time and device-hours of a budget. Task settings as for `linscale train` "
        "(--config FILE.toml, --task.size=..., --train.global_batch=...).",
    )
    p.add_argument("task", nargs="?", default="gpt", help="the task, as for `linscale train` (default: gpt)")
    p.add_argument(
        "--cluster",
        help="a profile name (--list-clusters), a JSON profile file, a `linscale doctor` report, "
        "or `doctor` (the last report)",
    )
    p.add_argument("--list-clusters", action="store_true", help="list the built-in cluster profiles")
    p.add_argument("--nodes", type=int, default=None, help="nodes of the cluster (default: the profile's)")
    p.add_argument("--config", help="a TOML file of settings, as for `linscale train`")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--global-batch", type=int, default=None, help="samples per step (default: the task's)")
    batch.add_argument("--global-batch-tokens", type=int, default=None, help="tokens per step")
    p.add_argument("--tokens", type=float, default=None, help="budget: tokens to train on (e.g. 1e9)")
    p.add_argument("--epochs", type=float, default=None, help="budget: epochs (with --dataset-samples)")
    p.add_argument("--dataset-samples", type=int, default=None, help="training samples in one epoch")
    p.add_argument(
        "--precision", default=None, help="fp32, bf16-mixed, bf16-true, fp16-mixed (default: the run config's)"
    )
    p.add_argument("--strategy", default=None, help="plan this strategy only (default: choose among all)")
    p.add_argument("--micro-batch", type=int, default=None, help="plan this micro-batch only")
    p.add_argument("--emulate-tflops", type=float, default=0.0, help="devices of exactly X TFLOP/s, efficiency 1")
    p.add_argument("--efficiency", type=float, default=None, help="achieved/peak FLOP/s of the model (calibrated)")
    p.add_argument("--devices", default="", help="device counts of the scaling table, e.g. 1,2,4,8")
    p.add_argument("--save-profile", default="", help="write the resolved cluster profile as JSON to this file")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    from linscale.perf import clusters

    if args.list_clusters:
        print(list_clusters())
        return 0
    if not args.cluster:
        return error(
            "which cluster? give --cluster with a profile name ("
            + ", ".join(clusters.PROFILES)
            + "), a JSON profile, a `linscale doctor` report or `doctor`; --list-clusters describes them"
        )
    try:
        out = plan(args, rest)
    except ValueError as e:
        return error(str(e))
    except KeyboardInterrupt:
        return error("interrupted")
    print(json.dumps(out, indent=2, default=str) if args.json else render(out))
    return 0


def list_clusters() -> str:
    from linscale.perf.clusters import PROFILES, describe

    width = max(len(n) for n in PROFILES)
    lines = ["built-in cluster profiles (--cluster NAME; --nodes N changes the node count):"]
    for name, p in PROFILES.items():
        lines.append(f"  {name:<{width}}  {describe(p)}")
        lines.append(f"  {'':<{width}}  source: {p.source}")
    lines.append('also: a JSON profile file (every field, or {"base": NAME, ...}), a `linscale doctor` report, or')
    lines.append("`doctor` for the last report (see docs/plan.md)")
    return "\n".join(lines)


def _resolve(args: argparse.Namespace, rest: list[str]):
    """The task and run config exactly as `linscale train` resolves them."""
    from linscale import config as lconfig
    from linscale.cli.train import prepare

    args.resume = None
    try:
        return prepare(args, rest)
    except lconfig.ConfigError as e:
        if "no stop condition" not in str(e):
            raise
        # A plan trains nothing: a task without a default budget still plans.
        return prepare(args, [*rest, "--train.max_steps=1"])


def plan(args: argparse.Namespace, rest: list[str]) -> dict[str, Any]:
    """Everything `linscale plan` shows, as a dict."""
    import dataclasses

    from linscale.config import PRECISIONS, STRATEGIES, parse_overrides
    from linscale.perf import predict as pr
    from linscale.perf.clusters import describe, load_cluster
    from linscale.train.batching import tokens_to_samples
    from linscale.train.loop import make_task

    if args.tokens is not None and args.epochs is not None:
        raise ValueError("give the budget as --tokens or as --epochs with --dataset-samples, not both")
    if args.epochs is not None and not args.dataset_samples:
        raise ValueError("--epochs needs --dataset-samples (the number of training samples in one epoch)")
    cluster = load_cluster(args.cluster, nodes=args.nodes, emulate_tflops=args.emulate_tflops)
    if args.efficiency is not None:
        if not 0 < args.efficiency <= 1:
            raise ValueError(f"--efficiency is a fraction of the peak in (0, 1], got {args.efficiency}")
        cluster = dataclasses.replace(cluster, efficiency=args.efficiency)
    if args.save_profile:
        with open(args.save_profile, "w") as f:
            json.dump(cluster.to_dict(), f, indent=2)
    overrides = parse_overrides(rest)
    task_cls, cfg = _resolve(args, rest)
    task = make_task(task_cls, cfg)
    tokens_per_sample = getattr(task, "tokens_per_sample", None)
    if args.global_batch_tokens:
        global_batch = tokens_to_samples(args.global_batch_tokens, tokens_per_sample)
    elif args.global_batch:
        global_batch = args.global_batch
    elif cfg.train.global_batch_tokens:
        global_batch = tokens_to_samples(cfg.train.global_batch_tokens, tokens_per_sample)
    else:
        global_batch = cfg.train.global_batch
    if global_batch < 1:
        raise ValueError(f"--global-batch must be >= 1, got {global_batch}")
    if args.tokens is not None and not tokens_per_sample:
        raise ValueError(f"--tokens needs a task with tokens_per_sample; {args.task} has none: use --epochs")
    from linscale.train.batching import plan_batch

    plan_batch(global_batch, cluster.world)  # names a global batch that divides over the devices
    precision = args.precision or cfg.runtime.precision
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":  # as linscale train: bf16-mixed where the device computes bf16, else fp32
        precision = "bf16-mixed" if "bf16" in cluster.peak_flops else "fp32"
    cluster.peak(pr.compute_dtype(precision))  # a device without this dtype: say so before tracing
    strategy = args.strategy or overrides.get("parallel", {}).get("strategy")
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    micro = args.micro_batch or (cfg.train.micro_batch if "micro_batch" in overrides.get("train", {}) else None)
    if micro in (0, "auto"):
        micro = None
    if micro is not None and micro < 1:
        raise ValueError(f"--micro-batch must be >= 1, got {micro}")
    ac_fixed = "activation_checkpointing" in overrides.get("parallel", {})
    par = cfg.parallel

    from linscale.perf.memory import trace

    tr = trace(task, precision)
    world = cluster.world
    strategies = None if strategy in (None, "auto") else ["zero3" if strategy == "fsdp" else strategy]
    rec = pr.recommend(
        tr,
        cluster,
        global_batch,
        precision=precision,
        strategies=strategies,
        micro_batches=[micro] if micro else None,
        activation_checkpointing=(par.activation_checkpointing,) if ac_fixed else ("none", "full"),
        bucket_mb=par.bucket_mb,
        reduce_dtype=par.reduce_dtype,
        comm_hook=par.comm_hook,
    )
    best = rec.prediction
    devices = _device_list(args.devices, world, cluster.devices_per_node)
    common = dict(
        precision=precision,
        activation_checkpointing=best.activation_checkpointing,
        bucket_mb=par.bucket_mb,
        reduce_dtype=par.reduce_dtype if best.strategy in pr.SHARDED else "fp32",
        comm_hook=par.comm_hook if best.strategy not in pr.SHARDED else "none",
        memory=True,
    )
    per_device = global_batch // world
    strong = pr.scaling(tr, cluster, best.strategy, devices, "strong", global_batch, best.micro_batch, **common)
    weak = pr.scaling(tr, cluster, best.strategy, devices, "weak", per_device * devices[0], best.micro_batch, **common)
    budget = None
    if args.tokens is not None or args.epochs is not None:
        budget = pr.budget(best, args.tokens, args.epochs, args.dataset_samples, tokens_per_sample)
    return {
        "task": args.task,
        "model": {
            "parameters": tr.num_params,
            "flops_per_sample": tr.flops_per_sample,
            "tokens_per_sample": tokens_per_sample,
            "blocks": len(tr.block_params),
        },
        "cluster": cluster.to_dict(),
        "cluster_line": describe(cluster),
        "world": world,
        "global_batch": global_batch,
        "precision": precision,
        "recommendation": rec.to_dict(),
        "scaling": {"strong": strong, "weak": weak, "per_device_batch": per_device},
        "budget": budget,
    }


def _device_list(text: str, world: int, devices_per_node: int) -> list[int]:
    from linscale.perf.predict import device_counts

    if not text:
        return device_counts(world, devices_per_node)
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--devices takes counts separated by commas, e.g. 1,2,4,8; got {text!r}") from None
    if not counts or counts[0] < 1:
        raise ValueError(f"--devices takes counts >= 1, got {text!r}")
    return counts


# --- text output ---------------------------------------------------------------------------------------------


def _t(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.3g} s"
    return f"{1e3 * seconds:.3g} ms"


def _rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def render(out: dict[str, Any]) -> str:
    rec, p = out["recommendation"], out["recommendation"]["prediction"]
    model, cl = out["model"], out["cluster"]
    tps = model["tokens_per_sample"]
    flops = model["flops_per_sample"]
    size = f"{model['parameters'] / 1e6:,.1f}M parameters, " + (
        f"{flops / 1e12:.3g} TFLOP per sample" if flops >= 1e12 else f"{flops / 1e9:.3g} GFLOP per sample"
    )
    if tps:
        size += f" of {tps} tokens"
    batch = f"global batch {out['global_batch']} samples" + (f" ({out['global_batch'] * tps:,} tokens)" if tps else "")
    lines = [
        f"***** linscale plan: {out['task']} ({size}) *****",
        f"  cluster   {cl['name']}: {out['cluster_line']}",
        f"  run       {out['world']} devices, {batch}, {out['precision']}",
        "",
        f"  recommendation: {rec['strategy']}, micro-batch {rec['micro_batch']} x {rec['accum']} accumulation, "
        f"activation checkpointing {rec['activation_checkpointing']}",
    ]
    for reason in rec["why"].split("; "):
        lines += textwrap.wrap(reason, 116, initial_indent="    - ", subsequent_indent="      ")
    comm = ", ".join(f"{k} {_t(v)}" for k, v in p["breakdown"].items() if v > 0) or "none"
    step = p["step_time"]
    lines += [
        "",
        "  step (predicted)",
        f"    compute              {_t(p['compute']):>10}  {100 * p['compute'] / step:4.0f}%",
        f"    exposed comm         {_t(p['comm_exposed']):>10}  {100 * p['comm_exposed'] / step:4.0f}%"
        f"   (all communication {_t(p['comm'])}: {comm})",
        f"    optimizer            {_t(p['optimizer']):>10}  {100 * p['optimizer'] / step:4.0f}%",
        f"    step                 {_t(step):>10}",
        f"    throughput           {_rate(p['samples_per_second'])} samples/s"
        + (f", {_rate(p['tokens_per_second'])} tokens/s" if p["tokens_per_second"] else ""),
        f"    MFU                  {100 * p['mfu']:.1f}% of {cl['device']} peak",
    ]
    m = p.get("memory")
    if m:
        lines.append(
            f"    memory per device    {_gib(m['peak'])} peak at {m['peak_at']} (parameters {_gib(m['params'])}, "
            f"gradients {_gib(m['grads'])}, optimizer {_gib(m['optimizer'])}, activations {_gib(m['activations'])}, "
            f"temporaries {_gib(m['temporaries'])})"
        )
    for note in p["notes"]:
        lines += textwrap.wrap(note, 116, initial_indent="    note: ", subsequent_indent="          ")
    sc = out["scaling"]
    unit = "tokens/s" if tps else "samples/s"
    lines += [
        "",
        f"  scaling ({rec['strategy']}; strong: global batch {out['global_batch']}; weak: {sc['per_device_batch']} "
        "per device)",
        f"    {'devices':>7} {'nodes':>5} | {'step':>9} {unit:>12} {'strong':>7} | {'batch':>6} {'step':>9} "
        f"{unit:>12} {'weak':>7}",
    ]
    for s, w in zip(sc["strong"], sc["weak"], strict=True):
        lines.append(f"    {s['devices']:>7} {s['nodes']:>5} | {_row(s, tps)} | {w['global_batch']:>6} {_row(w, tps)}")
    if any(r.get("fits") is False for r in sc["strong"] + sc["weak"]):
        lines.append("    ! does not fit the device memory at that size (the recommendation is for the whole cluster)")
    errors = {r["error"] for r in sc["strong"] + sc["weak"] if "error" in r}
    lines += [f"    - {e}" for e in sorted(errors)]
    b = out["budget"]
    if b:
        lines += [
            "",
            f"  budget: {b['budget']} = {b['steps']:,} steps, {_duration(b['seconds'])} on {out['world']} devices, "
            f"{b['device_hours']:,.1f} device-hours",
        ]
    return "\n".join(lines)


def _row(r: dict[str, Any], tokens_per_sample: int | None) -> str:
    if "error" in r:
        return f"{'-':>9} {'-':>12} {'-':>7}"
    thr = r["throughput"] * tokens_per_sample if tokens_per_sample else r["throughput"]
    mark = "!" if r.get("fits") is False else " "
    return f"{_t(r['step_time']):>9} {_rate(thr):>12} {100 * r['efficiency']:>6.1f}%{mark}"
