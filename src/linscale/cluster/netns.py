"""An emulated multi-node cluster on one machine: network namespaces on a private bridge.

Node r is the network namespace `<name>-node<r>`. Its `eth0` is one end of a veth pair whose
other end, `<name>-v<r>`, is a port of the bridge `<name>-br` in the root namespace. The
bridge has no address and the nodes have no default route, so a node reaches the other nodes
and nothing else. Links are shaped with tc in both directions: a token bucket (`tbf`) on the
node's `eth0` egress and on `<name>-v<r>` egress toward the node. Latency and loss apply on
the node's egress only, so the one-way delay between two nodes is the latency: with netem
(root qdisc, tbf as its child) where the kernel has it, and otherwise through a small relay
process that holds the node's outgoing frames (tc mirred redirect to a tap device, written
back into the bridge through a second tap after the delay).

tbf lets a transfer that starts on an idle link send one bucket (max(256 KiB, 2 ms of traffic))
at full speed before the rate applies: sustained rates are exact, but transfers not much larger
than the bucket look faster than the link.

Crash safety: every resource is recorded in the state file (JSON, written atomically) before
it is created, and `down` also removes anything that matches the cluster's name pattern.
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

DEFAULT_NAME = "ls"
DEFAULT_SUBNET = "10.213.0.0/24"
DEFAULT_STATE_DIR = "/run/linscale"
IFNAMSIZ = 15  # longest interface name the kernel accepts
RUN_TAG_VAR = "LINSCALE_CLUSTER_RUN"
TBF_QUEUE = "50ms"  # how long tbf may queue packets before dropping them
NETEM_LIMIT = 100000  # packets netem may hold (its default of 1000 is too few at 10gbit)
RELAY_MARK = "linscale-cluster-relay"


class ClusterError(Exception):
    """A user-facing error: the message says what went wrong and how to fix it."""


# --------------------------------------------------------------------------- parsing

_RATE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(bit|bps)")
_SI = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_RATE_EXAMPLE = "e.g. 10gbit, 500mbit or 100kbit (tc units: bit = bits/s, bps = bytes/s)"


def parse_rate(text: str) -> int:
    """A tc rate ("10gbit", "500mbit", "1.5gbit", "100mbps") in bits per second."""
    m = _RATE_RE.fullmatch(str(text).strip().lower())
    if not m:
        raise ClusterError(f"bad rate {text!r}: give a number and a unit, {_RATE_EXAMPLE}")
    value = float(m.group(1)) * _SI[m.group(2)] * (8 if m.group(3) == "bps" else 1)
    if value < 8000:
        raise ClusterError(f"rate {text!r} is too small: the smallest link is 8kbit ({_RATE_EXAMPLE})")
    return int(round(value))


def format_rate(bits: int) -> str:
    """Bits per second as a short tc-style rate: 10gbit, 500mbit, 1.5gbit."""
    for unit, scale in (("tbit", 10**12), ("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits >= scale:
            return f"{bits / scale:.6g}{unit}"
    return f"{bits}bit"


_LATENCY_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(us|µs|usec|ms|msec|s|sec)?")
_LATENCY_SCALE = {"us": 1, "µs": 1, "usec": 1, "ms": 1000, "msec": 1000, "s": 10**6, "sec": 10**6}


def parse_latency(text: str) -> int:
    """A one-way latency ("5us", "200us", "1ms", "1.5ms", "0") in microseconds."""
    m = _LATENCY_RE.fullmatch(str(text).strip().lower())
    if not m or (m.group(2) is None and float(m.group(1)) != 0):
        raise ClusterError(f"bad latency {text!r}: give a number and a unit, e.g. 5us, 200us or 1ms")
    us = float(m.group(1)) * _LATENCY_SCALE[m.group(2) or "us"]
    if us > 10 * 10**6:
        raise ClusterError(f"latency {text!r} is too large: at most 10s")
    return int(round(us))


def format_latency(us: int) -> str:
    if us == 0:
        return "0"
    if us >= 1000:
        return f"{us / 1000:g}ms"
    return f"{us}us"


def parse_loss(text: str) -> float:
    """A packet loss in percent: "0.1%" or "0.1" (netem's convention: a bare number is a percentage)."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*%?", str(text).strip())
    if not m or not 0 <= float(m.group(1)) < 100:
        raise ClusterError(f"bad loss {text!r}: give a percentage below 100, e.g. 0.1% or 1%")
    return float(m.group(1))


def format_loss(pct: float) -> str:
    return f"{pct:g}%"


def parse_node(text: str | int) -> int:
    """A node given as `1`, `node1` or `<name>-node1`."""
    m = re.fullmatch(r"(?:.*-)?(?:node)?(\d+)", str(text).strip())
    if not m:
        raise ClusterError(f"bad node {text!r}: give its rank, e.g. 0 or 1")
    return int(m.group(1))


# --------------------------------------------------------------------------- names and addresses


def check_name(name: str, nodes: int = 1) -> None:
    """Names must make valid interface names (<= 15 characters) for every node."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_]*", name):
        raise ClusterError(f"bad cluster name {name!r}: use letters, digits and _ (e.g. ls, job1)")
    longest = max(len(bridge_name(name)), len(host_veth(name, nodes - 1)))
    if longest > IFNAMSIZ:
        room = IFNAMSIZ - (longest - len(name))
        raise ClusterError(
            f"cluster name {name!r} is too long for {nodes} nodes: interface names are limited to "
            f"{IFNAMSIZ} characters, so use at most {room} characters"
        )


def netns_name(name: str, rank: int) -> str:
    return f"{name}-node{rank}"


def bridge_name(name: str) -> str:
    return f"{name}-br"


def host_veth(name: str, rank: int) -> str:
    """The bridge-side end of node `rank`'s veth pair (the node's end is `eth0` in its namespace)."""
    return f"{name}-v{rank}"


def node_veth_tmp(name: str, rank: int) -> str:
    """The node's end of the veth pair before it moves into the namespace and becomes eth0."""
    return f"{name}-e{rank}"


