"""The scaling sweep's pure parts: cluster specs, layouts, batches, the table and the charts."""

from __future__ import annotations

import json

import pytest

from linscale.perf import bench
from linscale.perf.bench import BenchError, ClusterSpec, Layout, Point


def test_cluster_specs_and_layouts():
    spec = bench.parse_cluster("emulated:4x2:10gbit:50us")
    assert spec == ClusterSpec("emulated", 4, 2, "10gbit", "50us")
    assert bench.parse_cluster("local").kind == "local"
    assert bench.parse_cluster("slurm:2x4") == ClusterSpec("slurm", 2, 4)
    assert bench.srun_command(Layout(8, 2, 4), ["gpt"])[:5] == [
        "srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--kill-on-bad-exit=1"]  # fmt: skip
    with pytest.raises(BenchError, match="emulated:NODESxPER_NODE:RATE"):
        bench.parse_cluster("emulated:4:10gbit")
    assert bench.layouts([1, 2, 8], spec) == [Layout(1, 1, 1), Layout(2, 1, 2), Layout(8, 4, 2)]
    assert bench.layouts([1, 4], ClusterSpec("local")) == [Layout(1, 1, 1), Layout(4, 1, 4)]
    with pytest.raises(BenchError, match="whole nodes"):
        bench.layouts([3], spec)
    with pytest.raises(BenchError, match="whole nodes"):
        bench.layouts([10], spec)  # more than 4 nodes x 2
    with pytest.raises(BenchError, match="increasing"):
        bench.layouts([2, 1], spec)


def test_batches_follow_the_mode():
    assert [bench.batch_for("weak", n, 2, 8) for n in (2, 4, 8)] == [8, 16, 32]
    assert [bench.batch_for("strong", n, 2, 8) for n in (2, 4, 8)] == [8, 8, 8]
    with pytest.raises(BenchError, match="multiple of 4"):
        bench.batch_for("weak", 8, 4, 10)


def test_sweep_arguments_leave_the_users_budget_alone(tmp_path):
    args = bench.train_args("gpt", ["--train.global_batch=4", "--log.dir=x", "--task.size", "tiny"], 16, 20, tmp_path)
    assert "--train.max_steps=20" in args and args.count("--train.global_batch=16") == 1
    assert "--log.dir=x" not in args and ["--task.size", "tiny"] == args[1:3]
    assert "--train.max_steps=20" not in bench.train_args("gpt", ["--train.max_time=60"], 16, 20, tmp_path)


def _point(devices: int, batch: int, step_ms: float, predicted_ms: float, tokens: int = 16) -> Point:
    samples_s = batch / (step_ms / 1e3)
    summary = {"steady_step_time_ms": step_ms, "predicted_step_time_ms": predicted_ms,
               "steady_samples_per_second": samples_s, "steady_tokens_per_second": samples_s * tokens,
               "time_data_ms": 1.0, "time_fwd_bwd_ms": step_ms - 11.0,
               "time_comm_ms": 5.0, "time_optim_ms": 5.0}  # fmt: skip
    return Point(Layout(devices, max(1, devices // 2), min(devices, 2)), batch, f"run{devices}", summary)


def test_table_efficiencies_and_charts(tmp_path):
    # Weak scaling: 4 samples per device; 8 devices take 25% longer per step than 1.
    points = [_point(1, 4, 100.0, 90.0), _point(8, 32, 125.0, 117.0)]
    rows = bench.rows(points)
    assert rows[0]["efficiency_pct"] == pytest.approx(100.0)
    assert rows[1]["efficiency_pct"] == pytest.approx(80.0)
    assert rows[1]["predicted_efficiency_pct"] == pytest.approx(100 * 90 / 117)
    assert rows[1]["step_error_pct"] == pytest.approx(-6.4)
    assert rows[1]["efficiency_error_pp"] == pytest.approx(100 * 90 / 117 - 80)
    assert rows[1]["tokens_per_second"] == pytest.approx(32 / 0.125 * 16)
    report = bench.write_report(points, "weak", ClusterSpec("emulated", 4, 2, "10gbit"), "gpt", tmp_path)
    md = (tmp_path / "scaling.md").read_text()
    assert "| 8 | 4 | 32 | 125.0 | 117.0 | -6.4% | 4,096 | 80.0% | 76.9% | 1.0 / 114.0 / 5.0 / 5.0 |" in md
    assert json.loads((tmp_path / "scaling.json").read_text()) == report
    for name in report["charts"]:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    # Without predictions (runtime.profile=off) the table says n/a.
    for p in points:
        del p.summary["predicted_step_time_ms"]
    assert "| n/a | n/a |" in bench.markdown(bench.rows(points), "weak", "t")


def test_bench_cli_names_bad_input(capsys):
    from linscale.cli import main

    assert main(["bench", "scaling", "gpt", "--devices", "1,x"]) == 2
    assert "--devices takes counts" in capsys.readouterr().err
    assert main(["bench", "scaling", "gpt", "--devices", "1,3", "--cluster", "emulated:2x2:1gbit"]) == 2
    assert "whole nodes" in capsys.readouterr().err
    assert main(["bench", "scaling", "gpt", "--steps", "3"]) == 2
    assert "no steady state" in capsys.readouterr().err


def test_slurm_sweep_outside_an_allocation_says_how_to_start_one(monkeypatch, tmp_path):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(BenchError, match="salloc"):
        bench.sweep("gpt", [], [1], "weak", ClusterSpec("slurm", 1, 1), 4, 10, tmp_path, 60, progress=False)
