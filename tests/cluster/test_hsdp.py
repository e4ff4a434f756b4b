"""hsdp across emulated nodes: 2 nodes x 2 processes. The device mesh shards inside a node and
replicates across nodes, and the job trains the same model as one process. Needs root (network
namespaces)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist.conftest import TINY_GPT

from .conftest import skip_reason

pytestmark = [pytest.mark.cluster, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]

ROOT = Path(__file__).resolve().parents[2]
TASK = f"{Path(__file__).resolve().parent / 'hsdp_tasks.py'}:MeshRecorder"
COMMON = [
    *TINY_GPT, "--train.max_steps=20", "--train.log_every=1", "--train.global_batch=16", "--optim.warmup_steps=5",
    "--log.save_model=true", "--train.eval_every=0", "--train.eval_batches=1",
]  # fmt: skip
NODES, PER_NODE = 2, 2


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m["train_loss"] for m in map(json.loads, lines) if "train_loss" in m]


def netns_inode(name: str) -> str:
    return f"net:[{os.stat(f'/run/netns/{name}').st_ino}]"


def test_hsdp_on_two_nodes_shards_inside_nodes_replicates_across_and_matches_one_process(make_cluster, tmp_path):
    from linscale.cluster.netns import node_command

    ref_dir, job_dir, mesh_dir = tmp_path / "one", tmp_path / "hsdp", tmp_path / "mesh"
    mesh_dir.mkdir()
    cluster = make_cluster(NODES, "1gbit")
    try:
        # The one-process reference runs on the host while the job runs on the nodes: the results
        # do not depend on the machine's load, and the test takes the time of the longer one.
        ref = subprocess.Popen([sys.executable, "-m", "linscale", "train", "gpt", *COMMON, "--nproc-per-node=1",
                                f"--log.dir={ref_dir}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
        try:
            args = [TASK, *COMMON, f"--nproc-per-node={PER_NODE}", "--parallel.strategy=hsdp", f"--log.dir={job_dir}"]
            out, err = io.StringIO(), io.StringIO()
            result = cluster.run(lambda r: node_command("train", args, NODES, r, cluster.addr(0), 29730), timeout=150,
                                 stdout=out, stderr=err, env={"LINSCALE_TEST_OUT": str(mesh_dir)})  # fmt: skip
            ref_out, ref_err = ref.communicate(timeout=150)
        finally:
            if ref.poll() is None:
                os.killpg(ref.pid, 9)
                ref.wait(timeout=10)
        assert result.returncode == 0, out.getvalue() + err.getvalue()
        assert ref.returncode == 0, ref_out + ref_err
        node_ns = [netns_inode(cluster.netns(r)) for r in range(NODES)]
    finally:
        cluster.down()

    summary = json.loads((job_dir / "summary.json").read_text())
    run = json.loads((job_dir / "run.json").read_text())
    assert (summary["strategy"], summary["world_size"], run["num_nodes"]) == ("hsdp", 4, 2)

    # (a) The mesh, as every rank sees it on its parameters: rows are nodes (replicate), columns
    # the processes of a node (shard).
    seen = {r: json.loads((mesh_dir / f"mesh-rank{r}.json").read_text()) for r in range(NODES * PER_NODE)}
    for rank, v in seen.items():
        node = rank // PER_NODE
        assert v["dtensor_params"] == v["params"] > 0 and v["meshes"] == 1, v
        assert v["mesh"] == [[0, 1], [2, 3]], v
        assert v["dim_names"] == ["replicate", "shard"], v
        assert v["placements"] == ["(Replicate(), Shard(dim=0))"], v
        # Sharded with the processes of its own node, replicated with the same local rank on the other node.
        assert v["groups"] == {"replicate": [rank % PER_NODE, rank % PER_NODE + PER_NODE],
                               "shard": [node * PER_NODE, node * PER_NODE + 1]}, v  # fmt: skip
        # Ranks 0, 1 ran in node 0's network namespace, 2, 3 in node 1's.
        assert (v["node"], v["group_rank"], v["local_rank"]) == (node, node, rank % PER_NODE), v
        assert v["node_addr"] == cluster.addr(node) and v["netns"] == node_ns[node], v

    # (b) The same training as one process: losses step by step and the final parameters.
    got, want = losses(job_dir), losses(ref_dir)
    assert len(got) == len(want) == 20
    worst = max(abs(a - b) / b for a, b in zip(got, want, strict=True))
    assert worst < 1e-4, f"losses differ by {worst:.2e}"
    final, params = torch.load(job_dir / "model.pt"), torch.load(ref_dir / "model.pt")
    assert final.keys() == params.keys()
    diff = max((final[k].float() - params[k].float()).abs().max().item() for k in params)
    assert diff < 1e-4, f"final parameters differ by up to {diff:.2e}"
