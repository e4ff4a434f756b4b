"""Process groups and the few collectives the training loop needs, in one place."""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from linscale.runtime.device import Device
from linscale.runtime.topology import Topology


def init(topo: Topology, device: Device, timeout_s: float) -> None:
    """Join the job's process group (a no-op for a single process)."""
    if not topo.distributed or dist.is_initialized():
        return
    # The elastic agent hands its workers MASTER_ADDR/PORT, RANK and WORLD_SIZE (env://);
    # under srun or mpirun the topology was read from their variables, so it is passed on.
    init = (
        {}
        if topo.launcher == "torchrun"
        else {
            "init_method": f"tcp://{topo.master_addr}:{topo.master_port}",
            "rank": topo.rank,
            "world_size": topo.world_size,
        }
    )
    dist.init_process_group(
        backend=device.backend,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device.torch_device if device.type == "cuda" else None,
        **init,
    )
    assert dist.get_world_size() == topo.world_size, (dist.get_world_size(), topo)
    _learn_peers(topo)


# Where every rank lives, so that a lost connection can be named by node and rank.
_PEERS: list[tuple[int, int, str, str]] = []  # (rank, node_rank, ip, hostname)


def _learn_peers(topo: Topology) -> None:
    import socket

    from linscale.runtime.network import local_ip_toward

    try:
        ip = local_ip_toward(topo.master_addr)
    except ValueError:
        ip = "?"
    box: list[Any] = [None] * topo.world_size
    dist.all_gather_object(box, (topo.rank, topo.node_rank, ip, socket.gethostname()))
    _PEERS[:] = box


def describe_lost_peer(error: BaseException) -> str:
    """Name the node and ranks behind the peer address in a gloo/NCCL connection error."""
    import re

    text = str(error)
    match = re.search(r"\[(?:::ffff:)?([0-9.]+)\]:\d+", text)
    where = "a peer"
    if match and _PEERS:
        ip = match.group(1)
        ranks = [r for r, _, addr, _ in _PEERS if addr == ip]
        nodes = sorted({n for r, n, addr, _ in _PEERS if addr == ip})
        if ranks:
            node_text = "node " + ", ".join(map(str, nodes))
            where = f"{node_text} ({ip}, rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})"
        else:
            where = f"the peer at {ip}"
    kind = "timed out" if "imeout" in text or "timed out" in text else "closed"
    return (
        f"peer lost: the connection to {where} {kind}: its processes ended or its link is down; "
        "the first failing rank's own message, if any, is above"
    )


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of `t` ("sum", "max" or "avg"); identity for a single process."""
    if active():
        if op == "avg":
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= dist.get_world_size()
        else:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def hard_exit(code: int) -> None:
    """Leave without tearing down the process group: a failing rank can hang in
    destroy_process_group while its peers wait in a collective."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