def relay_taps(name: str, rank: int) -> tuple[str, str]:
    """The relay's tap pair of node `rank`: frames from the node in, delayed frames out to the bridge."""
    return f"{name}-i{rank}", f"{name}-o{rank}"


def _link_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(name)}-(?:br|[veio]\d+)")


def _netns_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(name)}-node\d+")


def node_addresses(subnet: str, nodes: int) -> list[str]:
    """Node r gets the subnet's address r+1."""
    try:
        net = ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as e:
        raise ClusterError(f"bad subnet {subnet!r} ({e}): give an IPv4 network, e.g. {DEFAULT_SUBNET}") from None
    if nodes < 1:
        raise ClusterError(f"--nodes must be >= 1, got {nodes}")
    if nodes > net.num_addresses - 2:
        raise ClusterError(f"subnet {subnet} has room for {max(net.num_addresses - 2, 0)} nodes, not {nodes}")
    return [str(net.network_address + r + 1) for r in range(nodes)]


# --------------------------------------------------------------------------- command lines


def tbf_args(rate_bits: int) -> list[str]:
    """tbf at `rate_bits`, with a bucket big enough for the rate (>= 256 KiB, >= 2 ms of traffic)."""
    burst = max(256 * 1024, int(rate_bits / 8 * 0.002))
    return ["tbf", "rate", f"{rate_bits}bit", "burst", str(burst), "latency", TBF_QUEUE]


def netem_args(latency_us: int, loss_pct: float) -> list[str]:
    args = ["netem", "limit", str(NETEM_LIMIT)]
    if latency_us:
        args += ["delay", f"{latency_us}us"]
    if loss_pct:
        args += ["loss", f"{loss_pct:g}%"]
    return args


def _tc(netns: str | None) -> list[str]:
    return ["tc", "-n", netns] if netns else ["tc"]


def shape_commands(
    dev: str, rate_bits: int, latency_us: int = 0, loss_pct: float = 0.0, netns: str | None = None, op: str = "add"
) -> list[list[str]]:
    """tc command lines shaping `dev`'s egress: tbf alone, or netem as root with tbf as its child."""
    tc = _tc(netns)
    if latency_us or loss_pct:
        return [
            [*tc, "qdisc", op, "dev", dev, "root", "handle", "1:", *netem_args(latency_us, loss_pct)],
            [*tc, "qdisc", op, "dev", dev, "parent", "1:1", "handle", "10:", *tbf_args(rate_bits)],
        ]
    return [[*tc, "qdisc", op, "dev", dev, "root", "handle", "1:", *tbf_args(rate_bits)]]


def reshape_commands(dev: str, rate_bits: int, under_netem: bool, netns: str | None = None) -> list[list[str]]:
    """tc command lines changing the rate of an already shaped `dev` (the tbf under netem, or the root)."""
    where = ["parent", "1:1", "handle", "10:"] if under_netem else ["root", "handle", "1:"]
    return [[*_tc(netns), "qdisc", "replace", "dev", dev, *where, *tbf_args(rate_bits)]]


