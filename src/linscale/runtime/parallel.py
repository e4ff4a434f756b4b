"""Applying the data-parallel strategy to a model, and measuring its exposed communication."""

import contextlib
import time

import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from linscale.config import ParallelConfig
from linscale.runtime import dist as ldist
from linscale.runtime.device import Device


class CommClock:
    """When the last gradient bucket of a backward pass was handed to the network.

    DDP launches each bucket's all-reduce as soon as its gradients are ready, overlapping it
    with the rest of backward, and `backward()` returns only once every reduction has
    finished. The time from the last launch to the end of backward is therefore the
    communication that compute did not hide: the exposed communication.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        self.last_launch: float | None = None
        self.launches = 0  # bucket reductions started, for tests and diagnostics

    def take(self) -> float | None:
        t, self.last_launch = self.last_launch, None
        return t


def _timed_allreduce(clock: CommClock, bucket: dist.GradBucket):
    clock.last_launch = time.perf_counter()
    clock.launches += 1
    return default_hooks.allreduce_hook(clock.process_group, bucket)


def wrap(model: nn.Module, cfg: ParallelConfig, device: Device) -> tuple[nn.Module, CommClock]:
    """Replicate `model` with DDP (or return it as is for a single process)."""
    clock = CommClock()
    if not ldist.active() or dist.get_world_size() == 1:
        return model, clock
    ddp = DistributedDataParallel(
        model,
        device_ids=device.ddp_device_ids,
        bucket_cap_mb=cfg.bucket_mb,
        gradient_as_bucket_view=cfg.gradient_as_bucket_view,
    )
    ddp.register_comm_hook(clock, _timed_allreduce)
    return ddp, clock


def sync_gradients(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on non-final micro-steps of an accumulation."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model
