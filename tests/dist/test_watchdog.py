"""The collective watchdog: a rank stuck outside a collective ends the job with a report naming it.

The multi-process tests run their ranks as plain subprocesses (their real exit code is the point)
with output in files under tmp_path; the stuck rank blocks forever rather than for a while."""

import contextlib
import datetime
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from linscale.runtime.watchdog import Watchdog, classify, default_grace, format_report

from .conftest import ROOT

pytestmark = pytest.mark.dist

GROUP_TIMEOUT = datetime.timedelta(seconds=60)  # longer than any watchdog timeout here: gloo does not fire first


def _stuck_forever() -> None:
    threading.Event().wait()


def _env_store_group(rank: int, world: int) -> None:
    """env:// as under torchrun: the store is the test's TCPStore, wrapped in torch's PrefixStore."""
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=GROUP_TIMEOUT)


def stuck_rank(rank: int, world: int, store_path: str, out_dir: str, timeout_s: str) -> None:
    """Every rank finishes step 3; at step 4 rank 1 never reaches the loss all-reduce."""
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=GROUP_TIMEOUT)  # fmt: skip
    store = dist.distributed_c10d._get_default_store()
    # As in the training loop, the block is inside `with`: when a peer's exit breaks this rank's
    # collective, the exception waits in __exit__ for the watchdog's own exit.
    with Watchdog(float(timeout_s), rank, world, store, poll_s=0.2) as wd:
        wd.phase(3, "loss all-reduce")
        dist.all_reduce(torch.ones(1))
        with open(os.path.join(out_dir, f"ready{rank}"), "w") as f:
            f.write(repr(time.time()))
        wd.phase(4, "forward/backward")
        if rank == 1:
            _stuck_forever()
        wd.phase(4, "loss all-reduce")
        dist.all_reduce(torch.ones(1))
        print("all-reduce finished", flush=True)  # never reached


def busy_rank(rank: int, world: int, timeout_s: str) -> None:
    """Fast steps for two timeout periods, then a long unwatched phase: no alarm, and stop() is prompt."""
    _env_store_group(rank, world)
    timeout, fired, stream = float(timeout_s), [], io.StringIO()
    store = dist.distributed_c10d._get_default_store()
    wd = Watchdog(timeout, rank, world, store, poll_s=0.2, stream=stream, exit_fn=fired.append).start()
    end, step = time.monotonic() + 2 * timeout, 0
    while True:
        wd.phase(step, "forward/backward and gradient all-reduce")
        x = torch.randn(64, 64)
        dist.all_reduce(x @ x)
        wd.phase(step, "loss all-reduce")
        go = torch.tensor([float(time.monotonic() < end)])
        dist.all_reduce(go, op=dist.ReduceOp.MIN)
        if not go.item():
            break
        step += 1
    wd.phase(step, "checkpoint load", watched=False)
    threading.Event().wait(1.25 * timeout)  # a phase longer than the timeout and a poll, not timed
    wd.phase(step, "barrier")
    dist.barrier()
    t0 = time.monotonic()
    wd.stop()
    stop_s = time.monotonic() - t0
    wd.stop()  # idempotent
    print(json.dumps({"steps": step, "stop_s": stop_s, "fired": fired, "output": stream.getvalue(),
                      "alive": wd._thread.is_alive()}), flush=True)  # fmt: skip
    dist.destroy_process_group()
    os._exit(0)  # skip the interpreter's teardown (gloo's threads can abort it)


