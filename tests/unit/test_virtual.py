"""Emulated device speed (perf/virtual.py): FLOPs per block, where the waits go, and that only time changes.

Timing checks are lower bounds (a sleep lasts at least what was asked), never upper bounds on
absolute time, so a loaded machine cannot fail them."""

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from linscale.models.vit import ViT, ViTConfig
from linscale.perf.virtual import (
    EmulatedSpeed,
    emulated_compute_seconds,
    flops_seconds,
    gradient_ready_times,
)
from linscale.runtime.parallel import checkpoint_blocks
from linscale.tasks.gpt import GPTTask, GPTTaskConfig


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as each rank has in a study: steadier real compute times."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_gpt(n_layer: int = 3):
    task = GPTTask(GPTTaskConfig(n_layer=n_layer, d_model=64, n_head=4, block_size=32, corpus_mb=0.1))
    torch.manual_seed(0)
    model = task.build_model()
    batch = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    return task, model, batch


def counted(loss_fn) -> FlopCounterMode:
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss_fn().backward()
    return counter


def emulate(task, model, batch, seconds: float | None = None, **kw) -> EmulatedSpeed:
    """Install on `model`; with `seconds`, set the speed so that one micro-batch takes that long."""
    speed = EmulatedSpeed(1.0, **kw)
    speed.install(model, task.blocks(model), lambda: task.loss(model, batch).backward())
    if seconds is not None:
        speed.tflops = speed.wait_times()["flops"] / seconds / 1e12
    return speed


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a: nn.Module, b: nn.Module) -> None:
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


# --- FLOPs ---


def test_gpt_block_flops_add_up_to_the_counted_training_flops():
    task, model, batch = tiny_gpt()
    reference = copy.deepcopy(model)
    speed = emulate(task, model, batch)
    times = speed.wait_times()
    counter = counted(lambda: task.loss(reference, batch))
    total = counter.get_total_flops()
    blocks, rest = times["blocks"], times["rest"]
    assert times["flops"] == total == task.flops_per_sample() * batch.shape[0]
    assert sum(b["fwd_flops"] + b["bwd_flops"] for b in blocks) + rest["fwd_flops"] + rest["bwd_flops"] == total
    per_module = counter.get_flop_counts()
    for i, b in enumerate(blocks):
        # FlopCounterMode's own per-module totals (forward and backward together) agree per block ...
        assert b["fwd_flops"] + b["bwd_flops"] == sum(per_module[f"GPT.blocks.{i}"].values())
        # ... and forward and backward are told apart: matrix products cost twice in backward.
        assert b["bwd_flops"] == 2 * b["fwd_flops"] > 0
        assert b["calls"] == 1
    # The rest is the tied head (its weight is the embedding): 2*d*vocab per token forward.
    assert rest["fwd_flops"] == 2 * 64 * 256 * 4 * 32
    assert rest["bwd_flops"] == 2 * rest["fwd_flops"]
    assert times["total"] == pytest.approx(flops_seconds(total, 1.0))
    assert times["fwd"] == pytest.approx(flops_seconds(total / 3, 1.0))
    assert all(p.grad is None for p in model.parameters())  # zeroed after counting


def test_vit_forward_and_backward_flops_are_told_apart():
    cfg = ViTConfig(image_size=16, patch_size=4, num_classes=10, width=32, depth=2, heads=2, mlp_dim=64)
    torch.manual_seed(0)
    model = ViT(cfg)
    images, labels = torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3])

    def loss(m):
        return F.cross_entropy(m(images), labels)

    reference = copy.deepcopy(model)
    speed = EmulatedSpeed(1.0)
    speed.install(model, list(model.blocks), lambda: loss(model).backward())
    times = speed.wait_times()
    total = counted(lambda: loss(reference)).get_total_flops()
    assert times["flops"] == total == cfg.train_flops_per_sample() * 3
    rest, blocks = times["rest"], times["blocks"]
    assert sum(b["fwd_flops"] + b["bwd_flops"] for b in blocks) + rest["fwd_flops"] + rest["bwd_flops"] == total
    patch = cfg.patch_embed_flops() * 3
    assert rest["fwd_flops"] == patch + 2 * 32 * 10 * 3  # patch convolution and head
    # The images need no gradient: the patch convolution's backward is its weight gradient only.
    assert rest["bwd_flops"] == 2 * rest["fwd_flops"] - patch
    for b in blocks:
        assert b["bwd_flops"] == 2 * b["fwd_flops"] > 0


