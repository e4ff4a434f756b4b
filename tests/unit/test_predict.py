"""The step-time and scaling predictor, cluster profiles and `linscale plan`: no processes."""

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest

from linscale.perf import clusters as cl
from linscale.perf import predict as pr
from linscale.perf.clusters import PROFILES, ClusterProfile, load_cluster, profile_from_doctor

MiB = 2**20


def trace(blocks=4, block_shapes=None, other=((256, 64),), fwd_flops=1e9, rest_flops=0.0, tokens=None, order=None):
    """A ModelTrace-like object: `blocks` equal blocks, each forward `fwd_flops` per sample."""
    shapes = [list(block_shapes or [(64, 64), (64,)]) for _ in range(blocks)]
    n = sum(math.prod(s) for b in shapes for s in b) + sum(math.prod(s) for s in other)
    return SimpleNamespace(
        num_params=n,
        param_tensors=sum(len(b) for b in shapes) + len(other),
        block_params=[sum(math.prod(s) for s in b) for b in shapes],
        block_param_shapes=shapes,
        other_param_shapes=list(other),
        flops_per_sample=3 * (blocks * fwd_flops + rest_flops),
        block_fwd_flops_per_sample=[fwd_flops] * blocks,
        tokens_per_sample=tokens,
        **(order or {}),
    )


def cluster(**kw) -> ClusterProfile:
    base = dict(
        name="test",
        nodes=1,
        devices_per_node=4,
        device="dev",
        peak_flops={"fp32": 1e12, "bf16": 1e12},
        device_memory=16e9,
        mem_bandwidth=1e15,  # copies and hooks cost nothing unless a test says so
        intra_bw=1e9,
        intra_latency=0.0,
        inter_bw=1e9,
        inter_latency=0.0,
        efficiency=1.0,
        overlap_sharded=True,
        backend="nccl",
        optimizer_efficiency=1.0,
    )
    return ClusterProfile(**{**base, **kw})


# --- collective costs ---


def test_ring_and_tree_costs_match_hand_computed_values():
    assert pr.ring_allreduce(100e6, 4, 1e-5, 10e9) == pytest.approx(6e-5 + 1.5 * 100e6 / 10e9)
    assert pr.ring_allgather(100e6, 4, 1e-5, 10e9) == pytest.approx(3e-5 + 0.75 * 100e6 / 10e9)
    assert pr.ring_reduce_scatter(100e6, 4, 1e-5, 10e9) == pr.ring_allgather(100e6, 4, 1e-5, 10e9)
    assert pr.tree_allreduce(1e3, 64, 1e-5, 10e9) == pytest.approx(2 * 6 * 1e-5 + 2 * 1e3 / 10e9)
    assert pr.ring_allreduce(1e9, 1, 1.0, 1.0) == 0.0
    assert pr.broadcast(1e6, 8, 1e-5, 1e9, pipelined=True) == pytest.approx(3e-5 + 1e-3)
    assert pr.broadcast(1e6, 8, 1e-5, 1e9, pipelined=False) == pytest.approx(3 * (1e-5 + 1e-3))


def test_nccl_takes_the_tree_for_small_messages_gloo_only_rings():
    nccl = pr.Network(cluster(intra_latency=1e-5, devices_per_node=64))
    gloo = pr.Network(cluster(intra_latency=1e-5, devices_per_node=64, backend="gloo", overlap_sharded=False))
    g = pr.Group(64, 1)
    small = 4096
    assert nccl.allreduce(small, g) == pytest.approx(pr.tree_allreduce(small, 64, 1e-5, 1e9))
    assert gloo.allreduce(small, g) == pytest.approx(pr.ring_allreduce(small, 64, 1e-5, 1e9))
    big = 1e9  # bandwidth-bound: the ring's 2(n-1)/n beats the tree's 2
    assert nccl.allreduce(big, g) == pytest.approx(pr.ring_allreduce(big, 64, 1e-5, 1e9))
    # gloo's reduce-scatter all-reduces the whole input (then copies this rank's part out).
    assert gloo.reduce_scatter(big, g) == pytest.approx(gloo.allreduce(big, g))
    assert nccl.reduce_scatter(big, g) == pytest.approx(pr.ring_reduce_scatter(big, 64, 1e-5, 1e9))


