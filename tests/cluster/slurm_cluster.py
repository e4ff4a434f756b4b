"""A real one-node SLURM cluster for tests, and running commands with a check for stray processes.

`slurm_cluster()` starts munged, slurmctld and slurmd from a temporary directory (configuration,
munge key and socket, state, spool, logs, pid files), with ports of their own, so that it
touches nothing of the machine's own SLURM or munge. Client commands find it through
`SLURM_CONF` in `cluster.env`. On exit it cancels the jobs, stops the daemons by pid, checks
that no process of the cluster survived and removes the directory.

    with slurm_cluster() as cluster:
        run_tagged(["srun", "-n", "2", "hostname"], env=cluster.env)
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dist.conftest import TINY_GPT

from linscale.cluster.netns import pids_with_env

ROOT = Path(__file__).resolve().parents[2]
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("srun", "sbatch", "sinfo", "squeue", "scancel", "scontrol")
CLUSTER_TAG = "LINSCALE_SLURM_CLUSTER"
# Seconds a job step's credential lives, and so how long a requeued job waits before it starts again.
CRED_EXPIRE = 10
# The loss-trajectory settings of
# tests/dist/test_train.py: 20 steps of global batch 16 on 2 processes.
STEPS = [
    "--train.max_steps=20",
    "--train.log_every=1",
    "--train.eval_every=0",
    "--optim.warmup_steps=5",
    "--train.global_batch=16",
    "--train.micro_batch=8",
]
# Variables of an enclosing launcher (pytest run inside a SLURM job or under mpirun, say) that
# would make the test's commands look like tasks of that launcher.
LAUNCHER_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL")
LAUNCHER_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "TORCHELASTIC_RUN_ID",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES) and k not in LAUNCHER_VARS}
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------
# Processes


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclass
class Tagged:
    """A command started with a tag in its environment (which srun, sbatch and mpirun hand on to
    the processes they start), not waited for yet."""

    cmd: list[str]
    proc: subprocess.Popen
    tag: str

    def finish(self, timeout: float = 180) -> Result:
        """Wait for the command; fail the test on timeout or if a tagged process outlives it."""
        cmd, proc, tag = self.cmd, self.proc, self.tag
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            _kill(pids_with_env("LINSCALE_TEST_TAG", tag))
            out, err = proc.communicate()
            pytest.fail(f"{' '.join(cmd)} did not finish in {timeout}s:\n{out}\n{err}")
        # slurmstepd reaps a job's processes just after it reports the job done.
        deadline = time.monotonic() + 10
        while (left := pids_with_env("LINSCALE_TEST_TAG", tag)) and time.monotonic() < deadline:
            time.sleep(0.1)
        _kill(left)
        assert not left, f"processes left behind after {cmd[0]} exited: {left}\n{out}\n{err}"
        return Result(proc.returncode, out, err)


def start_tagged(cmd: list[str], *, env: dict[str, str], cwd: Path | None = None) -> Tagged:
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        cmd,
        cwd=cwd or ROOT,
        env={**env, "LINSCALE_TEST_TAG": tag},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return Tagged(cmd, proc, tag)


def run_tagged(cmd: list[str], *, env: dict[str, str], timeout: float = 180, cwd: Path | None = None) -> Result:
    """Run `cmd` with a tag in its environment (which srun, sbatch and mpirun hand on to the
    processes they start); fail the test on timeout or if a tagged process outlives it."""
    return start_tagged(cmd, env=env, cwd=cwd).finish(timeout)


# Each process prints its Topology as a tuple; launchers may glue the lines of two processes.
PRINT_TOPOLOGY = (
    "import dataclasses; from linscale.runtime.topology import detect; print(dataclasses.astuple(detect()))"
)
_TOPOLOGY = re.compile(r"\((\d+), (\d+), (\d+), (\d+), (\d+), (\d+), '([^']*)', (\d+), '(\w+)'\)")


def parse_topologies(output: str) -> list[tuple]:
    """The topologies printed by PRINT_TOPOLOGY, sorted by rank."""
    found = [(*map(int, m[:6]), m[6], int(m[7]), m[8]) for m in _TOPOLOGY.findall(output)]
    return sorted(found)


def read_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m["train_loss"] for m in map(json.loads, lines) if "train_loss" in m]


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


_reference: dict[Path, list[float]] = {}


def reference_losses(base: Path) -> list[float]:
    """The loss trajectory of `linscale train` with 2 processes on this machine (its own launcher),
    computed once per test session under `base`."""
    if base not in _reference:
        run_dir = base / "reference-run"
        res = run_tagged(
            [
                sys.executable,
                "-m",
                "linscale",
                "train",
                "gpt",
                *TINY_GPT,
                *STEPS,
                "--nproc-per-node=2",
                f"--log.dir={run_dir}",
            ],
            env=clean_env(XDG_CACHE_HOME=str(base / "cache")),
        )
        assert res.returncode == 0, res.output
        losses = read_losses(run_dir)
        assert len(losses) == 20 and losses[-1] < losses[0] - 0.5, losses
        _reference[base] = losses
    return _reference[base]


def assert_same_losses(got: list[float], want: list[float], rel: float = 1e-5) -> None:
    assert len(got) == len(want) == 20, (got, want)
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True))
    assert worst <= rel, f"loss trajectories differ by up to {worst:.2e} (allowed {rel:.0e})\n{got}\n{want}"


# --------------------------------------------------------------------------------------------
# The cluster


def missing_binaries() -> list[str]:
    return [b for b in (*DAEMONS, *CLIENTS) if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_name() -> str:
    """The machine's short name, which slurmctld checks against SlurmctldHost, and which srun
    tasks resolve as the first host of their node list."""
    name = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(name)
    except OSError:
        pytest.fail(f"this machine's name {name!r} does not resolve; add it to /etc/hosts (127.0.1.1 {name})")
    return name


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 2048


@dataclass
class SlurmCluster:
    root: Path
    node: str
    cpus: int
    env: dict[str, str] = field(default_factory=dict)
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def command(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)

    def log_tail(self, lines: int = 15) -> str:
        parts = []
        for log in sorted(self.root.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def jobs(self) -> list[str]:
        out = self.command("squeue", "-h", "-o", "%i")
        return out.stdout.split() if out.returncode == 0 else []


def _write_config(cluster: SlurmCluster, ctld_port: int, slurmd_port: int) -> None:
    r = cluster.root
    user = getpass.getuser()
    memory = max(256, min(4096, _memory_mb() // 2))
    cluster.conf.write_text(
        "\n".join(
            [
                "ClusterName=linscaletest",
                f"SlurmctldHost={cluster.node}(127.0.0.1)",
                f"SlurmctldPort={ctld_port}",
                f"SlurmdPort={slurmd_port}",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                # cred_expire also delays a requeued job's next start (SLURM's default: 120 s).
                f"AuthInfo=socket={r / 'munge.sock'},cred_expire={CRED_EXPIRE}",
                f"SlurmUser={user}",
                f"SlurmdUser={user}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "MpiDefault=none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "ReturnToService=2",
                "KillWait=2",
                # sbatch --wait polls after 2 s, then every 8 s unless MinJobAge / 2 <= 2: keep it at 2 s.
                "MinJobAge=4",
                "MailProg=/bin/true",
                # A requeued job waits for its BeginTime, then for the next pass of the scheduler's
                # main loop (every 60 s by default): look every 2 s.
                "SchedulerParameters=sched_interval=2",
                f"PlugStackConfig={r / 'plugstack.conf'}",
                f"StateSaveLocation={r / 'state'}",
                f"SlurmdSpoolDir={r / 'spool'}",
                f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                f"SlurmdPidFile={r / 'slurmd.pid'}",
                f"SlurmctldLogFile={r / 'slurmctld.log'}",
                f"SlurmdLogFile={r / 'slurmd.log'}",
                # Trust the CPU count below even on a machine with fewer cores: the tests run 2 tasks.
                "SlurmdParameters=config_overrides",
                f"NodeName={cluster.node} NodeAddr=127.0.0.1 CPUs={cluster.cpus} RealMemory={memory} State=UNKNOWN",
                f"PartitionName=test Nodes={cluster.node} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    (r / "plugstack.conf").write_text("")  # not the machine's /etc/slurm/plugstack.conf
    (r / "state").mkdir()
    (r / "spool").mkdir()


def _start(cluster: SlurmCluster, name: str, args: list[str]) -> None:
    out = open(cluster.root / f"{name}.out", "w")  # noqa: SIM115 - the daemon writes it until stopped
    cluster.daemons[name] = subprocess.Popen(
        [_binary(name), *args],
        env={**cluster.env, CLUSTER_TAG: str(cluster.root)},
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out.close()


def _wait_for(cluster: SlurmCluster, what: str, ready, deadline: float) -> None:
    while not ready():
        for name, proc in cluster.daemons.items():
            if proc.poll() is not None:
                out = (cluster.root / f"{name}.out").read_text(errors="replace")
                raise RuntimeError(
                    f"{name} exited with {proc.returncode} while waiting for {what}:\n{out}\n{cluster.log_tail()}"
                )
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}\n{cluster.log_tail()}")
        time.sleep(0.1)


def _munge_ready(sock: Path) -> bool:
    if not sock.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


def _node_idle(cluster: SlurmCluster) -> bool:
    try:
        out = cluster.command("sinfo", "-h", "-N", "-n", cluster.node, "-o", "%T", timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and out.stdout.strip() == "idle"


def _stop(cluster: SlurmCluster) -> list[str]:
    """Cancel the jobs, stop the daemons; return what had to be killed."""
    problems = []
    if cluster.daemons.get("slurmctld") and cluster.daemons["slurmctld"].poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            if jobs := cluster.jobs():
                cluster.command("scancel", *jobs)
                deadline = time.monotonic() + 30
                while cluster.jobs() and time.monotonic() < deadline:
                    time.sleep(0.2)
    for name in ("slurmd", "slurmctld", "munged"):
        proc = cluster.daemons.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            problems.append(f"{name} (pid {proc.pid}) ignored SIGTERM and was killed")
    # slurmstepd and the jobs' processes inherit the daemons' tag.
    deadline = time.monotonic() + 10
    while (left := pids_with_env(CLUSTER_TAG, str(cluster.root))) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        names = [
            Path(f"/proc/{pid}/comm").read_text().strip() if Path(f"/proc/{pid}").exists() else "?" for pid in left
        ]
        _kill(left)
        problems.append(
            f"processes of the cluster outlived its daemons and were killed: {list(zip(left, names, strict=True))}"
        )
    return problems


@contextlib.contextmanager
def slurm_cluster(start_timeout: float = 60) -> Iterator[SlurmCluster]:
    """A one-node SLURM cluster for the duration of the block; skips the test if SLURM or munge
    is not installed (Debian: apt-get install slurm-wlm munge)."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM/munge not installed ({', '.join(missing)} not found); apt-get install slurm-wlm munge")
    node = _node_name()
    root = Path(tempfile.mkdtemp(prefix="linscale-slurm-"))
    root.chmod(0o755)  # munged wants its socket's directory searchable by everyone
    cluster = SlurmCluster(
        root=root,
        node=node,
        cpus=max(2, len(os.sched_getaffinity(0))),
        env=clean_env(SLURM_CONF=str(root / "slurm.conf")),
    )
    problems: list[str] = []
    try:
        ctld_port, slurmd_port = _free_ports(2)
        _write_config(cluster, ctld_port, slurmd_port)
        # A key of its own: the machine's /etc/munge/munge.key is neither needed nor touched.
        key = root / "munge.key"
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(os.urandom(128))  # what `mungekey -c` writes: 1024 random bits
        sock = root / "munge.sock"
        _start(
            cluster,
            "munged",
            [
                "--foreground",
                "--force",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--log-file={root / 'munged.log'}",
                f"--pid-file={root / 'munged.pid'}",
                f"--seed-file={root / 'munged.seed'}",
            ],
        )
        deadline = time.monotonic() + start_timeout
        _wait_for(cluster, "munged's socket", lambda: _munge_ready(sock), deadline)
        _start(cluster, "slurmctld", ["-D", "-f", str(cluster.conf)])
        _start(cluster, "slurmd", ["-D", "-f", str(cluster.conf), "-N", cluster.node])
        _wait_for(cluster, f"node {cluster.node} to be idle", lambda: _node_idle(cluster), deadline)
        yield cluster
    finally:
        try:
            problems = _stop(cluster)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    assert not problems, "; ".join(problems)


