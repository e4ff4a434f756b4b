"""The run directory: resolved config, versions and git revision, so a run explains itself."""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from linscale.config import RunConfig, to_dict, to_toml


def default_run_dir(task_spec: str) -> Path:
    name = Path(task_spec.split(":")[-1]).name.lower() if ":" in task_spec else task_spec
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def git_revision(path: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return "not a git checkout"
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "git not available"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("linscale", "torch", "numpy", "tqdm", "tensorboard"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_run_dir(run_dir: Path, cfg: RunConfig, task_spec: str, extra: dict[str, Any]) -> None:
    """Create the run directory with config.toml and run.json (rank 0 only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(f"# linscale train {task_spec}\n" + to_toml(to_dict(cfg)))
    info = {
        "task": task_spec,
        "argv": sys.argv,
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "git": {
            "cwd": git_revision(Path.cwd()),
            "linscale": git_revision(Path(__file__).resolve().parent),
        },
        **extra,
    }
    (run_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")
