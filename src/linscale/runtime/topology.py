"""Who am I: rank, local rank, node and world, read once from the launcher's variables.

This is the only module that reads the launcher contract from the environment:

* torchrun / the elastic agent (ours or the user's): `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, ...
* a task of `srun`: `SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_NTASKS`, the step's node list, ...
* a rank of `mpirun`/`mpiexec`: Open MPI (`OMPI_COMM_WORLD_*`), MPICH / Intel MPI hydra and
  Cray PALS (`PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID`, ...) or PMIx (`PMIX_RANK`).

The elastic agent comes first: a worker it spawned inside an srun task sees the task's SLURM
variables too, and is a torchrun worker.
"""

from __future__ import annotations

import os
import re
import zlib
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


# A port derived from the job's identifier, the same in every task of the job: high enough to
# stay clear of well-known services and below the usual ephemeral range (32768+ on Linux).
DERIVED_PORT_BASE = 20000
DERIVED_PORT_SPAN = 12000
DEFAULT_MASTER_PORT = 29500


def derived_port(job_key: str) -> int:
    """A port that every task computing it from the same job key agrees on.

    crc32, not hash(): Python salts string hashes per process."""
    return DERIVED_PORT_BASE + zlib.crc32(job_key.encode()) % DERIVED_PORT_SPAN


def under_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """True inside a worker started by torchrun / the elastic agent."""
    env = os.environ if env is None else env
    return "TORCHELASTIC_RUN_ID" in env or ("LOCAL_RANK" in env and "WORLD_SIZE" in env)


def under_srun(env: Mapping[str, str] | None = None) -> bool:
    """True in a task started by srun. A batch script has SLURM_PROCID and SLURM_NTASKS too, but
    no step: it is one process that may start a step, not a task of one."""
    env = os.environ if env is None else env
    return (
        "SLURM_PROCID" in env
        and ("SLURM_NTASKS" in env or "SLURM_STEP_NUM_TASKS" in env)
        and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)
    )


def detect(env: Mapping[str, str] | None = None) -> Topology:
    """Read the topology of this process from the launcher's environment variables.

    Raises ValueError, naming the variables and the fix, when a launcher's variables are
    incomplete or contradict each other."""
    env = os.environ if env is None else env
    if under_torchrun(env):
        return _torchrun(env)
    if under_srun(env):
        # mpirun inside an allocation starts its per-node daemons with srun, so its ranks
        # inherit a daemon's SLURM variables (one task per node). SLURM describes the ranks
        # only when srun started them itself (srun --mpi=pmix ...): then the two agree, or the
        # MPI variables srun's plugin set are incomplete.
        try:
            mpi = _mpi_identity(env)
        except ValueError:
            mpi = None
        if mpi is None or (mpi[1], mpi[2]) == (_int(env, "SLURM_PROCID"), _slurm_world(env)):
            return _slurm(env)
    else:
        mpi = _mpi_identity(env)
    if mpi is not None:
        return _mpi(env, *mpi)
    return Topology()


