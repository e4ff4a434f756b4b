"""linscale.runtime.topology under srun and MPI launchers: host lists, task layouts, precedence."""

from __future__ import annotations

import pytest

from linscale.runtime.topology import (
    DEFAULT_MASTER_PORT,
    Topology,
    check_node_launchers,
    derived_port,
    detect,
    expand_hostlist,
    parse_tasks_per_node,
    under_srun,
)

# --------------------------------------------------------------------------------------------
# Host lists


@pytest.mark.parametrize(
    ("hostlist", "expected"),
    [
        ("node01", ["node01"]),
        ("a,b,c", ["a", "b", "c"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("node[01-03]", ["node01", "node02", "node03"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
        ("node[8-11]", ["node8", "node9", "node10", "node11"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("node[1,3,5]", ["node1", "node3", "node5"]),
        ("node[01-03,07],gpu-a[1-2]", ["node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2"]),
        ("login,node[1-2],gpu-[7]", ["login", "node1", "node2", "gpu-7"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("rack[1-2]-node[1-2]-ib", ["rack1-node1-ib", "rack1-node2-ib", "rack2-node1-ib", "rack2-node2-ib"]),
        ("[1-2]x", ["1x", "2x"]),
        ("node-1.cluster,node-2.cluster", ["node-1.cluster", "node-2.cluster"]),
        ("node[5]", ["node5"]),
        ("node[1-2], login ", ["node1", "node2", "login"]),
        ("", []),
    ],
)
def test_expand_hostlist(hostlist, expected):
    assert expand_hostlist(hostlist) == expected


@pytest.mark.parametrize(
    "hostlist",
    ["node[1-3", "node1-3]", "node[]", "node[a-b]", "node[3-1]", "node[1-2]]", "node[[1-2]]", "node[1-]"],
)
def test_bad_hostlist_is_rejected_with_the_list_named(hostlist):
    with pytest.raises(ValueError, match="bad host list"):
        expand_hostlist(hostlist)


# --------------------------------------------------------------------------------------------
# Tasks per node


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4", [4]),
        ("2(x3)", [2, 2, 2]),
        ("2(x3),1", [2, 2, 2, 1]),
        ("1,2(x2),3", [1, 2, 2, 3]),
        ("8(x1)", [8]),
    ],
)
def test_parse_tasks_per_node(text, expected):
    assert parse_tasks_per_node(text) == expected


@pytest.mark.parametrize("text", ["", "2x3", "2(3)", "two", "2(x3),"])
def test_bad_tasks_per_node(text):
    with pytest.raises(ValueError, match="tasks-per-node"):
        parse_tasks_per_node(text)


# --------------------------------------------------------------------------------------------
# srun


def srun_env(rank: int, per_node: list[int], nodelist: str = "node[01-04]", **extra: str) -> dict[str, str]:
    """The variables srun gives task `rank` of a step laid out in blocks, `per_node[i]` tasks on node i."""
    node, first = 0, 0
    while rank >= first + per_node[node]:
        first += per_node[node]
        node += 1
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOBID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_STEPID": "0",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank - first),
        "SLURM_NODEID": str(node),
        "SLURM_NTASKS": str(sum(per_node)),
        "SLURM_NPROCS": str(sum(per_node)),
        "SLURM_NNODES": str(len(per_node)),
        "SLURM_JOB_NUM_NODES": str(len(per_node)),
        "SLURM_STEP_NUM_NODES": str(len(per_node)),
        "SLURM_STEP_NUM_TASKS": str(sum(per_node)),
        "SLURM_STEP_TASKS_PER_NODE": ",".join(map(str, per_node)),
        "SLURM_TASKS_PER_NODE": ",".join(map(str, per_node)),
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_STEP_NODELIST": nodelist,
    }
    env.update(extra)
    return env


@pytest.mark.parametrize("per_node", [[1], [2], [1, 1], [4, 4], [2, 2, 2, 1], [3, 1]])
def test_srun_every_task(per_node):
    world = sum(per_node)
    seen = set()
    for rank in range(world):
        topo = detect(srun_env(rank, per_node))
        assert topo.launcher == "slurm" and topo.distributed
        assert topo.rank == rank and topo.world_size == world
        assert topo.num_nodes == len(per_node)
        assert topo.local_world_size == per_node[topo.node_rank]
        assert topo.master_addr == "node01"
        assert topo.master_port == derived_port("slurm:4242.0")
        assert topo.is_main == (rank == 0)
        seen.add((topo.node_rank, topo.local_rank))
    assert len(seen) == world


def test_srun_full_topology():
    topo = detect(srun_env(5, [4, 4]))
    assert topo == Topology(
        rank=5,
        local_rank=1,
        world_size=8,
        local_world_size=4,
        node_rank=1,
        num_nodes=2,
        master_addr="node01",
        master_port=derived_port("slurm:4242.0"),
        launcher="slurm",
    )


def test_srun_compressed_tasks_per_node():
    env = srun_env(6, [2, 2, 2, 1])
    env["SLURM_STEP_TASKS_PER_NODE"] = env["SLURM_TASKS_PER_NODE"] = "2(x3),1"
    topo = detect(env)
    assert (topo.node_rank, topo.local_rank, topo.local_world_size) == (3, 0, 1)
    env = srun_env(1, [2, 2, 2, 1])
    env["SLURM_STEP_TASKS_PER_NODE"] = "2(x3),1"
    assert detect(env).local_world_size == 2


def test_srun_master_is_the_first_host_of_the_step():
    env = srun_env(3, [2, 2], nodelist="gpu-b[07-08]", SLURM_JOB_NODELIST="login,gpu-b[07-09]")
    assert detect(env).master_addr == "gpu-b07"
    del env["SLURM_STEP_NODELIST"]
    assert detect(env).master_addr == "login"


def test_srun_master_addr_and_port_from_the_environment_win():
    topo = detect(srun_env(0, [2, 2], MASTER_ADDR="10.0.0.5", MASTER_PORT="31234"))
    assert (topo.master_addr, topo.master_port) == ("10.0.0.5", 31234)


def test_srun_derived_port_is_per_job_and_step_and_in_range():
    ports = {
        detect(srun_env(0, [2], SLURM_JOB_ID=str(job), SLURM_STEP_ID=str(step))).master_port
        for job in range(1000, 1040)
        for step in range(3)
    }
    assert len(ports) > 100  # different jobs and steps rarely share a port
    assert all(20000 <= p < 32768 for p in ports)  # below Linux's ephemeral ports
    # Every task of a step agrees, whatever its rank.
    assert len({detect(srun_env(r, [2, 2])).master_port for r in range(4)}) == 1


def test_srun_without_job_id_uses_the_default_port():
    env = srun_env(0, [2])
    del env["SLURM_JOB_ID"], env["SLURM_JOBID"]
    assert detect(env).master_port == DEFAULT_MASTER_PORT


def test_srun_older_variable_names():
    env = srun_env(1, [2, 2])
    for new in (
        "SLURM_STEP_ID",
        "SLURM_STEP_NUM_NODES",
        "SLURM_STEP_NUM_TASKS",
        "SLURM_STEP_TASKS_PER_NODE",
        "SLURM_STEP_NODELIST",
        "SLURM_NNODES",
    ):
        del env[new]
    topo = detect(env)
    assert (topo.launcher, topo.world_size, topo.num_nodes, topo.local_world_size) == ("slurm", 4, 2, 2)


def test_srun_ntasks_per_node_when_nothing_else_says():
    env = srun_env(3, [2, 2])
    del env["SLURM_STEP_TASKS_PER_NODE"], env["SLURM_TASKS_PER_NODE"]
    env["SLURM_NTASKS_PER_NODE"] = "2"
    assert detect(env).local_world_size == 2


def test_srun_step_layout_beats_the_jobs_ntasks_per_node():
    # `srun -n 1` inside `sbatch --ntasks-per-node=2`: the job's request stays in the environment.
    env = srun_env(0, [1], nodelist="vm", SLURM_NTASKS_PER_NODE="2")
    topo = detect(env)
    assert (topo.world_size, topo.local_world_size) == (1, 1)


def test_srun_single_node_needs_no_layout_or_nodelist():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "3", "SLURM_LOCALID": "1"}
    topo = detect(env)
    assert topo == Topology(1, 1, 2, 2, 0, 1, "127.0.0.1", DEFAULT_MASTER_PORT, "slurm")


def test_sbatch_batch_script_is_not_a_task():
    # The batch script has a rank and a task count, but no step.
    env = srun_env(0, [2])
    del env["SLURM_STEP_ID"], env["SLURM_STEPID"]
    assert not under_srun(env)
    assert detect(env) == Topology()


def test_fewer_tasks_than_the_job_asks_for():
    env = srun_env(0, [1])
    del env["SLURM_STEP_TASKS_PER_NODE"], env["SLURM_TASKS_PER_NODE"]
    env.update(SLURM_NNODES="2", SLURM_STEP_NUM_NODES="2", SLURM_NTASKS_PER_NODE="2", SLURM_NTASKS="1")
    with pytest.raises(ValueError) as err:
        detect(env)
    msg = str(err.value)
    assert "SLURM started 1 task(s)" in msg and "means 4" in msg
    assert "fewer tasks than the job asks for" in msg and "--ntasks=4" in msg


def test_more_tasks_than_the_layout_says():
    env = srun_env(0, [2, 2], SLURM_NTASKS="5")
    with pytest.raises(ValueError, match="contradict"):
        detect(env)


def test_layout_with_the_wrong_number_of_nodes():
    env = srun_env(0, [2, 2], SLURM_STEP_TASKS_PER_NODE="4")
    with pytest.raises(ValueError, match="SLURM started 4 task"):
        detect(env)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"SLURM_PROCID": "4"}, "SLURM_PROCID=4 is outside"),
        ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2 is outside"),
        ({"SLURM_LOCALID": "2"}, "SLURM_LOCALID=2 is outside"),
        ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not an integer"),
        ({"SLURM_STEP_TASKS_PER_NODE": "2(3)"}, "tasks-per-node"),
        ({"SLURM_STEP_NODELIST": "node[1-"}, "bad host list"),
    ],
)
def test_srun_inconsistent_variables(change, match):
    with pytest.raises(ValueError, match=match):
        detect(srun_env(0, [2, 2], **change))


