"""Running `linscale train` as a user would, with a timeout and a check for stray processes."""

import contextlib
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
    # Tests of other things skip the run's own prediction (tracing, host rates and the network
    # probe, about a second a run); tests/dist/test_prediction.py turns it back on.
    "--runtime.profile=off",
]


def _procs_with_tag(tag: str) -> list[int]:
    from linscale.cluster.netns import pids_with_env

    return pids_with_env("LINSCALE_TEST_TAG", tag)


def files_of(out: Path) -> dict[str, bytes]:
    """Every file of a `linscale preprocess` output except index.json, the summary and worker logs."""
    from linscale.data.preprocess import SUMMARY_FILE

    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("index.json", SUMMARY_FILE) and ".workers" not in p.parts
    }


def index_without_timing(out: Path) -> dict:
    """A preprocess output's index.json without its run time."""
    index = json.loads((out / "index.json").read_text())
    del index["stats"]["seconds"]
    return index


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


class Started:
    """A `linscale` command running in the background; `finish()` waits, checks and cleans up."""

    def __init__(
        self, args: tuple[str, ...], tmp_path: Path, run_dir: Path, env: dict | None, cwd: Path | None, timeout: float
    ) -> None:
        self.args, self.run_dir, self.timeout = args, run_dir, timeout
        self.tag = uuid.uuid4().hex
        full_env = {
            **os.environ,
            "LINSCALE_TEST_TAG": self.tag,
            "XDG_CACHE_HOME": str(tmp_path / "cache"),
            **(env or {}),
        }
        for var in ("RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
            full_env.pop(var, None)
        self.cmd = [sys.executable, "-m", "linscale", *args]
        if args and args[0] == "train" and not any(a.startswith("--log.dir") for a in args):
            self.cmd.append(f"--log.dir={run_dir}")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=cwd or ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in _procs_with_tag(self.tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def finish(self) -> Run:
        try:
            out, err = self.proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"linscale {' '.join(self.args)} did not finish in {self.timeout}s:\n{out}\n{err}")
        left = _procs_with_tag(self.tag)
        self.kill()
        assert not left, f"processes left behind after linscale exited: {left}"
        return Run(subprocess.CompletedProcess(self.cmd, self.proc.returncode, out, err), self.run_dir)


@pytest.fixture
def linscale_bg(tmp_path):
    """Start `linscale ARGS...` in the background: `start(*args) -> Started`; all are killed at the end."""
    counter = iter(range(1000))
    started: list[Started] = []

    def start(
        *args: str, timeout: float = 240, env: dict | None = None, cwd: Path | None = None, run_dir: Path | None = None
    ) -> Started:
        s = Started(args, tmp_path, run_dir or tmp_path / f"bg{next(counter)}", env, cwd, timeout)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


@pytest.fixture
def linscale(linscale_bg):
    """Run `linscale ARGS...`; fails the test on timeout and if any process is left behind."""

    def run(*args: str, timeout: float = 240, env: dict | None = None, cwd: Path | None = None) -> Run:
        return linscale_bg(*args, timeout=timeout, env=env, cwd=cwd).finish()

    return run


def _rank_entry(rank: int, fn, world: int, store_path: str, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        import gc

        # Free DDP's reference cycles while the group is alive: freed after it, gloo's threads
        # can abort the process at exit ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def spawn_ranks(fn, world: int, tmp_path: Path, *args, timeout: float = 120) -> None:
    """Run `fn(rank, world, *args)` in `world` gloo processes; fail on error or timeout, kill on exit.

    `fn` must be importable (defined at module level)."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _rank_entry, args=(fn, world, str(tmp_path / "store"), args), nprocs=world, join=False, start_method="spawn"
    )
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