# --- time ---


def test_forward_takes_the_emulated_time_and_only_time_changes():
    task, model, batch = tiny_gpt()
    reference = copy.deepcopy(model)
    speed = emulate(task, model, batch, seconds=0.24)
    fwd = speed.wait_times()["fwd"]
    assert fwd == pytest.approx(0.08)
    for _ in range(2):  # two micro-batches accumulating, as in gradient accumulation
        t0 = time.perf_counter()
        loss = task.loss(model, batch)
        took = time.perf_counter() - t0
        # Sleeps last at least what is asked, less the learned wake-up delay (at most 5 ms each).
        assert took >= fwd - 4 * 0.005
        loss.backward()
        expected = task.loss(reference, batch)
        expected.backward()
        assert torch.equal(loss, expected)
    assert_same_grads(model, reference)
    s = speed.stats()
    assert s["forwards"] == 2 * 3 and s["backwards"] == 2 * 3 and s["recomputes"] == 0
    assert s["phases"] == 2 * (2 * 3 + 2)  # every block and the rest, forward and backward
    assert s["emulated_seconds"] == pytest.approx(2 * 0.24)
    assert s["slept_seconds"] > 0.5 * s["emulated_seconds"]
    # Evaluation under no_grad: the forward only.
    with torch.no_grad():
        t0 = time.perf_counter()
        assert torch.equal(model(batch[:, :-1]), reference(batch[:, :-1]))
        assert time.perf_counter() - t0 >= fwd - 4 * 0.005
    s = speed.stats()
    assert s["eval_forwards"] == 3 and s["backwards"] == 2 * 3


def test_gradients_become_ready_last_block_first_at_the_emulated_times():
    task, model, batch = tiny_gpt()
    speed = emulate(task, model, batch, seconds=0.3, trace=True)
    times = speed.wait_times()
    blocks = task.blocks(model)
    ready: dict[int, float] = {}

    def arrived(i, _param):
        ready[i] = time.perf_counter()  # the last parameter of block i to get its gradient

    for i, block in enumerate(blocks):
        for p in block.parameters():
            p.register_post_accumulate_grad_hook(lambda p, i=i: arrived(i, p))
    for _ in range(2):  # the second step uses the real backward times measured in the first
        model.zero_grad(set_to_none=True)
        ready.clear()
        speed.events.clear()
        loss = task.loss(model, batch)
        t0 = time.perf_counter()
        loss.backward()
    order = sorted(ready, key=ready.get)
    assert order == [2, 1, 0]
    slept = {e["block"]: e["slept"] for e in speed.events if e["kind"] == "bwd"}
    # The rest's backward share comes first, then each block's wait, before its real backward.
    assert ready[2] - t0 >= slept[-1] + slept[2]
    for i in (1, 0):
        gap = ready[i] - ready[i + 1]
        assert gap >= slept[i]
        assert gap >= 0.5 * times["blocks"][i]["bwd"]  # generous: the wait is the stated time less real compute
    expected = gradient_ready_times(times)
    assert expected[0] > expected[1] > expected[2] > times["rest"]["bwd"]
    assert ready[0] - t0 >= 0.5 * expected[0]


