"""linscale.cluster.netns without root: parsing, tc/ip command lines, state files, CLI errors."""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest

from linscale.cli import main
from linscale.cluster import netns
from linscale.cluster.netns import (
    IFNAMSIZ,
    Cluster,
    ClusterError,
    State,
    bridge_steps,
    check_name,
    format_latency,
    format_rate,
    link_shape_steps,
    load_state,
    node_addresses,
    node_command,
    node_steps,
    parse_latency,
    parse_loss,
    parse_node,
    parse_rate,
    relay_steps,
    reshape_commands,
    save_state,
    shape_commands,
    state_path,
    tbf_args,
)


@pytest.mark.parametrize(
    "text, bits",
    [
        ("1gbit", 10**9),
        ("10gbit", 10**10),
        ("25gbit", 25 * 10**9),
        ("100gbit", 10**11),
        ("500mbit", 5 * 10**8),
        ("100kbit", 10**5),
        ("1.5gbit", 15 * 10**8),
        ("100mbps", 8 * 10**8),
        (" 2GBIT ", 2 * 10**9),
        ("64000bit", 64000),
    ],
)
def test_parse_rate(text, bits):
    assert parse_rate(text) == bits


@pytest.mark.parametrize("text", ["fast", "10", "10g", "gbit", "-1gbit", "1 gigabit", "1000bit"])
def test_bad_rate_shows_an_example(text):
    with pytest.raises(ClusterError, match=r"e\.g\. 10gbit, 500mbit"):
        parse_rate(text)


def test_format_rate_round_trips():
    for text in ("1gbit", "10gbit", "25gbit", "100gbit", "500mbit", "1.5gbit", "100kbit"):
        assert format_rate(parse_rate(text)) == text


@pytest.mark.parametrize(
    "text, us", [("5us", 5), ("200us", 200), ("1ms", 1000), ("1.5ms", 1500), ("0", 0), ("2s", 2 * 10**6)]
)
def test_parse_latency(text, us):
    assert parse_latency(text) == us


@pytest.mark.parametrize("text", ["5", "fast", "1h", "-1ms", "20s"])
def test_bad_latency(text):
    with pytest.raises(ClusterError, match=r"latency"):
        parse_latency(text)


def test_format_latency():
    assert [format_latency(us) for us in (0, 5, 999, 1000, 1500)] == ["0", "5us", "999us", "1ms", "1.5ms"]


def test_parse_loss():
    assert parse_loss("1%") == 1.0
    assert parse_loss("0.1") == 0.1
    for bad in ("100%", "x", "-1%"):
        with pytest.raises(ClusterError, match=r"e\.g\. 0\.1%"):
            parse_loss(bad)


def test_parse_node():
    assert parse_node("2") == parse_node("node2") == parse_node("ls-node2") == parse_node(2) == 2
    with pytest.raises(ClusterError, match="rank"):
        parse_node("first")


def test_names_fit_in_interface_names():
    check_name("ls", 3)
    check_name("abcdefghij", 100)  # abcdefghij-v99: 14 characters
    with pytest.raises(ClusterError, match=r"at most 12 characters"):
        check_name("abcdefghijklm", 2)  # abcdefghijklm-br: 16
    check_name("abcdefghijk", 100)  # abcdefghijk-v99: 15
    with pytest.raises(ClusterError, match=r"at most 11 characters"):
        check_name("abcdefghijkl", 100)  # abcdefghijkl-v99: 16
    for bad in ("", "-x", "a b", "a/b", "a-b"):
        with pytest.raises(ClusterError, match="bad cluster name"):
            check_name(bad)


def test_node_addresses():
    assert node_addresses("10.213.0.0/24", 3) == ["10.213.0.1", "10.213.0.2", "10.213.0.3"]
    assert node_addresses("192.168.7.0/30", 2) == ["192.168.7.1", "192.168.7.2"]
    with pytest.raises(ClusterError, match="room for 2 nodes"):
        node_addresses("192.168.7.0/30", 3)
    with pytest.raises(ClusterError, match="bad subnet"):
        node_addresses("10.213.0.1/24", 2)  # host bits set


