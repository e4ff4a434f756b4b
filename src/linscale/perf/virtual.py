"""Emulated device speed: each rank's compute stretched into calibrated waits, communication kept real.

A scaling study needs devices that are fast compared to the network. On a small machine the
ranks are slow CPU processes, so overlap and bucketing would be measured against the wrong
compute. `EmulatedSpeed` makes every forward and backward of a model take the time it would take
on a device that runs `tflops` TFLOP/s: the model's FLOPs are counted once per block, in forward
and in backward separately, and each phase is padded with `time.sleep` up to its stated time.
Sleeping frees the core, so 8 to 16 ranks share 2 cores while their collectives (gloo, over the
emulated cluster's shaped links) run for real and in the real order:

    speed = EmulatedSpeed(tflops=50)
    speed.install(model, task.blocks(model), lambda: task.loss(model, batch).backward())
    model, clock = parallel.wrap(model, cfg.parallel, device, topo, blocks)   # DDP / FSDP2 after
    ...
    speed.stats()   # emulated and real seconds, overruns

Where the waits go (the predictor in perf/ assumes the same):
  forward   block i takes fwd_flops_i / speed: its real compute runs, then a sleep up to that time;
            the rest of the model (embeddings, head: the model's FLOPs outside the blocks) takes its
            share at the model's output.
  backward  the rest's backward share comes first (at the start of backward), then each block,
            last to first, takes bwd_flops_i / speed. The sleep comes before the block's real
            backward, so the block's gradients become ready when its emulated backward ends, and
            DDP launches (or FSDP2 reduce-scatters) them at that moment.
Real compute is subtracted: a forward sleeps until its start plus the stated time; a backward
sleeps the stated time minus the real backward time of that block measured at the previous
step (and, if the real backward was quicker, the rest after it). A phase that runs late is made
up by the later phases of the same micro-batch. When the real compute exceeds the stated time
the phase runs late: `stats()` counts these overruns and how far the emulation fell behind, and
the emulated device is then slower than stated.

Composition. Installed on the unwrapped model, before DDP or FSDP2 and before
`runtime.parallel.checkpoint_blocks`: the block forwards (and the model's forward) are wrapped in
place, so parameter names and state dicts do not change, and the wrappers time only what happens
inside them (FSDP2's all-gathers in its forward hooks stay outside, as communication).
Activation checkpointing wraps the wrapped forward; its recomputation in backward runs the real
compute only (no forward wait, no markers) and is detected there; from then on the block's
backward is emulated as backward plus forward, as the device would recompute it. Under
`torch.no_grad` (evaluation) the forward is emulated and nothing else.

This mode is meant for CPU studies. The waits are host-side: on a GPU the host would sleep while
queued kernels run, which emulates nothing useful.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

# Linux's sleep wakes 50-100 us late on an idle core and more when the cores are shared; the
# expected delay is learned and taken off each sleep, up to this much.
MAX_OVERSLEEP = 0.005
# Weight of the newest measurement in the running estimates of real compute times.
EMA = 0.5
MAX_EVENTS = 100_000


def flops_seconds(flops: float, tflops: float) -> float:
    """Seconds `flops` floating-point operations take at `tflops` TFLOP/s."""
    if not tflops > 0:
        raise ValueError(f"an emulated speed is a positive number of TFLOP/s, got {tflops}")
    return flops / (tflops * 1e12)


def emulated_compute_seconds(flops_per_sample: float, micro_batch: int, tflops: float) -> float:
    """Seconds of one micro-batch's training compute (forward + backward) at `tflops` TFLOP/s.

    >>> round(emulated_compute_seconds(6e9, 8, 100.0), 6)
    0.00048
    """
    return flops_seconds(flops_per_sample * micro_batch, tflops)


def gradient_ready_times(times: dict[str, Any]) -> list[float]:
    """Seconds after the start of backward at which each block's gradients are ready, as emulated
    (index = block): the rest's backward share first, then the blocks from last to first, each
    with its backward (and, for a recomputed block, its recomputation). `times`: `wait_times()`."""
    t = times["rest"]["bwd"]
    ready = [0.0] * len(times["blocks"])
    for i in reversed(range(len(ready))):
        b = times["blocks"][i]
        t += b["bwd"] + b["recompute"]
        ready[i] = t
    return ready


def _now() -> float:
    return time.perf_counter()


def _in_backward() -> bool:
    """True inside a backward pass, where a forward can only be a checkpoint's recomputation."""
    return torch._C._current_graph_task_id() != -1


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new


