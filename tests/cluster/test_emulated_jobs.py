"""The multi-node promises, proven on emulated nodes with their own addresses and shaped links:
the same losses as processes on one node, a killed node named by rank, and the doctor naming a
slow link. Needs root (network namespaces)."""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from dist.conftest import TINY_GPT

from .conftest import skip_reason

pytestmark = [pytest.mark.cluster, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]

ROOT = Path(__file__).resolve().parents[2]
COMMON = [*TINY_GPT, "--train.global_batch=8", "--train.log_every=1", "--optim.warmup_steps=2"]


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m["train_loss"] for m in map(json.loads, lines) if "train_loss" in m]


@pytest.fixture(scope="module")
def pair(make_cluster):
    c = make_cluster(2, "1gbit")
    try:
        yield c
    finally:
        c.down()


def test_two_emulated_nodes_follow_two_local_processes(pair, tmp_path):
    ref_dir, job_dir = tmp_path / "local", tmp_path / "nodes"
    ref = subprocess.run([sys.executable, "-m", "linscale", "train", "gpt", *COMMON, "--train.max_steps=12",
                          "--nproc-per-node=2", f"--log.dir={ref_dir}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=180)  # fmt: skip
    assert ref.returncode == 0, ref.stderr
    out, err = io.StringIO(), io.StringIO()
    from linscale.cluster.netns import node_command

    args = ["gpt", *COMMON, "--train.max_steps=12", "--nproc-per-node=1", f"--log.dir={job_dir}"]
    result = pair.run(lambda r: node_command("train", args, 2, r, pair.addr(0), 29700), timeout=180,
                      stdout=out, stderr=err)  # fmt: skip
    assert result.returncode == 0, out.getvalue() + err.getvalue()
    summary = json.loads((job_dir / "summary.json").read_text())
    assert (summary["world_size"], json.loads((job_dir / "run.json").read_text())["num_nodes"]) == (2, 2)
    got, want = losses(job_dir), losses(ref_dir)
    assert len(got) == len(want) == 12
    assert max(abs(a - b) / b for a, b in zip(got, want, strict=True)) < 1e-4


def test_a_killed_node_is_named_by_node_and_rank_within_the_timeout(pair, tmp_path):
    from linscale.cluster.netns import node_command

    args = ["gpt", *COMMON, "--train.max_steps=100000", "--train.eval_every=3", "--runtime.timeout=30",
            "--nproc-per-node=1", f"--log.dir={tmp_path}"]  # fmt: skip
    nodes = [pair.popen(r, node_command("train", args, 2, r, pair.addr(0), 29710), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True, start_new_session=True) for r in (0, 1)]  # fmt: skip
    try:
        head = nodes[0]
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in head.stdout], daemon=True).start()
        deadline = time.monotonic() + 120
        while "step 3: eval_loss" not in lines.get(timeout=max(0.1, deadline - time.monotonic())):
            pass
        pair.kill(1)
        killed = time.monotonic()
        _, err = head.communicate(timeout=90)
        assert time.monotonic() - killed < 30 + 10, "the job outlived runtime.timeout"
        assert head.returncode != 0
        assert f"peer lost: the connection to node 1 ({pair.addr(1)}, rank 1)" in err, err
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        pair.kill(0)
        pair.kill(1)


def test_doctor_names_the_node_whose_link_is_slowed_to_a_tenth(make_cluster, tmp_path):
    from linscale.cluster.netns import node_command

    trio = make_cluster(3, "1gbit")
    try:
        trio.slow(2, "100mbit")
        report = tmp_path / "doctor.json"
        args = ["--nproc-per-node=1", f"--output={report}", "--max-bytes=1048576", "--pair-bytes=2097152",
                "--budget=0.3"]  # fmt: skip
        out, err = io.StringIO(), io.StringIO()
        result = trio.run(lambda r: node_command("doctor", args, 3, r, trio.addr(0), 29720), timeout=240,
                          stdout=out, stderr=err, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})  # fmt: skip
        assert result.returncode == 0, out.getvalue() + err.getvalue()
        data = json.loads(report.read_text())
        assert [f.split(" (")[0] for f in data["findings"]] == ["slow link: node 2"], data["findings"]
        assert "slow link: node 2" in out.getvalue()
        pairs = {tuple(p["nodes"]): p["busbw"] for p in data["pairs"]}
        # The slowed node's pairs run near a tenth of the healthy pair.
        assert pairs[(0, 2)] < 0.3 * pairs[(0, 1)] and pairs[(1, 2)] < 0.3 * pairs[(0, 1)]
    finally:
        trio.down()