def test_composes_with_activation_checkpointing_in_either_order():
    # Emulation first, then checkpointing around the wrapped forward (the training loop's order).
    task, model, batch = tiny_gpt()
    reference = copy.deepcopy(model)
    speed = emulate(task, model, batch, seconds=0.12, trace=True)
    assert checkpoint_blocks(task.blocks(model), 1) == 3
    plain = speed.wait_times()
    for step in range(2):
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        task.loss(model, batch).backward()
        task.loss(reference, batch).backward()
        assert_same_grads(model, reference)
        s = speed.stats()
        # The recomputation in backward ran the real forward again, without its wait.
        assert s["forwards"] == 3 * (step + 1) and s["recomputes"] == 3 * (step + 1)
        assert len([e for e in speed.events if e["kind"] == "fwd" and e["block"] >= 0]) == 3 * (step + 1)
    # The device would recompute too: once seen, a block's backward includes its forward again.
    times = speed.wait_times()
    for b, p in zip(times["blocks"], plain["blocks"], strict=True):
        assert b["recompute"] == p["fwd"] > 0 and p["recompute"] == 0
    last = [e for e in speed.events if e["kind"] == "bwd" and e["block"] >= 0][-3:]
    for e in last:
        b = times["blocks"][e["block"]]
        assert e["target"] == pytest.approx(b["bwd"] + b["recompute"])
    assert times["total"] == pytest.approx(plain["total"] + sum(p["fwd"] for p in plain["blocks"]))

    # Checkpointing first: the counted backward holds the recomputation's FLOPs (all but the
    # block's last product: checkpoint stops recomputing once backward has what it saved).
    task, model, batch = tiny_gpt()
    reference = copy.deepcopy(model)
    checkpoint_blocks(task.blocks(model), 1)
    speed = emulate(task, model, batch, seconds=0.12)
    for b in speed.wait_times()["blocks"]:
        assert 2 * b["fwd_flops"] < b["bwd_flops"] <= 3 * b["fwd_flops"]
    task.loss(model, batch).backward()
    task.loss(reference, batch).backward()
    assert_same_grads(model, reference)
    assert speed.stats()["forwards"] == 3


class Clock:
    """A fake clock: sleeps advance it exactly, and so does the simulated real compute."""

    def __init__(self) -> None:
        self.t = 100.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class Work(torch.autograd.Function):
    """Identity that takes `fwd` seconds of the clock in forward and `bwd` in backward."""

    @staticmethod
    def forward(ctx, x, clock, fwd, bwd):
        clock.t += fwd
        ctx.clock, ctx.bwd = clock, bwd
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        ctx.clock.t += ctx.bwd
        return g, None, None, None


class Timed(nn.Module):
    def __init__(self, clock: Clock, fwd: float, bwd: float) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.clock, self.fwd, self.bwd = clock, fwd, bwd

    def forward(self, x):
        return Work.apply(self.lin(x), self.clock, self.fwd, self.bwd)


