"""`linscale cluster ...`: an emulated multi-node cluster on this machine (network namespaces)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from linscale.cluster.netns import (
    DEFAULT_NAME,
    DEFAULT_SUBNET,
    Cluster,
    ClusterError,
    RunResult,
    check_host,
    check_name,
    down,
    format_latency,
    format_loss,
    format_rate,
    node_command,
    parse_latency,
    parse_loss,
    parse_node,
    parse_rate,
)

DEFAULT_MASTER_PORT = 29500


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cluster",
        help="emulate a multi-node cluster on this machine (network namespaces, needs root)",
        description="Rehearse a multi-node job on one machine: every node is a network namespace with its "
        "own address on a private bridge, its link shaped to a rate (and latency/loss). Needs root.",
    )
    p.set_defaults(func=run_cli, cluster_parser=p)
    actions = p.add_subparsers(dest="action", metavar="ACTION")

    def named(action: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        q = actions.add_parser(action, help=help, description=description or help)
        q.add_argument("--name", default=DEFAULT_NAME, help=f"the cluster's name (default: {DEFAULT_NAME})")
        return q

    up = named("up", "create the cluster's nodes and links")
    up.add_argument("--nodes", type=int, required=True, help="number of nodes")
    up.add_argument("--link", required=True, help="rate of every node's link, e.g. 10gbit, 500mbit")
    up.add_argument("--latency", help="one-way latency between two nodes, e.g. 5us, 1ms")
    up.add_argument("--loss", help="packet loss on every node's outgoing traffic, e.g. 0.1%%")
    up.add_argument("--subnet", default=DEFAULT_SUBNET, help=f"the nodes' subnet (default: {DEFAULT_SUBNET})")

    named("down", "remove the cluster (also after a crash halfway through up)")
    named("status", "nodes, addresses, links and processes")

    def with_timeout(q: argparse.ArgumentParser) -> None:
        q.add_argument("--timeout", type=float, help="stop all nodes after SECONDS and fail")

    run = named(
        "run",
        "run a command on every node",
        "Run CMD on every node (or one) at once, inside its namespace, with LINSCALE_NODE_RANK, "
        "LINSCALE_NODE_ADDR, LINSCALE_NUM_NODES, LINSCALE_MASTER_ADDR and GLOO_SOCKET_IFNAME set. "
        "When one node fails the others are stopped.",
    )
    run.add_argument("--node", help="run on this node only")
    with_timeout(run)
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the command")

    for action in ("train", "doctor"):
        q = named(
            action,
            f"run `linscale {action}` on every node as one multi-node job",
            f"Run `python -m linscale {action} ... --nnodes N --node-rank R --master-addr <node 0> "
            f"--master-port P` on every node. Options of this command come before "
            f"{'TASK' if action == 'train' else 'the arguments'}.",
        )
        q.add_argument("--master-port", type=int, default=DEFAULT_MASTER_PORT, help=f"default: {DEFAULT_MASTER_PORT}")
        with_timeout(q)
        if action == "train":
            q.add_argument("task", help="the task, as for `linscale train`")
        q.add_argument("args", nargs=argparse.REMAINDER, help=f"arguments of `linscale {action}`")

    kill = named("kill", "end every process on a node (a node crash)")
    kill.add_argument("node")
    cut = named("cut", "take a node's link down")
    cut.add_argument("node")
    heal = named("heal", "bring a node's link back up")
    heal.add_argument("node")
    slow = named("slow", "re-shape a node's link to another rate, both directions")
    slow.add_argument("node")
    slow.add_argument("rate", help="e.g. 1gbit")


def _error(msg: str) -> int:
    print(f"linscale: error: {msg}", file=sys.stderr, flush=True)
    return 2


def run_cli(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    if not args.action:
        args.cluster_parser.print_help()
        return 2
    try:
        return ACTIONS[args.action](args, rest)
    except ClusterError as e:
        return _error(str(e))
    except KeyboardInterrupt:
        return _error("interrupted")


def _up(args: argparse.Namespace, rest: list[str]) -> int:
    _no_extra(rest)
    # Check everything the user typed before asking for root.
    check_name(args.name, max(args.nodes, 1))
    rate, latency = parse_rate(args.link), parse_latency(args.latency) if args.latency else 0
    loss = parse_loss(args.loss) if args.loss else 0.0
    c = Cluster.up(args.nodes, rate, latency, loss, name=args.name, subnet=args.subnet)
    st = c.state
    shape = format_rate(st.rate)
    if st.latency_us:
        shape += f", latency {format_latency(st.latency_us)}"
    if st.loss_pct:
        shape += f", loss {format_loss(st.loss_pct)}"
    if st.delay == "relay":
        shape += " (latency/loss through a relay process: this kernel has no netem)"
    print(f"linscale: cluster {c.name!r} is up: {c.nodes} nodes on {st.subnet}, links {shape}")
    for rank, addr in enumerate(c.addresses):
        print(f"  node {rank}: {c.netns(rank)} {addr}")
    print(f"run a command on every node: linscale cluster run --name {c.name} -- CMD")
    print(f"remove it: linscale cluster down --name {c.name}")
    return 0


def _down(args: argparse.Namespace, rest: list[str]) -> int:
    _no_extra(rest)
    removed = down(args.name)
    if removed:
        print(f"linscale: removed cluster {args.name!r}: {', '.join(removed)}")
    else:
        print(f"linscale: nothing to remove for cluster {args.name!r}")
    return 0


def _status(args: argparse.Namespace, rest: list[str]) -> int:
    _no_extra(rest)
    check_host()
    c = Cluster.open(args.name)
    st = c.state
    how = {"none": "", "netem": ", latency/loss by netem"}.get(st.delay, "")
    if st.delay == "relay":
        how = f", latency/loss by relay pid {st.relay_pid} ({'running' if c.relay_running() else 'NOT RUNNING'})"
    print(f"cluster {c.name}: {c.nodes} nodes on {st.subnet}, bridge {c.name}-br{how}")
    header = ("NODE", "NETNS", "ADDRESS", "RATE", "LATENCY", "LOSS", "LINK", "PROCS")
    rows = [header] + [
        (str(s.rank), s.netns, s.address, s.rate, s.latency, s.loss, s.link, str(s.processes)) for s in c.status()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _run_on_nodes(c: Cluster, cmd, node, timeout: float | None) -> int:
    # A SIGTERM (from a job scheduler, say) stops the nodes as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        result = c.run(cmd, node=node, timeout=timeout)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return _report(result, timeout)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _report(result: RunResult, timeout: float | None) -> int:
    if result.timed_out:
        print(f"linscale: error: timed out after {timeout:g}s; stopped every node", file=sys.stderr, flush=True)
    elif result.interrupted:
        print("linscale: interrupted; stopped every node", file=sys.stderr, flush=True)
    elif result.failed_node is not None:
        code = result.codes[result.failed_node]
        how = f"exit code {code}" if code is not None and code >= 0 else f"signal {-(code or 0)}"
        others = [r for r in result.codes if r != result.failed_node]
        tail = "; stopped the other nodes" if others else ""
        print(f"linscale: node {result.failed_node} failed with {how}{tail}", file=sys.stderr, flush=True)
    return result.returncode


def _run(args: argparse.Namespace, rest: list[str]) -> int:
    cmd = list(args.cmd) + list(rest)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise ClusterError("no command to run: give one after --, e.g. linscale cluster run -- hostname -I")
    check_host()
    c = Cluster.open(args.name)
    node = c.check_node(args.node) if args.node is not None else None
    return _run_on_nodes(c, cmd, node, args.timeout)


def _job(args: argparse.Namespace, rest: list[str]) -> int:
    extra = list(args.args) + list(rest)
    if extra and extra[0] == "--":
        extra = extra[1:]
    linscale_args = [args.task, *extra] if args.action == "train" else extra
    check_host()
    c = Cluster.open(args.name)
    if not any(a.split("=")[0] == "--nproc-per-node" for a in linscale_args):
        # The emulated nodes share this machine's cores: without a GPU, give each node its share.
        cores = len(os.sched_getaffinity(0))
        linscale_args.append(f"--nproc-per-node={max(1, cores // c.nodes)}")

    def cmd(rank: int) -> list[str]:
        return node_command(args.action, linscale_args, c.nodes, rank, c.master_addr, args.master_port)

    return _run_on_nodes(c, cmd, None, args.timeout)


def _fault(args: argparse.Namespace, rest: list[str]) -> int:
    _no_extra(rest)
    parse_node(args.node)
    bits = parse_rate(args.rate) if args.action == "slow" else 0
    check_host()
    c = Cluster.open(args.name)
    rank = c.check_node(args.node)
    where = f"node {rank} ({c.netns(rank)})"
    if args.action == "kill":
        pids = c.kill(rank)
        print(f"linscale: killed {len(pids)} process(es) on {where}")
    elif args.action == "cut":
        c.cut(rank)
        print(f"linscale: cut the link of {where}; `linscale cluster heal --name {c.name} {rank}` restores it")
    elif args.action == "heal":
        c.heal(rank)
        print(f"linscale: the link of {where} is up")
    else:
        c.slow(rank, bits)
        print(f"linscale: the link of {where} now runs at {format_rate(bits)} in both directions")
    return 0


def _no_extra(rest: list[str]) -> None:
    if rest:
        raise ClusterError(f"unexpected arguments: {' '.join(rest)}")


ACTIONS = {
    "up": _up,
    "down": _down,
    "status": _status,
    "run": _run,
    "train": _job,
    "doctor": _job,
    "kill": _fault,
    "cut": _fault,
    "heal": _fault,
    "slow": _fault,
}