def test_across_nodes_the_slower_link_and_its_latency_count():
    c = cluster(intra_bw=100e9, intra_latency=1e-6, inter_bw=10e9, inter_latency=1e-5, devices_per_node=8, nodes=2)
    assert c.link(8, 1) == (1e-6, 100e9)
    assert c.link(16, 2) == (1e-5, 10e9)
    # hsdp: the 8 replicate groups of a node share its NICs.
    assert c.link(2, 2, concurrent=8) == (1e-5, 10e9 / 8)
    assert cluster(intra_bw=5e9, inter_bw=50e9, nodes=2).link(8, 2) == (0.0, 5e9)


# --- DDP buckets and overlap ---


def test_ddp_buckets_close_at_the_cap_and_fill_in_gradient_ready_order():
    # Four blocks of 1 MiB of fp32 gradients (one 512x512 matrix each) and a 0.5 MiB embedding.
    tr = trace(blocks=4, block_shapes=[(512, 512)], other=((256, 512),))
    buckets = pr.ddp_buckets(tr, bucket_mb=2)
    # Closed once they hold at least 2 MiB: blocks 3+2, blocks 1+0, then the embedding at the end.
    assert [(owner, size / MiB) for owner, size, _ in buckets] == [(2, 2.0), (0, 2.0), (pr.END, 0.5)]
    assert [owner for owner, _, _ in pr.ddp_buckets(tr, bucket_mb=1.5)] == [2, 0, pr.END]
    # linscale passes bucket_cap_mb, so the first bucket has the same cap (no 1 MiB first bucket).
    assert pr.ddp_buckets(tr, bucket_mb=25)[0][1] == 4.5 * MiB


def test_parameters_after_the_blocks_are_ready_first():
    order = {
        "param_shapes": [(256, 64), (64, 64), (64,), (64, 64), (64,), (64,), (10, 64)],
        "param_blocks": [-1, 0, 0, 1, 1, -1, -1],
    }
    tr = trace(blocks=2, other=((256, 64), (64,), (10, 64)), order=order)
    ready = pr.grad_ready_order(tr)
    assert ready[:2] == [(pr.HEAD, (10, 64)), (pr.HEAD, (64,))]
    assert ready[-1] == (pr.END, (256, 64))


def test_ddp_backward_hides_all_but_the_last_bucket_when_the_network_keeps_up():
    c = pr._Compute(rest_fwd=0.0, rest_bwd=0.0, fwd=[0.5] * 4, bwd=[1.0] * 4)
    buckets = [(3, 1, []), (2, 1, []), (1, 1, []), (0, 1, [])]
    # All-reduces of 0.5 s, launched at 1, 2, 3, 4 s into backward: only the last one runs past it.
    total, exposed = pr._ddp_microstep(c, buckets, [0.5] * 4, [0.0] * 4)
    assert exposed == pytest.approx(0.5)
    assert total == pytest.approx(2.0 + 4.0 + 0.5)
    # 2 s each: they queue (1-3, 3-5, 5-7, 7-9), backward ends at 4 s: 5 s exposed.
    total, exposed = pr._ddp_microstep(c, buckets, [2.0] * 4, [0.0] * 4)
    assert exposed == pytest.approx(5.0)
    # A hook of 0.1 s per bucket runs on the training thread and delays backward itself.
    total, exposed = pr._ddp_microstep(c, buckets, [0.5] * 4, [0.1] * 4)
    assert total == pytest.approx(2.0 + 4.0 + 0.4 + 0.5)


def test_predicted_ddp_step_adds_only_what_backward_did_not_hide():
    # 2 ranks, one bucket per block (1 MiB each, cap 1 MiB), 1 s of backward per block.
    tr = trace(blocks=4, block_shapes=[(512, 512)], other=(), fwd_flops=0.5e12)
    fast = cluster(devices_per_node=2, intra_bw=MiB / 0.5)  # 0.5 s per bucket all-reduce on 2 ranks
    p = pr.predict_step(tr, fast, "ddp", 2, 2, 1, precision="fp32", bucket_mb=1, memory=False)
    assert p.compute == pytest.approx(6.0)
    assert p.comm == pytest.approx(2.0)
    assert p.comm_exposed == pytest.approx(0.5)
    slow = dataclasses.replace(fast, intra_bw=MiB / 2.0)
    q = pr.predict_step(tr, slow, "ddp", 2, 2, 1, precision="fp32", bucket_mb=1, memory=False)
    assert q.comm_exposed == pytest.approx(5.0)
    assert q.step_time == pytest.approx(q.compute + q.comm_exposed + q.optimizer)
    # With accumulation only the last micro-step communicates.
    r = pr.predict_step(tr, fast, "ddp", 2, 8, 1, precision="fp32", bucket_mb=1, memory=False)
    assert r.accum == 4 and r.compute == pytest.approx(24.0) and r.comm_exposed == pytest.approx(0.5)


