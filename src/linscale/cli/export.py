"""`linscale export RUN_DIR`: the trained model as one safetensors file plus its config.

The checkpoint's model shards are read in one process (DCP reshards them on load, whatever the
strategy and world size that wrote them), so the export needs no process group, and the result
loads on one device with `safetensors` alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's model as one safetensors file",
        description="Write the model of RUN_DIR's newest complete checkpoint (or --checkpoint PATH) as "
        "model.safetensors with config.json beside it, loadable on one device without linscale's runtime.",
    )
    p.add_argument("run_dir", help="a run directory written by `linscale train`")
    p.add_argument("--checkpoint", default="", help="a checkpoint folder to export (default: the newest complete one)")
    p.add_argument("--out", default="", help="output folder (default: RUN_DIR/export)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="dtype of the exported weights")
    p.set_defaults(func=run_cli)


def _error(msg: str) -> int:
    from linscale.cli.common import error

    return error(msg)


def load_run_config(run_dir: Path):
    """The task class and the resolved configuration a run was trained with."""
    from linscale import config as lconfig
    from linscale.task import resolve_task

    info_file, config_file = run_dir / "run.json", run_dir / "config.toml"
    if not info_file.is_file() or not config_file.is_file():
        raise lconfig.ConfigError(
            f"{run_dir} is not a run directory (no run.json and config.toml): give the folder `linscale train` "
            "wrote (its --log.dir, or runs/<task>-<time>)"
        )
    task_spec = json.loads(info_file.read_text())["task"]
    task_cls = resolve_task(task_spec)
    cfg = lconfig.load_config(config_file, {}, getattr(task_cls, "Config", None))
    return task_spec, task_cls, cfg


def export(run_dir: Path, checkpoint: str = "", out: Path | None = None, dtype: str = "fp32") -> dict:
    """Export and return the summary figures (raises ConfigError/CheckpointError on bad input)."""
    import torch
    from safetensors.torch import save_model

    from linscale.train import checkpoint as ckpt
    from linscale.train.loop import make_task

    t0 = time.perf_counter()
    task_spec, task_cls, cfg = load_run_config(run_dir)
    root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    path = ckpt.resolve_resume(checkpoint or str(root if root.is_dir() else run_dir), root, _warn, "--checkpoint")
    assert path is not None
    meta = ckpt.read_marker(path)
    task = make_task(task_cls, cfg)
    model = task.build_model()
    state = model.state_dict()
    ckpt.load_model_state(path, state)  # in place, model keys only
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model.to(want if dtype != "fp32" else torch.float32)
    out = out or run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    tmp = weights.with_name(".model.safetensors.tmp")
    # save_model drops the second name of a tied weight and records nothing it cannot load back.
    save_model(model, str(tmp), metadata={"format": "pt", "linscale_task": task_spec, "step": str(meta["step"])})
    tmp.replace(weights)
    model_cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
    description = {
        "task": task_spec,
        "task_config": dataclasses.asdict(cfg.task) if cfg.task is not None else None,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_config": dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else None,
        "dtype": dtype,
        "num_params": sum(p.numel() for p in model.parameters()),
        "checkpoint": str(path),
        "step": meta["step"],
        "samples_consumed": meta["samples_consumed"],
    }
    (out / "config.json").write_text(json.dumps(description, indent=2) + "\n")
    return {
        "checkpoint": str(path),
        "step": meta["step"],
        "weights": str(weights),
        "weights_mb": weights.stat().st_size / 2**20,
        "num_params": description["num_params"],
        "dtype": dtype,
        "export_runtime": time.perf_counter() - t0,
    }


def _warn(text: str) -> None:
    print(f"linscale: warning: {text}", flush=True)


def run_cli(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    from linscale import config as lconfig
    from linscale.task import TaskError
    from linscale.train.checkpoint import CheckpointError
    from linscale.train.metrics import format_summary

    if rest:
        return _error(f"unexpected arguments: {' '.join(rest)}")
    try:
        summary = export(Path(args.run_dir), args.checkpoint, Path(args.out) if args.out else None, args.dtype)
    except (lconfig.ConfigError, CheckpointError, TaskError, ValueError) as e:
        return _error(str(e))
    print(format_summary(summary, "export"), flush=True)
    return 0
