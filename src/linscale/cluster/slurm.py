"""SLURM batch scripts for `linscale train` on N nodes: pure text, no SLURM needed to write one.

The script asks for one task per node; each task is a node's linscale launcher, which starts
that node's worker processes through torch's elastic agent and meets the other nodes at a c10d
rendezvous on the job's first node.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field

# The rendezvous port is derived from the job id inside the script, in the range the topology
# uses for srun tasks (runtime/topology.py): below Linux's ephemeral ports.
PORT_BASE = 20000
PORT_SPAN = 12000
DEFAULT_CPU_PROCS = 2

_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|(?i:unlimited|infinite)")
_NAME = re.compile(r"[^\s'\"\\]+")
# `linscale train` options that the script sets itself.
SCRIPT_OWNS = ("--nnodes", "--node-rank", "--rdzv-endpoint", "--master-addr", "--master-port", "--nproc-per-node")


class SlurmError(ValueError):
    """A job description that cannot work; the message says which setting and the fix."""


@dataclass(frozen=True)
class SlurmJob:
    task: str
    nodes: int
    nproc_per_node: int = 0  # 0: one per GPU with gpus_per_node, else DEFAULT_CPU_PROCS
    gpus_per_node: int = 0
    cpus_per_task: int = 0  # 0: nproc_per_node on a CPU job, SLURM's default on a GPU job
    partition: str = ""
    time: str = ""
    job_name: str = ""
    output: str = ""  # sbatch --output, %j = job id
    workdir: str = ""  # sbatch --chdir: relative task files and run directories resolve here
    run_dir_prefix: str = ""  # --log.dir=PREFIX<job id> (unless train_args set --log.dir)
    port: int = 0  # 0: derived from the job id
    python: str = field(default_factory=lambda: sys.executable)
    train_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise SlurmError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise SlurmError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.nproc_per_node < 0:
            raise SlurmError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.gpus_per_node and self.nproc_per_node and self.nproc_per_node != self.gpus_per_node:
            raise SlurmError(
                f"--nproc-per-node {self.nproc_per_node} with --gpus-per-node {self.gpus_per_node}: linscale runs "
                "one process per GPU; leave --nproc-per-node out"
            )
        if self.cpus_per_task < 0:
            raise SlurmError(f"--cpus-per-task must be >= 1, got {self.cpus_per_task}")
        if self.time and not _TIME.fullmatch(self.time):
            raise SlurmError(
                f"--time {self.time!r} is not a SLURM time: use MINUTES, HH:MM:SS, D-HH, D-HH:MM:SS or UNLIMITED"
            )
        if self.partition and not _NAME.fullmatch(self.partition):
            raise SlurmError(f"--partition {self.partition!r} is not a partition name")
        if self.job_name and not _NAME.fullmatch(self.job_name):
            raise SlurmError(f"--job-name {self.job_name!r} must be one word without quotes")
        if not 0 <= self.port < 65536:
            raise SlurmError(f"--port must be 1..65535 (or 0 to derive it from the job id), got {self.port}")
        for arg in self.train_args:
            name = arg.split("=", 1)[0]
            if name in SCRIPT_OWNS:
                raise SlurmError(
                    f"{name} is set by the script (one launcher per node at a rendezvous on the first node); "
                    "use linscale slurm's --nodes and --nproc-per-node"
                )

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_node or self.nproc_per_node or DEFAULT_CPU_PROCS

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def cpus(self) -> int:
        """--cpus-per-task of the launcher task, which runs all of the node's workers (0: unset)."""
        if self.cpus_per_task:
            return self.cpus_per_task
        return 0 if self.gpus_per_node else self.procs_per_node

    @property
    def name(self) -> str:
        return self.job_name or f"linscale-{task_name(self.task)}"


def task_name(task: str) -> str:
    """`gpt` -> gpt; `path/to/file.py:MyTask` -> mytask; `pkg.mod:MyTask` -> mytask."""
    name = task.rpartition(":")[2] or task
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower() or "task"


def _sets_log_dir(train_args: tuple[str, ...]) -> bool:
    return any(a == "--log.dir" or a.startswith("--log.dir=") for a in train_args)


def _arg_lines(args: tuple[str, ...]) -> list[str]:
    """One line per option, with its value when it comes as a separate argument."""
    lines: list[str] = []
    for i, arg in enumerate(args):
        joins = i > 0 and not arg.startswith("-") and args[i - 1].startswith("--") and "=" not in args[i - 1]
        if joins and lines:
            lines[-1] += " " + shlex.quote(arg)
        else:
            lines.append(shlex.quote(arg))
    return lines