def test_one_device_communicates_nothing():
    tr = trace()
    for strategy in ("ddp", "zero3"):
        p = pr.predict_step(tr, cluster(), strategy, 1, 8, 2, memory=False)
        assert p.comm == 0 and p.comm_exposed == 0 and p.accum == 4


def test_optimizer_is_memory_bound_on_what_the_rank_holds():
    tr = trace(blocks=4, block_shapes=[(1000, 1000)], other=())
    c = cluster(mem_bandwidth=40e9, optimizer_efficiency=1.0, foreach_slowdown=2.0)
    ddp = pr.predict_step(tr, c, "ddp", 4, 4, 1, memory=False)
    assert ddp.optimizer == pytest.approx(4e6 * (28 + 12) / 40e9)
    zero1 = pr.predict_step(tr, c, "zero1", 4, 4, 1, memory=False)
    assert zero1.optimizer == pytest.approx((1e6 * 28 + 4e6 * 12) / 40e9)
    zero3 = pr.predict_step(tr, c, "zero3", 4, 4, 1, memory=False)
    assert zero3.optimizer == pytest.approx(1e6 * 40 / 40e9)  # fused AdamW on the DTensors' shards
    foreach = pr.predict_step(tr, c, "zero3", 4, 4, 1, memory=False, optimizer_impl="foreach")
    assert foreach.optimizer == pytest.approx(2.0 * zero3.optimizer)
    shared = dataclasses.replace(c, host_devices=4)  # four CPU ranks share one host's memory
    assert pr.predict_step(tr, shared, "ddp", 4, 4, 1, memory=False).optimizer == pytest.approx(4 * ddp.optimizer)


def test_cpu_ranks_host_work_grows_with_the_ranks_sharing_a_core():
    tr = trace(blocks=4, block_shapes=[(1000, 1000), (1000,)], other=[(10, 1000)], fwd_flops=1e9)
    base = cluster(backend="gloo", overlap_sharded=False, host_devices=4)
    own = dataclasses.replace(base, host_cores=4, host_call_overhead=1e-3, host_tensor_overhead=1e-4)
    shared = dataclasses.replace(own, host_cores=2)  # two ranks per core: host work takes twice as long
    for strategy in ("zero2", "zero3"):
        p0, p1, p2 = (pr.predict_step(tr, c, strategy, 4, 4, 1, memory=False) for c in (base, own, shared))
        # every FSDP2 collective call (a gather per unit and pass, a reduce-scatter per unit) adds its host work
        calls = 5 * (3 if strategy == "zero3" else 2)
        assert p1.compute - p0.compute == pytest.approx(calls * 1e-3)
        assert p2.compute - p0.compute == pytest.approx(2 * calls * 1e-3)
        assert p1.comm_exposed == pytest.approx(p0.comm_exposed, rel=1e-3)
        # the optimizer step's per-tensor work on the 9 DTensor parameters
        assert p1.optimizer - p0.optimizer == pytest.approx(9 * 1e-4)
        assert p2.optimizer - p0.optimizer == pytest.approx(2 * 9 * 1e-4)
    # DDP's plain parameters take one fused kernel: no per-tensor work
    ddp = [pr.predict_step(tr, c, "ddp", 4, 4, 1, memory=False) for c in (base, shared)]
    assert ddp[1].optimizer == pytest.approx(ddp[0].optimizer) and ddp[1].compute == pytest.approx(ddp[0].compute)