def _first_numel(tree: Any) -> int:
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            return leaf.numel()
    return 0


class _Marker(torch.autograd.Function):
    """Identity on the tensors given; `hook()` runs when its backward does.

    At a block's output its backward is where the block's backward begins (after the gradients
    of every output arrived and after the tensor hooks, FSDP2's all-gather among them); at the
    block's input it is where the block's backward ends. The outputs are detached aliases, not
    views, so FSDP2 does not warn about views returned by a block."""

    @staticmethod
    def forward(ctx, hook: Callable[[], None], *tensors: torch.Tensor):
        ctx.hook = hook
        ctx.set_materialize_grads(False)
        return tuple(t.detach() for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.hook()
        return (None, *grads)


def _mark(tree: Any, hook: Callable[[], None]) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """`tree` with its tensors that require grad passed through one `_Marker`, and those tensors."""
    leaves, spec = pytree.tree_flatten(tree)
    at = [k for k, v in enumerate(leaves) if isinstance(v, torch.Tensor) and v.requires_grad]
    if not at:
        return tree, ()
    marked = _Marker.apply(hook, *(leaves[k] for k in at))
    for k, t in zip(at, marked, strict=True):
        leaves[k] = t
    return pytree.tree_unflatten(leaves, spec), marked


@dataclass
class _Block:
    module: nn.Module
    inner: Callable[..., Any]  # the forward that was there before
    wrapper: Callable[..., Any] | None = None
    fwd_flops: float = 0.0  # per micro-batch of the counted size, all calls
    bwd_flops: float = 0.0
    calls: int = 0  # calls per micro-batch
    numel: int = 0  # elements of the first tensor input when counted (sizes scale the times)
    entered: float | None = None  # set by the global pre-hook, before the module's own hooks
    entered_flops: float = 0.0
    fwd_real: float | None = None  # real seconds per call, per counted size
    bwd_real: float | None = None
    recompute: bool = False  # checkpointed: its backward recomputes its forward


@dataclass
class _Rest:
    """The model outside the blocks: embeddings, head, and whatever the loss adds."""

    inner: Callable[..., Any] | None = None
    had_forward: bool = False  # the instance had its own `forward` attribute
    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    pre_fwd_flops: float = 0.0  # the part before the first block (its backward runs last)
    pre_bwd_flops: float = 0.0
    calls: int = 0
    numel: int = 0
    fwd_real: float | None = None
    pre_real: float | None = None
    head_real: float | None = None  # real backward from the start of backward to the first block
    end_flops: float = 0.0  # while counting: the reading at the end of the model's forward
    tail_flops: float | None = None  # while counting: the reading when the last block's backward ended


@dataclass
class _Call:
    """One call of a block (index >= 0) or of the model (index -1), as its markers see it."""

    index: int
    scale: float
    start: float = 0.0  # when its backward began
    deadline: float = 0.0  # when its backward should end
    begin: float = 0.0  # when its real backward began (after the wait)
    flops: float = 0.0  # counter reading then (while counting)
    arrived: float | None = None  # first gradient of its outputs
    has_end: bool = False
    target: float = 0.0
    slept: float = 0.0


@dataclass
class _Forward:
    start: float
    flops: float = 0.0
    block_time: float = 0.0  # inside the blocks, from their global pre-hook to their end
    block_flops: float = 0.0
    first_block: float | None = None
    first_block_flops: float = 0.0


@dataclass
class _Stats:
    phases: int = 0
    forwards: int = 0  # block forwards emulated in training (grad enabled)
    eval_forwards: int = 0  # block forwards under no_grad
    backwards: int = 0  # block backwards emulated
    recomputes: int = 0  # block forwards recomputed by activation checkpointing (not emulated)
    emulated: float = 0.0  # the stated seconds
    real: float = 0.0  # real compute measured (the rest's backward partly estimated)
    slept: float = 0.0
    behind: float = 0.0  # sum of (phase time - stated time): how far the emulation fell behind
    overruns: int = 0  # phases whose real compute alone exceeded the stated time
    overshoot: float = 0.0  # seconds the sleeps woke up late


class EmulatedSpeed:
    """Make a model's compute take the time it would on a device of `tflops` TFLOP/s.

    Install it on the unwrapped model before the parallel wrapping (DDP, FSDP2 `fully_shard`)
    and before `checkpoint_blocks`. `trace=True` keeps one record per emulated phase in
    `events` (for tests and timelines)."""

    def __init__(self, tflops: float, *, trace: bool = False) -> None:
        flops_seconds(1.0, tflops)  # validates
        self.tflops = float(tflops)
        self.trace = trace
        self.events: list[dict[str, Any]] = []
        self._blocks: list[_Block] = []
        self._index: dict[nn.Module, int] = {}
        self._rest = _Rest()
        self._model: nn.Module | None = None
        self._model_wrapper: Callable[..., Any] | None = None
        self._handles: list[Any] = []
        self._counter: FlopCounterMode | None = None
        self._open: list[_Call] = []  # while counting: backwards begun whose end has no marker
        self._forwards: list[_Forward] = []
        self._head: float | None = None  # start of the rest's real backward, until a block's gradient arrives
        self._head_scale = 1.0
        self._behind = 0.0  # this micro-batch's phases so far: their time less the stated time
        self._oversleep = 0.0
        self._total_flops = 0.0
        self._stats = _Stats()
        self._active = False

    # --- installing ---

    def install(self, model: nn.Module, blocks: list[nn.Module], run_forward_backward: Callable[[], None]) -> None:
        """Wrap `model`'s forward and each block's forward in place, and count their FLOPs.

        `run_forward_backward` runs one real training micro-batch through the model
        (`task.loss(model, batch).backward()`, the model in training mode); its FLOPs, counted
        with `FlopCounterMode` under the math attention kernel, set the stated times of every
        later micro-batch. Gradients are zeroed afterwards. Micro-batches of another size scale
        the times by the number of elements of the first tensor input."""
        if self._model is not None:
            raise RuntimeError("this EmulatedSpeed is already installed; make one per model")
        inside = {id(m) for m in model.modules()}
        if any(id(b) not in inside for b in blocks):
            raise ValueError("every block must be a submodule of the model (Task.blocks(model))")
        if len({id(b) for b in blocks}) != len(blocks):
            raise ValueError("a block is listed twice in Task.blocks(model)")
        if any(getattr(b, "_linscale_emulated", False) for b in blocks):
            raise ValueError("a block already has an emulated speed installed")
        others = sorted({p.device.type for p in model.parameters()} - {"cpu"})
        if others:
            warnings.warn(
                f"emulated device speed on {', '.join(others)}: the waits are host-side sleeps, meant for CPU "
                "studies; queued device work runs during them",
                stacklevel=2,
            )
        self._model = model
        for i, block in enumerate(blocks):
            b = _Block(block, block.forward)
            b.wrapper = functools.partial(self._block_forward, i)
            block.forward = b.wrapper
            block._linscale_emulated = True
            self._blocks.append(b)
            self._index[block] = i
        self._rest.had_forward = "forward" in model.__dict__
        self._rest.inner = model.forward
        self._model_wrapper = self._model_forward
        model.forward = self._model_wrapper
        # Global: it runs before a module's own hooks, so a block's time includes FSDP2's
        # all-gather wait in its pre-forward hook and the rest's time does not.
        self._handles.append(nn.modules.module.register_module_forward_pre_hook(self._pre_hook))
        self._active = True
        try:
            self._count(run_forward_backward)
        except BaseException:
            self.remove()
            raise
        finally:
            model.zero_grad(set_to_none=True)

    def _count(self, run_forward_backward: Callable[[], None]) -> None:
        # The math attention kernel: FlopCounterMode has no formula for the fused CPU kernel.
        self._counter = FlopCounterMode(display=False)
        try:
            with self._counter, sdpa_kernel(SDPBackend.MATH):
                run_forward_backward()
                total = float(self._counter.get_total_flops())
                self._close_open(total)
        finally:
            self._counter = None
            self._forwards.clear()
            self._head = None
        r = self._rest
        if r.calls == 0:
            raise ValueError("run_forward_backward never called the model: it must run task.loss(model, batch)")
        unused = [i for i, b in enumerate(self._blocks) if b.calls == 0]
        if unused:
            raise ValueError(
                f"blocks {unused} did not run in run_forward_backward: Task.blocks(model) must list modules "
                "the model's forward calls"
            )
        r.bwd_flops = total - r.end_flops - sum(b.bwd_flops for b in self._blocks)
        if r.tail_flops is not None:
            r.pre_bwd_flops = total - r.tail_flops
        for b in (*self._blocks, r):
            assert b.fwd_flops >= 0 and b.bwd_flops >= 0, (b.fwd_flops, b.bwd_flops)
        self._total_flops = total

    def remove(self) -> None:
        """Undo `install`: forwards restored where nothing wrapped them since (else they pass through)."""
        self._active = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for b in self._blocks:
            if b.module.__dict__.get("forward") is b.wrapper:
                del b.module.forward
                if getattr(b.inner, "__self__", None) is not b.module:  # an instance forward set before
                    b.module.forward = b.inner
            b.module._linscale_emulated = False
        m = self._model
        if m is not None and m.__dict__.get("forward") is self._model_wrapper:
            del m.forward
            if self._rest.had_forward:
                m.forward = self._rest.inner

    # --- what it emulates ---

    def seconds(self, flops: float) -> float:
        """Seconds `flops` take on the emulated device."""
        return flops_seconds(flops, self.tflops)

    def _fwd_target(self, b: _Block) -> float:
        return self.seconds(b.fwd_flops / b.calls)

    def _bwd_target(self, b: _Block) -> float:
        return self.seconds((b.bwd_flops + (b.fwd_flops if b.recompute else 0.0)) / b.calls)

    def wait_times(self) -> dict[str, Any]:
        """The stated seconds per micro-batch of the counted size, and the FLOPs behind them.

        `blocks[i]`: `fwd`, `bwd`, `recompute` (the forward again, once checkpointing was seen
        recomputing the block; else 0), `fwd_flops`, `bwd_flops`, `calls`; `rest`: `fwd`, `bwd`
        and FLOPs of the model outside the blocks (its forward placed at the model's output, its
        backward at the start of backward); `fwd`, `bwd`, `total` (seconds) and `flops` (counted
        training FLOPs of the micro-batch)."""
        if self._model is None:
            raise RuntimeError("install() first")
        r = self._rest
        n = max(1, r.calls)  # model calls while counting: one micro-batch each
        blocks = [
            {
                "fwd": self.seconds(b.fwd_flops / n),
                "bwd": self.seconds(b.bwd_flops / n),
                "recompute": self.seconds(b.fwd_flops / n) if b.recompute else 0.0,
                "fwd_flops": b.fwd_flops / n,
                "bwd_flops": b.bwd_flops / n,
                "calls": b.calls // n,
            }
            for b in self._blocks
        ]
        rest = {
            "fwd": self.seconds(r.fwd_flops / n),
            "bwd": self.seconds(r.bwd_flops / n),
            "fwd_flops": r.fwd_flops / n,
            "bwd_flops": r.bwd_flops / n,
        }
        fwd = rest["fwd"] + sum(b["fwd"] for b in blocks)
        bwd = rest["bwd"] + sum(b["bwd"] + b["recompute"] for b in blocks)
        return {
            "tflops": self.tflops,
            "blocks": blocks,
            "rest": rest,
            "fwd": fwd,
            "bwd": bwd,
            "total": fwd + bwd,
            "flops": self._total_flops / n,
        }

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """What the emulation did: phases, stated and real seconds, sleeps, and the overruns.

        `overrun_share`: the share of phases whose real compute alone exceeded the stated time;
        `real_share`: real compute / stated time (keep it well below 1, see docs/emulation.md);
        `behind_seconds`: how much longer than stated the phases took in all, after the later
        phases of each micro-batch made up what they could; `slowdown`: (stated + behind) /
        stated, the factor by which the emulated device was slower than stated (1.0 = as stated)."""
        s = self._stats
        out = {
            "tflops": self.tflops,
            "phases": s.phases,
            "forwards": s.forwards,
            "eval_forwards": s.eval_forwards,
            "backwards": s.backwards,
            "recomputes": s.recomputes,
            "emulated_seconds": s.emulated,
            "real_seconds": s.real,
            "real_share": s.real / s.emulated if s.emulated else 0.0,
            "slept_seconds": s.slept,
            "behind_seconds": s.behind,
            "overruns": s.overruns,
            "overrun_share": s.overruns / s.phases if s.phases else 0.0,
            "slowdown": (s.emulated + s.behind) / s.emulated if s.emulated else 1.0,
            "sleep_overshoot_seconds": s.overshoot,
        }
        if reset:
            self._stats = _Stats()
        return out

    # --- timing helpers ---

    def _sleep(self, seconds: float) -> float:
        """Sleep about `seconds`, less the learned wake-up delay; returns the seconds slept.

        Callers ask for the stated time less the real compute and less how far this micro-batch
        is behind (`_behind`): a phase that ran late (real compute slower than its estimate, a
        late wake-up on a busy core) is made up by the phases after it, so a micro-batch keeps its
        stated total as long as its real compute fits."""
        ask = seconds - self._oversleep
        if ask <= 0:
            return 0.0
        t = _now()
        time.sleep(ask)
        slept = _now() - t
        over = max(0.0, slept - ask)
        self._oversleep = min(MAX_OVERSLEEP, 0.8 * self._oversleep + 0.2 * over)
        self._stats.slept += slept
        self._stats.overshoot += over
        return slept

    def _account(
        self, kind: str, index: int, target: float, real: float, slept: float, start: float, end: float, after=0.0
    ) -> None:
        """Count one phase; `slept` before its real compute, `after` it (a backward's catch-up)."""
        s = self._stats
        s.phases += 1
        s.emulated += target
        s.real += real
        s.behind += (end - start) - target
        self._behind += (end - start) - target
        if real > target:
            s.overruns += 1
        if self.trace and len(self.events) < MAX_EVENTS:
            self.events.append(
                {"kind": kind, "block": index, "start": start, "end": end, "target": target, "real": real,
                 "slept": slept, "after": after}
            )  # fmt: skip

    def _flops(self) -> float:
        assert self._counter is not None
        return float(self._counter.get_total_flops())

    # --- forward ---

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        i = self._index.get(module)
        if i is not None:
            b = self._blocks[i]
            b.entered = _now()
            if self._counter is not None:
                b.entered_flops = self._flops()

    def _model_forward(self, *args: Any, **kwargs: Any) -> Any:
        r = self._rest
        assert r.inner is not None
        if not self._active or _in_backward():
            return r.inner(*args, **kwargs)
        f = _Forward(_now(), self._flops() if self._counter is not None else 0.0)
        if not self._forwards:
            self._behind = 0.0  # a new micro-batch
        self._forwards.append(f)
        try:
            out = r.inner(*args, **kwargs)
        finally:
            self._forwards.pop()
        if self._counter is not None:
            end = self._flops()
            r.calls += 1
            r.numel = r.numel or _first_numel((args, kwargs))
            r.fwd_flops += end - f.flops - f.block_flops
            r.pre_fwd_flops += (f.first_block_flops if f.first_block is not None else end) - f.flops
            r.end_flops = end
            r.tail_flops = None
            call = _Call(-1, 1.0)
        else:
            scale = self._scale(r.numel, (args, kwargs))
            real = _now() - f.start - f.block_time
            target = self.seconds(r.fwd_flops / r.calls) * scale
            slept = self._sleep(target - real - self._behind)
            end = _now()
            r.fwd_real = _ema(r.fwd_real, real / scale)
            pre = (f.first_block - f.start) if f.first_block is not None else real
            r.pre_real = _ema(r.pre_real, pre / scale)
            self._account("fwd", -1, target, real, slept, end - real - slept, end)
            call = _Call(-1, scale)
        if torch.is_grad_enabled():
            out, _ = _mark(out, functools.partial(self._rest_backward, call))
        return out

    def _scale(self, counted: int, tree: Any) -> float:
        n = _first_numel(tree)
        return n / counted if n and counted else 1.0

    def _block_forward(self, i: int, *args: Any, **kwargs: Any) -> Any:
        b = self._blocks[i]
        if not self._active:
            return b.inner(*args, **kwargs)
        if _in_backward():
            # Activation checkpointing recomputing the block in backward: real compute only. The
            # device would recompute too, so from now on the block's backward wait includes it.
            b.recompute = True
            self._stats.recomputes += 1
            return b.inner(*args, **kwargs)
        t0 = _now()
        grad = torch.is_grad_enabled()
        counting = self._counter is not None
        f0 = self._flops() if counting else 0.0
        # From the global pre-hook when the block was called as a module (before its own hooks).
        entered, entered_flops = (b.entered, b.entered_flops) if b.entered is not None else (t0, f0)
        b.entered = None
        if counting:
            b.calls += 1
            b.numel = b.numel or _first_numel((args, kwargs))
            call = _Call(i, 1.0)
        else:
            call = _Call(i, self._scale(b.numel, (args, kwargs)))
        if grad:
            (args, kwargs), ins = _mark((args, kwargs), functools.partial(self._block_backward_end, call))
            call.has_end = bool(ins)
        out = b.inner(*args, **kwargs)
        if counting:
            done = self._flops()
            b.fwd_flops += done - f0
        else:
            real = _now() - t0
            target = self._fwd_target(b) * call.scale
            slept = self._sleep(target - real - self._behind)
            b.fwd_real = _ema(b.fwd_real, real / call.scale)
            self._account("fwd", i, target, real, slept, t0, _now())
            if grad:
                self._stats.forwards += 1
            else:
                self._stats.eval_forwards += 1
        if grad:
            out, outs = _mark(out, functools.partial(self._block_backward_begin, call))
            # Registered before FSDP2's pre-backward hook (added after this returns), so it sees
            # the gradient arrive before the block's all-gather.
            for t in outs:
                t.register_hook(functools.partial(self._gradient_arrived, call))
        if self._forwards:
            f = self._forwards[-1]
            f.block_time += _now() - entered
            if f.first_block is None:
                f.first_block, f.first_block_flops = entered, entered_flops
            if counting:
                f.block_flops += done - f0
        return out

    # --- backward ---

    def _rest_backward(self, call: _Call) -> None:
        """The start of backward: the rest's share of the backward, then its real head part."""
        if self._counter is not None:
            self._close_open(self._flops())
            self._head = None
            return
        r = self._rest
        t0 = _now()
        target = self.seconds(r.bwd_flops / r.calls) * call.scale
        # Its real compute: the head's backward (measured at the previous step) and the part
        # before the first block, which runs at the very end of backward, among the gradient
        # reductions, so it is estimated from its forward time and FLOPs instead.
        pre_ratio = r.pre_bwd_flops / r.pre_fwd_flops if r.pre_fwd_flops > 0 else 1.0
        if r.head_real is not None:
            est = r.head_real + (r.pre_real or 0.0) * pre_ratio
        else:
            ratio = r.bwd_flops / r.fwd_flops if r.fwd_flops > 0 else 1.0
            est = (r.fwd_real or 0.0) * ratio
        est *= call.scale
        slept = self._sleep(target - est - self._behind)
        self._head = _now()
        self._head_scale = call.scale
        self._account("bwd", -1, target, est, slept, t0, t0 + slept + est)

    def _gradient_arrived(self, call: _Call, grad: torch.Tensor) -> None:
        if call.arrived is not None:
            return
        call.arrived = _now()
        if self._head is not None:
            r = self._rest
            if self._counter is None:
                r.head_real = _ema(r.head_real, (call.arrived - self._head) / self._head_scale)
            self._head = None

    def _block_backward_begin(self, call: _Call) -> None:
        b = self._blocks[call.index]
        if self._counter is not None:
            call.flops = self._flops()
            self._close_open(call.flops)
            if not call.has_end:
                self._open.append(call)
            return
        t0 = _now()
        call.target = self._bwd_target(b) * call.scale
        if b.bwd_real is not None:
            est = b.bwd_real
        else:  # the first backward: from the forward's real time
            ratio = b.bwd_flops / b.fwd_flops if b.fwd_flops > 0 else 2.0
            est = (b.fwd_real or 0.0) * ratio
        est *= call.scale
        call.start = t0
        call.deadline = t0 + call.target - self._behind
        call.slept = self._sleep(call.deadline - t0 - est)
        call.begin = _now()
        self._stats.backwards += 1
        if not call.has_end:  # no input needs a gradient: the end is not seen
            self._account("bwd", call.index, call.target, est, call.slept, t0, call.begin + est)

    def _block_backward_end(self, call: _Call) -> None:
        """The block's backward ended: its input gradients are computed, its parameters' too."""
        b = self._blocks[call.index]
        if self._counter is not None:
            done = self._flops()
            b.bwd_flops += done - call.flops
            self._close_open(done)
            self._rest.tail_flops = done
            return
        real = _now() - call.begin
        b.bwd_real = _ema(b.bwd_real, real / call.scale)
        # Real compute faster than estimated: the gradients are in, but the block's backward (and
        # FSDP2's reduce-scatter after it) ends on time.
        after = self._sleep(call.deadline - _now())
        self._account("bwd", call.index, call.target, real, call.slept, call.start, _now(), after)

    def _close_open(self, flops: float) -> None:
        """While counting: a block whose input needs no gradient ends at the next marker."""
        for call in self._open:
            self._blocks[call.index].bwd_flops += flops - call.flops
        self._open.clear()
