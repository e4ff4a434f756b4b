"""linscale.runtime.topology: rank, node and world from the launcher's environment."""

from __future__ import annotations

import pytest

from linscale.runtime.topology import Topology, detect, under_torchrun


def torchrun_env(rank: int, world: int, local_world: int, **extra: str) -> dict[str, str]:
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank % local_world),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(local_world),
        "GROUP_RANK": str(rank // local_world),
        "MASTER_ADDR": "10.1.2.3",
        "MASTER_PORT": "29512",
        "TORCHELASTIC_RUN_ID": "job-1",
    }
    env.update(extra)
    return env


def test_single_process():
    topo = detect({})
    assert topo == Topology()
    assert (topo.rank, topo.world_size, topo.local_rank, topo.local_world_size) == (0, 1, 0, 1)
    assert (topo.node_rank, topo.num_nodes) == (0, 1)
    assert topo.launcher == "single"
    assert not topo.distributed
    assert topo.is_main


def test_single_process_ignores_unrelated_variables():
    assert detect({"RANK": "3", "MASTER_PORT": "1234", "PATH": "/bin"}) == Topology()


def test_explicit_env_wins_over_process_env(monkeypatch):
    for k, v in torchrun_env(5, 8, 4).items():
        monkeypatch.setenv(k, v)
    assert detect({}) == Topology()
    assert detect().rank == 5  # and without a mapping, the process environment is read


@pytest.mark.parametrize(("world", "local_world"), [(1, 1), (2, 2), (8, 4), (6, 2), (12, 3)])
def test_torchrun_every_rank(world, local_world):
    nodes = world // local_world
    seen = set()
    for rank in range(world):
        topo = detect(torchrun_env(rank, world, local_world))
        assert topo.launcher == "torchrun" and topo.distributed
        assert topo.rank == rank
        assert topo.world_size == world
        assert topo.local_world_size == local_world
        assert topo.local_rank == rank % local_world
        assert topo.node_rank == rank // local_world
        assert topo.num_nodes == nodes
        assert topo.master_addr == "10.1.2.3" and topo.master_port == 29512
        assert topo.is_main == (rank == 0)
        seen.add((topo.node_rank, topo.local_rank))
    assert len(seen) == world


def test_node_rank_derived_without_group_rank():
    env = torchrun_env(7, 8, 4)
    del env["GROUP_RANK"]
    topo = detect(env)
    assert (topo.node_rank, topo.num_nodes) == (1, 2)


def test_group_rank_is_used_when_present():
    # The agent's GROUP_RANK is authoritative, even if ranks are not laid out node by node.
    topo = detect(torchrun_env(1, 4, 2, GROUP_RANK="1"))
    assert topo.node_rank == 1


def test_local_world_defaults_to_world():
    env = torchrun_env(1, 2, 2)
    del env["LOCAL_WORLD_SIZE"], env["GROUP_RANK"]
    topo = detect(env)
    assert topo.local_world_size == 2 and topo.num_nodes == 1 and topo.node_rank == 0


def test_master_defaults():
    env = torchrun_env(0, 2, 2)
    del env["MASTER_ADDR"], env["MASTER_PORT"]
    topo = detect(env)
    assert topo.master_addr == "127.0.0.1" and topo.master_port == 0


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"TORCHELASTIC_RUN_ID": "x"}, True),
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, True),
        ({"LOCAL_RANK": "0"}, False),
        ({"WORLD_SIZE": "2", "RANK": "0"}, False),
    ],
)
def test_under_torchrun(env, expected):
    assert under_torchrun(env) is expected


def test_inconsistent_rank_is_rejected():
    with pytest.raises(AssertionError):
        detect(torchrun_env(0, 2, 2, RANK="2"))
