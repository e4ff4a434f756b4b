"""linscale under Open MPI's mpirun: every rank is a worker, as with srun."""

from __future__ import annotations

import shutil
import sys

import pytest

from .slurm_cluster import (
    PRINT_TOPOLOGY,
    STEPS,
    TINY_GPT,
    assert_preprocess_like_one_process,
    assert_same_losses,
    clean_env,
    parse_topologies,
    read_losses,
    read_summary,
    reference_losses,
    run_tagged,
)

pytestmark = [
    pytest.mark.dist,
    pytest.mark.skipif(
        shutil.which("mpirun") is None, reason="Open MPI is not installed (apt-get install openmpi-bin)"
    ),
]

# As root, Open MPI wants both the flag and the variables. --oversubscribe: two ranks even
# where fewer cores are free.
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"]


@pytest.fixture
def env(tmp_path):
    return clean_env(
        OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", XDG_CACHE_HOME=str(tmp_path / "cache")
    )


def test_mpirun_ranks_read_their_topology(env):
    res = run_tagged([*MPIRUN, sys.executable, "-c", PRINT_TOPOLOGY], env=env, timeout=60)
    assert res.returncode == 0, res.output
    topos = parse_topologies(res.stdout)
    assert [t[:6] for t in topos] == [(0, 0, 2, 2, 0, 1), (1, 1, 2, 2, 0, 1)]
    # One node: rank 0 is local; the port comes from Open MPI's job id, the same in both ranks.
    assert {t[6] for t in topos} == {"127.0.0.1"} and {t[8] for t in topos} == {"mpi"}
    assert len({t[7] for t in topos}) == 1 and 20000 <= topos[0][7] < 32000


def test_mpirun_two_ranks_train_like_two_local_processes(env, tmp_path, tmp_path_factory):
    run_dir = tmp_path / "mpi"
    res = run_tagged(
        [*MPIRUN, sys.executable, "-m", "linscale", "train", "gpt", *TINY_GPT, *STEPS, f"--log.dir={run_dir}"],
        env=env,
    )
    assert res.returncode == 0, res.output
    assert read_summary(run_dir)["world_size"] == 2
    assert res.stdout.count("***** train metrics *****") == 1
    assert_same_losses(read_losses(run_dir), reference_losses(tmp_path_factory.getbasetemp()))


def test_mpirun_over_several_nodes_without_master_addr_says_what_to_pass(env):
    # Two "nodes" of one rank each, as Open MPI would describe them; the worker stops with the fix.
    res = run_tagged(
        [
            *MPIRUN,
            "env",
            "OMPI_COMM_WORLD_LOCAL_RANK=0",
            "OMPI_COMM_WORLD_LOCAL_SIZE=1",
            sys.executable,
            "-m",
            "linscale",
            "train",
            "gpt",
            *TINY_GPT,
        ],
        env=env,
        timeout=60,
    )
    assert res.returncode != 0
    assert "MASTER_ADDR" in res.output and "rank 0's node" in res.output, res.output


def test_mpirun_two_ranks_preprocess_like_one_process(env, tmp_path):
    assert_preprocess_like_one_process(MPIRUN, env, tmp_path)
