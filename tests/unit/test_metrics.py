"""linscale.train.metrics: durations, the summary block and step timing."""

from __future__ import annotations

import re

import pytest

from linscale.train.metrics import PHASES, StepTimes, format_duration, format_summary

DURATION = re.compile(r"^(\d+):(\d{2}):(\d{2})\.(\d{2})$")


@pytest.mark.parametrize(
    ("h", "m", "s", "cs"),
    [(0, 0, 0, 0), (0, 0, 5, 50), (0, 1, 23, 46), (1, 0, 0, 1), (12, 34, 56, 78), (0, 59, 59, 99)],
)
def test_format_duration(h, m, s, cs):
    seconds = h * 3600 + m * 60 + s + cs / 100 + 0.001
    assert format_duration(seconds) == f"{h}:{m:02d}:{s:02d}.{cs:02d}"


def test_format_duration_shape():
    for seconds in (0.0, 0.004, 1.5, 86.25, 3601.0, 7322.75):
        match = DURATION.match(format_duration(seconds))
        assert match, seconds
        h, m, s, cs = map(int, match.groups())
        assert h * 3600 + m * 60 + s + cs / 100 == pytest.approx(seconds, abs=0.005 + 1e-9)


@pytest.mark.parametrize(("seconds", "expected"), [(59.996, "0:01:00.00"), (0.999, "0:00:01.00")])
def test_format_duration_carries_rounding(seconds, expected):
    assert format_duration(seconds) == expected


def parse_summary(text: str) -> tuple[str, dict[str, str], list[int]]:
    lines = text.splitlines()
    values, columns = {}, []
    for line in lines[1:]:
        key, sep, value = line.partition(" = ")
        assert sep, line
        assert line.startswith("  ")
        values[key.strip()] = value
        columns.append(line.index(" = "))
    return lines[0], values, columns


def test_format_summary_every_key_present():
    summary = {
        "train_runtime": 3723.5,
        "train_samples": 1024,
        "train_loss": 2.5,
        "eval_runtime": 12.25,
        "eval_loss": float("nan"),
        "train_tokens_per_second": 123456.7,
        "mfu": 0.0001234,
        "batch": "32 = 4 x 4 x 2",
        "device": "cpu (Some CPU)",
        "world_size": 2,
    }
    title, values, columns = parse_summary(format_summary(summary, title="my run"))
    assert title == "***** my run *****"
    assert list(values) == list(summary)  # every key, once, in order
    assert len(set(columns)) == 1  # aligned
    for key in ("train_runtime", "eval_runtime"):
        assert DURATION.match(values[key]), values[key]
        assert values[key] == format_duration(summary[key])
    h, m, s, cs = map(int, DURATION.match(values["train_runtime"]).groups())
    assert (h, m, s, cs) == (1, 2, 3, 50)
    assert values["eval_loss"] == "n/a"
    assert values["train_samples"] == "1024" and values["world_size"] == "2"
    assert values["batch"] == summary["batch"]
    assert float(values["train_loss"]) == 2.5
    assert float(values["train_tokens_per_second"]) == pytest.approx(123456.7, rel=1e-3)
    assert float(values["mfu"]) == pytest.approx(0.0001234, rel=1e-3)


def test_format_summary_default_title():
    assert format_summary({"x": 1}).splitlines()[0] == "***** train metrics *****"


def test_step_times_exclude_warmup():
    times = StepTimes(warmup_steps=3)
    totals = []
    phase_values = {p: [] for p in PHASES}
    for step in range(10):
        phases = {p: (step + 1) * (i + 1) * 0.01 for i, p in enumerate(PHASES)}
        if step == 7:
            del phases["comm"]  # a phase not measured this step counts as 0
        total = 1.0 + step
        times.add(step, phases, total)
        if step >= 3:
            totals.append(total)
            for p in PHASES:
                phase_values[p].append(phases.get(p, 0.0))
    assert times.measured == 7
    assert times.step_total == totals
    for p in PHASES:
        assert times.mean(p) == pytest.approx(sum(phase_values[p]) / 7)


def test_step_times_all_warmup():
    times = StepTimes(warmup_steps=5)
    for step in range(5):
        times.add(step, {p: 1.0 for p in PHASES}, 4.0)
    assert times.measured == 0
    assert all(times.mean(p) == 0.0 for p in PHASES)
