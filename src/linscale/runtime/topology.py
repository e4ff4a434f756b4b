"""Who am I: rank, local rank, node and world, read once from the launcher's variables.

This is the only module that reads the launcher contract from the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    # "single" (one process, no process group), "torchrun" (the elastic agent, ours or the
    # user's), "slurm" (a task of srun) or "mpi" (a rank of mpirun/mpiexec).
    launcher: str = "single"

    def __post_init__(self) -> None:
        assert 0 <= self.rank < self.world_size, self
        assert 0 <= self.local_rank < self.local_world_size, self

    @property
    def distributed(self) -> bool:
        return self.launcher != "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def replicas_per_node(self) -> int:
        return self.local_world_size


def under_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """True inside a worker started by torchrun / the elastic agent."""
    env = os.environ if env is None else env
    return "TORCHELASTIC_RUN_ID" in env or ("LOCAL_RANK" in env and "WORLD_SIZE" in env)


def detect(env: Mapping[str, str] | None = None) -> Topology:
    """Read the topology of this process from the launcher's environment variables."""
    env = os.environ if env is None else env
    if not under_torchrun(env):
        return Topology()
    world = int(env["WORLD_SIZE"])
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    return Topology(
        rank=int(env["RANK"]),
        local_rank=int(env["LOCAL_RANK"]),
        world_size=world,
        local_world_size=local_world,
        node_rank=int(env.get("GROUP_RANK", int(env["RANK"]) // max(local_world, 1))),
        num_nodes=max(1, world // max(local_world, 1)),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", 0)),
        launcher="torchrun",
    )