def test_zero1_broadcasts_one_bucket_per_rank_after_the_step():
    tr = trace(blocks=4, block_shapes=[(1000, 1000)], other=())
    nbytes, alpha, bw = 4 * tr.num_params, 1e-4, 1e9
    for backend, waves, pipelined in (("gloo", 4, False), ("nccl", 8, True)):
        c = cluster(nodes=2, devices_per_node=4, backend=backend, intra_latency=alpha, inter_latency=alpha,
                    intra_bw=bw, inter_bw=bw)  # fmt: skip
        ddp, zero1 = (pr.predict_step(tr, c, s, 8, 8, 1, memory=False) for s in ("ddp", "zero1"))
        # 8 buckets of 1/8 of the parameters, each a broadcast to the 8 ranks (3 rounds of a tree);
        # gloo's two worker threads take them two at a time, NCCL's stream one at a time, pipelined.
        one = pr.broadcast(nbytes / 8, 8, alpha, bw, pipelined)
        assert zero1.breakdown["broadcast"] == pytest.approx(waves * one)
        assert zero1.comm_exposed - ddp.comm_exposed == pytest.approx(waves * one)


# --- sharded strategies: gloo blocks, NCCL overlaps ---


def test_gloo_sharded_collectives_are_all_exposed_nccl_ones_overlap():
    tr = trace(blocks=8, block_shapes=[(512, 512)], fwd_flops=0.05e12)
    nccl = cluster(nodes=2, devices_per_node=2, inter_bw=0.5e9)
    gloo = dataclasses.replace(nccl, backend="gloo", overlap_sharded=False)
    for strategy in ("zero2", "zero3", "hsdp"):
        n = pr.predict_step(tr, nccl, strategy, 4, 8, 2, memory=False)
        g = pr.predict_step(tr, gloo, strategy, 4, 8, 2, memory=False)
        assert g.comm_exposed == pytest.approx(g.comm)
        assert n.comm_exposed < 0.5 * n.comm
        assert g.step_time > n.step_time
    # gloo's reduce-scatter is an all-reduce: twice the bytes of NCCL's on the wire.
    g3 = pr.predict_step(tr, gloo, "zero3", 4, 4, 1, memory=False)
    n3 = pr.predict_step(tr, nccl, "zero3", 4, 4, 1, memory=False)
    assert g3.breakdown["reduce-scatter"] == pytest.approx(2 * n3.breakdown["reduce-scatter"], rel=0.01)
    # zero3 gathers again in backward, zero2 does not.
    g2 = pr.predict_step(tr, gloo, "zero2", 4, 4, 1, memory=False)
    assert g3.breakdown["all-gather"] == pytest.approx(2 * g2.breakdown["all-gather"])


def test_blocking_fsdp_step_is_the_sum_of_its_parts():
    tr = trace(blocks=2, block_shapes=[(400, 100)], other=((100, 100),), fwd_flops=1e9)
    c = cluster(backend="gloo", overlap_sharded=False, devices_per_node=4, intra_latency=1e-3)
    p = pr.predict_step(tr, c, "zero3", 4, 4, 1, precision="fp32", memory=False)
    net, g = pr.Network(c), pr.Group(4, 1)
    ag = [net.allgather(400 * 100 * 4, g)] * 2 + [net.allgather(100 * 100 * 4, g)]
    rs = [net.allreduce(400 * 100 * 4, g)] * 2 + [net.allreduce(100 * 100 * 4, g)]
    norm = net.allreduce(8, pr.Group(4, 1))
    assert p.comm_exposed == pytest.approx(2 * sum(ag) + sum(rs) + norm, rel=1e-6)


# --- scaling ---


def test_scaling_efficiency_starts_at_one_and_falls_with_devices():
    tr = trace(blocks=8, block_shapes=[(1024, 1024)], fwd_flops=2e9, tokens=128)
    c = cluster(nodes=4, devices_per_node=2, intra_bw=10e9, inter_bw=1e9, inter_latency=5e-5)
    devices = [1, 2, 4, 8]
    for strategy in ("ddp", "zero3"):
        strong = pr.scaling(tr, c, strategy, devices, "strong", 64, 8)
        weak = pr.scaling(tr, c, strategy, devices, "weak", 8, 8)
        for rows in (strong, weak):
            assert rows[0]["efficiency"] == pytest.approx(1.0)
            eff = [r["efficiency"] for r in rows]
            assert all(a >= b - 1e-9 for a, b in zip(eff, eff[1:], strict=False)), eff
            assert all(r["tokens_per_second"] == pytest.approx(128 * r["throughput"]) for r in rows)
        thr = [r["throughput"] for r in strong]
        assert all(a < b for a, b in zip(thr, thr[1:], strict=False)), thr
        assert [r["global_batch"] for r in weak] == [8, 16, 32, 64]
        assert [r["nodes"] for r in weak] == [1, 1, 2, 4]


