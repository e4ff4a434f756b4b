"""A watchdog that ends the job when a collective does not finish within `runtime.timeout`.

The training thread tells the watchdog what it is doing with `phase(step, what)`: one attribute
assignment, cheap enough to call several times per step. A daemon thread wakes every `poll_s`
and looks at it. The work happens in that thread because the training thread cannot do it:
gloo's collectives block it in C++ (with the GIL released), and a rank that never reaches the
collective is busy elsewhere. The ranks talk through the job's store (a clone of it, so its own
TCP connection), which is independent of the collective's connections and still answers while
those wait.

When a watched phase has lasted `timeout_s`, the rank fires: it writes its status (step, phase,
seconds in it, host, pid and the training thread's Python stack) under its own key, claims the
alarm key, waits up to `grace_s` for every other rank's status and prints one report naming the
ranks that did not arrive (behind the most advanced rank: not waiting in the same collective)
and those that gave no answer (dead, or frozen with the GIL held). Every other rank sees the
alarm at its next poll, writes its status, prints its own step, phase and stack, and waits for
the report before leaving, so that its exit does not break the reporting rank's collective
first. Each rank records a `WatchdogTimeout` for the elastic agent and exits with `exit_code`.
Any rank may raise the alarm, the one that never arrived included (its own phase overruns too);
the report's first line speaks for a rank waiting at the front.

Use it as a context manager around the training loop: when another rank's exit breaks this
rank's collective, the exception stops in `__exit__`, which waits for the watchdog's own exit
instead of letting a second, misleading error out first. The comparison of progress relies on
every rank calling `phase()` in the same sequence.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO

PREFIX = "linscale/watchdog"


class WatchdogTimeout(RuntimeError):
    """A collective did not finish within runtime.timeout (recorded for the elastic agent)."""


def default_grace(timeout_s: float) -> float:
    return min(10.0, max(2.0, timeout_s / 2))


def classify(statuses: dict[int, dict[str, Any] | None]) -> tuple[list[int], list[int]]:
    """(ranks that did not arrive, ranks that gave no answer) from each rank's status or None."""
    answered = {r: s for r, s in statuses.items() if s is not None}
    front = max(((s["step"], s["seq"]) for s in answered.values()), default=None)
    behind = sorted(r for r, s in answered.items() if (s["step"], s["seq"]) < front)
    return behind, sorted(r for r, s in statuses.items() if s is None)


def _where(s: dict[str, Any]) -> str:
    return f'step {s["step"]}, "{s["phase"]}", {s["seconds"]:.1f} s'


def _block(s: dict[str, Any], note: str = "") -> str:
    head = f"rank {s['rank']} (host {s['host']}, pid {s['pid']}) at {_where(s)} in it{note}; its stack:"
    return head + "\n" + s["stack"].rstrip("\n")


def format_report(rank: int, timeout_s: float, statuses: dict[int, dict[str, Any] | None], note: str = "") -> str:
    """Rank `rank`'s report: one summary line, then every answering rank's status and stack.

    The summary speaks for a rank at the front (waiting in the collective): `rank` if it is one,
    else the one that waited longest; the rank that never arrived often times out first."""
    behind, missing = classify(statuses)
    answered = [s for _, s in sorted(statuses.items()) if s is not None]
    front = [s for s in answered if s["rank"] not in behind]
    head = next((s for s in front if s["rank"] == rank), None) or max(front, key=lambda s: s["seconds"])
    first = f"linscale: rank {head['rank']} waited {head['seconds']:.1f} s (runtime.timeout={timeout_s:g}) in "
    first += f'"{head["phase"]}" at step {head["step"]}; '
    if behind:
        first += "ranks that did not arrive: " + ", ".join(f"{r} ({_where(statuses[r])})" for r in behind)  # type: ignore[arg-type]
    else:
        first += "every rank that answered is at the same point"
    if missing:
        first += ", ranks that gave no answer: " + ", ".join(map(str, missing))
    blocks = [_block(s, ", did not arrive" if s["rank"] in behind else "") for s in answered]
    return "\n".join([first + note, *blocks])