def test_tbf_burst_grows_with_the_rate():
    assert tbf_args(10**8) == ["tbf", "rate", "100000000bit", "burst", "262144", "latency", "50ms"]
    # 100gbit: 2 ms of traffic is 25 MB.
    assert tbf_args(10**11)[4] == str(25 * 10**6)


def test_shape_commands_tbf_alone():
    assert shape_commands("ls-v0", 10**9) == [
        ["tc", "qdisc", "add", "dev", "ls-v0", "root", "handle", "1:", *tbf_args(10**9)]
    ]


def test_shape_commands_netem_root_with_tbf_child():
    root, child = shape_commands("eth0", 10**9, latency_us=5, loss_pct=0.1, netns="ls-node1")
    assert root[:10] == ["tc", "-n", "ls-node1", "qdisc", "add", "dev", "eth0", "root", "handle", "1:"]
    assert root[10:] == ["netem", "limit", "100000", "delay", "5us", "loss", "0.1%"]
    assert child == ["tc", "-n", "ls-node1", "qdisc", "add", "dev", "eth0", "parent", "1:1", "handle", "10:"] + (
        tbf_args(10**9)
    )


def test_latency_only_on_the_node_side():
    cmds = link_shape_steps("ls", 1, 10**9, 1000, 0.0, delay="netem")
    node_side = [c for c in cmds if "-n" in c]
    bridge_side = [c for c in cmds if "-n" not in c]
    assert any("netem" in c for c in node_side)
    assert bridge_side == [["tc", "qdisc", "add", "dev", "ls-v1", "root", "handle", "1:", *tbf_args(10**9)]]
    # With the relay the node side is plain tbf too: the relay applies the latency.
    assert not any("netem" in c for c in link_shape_steps("ls", 1, 10**9, 1000, 0.0, delay="relay"))


def test_reshape_changes_only_the_tbf():
    under = reshape_commands("eth0", 10**8, under_netem=True, netns="ls-node0")
    assert under == [["tc", "-n", "ls-node0", "qdisc", "replace", "dev", "eth0", "parent", "1:1", "handle", "10:"]
                     + tbf_args(10**8)]  # fmt: skip
    root = reshape_commands("ls-v0", 10**8, under_netem=False)[0]
    assert " ".join(root).startswith("tc qdisc replace dev ls-v0 root handle 1: tbf rate 100000000bit")


def test_up_steps_record_each_resource_before_it_is_made():
    steps = bridge_steps("ls") + node_steps("ls", 0, "10.213.0.1", 24) + node_steps("ls", 1, "10.213.0.2", 24)
    created = [s.creates for s in steps if s.creates]
    assert created == [
        ("link", "ls-br"),
        ("netns", "ls-node0"),
        ("link", "ls-v0"),
        ("netns", "ls-node1"),
        ("link", "ls-v1"),
    ]
    argvs = [" ".join(s.argv) for s in steps]
    assert "ip link add name ls-v0 type veth peer name ls-e0" in argvs
    assert "ip -n ls-node0 link set dev ls-e0 name eth0" in argvs
    assert "ip -n ls-node0 addr add 10.213.0.1/24 dev eth0" in argvs
    assert "ip -n ls-node0 link set dev lo up" in argvs
    assert "ip link set dev ls-v0 master ls-br" in argvs
    # No address on the bridge, no default route in the nodes.
    assert not any("addr add" in a and "ls-br" in a for a in argvs)
    assert not any("route" in a for a in argvs)
    for s in steps:
        for i, word in enumerate(s.argv[:-1]):
            if word in ("name", "dev", "peer"):
                assert len(s.argv[i + 1]) <= IFNAMSIZ, s.argv


