"""Precision policy: how to autocast the forward pass, chosen once from the setting and device."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from linscale.runtime.device import Device


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32" or "bf16-mixed"
    device_type: str

    @property
    def compute_dtype(self) -> str:
        return "bf16" if self.name == "bf16-mixed" else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        # fp32 master weights stay fp32; autocast runs matrix products in bf16. bf16 has
        # fp32's exponent range, so no loss scaling is needed.
        if self.name == "bf16-mixed":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve_precision(setting: str, device: Device) -> Precision:
    if setting == "auto":
        setting = "bf16-mixed" if device.supports_fast_bf16() else "fp32"
    return Precision(setting, device.type)