def test_scaling_rows_that_cannot_be_planned_say_why():
    rows = pr.scaling(trace(), cluster(), "ddp", [1, 3], "strong", 8, 8)
    assert rows[1]["efficiency"] is None and "does not divide" in rows[1]["error"]


def test_device_counts_cover_powers_of_two_and_whole_nodes():
    assert pr.device_counts(16, 8) == [1, 2, 4, 8, 16]
    assert pr.device_counts(12, 6) == [1, 2, 4, 6, 8, 12]
    assert pr.device_counts(1, 1) == [1]


# --- recommendation ---


def memory_fn(peaks):
    """A memory estimate whose peak depends on the strategy, falling with checkpointing and micro-batch."""

    def fn(tr, strategy, world, nodes, micro_batch, activation_checkpointing, **kw):
        peak = peaks[strategy] + micro_batch * (1e9 if activation_checkpointing == "none" else 0.25e9)
        return SimpleNamespace(peak=peak, to_dict=lambda: {"peak": peak})

    return fn


def test_recommend_rejects_what_does_not_fit_and_picks_the_fastest():
    tr = trace(blocks=8, block_shapes=[(1024, 1024)], fwd_flops=2e9)
    c = cluster(nodes=2, devices_per_node=2, device_memory=10e9, inter_bw=0.2e9)
    peaks = {"ddp": 20e9, "zero1": 12e9, "zero2": 5e9, "zero3": 3e9, "hsdp": 4e9}
    rec = pr.recommend(tr, c, 16, precision="fp32", memory_fn=memory_fn(peaks))
    assert rec.strategy not in ("ddp", "zero1")
    assert all(p.fits for p in rec.candidates)
    assert rec.prediction.step_time <= min(p.step_time for p in rec.candidates) * (1 + pr.TIE)
    assert rec.prediction.memory.peak <= 0.9 * 10e9
    assert "ddp does not fit" in rec.why and "zero1 does not fit" in rec.why
    assert {r["strategy"] for r in rec.rejected} >= {"ddp", "zero1"}
    assert rec.micro_batch * rec.accum * 4 == 16
    # The largest micro-batch that fits without checkpointing is 4 for zero2 (5 + 4 = 9 GB <= 9 GB).
    z2 = [p for p in rec.candidates if p.strategy == "zero2" and p.activation_checkpointing == "none"]
    assert max(p.micro_batch for p in z2) == 4


def test_recommend_prefers_the_simpler_configuration_on_a_tie_and_explains_failure():
    tr = trace()
    c = cluster(intra_bw=1e15, device_memory=100e9)
    rec = pr.recommend(tr, c, 8, precision="fp32", memory_fn=memory_fn(dict.fromkeys(pr.STRATEGIES, 1e9)))
    assert (rec.strategy, rec.activation_checkpointing) == ("ddp", "none")
    with pytest.raises(
        ValueError, match="no configuration fits.*the least memory needs ddp micro-batch 1 checkpointing full"
    ):
        pr.recommend(tr, c, 8, precision="fp32", memory_fn=memory_fn(dict.fromkeys(pr.STRATEGIES, 200e9)))
    with pytest.raises(ValueError, match="does not divide over 4"):
        pr.recommend(tr, c, 6, precision="fp32", memory_fn=memory_fn(dict.fromkeys(pr.STRATEGIES, 1e9)))


def test_budget_in_tokens_and_epochs():
    p = pr.predict_step(trace(tokens=128), cluster(), "ddp", 4, 32, 8, memory=False)
    b = pr.budget(p, tokens=1e6, tokens_per_sample=128)
    assert b["steps"] == math.ceil(1e6 / (32 * 128))
    assert b["device_hours"] == pytest.approx(b["steps"] * p.step_time * 4 / 3600)
    assert pr.budget(p, epochs=2, dataset_samples=100)["steps"] == 2 * 3  # the tail of an epoch is skipped
    with pytest.raises(ValueError, match="tokens_per_sample"):
        pr.budget(p, tokens=1e6)