def test_relay_steps_redirect_the_node_egress():
    argvs = [" ".join(a) for a in relay_steps("ls", 2, "02:00:00:00:00:02")]
    assert "bridge fdb replace 02:00:00:00:00:02 dev ls-v2 master static" in argvs
    assert "tc qdisc add dev ls-v2 handle ffff: ingress" in argvs
    redirect = [a for a in argvs if a.startswith("tc filter add dev ls-v2 parent ffff:")]
    assert len(redirect) == 1 and redirect[0].endswith("action mirred egress redirect dev ls-i2")
    assert "ip link set dev ls-o2 master ls-br" in argvs


def test_node_command():
    cmd = node_command("train", ["gpt", "--train.max_steps=5"], 3, 2, "10.213.0.1", 29500, python="py")
    assert cmd == ["py", "-m", "linscale", "train", "gpt", "--train.max_steps=5", "--nnodes", "3", "--node-rank", "2",
                   "--master-addr", "10.213.0.1", "--master-port", "29500"]  # fmt: skip
    assert node_command("doctor", [], 2, 0, "10.0.0.1", 1234)[3:5] == ["doctor", "--nnodes"]


def test_state_round_trip_and_atomic_write(tmp_path):
    st = State(name="ls", nodes=2, subnet="10.213.0.0/24", rate=10**9, latency_us=5)
    st.record("netns", "ls-node0")
    st.record("netns", "ls-node0")
    path = save_state(st, tmp_path)
    assert path == state_path("ls", tmp_path) == tmp_path / "ls.json"
    assert [p.name for p in tmp_path.iterdir()] == ["ls.json"]  # no temporary file left behind
    back = load_state("ls", tmp_path)
    assert back == st
    assert back.resources == [["netns", "ls-node0"]]
    assert back.node_rates == [10**9, 10**9]
    assert back.addresses == ["10.213.0.1", "10.213.0.2"]
    assert load_state("other", tmp_path) is None
    path.write_text("{not json")
    with pytest.raises(ClusterError, match="damaged.*cluster down --name ls"):
        load_state("ls", tmp_path)


def test_state_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LINSCALE_STATE_DIR", str(tmp_path))
    assert netns.state_dir() == tmp_path
    monkeypatch.delenv("LINSCALE_STATE_DIR")
    assert str(netns.state_dir()) == "/run/linscale"


def test_open_requires_a_finished_cluster(tmp_path):
    with pytest.raises(ClusterError, match="no cluster named 'ls'.*cluster up --name ls"):
        Cluster.open("ls", tmp_path)
    save_state(State(name="ls", nodes=2, subnet="10.213.0.0/24", rate=10**9), tmp_path)
    with pytest.raises(ClusterError, match="stopped halfway.*cluster down --name ls"):
        Cluster.open("ls", tmp_path)


def test_nodes_and_environment(tmp_path):
    save_state(State(name="ls", nodes=3, subnet="10.213.0.0/24", rate=10**9, phase="up"), tmp_path)
    c = Cluster.open("ls", tmp_path)
    assert c.netns(2) == "ls-node2"
    assert c.node_env(1) == {
        "LINSCALE_NODE_RANK": "1",
        "LINSCALE_NODE_ADDR": "10.213.0.2",
        "LINSCALE_NUM_NODES": "3",
        "LINSCALE_MASTER_ADDR": "10.213.0.1",
        "GLOO_SOCKET_IFNAME": "eth0",
    }
    with pytest.raises(ClusterError, match=r"no node 3 in cluster 'ls': nodes are 0\.\.2"):
        c.check_node(3)


# ---- the command line, without root


