"""Emulated device speed under DDP and FSDP2 (zero3) with activation checkpointing, on 2 gloo processes:
installed first, wrapped by `parallel.wrap` as the training loop does; only time changes."""

import pytest
import torch

from .conftest import spawn_ranks

pytestmark = pytest.mark.dist


def _emulated_steps(rank: int, world: int) -> None:
    import copy
    import time
    import warnings

    from linscale.config import ParallelConfig
    from linscale.perf.virtual import EmulatedSpeed
    from linscale.runtime import parallel
    from linscale.runtime.device import Device
    from linscale.runtime.topology import Topology
    from linscale.tasks.gpt import GPTTask, GPTTaskConfig

    torch.set_num_threads(1)
    task = GPTTask(GPTTaskConfig(n_layer=2, d_model=64, n_head=4, block_size=32, corpus_mb=0.1))
    topo = Topology(rank=rank, local_rank=rank, world_size=world, local_world_size=world, node_rank=0,
                    num_nodes=1, master_addr="127.0.0.1", master_port=0, launcher="torchrun")  # fmt: skip
    device = Device("cpu", 0, "gloo", "cpu", 1)
    batch = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(rank))
    for strategy in ("ddp", "zero3"):
        cfg = ParallelConfig(strategy=strategy, activation_checkpointing="full")
        torch.manual_seed(0)
        model = task.build_model()
        reference = copy.deepcopy(model)
        speed = EmulatedSpeed(1.0)
        speed.install(model, task.blocks(model), lambda m=model: task.loss(m, batch).backward())
        speed.tflops = speed.wait_times()["flops"] / 0.15 / 1e12  # 0.15 s per micro-batch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, _ = parallel.wrap(model, cfg, device, topo, task.blocks(model), strategy)
            reference, _ = parallel.wrap(reference, cfg, device, topo, task.blocks(reference), strategy)
            for _ in range(2):
                t0 = time.perf_counter()
                loss = task.loss(model, batch)
                loss.backward()
                took = time.perf_counter() - t0
                assert took >= 0.9 * 0.15, (strategy, took)
                expected = task.loss(reference, batch)
                expected.backward()
                assert torch.equal(loss, expected), strategy
        assert not [w for w in caught if "view" in str(w.message)], [str(w.message) for w in caught]
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            g, h = p.grad, q.grad
            if hasattr(g, "to_local"):
                g, h = g.to_local(), h.to_local()
            assert torch.equal(g, h), (strategy, name)
        s = speed.stats()
        assert s["forwards"] == 2 * 2 and s["backwards"] == 2 * 2 and s["recomputes"] == 2 * 2, (strategy, s)


def test_emulated_speed_under_ddp_and_fsdp2(tmp_path):
    spawn_ranks(_emulated_steps, 2, tmp_path, timeout=60)
