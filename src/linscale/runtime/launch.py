"""Spawning the local workers through torch's elastic agent (what torchrun runs).

The user types `linscale train ...`; when more than one process is wanted and we are not
already a worker, this module starts the elastic agent, which runs the same command line in
each worker process. Workers see the torchrun variables and do not spawn again.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from dataclasses import dataclass

from linscale.runtime.device import cpu_cores


class LaunchError(RuntimeError):
    """The job could not be launched, or a worker failed; the message says which and why."""


@dataclass(frozen=True)
class LaunchSpec:
    nproc_per_node: int
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0 = pick a free port
    device_type: str = "cpu"
    max_restarts: int = 0


def check_port_free(addr: str, port: int) -> None:
    """Fail early, with the fix, when the rendezvous port is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, port))
        except OSError as e:
            raise LaunchError(
                f"port {port} on {addr} is already in use ({e.strerror}); choose another with "
                "--master-port, or leave --master-port out to pick a free port"
            ) from None


# Errors a rank reports when a peer died first.
CONSEQUENCES = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Socket Timeout",
    "Connection refused",
)


def _failure_message(err: Exception) -> str:
    failures = getattr(err, "failures", None)
    if not failures:
        return str(err)

    def text_of(failure) -> str:
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", "")
        message = str(message or "").strip()
        return "" if message == "<N/A>" or message.startswith("{") else message

    # The cause is the earliest failure that is not a peer's lost connection: when one rank
    # dies, the others fail in their next collective, sometimes before the agent notices.
    ordered = sorted(failures.items(), key=lambda kv: kv[1].timestamp)
    causes = [kv for kv in ordered if not any(s in text_of(kv[1]) for s in CONSEQUENCES)]
    rank, first = (causes or ordered)[0]
    # The exception's own line: first in an error file ("Type: message", then details),
    # last in a plain traceback.
    lines = [ln for ln in text_of(first).splitlines() if ln.strip()]
    detail = (lines[-1] if lines[0].startswith("Traceback") else lines[0]) if lines else ""
    code = first.exitcode
    how = f"exit code {code}" if code >= 0 else f"signal {-code}"
    text = f"worker rank {rank} (pid {first.pid}) failed with {how}"
    if detail:
        text += f": {detail}"
    if len(failures) > 1:
        text += f" ({len(failures) - 1} other worker(s) stopped with it)"
    return text + "; see the worker's output above"


def is_consequence(error: BaseException) -> bool:
    """True for the error a rank raises because a peer died, not because of its own fault."""
    return any(s in str(error) for s in CONSEQUENCES)


def spawn(spec: LaunchSpec, argv: list[str], log_dir: str) -> None:
    """Run `python -m linscale <argv>` in `spec.nproc_per_node` worker processes and wait.

    The agent's per-worker error files go under `log_dir`."""
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if spec.master_port:
        check_port_free(spec.master_addr, spec.master_port)
    # Each worker gets its share of the cores, so the processes do not oversubscribe them.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_cores() // spec.nproc_per_node)))
    # Restarts with gloo are flaky when the rendezvous shares its TCP store with the workers.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=spec.nproc_per_node,
        run_id=f"linscale-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"{spec.master_addr}:{spec.master_port}",
        rdzv_configs={"is_host": True},
        max_restarts=spec.max_restarts,
        monitor_interval=0.1,
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),
        start_method="spawn",
    )
    try:
        elastic_launch(config, sys.executable)("-m", "linscale", *argv)
    except ChildFailedError as e:
        raise LaunchError(_failure_message(e)) from None
