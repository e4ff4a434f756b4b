"""`linscale cluster` for real: namespaces, bridge, shaped links, faults, runs and clean-up (root)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist.conftest import TINY_GPT

from .conftest import skip_reason

pytestmark = [pytest.mark.cluster, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]

ROOT = Path(__file__).resolve().parents[2]

# Small network probes run inside the namespaces: `python -c PROBE ROLE ARGS...`. Clients retry
# their connection until a deadline, so a server may start after them.
PROBE = r"""
import socket, sys, time
role, args = sys.argv[1], sys.argv[2:]

def listen(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(8)
    print("listening", flush=True)
    return s

def dial(host, port, deadline):
    end = time.monotonic() + float(deadline)
    while True:
        try:
            c = socket.create_connection((host, int(port)), timeout=1)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return c
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)

if role == "echo":  # PORT CONNECTIONS (0: forever)
    s, n = listen(args[0]), int(args[1])
    served = 0
    while n == 0 or served < n:
        c, _ = s.accept()
        while data := c.recv(4096):
            c.sendall(data)
        c.close()
        served += 1
elif role == "hello":  # HOST PORT DEADLINE: one round trip, retried until the deadline
    c = dial(*args)
    c.sendall(b"hello")
    assert c.recv(16) == b"hello"
    print("ok")
elif role == "try":  # HOST PORT TIMEOUT: one attempt
    try:
        c = socket.create_connection((args[0], int(args[1])), timeout=float(args[2]))
        c.sendall(b"x")
        c.settimeout(float(args[2]))
        print("ok" if c.recv(1) == b"x" else "closed")
    except OSError as e:
        print(f"failed {type(e).__name__} {e.errno}")
elif role == "recv":  # PORT: bits/s received on one connection, leaving out its first quarter
    c, _ = listen(args[0]).accept()
    buf, total, samples = bytearray(1 << 20), 0, []
    while n := c.recv_into(buf):
        total += n
        samples.append((time.monotonic(), total))
    t0, t1 = samples[0][0], samples[-1][0]
    w = [s for s in samples if s[0] >= t0 + (t1 - t0) / 4]
    print(f"RATE {(w[-1][1] - w[0][1]) * 8 / (w[-1][0] - w[0][0]):.0f}", flush=True)
elif role == "send":  # HOST PORT SECONDS
    c, data = dial(args[0], args[1], 10), b"x" * (1 << 16)
    end = time.monotonic() + float(args[2])
    while time.monotonic() < end:
        c.sendall(data)
    c.close()
elif role == "rtt":  # HOST PORT N: median round trip in ms of 1-byte messages
    c, rtts = dial(args[0], args[1], 10), []
    for _ in range(int(args[2])):
        t = time.perf_counter()
        c.sendall(b"p")
        c.recv(1)
        rtts.append((time.perf_counter() - t) * 1000)
    print(f"RTT {sorted(rtts)[len(rtts) // 2]:.3f}", flush=True)
