"""DDP communication hooks (parallel.comm_hook) in 2 gloo processes.

Tolerances are relative differences from fp32 ddp's losses (2 processes, no hook) on every one of
20 steps of the tiny GPT. Measured worst step: bf16 1.6e-6, fp16 1.1e-6, powersgd (rank 1, warm-up
10) exactly 0 for the first 11 steps (the hook all-reduces exactly for steps 0-9, so the losses
of steps 1-11 are computed before any compressed update), 4.5e-4 after. Stated bounds: 2e-5 for the
half-precision hooks, 5e-3 for powersgd, and above 0, which shows the hook was in use.
"""

import gc
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from linscale.config import ParallelConfig
from linscale.runtime import parallel
from linscale.runtime.device import Device

from .conftest import ROOT, TINY_GPT, spawn_ranks
from .test_bad_input import _one_error

pytestmark = pytest.mark.dist

COMMON = [
    "train", "gpt", *TINY_GPT, "--train.max_steps=20", "--train.log_every=1", "--train.global_batch=16",
    "--optim.warmup_steps=5", "--nproc-per-node=2",
]  # fmt: skip
TOLERANCE = {"bf16": 2e-5, "fp16": 2e-5, "powersgd": 5e-3}


@pytest.fixture(scope="module")
def ddp_fp32(tmp_path_factory):
    """fp32 ddp in 2 processes without a hook: the losses every hook is held against."""
    run_dir = tmp_path_factory.mktemp("ddp_fp32")
    proc = subprocess.run([sys.executable, "-m", "linscale", *COMMON, f"--log.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["train_loss"] for m in metrics if "train_loss" in m]


def _differences(run, reference) -> list[float]:
    assert run.returncode == 0, run.output
    got = run.losses()
    assert len(got) == len(reference) == 20
    return [abs(a - b) / b for a, b in zip(got, reference, strict=True)]


@pytest.mark.parametrize(("hook", "strategy"), [("bf16", "ddp"), ("fp16", "ddp"), ("bf16", "zero1")])
def test_half_precision_hooks_follow_fp32(linscale, ddp_fp32, hook, strategy):
    run = linscale(*COMMON, f"--parallel.comm_hook={hook}", f"--parallel.strategy={strategy}")
    diff = _differences(run, ddp_fp32)
    assert 0 < max(diff) < TOLERANCE[hook], f"losses differ from fp32 ddp by up to {max(diff):.2e}"
    comm = run.summary()["time_comm_ms"]
    assert isinstance(comm, float) and comm > 0, comm  # the hook stamps the clock: still measured


def test_powersgd_is_exact_during_warmup_then_close(linscale, ddp_fp32):
    run = linscale(*COMMON, "--parallel.comm_hook=powersgd", "--parallel.powersgd_rank=1",
                   "--parallel.powersgd_warmup=10")  # fmt: skip
    diff = _differences(run, ddp_fp32)
    assert diff[:11] == [0.0] * 11, diff[:11]
    assert 0 < max(diff) < TOLERANCE["powersgd"], f"losses differ from fp32 ddp by up to {max(diff):.2e}"
    comm = run.summary()["time_comm_ms"]
    assert isinstance(comm, float) and comm > 0, comm


def _bf16_reduce(rank: int, world: int, out: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    local = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    local.load_state_dict(model.state_dict())
    ddp, clock = parallel.wrap(model, ParallelConfig(comm_hook="bf16"), Device("cpu", 0, "gloo", "cpu", 1))
    torch.manual_seed(1 + rank)  # different data on each rank
    x = torch.randn(16, 8)
    ddp(x).pow(2).mean().backward()
    local(x).pow(2).mean().backward()  # this rank's own gradient, not reduced
    assert clock.launches == 1 and clock.take() is not None  # the clock was stamped
    torch.save(
        {
            "reduced": torch.cat([p.grad.flatten() for p in model.parameters()]),
            "local": torch.cat([p.grad.flatten() for p in local.parameters()]),
        },
        f"{out}/rank{rank}.pt",
    )
    # DDP holds reference cycles; freed only after the process group is gone, its gloo threads
    # can abort the process at exit ("terminate called without an active exception").
    del ddp
    gc.collect()


def test_bf16_hook_reduces_to_the_mean_within_bf16_precision(tmp_path):
    spawn_ranks(_bf16_reduce, 2, tmp_path, str(tmp_path))
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0["reduced"], r1["reduced"]), "replicas disagree after the reduction"
    g0, g1 = r0["local"].double(), r1["local"].double()
    mean = (g0 + g1) / 2
    err = (r0["reduced"].double() - mean).abs()
    # Each gradient and their sum are rounded to bf16 (8 significant bits, relative error <= 2**-8
    # each), then halved exactly: |error| <= 2**-8 * (|g0| + |g1|), up to second-order terms.
    bound = 2**-8 * (g0.abs() + g1.abs()) * 1.01 + 1e-30
    assert (err <= bound).all(), f"worst error / bound {(err / bound).max():.3f}"
    assert (err > 0).any(), "the reduction was exact: no bf16 compression happened"
    assert r0["reduced"].dtype == torch.float32


def test_unknown_comm_hook_lists_the_choices(linscale):
    _one_error(
        linscale("train", "gpt", "--train.max_steps=1", "--parallel.comm_hook=int8"),
        "parallel.comm_hook",
        "'int8'",
        "none, bf16, fp16, powersgd",
    )


def test_comm_hook_with_a_sharded_strategy_is_one_error(linscale):
    _one_error(
        linscale(
            "train",
            "gpt",
            *TINY_GPT,
            "--nproc-per-node=2",
            "--train.max_steps=1",
            "--parallel.strategy=zero3",
            "--parallel.comm_hook=bf16",
        ),  # fmt: skip
        "parallel.comm_hook=bf16 applies to ddp and zero1",
        "--parallel.reduce_dtype=bf16",
    )