# --- profiles ---


def doctor_report(world=8, nodes=4, small_s=2e-3, large_s=0.05, flops=50e9):
    """What `linscale doctor --output` writes (Report.to_json), for CPU ranks on one host."""
    n = world
    sweep = []
    for nbytes, t in ((4096, small_s), (16 * MiB, large_s)):
        algbw = nbytes / t
        sweep.append({"bytes": nbytes, "time_s": t, "algbw": algbw, "busbw": algbw * 2 * (n - 1) / n})
    devices = [
        {"rank": r, "node": r // (world // nodes), "host": "box", "ip": f"10.213.0.{r // 2 + 1}", "device": "cpu",
         "flops": flops, "expected": None}
        for r in range(world)
    ]  # fmt: skip
    return {
        "world_size": world,
        "num_nodes": nodes,
        "backend": "gloo",
        "interface": "eth0",
        "rendezvous_s": 1.0,
        "devices": devices,
        "sweep": sweep,
        "pairs": [],
        "findings": [],
        "latency_s": small_s,
        "peak_busbw_bytes_per_s": max(p["busbw"] for p in sweep),
    }


def test_doctor_report_becomes_a_profile():
    p = profile_from_doctor(doctor_report(), host_rates=(20e9, 0.9, 4.0))
    assert (p.nodes, p.devices_per_node, p.backend, p.overlap_sharded) == (4, 2, "gloo", False)
    assert p.host_devices == 8  # every rank on one machine: they share its memory bandwidth
    # Two sizes: the ring's line through both (14 steps; each rank sends 14/8 of the bytes).
    x1, x2 = 14 / 8 * 4096, 14 / 8 * 16 * MiB
    per_byte = (0.05 - 2e-3) / (x2 - x1)
    alpha = (2e-3 - per_byte * x1) / 14
    assert p.inter_latency == pytest.approx(alpha) and p.intra_latency == pytest.approx(alpha)
    assert p.inter_bw == pytest.approx(1 / per_byte)
    assert p.straggler == (0.05 if 8 > cl._cores() else 0.0)
    assert p.peak_flops["fp32"] == 50e9 and p.mem_bandwidth == 20e9 and p.foreach_slowdown == 4.0
    assert p.mem_rate(8) == pytest.approx(20e9 / 8) and p.mem_rate(1) == 20e9


def test_ring_fit_recovers_latency_and_bandwidth_from_a_sweep():
    alpha, bw, n = 50e-6, 2e9, 8
    sweep = [
        {"bytes": b, "time_s": pr.ring_allreduce(b, n, alpha, bw), "busbw": 0.0} for b in (4096, 2**16, 2**20, 2**24)
    ]
    for p in sweep:
        p["busbw"] = p["bytes"] / p["time_s"] * 2 * (n - 1) / n
    assert cl.ring_fit(sweep, n) == pytest.approx((alpha, bw))


def test_load_cluster_reads_doctor_reports_profiles_and_names(tmp_path, monkeypatch):
    monkeypatch.setattr(cl, "cpu_host_rates", lambda: (10e9, 1.0, 3.0))
    monkeypatch.setattr(cl, "cpu_thread_copy_rate", lambda: 4e9)
    report = tmp_path / "doctor.json"
    report.write_text(json.dumps(doctor_report()))
    p = load_cluster(str(report), emulate_tflops=0.5)
    assert p.peak_flops == {"fp32": 0.5e12, "bf16": 0.5e12, "fp16": 0.5e12} and p.efficiency == 1.0
    assert p.mem_bandwidth == 10e9
    # a rank's copies run on its own threads: at most their rate, however few ranks share the host
    assert p.rank_bandwidth == 4e9 * max(1, cl._cores() // p.host_devices)
    assert p.mem_rate(1) == min(10e9, p.rank_bandwidth)
    assert load_cluster("8xh100-ib", nodes=4).world == 32
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"base": "dgx-v100", "nodes": 3, "inter_bw": 12.5e9}))
    q = load_cluster(str(custom))
    assert (q.nodes, q.inter_bw, q.device) == (3, 12.5e9, PROFILES["dgx-v100"].device)
    full = tmp_path / "full.json"
    full.write_text(json.dumps(PROFILES["8xa100"].to_dict()))
    assert load_cluster(str(full)) == PROFILES["8xa100"]
    with pytest.raises(ValueError, match="unknown cluster 'nope'.*8xh100-ib"):
        load_cluster("nope")
    custom.write_text(json.dumps({"base": "dgx-v100", "nics": 4}))
    with pytest.raises(ValueError, match="unknown profile field"):
        load_cluster(str(custom))