"""


def probe(*args) -> list[str]:
    return [sys.executable, "-c", PROBE, *map(str, args)]


def run_probes(cluster, commands: dict[int, list[str]], timeout: float = 30):
    """Run `commands[rank]` on those nodes (`true` on the others); the output of each node."""
    out, err = io.StringIO(), io.StringIO()
    result = cluster.run(lambda r: commands.get(r, ["true"]), timeout=timeout, stdout=out, stderr=err)
    assert result.returncode == 0, f"{result}\n{out.getvalue()}\n{err.getvalue()}"
    lines: dict[int, list[str]] = {}
    for line in out.getvalue().splitlines():
        tag, _, text = line.partition("] ")
        lines.setdefault(int(tag.removeprefix("[node ")), []).append(text)
    return lines


def value(lines: list[str], key: str) -> float:
    return float(next(line.split()[1] for line in lines if line.startswith(key)))


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := pred()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return result


def ns_exec(cluster, rank: int, argv: list[str], timeout: float = 20) -> str:
    proc = subprocess.run(
        ["ip", "netns", "exec", cluster.netns(rank), *argv], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def cluster(make_cluster):
    c = make_cluster(3, "100mbit")
    try:
        yield c
    finally:
        c.down()


def test_nodes_reach_each_other_and_know_who_they_are(cluster):
    env = [sys.executable, "-c", "import os; print(*(os.environ[k] for k in " + repr(list(cluster.node_env(0))) + "))"]
    lines = run_probes(
        cluster,
        {
            0: probe("echo", 7001, 2),
            1: probe("hello", cluster.addr(0), 7001, 10),
            2: probe("hello", cluster.addr(0), 7001, 10),
        },
    )
    assert lines[1] == ["ok"] and lines[2] == ["ok"]
    assert run_probes(cluster, {2: probe("echo", 7002, 1), 1: probe("hello", cluster.addr(2), 7002, 10)})[1] == ["ok"]
    lines = run_probes(cluster, dict.fromkeys(range(3), env))
    for r in range(3):
        assert lines[r] == [f"{r} {cluster.addr(r)} 3 {cluster.addr(0)} eth0"]


def test_nodes_reach_nothing_outside_their_subnet(cluster):
    # A server on the root namespace's loopback: inside a node, 127.0.0.1 is the node's own.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert ns_exec(cluster, 1, probe("try", "127.0.0.1", port, 2)).split()[:2] == [
            "failed",
            "ConnectionRefusedError",
        ]
    # No default route: any address outside the subnet is unreachable, and no packet leaves.
    routes = ns_exec(cluster, 1, ["ip", "-4", "route", "show"])
    assert "default" not in routes and routes.strip().startswith(str(cluster.state.subnet))
    outside = ns_exec(cluster, 1, probe("try", "192.0.2.1", 80, 2)).split()
    assert outside[:2] == ["failed", "OSError"] and int(outside[2]) == 101  # ENETUNREACH
    # The bridge and its ports have no address in the root namespace.
    for dev in (f"{cluster.name}-br", f"{cluster.name}-v0"):
        assert "inet" not in subprocess.run(["ip", "addr", "show", "dev", dev], capture_output=True, text=True).stdout


def test_link_rate_is_enforced_and_slow_reshapes_it(cluster):
    def throughput(sender: int, port: int) -> float:
        lines = run_probes(cluster, {0: probe("recv", port), sender: probe("send", cluster.addr(0), port, 1.2)})
        return value(lines[0], "RATE")

    normal = throughput(1, 7101)
    assert 60e6 <= normal <= 105e6, f"{normal / 1e6:.1f} Mbit/s on a 100mbit link"
    cluster.slow(2, "25mbit")
    try:
        assert cluster.status()[2].rate == "25mbit"
        slowed = throughput(2, 7102)
    finally:
        cluster.slow(2, "100mbit")
    ratio = slowed / normal
    print(f"100mbit: {normal / 1e6:.1f} Mbit/s, 25mbit: {slowed / 1e6:.1f} Mbit/s, ratio {ratio:.3f}")
    assert 0.15 <= ratio <= 0.4, f"slowed/normal = {ratio:.3f}, expected about 0.25"


def test_latency_applies_one_way_on_each_node(make_cluster):
    c = make_cluster(2, "1gbit", latency="5ms")
    try:
        assert [s.latency for s in c.status()] == ["5ms", "5ms"]
        if c.state.delay == "relay":
            assert c.relay_running()
        lines = run_probes(c, {0: probe("echo", 7201, 1), 1: probe("rtt", c.addr(0), 7201, 15)})
        rtt = value(lines[1], "RTT")
        print(f"round trip with 5ms one-way latency ({c.state.delay}): {rtt:.2f} ms")
        # Each direction crosses one node's egress: 5 ms + 5 ms.
        assert 9.5 <= rtt <= 40, rtt
    finally:
        c.down()
    assert not c.relay_running()


def test_kill_ends_every_process_of_one_node(cluster):
    victim = cluster.popen(1, ["sleep", "60"])
    bystander = cluster.popen(0, ["sleep", "60"])
    try:
        wait_for(lambda: cluster.status()[1].processes == 1, 10, "the process on node 1")
        killed = cluster.kill(1)
        assert victim.pid in killed
        assert victim.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None
        assert [s.processes for s in cluster.status()] == [1, 0, 0]
    finally:
        for p in (victim, bystander):
            p.kill()
            p.wait(timeout=10)


def test_cut_fails_connections_and_heal_restores_them(cluster):
    server = cluster.popen(0, probe("echo", 7301, 0), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        assert ns_exec(cluster, 1, probe("try", cluster.addr(0), 7301, 2)).strip() == "ok"
        cluster.cut(1)
        try:
            assert cluster.status()[1].link == "cut"
            assert ns_exec(cluster, 1, probe("try", cluster.addr(0), 7301, 1)).startswith("failed")
            assert ns_exec(cluster, 2, probe("try", cluster.addr(0), 7301, 2)).strip() == "ok"  # others unaffected
        finally:
            cluster.heal(1)
        assert cluster.status()[1].link == "up"
        assert ns_exec(cluster, 1, probe("hello", cluster.addr(0), 7301, 10)).strip() == "ok"
    finally:
        server.kill()
        server.wait(timeout=10)


def test_a_failing_node_stops_the_others(cluster):
    script = 'if [ "$LINSCALE_NODE_RANK" = 1 ]; then echo bye; exit 3; fi; setsid sleep 61 & sleep 60'
    out = io.StringIO()
    start = time.monotonic()
    result = cluster.run(["sh", "-c", script], timeout=30, stdout=out, grace=1)
    assert (result.returncode, result.failed_node) == (3, 1)
    assert time.monotonic() - start < 15
    assert "[node 1] bye\n" in out.getvalue()
    # Also the process that left the command's process group (setsid) is gone.
    assert [s.processes for s in cluster.status()] == [0, 0, 0]


def test_run_timeout_and_single_node(cluster):
    result = cluster.run(["sleep", "60"], timeout=0.5, grace=1)
    assert result.timed_out and result.returncode == 124
    assert [s.processes for s in cluster.status()] == [0, 0, 0]
    out = io.StringIO()
    assert cluster.run(["sh", "-c", "echo $LINSCALE_NODE_RANK"], node=2, stdout=out).returncode == 0
    assert out.getvalue() == "[node 2] 2\n"


def linscale_cli(*args, state_dir, **kw) -> subprocess.Popen:
    env = {**os.environ, "LINSCALE_STATE_DIR": str(state_dir)}
    return subprocess.Popen(
        [sys.executable, "-m", "linscale", "cluster", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_cli_status_errors_and_ctrl_c(cluster, cluster_state_dir):
    status = linscale_cli("status", "--name", cluster.name, state_dir=cluster_state_dir)
    out, err = status.communicate(timeout=60)
    assert status.returncode == 0, err
    assert "NODE" in out and "PROCS" in out and cluster.addr(2) in out and "100mbit" in out

    again = linscale_cli("up", "--name", cluster.name, "--nodes", "2", "--link", "1gbit", state_dir=cluster_state_dir)
    out, err = again.communicate(timeout=60)
    assert again.returncode == 2
    assert err.strip() == (
        f"linscale: error: cluster '{cluster.name}' already exists (3 nodes on {cluster.state.subnet}); "
        f"remove it with `linscale cluster down --name {cluster.name}`"
    )

    # A test session started in the background (`cmd &` in a script) ignores SIGINT, and so would
    # every child: the command gets the default handling back, as in a terminal.
    run = linscale_cli("run", "--name", cluster.name, "--", "sleep", "60", state_dir=cluster_state_dir,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        wait_for(lambda: all(s.processes for s in cluster.status()), 30, "sleep on every node")
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=30)
    finally:
        run.kill()
    assert run.returncode == 130, err
    assert "interrupted; stopped every node" in err
    assert [s.processes for s in cluster.status()] == [0, 0, 0]


def test_down_cleans_up_after_a_crash_halfway_through_up(make_cluster, cluster_state_dir):
    from linscale.cluster.netns import Cluster, ClusterError, down, leftovers, load_state

    name = make_cluster.new_name()
    # `up` in a process that dies (os._exit, no clean-up) when it is about to create node 1's veth.
    crash = f"""
