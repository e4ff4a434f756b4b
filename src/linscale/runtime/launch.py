"""Spawning the local workers through torch's elastic agent (what torchrun runs).

The user types `linscale train ...`; when more than one process is wanted and we are not
already a worker, this module starts the elastic agent, which runs the same command line in
each worker process. Workers see the torchrun variables and do not spawn again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path


class LaunchError(RuntimeError):
    """The job could not be launched, or a worker failed; the message says which and why."""


@dataclass(frozen=True)
class LaunchSpec:
    """How to start this node's workers and meet the other nodes.

    Three forms: one node (no rendezvous address needed), static multi-node (`node_rank`
    given: every node knows its rank and node 0's address), and elastic multi-node
    (`rdzv_endpoint` given: nodes join a c10d rendezvous, between min_nodes and max_nodes).
    """

    nproc_per_node: int
    min_nodes: int = 1
    max_nodes: int = 1
    node_rank: int | None = None
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0 = pick a free port (one node only)
    rdzv_endpoint: str = ""
    join_timeout: float = 300.0
    max_restarts: int = 0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise LaunchError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.nproc_per_node < 1:
            raise LaunchError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if not 1 <= self.min_nodes <= self.max_nodes:
            raise LaunchError(f"--nnodes {self.min_nodes}:{self.max_nodes} is not a valid range (1 <= MIN <= MAX)")
        if self.node_rank is not None:
            if self.min_nodes != self.max_nodes:
                raise LaunchError("--node-rank needs a fixed --nnodes N; --nnodes MIN:MAX goes with --rdzv-endpoint")
            if not 0 <= self.node_rank < self.max_nodes:
                raise LaunchError(
                    f"--node-rank {self.node_rank} is outside 0..{self.max_nodes - 1} for --nnodes {self.max_nodes}"
                )
        if self.multi_node and not self.rdzv_endpoint and self.node_rank is None:
            raise LaunchError(
                f"--nnodes {self.max_nodes} needs --node-rank R (0 on the master node, 1..{self.max_nodes - 1} "
                "on the others) with --master-addr, or --rdzv-endpoint HOST:PORT for an elastic job"
            )

    @property
    def multi_node(self) -> bool:
        return self.max_nodes > 1 or bool(self.rdzv_endpoint)


DEFAULT_MASTER_PORT = 29500


def parse_nnodes(text: str) -> tuple[int, int]:
    """`"2"` -> (2, 2); `"1:4"` -> (1, 4)."""
    lo, _, hi = str(text).partition(":")
    try:
        pair = (int(lo), int(hi or lo))
    except ValueError:
        raise LaunchError(f"--nnodes expects N or MIN:MAX (for example 2 or 1:4), got {text!r}") from None
    return pair


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise LaunchError(f"--rdzv-endpoint expects HOST:PORT (for example node01:29500), got {endpoint!r}")
    return host, int(port)


def check_port_free(addr: str, port: int) -> None:
    """Fail early, with the fix, when the rendezvous port is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As servers do: a port held only by connections in TIME_WAIT from a previous run is free,
        # while one with a listener is still refused.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError as e:
            raise LaunchError(
                f"port {port} on {addr} is already in use ({e.strerror}); choose another with "
                "--master-port, or leave --master-port out to pick a free port"
            ) from None


# Errors a rank reports when a peer died first.
CONSEQUENCES = (
    "peer lost:",
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


def wait_reachable(host: str, port: int, timeout: float) -> None:
    """Connect to host:port until it accepts or `timeout` seconds pass (then OSError)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            # Not up yet (refused) or not answering: try again shortly, as TCPStore does.
            time.sleep(0.2)


def roll_call(spec: LaunchSpec, local_ip: str) -> object | None:
    """Before the agents start, every node checks in with node 0 on master_port + 1.

    It turns the two classic multi-node hangs into messages: node 0 names the node ranks
    that never joined, and a node that cannot reach the master says so and from where.
    Node 0 returns its store, to be kept open while the job runs, so that a node started
    late or twice is told so instead of waiting.
    """
    from datetime import timedelta

    from torch.distributed import TCPStore

    assert spec.node_rank is not None
    port = spec.master_port + 1
    timeout = timedelta(seconds=spec.join_timeout)
    nodes = range(spec.max_nodes)
    try:
        if spec.node_rank != 0:
            wait_reachable(spec.master_addr, port, spec.join_timeout)
        store = TCPStore(spec.master_addr, port, None, spec.node_rank == 0, timeout, wait_for_workers=False)
    except Exception as e:  # noqa: BLE001 - DistNetworkError and friends
        if spec.node_rank == 0:
            raise LaunchError(f"node 0 cannot listen on port {port} for the roll call: {e}") from None
        raise LaunchError(
            f"node {spec.node_rank} ({local_ip}) cannot reach the master {spec.master_addr}:{port} within "
            f"{spec.join_timeout:.0f}s; check that --master-addr is node 0's address as seen from this node, "
            "that node 0 is started with the same --master-port, and that no firewall blocks the port"
        ) from None
    if store.add(f"claims/{spec.node_rank}", 1) > 1:
        raise LaunchError(f"two nodes were started with --node-rank {spec.node_rank}; give each node its own rank")
    store.set(f"node/{spec.node_rank}", f"{socket.gethostname()} {local_ip}")
    if spec.node_rank == 0:
        try:
            store.wait([f"node/{r}" for r in nodes], timeout)
        except Exception:  # noqa: BLE001 - a timeout
            missing = [r for r in nodes if not store.check([f"node/{r}"])]
            raise LaunchError(
                f"node(s) {', '.join(map(str, missing))} of {spec.max_nodes} did not join within "
                f"{spec.join_timeout:.0f}s at {spec.master_addr}:{spec.master_port}; start linscale on "
                "every node with the same --nnodes, --master-addr and --master-port"
            ) from None
        store.set("all_joined", "1")
        return store
    try:
        store.wait(["all_joined"], timeout)
    except Exception:  # noqa: BLE001 - a timeout
        raise LaunchError(
            f"not every node joined within {spec.join_timeout:.0f}s; node 0's output names the missing ones"
        ) from None
    return None


def _network_env(local_ip: str) -> None:
    """Point gloo and NCCL at the interface that reaches the master, unless the user chose one."""
    from linscale.runtime.network import interface_for

    iface = interface_for(local_ip)
    if iface is None:
        return
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(var, iface)


# The c10d rendezvous's timing, for a job that restarts after losing a node. The surviving agents
# meet again in a new round only once the lost node counts as dead (no heartbeat for
# keep_alive_interval x keep_alive_max_attempt seconds; torch's 5 x 3) and then wait
# last_call_timeout for more nodes once --nnodes MIN have joined (torch's 30 s): 45 s of a
# restart spent waiting. A heartbeat every 2 s, dead after 10 s without, and a last call of 10 s
# cut that to 20 s; nodes that a scheduler starts together still join the first round together,
# and a node that comes later joins at a restart of the job (the agents restart for a waiting
# node). A job of a fixed --nnodes N completes each round as soon as N nodes are there.
ELASTIC_RDZV = {"keep_alive_interval": 2, "keep_alive_max_attempt": 5, "last_call_timeout": 10}


def _rendezvous(spec: LaunchSpec) -> tuple[dict, object | None]:
    """The LaunchConfig fields that say how this node meets the others, and anything that
    must stay alive while the job runs (node 0's roll-call store)."""
    from linscale.runtime.network import is_local_address, local_ip_toward

    if not spec.multi_node:
        if spec.master_port:
            check_port_free(spec.master_addr, spec.master_port)
        return dict(
            rdzv_backend="c10d",
            rdzv_endpoint=f"{spec.master_addr}:{spec.master_port}",
            rdzv_configs={"is_host": True},
            run_id=f"linscale-{uuid.uuid4().hex[:8]}",
        ), None
    if spec.rdzv_endpoint:
        host, port = split_endpoint(spec.rdzv_endpoint)
        local_ip = local_ip_toward(host)
        is_host = is_local_address(host)
        if is_host:
            check_port_free("0.0.0.0", port)
        _network_env(local_ip)
        return dict(
            rdzv_backend="c10d",
            rdzv_endpoint=spec.rdzv_endpoint,
            rdzv_configs={"is_host": is_host, "join_timeout": spec.join_timeout, **ELASTIC_RDZV},
            run_id=f"linscale-{host}-{port}",
            local_addr=local_ip,
        ), None
    port = spec.master_port or DEFAULT_MASTER_PORT
    spec = dataclasses.replace(spec, master_port=port)
    local_ip = local_ip_toward(spec.master_addr)
    if spec.node_rank == 0:
        for p in (port, port + 1):
            check_port_free("0.0.0.0", p)
    keep = roll_call(spec, local_ip)
    _network_env(local_ip)
    return dict(
        rdzv_backend="static",
        rdzv_endpoint=f"{spec.master_addr}:{port}",
        rdzv_configs={"rank": spec.node_rank, "timeout": int(spec.join_timeout)},
        run_id=f"linscale-{spec.master_addr}-{port}",
        local_addr=local_ip,
    ), keep


# Signals the launcher hands on to its workers instead of dying of them. SIGUSR1 is what
# `sbatch --signal=USR1@SECONDS` sends before the time limit: the workers checkpoint and stop.
FORWARDED = (signal.SIGUSR1,)


def _is_worker_cmdline(args: list[str]) -> bool:
    """`python -m linscale ...` (how spawn starts workers) or the `linscale` console script."""
    pairs = zip(args, args[1:], strict=False)
    return any(a == "-m" and b == "linscale" for a, b in pairs) or any(Path(a).name == "linscale" for a in args[:2])


def worker_pids(parent: int, proc: Path = Path("/proc")) -> list[int]:
    """The linscale workers among `parent`'s child processes: the elastic agent starts them as
    direct children, each in a session of its own, so a signal to the launcher's process group
    does not reach them."""
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if ppid != parent:
                continue
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if _is_worker_cmdline([a for a in args if a]):
            pids.append(int(entry.name))
    return sorted(pids)


def forward_to_workers(signum: int, parent: int | None = None, proc: Path = Path("/proc")) -> list[int]:
    """Send `signum` to the launcher's workers; returns the pids that got it."""
    sent = []
    for pid in worker_pids(os.getpid() if parent is None else parent, proc):
        try:
            os.kill(pid, signum)
            sent.append(pid)
        except ProcessLookupError:
            pass
    return sent


class _Forwarding:
    """While the agent runs: the FORWARDED signals go to the workers, and the launcher lives on
    to collect their results (its default action for SIGUSR1 would be to die, which ends the
    job's step and, under SLURM, the whole job before the workers could save)."""

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame) -> None:
        sent = forward_to_workers(signum)
        name = signal.Signals(signum).name
        print(f"linscale: launcher got {name}: handed on to {len(sent)} worker(s)", file=sys.stderr, flush=True)

    def __enter__(self) -> _Forwarding:
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            for s in FORWARDED:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def spawn(spec: LaunchSpec, argv: list[str], log_dir: str) -> None:
    """Run `python -m linscale <argv>` in `spec.nproc_per_node` worker processes and wait.

    The agent's per-worker error files go under `log_dir`."""
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    try:
        rendezvous, keepalive = _rendezvous(spec)
    except ValueError as e:  # an address that does not resolve or route
        raise LaunchError(str(e)) from None
    from linscale.runtime.device import cpu_cores

    # Each worker gets its share of the cores, so the processes do not oversubscribe them.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_cores() // spec.nproc_per_node)))
    # Restarts with gloo are flaky when the rendezvous shares its TCP store with the workers.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=spec.min_nodes,
        max_nodes=spec.max_nodes,
        nproc_per_node=spec.nproc_per_node,
        max_restarts=spec.max_restarts,
        **rendezvous,
        monitor_interval=0.1,
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),
        start_method="spawn",
    )
    try:
        with _Forwarding():
            elastic_launch(config, sys.executable)("-m", "linscale", *argv)
    except ChildFailedError as e:
        raise LaunchError(_failure_message(e)) from None
    except Exception as e:  # noqa: BLE001 - the agent itself failed: rendezvous, a lost store
        raise LaunchError(f"the launcher on this node failed: {type(e).__name__}: {e}") from None
    finally:
        del keepalive