def render_script(job: SlurmJob) -> str:
    """The sbatch script for `job`."""
    q = shlex.quote
    n = job.nodes
    sbatch = [
        f"--job-name={job.name}",
        f"--nodes={n}",
        "--ntasks-per-node=1",
    ]
    if job.cpus:
        sbatch.append(f"--cpus-per-task={job.cpus}")
    if job.gpus_per_node:
        sbatch.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.partition:
        sbatch.append(f"--partition={job.partition}")
    if job.time:
        sbatch.append(f"--time={job.time}")
    if job.output:
        sbatch.append(f"--output={job.output}")
    if job.workdir:
        sbatch.append(f"--chdir={job.workdir}")
    kind = f"{job.gpus_per_node} GPU(s)" if job.gpus_per_node else "CPU"
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {opt}" for opt in sbatch),
        "#",
        f"# Written by `linscale slurm`: {job.task} on {n} node(s) x {job.procs_per_node} process(es) "
        f"({kind}) = world size {job.world_size}.",
        "# One task per node runs `linscale train` as the node's launcher; the launchers meet at a",
        "# rendezvous on the job's first node and each starts its node's processes.",
        "set -eu",
        "export PYTHONUNBUFFERED=1",
        "",
        'if [ -z "${SLURM_JOB_ID:-}" ]; then',
        '  echo "linscale: error: this is a SLURM batch script; submit it with: sbatch $0" >&2',
        "  exit 1",
        "fi",
        f'if [ "${{SLURM_NNODES:-0}}" -ne {n} ] || [ "${{SLURM_NTASKS:-0}}" -lt {n} ]; then',
        f'  echo "linscale: error: this job needs {n} node(s) with one task on each, but SLURM gave it'
        " ${SLURM_NNODES:-no} node(s) and ${SLURM_NTASKS:-no} task(s) (SLURM_NNODES, SLURM_NTASKS):"
        " submit the script as written, without overriding --nodes, --ntasks or --ntasks-per-node,"
        f' or write a new one with: linscale slurm --nodes N" >&2',
        "  exit 1",
        "fi",
        'head_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" | head -n1)',
        'if [ -z "$head_node" ]; then',
        '  echo "linscale: error: scontrol cannot expand SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}" >&2',
        "  exit 1",
        "fi",
        f"port={job.port}" if job.port else f"port=$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))",
        "",
    ]
    srun = ["srun", '--nodes="$SLURM_NNODES"', '--ntasks="$SLURM_NNODES"', "--ntasks-per-node=1"]
    if job.cpus:
        # srun does not inherit the job's --cpus-per-task (SLURM 22.05+): without it the launcher
        # and all its workers would share one CPU where SLURM binds tasks to cores.
        srun.append(f"--cpus-per-task={job.cpus}")
    srun.append("--kill-on-bad-exit=1")
    train = [
        q(job.python),
        "-m linscale train",
        q(job.task),
        '--nnodes "$SLURM_NNODES"',
        f"--nproc-per-node {job.procs_per_node}",
        '--rdzv-endpoint "$head_node:$port"',
    ]
    if job.run_dir_prefix and not _sets_log_dir(job.train_args):
        train.append(q(f"--log.dir={job.run_dir_prefix}") + '"$SLURM_JOB_ID"')
    train.extend(_arg_lines(job.train_args))
    command = [" ".join(srun), " ".join(train[:3]), *train[3:]]
    lines.append(" \\\n  ".join(command))
    return "\n".join(lines) + "\n"


def requeue_after_signal(say) -> bool:
    """Put this SLURM batch job back in the queue after a checkpoint taken on the pre-timeout
    signal; the requeued job keeps its id, so its run directory, and resumes from the checkpoint.
    Returns whether it was requeued (False outside SLURM)."""
    import os
    import shutil
    import subprocess

    job = os.environ.get("SLURM_JOB_ID")
    if not job or os.environ.get("LINSCALE_REQUEUE", "1") == "0":
        return False
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        say("SLURM job without scontrol on PATH: not requeued; resubmit it to resume")
        return False
    out = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        say(f"scontrol requeue {job} failed ({out.stderr.strip()}); resubmit the job to resume from its checkpoint")
        return False
    say(f"job {job} requeued: it resumes from its checkpoint when it runs again")
    return True