import os
from linscale.cluster import netns
real = netns.sh
def sh(argv, **kw):
    if list(argv[:3]) == ["ip", "link", "add"] and "{name}-v1" in argv:
        os._exit(9)
    return real(argv, **kw)
netns.sh = sh
netns.Cluster.up(3, "1gbit", name="{name}", subnet="10.213.99.0/24", directory="{cluster_state_dir}")
"""
    proc = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    state = load_state(name, cluster_state_dir)
    assert state.phase == "creating"
    # Recorded before it was created: node 1's veth is in the state but does not exist.
    assert state.resources[-1] == ["link", f"{name}-v1"]
    namespaces, links = leftovers(name)
    assert namespaces == [f"{name}-node0", f"{name}-node1"]
    assert f"{name}-br" in links and f"{name}-v0" in links and f"{name}-v1" not in links
    # Something that the state does not know about, and a process in a node.
    subprocess.run(["ip", "link", "add", f"{name}-e7", "type", "veth", "peer", "name", f"{name}-v7"], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", f"{name}-node0", "sleep", "60"])
    try:
        with pytest.raises(ClusterError, match="stopped halfway"):
            Cluster.open(name, cluster_state_dir)
        with pytest.raises(ClusterError, match="already exists"):
            Cluster.up(2, "1gbit", name=name, directory=cluster_state_dir)
        removed = down(name, cluster_state_dir)
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
    finally:
        sleeper.kill()
        sleeper.wait()
    assert f"{name}-node1" in removed and f"{name}-e7" in removed
    assert leftovers(name) == ([], [])
    assert load_state(name, cluster_state_dir) is None


# ---- a real training job on the emulated nodes

TINY_JOB = [*TINY_GPT, "--train.global_batch=8", "--train.log_every=1", "--optim.warmup_steps=2",
            "--nproc-per-node=1"]  # fmt: skip


@pytest.fixture(scope="module")
def pair(make_cluster):
    c = make_cluster(2, "1gbit")
    try:
        yield c
    finally:
        c.down()


def free_port(cluster) -> int:
    """A rendezvous port not used before in this cluster (a closed port lingers in TIME_WAIT)."""
    used = getattr(cluster, "_test_ports", set())
    cluster._test_ports = used
    port = 29500 + len(used) * 2
    used.add(port)
    return port


def test_cluster_train_runs_one_job_on_all_nodes(pair, cluster_state_dir, tmp_path):
    job = linscale_cli(
        "train",
        "--name",
        pair.name,
        "--master-port",
        str(free_port(pair)),
        "--timeout",
        "150",
        "gpt",
        *TINY_JOB,
        "--train.max_steps=8",
        f"--log.dir={tmp_path}",
        state_dir=cluster_state_dir,
    )
    try:
        out, err = job.communicate(timeout=180)
    finally:
        job.kill()
    assert job.returncode == 0, out + err
    assert "[node 0] ***** train metrics *****" in out
    run = json.loads((tmp_path / "run.json").read_text())
    assert (run["world_size"], run["num_nodes"]) == (2, 2)
    assert run["argv"][-6:] == ["--node-rank", "0", "--master-addr", pair.addr(0), "--master-port", run["argv"][-1]]
    assert json.loads((tmp_path / "summary.json").read_text())["train_steps"] == 8
    assert [s.processes for s in pair.status()] == [0, 0]