def test_built_in_profiles_are_complete():
    assert {"8xh100-ib", "dgx-v100", "2x2-v100-25gbe", "8xa100"} <= set(PROFILES)
    for p in PROFILES.values():
        assert p.backend == "nccl" and p.overlap_sharded and p.source
    with pytest.raises(ValueError, match="no bf16 peak.*fp16-mixed"):
        PROFILES["dgx-v100"].peak("bf16")


# --- the command ---


def run_plan(capsys, *argv):
    from linscale.cli import main

    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_lists_clusters(capsys):
    rc, out, _ = run_plan(capsys, "--list-clusters")
    assert rc == 0 and "8xh100-ib" in out and "2x2-v100-25gbe" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["gpt"], "which cluster"),
        (["gpt", "--cluster", "nope"], "unknown cluster 'nope'"),
        (["gpt", "--cluster", "dgx-v100", "--epochs", "1"], "--epochs needs --dataset-samples"),
        (["gpt", "--cluster", "dgx-v100", "--global-batch", "12"], "does not divide over 8"),
        (["gpt", "--cluster", "dgx-v100", "--precision", "bf16-mixed"], "no bf16 peak"),
        (["gpt", "--cluster", "dgx-v100", "--strategy", "zero9"], "--strategy must be one of"),
        (["nosuchtask", "--cluster", "dgx-v100"], "unknown task"),
    ],
)
def test_plan_errors_name_the_fix(capsys, argv, message):
    rc, _, err = run_plan(capsys, *argv)
    assert rc == 2 and message in err


def test_plan_prints_recommendation_scaling_and_budget(capsys):
    pytest.importorskip("linscale.perf.memory")
    tiny = ["--task.d_model=32", "--task.n_layer=2", "--task.n_head=2", "--task.block_size=32"]
    rc, out, err = run_plan(capsys, "gpt", "--cluster", "2x2-v100-25gbe", "--tokens", "1e6", *tiny)
    assert rc == 0, err
    for text in ("recommendation:", "exposed comm", "MFU", "memory per device", "scaling", "budget: 1,000,000 tokens"):
        assert text in out
    assert "--precision fp16-mixed would be faster" in out  # a V100 planned in fp32
    rc, out, err = run_plan(capsys, "gpt", "--cluster", "8xh100-ib", "--nodes", "2", "--strategy", "zero3", "--json",
                            "--global-batch", "64", *tiny)  # fmt: skip
    assert rc == 0, err
    data = json.loads(out)
    assert data["recommendation"]["strategy"] == "zero3" and data["world"] == 16
    assert [r["devices"] for r in data["scaling"]["strong"]] == [1, 2, 4, 8, 16]
    assert data["scaling"]["weak"][0]["efficiency"] == pytest.approx(1.0)


def test_efficiency_calibration_is_remembered_per_configuration(tmp_path, monkeypatch):
    from linscale.perf import check

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert check.calibrated_efficiency("a|b") is None
    check.remember_efficiency("a|b", 0.31)
    check.remember_efficiency("a|c", 0.42)
    assert check.calibrated_efficiency("a|b") == 0.31 and check.calibrated_efficiency("a|c") == 0.42
    assert check.calibrated_efficiency(None) is None  # a profile that is not this machine's
    path = tmp_path / "linscale" / "efficiency.json"
    path.write_text("[1, 2]")  # damaged: read as nothing, replaced on the next write
    assert check.calibrated_efficiency("a|b") is None
    check.remember_efficiency("a|b", 0.2)
    assert check.calibrated_efficiency("a|b") == 0.2