@dataclass(frozen=True)
class Step:
    """One command of `up`; `creates` is the resource it makes, recorded in the state before it runs."""

    argv: tuple[str, ...]
    creates: tuple[str, str] | None = None


def _addrgen_off(dev: str, netns: str | None = None) -> tuple[str, ...]:
    # No IPv6 link-local address: the root side stays address-less and gloo sees only IPv4 on eth0.
    ns = ("-n", netns) if netns else ()
    return ("ip", *ns, "link", "set", "dev", dev, "addrgenmode", "none")


def bridge_steps(name: str) -> list[Step]:
    br = bridge_name(name)
    return [
        Step(("ip", "link", "add", "name", br, "type", "bridge", "stp_state", "0", "forward_delay", "0"), ("link", br)),
        Step(_addrgen_off(br)),
        Step(("ip", "link", "set", "dev", br, "up")),
    ]


def node_steps(name: str, rank: int, addr: str, prefixlen: int) -> list[Step]:
    """Namespace, veth pair, address and bridge port of node `rank` (shaping comes after)."""
    ns, veth, tmp, br = netns_name(name, rank), host_veth(name, rank), node_veth_tmp(name, rank), bridge_name(name)
    return [
        Step(("ip", "netns", "add", ns), ("netns", ns)),
        Step(("ip", "link", "add", "name", veth, "type", "veth", "peer", "name", tmp), ("link", veth)),
        Step(_addrgen_off(veth)),
        Step(("ip", "link", "set", "dev", tmp, "netns", ns)),
        Step(("ip", "-n", ns, "link", "set", "dev", tmp, "name", "eth0")),
        Step(_addrgen_off("eth0", ns)),
        Step(("ip", "-n", ns, "addr", "add", f"{addr}/{prefixlen}", "dev", "eth0")),
        Step(("ip", "-n", ns, "link", "set", "dev", "lo", "up")),
        Step(("ip", "-n", ns, "link", "set", "dev", "eth0", "up")),
        Step(("ip", "link", "set", "dev", veth, "master", br)),
        Step(("ip", "link", "set", "dev", veth, "up")),
    ]


def link_shape_steps(
    name: str, rank: int, rate_bits: int, latency_us: int, loss_pct: float, delay: str
) -> list[list[str]]:
    """Both directions of node `rank`'s link: its eth0 egress (rate, and latency/loss with netem) and
    the bridge-side veth's egress toward it (rate only)."""
    ns = netns_name(name, rank)
    on_node = (latency_us, loss_pct) if delay == "netem" else (0, 0.0)
    return [
        *shape_commands("eth0", rate_bits, *on_node, netns=ns),
        *shape_commands(host_veth(name, rank), rate_bits),
    ]


def relay_steps(name: str, rank: int, mac: str) -> list[list[str]]:
    """Route node `rank`'s outgoing frames through the relay: into tap `-i<r>`, back out of tap `-o<r>`."""
    tap_in, tap_out = relay_taps(name, rank)
    veth = host_veth(name, rank)
    return [
        list(_addrgen_off(tap_in)),
        list(_addrgen_off(tap_out)),
        ["ip", "link", "set", "dev", tap_in, "txqueuelen", "10000", "up"],
        ["ip", "link", "set", "dev", tap_out, "master", bridge_name(name)],
        ["ip", "link", "set", "dev", tap_out, "type", "bridge_slave", "learning", "off"],
        ["ip", "link", "set", "dev", tap_out, "up"],
        # The node's frames enter the bridge from the relay's tap, so the bridge cannot learn
        # where the node is: tell it.
        ["bridge", "fdb", "replace", mac, "dev", veth, "master", "static"],
        ["tc", "qdisc", "add", "dev", veth, "handle", "ffff:", "ingress"],
        ["tc", "filter", "add", "dev", veth, "parent", "ffff:", "protocol", "all", "prio", "1", "u32",
         "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", tap_in],
    ]  # fmt: skip


def node_command(
    subcommand: str,
    args: Sequence[str],
    nnodes: int,
    node_rank: int,
    master_addr: str,
    master_port: int,
    python: str | None = None,
) -> list[str]:
    """`python -m linscale SUBCOMMAND ARGS --nnodes N --node-rank R --master-addr A --master-port P`."""
    return [
        python or sys.executable,
        "-m",
        "linscale",
        subcommand,
        *args,
        "--nnodes",
        str(nnodes),
        "--node-rank",
        str(node_rank),
        "--master-addr",
        master_addr,
        "--master-port",
        str(master_port),
    ]