def _run_ranks(entry: str, world: int, tmp_path, args: tuple, env: dict, deadline_s: float) -> tuple[list[int], float]:
    """Run `entry(rank, world, *args)` in `world` processes; (exit codes, time.time() when all ended)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "RANK", "LOCAL_", "WORLD"))}
    procs = []
    try:
        for rank in range(world):
            code = f"import sys; from tests.dist.test_watchdog import {entry}; {entry}({rank}, {world}, *sys.argv[1:])"
            with open(tmp_path / f"rank{rank}.log", "w") as log:
                rank_env = {**base, "RANK": str(rank), **{k: v.format(rank=rank) for k, v in env.items()}}
                cmd = [sys.executable, "-c", code, *map(str, args)]
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=rank_env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))  # fmt: skip
        end = time.monotonic() + deadline_s
        for p in procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                logs = "\n".join((tmp_path / f"rank{r}.log").read_text() for r in range(world))
                pytest.fail(f"{entry} did not end within {deadline_s} s:\n{logs}")
        return [p.returncode for p in procs], time.time()
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_a_rank_stuck_outside_the_collective_is_named(tmp_path):
    timeout, world = 3.0, 3
    env = {"TORCHELASTIC_ERROR_FILE": str(tmp_path / "error{rank}.json")}
    codes, ended = _run_ranks("stuck_rank", world, tmp_path, (tmp_path / "store", tmp_path, timeout), env, 60)
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(world)]
    everything = "\n".join(logs)
    assert codes == [3] * world, everything
    ready = max(float((tmp_path / f"ready{r}").read_text()) for r in range(world))
    assert timeout <= ended - ready < 3 * timeout, everything  # timeout + grace (2 s) + slack for exiting

    # Rank 1's own phase overruns too, so any rank may raise the alarm; its report speaks for a waiting rank.
    reports = [r for r in range(world) if "watchdog raised the alarm" not in logs[r]]
    assert len(reports) == 1, everything
    report = logs[reports[0]]
    assert re.fullmatch(
        r'linscale: rank [02] waited [0-9.]+ s \(runtime.timeout=3\) in "loss all-reduce" at step 4; '
        r'ranks that did not arrive: 1 \(step 4, "forward/backward", [0-9.]+ s\)',
        report.splitlines()[0],
    ), report
    # The raiser's phase had lasted the timeout: nothing fired early.
    assert max(float(s) for s in re.findall(r", ([0-9.]+) s in it", report)) >= timeout, report
    assert "_stuck_forever" in report  # the report carries the stuck rank's stack
    assert "_stuck_forever" in logs[1] and 'step 4, "forward/backward"' in logs[1], logs[1]
    for r in range(world):
        assert "step 4" in logs[r] and "Traceback" not in logs[r], logs[r]
        assert "all-reduce finished" not in logs[r]
        error = json.loads((tmp_path / f"error{r}.json").read_text())
        assert error["message"]["message"].startswith("WatchdogTimeout: linscale: rank"), error


def test_no_false_alarm_and_a_prompt_stop(tmp_path):
    timeout, world = 2.0, 2
    server = dist.TCPStore("127.0.0.1", 0, world, True, timeout=GROUP_TIMEOUT, wait_for_workers=False)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port), "WORLD_SIZE": str(world),
           "TORCHELASTIC_USE_AGENT_STORE": "True"}  # fmt: skip
    codes, _ = _run_ranks("busy_rank", world, tmp_path, (timeout,), env, 60)
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(world)]
    assert codes == [0] * world, "\n".join(logs)
    for log in logs:
        result = json.loads(log.strip().splitlines()[-1])
        assert result["steps"] > 2 and result["fired"] == [] and result["output"] == "", log
        assert not result["alive"] and result["stop_s"] < 5 * 0.2, result  # within a few polls


# The report and the firing path without processes.


def _status(rank: int, step: int, seq: int, phase: str, seconds: float = 1.0) -> dict:
    return {"rank": rank, "step": step, "phase": phase, "seq": seq, "seconds": seconds, "host": "h", "pid": 100 + rank,
            "stack": f'  File "train.py", line 1, in where_{rank}\n'}  # fmt: skip


def test_classify_and_format():
    statuses = {
        0: _status(0, 7, 30, "loss all-reduce", 5.04),
        1: _status(1, 7, 29, "forward/backward and gradient all-reduce", 6.2),
        2: _status(2, 6, 31, "evaluation"),
        3: None,
        4: _status(4, 7, 30, "loss all-reduce"),
    }
    assert classify(statuses) == ([1, 2], [3])
    assert classify({0: _status(0, 1, 2, "x"), 1: _status(1, 1, 2, "x")}) == ([], [])
    report = format_report(0, 5, statuses)
    first, *rest = report.splitlines()
    assert first == (
        'linscale: rank 0 waited 5.0 s (runtime.timeout=5) in "loss all-reduce" at step 7; ranks that did not arrive: '
        '1 (step 7, "forward/backward and gradient all-reduce", 6.2 s), 2 (step 6, "evaluation", 1.0 s), '
        "ranks that gave no answer: 3"
    )
    heads = [line for line in rest if line.startswith("rank ")]
    assert heads[1] == 'rank 1 (host h, pid 101) at step 7, "forward/backward and gradient all-reduce", 6.2 s in it, ' \
        "did not arrive; its stack:"  # fmt: skip
    assert [h.split()[1] for h in heads] == ["0", "1", "2", "4"] and "in where_4" in report
    same = format_report(1, 2.5, {0: _status(0, 1, 2, "x"), 1: _status(1, 1, 2, "x")})
    assert "runtime.timeout=2.5" in same and "every rank that answered is at the same point" in same
    assert default_grace(3) == 2 and default_grace(12) == 6 and default_grace(300) == 10


def _fire_alone(store, **kw) -> tuple[str, list[int]]:
    stream, exits = io.StringIO(), []
    wd = Watchdog(0.3, 0, 2, store, poll_s=0.05, grace_s=0.5, stream=stream, exit_fn=exits.append, **kw)
    with wd:
        wd.phase(2, "loss all-reduce")
        wd._thread.join(10)  # the thread ends after calling exit_fn
    return stream.getvalue(), exits


def test_a_dead_peer_gives_no_answer(tmp_path):
    out, exits = _fire_alone(dist.FileStore(str(tmp_path / "store"), 1), exit_code=5)
    assert exits == [5]
    assert re.match(
        r'linscale: rank 0 waited 0\.[3-9] s \(runtime.timeout=0.3\) in "loss all-reduce" at step 2; '
        r"every rank that answered is at the same point, ranks that gave no answer: 1\n",
        out,
    ), out
    assert "in _fire_alone" in out  # the training thread's stack


class _LostStore:
    def clone(self):
        return self

    def set_timeout(self, timeout):
        pass

    def __getattr__(self, name):
        def fail(*args):
            raise ConnectionError("connection refused")

        return fail


def test_a_lost_store_still_reports():
    out, exits = _fire_alone(_LostStore())
    assert exits == [3]
    first = out.splitlines()[0]
    assert "ranks that gave no answer: 1 (the store failed: ConnectionError: connection refused)" in first, out


def test_the_alarm_of_another_rank(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    stream, exits = io.StringIO(), []
    wd = Watchdog(60, 0, 2, store, poll_s=0.05, grace_s=0.5, stream=stream, exit_fn=exits.append)
    key = wd._key
    with wd:
        wd.phase(9, "evaluation")
        store.set(key + "done", "1")
        store.set(key + "alarm", "1")
        wd._thread.join(10)
    assert exits == [3]
    assert stream.getvalue().startswith(
        "linscale: rank 0 stopped: rank 1's watchdog raised the alarm (a watched phase lasted longer than "
        'runtime.timeout=60); rank 0 was at step 9, "evaluation", '
    )
    assert json.loads(store.get(key + "status/0"))["phase"] == "evaluation"


def test_a_failed_loop_past_the_timeout_still_reports(tmp_path):
    """The collective's own timeout may end the loop before the watchdog's next poll: `__exit__` reports."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    results = []
    for failed in (False, True):
        stream, exits = io.StringIO(), []
        wd = Watchdog(0.2, 0, 1, store, poll_s=60, grace_s=0.5, stream=stream, exit_fn=exits.append).start()
        wd.phase(1, "loss all-reduce")
        threading.Event().wait(0.3)  # the phase outlasts the timeout; the thread sleeps for a minute
        t0 = time.monotonic()
        wd.stop(failed=failed)
        results.append((exits, stream.getvalue(), time.monotonic() - t0, wd._thread.is_alive()))
    (exits, out, stop_s, alive), (exits_failed, out_failed, _, alive_failed) = results
    assert exits == [] and out == "" and stop_s < 5 and not alive  # a finished loop: no report, no wait
    assert exits_failed == [3] and not alive_failed
    assert out_failed.startswith("linscale: rank 0 waited 0.") and 'in "loss all-reduce" at step 1' in out_failed


def test_a_training_job_with_a_stuck_rank_reports_it_and_ends(linscale):
    """End to end: rank 1 of `linscale train` never reaches step 3's collective."""
    from .conftest import TINY_GPT

    run = linscale("train", "gpt", *TINY_GPT, "--train.max_steps=20", "--train.eval_every=0", "--runtime.timeout=5",
                   "--nproc-per-node", "2", env={"LINSCALE_TEST_STUCK_AT_STEP": "1:3"}, timeout=120)  # fmt: skip
    assert run.returncode == 2, run.output
    # The first line of the report, and the launcher's summary of it, name the rank that did not arrive.
    assert 'in "forward/backward and gradient reduction" at step 3; ranks that did not arrive: 1 (step 3' in run.output
    assert "failed with exit code 3: WatchdogTimeout" in run.stderr
    # Every rank printed its step, what it was doing and its stack: the stuck one waits in the test hook.
    assert "rank 1 (host" in run.output and '"test hook: stuck before the step"' in run.output
    assert "threading.Event().wait()" in run.output
    assert "run_backward" in run.output  # rank 0 waits inside backward, in DDP's gradient all-reduce
