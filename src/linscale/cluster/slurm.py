"""SLURM batch scripts for `linscale train` on N nodes: pure text, no SLURM needed to write one.

The script asks for one task per node; each task is a node's linscale launcher, which starts
that node's worker processes through torch's elastic agent and meets the other nodes at a c10d
rendezvous on the job's first node. Before the time limit SLURM sends SIGUSR1: the workers save a
checkpoint and stop, and the job goes back to the queue (`requeue_after_signal`, then the script)
to resume in the same run directory.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The rendezvous port is derived from the job id inside the script, in the range the topology
# uses for srun tasks (runtime/topology.py): below Linux's ephemeral ports.
PORT_BASE = 20000
PORT_SPAN = 12000
DEFAULT_CPU_PROCS = 2
# Seconds before the time limit at which SLURM sends SIGUSR1: the workers checkpoint at their next
# loss reduction (every train.log_every steps), stop, and the job requeues itself. Room for a few
# steps and the save of a large model; SLURM may also send it up to a minute early.
DEFAULT_SIGNAL_LEAD = 120
MAX_SIGNAL_LEAD = 65535  # sbatch --signal's limit

_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|(?i:unlimited|infinite)")
_NAME = re.compile(r"[^\s'\"\\]+")
# Where the batch script asks rank 0 to leave the job id when the run stopped on SIGUSR1 so that
# the script requeues the job after the launchers have ended.
REQUEUE_FILE_VAR = "LINSCALE_REQUEUE_FILE"
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
    signal_lead: int | None = None  # sbatch --signal=USR1@SECONDS; 0: no signal; None: see `lead`
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
        if self.signal_lead is not None:
            if not 0 <= self.signal_lead <= MAX_SIGNAL_LEAD:
                raise SlurmError(f"--signal-lead must be 0..{MAX_SIGNAL_LEAD} seconds, got {self.signal_lead}")
            limit = time_limit_seconds(self.time) if self.time else None
            if self.signal_lead and limit is not None and self.signal_lead > limit // 2:
                raise SlurmError(
                    f"--signal-lead {self.signal_lead} with --time {self.time} ({limit} s): the checkpoint signal "
                    "would come in the first half of every run, and each requeued run would stop as early; give a "
                    "longer --time, a shorter --signal-lead, or --signal-lead 0 for no signal"
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
    def lead(self) -> int:
        """Seconds before the time limit for SIGUSR1 (0: none): signal_lead, or by default
        DEFAULT_SIGNAL_LEAD, but at most a quarter of a --time limit."""
        if self.signal_lead is not None:
            return self.signal_lead
        limit = time_limit_seconds(self.time) if self.time else None
        return DEFAULT_SIGNAL_LEAD if limit is None else min(DEFAULT_SIGNAL_LEAD, limit // 4)

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


def time_limit_seconds(text: str) -> int | None:
    """A SLURM time limit in seconds (None: unlimited): MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS,
    DAYS-HOURS, DAYS-HOURS:MINUTES or DAYS-HOURS:MINUTES:SECONDS."""
    if text.lower() in ("unlimited", "infinite"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, sec = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + sec
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


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
    if job.lead:
        sbatch.append(f"--signal=USR1@{job.lead}")
    # The job may go back to the queue: rank 0 requeues it after the signal's checkpoint, and SLURM
    # after a node failure. It keeps its id, so its run directory: the next run resumes there.
    sbatch.append("--requeue")
    if job.output:
        sbatch.append(f"--output={job.output}")
        # A requeued run writes to the same log: after the earlier runs' lines, not over them.
        sbatch.append("--open-mode=append")
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
        *(
            [
                f"# {job.lead} s before the time limit SLURM sends SIGUSR1: the workers save a checkpoint and",
                "# stop, and the job requeues itself (LINSCALE_REQUEUE=0: it ends instead); its next run resumes.",
            ]
            if job.lead
            else []
        ),
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
        "# A requeued run continues from its own newest checkpoint, whatever --resume the first run had.",
        "restart_args=()",
        'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then',
        '  echo "linscale: job $SLURM_JOB_ID runs again (restart ${SLURM_RESTART_COUNT}): training resumes from the'
        ' newest checkpoint in its run directory"',
        "  restart_args=(--resume auto)",
        "fi",
        "# After a stop on SIGUSR1, rank 0 writes the job id here (in the shared working directory), and",
        "# the job requeues itself once every node's launcher has ended cleanly.",
        f'export {REQUEUE_FILE_VAR}="$PWD/.linscale-requeue-$SLURM_JOB_ID"',
        f'rm -f "${REQUEUE_FILE_VAR}"',
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
    train.append('${restart_args[@]+"${restart_args[@]}"}')  # last: it wins over the arguments before
    command = [" ".join(srun), " ".join(train[:3]), *train[3:]]
    lines.append(" \\\n  ".join(command))
    lines += [
        "",
        f'if [ "$(cat "${REQUEUE_FILE_VAR}" 2>/dev/null)" = "$SLURM_JOB_ID" ]; then',
        f'  rm -f "${REQUEUE_FILE_VAR}"',
        '  echo "linscale: requeueing job $SLURM_JOB_ID: its next run resumes from the checkpoint"',
        '  if ! scontrol requeue "$SLURM_JOB_ID"; then',
        '    echo "linscale: error: SLURM did not requeue job $SLURM_JOB_ID; to resume, submit the job again with'
        " --log.dir set to this job's run directory\" >&2",
        "    exit 1",
        "  fi",
        "fi",
    ]
    return "\n".join(lines) + "\n"


def requeue_after_signal(say: Callable[[str], None]) -> bool:
    """Put this SLURM batch job back in the queue after the checkpoint taken on the pre-timeout
    signal; rank 0 calls it once the run has stopped and reported. The requeued job keeps its id,
    so its run directory, and resumes from the checkpoint; SLURM starts it again once the
    cluster's credential lifetime has passed (AuthInfo cred_expire, 120 s by default).

    Under a script of `linscale slurm` the job id goes to the script's LINSCALE_REQUEUE_FILE and
    the script requeues the job after every launcher has ended. Elsewhere `scontrol requeue` runs
    here, and ends this run at once: SLURM terminates every process of the job, this one too, so
    nothing may follow the call. Returns whether the job was (or will be) requeued: False outside
    SLURM, with LINSCALE_REQUEUE=0, or when SLURM refuses (the message says how to resume)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    again = "submit the job again with --log.dir set to this run directory to resume from the checkpoint"
    if os.environ.get("LINSCALE_REQUEUE", "1") == "0":
        say(f"LINSCALE_REQUEUE=0: job {job} is not requeued; {again}")
        return False
    request = os.environ.get(REQUEUE_FILE_VAR)
    if request:
        try:
            Path(request).write_text(job)
        except OSError as e:
            say(f"cannot ask the batch script to requeue job {job} ({request}: {e.strerror}); {again}")
            return False
        say(f"job {job} goes back to the queue when this run has ended: its next run resumes from this checkpoint")
        return True
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        say(f"scontrol is not on PATH: job {job} is not requeued; {again}")
        return False
    say(f"requeueing job {job}: its next run resumes from this checkpoint")
    try:
        out = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        say(f"scontrol requeue {job} failed ({e}); {again}")
        return False
    if out.returncode != 0:
        detail = (out.stderr or out.stdout).strip() or f"exit code {out.returncode}"
        say(f"scontrol requeue {job} failed ({detail}: only batch jobs requeue); {again}")
        return False
    return True