def _torchrun(env: Mapping[str, str]) -> Topology:
    world = int(env["WORLD_SIZE"])
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    return Topology(
        rank=int(env["RANK"]),
        local_rank=int(env["LOCAL_RANK"]),
        world_size=world,
        local_world_size=local_world,
        node_rank=int(env.get("GROUP_RANK", int(env["RANK"]) // max(local_world, 1))),
        # The elastic agent states the number of nodes (GROUP_WORLD_SIZE); a plain torchrun of an
        # older release may not, and then the nodes are taken to be alike.
        num_nodes=int(env.get("GROUP_WORLD_SIZE", max(1, world // max(local_world, 1)))),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", 0)),
        launcher="torchrun",
    )


def _int(env: Mapping[str, str], name: str) -> int:
    text = env[name]
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer") from None


def _first(env: Mapping[str, str], *names: str) -> str | None:
    """The first of `names` that is set."""
    return next((n for n in names if n in env), None)


def _master_port(env: Mapping[str, str], job_key: str | None) -> int:
    if "MASTER_PORT" in env:
        return _int(env, "MASTER_PORT")
    return derived_port(job_key) if job_key else DEFAULT_MASTER_PORT


def check_node_launchers(topo: Topology, min_nodes: int, max_nodes: int) -> None:
    """With `--nproc-per-node` under srun or mpirun, every task is one node's launcher, which
    starts that node's processes itself: there must be one task per node and as many tasks as
    `--nnodes` asks for, or the rendezvous waits for nodes that never join."""
    if topo.launcher not in ("slurm", "mpi"):
        return
    how = "srun" if topo.launcher == "slurm" else "mpirun"
    one_per_node = "srun --ntasks-per-node=1" if topo.launcher == "slurm" else "mpirun --map-by ppr:1:node"
    if topo.local_world_size != 1:
        raise ValueError(
            f"{how} started {topo.local_world_size} tasks on this node, but with --nproc-per-node each task is a "
            f"node's launcher that starts the node's processes itself: start one task per node ({one_per_node}), "
            "or leave out --nproc-per-node so that every task trains as one process"
        )
    if not min_nodes <= topo.world_size <= max_nodes:
        nnodes = str(min_nodes) if min_nodes == max_nodes else f"{min_nodes}:{max_nodes}"
        fewer = topo.world_size < min_nodes
        raise ValueError(
            f"--nnodes {nnodes} but {how} started {topo.world_size} task(s), one per node: "
            + ("fewer tasks than asked, so the rendezvous would wait for nodes that never join; " if fewer else "")
            + (
                "run `srun --nodes=N --ntasks-per-node=1 ... --nnodes $SLURM_NNODES`"
                if topo.launcher == "slurm"
                else f"run `{one_per_node} -np N ... --nnodes N`"
            )
        )


# --------------------------------------------------------------------------------------------
# SLURM


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand SLURM's compressed host list, like `scontrol show hostnames` does.

    `node[01-03,07],gpu-a[1-2]` -> node01 node02 node03 node07 gpu-a1 gpu-a2. Ranges keep the
    lower bound's zero padding; several bracket groups in one name expand left to right
    (`r[1-2]n[1-2]` -> r1n1 r1n2 r2n1 r2n2)."""
    hosts: list[str] = []
    for item in _split_top_level(hostlist, hostlist):
        # A name alternates literal text and bracket groups.
        choices: list[list[str]] = []
        for literal, group in re.findall(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", item):
            if literal:
                choices.append([literal])
            if group:
                choices.append(_expand_group(group, hostlist))
        if "[" in item or "]" in item:
            if re.fullmatch(r"(?:[^\[\]]*\[[^\[\]]+\])+[^\[\]]*", item) is None:
                raise ValueError(f"bad host list {hostlist!r}: unbalanced or empty brackets in {item!r}")
        names = [""]
        for options in choices:
            names = [n + o for n in names for o in options]
        hosts.extend(names)
    return hosts


def _split_top_level(text: str, whole: str) -> list[str]:
    """Split at commas outside brackets; blank items are skipped."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"bad host list {whole!r}: nested brackets")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"bad host list {whole!r}: ']' without '['")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"bad host list {whole!r}: '[' without ']'")
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_group(group: str, whole: str) -> list[str]:
    out = []
    for part in group.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValueError(f"bad host list {whole!r}: {part!r} is not a number or a range like 01-04")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"bad host list {whole!r}: range {part!r} runs backwards")
        width = len(lo) if lo.startswith("0") else 0
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def parse_tasks_per_node(text: str) -> list[int]:
    """SLURM's tasks-per-node list, `2(x3),1` -> [2, 2, 2, 1]: one count per node."""
    counts: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"bad tasks-per-node list {text!r}: expected counts like 2(x3),1")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def _slurm_world(env: Mapping[str, str]) -> int:
    return _int(env, _first(env, "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"))


def _slurm(env: Mapping[str, str]) -> Topology:
    rank = _int(env, "SLURM_PROCID")
    world = _slurm_world(env)
    nodes_var = _first(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    num_nodes = _int(env, nodes_var) if nodes_var else 1
    node_rank = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else (rank if num_nodes == 1 else -1)
    if not 0 <= rank < world:
        raise ValueError(f"SLURM_PROCID={rank} is outside the {world} task(s) of SLURM_NTASKS")
    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"SLURM_NODEID={node_rank} is outside the {num_nodes} node(s) of {nodes_var}")
    if local_rank < 0:
        raise ValueError("SLURM_LOCALID is not set in a task on several nodes; is this a task of srun?")

    # The step's own layout first: SLURM_NTASKS_PER_NODE is the job's request and stays in
    # the environment of every step, also of a smaller `srun -n 1`.
    per_node_var = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if per_node_var:
        per_node = parse_tasks_per_node(env[per_node_var])
    elif "SLURM_NTASKS_PER_NODE" in env:
        per_node_var = "SLURM_NTASKS_PER_NODE"
        per_node = [_int(env, per_node_var)] * num_nodes
    elif num_nodes == 1:
        per_node = [world]
    else:
        raise ValueError(
            f"cannot tell how many of the {world} SLURM tasks run on each of the {num_nodes} nodes: "
            "none of SLURM_STEP_TASKS_PER_NODE, SLURM_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE is set"
        )
    if len(per_node) != num_nodes or sum(per_node) != world:
        asked = sum(per_node)
        fewer = world < asked
        raise ValueError(
            f"SLURM started {world} task(s) (SLURM_NTASKS) but {per_node_var}={env[per_node_var]} on "
            f"{num_nodes} node(s) ({nodes_var}) means {asked}: "
            + (
                "fewer tasks than the job asks for, so the ranks would wait for tasks that never start; "
                f"run srun with --ntasks={asked}, or with --ntasks-per-node matching --ntasks"
                if fewer
                else "the task counts contradict each other; run srun with matching --nodes, --ntasks and "
                "--ntasks-per-node"
            )
        )
    local_world = per_node[node_rank]
    if not 0 <= local_rank < local_world:
        raise ValueError(f"SLURM_LOCALID={local_rank} is outside the {local_world} task(s) of node {node_rank}")

    if "MASTER_ADDR" in env:
        master_addr = env["MASTER_ADDR"]
    else:
        nodelist_var = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        hosts = expand_hostlist(env[nodelist_var]) if nodelist_var else []
        if hosts:
            master_addr = hosts[0]
        elif num_nodes == 1:
            master_addr = "127.0.0.1"
        else:
            raise ValueError(
                "no SLURM node list (SLURM_STEP_NODELIST, SLURM_JOB_NODELIST) to find the first node; "
                "set MASTER_ADDR to the address of rank 0's node"
            )
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
    return Topology(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=master_addr,
        master_port=_master_port(env, f"slurm:{job}.{step}" if job else None),
        launcher="slurm",
    )


# --------------------------------------------------------------------------------------------
# MPI

# (launcher, rank variable, world size variables)
_MPI_FLAVOURS = (
    ("Open MPI", "OMPI_COMM_WORLD_RANK", ("OMPI_COMM_WORLD_SIZE",)),
    ("MPICH/Intel MPI (PMI)", "PMI_RANK", ("PMI_SIZE",)),
    ("PMIx", "PMIX_RANK", ("PMIX_SIZE", "PMIX_JOB_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")),
)
# (local rank, local size) pairs, in order of preference.
_MPI_LOCAL = (
    ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),  # Open MPI
    ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH / Intel MPI hydra
    ("PMI_LOCAL_RANK", "PMI_LOCAL_SIZE"),  # Cray PMI / PALS
    ("PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
)
# Variables that name the job the same way in every rank (Open MPI 4's jobid, PMIx's
# namespace, SLURM's PMI-2 job id). Not PMI_ID: some launchers number the processes with it.
_MPI_JOB_IDS = ("OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE", "PMI_JOBID")


def _mpi_identity(env: Mapping[str, str]) -> tuple[str, int, int] | None:
    """(flavour, rank, world size) when an MPI launcher started this process."""
    for flavour, rank_var, size_vars in _MPI_FLAVOURS:
        if rank_var not in env:
            continue
        size_var = _first(env, *size_vars)
        if size_var is None:
            raise ValueError(
                f"started by {flavour} ({rank_var}={env[rank_var]}) but the number of ranks is unknown: "
                f"none of {', '.join(size_vars)} is set; launch with mpirun/mpiexec -n N"
            )
        rank, size = _int(env, rank_var), _int(env, size_var)
        if not 0 <= rank < size:
            raise ValueError(f"{rank_var}={rank} is outside the {size} rank(s) of {size_var}")
        return flavour, rank, size
    return None


def _mpi(env: Mapping[str, str], flavour: str, rank: int, world: int) -> Topology:
    pair = next(((r, s) for r, s in _MPI_LOCAL if r in env and s in env), None)
    if pair is not None:
        local_rank, local_world = _int(env, pair[0]), _int(env, pair[1])
        if not 0 <= local_rank < local_world <= world:
            raise ValueError(f"{pair[0]}={local_rank} and {pair[1]}={local_world} do not fit {world} rank(s)")
    elif world == 1:
        local_rank, local_world = 0, 1
    else:
        raise ValueError(
            f"started by {flavour} (rank {rank} of {world}) but nothing says which ranks share a node: "
            f"none of {', '.join(r for r, _ in _MPI_LOCAL)} is set"
        )
    # Open MPI's OMPI_COMM_WORLD_NODE_RANK is the rank among the processes of all jobs on the
    # node, not the node's index; with the default block mapping (fill a node, then the next)
    # the node's index follows from the rank.
    num_nodes = max(1, -(-world // local_world))
    node_rank = min(rank // local_world, num_nodes - 1)

    if "MASTER_ADDR" in env:
        master_addr = env["MASTER_ADDR"]
    elif local_world == world:
        master_addr = "127.0.0.1"
    else:
        raise ValueError(
            f"the {world} MPI ranks run on several nodes ({local_world} on this one) and MPI does not say "
            "which node rank 0 is on: pass MASTER_ADDR, the address of rank 0's node, to every rank "
            "(Open MPI: mpirun -x MASTER_ADDR=node01 ...; MPICH/Intel MPI: mpiexec -genv MASTER_ADDR node01 ...)"
        )
    job_var = _first(env, *_MPI_JOB_IDS)
    return Topology(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=master_addr,
        master_port=_master_port(env, f"mpi:{env[job_var]}" if job_var else None),
        launcher="mpi",
    )
