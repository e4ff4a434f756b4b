"""The doctor's analysis: bus bandwidth and which device, node or link is an outlier."""

import pytest

from linscale.cluster.doctor import (
    DeviceResult,
    PairResult,
    Report,
    SweepPoint,
    bus_bandwidth,
    findings,
    format_report,
    machine_id,
    probe_turns,
    sizes_between,
    slow_devices,
    slow_nodes,
)


def test_bus_bandwidth_follows_nccl_tests():
    algbw, busbw = bus_bandwidth(8_000_000, 0.01, 4)
    assert algbw == pytest.approx(8e8)
    assert busbw == pytest.approx(8e8 * 2 * 3 / 4)
    assert bus_bandwidth(1000, 1.0, 2) == (1000.0, 1000.0)
    assert bus_bandwidth(1000, 1.0, 1) == (1000.0, 1000.0)


def test_sizes_are_powers_of_four():
    assert sizes_between(4096, 65536) == [4096, 16384, 65536]
    assert sizes_between(1024, 1000) == []


def dev(rank, node, flops):
    return DeviceResult(rank, node, f"host{node}", f"10.0.0.{node + 1}", "cpu", flops)


def pair(a, b, gbit):
    return PairResult((a, b), (a, b), 4 << 20, 0.1, gbit * 1e9 / 8)


def test_slow_device_is_named_and_normal_spread_is_not():
    devices = [dev(0, 0, 100e9), dev(1, 0, 95e9), dev(2, 1, 104e9), dev(3, 1, 40e9)]
    assert [d.rank for d in slow_devices(devices)] == [3]
    assert slow_devices(devices[:3]) == []
    assert slow_devices([dev(0, 0, 1.0)]) == []  # nothing to compare with


def test_a_node_whose_every_pair_is_slow_is_named():
    # Node 2's link runs at a tenth of the others.
    pairs = [pair(0, 1, 0.95), pair(0, 2, 0.095), pair(1, 2, 0.094)]
    assert list(slow_nodes(pairs, 3)) == [2]
    # One slow pair among healthy ones points at no single node.
    assert (
        slow_nodes(
            [pair(0, 1, 0.95), pair(0, 2, 0.9), pair(1, 2, 0.1), pair(0, 3, 0.9), pair(1, 3, 0.9), pair(2, 3, 0.9)], 4
        )
        == {}
    )
    assert slow_nodes([pair(0, 1, 0.01)], 2) == {}  # two nodes: nothing to compare with


def test_findings_and_report_name_the_node_and_the_fix():
    report = Report(
        world_size=3,
        num_nodes=3,
        backend="gloo",
        interface="eth0",
        rendezvous_s=1.0,
        devices=[dev(0, 0, 100e9), dev(1, 1, 100e9), dev(2, 2, 100e9)],
        sweep=[SweepPoint(4096, 1e-4, 4e7, 5e7)],
        pairs=[pair(0, 1, 0.95), pair(0, 2, 0.095), pair(1, 2, 0.094)],
    )
    found = findings(report)
    assert len(found) == 1 and "node 2" in found[0] and "GLOO_SOCKET_IFNAME" in found[0]
    report.findings = found
    text = format_report(report)
    assert "slow link: node 2" in text and "2-" not in text.split("node pairs")[0]
    lo = Report(2, 2, "gloo", "lo", 0.1, [dev(0, 0, 1e9), dev(1, 1, 1e9)], [SweepPoint(4096, 1e-4, 1, 1)])
    assert any("wrong interface" in f for f in findings(lo))


def test_a_gpu_far_below_its_data_sheet_is_named_even_alone():
    gpu = DeviceResult(0, 0, "g0", "10.0.0.1", "NVIDIA A100", 6e12, expected=19.5e12)
    healthy = DeviceResult(1, 0, "g0", "10.0.0.1", "NVIDIA A100", 18e12, expected=19.5e12)
    assert slow_devices([gpu]) == [gpu]
    assert slow_devices([healthy]) == []
    report = Report(1, 1, "nccl", "eth0", 0.1, [gpu], [SweepPoint(4096, 1e-4, 1, 1)])
    assert "31% of its data sheet" in findings(report)[0]


def test_ranks_of_one_machine_probe_in_turn_and_machines_probe_at_once():
    # Two machines with two ranks each, interleaved: each machine's ranks take turns 0 and 1.
    assert probe_turns(["a", "b", "a", "b"]) == [0, 0, 1, 1]
    # Three emulated nodes on one host share its kernel: three turns.
    assert probe_turns(["h", "h", "h"]) == [0, 1, 2]
    assert probe_turns(["x", "y", "z"]) == [0, 0, 0]


def test_machine_id_is_shared_by_processes_of_this_host():
    import subprocess
    import sys

    child = subprocess.run(
        [sys.executable, "-c", "from linscale.cluster.doctor import machine_id; print(machine_id())"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert child.stdout.strip() == machine_id() != ""
