"""`linscale train TASK`: resolve everything, spawn the workers, train, summarise."""

from __future__ import annotations

import argparse
import sys
import traceback

from linscale import config as lconfig
from linscale.runtime import topology
from linscale.runtime.device import local_device_count
from linscale.runtime.dist import hard_exit
from linscale.runtime.launch import LaunchError, LaunchSpec, is_consequence, spawn
from linscale.task import TaskError, resolve_task

USER_ERRORS = (lconfig.ConfigError, TaskError, LaunchError, ValueError)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a task on all local devices",
        description="Train TASK: a built-in (gpt), a file (path/to/task.py:MyTask) or a module "
        "(pkg.mod:MyTask). Settings come from --config FILE.toml and --section.field=value "
        "overrides; --help-config lists them.",
    )
    p.add_argument("task", nargs="?", default="gpt", help="the task to train (default: gpt)")
    p.add_argument("--config", help="a TOML file of settings ([train], [optim], [task], ...)")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=0,
        help="worker processes on this machine (default: one per GPU, or 2 on CPU)",
    )
    p.add_argument("--master-addr", default="127.0.0.1", help="rendezvous address (default: 127.0.0.1)")
    p.add_argument("--master-port", type=int, default=0, help="rendezvous port (default: a free port)")
    p.add_argument("--help-config", action="store_true", help="list every setting with its default")
    p.set_defaults(func=run_cli)


def _error(msg: str) -> int:
    print(f"linscale: error: {msg}", file=sys.stderr, flush=True)
    return 2


def _help_config(args: argparse.Namespace, rest: list[str]) -> None:
    """Every setting with the value it would have for this task, file and overrides."""
    try:
        _, cfg = prepare(args, rest)
    except USER_ERRORS as e:
        print(f"(showing plain defaults: {e})")
        cfg = None
    for name, cls in lconfig.SECTIONS.items():
        print(f"[{name}]")
        print("\n".join(lconfig.describe(getattr(cfg, name) if cfg else cls, name)))
    if cfg is not None and cfg.task is not None:
        print("[task]")
        print("\n".join(lconfig.describe(cfg.task, "task")))


def prepare(args: argparse.Namespace, rest: list[str]) -> tuple[type, lconfig.RunConfig]:
    """Everything that can be checked before workers start: task, config, batch split."""
    task_cls = resolve_task(args.task)
    overrides = lconfig.parse_overrides(rest)
    cfg = lconfig.load_config(
        args.config, overrides, getattr(task_cls, "Config", None), getattr(task_cls, "defaults", None)
    )
    return task_cls, cfg


def run_cli(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    if args.help_config:
        _help_config(args, rest)
        return 0
    topo = topology.detect()
    # Under the elastic agent every process is a worker; under srun or mpirun each task is a
    # worker too, unless --nproc-per-node asks it to be a node's launcher.
    if topo.launcher == "torchrun" or (topo.distributed and not args.nproc_per_node):
        return _worker(args, rest)
    try:
        task_cls, cfg = prepare(args, rest)
        nproc = args.nproc_per_node or local_device_count(cfg.runtime.device)
        if nproc < 1:
            raise ValueError(f"--nproc-per-node must be >= 1, got {nproc}")
        from linscale.train.loop import make_task, plan_run

        plan_run(make_task(task_cls, cfg), cfg, nproc)
        if nproc == 1:
            from linscale.train.loop import run

            run(args.task, task_cls, cfg)
            return 0
        from linscale.train.rundir import default_run_dir

        # The launcher names the run directory so that every worker agrees on it.
        run_dir = cfg.log.dir or str(default_run_dir(args.task))
        worker_argv = argv if cfg.log.dir else [*argv, f"--log.dir={run_dir}"]
        spawn(
            LaunchSpec(nproc_per_node=nproc, master_addr=args.master_addr, master_port=args.master_port),
            worker_argv,
            log_dir=f"{run_dir}/workers",
        )
        return 0
    except USER_ERRORS as e:
        return _error(str(e))
    except KeyboardInterrupt:
        return _error("interrupted")


def _worker(args: argparse.Namespace, rest: list[str]) -> int:
    """Inside a worker: train, and on failure record the error for the agent and exit hard."""
    from linscale.train.loop import run

    try:
        task_cls, cfg = prepare(args, rest)
        run(args.task, task_cls, cfg)
    except BaseException as e:  # noqa: BLE001 - every failure must reach the agent
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        rank = topology.detect().rank
        if is_consequence(e):
            # A peer died first; its own message says why.
            print(f"linscale: rank {rank} stopped: a peer process failed ({e.__class__.__name__})", file=sys.stderr)
        elif isinstance(e, USER_ERRORS):
            print(f"linscale: error on rank {rank}: {e}", file=sys.stderr, flush=True)
        else:
            print(f"linscale: rank {rank} failed:", file=sys.stderr, flush=True)
            traceback.print_exc()
        get_error_handler().record_exception(e)
        hard_exit(1)
    # The process group is already destroyed; skipping the interpreter's teardown avoids
    # an intermittent abort in gloo's threads at exit ("terminate called without an
    # active exception") that would turn a finished job into a failed one.
    hard_exit(0)
    return 0
