"""The pre-timeout signal: the batch script's --signal, --requeue and requeue step, the time-limit
arithmetic, rank 0's request to requeue, and the launcher handing SIGUSR1 on to its workers.
No SLURM needed: the script runs under bash with stand-ins for srun and scontrol."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from linscale.cluster.slurm import (
    DEFAULT_SIGNAL_LEAD,
    REQUEUE_FILE_VAR,
    SlurmError,
    SlurmJob,
    render_script,
    requeue_after_signal,
    time_limit_seconds,
)
from linscale.runtime import launch


def _job(**kw) -> SlurmJob:
    base = dict(task="gpt", nodes=2, output="/logs/job-%j.out", workdir="/w", run_dir_prefix="/w/runs/gpt-slurm-",
                python="/venv/bin/python")  # fmt: skip
    return SlurmJob(**{**base, **kw})


def _sbatch_options(text: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]


# --- the time limit and the signal's lead ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 1800), ("10:30", 630), ("2:00:00", 7200), ("1-00", 86400), ("1-2:30", 95400), ("1-12:30:05", 131405),
     ("UNLIMITED", None), ("infinite", None)],
)  # fmt: skip
def test_time_limit_seconds(text, seconds):
    assert time_limit_seconds(text) == seconds


def test_script_asks_for_the_signal_and_may_be_requeued():
    opts = _sbatch_options(render_script(_job(time="2:00:00")))
    assert f"--signal=USR1@{DEFAULT_SIGNAL_LEAD}" in opts and "--requeue" in opts
    # A requeued run appends to the log of the earlier runs instead of starting it again.
    assert opts.index("--output=/logs/job-%j.out") + 1 == opts.index("--open-mode=append")


@pytest.mark.parametrize(
    ("time", "lead", "want"),
    [("", None, DEFAULT_SIGNAL_LEAD), ("UNLIMITED", None, DEFAULT_SIGNAL_LEAD), ("4", None, 60), ("1:00:00", None, 120),
     ("1:00:00", 600, 600), ("10", 300, 300), ("2:00:00", 0, 0)],
)  # fmt: skip
def test_signal_lead_defaults_to_two_minutes_or_a_quarter_of_a_short_limit(time, lead, want):
    job = _job(time=time, signal_lead=lead)
    assert job.lead == want
    opts = _sbatch_options(render_script(job))
    assert [o for o in opts if o.startswith("--signal")] == ([f"--signal=USR1@{want}"] if want else [])
    assert "--requeue" in opts  # also without the signal: SLURM requeues the job after a node failure


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"signal_lead": -1}, "--signal-lead must be 0..65535"), ({"signal_lead": 70000}, "--signal-lead must be"),
     ({"time": "4", "signal_lead": 121}, r"--signal-lead 121 with --time 4 \(240 s\): the checkpoint signal would "
      "come in the first half")],
)  # fmt: skip
def test_signal_leads_that_cannot_work(kw, match):
    with pytest.raises(SlurmError, match=match):
        _job(**kw)


def test_cli_refuses_a_lead_as_long_as_the_time_limit(tmp_path):
    res = subprocess.run([sys.executable, "-m", "linscale", "slurm", "gpt", "--nodes", "1", "--time", "2",
                          "--signal-lead", "120", "--script", str(tmp_path / "x.sbatch")], capture_output=True,
                         text=True, cwd=tmp_path, timeout=60)  # fmt: skip
    assert res.returncode == 2 and "--signal-lead 120 with --time 2 (120 s)" in res.stderr, res.stderr
    assert not (tmp_path / "x.sbatch").exists()


# --- the script's requeue step ----------------------------------------------------------------


def _run_script(tmp_path: Path, srun_body: str, scontrol_requeue_rc: int = 0, job: SlurmJob | None = None,
                **slurm_vars: str):  # fmt: skip
    """Run the script with an srun that runs `srun_body` (as rank 0 would) and an scontrol that
    notes its calls in scontrol.calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        '[ "$1 $2" = "show hostnames" ] && { echo node07; exit 0; }\n'
        f'[ "$1" = requeue ] && exit {scontrol_requeue_rc}\nexit 0\n'
    )
    (bin_dir / "srun").write_text(f"#!/bin/sh\n{srun_body}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    script = tmp_path / "job.sbatch"
    script.write_text(render_script(job or _job(nodes=1, workdir=str(work))))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_NTASKS": "1",
           "SLURM_JOB_NODELIST": "node07", **slurm_vars}  # fmt: skip
    res = subprocess.run(["bash", str(script)], env=env, cwd=work, capture_output=True, text=True, timeout=30)
    return res, (calls.read_text().splitlines() if calls.exists() else []), work