def cli(capsys, *args):
    code = main(["cluster", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_not_root(capsys, monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    code, _, err = cli(capsys, "up", "--nodes", "2", "--link", "1gbit")
    assert code == 2
    assert err == "linscale: error: linscale cluster needs root (network namespaces): run as root or with sudo\n"


def test_missing_iproute2(capsys, monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns, "_which", lambda tool: None)
    code, _, err = cli(capsys, "status")
    assert code == 2
    assert "install the Debian package iproute2" in err


def test_bad_input_is_reported_before_anything_runs(capsys, monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    code, _, err = cli(capsys, "up", "--nodes", "2", "--link", "fast")
    assert code == 2 and err.startswith("linscale: error: bad rate 'fast'") and "e.g. 10gbit" in err
    code, _, err = cli(capsys, "up", "--nodes", "2", "--link", "1gbit", "--latency", "5")
    assert code == 2 and "e.g. 5us, 200us or 1ms" in err
    code, _, err = cli(capsys, "kill", "first")
    assert code == 2 and "bad node 'first'" in err
    assert len(err.splitlines()) == 1


def test_no_action_prints_help(capsys):
    code, out, _ = cli(capsys)
    assert code == 2 and "up" in out and "down" in out


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch):
    """`Cluster.open` on a state file and a recording `run`, so the CLI's command lines can be checked."""
    save_state(State(name="ls", nodes=2, subnet="10.213.0.0/24", rate=10**9, phase="up"), tmp_path)
    monkeypatch.setenv("LINSCALE_STATE_DIR", str(tmp_path))
    monkeypatch.setattr("linscale.cli.cluster.check_host", lambda: None)
    calls = []

    def run(self, cmd, node=None, timeout=None, **kw):
        ranks = range(self.nodes) if node is None else [node]
        calls.append(SimpleNamespace(cmds={r: cmd(r) if callable(cmd) else cmd for r in ranks}, timeout=timeout))
        return netns.RunResult(0, dict.fromkeys(ranks, 0))

    monkeypatch.setattr(Cluster, "run", run)
    return calls


def test_cli_run_passes_the_command(capsys, fake_cluster):
    assert cli(capsys, "run", "--node", "1", "--timeout", "5", "--", "python", "-c", "x", "--help")[0] == 0
    assert fake_cluster[0].cmds == {1: ["python", "-c", "x", "--help"]}
    assert fake_cluster[0].timeout == 5
    code, _, err = cli(capsys, "run", "--node", "4", "--", "true")
    assert code == 2 and "nodes are 0..1" in err
    code, _, err = cli(capsys, "run")
    assert code == 2 and "no command to run" in err


def test_cli_train_and_doctor_command_lines(capsys, fake_cluster):
    assert cli(capsys, "train", "--master-port", "29600", "gpt", "--train.max_steps=5", "--config", "a.toml")[0] == 0
    cmds = fake_cluster[-1].cmds
    # Without --nproc-per-node each emulated node gets its share of this machine's cores.
    share = f"--nproc-per-node={max(1, len(os.sched_getaffinity(0)) // 2)}"
    assert cmds[1] == node_command(
        "train", ["gpt", "--train.max_steps=5", "--config", "a.toml", share], 2, 1, "10.213.0.1", 29600
    )
    assert cmds[0][-6:] == ["--node-rank", "0", "--master-addr", "10.213.0.1", "--master-port", "29600"]
    assert cli(capsys, "doctor", "--", "--nproc-per-node=1", "--budget=1.0")[0] == 0
    cmds = fake_cluster[-1].cmds
    assert cmds[0] == node_command("doctor", ["--nproc-per-node=1", "--budget=1.0"], 2, 0, "10.213.0.1", 29500)
    assert cmds[0][0] == sys.executable


def test_cli_reports_a_failed_node(capsys, fake_cluster, monkeypatch):
    monkeypatch.setattr(Cluster, "run", lambda self, *a, **k: netns.RunResult(3, {0: -15, 1: 3}, failed_node=1))
    code, _, err = cli(capsys, "run", "--", "false")
    assert code == 3
    assert err == "linscale: node 1 failed with exit code 3; stopped the other nodes\n"


def test_state_file_is_json(tmp_path):
    save_state(State(name="ls", nodes=1, subnet="10.213.0.0/24", rate=10**9), tmp_path)
    data = json.loads((tmp_path / "ls.json").read_text())
    assert data["phase"] == "creating" and data["resources"] == []
