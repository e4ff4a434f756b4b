"""Precision policy: how to autocast, whether to scale the loss, how to step.

Chosen once from `runtime.precision` and the device:

  fp32        everything in fp32
  bf16-mixed  fp32 parameters, gradients and optimizer states; autocast runs matrix products in bf16
  bf16-true   the sharded strategies gather parameters as bf16 and compute in bf16 throughout, then
              reduce the gradients in fp32 (FSDP2's MixedPrecisionPolicy, applied in
              runtime/parallel.py); the sharded parameters and the optimizer states stay fp32
  fp16-mixed  fp32 parameters, fp16 autocast and a gradient scaler: the loss is scaled up so small
              fp16 gradients do not underflow, gradients are unscaled before clipping, and a step
              whose gradients hold an inf or NaN is skipped (on every rank: the scaler's check of
              sharded DTensor gradients is all-reduced, and DDP's gradients are already equal)

bf16 has fp32's exponent range, so it needs no loss scaling; fp16 does.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable

import torch

from linscale.config import ConfigError, ParallelConfig
from linscale.runtime.device import Device
from linscale.runtime.parallel import SHARDED


class Precision:
    """The policy object the training step calls: `autocast()`, `backward(loss)`, `step(opt, clip)`."""

    def __init__(self, name: str, device_type: str) -> None:
        assert name in ("fp32", "bf16-mixed", "bf16-true", "fp16-mixed"), name
        self.name = name
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type) if name == "fp16-mixed" else None
        self._skips: torch.Tensor | None = None  # steps skipped for inf/NaN, counted on the device
        if self.scaler is not None:
            # A skipped step leaves the optimizer unstepped while the schedule follows the step
            # number, which torch would flag on the first step; that is intended here.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")

    def __repr__(self) -> str:
        return f"Precision({self.name!r}, {self.device_type!r})"

    @property
    def compute_dtype(self) -> str:
        """The dtype of the matrix products, for the peak FLOP/s: "fp32", "bf16" or "fp16"."""
        return {"bf16-mixed": "bf16", "bf16-true": "bf16", "fp16-mixed": "fp16"}.get(self.name, "fp32")

    @property
    def param_dtype(self) -> torch.dtype | None:
        """The dtype the sharded strategies gather parameters in for compute (None: as stored)."""
        return torch.bfloat16 if self.name == "bf16-true" else None

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for inf/NaN gradients (reads the device: call it at the end)."""
        return 0 if self._skips is None else int(self._skips.item())

    def autocast(self) -> contextlib.AbstractContextManager:
        # Master weights stay fp32; autocast runs matrix products in the low precision.
        # bf16-true needs none: FSDP2 hands the forward bf16 parameters.
        if self.name == "bf16-mixed":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        if self.name == "fp16-mixed":
            return torch.autocast(self.device_type, dtype=torch.float16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(
        self, optimizer: torch.optim.Optimizer, clip: Callable[[], torch.Tensor | None], check_finite: bool = False
    ) -> tuple[torch.Tensor | None, bool | torch.Tensor]:
        """Clip the true gradients with `clip()` (it returns the norm or None), then step the
        optimizer; returns the norm and whether the step was taken.

        With a scaler, a step whose gradients hold an inf or NaN is skipped on every rank and the
        scale is lowered. With `check_finite` (other precisions), a non-finite norm skips the step:
        that costs one host synchronisation, and the answer is a bool. Without it nothing waits
        for the device and the answer may be a device tensor (GradScaler reads its inf flag on
        the host itself, except with fused optimizers, which skip in their kernel)."""
        if self.scaler is None:
            norm = clip()
            if check_finite and norm is not None and not math.isfinite(host_float(norm)):
                return norm, False
            optimizer.step()
            return norm, True
        self.scaler.unscale_(optimizer)  # clip and log the true gradients, not the scaled ones
        norm = clip()
        # The flag unscale_ recorded (the contract GradScaler offers optimizers); DTensor
        # gradients have it all-reduced over the mesh, DDP's gradients are equal everywhere.
        found = sum(self.scaler._found_inf_per_device(optimizer).values())
        self.scaler.step(optimizer)  # skips the update when found > 0
        self.scaler.update()
        skipped = (found > 0).to(torch.int64)
        self._skips = skipped if self._skips is None else self._skips + skipped
        return norm, bool(skipped.item() == 0) if check_finite else skipped == 0

    def state_dict(self) -> dict:
        """JSON-able state for a checkpoint: the loss scale and the skip count."""
        if self.scaler is None:
            return {}
        return {"scaler": self.scaler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
            self._skips = torch.tensor(int(state.get("skipped_steps", 0)))


def host_float(t: torch.Tensor) -> float:
    """A scalar tensor (or a replicated DTensor) as a Python float: waits for the device."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def resolve_precision(setting: str, device: Device) -> Precision:
    if setting == "auto":
        setting = "bf16-mixed" if device.supports_fast_bf16() else "fp32"
    return Precision(setting, device.type)


def check_combination(
    precision: str, strategy: str, parallel: ParallelConfig, world_size: int, auto: bool = False
) -> None:
    """Reject settings of precision and communication that do not fit the strategy, naming the fix.

    Called by the launcher before spawning (`strategy` may still be "auto" then) and by every
    worker with the strategy in use (`auto`: chosen by parallel.strategy=auto)."""
    named = f"parallel.strategy=auto (which chose {strategy})" if auto else f"parallel.strategy={strategy}"
    if precision == "bf16-true":
        if strategy in ("ddp", "zero1"):
            raise ConfigError(
                f"runtime.precision=bf16-true needs a sharded strategy (zero2, zero3, fsdp or hsdp); "
                f"with {named} use --runtime.precision=bf16-mixed, or --parallel.strategy=zero3 to keep bf16-true"
            )
        if world_size == 1:
            raise ConfigError(
                "runtime.precision=bf16-true comes from the sharded strategies' mixed precision and needs "
                "2 or more processes; on one process use --runtime.precision=bf16-mixed"
            )
    if world_size == 1 or strategy == "auto":
        return  # nothing is communicated, or the strategy is not chosen yet
    if parallel.comm_hook != "none" and strategy in SHARDED:
        raise ConfigError(
            f"parallel.comm_hook={parallel.comm_hook} applies to ddp and zero1; with {named} "
            "use --parallel.reduce_dtype=bf16 to halve the gradient traffic, or --parallel.comm_hook=none"
        )
    if parallel.reduce_dtype != "fp32" and strategy not in SHARDED:
        raise ConfigError(
            f"parallel.reduce_dtype={parallel.reduce_dtype} applies to zero2, zero3, fsdp and hsdp; with "
            f"{named} use --parallel.comm_hook={parallel.reduce_dtype}"
        )
