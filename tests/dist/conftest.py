"""Running `linscale train` as a user would, with a timeout and a check for stray processes."""

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_GPT = [
    "--task.n_layer=2",
    "--task.d_model=64",
    "--task.n_head=4",
    "--task.block_size=32",
    "--task.corpus_mb=0.5",
    "--task.sample_tokens=0",
    "--runtime.precision=fp32",
    "--log.progress=false",
]


def _procs_with_tag(tag: str) -> list[int]:
    found = []
    for env_file in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"LINSCALE_TEST_TAG={tag}".encode() in env_file.read_bytes():
                found.append(int(env_file.parent.name))
        except OSError:
            continue
    return found


class Run:
    def __init__(self, proc: subprocess.CompletedProcess, run_dir: Path) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.run_dir = run_dir

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    def losses(self) -> list[float]:
        return [m["train_loss"] for m in self.metrics() if "train_loss" in m]


@pytest.fixture
def linscale(tmp_path):
    """Run `linscale ARGS...`; fails the test on timeout and if any process is left behind."""
    counter = iter(range(1000))

    def run(*args: str, timeout: float = 240, env: dict | None = None, cwd: Path | None = None) -> Run:
        tag = uuid.uuid4().hex
        run_dir = tmp_path / f"run{next(counter)}"
        full_env = {**os.environ, "LINSCALE_TEST_TAG": tag, "XDG_CACHE_HOME": str(tmp_path / "cache"), **(env or {})}
        full_env.pop("RANK", None), full_env.pop("LOCAL_RANK", None), full_env.pop("TORCHELASTIC_RUN_ID", None)
        cmd = [sys.executable, "-m", "linscale", *args]
        if args and args[0] == "train" and not any(a.startswith("--log.dir") for a in args):
            cmd.append(f"--log.dir={run_dir}")
        proc = subprocess.Popen(
            cmd,
            cwd=cwd or ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            for pid in _procs_with_tag(tag):
                os.kill(pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"linscale {' '.join(args)} did not finish in {timeout}s:\n{out}\n{err}")
        left = _procs_with_tag(tag)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left behind after linscale exited: {left}"
        return Run(subprocess.CompletedProcess(cmd, proc.returncode, out, err), run_dir)

    return run


def _rank_entry(rank: int, fn, world: int, store_path: str, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn, world: int, tmp_path: Path, *args, timeout: float = 120) -> None:
    """Run `fn(rank, world, *args)` in `world` gloo processes; fail on error or timeout, kill on exit.

    `fn` must be importable (defined at module level)."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(_rank_entry, args=(fn, world, str(tmp_path / "store"), args), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"{fn.__name__} did not finish within {timeout}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
