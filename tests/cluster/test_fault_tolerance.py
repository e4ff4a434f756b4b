"""Jobs that lose time or nodes and still finish: a SLURM job signalled before its time limit
checkpoints, requeues itself and resumes; an elastic job that loses a node goes on with the other.
Real SLURM daemons and network namespaces: needs root, slurm-wlm + munge, iproute2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from dist.conftest import TINY_GPT

from linscale.train import checkpoint as ckptmod

from .conftest import skip_reason
from .slurm_cluster import read_summary, slurm_cluster, start_tagged

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]


def wait_until(what: str, ready: Callable[[], bool], timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not alive():
            pytest.fail(f"the job ended while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


def errors(log: str) -> list[str]:
    """The log's error lines, but for slurmstepd's note that the job was cancelled to be requeued."""
    lines = [line for line in log.splitlines() if "error" in line.lower() or "Traceback" in line]
    return [line for line in lines if "DUE TO JOB REQUEUE" not in line]


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [m["step"] for m in lines if "train_loss" in m]


# --------------------------------------------------------------------------------------------
# SLURM: the pre-timeout signal


@pytest.fixture(scope="module")
def slurm():
    with slurm_cluster() as cluster:
        yield cluster


def test_slurm_signal_checkpoints_requeues_and_the_next_run_resumes(slurm, tmp_path):
    """`scancel --signal=USR1` is what `#SBATCH --signal=USR1@SECONDS` does before the time
    limit: SLURM signals the job step's processes, the launcher hands the signal to its workers,
    they checkpoint and stop, rank 0 requeues the job, and its next run resumes in the same run
    directory and finishes."""
    env = {**slurm.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    steps = 200
    run = start_tagged(
        [sys.executable, "-m", "linscale", "slurm", "gpt", "--nodes", "1", "--nproc-per-node", "2", "--time", "10",
         "--submit", "--wait", *TINY_GPT, f"--train.max_steps={steps}", "--train.log_every=5",
         "--train.eval_every=0", "--optim.warmup_steps=5", "--train.global_batch=16", "--checkpoint.interval=100000",
         "--checkpoint.keep_last=0"],
        env=env,
        cwd=tmp_path,
    )  # fmt: skip
    job = ""
    try:
        for line in run.proc.stdout:
            if m := re.search(r"submitted job (\d+)", line):
                job = m[1]
                break
        assert job, run.finish(timeout=30).output
        run_dir = tmp_path / "runs" / f"gpt-slurm-{job}"
        log = tmp_path / "runs" / "slurm" / f"linscale-gpt-{job}.out"
        wait_until("the first logged step", lambda: logged_steps(run_dir), 90, lambda: run.proc.poll() is None)
        signalled = slurm.command("scancel", "--signal=USR1", job)
        assert signalled.returncode == 0, signalled.stderr
        res = run.finish(timeout=150)
    finally:
        if run.proc.poll() is None and job:
            slurm.command("scancel", job)
    text = log.read_text()
    assert res.returncode == 0, res.output + text
    assert "linscale: launcher got SIGUSR1: handed on to 2 worker(s)" in text, text
    stop = re.search(r"step (\d+): signal SIGUSR1 received: saving a checkpoint and stopping", text)
    assert stop, text
    at = int(stop[1])
    assert 0 < at < steps and at % 5 == 0  # at a loss reduction (train.log_every)
    first, requeued, second = text.partition(
        f"linscale: requeueing job {job}: its next run resumes from the checkpoint"
    )
    assert requeued, text
    # The first run ended cleanly: every launcher and worker, then the batch script requeued the job.
    assert f"job {job} goes back to the queue when this run has ended" in first
    assert not errors(first), first
    assert f"job {job} runs again (restart 1)" in second  # SLURM_RESTART_COUNT in the second run
    stop_ckpt = ckptmod.step_dir(run_dir / "checkpoints", at)
    assert ckptmod.verify(stop_ckpt)["step"] == at
    assert f"resumed from {stop_ckpt} (step {at}," in second
    summary = read_summary(run_dir)
    assert (summary["global_step"], summary["resumed_from_step"]) == (steps, at)
    assert "stopped_by" not in summary  # the second run ran to the end
    assert logged_steps(run_dir) == list(range(5, steps + 1, 5))  # each step logged once over both runs
    assert not errors(second), second


# --------------------------------------------------------------------------------------------
# Elastic: a node that disappears


@pytest.mark.cluster
@pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
def test_elastic_job_that_loses_a_node_finishes_on_the_other(make_cluster, tmp_path):
    """`--nnodes 1:2 --max-restarts 1`: node 1 (its launcher and its worker) is killed mid-run;
    node 0, which hosts the rendezvous, restarts its worker alone, which resumes from the newest
    checkpoint with the same global batch (twice the accumulation) and finishes the run."""
    from linscale.cluster.netns import pids_with_env

    pair = make_cluster(2, "1gbit")
    run_dir = tmp_path / "run"
    steps, every = 40, 5
    args = ["gpt", *TINY_GPT, "--train.global_batch=8", "--train.log_every=1", "--train.eval_every=0",
            "--optim.warmup_steps=2", f"--train.max_steps={steps}", f"--checkpoint.interval={every}",
            "--checkpoint.keep_last=0", "--runtime.threads_per_proc=1", "--nproc-per-node=1", "--nnodes=1:2",
            "--max-restarts=1", f"--rdzv-endpoint={pair.addr(0)}:29740", f"--log.dir={run_dir}"]  # fmt: skip
    tag = f"elastic-{tmp_path.name}"
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "LINSCALE_TEST_TAG": tag}
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    nodes = []
    try:
        for r in (0, 1):
            with open(logs[r], "w") as out:
                nodes.append(pair.popen(r, [sys.executable, "-m", "linscale", "train", *args], env=env,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True))  # fmt: skip
        head = nodes[0]
        # Past the first checkpoint with both nodes in the job, then node 1 disappears.
        wait_until(f"step {every + 2}", lambda: max(logged_steps(run_dir), default=0) >= every + 2, 120,
                   lambda: head.poll() is None and nodes[1].poll() is None)  # fmt: skip
        killed_at = time.monotonic()
        pair.kill(1)
        head.wait(timeout=120)
        recovery = time.monotonic() - killed_at
        text = logs[0].read_text()
        assert head.returncode == 0, text
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        pair.kill(0)
        pair.kill(1)
        left = pids_with_env("LINSCALE_TEST_TAG", tag)
        pair.down()
    assert not left, f"processes left behind: {left}"
    # torch's rendezvous defaults alone would wait 45 s (a dead node after 15 s, a last call of 30 s).
    assert recovery < 45, f"node 0 took {recovery:.0f}s to finish after node 1 was lost"
    assert "linscale: restart 1 of 1 after a failed worker or node" in text, text
    # The same global batch on half the processes: each accumulates twice as many micro-batches.
    banners = re.findall(r"(\d+) x cpu .* global batch (\d+) = micro (\d+) x accum (\d+) x replicas (\d+)", text)
    assert banners == [("2", "8", "4", "1", "2"), ("1", "8", "4", "2", "1")], text
    second = text[text.rindex("linscale: restart 1 of 1") :]
    resumed = re.search(r"resumed from \S+ \(step (\d+), (\d+) samples consumed, written by 2 process", second)
    assert resumed, second
    at = int(resumed[1])
    assert at >= every and at % every == 0 and int(resumed[2]) == at * 8
    summary = read_summary(run_dir)
    assert (summary["world_size"], summary["global_step"], summary["resumed_from_step"]) == (1, steps, at)
    run = json.loads((run_dir / "run.json").read_text())
    assert (run["world_size"], run["num_nodes"], run["batch"]["global"], run["batch"]["accum"]) == (1, 1, 8, 2)
    assert logged_steps(run_dir) == list(range(1, steps + 1))  # steps after the checkpoint logged once, again