def test_script_requeues_the_job_after_the_launchers_end_when_rank_0_asked(tmp_path):
    res, calls, work = _run_script(tmp_path, f'echo "$SLURM_JOB_ID" > "${REQUEUE_FILE_VAR}"')
    assert res.returncode == 0, res.stderr
    assert calls[-1] == "requeue 4242"
    assert "linscale: requeueing job 4242: its next run resumes from the checkpoint" in res.stdout
    assert not list(work.iterdir())  # the request is removed


def test_script_ends_without_requeue_after_a_run_to_the_end(tmp_path):
    res, calls, work = _run_script(tmp_path, "exit 0")
    assert res.returncode == 0, res.stderr
    assert not any(c.startswith("requeue") for c in calls) and "requeueing" not in res.stdout


def test_script_does_not_requeue_a_failed_run(tmp_path):
    res, calls, _ = _run_script(tmp_path, f'echo "$SLURM_JOB_ID" > "${REQUEUE_FILE_VAR}"; exit 3')
    assert res.returncode == 3
    assert not any(c.startswith("requeue") for c in calls)


def test_script_ignores_a_request_left_by_another_job(tmp_path):
    res, calls, _ = _run_script(tmp_path, f'echo 17 > "${REQUEUE_FILE_VAR}"')
    assert res.returncode == 0 and not any(c.startswith("requeue") for c in calls)


def test_script_says_so_when_slurm_refuses_the_requeue(tmp_path):
    res, _, _ = _run_script(tmp_path, f'echo "$SLURM_JOB_ID" > "${REQUEUE_FILE_VAR}"', scontrol_requeue_rc=1)
    assert res.returncode == 1
    assert "SLURM did not requeue job 4242; to resume, submit the job again with --log.dir" in res.stderr


def test_script_of_a_requeued_run_says_it_resumes(tmp_path):
    res, _, _ = _run_script(tmp_path, "exit 0", SLURM_RESTART_COUNT="2")
    assert "linscale: job 4242 runs again (restart 2): training resumes from the newest checkpoint" in res.stdout
    res, _, _ = _run_script(tmp_path, "exit 0", SLURM_RESTART_COUNT="0")
    assert "runs again" not in res.stdout


@pytest.mark.parametrize("restarts", ["", "0", "1"])
def test_a_requeued_run_resumes_whatever_the_first_run_was_told(tmp_path, restarts):
    job = _job(nodes=1, workdir=str(tmp_path / "work"), train_args=("--resume", "none", "--train.max_steps=9"))
    slurm_vars = {"SLURM_RESTART_COUNT": restarts} if restarts else {}
    res, _, _ = _run_script(tmp_path, 'for a in "$@"; do echo "[$a]"; done', job=job, **slurm_vars)
    assert res.returncode == 0, res.stderr
    args = [line[1:-1] for line in res.stdout.splitlines() if line.startswith("[")]
    tail = ["--resume", "none", "--train.max_steps=9"] + (["--resume", "auto"] if restarts == "1" else [])
    assert args[-len(tail) :] == tail


# --- rank 0's request ---------------------------------------------------------------------------


