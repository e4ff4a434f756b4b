"""What the job-running subcommands (train, doctor) share: launch options and error output."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable

from linscale.runtime.launch import LaunchError, LaunchSpec, is_consequence, parse_nnodes


def error(msg: str) -> int:
    print(f"linscale: error: {msg}", file=sys.stderr, flush=True)
    return 2


def add_launch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launch (one node by default; see docs/multinode.md)")
    g.add_argument(
        "--nproc-per-node",
        type=int,
        default=0,
        help="worker processes on this machine (default: 1 per GPU, or 2 on CPU)",
    )
    g.add_argument("--nnodes", default="1", help="number of nodes, N or MIN:MAX for an elastic job (default: 1)")
    g.add_argument("--node-rank", type=int, default=None, help="this node's rank, 0..N-1 (static multi-node)")
    g.add_argument(
        "--master-addr", default="127.0.0.1", help="address of node 0 as the other nodes reach it (default: 127.0.0.1)"
    )
    g.add_argument(
        "--master-port",
        type=int,
        default=0,
        help="rendezvous port (default: free port on one node, 29500 across nodes)",
    )
    g.add_argument("--rdzv-endpoint", default="", help="HOST:PORT of an elastic c10d rendezvous (not with --node-rank)")
    g.add_argument(
        "--join-timeout", type=float, default=300.0, help="seconds to wait for every node to join (default: 300)"
    )
    g.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="when a worker or node fails, restart every worker up to K times; they resume from the newest "
        "checkpoint (default: 0)",
    )


def launch_spec(args: argparse.Namespace, nproc: int) -> LaunchSpec:
    lo, hi = parse_nnodes(args.nnodes)
    return LaunchSpec(
        nproc_per_node=nproc,
        min_nodes=lo,
        max_nodes=hi,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        rdzv_endpoint=args.rdzv_endpoint,
        join_timeout=args.join_timeout,
        max_restarts=getattr(args, "max_restarts", 0),
    )


def run_as_worker(body: Callable[[], None], user_errors: tuple[type[BaseException], ...]) -> int:
    """Run one worker's part of a job. On failure, say why once, record the error for the
    elastic agent and exit hard; a rank that failed because a peer died names that peer."""
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    from linscale.runtime import topology
    from linscale.runtime.dist import describe_lost_peer, hard_exit

    try:
        body()
    except BaseException as e:  # noqa: BLE001 - every failure must reach the agent
        rank = topology.detect().rank
        if is_consequence(e):
            e = LaunchError(describe_lost_peer(e))
            print(f"linscale: rank {rank} stopped, {e}", file=sys.stderr, flush=True)
        elif isinstance(e, user_errors):
            print(f"linscale: error on rank {rank}: {e}", file=sys.stderr, flush=True)
        else:
            print(f"linscale: rank {rank} failed:", file=sys.stderr, flush=True)
            traceback.print_exc()
        get_error_handler().record_exception(e)
        hard_exit(1)
    # The process group is already destroyed; skipping the interpreter's teardown avoids
    # an intermittent abort in gloo's threads at exit ("terminate called without an
    # active exception") that would turn a finished job into a failed one.
    hard_exit(0)
    return 0


def role(args: argparse.Namespace) -> str:
    """ "worker" or "launcher" for this process (ValueError when the launcher's variables are wrong).

    Under the elastic agent every process is a worker. Under srun or mpirun each task of a
    several-task job is a worker too, unless --nproc-per-node makes it its node's launcher; a
    lone task (an interactive `srun --pty bash`, say) launches like a plain command."""
    from linscale.runtime import topology

    topo = topology.detect()
    if topo.launcher == "torchrun" or (topo.distributed and topo.world_size > 1 and not args.nproc_per_node):
        return "worker"
    return "launcher"


def check_launcher(spec: LaunchSpec) -> None:
    """Under srun or mpirun with --nproc-per-node, one task per node and as many as --nnodes."""
    from linscale.runtime import topology

    topo = topology.detect()
    if topo.distributed:
        topology.check_node_launchers(topo, spec.min_nodes, spec.max_nodes)
