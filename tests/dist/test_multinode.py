"""Several nodes' launchers on one machine over loopback: the static form, the roll call, and a
lost node. (tests/cluster repeats the important ones on emulated nodes with their own addresses.)"""

import socket

import pytest

from .conftest import TINY_GPT

pytestmark = pytest.mark.dist

COMMON = [*TINY_GPT, "--train.global_batch=8", "--train.log_every=1", "--optim.warmup_steps=2"]


def free_port_pair() -> int:
    """A port P with P and P+1 free (the rendezvous and the roll call)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("0.0.0.0", port))
                b.bind(("0.0.0.0", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of ports")


def node(rank: int, nnodes: int, port: int, *extra: str) -> list[str]:
    return [
        "train",
        "gpt",
        *COMMON,
        f"--nnodes={nnodes}",
        f"--node-rank={rank}",
        "--nproc-per-node=1",
        f"--master-port={port}",
        *extra,
    ]


def test_two_nodes_follow_two_local_processes(linscale, linscale_bg, tmp_path):
    ref = linscale("train", "gpt", *COMMON, "--train.max_steps=12", "--nproc-per-node=2")
    assert ref.returncode == 0, ref.output
    port = free_port_pair()
    run_dir = tmp_path / "two-nodes"
    nodes = [
        linscale_bg(*node(r, 2, port, "--train.max_steps=12", f"--log.dir={run_dir}"), run_dir=run_dir) for r in (0, 1)
    ]
    results = [n.finish() for n in nodes]
    for r in results:
        assert r.returncode == 0, r.output
    two = results[0]
    assert two.summary()["world_size"] == 2
    got, want = two.losses(), ref.losses()
    assert len(got) == len(want) == 12
    assert max(abs(a - b) / b for a, b in zip(got, want, strict=True)) < 1e-4


def test_a_node_that_never_joins_is_named(linscale):
    port = free_port_pair()
    run = linscale(*node(0, 3, port, "--train.max_steps=2", "--join-timeout=3", "--train.global_batch=6"), timeout=60)
    assert run.returncode != 0
    assert "node(s) 1, 2 of 3 did not join within 3s" in run.stderr


def test_an_unreachable_master_is_reported_from_the_node(linscale):
    port = free_port_pair()  # nobody listens there
    run = linscale(*node(1, 2, port, "--train.max_steps=2", "--join-timeout=2"), timeout=60)
    assert run.returncode != 0
    assert f"cannot reach the master 127.0.0.1:{port + 1}" in run.stderr
    assert "--master-addr" in run.stderr


def _until(started, text: str) -> None:
    """Read a background run's output until `text` appears (the run is under way)."""
    for line in started.proc.stdout:
        if text in line:
            return
    pytest.fail(f"the run ended before printing {text!r}")


def test_a_second_node_with_a_taken_rank_is_refused(linscale, linscale_bg):
    port = free_port_pair()
    args = ["--train.max_steps=100000", "--train.eval_every=3"]
    head = linscale_bg(*node(0, 2, port, *args), timeout=120)
    linscale_bg(*node(1, 2, port, *args), timeout=120)
    _until(head, "step 3: eval_loss")
    twin = linscale(*node(1, 2, port, *args, "--join-timeout=20"), timeout=60)
    assert twin.returncode != 0
    assert "two nodes were started with --node-rank 1" in twin.stderr


def test_a_lost_node_ends_the_job_with_a_message(linscale_bg):
    port = free_port_pair()
    args = ["--train.max_steps=100000", "--train.eval_every=3", "--runtime.timeout=60"]
    head = linscale_bg(*node(0, 2, port, *args), timeout=120)
    other = linscale_bg(*node(1, 2, port, *args), timeout=120)
    _until(head, "step 3: eval_loss")  # training is under way
    other.kill()
    run = head.finish()
    assert run.returncode != 0
    assert "peer lost: the connection to node" in run.stderr, run.stderr
