"""`linscale train TASK`: resolve everything, spawn the workers, train, summarise."""

from __future__ import annotations

import argparse

from linscale import config as lconfig
from linscale.cli.common import add_launch_args, check_launcher, error, launch_spec, role, run_as_worker
from linscale.runtime.launch import LaunchError, spawn
from linscale.task import TaskError, resolve_task

USER_ERRORS = (lconfig.ConfigError, TaskError, LaunchError, ValueError)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a task on all local devices",
        description="Train TASK: a built-in (gpt, image), a file (path/to/task.py:MyTask) or a module "
        "(pkg.mod:MyTask). Settings come from --config FILE.toml and --section.field=value "
        "overrides; --help-config lists them.",
    )
    p.add_argument("task", nargs="?", default="gpt", help="the task to train (default: gpt)")
    p.add_argument("--config", help="a TOML file of settings ([train], [optim], [task], ...)")
    p.add_argument("--help-config", action="store_true", help="list every setting with its default")
    p.add_argument(
        "--resume",
        metavar="auto|none|PATH",
        help="the same as --checkpoint.resume: continue from the newest complete checkpoint in the run's "
        "checkpoint folder (auto, the default), start afresh (none), or continue from PATH",
    )
    add_launch_args(p)
    p.set_defaults(func=run_cli)


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
    if args.resume:
        overrides.setdefault("checkpoint", {})["resume"] = args.resume
    cfg = lconfig.load_config(
        args.config, overrides, getattr(task_cls, "Config", None), getattr(task_cls, "defaults", None)
    )
    return task_cls, cfg


def run_cli(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    if args.help_config:
        _help_config(args, rest)
        return 0
    try:
        if role(args) == "worker":
            return _worker(args, rest)
        task_cls, cfg = prepare(args, rest)
        from linscale.runtime.device import local_device_count

        spec = launch_spec(args, args.nproc_per_node or local_device_count(cfg.runtime.device))
        check_launcher(spec)
        from linscale.train.loop import make_task, plan_run

        if spec.min_nodes == spec.max_nodes:  # an elastic job checks its batch once it knows its size
            plan_run(make_task(task_cls, cfg), cfg, spec.nproc_per_node * spec.max_nodes)
        if spec.nproc_per_node == 1 and not spec.multi_node and not spec.max_restarts:
            from linscale.train.loop import run

            run(args.task, task_cls, cfg)
            return 0
        from linscale.train.rundir import default_run_dir

        # The launcher names the run directory so that every worker agrees on it.
        run_dir = cfg.log.dir or str(default_run_dir(args.task))
        worker_argv = argv if cfg.log.dir else [*argv, f"--log.dir={run_dir}"]
        spawn(spec, worker_argv, log_dir=f"{run_dir}/workers")
        return 0
    except USER_ERRORS as e:
        return error(str(e))
    except KeyboardInterrupt:
        return error("interrupted")


def _worker(args: argparse.Namespace, rest: list[str]) -> int:
    from linscale.train.loop import run

    def body() -> None:
        task_cls, cfg = prepare(args, rest)
        run(args.task, task_cls, cfg)

    return run_as_worker(body, USER_ERRORS)