def assert_preprocess_like_one_process(launcher: list[str], env: dict[str, str], tmp_path: Path) -> None:
    """`launcher linscale preprocess` (2 ranks) writes the same shards as one process: the work queue
    lives in the job's store, which the launcher's ranks set up like any other job."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(9):
        lines = (f"document {i} line {j} " + "x" * (i * j % 50) + "\n" for j in range(40 * (i + 1)))
        (corpus / f"d{i}.txt").write_text("".join(lines))
    outs = {}
    for name, prefix in (("launcher", launcher), ("one", [])):
        outs[name] = tmp_path / name
        cmd = [*prefix, sys.executable, "-m", "linscale", "preprocess", str(corpus), f"--out={outs[name]}",
               "--unit-mb=0.002", "--no-progress", *([] if prefix else ["--nproc-per-node=1"])]  # fmt: skip
        res = run_tagged(cmd, env=env, timeout=120)
        assert res.returncode == 0, res.output
    shards = {name: sorted(p.relative_to(out) for p in out.rglob("*.bin")) for name, out in outs.items()}
    assert shards["launcher"] == shards["one"] and len(shards["one"]) > 9  # larger files cut in ranges
    for rel in shards["one"]:
        assert (outs["launcher"] / rel).read_bytes() == (outs["one"] / rel).read_bytes(), rel
    assert json.loads((outs["launcher"] / "preprocess_summary.json").read_text())["workers"] == 2
