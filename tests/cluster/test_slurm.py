"""linscale under a real SLURM (one node, daemons started for the module): srun tasks as workers,
`linscale slurm` batch scripts, and the messages for jobs SLURM gives too little."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from linscale.cluster.slurm import SlurmError, SlurmJob, render_script

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
    slurm_cluster,
)

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def slurm():
    with slurm_cluster() as cluster:
        yield cluster


@pytest.fixture
def env(slurm, tmp_path):
    return {**slurm.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}


def test_srun_tasks_read_their_topology(slurm, env):
    res = run_tagged(["srun", "-n", "2", "-t", "2", sys.executable, "-c", PRINT_TOPOLOGY], env=env, timeout=60)
    assert res.returncode == 0, res.output
    (r0, l0, w0, lw0, n0, nn0, addr0, port0, how0), (r1, l1, *rest1) = parse_topologies(res.stdout)
    assert (r0, l0, w0, lw0, n0, nn0, how0) == (0, 0, 2, 2, 0, 1, "slurm")
    assert (r1, l1) == (1, 1)
    assert addr0 == slurm.node and 20000 <= port0 < 32000
    assert rest1 == [w0, lw0, n0, nn0, addr0, port0, how0]  # every task agrees on the rest


def test_srun_two_tasks_train_like_two_local_processes(env, tmp_path, tmp_path_factory):
    run_dir = tmp_path / "srun"
    res = run_tagged(
        [
            "srun",
            "-n",
            "2",
            "-t",
            "5",
            "--kill-on-bad-exit=1",
            sys.executable,
            "-m",
            "linscale",
            "train",
            "gpt",
            *TINY_GPT,
            *STEPS,
            f"--log.dir={run_dir}",
        ],
        env=env,
    )
    assert res.returncode == 0, res.output
    assert read_summary(run_dir)["world_size"] == 2
    assert res.stdout.count("***** train metrics *****") == 1  # only rank 0 reports
    assert_same_losses(read_losses(run_dir), reference_losses(tmp_path_factory.getbasetemp()))


def test_scaling_sweep_runs_each_size_as_a_job_step_of_the_allocation(env, tmp_path):
    out = tmp_path / "sweep"
    cmd = ["salloc", "-N", "1", "-n", "2", "-t", "5", sys.executable, "-m", "linscale", "bench", "scaling", "gpt",
           "--devices=1,2", "--mode=weak", "--cluster=slurm:1x2", "--steps=10", f"--out={out}", *TINY_GPT,
           "--train.global_batch=4"]  # fmt: skip
    res = run_tagged(cmd, env=env, timeout=240)
    assert res.returncode == 0, res.output
    rows = json.loads((out / "scaling.json").read_text())["rows"]
    assert [(r["devices"], r["global_batch"]) for r in rows] == [(1, 4), (2, 8)]
    for r in rows:
        summary = read_summary(Path(r["run_dir"]))
        assert summary["world_size"] == r["devices"] and r["step_ms"] == summary["steady_step_time_ms"]
    assert (out / "efficiency.png").exists() and "SLURM allocation: 1 nodes x 2 processes" in res.stdout


def test_srun_two_tasks_preprocess_like_one_process(env, tmp_path):
    assert_preprocess_like_one_process(["srun", "-n", "2", "-t", "5", "--kill-on-bad-exit=1"], env, tmp_path)


def test_generated_batch_script_runs_to_completion(env, tmp_path, tmp_path_factory):
    run_dir = tmp_path / "batch-run"
    res = run_tagged(
        [
            sys.executable,
            "-m",
            "linscale",
            "slurm",
            "gpt",
            "--nodes",
            "1",
            "--nproc-per-node",
            "2",
            "--time",
            "5",
            "--submit",
            "--wait",
            *TINY_GPT,
            *STEPS,
            f"--log.dir={run_dir}",
        ],
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.output
    assert "submitted job" in res.stdout and "finished" in res.stdout, res.output
    (script,) = (tmp_path / "runs" / "slurm").glob("*.sbatch")
    text = script.read_text()
    assert "#SBATCH --nodes=1" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "--nproc-per-node 2" in text and "--rdzv-endpoint" in text and sys.executable in text
    (log,) = (tmp_path / "runs" / "slurm").glob("*.out")
    assert "***** train metrics *****" in log.read_text()
    assert read_summary(run_dir)["world_size"] == 2
    assert_same_losses(read_losses(run_dir), reference_losses(tmp_path_factory.getbasetemp()))


def test_a_failing_job_fails_the_waiting_command(env, tmp_path):
    res = run_tagged(
        [
            sys.executable,
            "-m",
            "linscale",
            "slurm",
            "gpt",
            "--nodes",
            "1",
            "--nproc-per-node",
            "2",
            "--time",
            "5",
            "--wait",
            *TINY_GPT,
            *STEPS,
            f"--task.corpus_dir={tmp_path / 'missing'}",
        ],
        env=env,
        cwd=tmp_path,
    )
    (log,) = (tmp_path / "runs" / "slurm").glob("*.out")
    assert res.returncode != 0, res.output
    job_id = log.stem.rsplit("-", 1)[1]
    assert f"linscale: error: job {job_id} failed (exit code {res.returncode}); see {log}" in res.stderr
    assert "missing" in log.read_text()  # the worker's own message is in the job's log


def test_allocation_with_fewer_nodes_and_tasks_than_the_script_needs(slurm, env, tmp_path):
    script, log = tmp_path / "two.sbatch", tmp_path / "two-%j.out"
    res = run_tagged(
        [
            sys.executable,
            "-m",
            "linscale",
            "slurm",
            "gpt",
            "--nodes",
            "2",
            "--script",
            str(script),
            "--output",
            str(log),
            *TINY_GPT,
        ],
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert res.returncode == 0, res.output
    assert f"wrote {script}" in res.stdout and "world size 4" in res.stdout
    # Submitted by hand with --nodes overridden: the script refuses before srun starts anything.
    res = run_tagged(["sbatch", "--wait", "--nodes=1", str(script)], env=env, cwd=tmp_path, timeout=60)
    assert res.returncode != 0, res.output
    (out,) = tmp_path.glob("two-*.out")
    assert (
        "linscale: error: this job needs 2 node(s) with one task on each, but SLURM gave it 1 node(s) and 1 task(s)"
        in out.read_text()
    )
    assert "srun" not in out.read_text()


def test_submitting_more_nodes_than_the_cluster_has_is_refused_at_once(slurm, env, tmp_path):
    res = run_tagged(
        [sys.executable, "-m", "linscale", "slurm", "gpt", "--nodes", "2", "--submit", "--wait", *TINY_GPT],
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert res.returncode == 2, res.output
    assert "SLURM cannot run this job" in res.stderr and "node configuration is not available" in res.stderr
    assert "submitted" not in res.stdout
    assert slurm.jobs() == []  # nothing left waiting in the queue


def test_submit_without_sbatch_on_path(tmp_path):
    env = clean_env(PATH=str(tmp_path / "empty"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    res = run_tagged(
        [sys.executable, "-m", "linscale", "slurm", "gpt", "--nodes", "1", "--submit"],
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert res.returncode == 2
    assert "SLURM's sbatch is not on PATH" in res.stderr
    assert list((tmp_path / "runs" / "slurm").glob("*.sbatch")), "the script is written all the same"


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI is not installed (apt-get install openmpi-bin)")
def test_mpirun_inside_a_batch_job_is_mpi_not_slurm(env, tmp_path):
    # mpirun in a batch script starts the ranks itself; they carry the job's SLURM variables too.
    script = tmp_path / "mpi.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --ntasks=1\n#SBATCH --cpus-per-task=2\n"
        f"#SBATCH --output={tmp_path}/mpi-%j.out\n"
        f"mpirun --allow-run-as-root --oversubscribe -np 2 {sys.executable} -c '{PRINT_TOPOLOGY}'\n"
    )
    mpi_env = {**env, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    res = run_tagged(["sbatch", "--wait", str(script)], env=mpi_env, cwd=tmp_path, timeout=60)
    (out,) = tmp_path.glob("mpi-*.out")
    assert res.returncode == 0, res.output + out.read_text()
    topos = parse_topologies(out.read_text())
    assert [t[:3] for t in topos] == [(0, 0, 2), (1, 1, 2)], out.read_text()
    assert {t[-1] for t in topos} == {"mpi"} and len({t[7] for t in topos}) == 1


# --------------------------------------------------------------------------------------------
# The script itself, run by bash with stand-ins for scontrol and srun (no SLURM needed)


def _job(**kw) -> SlurmJob:
    base = dict(
        task="gpt",
        nodes=2,
        output="/logs/job-%j.out",
        workdir="/work dir",
        run_dir_prefix="/work dir/runs/gpt-slurm-",
        python="/venv/bin/python",
        train_args=("--train.max_steps=5", "--task.corpus_dir", "/a b"),
    )
    return SlurmJob(**{**base, **kw})


def _run_script(tmp_path, job: SlurmJob, **slurm_vars: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "node07\\nnode08\\n"\n')
    (bin_dir / "srun").write_text('#!/bin/sh\nfor a in "$@"; do echo "[$a]"; done\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(render_script(job))
    env = clean_env(PATH=f"{bin_dir}:/usr/bin:/bin", **slurm_vars)
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)


def test_script_of_a_cpu_job(tmp_path):
    job = _job(nproc_per_node=4, partition="cpu", time="1:00:00")
    text = render_script(job)
    for line in (
        "#SBATCH --job-name=linscale-gpt",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --partition=cpu",
        "#SBATCH --time=1:00:00",
        "#SBATCH --output=/logs/job-%j.out",
        "#SBATCH --chdir=/work dir",
    ):
        assert line in text.splitlines(), line
    assert "--gpus-per-node" not in text
    res = _run_script(
        tmp_path, job, SLURM_JOB_ID="12345", SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_JOB_NODELIST="node[07-08]"
    )
    assert res.returncode == 0, res.stderr
    args = [a[1:-1] for a in res.stdout.splitlines()]
    assert args[:5] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=4", "--kill-on-bad-exit=1"]
    assert args[5:] == [
        "/venv/bin/python",
        "-m",
        "linscale",
        "train",
        "gpt",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "4",
        "--rdzv-endpoint",
        f"node07:{20000 + 12345 % 12000}",
        "--log.dir=/work dir/runs/gpt-slurm-12345",
        "--train.max_steps=5",
        "--task.corpus_dir",
        "/a b",
    ]


def test_script_of_a_gpu_job(tmp_path):
    job = _job(gpus_per_node=8, port=29999, train_args=("--log.dir=/mine",))
    text = render_script(job)
    assert "#SBATCH --gpus-per-node=8" in text and "--cpus-per-task" not in text
    res = _run_script(
        tmp_path, job, SLURM_JOB_ID="7", SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_JOB_NODELIST="node[07-08]"
    )
    assert res.returncode == 0, res.stderr
    args = [a[1:-1] for a in res.stdout.splitlines()]
    assert "--nproc-per-node" in args and args[args.index("--nproc-per-node") + 1] == "8"
    assert "node07:29999" in args
    assert [a for a in args if a.startswith("--log.dir")] == ["--log.dir=/mine"]  # the user's own run directory


@pytest.mark.parametrize(
    ("slurm_vars", "gave"),
    [
        ({"SLURM_JOB_ID": "5", "SLURM_NNODES": "1", "SLURM_NTASKS": "1"}, "1 node(s) and 1 task(s)"),
        ({"SLURM_JOB_ID": "5", "SLURM_NNODES": "2", "SLURM_NTASKS": "1"}, "2 node(s) and 1 task(s)"),
    ],
)
def test_script_refuses_an_allocation_smaller_than_it_needs(tmp_path, slurm_vars, gave):
    res = _run_script(tmp_path, _job(), **slurm_vars)
    assert res.returncode == 1 and res.stdout == ""  # srun never ran
    assert f"this job needs 2 node(s) with one task on each, but SLURM gave it {gave}" in res.stderr


def test_script_outside_slurm_says_to_use_sbatch(tmp_path):
    res = _run_script(tmp_path, _job())
    assert res.returncode == 1 and "submit it with: sbatch" in res.stderr


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"nodes": 0}, "--nodes must be >= 1"),
        ({"gpus_per_node": 4, "nproc_per_node": 2}, "one process per GPU"),
        ({"time": "1h"}, "not a SLURM time"),
        ({"partition": "a b"}, "not a partition name"),
        ({"port": 70000}, "--port must be"),
        ({"train_args": ("--nnodes=3",)}, "--nnodes is set by the script"),
        ({"train_args": ("--rdzv-endpoint", "x:1")}, "--rdzv-endpoint is set by the script"),
    ],
)
def test_job_settings_that_cannot_work(kw, match):
    with pytest.raises(SlurmError, match=match):
        _job(**kw)


@pytest.mark.parametrize("time", ["30", "2:00:00", "1-00", "1-12:30:00", "UNLIMITED", "10:00"])
def test_slurm_time_formats(time):
    assert _job(time=time).time == time
