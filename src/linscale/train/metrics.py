"""What a run reports: the progress bar, metrics.jsonl, TensorBoard and the summary block.

Only rank 0 writes; other ranks get a `Reporter` that does nothing.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PHASES = ("data", "fwd_bwd", "comm", "optim")
PHASE_NAMES = {
    "data": "waiting for data",
    "fwd_bwd": "forward+backward",
    "comm": "exposed communication",
    "optim": "optimizer",
}


def warmup_steps(total_steps: int | None) -> int:
    """Steps left out of steady-state figures: the first ones pay for allocation and caches."""
    return min(5, max(1, (total_steps or 50) // 10))


@dataclass
class StepTimes:
    """Seconds spent in each phase of the optimizer steps after warm-up."""

    warmup_steps: int
    per_phase: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    step_total: list[float] = field(default_factory=list)

    def add(self, step: int, phases: dict[str, float], total: float) -> None:
        if step < self.warmup_steps:
            return
        for p in PHASES:
            self.per_phase[p].append(phases.get(p, 0.0))
        self.step_total.append(total)

    @property
    def measured(self) -> int:
        return len(self.step_total)

    def mean(self, phase: str) -> float:
        v = self.per_phase[phase]
        return sum(v) / len(v) if v else 0.0


def perplexity(loss: float) -> float:
    """exp(loss): the perplexity of a mean cross-entropy in nats (inf when it overflows)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def format_duration(seconds: float) -> str:
    """`83.456` -> `0:01:23.46`"""
    hundredths = round(seconds * 100)
    return f"{datetime.timedelta(seconds=hundredths // 100)}.{hundredths % 100:02d}"


def format_summary(summary: dict[str, Any], title: str = "train metrics") -> str:
    """The end-of-run block, in the style of the Hugging Face Trainer."""
    width = max((len(k) for k in summary), default=0)
    lines = [f"***** {title} *****"]
    for key, value in summary.items():
        if value is None:
            text = "n/a"
        elif isinstance(value, float):
            if math.isnan(value):
                text = "n/a"
            elif key.endswith("runtime") or key.startswith("time_to_"):
                text = format_duration(value)
            elif abs(value) >= 1e5 or (0 < abs(value) < 1e-3):
                text = f"{value:.4g}"
            else:
                text = f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:.1f}"
        else:
            text = str(value)
        lines.append(f"  {key:<{width}} = {text}")
    return "\n".join(lines)


class Reporter:
    """Rank 0's sinks. Construct with `enabled=False` on other ranks."""

    def __init__(
        self, run_dir: Path, enabled: bool, progress: bool, tensorboard: bool, total_steps: int | None, unit: str
    ) -> None:
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.jsonl = None
        self.unit = unit
        if not enabled:
            return
        self.jsonl = (run_dir / "metrics.jsonl").open("a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, leave=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        assert self.jsonl is not None
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(k.replace("_", "/", 1) if k.startswith(("train_", "eval_")) else k, v, step)

    def progress(self, steps_done: int, loss: float | None, rate: float | None) -> None:
        if self.bar is None:
            return
        self.bar.update(steps_done - self.bar.n)
        post = {}
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        if rate is not None:
            post[f"{self.unit}/s"] = f"{rate:,.0f}"
        if post:
            self.bar.set_postfix(post, refresh=False)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
