"""Model families with exact parameter and FLOP counts: gpt, vit, resnet."""

from __future__ import annotations

import dataclasses
from typing import Any


def named_config(cls: type, sizes: dict[str, dict[str, Any]], name: str, overrides: dict[str, Any]) -> Any:
    """`cls` built from the named shape `sizes[name]` with fields replaced by `overrides`."""
    if name not in sizes:
        raise ValueError(f"unknown model size {name!r}; known sizes: {', '.join(sizes)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {', '.join(unknown)}; fields: {', '.join(sorted(fields))}")
    return cls(**{**sizes[name], **overrides})
