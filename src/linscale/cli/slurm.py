"""`linscale slurm TASK --nodes N`: write a SLURM batch script that trains TASK, and submit it."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from linscale.cluster.slurm import DEFAULT_SIGNAL_LEAD, SlurmError, SlurmJob, render_script, task_name


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slurm",
        help="write (and submit) a SLURM batch script that trains a task on N nodes",
        usage="linscale slurm TASK --nodes N [--gpus-per-node G | --nproc-per-node P] [--partition P] [--time T] "
        "[--signal-lead SECONDS] [--output FILE] [--submit] [--wait] [TRAIN ARGS ...]",
        description="Write an sbatch script that runs `linscale train TASK` on N nodes: one task per node "
        "starts the node's processes (one per GPU with --gpus-per-node, else --nproc-per-node CPU "
        "processes) and all nodes meet at a rendezvous on the first node. Arguments linscale slurm does not "
        "know (--section.field=value) go to linscale train; the task, config and batch split are checked for "
        "the job's world size before anything is written.",
        epilog="example: linscale slurm gpt --nodes 4 --gpus-per-node 8 --partition gpu --time 2:00:00 --submit "
        "--train.max_steps=5000",
    )
    p.add_argument("task", help="the task to train, as for linscale train (gpt, file.py:Class, pkg.mod:Class)")
    p.add_argument("--nodes", type=int, required=True, metavar="N", help="number of nodes")
    p.add_argument("--config", metavar="FILE", help="a TOML file of settings for linscale train")
    p.add_argument(
        "--gpus-per-node", type=int, default=0, metavar="G", help="GPUs per node, one process each (default: CPU job)"
    )
    p.add_argument(
        "--nproc-per-node", type=int, default=0, metavar="P", help="processes per node of a CPU job (default: 2)"
    )
    p.add_argument(
        "--cpus-per-task",
        type=int,
        default=0,
        metavar="C",
        help="CPUs of each node's task, shared by its processes (default: one per process on a CPU job)",
    )
    p.add_argument("--partition", default="", metavar="P", help="SLURM partition (default: the cluster's default)")
    p.add_argument(
        "--time", default="", metavar="T", help="time limit: 30, 2:00:00, 1-00:00:00 ... (default: the partition's)"
    )
    p.add_argument("--job-name", default="", metavar="NAME", help="SLURM job name (default: linscale-TASK)")
    p.add_argument(
        "--output", default="", metavar="FILE", help="the job's log, %%j = job id (default: runs/slurm/NAME-%%j.out)"
    )
    p.add_argument(
        "--script", default="", metavar="FILE", help="where to write the script (default: runs/slurm/NAME-TIME.sbatch)"
    )
    p.add_argument("--port", type=int, default=0, help="rendezvous port (default: derived from the job id)")
    p.add_argument(
        "--signal-lead",
        type=int,
        default=None,
        metavar="SECONDS",
        help="SLURM sends SIGUSR1 this long before the time limit (the partition's, or --time): the workers "
        "checkpoint and stop, the job requeues itself and resumes when it runs again; 0: no signal "
        f"(default: {DEFAULT_SIGNAL_LEAD}, or a quarter of a shorter --time)",
    )
    p.add_argument("--submit", action="store_true", help="submit the script with sbatch and print the job id")
    p.add_argument("--wait", action="store_true", help="submit and wait for the job to end; exit with the job's status")
    p.set_defaults(func=run_cli)


def _error(msg: str) -> int:
    print(f"linscale: error: {msg}", file=sys.stderr, flush=True)
    return 2


def _check_training(job: SlurmJob) -> None:
    """Resolve the task, load the config and split the batch for the job's world size, as
    `linscale train` would on the cluster, so that a mistake costs no queueing."""
    from linscale.cli.train import prepare
    from linscale.train.loop import make_task, plan_run

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--resume")
    known, overrides = parser.parse_known_args(list(job.train_args))
    task_cls, cfg = prepare(argparse.Namespace(task=job.task, config=known.config, resume=known.resume), overrides)
    plan_run(make_task(task_cls, cfg), cfg, job.world_size)


def run_cli(args: argparse.Namespace, rest: list[str], argv: list[str]) -> int:
    from linscale.cli.train import USER_ERRORS

    cwd = Path.cwd()
    slurm_dir = cwd / "runs" / "slurm"
    name = args.job_name or f"linscale-{task_name(args.task)}"
    try:
        job = SlurmJob(
            task=args.task,
            nodes=args.nodes,
            nproc_per_node=args.nproc_per_node,
            gpus_per_node=args.gpus_per_node,
            cpus_per_task=args.cpus_per_task,
            partition=args.partition,
            time=args.time,
            job_name=name,
            output=str(Path(args.output).absolute()) if args.output else str(slurm_dir / f"{name}-%j.out"),
            workdir=str(cwd),
            run_dir_prefix=str(cwd / "runs" / f"{task_name(args.task)}-slurm-"),
            port=args.port,
            signal_lead=args.signal_lead,
            python=sys.executable,
            train_args=(*([f"--config={Path(args.config).absolute()}"] if args.config else []), *rest),
        )
        _check_training(job)
    except (SlurmError, *USER_ERRORS) as e:
        return _error(str(e))

    script = Path(args.script) if args.script else slurm_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    Path(job.output).parent.mkdir(parents=True, exist_ok=True)
    script.write_text(render_script(job))
    print(
        f"linscale: wrote {script} ({job.nodes} node(s) x {job.procs_per_node} process(es) = "
        f"world size {job.world_size}; log {job.output})",
        flush=True,
    )
    if not (args.submit or args.wait):
        print(f"submit it with: sbatch {script}")
        return 0
    return _submit(script, job.output, args.wait)


def _submit(script: Path, output: str, wait: bool) -> int:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        return _error(
            f"SLURM's sbatch is not on PATH: the script is written; submit it from a SLURM login node that sees "
            f"this file system with: sbatch {script}"
        )
    # A job SLURM can never start (more nodes than the partition has, an unknown partition)
    # would otherwise sit in the queue, and --wait would wait for ever.
    try:
        test = subprocess.run([sbatch, "--test-only", str(script)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return _error(f"sbatch --test-only {script} did not answer within 60 s; is slurmctld up? (scontrol ping)")
    if test.returncode != 0:
        lines = [ln.strip() for ln in (test.stderr + test.stdout).splitlines() if ln.strip()]
        detail = "; ".join(dict.fromkeys(lines)) or f"exit code {test.returncode}"
        return _error(
            f"SLURM cannot run this job: {detail}. Change --nodes, --partition, --time or the resources; "
            f"sbatch {script} submits it as it is"
        )
    proc = subprocess.Popen(
        [sbatch, "--parsable", *(["--wait"] if wait else []), str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    job_id = ""
    try:
        # --parsable prints "JOBID" or "JOBID;CLUSTER" as soon as the job is queued.
        job_id = proc.stdout.readline().strip().split(";")[0]
        if job_id:
            log = output.replace("%j", job_id)
            print(f"linscale: submitted job {job_id}" + (", waiting for it to end" if wait else ""), flush=True)
            print(f"  log: {log}", flush=True)
        out, err = proc.communicate()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        if job_id:
            return _error(f"stopped waiting; job {job_id} goes on (stop it with: scancel {job_id})")
        return _error("interrupted")
    if not job_id:
        detail = (err or out).strip() or f"exit code {proc.returncode}"
        _error(f"sbatch did not take the job: {detail}")
        return proc.returncode or 1
    if wait:
        if proc.returncode != 0:
            detail = err.strip().splitlines()[-1] if err.strip() else ""
            _error(
                f"job {job_id} failed (exit code {proc.returncode}); see {output.replace('%j', job_id)}"
                + (f" [sbatch: {detail}]" if detail else "")
            )
            return proc.returncode
        print(f"linscale: job {job_id} finished", flush=True)
    return 0