@pytest.fixture
def said():
    return []


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """An scontrol on PATH that notes its arguments and exits with `fake_scontrol.rc`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    tool = bin_dir / "scontrol"

    def make(rc: int = 0, stderr: str = "") -> Path:
        tool.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "{stderr}" >&2\nexit {rc}\n')
        tool.chmod(0o755)
        return calls

    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return make


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    for var in ("SLURM_JOB_ID", "LINSCALE_REQUEUE", REQUEUE_FILE_VAR):
        monkeypatch.delenv(var, raising=False)


def test_outside_slurm_nothing_is_requeued(said, fake_scontrol):
    calls = fake_scontrol()
    assert requeue_after_signal(said.append) is False
    assert said == [] and not calls.exists()


def test_under_the_batch_script_rank_0_leaves_the_job_id_for_it(said, fake_scontrol, tmp_path, monkeypatch):
    calls = fake_scontrol()
    request = tmp_path / "request"
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv(REQUEUE_FILE_VAR, str(request))
    assert requeue_after_signal(said.append) is True
    assert request.read_text() == "42" and not calls.exists()  # the script calls scontrol, later
    assert said == ["job 42 goes back to the queue when this run has ended: its next run resumes from this checkpoint"]


def test_elsewhere_rank_0_requeues_the_job_itself(said, fake_scontrol, monkeypatch):
    calls = fake_scontrol()
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert requeue_after_signal(said.append) is True
    assert calls.read_text().split() == ["requeue", "42"]
    assert said == ["requeueing job 42: its next run resumes from this checkpoint"]


def test_a_refused_requeue_says_how_to_resume(said, fake_scontrol, monkeypatch):
    fake_scontrol(rc=1, stderr="Only batch jobs are accepted or processed")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert requeue_after_signal(said.append) is False
    assert said[-1].startswith("scontrol requeue 42 failed (Only batch jobs are accepted or processed")
    assert "submit the job again with --log.dir set to this run directory" in said[-1]


def test_linscale_requeue_0_keeps_the_job_out_of_the_queue(said, fake_scontrol, tmp_path, monkeypatch):
    calls = fake_scontrol()
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("LINSCALE_REQUEUE", "0")
    monkeypatch.setenv(REQUEUE_FILE_VAR, str(tmp_path / "request"))
    assert requeue_after_signal(said.append) is False
    assert not calls.exists() and not (tmp_path / "request").exists()
    assert said[0].startswith("LINSCALE_REQUEUE=0: job 42 is not requeued")


# --- the launcher hands SIGUSR1 on --------------------------------------------------------------


def _fake_proc(root: Path, pid: int, ppid: int, comm: str, argv: list[str]) -> None:
    d = root / str(pid)
    d.mkdir()
    (d / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 0 0\n")
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))


def test_worker_pids_are_the_launchers_children_that_run_linscale(tmp_path):
    py = "/venv/bin/python"
    _fake_proc(tmp_path, 100, 1, "python", [py, "-m", "linscale", "train", "gpt"])  # the launcher
    _fake_proc(tmp_path, 101, 100, "python", [py, "-m", "linscale", "train", "gpt"])  # workers
    _fake_proc(tmp_path, 102, 100, "pt_main (x) y", [py, "-m", "linscale", "train", "gpt"])
    _fake_proc(tmp_path, 103, 100, "linscale", ["/venv/bin/linscale", "train", "gpt"])  # the console script
    _fake_proc(tmp_path, 104, 100, "python", [py, "-c", "from multiprocessing..."])  # another child
    _fake_proc(tmp_path, 105, 101, "python", [py, "-m", "linscale", "train"])  # a worker's child
    _fake_proc(tmp_path, 106, 100, "sh", ["sh", "-c", "echo linscale"])  # linscale only as a word
    (tmp_path / "107").mkdir()  # gone while we looked
    (tmp_path / "self").mkdir()
    (tmp_path / "meminfo").write_text("")
    assert launch.worker_pids(100, tmp_path) == [101, 102, 103]
    assert launch.worker_pids(101, tmp_path) == [105]
    assert launch.worker_pids(999, tmp_path) == []


def _child(code: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *extra], start_new_session=True)


def test_forwarding_reaches_the_workers_and_no_other_child(tmp_path):
    got, ready = tmp_path / "got", tmp_path / "ready"
    record = (
        "import pathlib, signal, sys, time\n"
        f"signal.signal(signal.SIGUSR1, lambda s, f: pathlib.Path({str(got)!r}).write_text(str(s)))\n"
        f"pathlib.Path({str(ready)!r}).write_text('1')\n"
        "time.sleep(30)\n"
    )
    worker = _child(record, "-m", "linscale", "train")  # a cmdline like the agent's workers
    other = _child("import time; time.sleep(30)")  # would die of SIGUSR1
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert launch.forward_to_workers(signal.SIGUSR1) == [worker.pid]
        deadline = time.monotonic() + 10
        while not got.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert got.read_text() == str(int(signal.SIGUSR1))
        assert worker.poll() is None and other.poll() is None
    finally:
        for p in (worker, other):
            p.kill()
            p.wait()


def test_forwarding_handler_is_installed_while_the_agent_runs_and_restored_after():
    before = signal.getsignal(signal.SIGUSR1)
    with launch._Forwarding() as fwd:
        assert signal.getsignal(signal.SIGUSR1) == fwd._handle
        os.kill(os.getpid(), signal.SIGUSR1)  # the launcher lives on (no workers to tell)
    assert signal.getsignal(signal.SIGUSR1) == before

    seen = []
    thread = threading.Thread(target=lambda: seen.append(launch._Forwarding().__enter__()._previous))
    thread.start()
    thread.join()
    assert seen == [{}] and signal.getsignal(signal.SIGUSR1) == before  # signal.signal: main thread only