# --------------------------------------------------------------------------- state


def state_dir(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("LINSCALE_STATE_DIR") or DEFAULT_STATE_DIR)


@dataclass
class State:
    """What a cluster is and which resources it made; saved as JSON before every creation."""

    name: str
    nodes: int
    subnet: str
    rate: int  # bits/s of every link as created
    latency_us: int = 0
    loss_pct: float = 0.0
    delay: str = "none"  # "none", "netem" or "relay": how latency/loss are applied
    phase: str = "creating"  # "creating" until `up` finished, then "up"
    node_rates: list[int] = field(default_factory=list)  # current rate per node (after `slow`)
    resources: list[list[str]] = field(default_factory=list)  # [kind, name], in creation order
    relay_pid: int = 0
    created: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not self.node_rates:
            self.node_rates = [self.rate] * self.nodes

    @property
    def addresses(self) -> list[str]:
        return node_addresses(self.subnet, self.nodes)

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen

    def record(self, kind: str, resource: str) -> None:
        if [kind, resource] not in self.resources:
            self.resources.append([kind, resource])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> State:
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def state_path(name: str, directory: str | os.PathLike | None = None) -> Path:
    return state_dir(directory) / f"{name}.json"


def save_state(state: State, directory: str | os.PathLike | None = None) -> Path:
    """Write the state atomically: a temporary file in the same directory, fsync, rename."""
    path = state_path(state.name, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(state.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_state(name: str, directory: str | os.PathLike | None = None) -> State | None:
    path = state_path(name, directory)
    try:
        return State.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:
        raise ClusterError(
            f"the state file {path} is damaged ({e}); `linscale cluster down --name {name}` removes the cluster anyway"
        ) from None


# --------------------------------------------------------------------------- running commands


def check_host() -> None:
    """Root and iproute2, or a message that says how to get them."""
    if os.geteuid() != 0:
        raise ClusterError("linscale cluster needs root (network namespaces): run as root or with sudo")
    for tool in ("ip", "tc", "bridge"):
        if _which(tool) is None:
            raise ClusterError(
                f"`{tool}` was not found: install the Debian package iproute2 (apt-get install iproute2)"
            )


def _which(tool: str) -> str | None:
    # sudo may leave /usr/sbin out of PATH.
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")


def sh(argv: Sequence[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run one ip/tc/bridge command; a failure raises ClusterError with the command and its message."""
    argv = list(argv)
    argv[0] = _which(argv[0]) or argv[0]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        shown = " ".join([os.path.basename(argv[0]), *argv[1:]])
        raise ClusterError(f"`{shown}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def list_netns() -> list[str]:
    out = sh(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def list_links() -> list[dict]:
    out = sh(["ip", "-j", "link", "show"], check=False).stdout
    return json.loads(out) if out.strip() else []


def netns_pids(netns: str) -> list[int]:
    proc = sh(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()] if proc.returncode == 0 else []


def leftovers(name: str) -> tuple[list[str], list[str]]:
    """Namespaces and root-namespace links that match cluster `name`'s patterns."""
    ns_re, link_re = _netns_pattern(name), _link_pattern(name)
    namespaces = sorted(n for n in list_netns() if ns_re.fullmatch(n))
    links = sorted(link["ifname"] for link in list_links() if link_re.fullmatch(link.get("ifname", "")))
    return namespaces, links


def _kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def pids_with_env(var: str, value: str) -> list[int]:
    """Pids of the processes whose environment has var=value (they may have left our process group)."""
    needle = f"{var}={value}".encode() + b"\0"
    found = []
    for env_file in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in env_file.read_bytes() + b"\0":
                found.append(int(env_file.parent.name))
        except (OSError, ValueError):
            continue
    return found


def _relay_pids(name: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if RELAY_MARK.encode() in args and name.encode() in args:
            found.append(int(cmdline.parent.name))
    return found


# --------------------------------------------------------------------------- the cluster


@dataclass(frozen=True)
class NodeStatus:
    rank: int
    netns: str
    address: str
    rate: str
    latency: str
    loss: str
    link: str  # "up", "cut", "missing"
    processes: int


@dataclass
class RunResult:
    """The outcome of `Cluster.run`: `returncode` is 0, the first failing node's code, 124 on timeout
    or 130 when interrupted."""

    returncode: int
    codes: dict[int, int | None]
    failed_node: int | None = None
    timed_out: bool = False
    interrupted: bool = False


class Cluster:
    """A running emulated cluster, found by name through its state file."""

    def __init__(self, state: State, directory: str | os.PathLike | None = None) -> None:
        self.state = state
        self.state_dir = state_dir(directory)

    # ---- lifecycle

    @classmethod
    def open(cls, name: str = DEFAULT_NAME, directory: str | os.PathLike | None = None) -> Cluster:
        state = load_state(name, directory)
        if state is None:
            raise ClusterError(
                f"there is no cluster named {name!r} (no {state_path(name, directory)}); "
                f"create one with `linscale cluster up --name {name} --nodes N --link RATE`"
            )
        if state.phase != "up":
            raise ClusterError(
                f"cluster {name!r} was not completely created (an earlier `up` stopped halfway); "
                f"remove it with `linscale cluster down --name {name}`"
            )
        return cls(state, directory)

    @classmethod
    def up(
        cls,
        nodes: int,
        link: str | int,
        latency: str | int | None = None,
        loss: str | float | None = None,
        name: str = DEFAULT_NAME,
        subnet: str = DEFAULT_SUBNET,
        directory: str | os.PathLike | None = None,
        delay: str = "auto",
    ) -> Cluster:
        """Create the cluster; on failure everything created so far is removed again.

        `delay` picks how latency/loss are applied: "netem", "relay" or "auto" (netem when the
        kernel has it)."""
        check_name(name, nodes)
        rate = link if isinstance(link, int) else parse_rate(link)
        latency_us = latency if isinstance(latency, int) else parse_latency(latency) if latency else 0
        loss_pct = float(loss) if isinstance(loss, int | float) else parse_loss(loss) if loss else 0.0
        addresses = node_addresses(subnet, nodes)
        if delay not in ("auto", "netem", "relay"):
            raise ClusterError(f"bad delay backend {delay!r}: auto, netem or relay")
        check_host()
        existing = load_state(name, directory)
        if existing is not None:
            raise ClusterError(
                f"cluster {name!r} already exists ({existing.nodes} nodes on {existing.subnet}); "
                f"remove it with `linscale cluster down --name {name}`"
            )
        namespaces, links = leftovers(name)
        if namespaces or links:
            raise ClusterError(
                f"resources of a cluster named {name!r} already exist ({', '.join(namespaces + links)}); "
                f"remove them with `linscale cluster down --name {name}`"
            )
        state = State(name=name, nodes=nodes, subnet=subnet, rate=rate, latency_us=latency_us, loss_pct=loss_pct)
        cluster = cls(state, directory)
        try:
            cluster._create(addresses, delay)
        except BaseException:
            try:
                cluster.down()
            except Exception as e:  # noqa: BLE001 - the original error matters more
                print(f"linscale: could not remove the half-created cluster: {e}", file=sys.stderr)
            raise
        return cluster

    def _save(self) -> None:
        save_state(self.state, self.state_dir)

    def _step(self, step: Step) -> None:
        if step.creates:
            self.state.record(*step.creates)
            self._save()
        sh(step.argv)

    def _create(self, addresses: list[str], delay: str) -> None:
        st = self.state
        self._save()
        for step in bridge_steps(st.name):
            self._step(step)
        for rank, addr in enumerate(addresses):
            for step in node_steps(st.name, rank, addr, st.prefixlen):
                self._step(step)
        if st.latency_us or st.loss_pct:
            has_netem = netem_available(netns_name(st.name, 0))
            if delay == "netem" and not has_netem:
                raise ClusterError("this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM): use the relay for latency")
            if delay == "auto":
                delay = "netem" if has_netem else "relay"
            st.delay = delay
            self._save()
        for rank in range(st.nodes):
            for argv in link_shape_steps(st.name, rank, st.rate, st.latency_us, st.loss_pct, st.delay):
                sh(argv)
        if st.delay == "relay":
            self._start_relay()
        st.phase = "up"
        self._save()

    def _start_relay(self) -> None:
        st = self.state
        for rank in range(st.nodes):
            for tap in relay_taps(st.name, rank):
                st.record("link", tap)
        st.record("relay", st.name)
        self._save()
        config = {
            "delay_us": st.latency_us,
            "loss_pct": st.loss_pct,
            "taps": [list(relay_taps(st.name, r)) for r in range(st.nodes)],
        }
        log = self.state_dir / f"{st.name}.relay.log"
        code = "from linscale.cluster.netns import relay_main; relay_main()"
        proc = subprocess.Popen(
            [sys.executable, "-c", code, RELAY_MARK, st.name, json.dumps(config), str(log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        st.relay_pid = proc.pid
        self._save()
        line = proc.stdout.readline().decode(errors="replace").strip()  # "ready", or an error
        proc.stdout.close()
        if line != "ready":
            proc.kill()
            proc.wait()
            raise ClusterError(f"the latency relay did not start: {line or 'no output'}")
        for rank in range(st.nodes):
            mac = node_mac(netns_name(st.name, rank))
            for argv in relay_steps(st.name, rank, mac):
                sh(argv)

    def down(self) -> list[str]:
        return down(self.state.name, self.state_dir)

    # ---- facts

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def nodes(self) -> int:
        return self.state.nodes

    @property
    def addresses(self) -> list[str]:
        return self.state.addresses

    @property
    def master_addr(self) -> str:
        return self.addresses[0]

    def netns(self, rank: int) -> str:
        return netns_name(self.name, self.check_node(rank))

    def addr(self, rank: int) -> str:
        return self.addresses[self.check_node(rank)]

    def check_node(self, rank: int | str) -> int:
        r = parse_node(rank)
        if not 0 <= r < self.nodes:
            raise ClusterError(f"there is no node {rank} in cluster {self.name!r}: nodes are 0..{self.nodes - 1}")
        return r

    def node_env(self, rank: int) -> dict[str, str]:
        return {
            "LINSCALE_NODE_RANK": str(rank),
            "LINSCALE_NODE_ADDR": self.addr(rank),
            "LINSCALE_NUM_NODES": str(self.nodes),
            "LINSCALE_MASTER_ADDR": self.master_addr,
            "GLOO_SOCKET_IFNAME": "eth0",
        }

    def status(self) -> list[NodeStatus]:
        st = self.state
        present = set(list_netns())
        links = {link["ifname"]: link for link in list_links()}
        rows = []
        for rank, addr in enumerate(st.addresses):
            ns = netns_name(st.name, rank)
            link = links.get(host_veth(st.name, rank))
            if ns not in present or link is None:
                state = "missing"
            else:
                state = "up" if "UP" in link.get("flags", []) else "cut"
            rows.append(
                NodeStatus(
                    rank=rank,
                    netns=ns,
                    address=addr,
                    rate=format_rate(st.node_rates[rank]),
                    latency=format_latency(st.latency_us),
                    loss=format_loss(st.loss_pct),
                    link=state,
                    processes=len(netns_pids(ns)) if ns in present else 0,
                )
            )
        return rows

    def relay_running(self) -> bool:
        return bool(self.state.relay_pid) and self.state.relay_pid in _relay_pids(self.name)

    # ---- faults

    def kill(self, rank: int | str, timeout: float = 10) -> list[int]:
        """SIGKILL every process in node `rank`'s namespace and wait until none is left."""
        ns = self.netns(rank)
        killed: list[int] = []

        def gone() -> bool:
            pids = netns_pids(ns)
            _kill_pids(pids)
            killed.extend(p for p in pids if p not in killed)
            return not pids

        if not _wait_until(gone, timeout, interval=0.05):
            raise ClusterError(f"processes in {ns} did not end within {timeout:g}s: {netns_pids(ns)}")
        return killed

    def cut(self, rank: int | str) -> None:
        """Take node `rank`'s link down (the bridge side: the node sees its carrier go)."""
        sh(["ip", "link", "set", "dev", host_veth(self.name, self.check_node(rank)), "down"])

    def heal(self, rank: int | str) -> None:
        sh(["ip", "link", "set", "dev", host_veth(self.name, self.check_node(rank)), "up"])

    def slow(self, rank: int | str, rate: str | int) -> None:
        """Re-shape node `rank`'s link to `rate` in both directions."""
        r = self.check_node(rank)
        bits = rate if isinstance(rate, int) else parse_rate(rate)
        under_netem = self.state.delay == "netem"
        for argv in [
            *reshape_commands("eth0", bits, under_netem, netns=netns_name(self.name, r)),
            *reshape_commands(host_veth(self.name, r), bits, False),
        ]:
            sh(argv)
        self.state.node_rates[r] = bits
        self._save()

    # ---- running commands on the nodes

    def popen(self, rank: int, argv: Sequence[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Start `argv` in node `rank`'s namespace with the node's environment (not waited for)."""
        full_env = {**os.environ, **(env or {}), **self.node_env(rank)}
        ip = _which("ip") or "ip"
        return subprocess.Popen([ip, "netns", "exec", self.netns(rank), *argv], env=full_env, **kwargs)

    def run(
        self,
        cmd: Sequence[str] | Callable[[int], Sequence[str]],
        node: int | str | Sequence[int] | None = None,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        grace: float = 3.0,
    ) -> RunResult:
        """Run `cmd` (or `cmd(rank)`) on every node, or on `node` (one, or a list), concurrently, and wait.

        Each output line is prefixed `[node r]`. When a node fails, on timeout or on Ctrl-C the
        other nodes' commands are stopped (SIGTERM, then SIGKILL after `grace` seconds). At the
        end every process the run started that is still alive (found by an environment tag, so
        also daemons that left the process group) is killed. `codes` has every node's exit code
        (negative: the signal that ended it)."""
        if node is None:
            ranks = list(range(self.nodes))
        elif isinstance(node, list | tuple | range):
            ranks = [self.check_node(r) for r in node]
        else:
            ranks = [self.check_node(node)]
        out = stdout or sys.stdout
        err = stderr or sys.stderr
        tag = uuid.uuid4().hex
        lock = threading.Lock()
        done: queue.Queue[int] = queue.Queue()
        procs: dict[int, subprocess.Popen] = {}
        threads: list[threading.Thread] = []
        codes: dict[int, int | None] = dict.fromkeys(ranks)
        result = RunResult(0, codes)
        try:
            for r in ranks:
                argv = list(cmd(r) if callable(cmd) else cmd)
                if not argv:
                    raise ClusterError("no command to run: give one after --, e.g. -- hostname -I")
                p = self.popen(
                    r,
                    argv,
                    env={**(env or {}), RUN_TAG_VAR: tag},
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
                procs[r] = p
                for pipe, sink in ((p.stdout, out), (p.stderr, err)):
                    t = threading.Thread(target=_pump, args=(pipe, sink, f"[node {r}] ", lock), daemon=True)
                    t.start()
                    threads.append(t)
                threading.Thread(target=lambda r=r, p=p: (p.wait(), done.put(r)), daemon=True).start()
            deadline = None if timeout is None else time.monotonic() + timeout
            waiting = set(ranks)
            while waiting:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    result.timed_out, result.returncode = True, 124
                    break
                try:
                    r = done.get(timeout=left)
                except queue.Empty:
                    continue
                waiting.discard(r)
                codes[r] = procs[r].returncode
                if codes[r] != 0:
                    result.failed_node = r
                    result.returncode = codes[r] if codes[r] > 0 else 128 - codes[r]
                    break
        except KeyboardInterrupt:
            result.interrupted, result.returncode = True, 130
        finally:
            _stop(procs.values(), grace)
            # Whatever the commands started and left behind, also outside their process group.
            _kill_pids(pids_with_env(RUN_TAG_VAR, tag))
            for t in threads:
                t.join(timeout=2)
        codes.update({r: p.returncode for r, p in procs.items()})
        return result


def _pump(pipe: IO[bytes], sink: IO[str], prefix: str, lock: threading.Lock) -> None:
    with pipe:
        for raw in iter(pipe.readline, b""):
            line = raw.decode(errors="replace")
            if not line.endswith("\n"):
                line += "\n"
            with lock:
                try:
                    sink.write(prefix + line)
                    sink.flush()
                except (ValueError, OSError):  # closed or broken sink: keep draining the pipe
                    pass


def _stop(procs: Iterable[subprocess.Popen], grace: float) -> None:
    """SIGTERM the process groups still running, SIGKILL those left after `grace` seconds."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)  # the leader is not reaped yet: its group id is still its own
            p.wait(timeout=10)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def netem_available(netns: str) -> bool:
    """Whether the kernel has the netem qdisc (probed on the namespace's loopback)."""
    probe = sh(["tc", "-n", netns, "qdisc", "add", "dev", "lo", "root", "handle", "1:", "netem"], check=False)
    if probe.returncode == 0:
        sh(["tc", "-n", netns, "qdisc", "del", "dev", "lo", "root"], check=False)
        return True
    return False


def node_mac(netns: str) -> str:
    out = sh(["ip", "-n", netns, "-j", "link", "show", "dev", "eth0"]).stdout
    return json.loads(out)[0]["address"]


def down(name: str = DEFAULT_NAME, directory: str | os.PathLike | None = None, timeout: float = 10) -> list[str]:
    """Remove cluster `name`: its processes, relay, namespaces, veths and bridge, from the state file
    and from whatever matches its name pattern (so it works after a crash halfway through `up`).
    Returns what was removed."""
    check_name(name)
    check_host()
    state = None
    try:
        state = load_state(name, directory)
    except ClusterError:
        pass  # a damaged state file: the name patterns find everything
    ns_re, link_re = _netns_pattern(name), _link_pattern(name)
    recorded = state.resources if state else []
    namespaces = sorted({r for k, r in recorded if k == "netns"} | set(leftovers(name)[0]))
    present = set(list_netns())
    namespaces = [n for n in namespaces if n in present and ns_re.fullmatch(n)]
    removed: list[str] = []
    # Processes first: a namespace lives on as long as a process is in it.
    for ns in namespaces:
        if not _wait_until(lambda ns=ns: not _kill_and_list(ns), timeout, interval=0.05):
            raise ClusterError(f"processes in {ns} did not end within {timeout:g}s: {netns_pids(ns)}")
    links = [link["ifname"] for link in list_links() if link_re.fullmatch(link.get("ifname", ""))]
    relays = set(_relay_pids(name))
    if relays:
        _kill_pids(relays)
        _wait_until(lambda: not set(_relay_pids(name)) & relays, timeout)
        removed.append(f"relay (pid {', '.join(map(str, sorted(relays)))})")
    for ns in namespaces:
        sh(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    # Deleting a namespace deletes its eth0 and so the veth's other end, a little later.
    for link in sorted(links, key=lambda n: n.endswith("-br")):
        sh(["ip", "link", "del", "dev", link], check=False)
    removed += links

    def clean() -> bool:
        ns_left, links_left = leftovers(name)
        return not ns_left and not links_left

    if not _wait_until(clean, timeout, interval=0.05):
        ns_left, links_left = leftovers(name)
        raise ClusterError(f"could not remove {', '.join(ns_left + links_left)} of cluster {name!r}")
    path = state_path(name, directory)
    path.unlink(missing_ok=True)
    path.with_name(f"{name}.relay.log").unlink(missing_ok=True)
    return removed


def _kill_and_list(ns: str) -> list[int]:
    pids = netns_pids(ns)
    _kill_pids(pids)
    return pids


# --------------------------------------------------------------------------- the latency relay


def _open_tap(name: str) -> int:
    import fcntl
    import struct

    tunsetiff, iff_tap, iff_no_pi = 0x400454CA, 0x0002, 0x1000
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, tunsetiff, struct.pack("16sH22x", name.encode(), iff_tap | iff_no_pi))
    os.set_blocking(fd, False)
    return fd


def _no_timer_slack() -> None:
    """Wake up on time: the default 50 us timer slack would add to every held frame's delay."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 ns
    except (OSError, AttributeError):
        pass


def relay_main(argv: Sequence[str] | None = None) -> None:
    """The relay process: `RELAY_MARK NAME CONFIG_JSON LOG`. It creates the taps, prints "ready",
    then holds every frame from a node's tap-in for the latency (dropping `loss_pct` percent)
    before writing it to the node's tap-out, a port of the bridge. Its taps vanish with it."""
    import heapq
    import random
    import select

    argv = list(sys.argv[1:] if argv is None else argv)
    _, _, config_json, log = argv
    config = json.loads(config_json)
    try:
        pairs = [(_open_tap(tap_in), _open_tap(tap_out)) for tap_in, tap_out in config["taps"]]
    except OSError as e:
        print(f"cannot create the relay's tap devices: {e}", flush=True)
        sys.exit(1)
    print("ready", flush=True)
    logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    _no_timer_slack()
    delay = config["delay_us"] / 1e6
    loss = config["loss_pct"] / 100
    out_of = dict(pairs)
    readers = list(out_of)
    pending: list[tuple[float, int, int, bytes]] = []
    seq = 0
    while True:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
        ready, _, _ = select.select(readers, [], [], timeout)
        for fd in ready:
            while True:
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if loss and random.random() < loss:
                    continue
                seq += 1
                heapq.heappush(pending, (time.monotonic() + delay, seq, out_of[fd], frame))
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, fd, frame = heapq.heappop(pending)
            try:
                os.write(fd, frame)
            except OSError:
                pass  # the bridge side is down (a cut link): the frame is lost, as on a wire