class Chain(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_the_schedule_on_a_fake_clock(monkeypatch):
    """Exact times: real compute is subtracted, an overrun is made up by the phases after it, and
    in the second step each block's gradients arrive when its emulated backward ends."""
    from linscale.perf import virtual

    clock = Clock()
    monkeypatch.setattr(virtual, "_now", clock.now)
    monkeypatch.setattr(virtual.time, "sleep", clock.sleep)
    # Real compute: block 0's forward overruns (25 ms of its 10), the others take 2 ms; every
    # backward takes 5 ms of its 20.
    model = Chain([Timed(clock, 0.025, 0.005), Timed(clock, 0.002, 0.005), Timed(clock, 0.002, 0.005)])
    x = torch.randn(4, 8)
    speed = EmulatedSpeed(1.0)
    speed.install(model, list(model.blocks), lambda: model(x).square().mean().backward())
    unit = 2 * 4 * 8 * 8  # one Linear(8, 8) on 4 samples
    times = speed.wait_times()
    assert [b["fwd_flops"] for b in times["blocks"]] == [unit] * 3
    assert [b["bwd_flops"] for b in times["blocks"]] == [2 * unit] * 3
    # The rest: the input and head layers; the input layer's backward is its weight gradient only.
    assert times["rest"]["fwd_flops"] == 2 * unit and times["rest"]["bwd_flops"] == 3 * unit
    speed.tflops = unit / 0.010 / 1e12  # a block's forward takes 10 ms, its backward 20 ms
    ready: dict[int, float] = {}
    for i, block in enumerate(model.blocks):
        block.lin.weight.register_post_accumulate_grad_hook(lambda p, i=i: ready.__setitem__(i, clock.t))
    for _ in range(2):
        t0 = clock.t
        loss = model(x).square().mean()
        assert clock.t - t0 == pytest.approx(0.050)  # 3 x 10 ms and the rest's 20, block 0's overrun made up
        t0 = clock.t
        loss.backward()
        # The rest's 30 ms first; then each block's backward ends on time, and with it the step.
        assert clock.t - t0 == pytest.approx(0.030 + 3 * 0.020)
    # The second step knows the real backward times: the waits come before them, so the
    # gradients arrive exactly when each emulated backward ends.
    assert [ready[i] - t0 for i in (2, 1, 0)] == pytest.approx([0.050, 0.070, 0.090])
    assert gradient_ready_times(speed.wait_times()) == pytest.approx([0.090, 0.070, 0.050])
    s = speed.stats()
    assert s["overruns"] == 2  # block 0's forward, at each step
    assert s["emulated_seconds"] == pytest.approx(2 * 0.140)
    assert s["behind_seconds"] == pytest.approx(0.0, abs=1e-9) and s["slowdown"] == pytest.approx(1.0)
    assert s["real_seconds"] == pytest.approx(2 * (0.029 + 0.015))  # forwards, and the blocks' backwards


class Pair(nn.Module):
    """A block with a tuple in and a dict out, of which one tensor needs no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, xy):
        x, y = xy
        return {"x": torch.tanh(self.a(x)) + y, "count": torch.ones(()), "y": self.b(y)}


class Frozen(nn.Module):
    """Sees only the input data, with frozen weights: its output needs no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.lin.requires_grad_(False)

    def forward(self, x):
        return self.lin(x)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = Frozen()
        self.blocks = nn.ModuleList([Pair(), Pair()])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        z = self.frozen(x)
        out = {"x": z, "y": x}
        for block in self.blocks:
            out = block((out["x"], out["y"]))
        return self.head(out["x"] + out["y"]), out["count"]


def test_tuples_dicts_and_blocks_without_gradients():
    torch.manual_seed(0)
    model = Branchy()
    reference = copy.deepcopy(model)
    x = torch.randn(5, 8)

    def loss(m):
        logits, _ = m(x)
        return logits.square().mean()

    speed = EmulatedSpeed(1.0)
    blocks = [model.frozen, *model.blocks]
    speed.install(model, blocks, lambda: loss(model).backward())
    times = speed.wait_times()
    assert times["blocks"][0]["bwd_flops"] == 0 < times["blocks"][0]["fwd_flops"]
    assert times["blocks"][1]["bwd_flops"] > 0 and times["blocks"][2]["bwd_flops"] > 0
    speed.tflops = times["flops"] / 0.05 / 1e12
    for _ in range(2):
        loss(model).backward()
        loss(reference).backward()
    assert_same_grads(model, reference)
    s = speed.stats()
    assert s["forwards"] == 2 * 3 and s["backwards"] == 2 * 2  # the frozen block has no backward


def test_helpers_install_checks_and_remove():
    assert emulated_compute_seconds(6e9, 8, 100.0) == pytest.approx(4.8e-4)
    assert flops_seconds(2e12, 4.0) == 0.5
    with pytest.raises(ValueError, match="positive"):
        EmulatedSpeed(0.0)
    times = {"rest": {"bwd": 1.0}, "blocks": [{"bwd": 2.0, "recompute": 0.0}, {"bwd": 3.0, "recompute": 1.0}]}
    assert gradient_ready_times(times) == [7.0, 5.0]

    task, model, batch = tiny_gpt(n_layer=2)
    other = GPTTask(GPTTaskConfig(n_layer=1, d_model=64, n_head=4, block_size=32)).build_model()
    with pytest.raises(ValueError, match="submodule"):
        EmulatedSpeed(1.0).install(model, [other.blocks[0]], lambda: None)
    with pytest.raises(ValueError, match="never called the model"):
        EmulatedSpeed(1.0).install(model, task.blocks(model), lambda: None)
    assert "forward" not in model.__dict__ and "forward" not in model.blocks[0].__dict__  # undone on failure
    speed = emulate(task, model, batch, seconds=10.0)
    with pytest.raises(RuntimeError, match="already installed"):
        speed.install(model, task.blocks(model), lambda: None)
    speed.remove()
    assert "forward" not in model.__dict__ and "forward" not in model.blocks[0].__dict__
    speed.stats(reset=True)
    task.loss(model, batch).backward()
    assert speed.stats()["phases"] == 0  # nothing emulated any more