def test_srun_several_nodes_without_layout_or_nodelist():
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_ID": "0",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "0",
        "SLURM_LOCALID": "0",
    }
    with pytest.raises(ValueError, match="cannot tell how many"):
        detect(env)
    env["SLURM_NTASKS_PER_NODE"] = "1"
    with pytest.raises(ValueError, match="set MASTER_ADDR"):
        detect(env)
    env["MASTER_ADDR"] = "head"
    assert detect(env).master_addr == "head"


# --------------------------------------------------------------------------------------------
# MPI


def ompi_env(rank: int, world: int, local_world: int, **extra: str) -> dict[str, str]:
    """What Open MPI 4.1's mpirun exports (checked on Debian 12 with `mpirun -np 2 env`)."""
    env = {
        "OMPI_COMM_WORLD_RANK": str(rank),
        "OMPI_COMM_WORLD_SIZE": str(world),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(rank % local_world),
        "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_world),
        # The rank among all jobs' processes on the node, not the node's index.
        "OMPI_COMM_WORLD_NODE_RANK": str(rank % local_world),
        "OMPI_UNIVERSE_SIZE": str(world),
        "OMPI_MCA_ess_base_jobid": "1269628929",
        "OMPI_MCA_ess_base_vpid": str(rank),
        "OMPI_MCA_orte_num_nodes": str(world // local_world),
        "PMIX_RANK": str(rank),
        "PMIX_NAMESPACE": "1269628929",
        "PMIX_ID": f"1269628929.{rank}",
    }
    env.update(extra)
    return env


def hydra_env(rank: int, world: int, local_world: int, **extra: str) -> dict[str, str]:
    env = {
        "PMI_RANK": str(rank),
        "PMI_SIZE": str(world),
        "PMI_FD": str(6 + rank),
        "MPI_LOCALRANKID": str(rank % local_world),
        "MPI_LOCALNRANKS": str(local_world),
    }
    env.update(extra)
    return env


def test_open_mpi_one_node():
    for rank in range(2):
        topo = detect(ompi_env(rank, 2, 2))
        assert topo == Topology(rank, rank, 2, 2, 0, 1, "127.0.0.1", derived_port("mpi:1269628929"), "mpi")


@pytest.mark.parametrize(("world", "local_world"), [(8, 4), (6, 2), (4, 1)])
def test_open_mpi_several_nodes(world, local_world):
    seen = set()
    for rank in range(world):
        topo = detect(ompi_env(rank, world, local_world, MASTER_ADDR="node01", MASTER_PORT="29600"))
        assert topo.launcher == "mpi"
        assert (topo.rank, topo.world_size, topo.local_world_size) == (rank, world, local_world)
        assert topo.local_rank == rank % local_world
        assert topo.node_rank == rank // local_world  # not OMPI_COMM_WORLD_NODE_RANK
        assert topo.num_nodes == world // local_world
        assert (topo.master_addr, topo.master_port) == ("node01", 29600)
        seen.add((topo.node_rank, topo.local_rank))
    assert len(seen) == world


def test_mpi_on_several_nodes_without_master_addr_names_the_fix():
    with pytest.raises(ValueError) as err:
        detect(ompi_env(3, 4, 2))
    msg = str(err.value)
    assert "MASTER_ADDR" in msg and "rank 0's node" in msg and "mpirun -x MASTER_ADDR" in msg


def test_mpich_hydra():
    topo = detect(hydra_env(3, 4, 2, MASTER_ADDR="n1"))
    assert topo == Topology(3, 1, 4, 2, 1, 2, "n1", DEFAULT_MASTER_PORT, "mpi")
    assert detect(hydra_env(1, 2, 2)).master_addr == "127.0.0.1"


def test_cray_pmi_local_variables():
    env = {"PMI_RANK": "5", "PMI_SIZE": "8", "PMI_LOCAL_RANK": "1", "PMI_LOCAL_SIZE": "4", "MASTER_ADDR": "x"}
    topo = detect(env)
    assert (topo.local_rank, topo.local_world_size, topo.node_rank, topo.num_nodes) == (1, 4, 1, 2)


def test_pmix_with_size_from_another_variable():
    env = {
        "PMIX_RANK": "1",
        "PMIX_NAMESPACE": "prterun-vm-123@1",
        "PMI_SIZE": "2",
        "MPI_LOCALRANKID": "1",
        "MPI_LOCALNRANKS": "2",
    }
    topo = detect(env)
    assert (topo.launcher, topo.rank, topo.world_size, topo.local_rank) == ("mpi", 1, 2, 1)
    assert topo.master_port == derived_port("mpi:prterun-vm-123@1")
    env = {"PMIX_RANK": "0", "PMIX_SIZE": "4", "PMIX_LOCAL_RANK": "0", "PMIX_LOCAL_SIZE": "4"}
    assert detect(env).world_size == 4


def test_pmix_without_a_size_is_an_error():
    with pytest.raises(ValueError, match="number of ranks is unknown"):
        detect({"PMIX_RANK": "0", "PMIX_NAMESPACE": "x"})


def test_mpi_without_local_ranks_is_an_error_unless_alone():
    with pytest.raises(ValueError, match="which ranks share a node"):
        detect({"PMI_RANK": "0", "PMI_SIZE": "2"})
    assert detect({"PMI_RANK": "0", "PMI_SIZE": "1"}).world_size == 1


@pytest.mark.parametrize(
    ("env", "match"),
    [
        (ompi_env(2, 2, 2), "OMPI_COMM_WORLD_RANK=2 is outside"),
        (ompi_env(1, 2, 2, OMPI_COMM_WORLD_LOCAL_RANK="2"), "do not fit"),
        (ompi_env(1, 2, 2, OMPI_COMM_WORLD_LOCAL_SIZE="3"), "do not fit"),
        (hydra_env(0, 2, 2, PMI_SIZE="two"), "PMI_SIZE='two' is not an integer"),
    ],
)
def test_mpi_inconsistent_variables(env, match):
    with pytest.raises(ValueError, match=match):
        detect(env)


def test_mpi_port_from_the_environment_and_the_default():
    assert detect(ompi_env(0, 2, 2, MASTER_PORT="1234")).master_port == 1234
    env = ompi_env(0, 2, 2)
    del env["OMPI_MCA_ess_base_jobid"], env["PMIX_NAMESPACE"]
    assert detect(env).master_port == DEFAULT_MASTER_PORT
    # Open MPI's own job id first, PMIx's namespace otherwise.
    assert detect({**env, "PMIX_NAMESPACE": "ns"}).master_port == derived_port("mpi:ns")
    assert detect({**env, "PMIX_NAMESPACE": "ns", "OMPI_MCA_ess_base_jobid": "7"}).master_port == derived_port("mpi:7")


# --------------------------------------------------------------------------------------------
# Precedence


def test_torchrun_worker_inside_an_srun_task_stays_torchrun():
    env = srun_env(1, [1, 1])
    env.update(
        RANK="3",
        LOCAL_RANK="1",
        WORLD_SIZE="4",
        LOCAL_WORLD_SIZE="2",
        GROUP_RANK="1",
        TORCHELASTIC_RUN_ID="x",
        MASTER_ADDR="node01",
        MASTER_PORT="29500",
    )
    topo = detect(env)
    assert (topo.launcher, topo.rank, topo.world_size, topo.local_world_size) == ("torchrun", 3, 4, 2)


def test_torchrun_worker_under_mpirun_stays_torchrun():
    env = ompi_env(0, 2, 1, MASTER_ADDR="node01")
    env.update(RANK="1", LOCAL_RANK="1", WORLD_SIZE="4", TORCHELASTIC_RUN_ID="x")
    assert detect(env).launcher == "torchrun"


def test_mpirun_inside_a_slurm_allocation_is_mpi():
    # Open MPI's daemons were started by srun, one per node: their SLURM variables describe
    # the daemon (task 1 of 2), not the rank (rank 2 of 4).
    env = ompi_env(2, 4, 2, MASTER_ADDR="node01")
    env.update(srun_env(1, [1, 1]))
    topo = detect(env)
    assert (topo.launcher, topo.rank, topo.world_size, topo.local_rank, topo.node_rank) == ("mpi", 2, 4, 0, 1)


def test_mpirun_in_a_batch_script_is_mpi():
    # On one node mpirun starts the ranks itself; they inherit the batch script's variables.
    env = ompi_env(1, 2, 2)
    env.update({k: v for k, v in srun_env(0, [2]).items() if k not in ("SLURM_STEP_ID", "SLURM_STEPID")})
    assert detect(env).launcher == "mpi"


def test_srun_with_an_mpi_plugin_is_slurm():
    # srun --mpi=pmix / pmi2 sets MPI variables that agree with its own.
    env = srun_env(3, [2, 2], PMIX_RANK="3", PMIX_NAMESPACE="slurm.pmix.4242.0")
    topo = detect(env)
    assert (topo.launcher, topo.rank, topo.master_addr) == ("slurm", 3, "node01")
    env = srun_env(1, [2, 2], PMI_RANK="1", PMI_SIZE="4", PMI_JOBID="4242.0")
    assert detect(env).launcher == "slurm"
    env = srun_env(1, [2, 2], PMI_RANK="1")  # no PMI_SIZE: SLURM still knows
    assert detect(env).launcher == "slurm"


def test_unrelated_variables_stay_single():
    env = {"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "OMPI_MCA_foo": "1", "PMI_FD": "3", "MASTER_ADDR": "x"}
    assert detect(env) == Topology()


# --------------------------------------------------------------------------------------------
# srun/mpirun tasks as node launchers (--nproc-per-node)


def test_one_launcher_task_per_node_matching_nnodes_passes():
    for rank in range(2):
        check_node_launchers(detect(srun_env(rank, [1, 1])), 2, 2)
    check_node_launchers(detect(srun_env(0, [1, 1])), 1, 4)  # elastic MIN:MAX
    check_node_launchers(Topology(), 2, 2)  # not under srun/mpirun: nothing to check here
    check_node_launchers(detect({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "8"}), 2, 2)


def test_fewer_launcher_tasks_than_nnodes():
    # `srun -n 1 linscale train --nnodes 2 --nproc-per-node 4 ...`
    with pytest.raises(ValueError) as err:
        check_node_launchers(detect(srun_env(0, [1], nodelist="node01")), 2, 2)
    msg = str(err.value)
    assert "--nnodes 2 but srun started 1 task(s)" in msg and "fewer tasks than asked" in msg
    assert "--ntasks-per-node=1" in msg
    with pytest.raises(ValueError, match="--nnodes 2:4 but srun started 1 task"):
        check_node_launchers(detect(srun_env(0, [1], nodelist="node01")), 2, 4)


def test_more_launcher_tasks_than_nnodes():
    with pytest.raises(ValueError) as err:
        check_node_launchers(detect(srun_env(0, [1, 1, 1])), 2, 2)
    assert "srun started 3 task(s)" in str(err.value) and "fewer" not in str(err.value)


def test_several_launcher_tasks_on_a_node():
    with pytest.raises(ValueError, match="srun started 2 tasks on this node"):
        check_node_launchers(detect(srun_env(0, [2, 2])), 2, 2)
    with pytest.raises(ValueError, match="mpirun --map-by ppr:1:node"):
        check_node_launchers(detect(ompi_env(0, 4, 2, MASTER_ADDR="n")), 2, 2)


def test_torchrun_node_count_comes_from_the_agent_when_stated():
    from linscale.runtime.topology import detect

    env = {
        "TORCHELASTIC_RUN_ID": "x",
        "RANK": "3",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "5",
        "LOCAL_WORLD_SIZE": "1",
        "GROUP_RANK": "3",
        "GROUP_WORLD_SIZE": "5",
        "MASTER_ADDR": "n0",
        "MASTER_PORT": "29500",
    }
    topo = detect(env)
    assert (topo.num_nodes, topo.node_rank, topo.replicas_per_node) == (5, 3, 1)
    del env["GROUP_WORLD_SIZE"]
    assert detect(env).num_nodes == 5