class Watchdog:
    _made = 0  # watchdogs made by this process; every rank makes them in the same order

    def __init__(
        self,
        timeout_s: float,
        rank: int,
        world_size: int,
        store: Any,
        *,
        poll_s: float = 1.0,
        grace_s: float | None = None,
        exit_code: int = 3,
        stream: TextIO | None = None,
        exit_fn: Callable[[int], Any] = os._exit,
    ) -> None:
        self.timeout_s, self.rank, self.world_size, self.poll_s = float(timeout_s), rank, world_size, poll_s
        self.grace_s = default_grace(timeout_s) if grace_s is None else grace_s
        self.exit_code, self.stream, self.exit_fn = exit_code, stream, exit_fn
        try:  # a connection of our own: the training thread may be blocked inside the store
            self._store = store.clone()
            self._store.set_timeout(datetime.timedelta(seconds=max(self.grace_s, poll_s)))
        except (AttributeError, RuntimeError):
            self._store = store
        Watchdog._made += 1
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # the agent's store outlives restarts
        self._key = f"{PREFIX}/{restart}/{Watchdog._made}/"
        self._state: tuple[int, str, bool, int, float] = (-1, "starting", False, 0, time.monotonic())
        self._training_thread = threading.get_ident()
        self._stopping = threading.Event()
        self._failed = False
        self._store_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="linscale-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def phase(self, step: int, what: str, watched: bool = True) -> None:
        """The training thread starts `what` in `step`; a watched phase may last `timeout_s`."""
        self._state = (step, what, watched, self._state[3] + 1, time.monotonic())

    def stop(self, failed: bool = False) -> None:
        """Stop and join the thread. `failed`: the training loop is ending with an exception (a
        collective's own timeout, say); if the phase has overrun or the alarm is raised, the
        thread reports and exits the process before this returns."""
        self._failed = failed
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.grace_s + 3 * self.poll_s + 5)

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.stop(failed=exc_type is not None)

    # The thread.

    def _run(self) -> None:
        while True:
            stopping = self._stopping.wait(self.poll_s)
            if stopping and not self._failed:
                return
            _, _, watched, _, since = self._state
            if watched and time.monotonic() - since >= self.timeout_s:
                return self._fire()
            raiser = self._alarm()
            if raiser is not None:
                return self._answer(raiser, self._status())
            if stopping:
                return

    def _store_call(self, name: str, *args: Any) -> Any:
        """A store operation, or None once the store has failed (its host is gone, say)."""
        if self._store_error is None:
            try:
                return getattr(self._store, name)(*args)
            except Exception as e:  # noqa: BLE001 - a lost store must not end the thread
                self._store_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return None

    def _alarm(self) -> int | None:
        if self._store_call("check", [self._key + "alarm"]):
            raiser = self._store_call("get", self._key + "alarm")
            return None if raiser is None else int(raiser)
        return None

    def _await(self, keys: list[str], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._store_error is None and not self._store_call("check", keys) and time.monotonic() < deadline:
            time.sleep(min(0.1, self.poll_s))

    def _status(self) -> dict[str, Any]:
        step, what, _, seq, since = self._state
        frame = sys._current_frames().get(self._training_thread)
        stack = "".join(traceback.format_stack(frame)) if frame else "(the training thread has ended)\n"
        return {
            "rank": self.rank, "step": step, "phase": what, "seq": seq, "seconds": time.monotonic() - since,
            "host": socket.gethostname(), "pid": os.getpid(), "stack": stack,
        }  # fmt: skip

    def _fire(self) -> None:
        own = self._status()
        self._store_call("set", self._key + f"status/{self.rank}", json.dumps(own))
        claimed = self._store_call("compare_set", self._key + "alarm", "", str(self.rank))
        if claimed is not None and int(claimed) != self.rank:
            return self._answer(int(claimed), own)  # another rank fired first: its report names us
        keys = [self._key + f"status/{r}" for r in range(self.world_size)]
        self._await(keys, self.grace_s)
        statuses: dict[int, dict[str, Any] | None] = {self.rank: own}
        for r, key in enumerate(keys):
            if r != self.rank and self._store_call("check", [key]):
                value = self._store_call("get", key)
                statuses[r] = None if value is None else json.loads(value)
            elif r != self.rank:
                statuses[r] = None
        note = f" (the store failed: {self._store_error})" if self._store_error else ""
        report = format_report(self.rank, self.timeout_s, statuses, note)
        self._print(report)
        self._store_call("set", self._key + "done", "1")
        self._exit(report.splitlines()[0])

    def _answer(self, raiser: int, own: dict[str, Any]) -> None:
        self._store_call("set", self._key + f"status/{self.rank}", json.dumps(own))
        text = (
            f"linscale: rank {self.rank} stopped: rank {raiser}'s watchdog raised the alarm (a watched phase lasted "
            f"longer than runtime.timeout={self.timeout_s:g}); rank {self.rank} was at {_where(own)} in it"
        )
        self._print(text + "\n" + _block(own))
        self._await([self._key + "done"], self.grace_s + 2 * self.poll_s + 2)
        self._exit(text)

    def _print(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(text + "\n")
        stream.flush()

    def _exit(self, message: str) -> None:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        try:
            raise WatchdogTimeout(message)
        except WatchdogTimeout as e:
            try:
                get_error_handler().record_exception(e)
            except Exception as err:  # noqa: BLE001 - the report is out; the exit matters more
                self._print(f"linscale: could not record the error for the agent: {err}")
        for stream in (sys.stdout, sys.stderr, self.stream):
            with contextlib.suppress(Exception):  # a closed stream must not stop the exit
                stream.flush()  # type: ignore[union-attr]
        self.exit_fn(self.exit_code)
