"""Sharded, atomic, optionally asynchronous checkpoints, and finding the one to resume from.

Layout of a run's checkpoints (`checkpoint.dir`, default RUN_DIR/checkpoints):

    step_00000120/            a committed checkpoint
        .metadata             torch.distributed.checkpoint's index of the shards
        __0_0.distcp ...      every rank's shard files: tensors only
        linscale.json         the commit marker, written last: step, data position, schedule,
                              loss scaler, the files' sizes and CRC-32 checksums
    step_00000150.tmp/        being written (or abandoned by a killed job): never loaded

Every rank writes its shard of the model, of the optimizer states and its own RNG states (under
a per-rank key: a value saved under one key by every rank comes back as one rank's value) with
`torch.distributed.checkpoint` into the `.tmp` folder. DCP returns on every rank only after the
coordinator wrote `.metadata`, so all shards are on disk; rank 0 then checksums the files,
writes `linscale.json` and renames the folder. A folder without the marker, or whose files do
not match it, is never loaded. Non-tensor state goes into the JSON marker, so loading unpickles
nothing (DCP would unpickle non-tensor values with `weights_only=False`).

Model and optimizer states are saved under fully-qualified parameter names as
`get_state_dict` returns them (DDP's `module.` prefix removed, FSDP2 shards as DTensors), so a
checkpoint loads into any strategy and any world size: DCP reshards on load. ZeRO-1's
optimizer keeps each rank's share of the states; each rank saves and loads exactly the
parameters it owns, under the same names.

With `checkpoint.async_save`, the states are first copied to host memory (the only part that
stalls training), then written and committed by a background thread over a process group of
its own, so its collectives never interleave with the training's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from linscale.data.shards import atomic_write, file_crc32, fsync_dir
from linscale.runtime import dist as ldist

FORMAT = "linscale-checkpoint v1"
MARKER = "linscale.json"
PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint cannot be written or loaded; the message says why and what to do."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


# --- finding and checking checkpoints (plain files; rank 0 does it and tells the others) ---------------


def committed(root: Path) -> list[Path]:
    """Committed checkpoint folders under `root`, oldest first (not yet verified)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None and (p / MARKER).is_file()]
    return sorted(found, key=_step_of)


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(PREFIX) or not name[len(PREFIX) :].isdigit():
        return None
    return int(name[len(PREFIX) :])


def read_marker(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable {MARKER} ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} checkpoint (format {meta.get('format')!r})")
    return meta


def verify(path: Path) -> dict[str, Any]:
    """The checkpoint's marker, after checking every file's size and checksum against it."""
    meta = read_marker(path)
    for name, want in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(
                f"checkpoint {path} is truncated or damaged: {name} has {size} bytes of {want['bytes']}"
            )
        if file_crc32(f) != want["crc32"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} does not match its checksum")
    return meta


def newest_valid(root: Path, warn) -> Path | None:
    """The newest committed checkpoint whose files check out; damaged ones are skipped with a warning."""
    for path in reversed(committed(root)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            warn(f"{e}; falling back to the previous checkpoint")
    return None


def resolve_resume(setting: str, root: Path, warn, option: str = "--checkpoint.resume") -> Path | None:
    """The checkpoint `checkpoint.resume` names: "none", "auto" (newest in `root`, if any) or a path
    (a checkpoint folder, a checkpoints folder or a run directory). Runs on rank 0."""
    if setting == "none":
        return None
    if setting == "auto":
        return newest_valid(root, warn)
    path = Path(setting)
    if not path.exists():
        raise CheckpointError(f"{option} {setting}: no such file or directory")
    if (path / MARKER).is_file():
        verify(path)  # a named checkpoint is loaded as given or not at all
        return path
    for candidate in (path, path / "checkpoints"):
        found = newest_valid(candidate, warn)
        if found is not None:
            return found
    raise CheckpointError(
        f"{option} {setting}: no complete checkpoint there (looked for {PREFIX}*/{MARKER} in {path} and "
        f"{path / 'checkpoints'}); give the run directory of a run that saved one (checkpoint.interval, or "
        "the end of a run), or leave checkpoint.resume at auto to start fresh"
    )


def set_aside(root: Path, after_step: int) -> list[Path]:
    """Move committed checkpoints newer than `after_step` into `root/superseded/` (rank 0): a run
    that resumes from an older checkpoint, or starts afresh, must not find them later with
    resume=auto, nor have keep_last delete its own newer saves first."""
    moved = []
    for path in committed(root):
        step = _step_of(path)
        if step is not None and step > after_step:
            dest = root / "superseded" / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
            moved.append(dest)
    return moved


def remove_abandoned(root: Path) -> list[Path]:
    """Delete `.tmp` folders left by a job killed while saving (rank 0, before training)."""
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(PREFIX) and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


# --- what goes into a checkpoint -----------------------------------------------------------------------


def _is_zero1(opt: torch.optim.Optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(opt, ZeroRedundancyOptimizer)


def _names(model: nn.Module) -> dict[nn.Parameter, str]:
    from linscale.runtime.parallel import unwrap

    return {p: name for name, p in unwrap(model).named_parameters()}


def tensor_state(model: nn.Module, opt: torch.optim.Optimizer, init_optimizer: bool) -> dict[str, Any]:
    """{"model": ..., "optim": {"state": ...}} keyed by parameter name. The values are the live
    tensors (or, for a fresh optimizer with `init_optimizer`, its just-created zero states), so a
    DCP load into this dict restores them in place."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state, get_model_state_dict, get_state_dict

    if _is_zero1(opt):
        inner = opt.optim  # this rank's share of the parameters and their AdamW states
        if init_optimizer:
            _init_optim_state(inner)
        names = _names(model)
        state = {names[p]: dict(s) for p, s in inner.state.items()}
        return {"model": get_model_state_dict(model), "optim": {"state": state}}
    msd, osd = get_state_dict(model, opt)  # initialises a fresh optimizer's states itself
    return {"model": msd, "optim": {"state": osd["state"]}}


def _plain_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The same dict as `tensor_state` for an unsharded model and optimizer, without
    `get_state_dict`'s per-save bookkeeping (it costs more than the copy of a small model)."""
    from linscale.runtime.parallel import unwrap

    names = _names(model)
    state = {names[p]: dict(s) for p, s in opt.state.items()}
    return {"model": unwrap(model).state_dict(), "optim": {"state": state}}


def _keys(state: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in state.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def _host_copy(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: _host_copy(v) for k, v in state.items()}
    return state.detach().clone() if isinstance(state, torch.Tensor) else state


def _all_plain_host_tensors(state: Any) -> bool:
    if isinstance(state, dict):
        return all(_all_plain_host_tensors(v) for v in state.values())
    if isinstance(state, torch.Tensor):
        return state.device.type == "cpu" and (type(state) is torch.Tensor or isinstance(state, nn.Parameter))
    return True


def check_compatible(path: Path, template: dict[str, Any]) -> None:
    """A clear error when the checkpoint was written for another model (keys or shapes differ)."""
    md = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = {k[len("model.") :]: tuple(v.size) for k, v in md.items() if k.startswith("model.") and hasattr(v, "size")}
    want = {k: tuple(v.shape) for k, v in template["model"].items()}
    missing = sorted(set(want) - set(saved))
    extra = sorted(set(saved) - set(want))
    shapes = sorted(k for k in set(want) & set(saved) if want[k] != saved[k])
    if not (missing or extra or shapes):
        return

    def few(keys: list[str], show=lambda k: k) -> str:
        listed = ", ".join(show(k) for k in keys[:6])
        return listed + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")

    parts = []
    if missing:
        parts.append(f"not in the checkpoint: {few(missing)}")
    if extra:
        parts.append(f"only in the checkpoint: {few(extra)}")
    if shapes:
        parts.append(f"different shape: {few(shapes, lambda k: f'{k} {list(saved[k])} (model {list(want[k])})')}")
    raise CheckpointError(
        f"checkpoint {path} was written for a different model; " + "; ".join(parts) + ". Resume with the task "
        "settings of that run (its config.toml), or start a new run directory (--log.dir) or --checkpoint.resume=none"
    )


@contextlib.contextmanager
def _one_process_quiet():
    """DCP warns that it assumes a single process whenever there is no process group: here that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not ldist.active())


def load_model_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Fill a plain model state dict from the checkpoint's model shards, in one process."""
    check_compatible(path, {"model": state})
    _dcp_load({"model": state}, path)


def load(path: Path, model: nn.Module, opt: torch.optim.Optimizer, device, rank: int) -> dict[str, Any]:
    """Load model, optimizer and this rank's RNG states from `path` (a collective); returns the marker."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    meta = read_marker(path)
    template = tensor_state(model, opt, init_optimizer=True)
    check_compatible(path, template)
    md = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    want: dict[str, Any] = dict(template)
    rng_key = f"rank{rank}"
    own_rng = {k: v.clone() for k, v in device.rng_state().items()}
    have_rng = all(f"rng.{rng_key}.{k}" in md for k in own_rng)
    if have_rng:
        want["rng"] = {rng_key: own_rng}
    if not _is_zero1(opt):
        # Optimizer states come back through set_state_dict, which lays them out for this strategy.
        _dcp_load(want, path)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        groups = get_optimizer_state_dict(model, opt)["param_groups"]
        set_state_dict(
            model,
            opt,
            model_state_dict=want["model"],
            optim_state_dict={"state": want["optim"]["state"], "param_groups": groups},
        )
    else:
        _dcp_load(want, path)  # the live tensors: restored in place
    if have_rng:
        device.set_rng_state(own_rng)
    meta["rng_restored"] = have_rng
    return meta


# --- saving --------------------------------------------------------------------------------------------


def _describe_failure(e: BaseException, where: Path) -> str:
    """The cause of a failed save, found in DCP's per-rank failures ((exception, traceback) pairs)."""
    failures = getattr(e, "failures", None) or {}
    excs = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    for exc in [*excs, e]:
        seen = 0
        while exc is not None and seen < 10:  # torch.save's writer hides the OSError in __context__
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return "no space left on the device"
            exc, seen = exc.__cause__ or exc.__context__, seen + 1
    # Another rank's failure arrives pickled, without its cause: judge by what is left.
    try:
        if shutil.disk_usage(where).free < 1 << 20:
            return "no space left on the device"
    except OSError:
        pass
    ranks = ", ".join(map(str, sorted(failures))) if failures else ""
    first = excs[0] if excs else e
    return f"{type(first).__name__}: {first}" + (f" (on rank {ranks})" if ranks else "")


class Checkpointer:
    """Saves checkpoints for the training loop; one per process, called on every rank alike."""

    def __init__(self, root: Path, keep_last: int, async_save: bool, rank: int, device, log) -> None:
        self.root = root
        self.keep_last = keep_last
        self.async_save = async_save and ldist.active()
        self.rank = rank
        self.device = device
        self.log = log  # prints on rank 0
        self.pending: threading.Event | None = None  # set when the save in flight is committed or failed
        self.error: BaseException | None = None
        self.saved: list[int] = []
        self.stall_s = 0.0  # time training waited for saves
        self.group = dist.new_group(backend="gloo") if self.async_save else None
        self._plain_ok: bool | None = None  # whether _plain_state gives tensor_state's keys
        self._writer: ThreadPoolExecutor | None = None

    def save(self, step: int, model: nn.Module, opt: torch.optim.Optimizer, extra: dict[str, Any]) -> None:
        """Checkpoint after `step` optimizer steps. `extra`: JSON-able state for the marker."""
        t0 = time.perf_counter()
        self.wait()  # one save in flight at a time
        target = step_dir(self.root, step)
        tmp = target.with_name(target.name + ".tmp")
        # Every rank's writer creates the folder; a leftover of a killed job was removed at start-up.
        state = self._state(model, opt)
        state["rng"] = {f"rank{self.rank}": self.device.rng_state()}
        meta = {"format": FORMAT, "step": step, **extra}
        started = time.time()
        if self.async_save:
            done = self.pending = threading.Event()
            if _all_plain_host_tensors(state):
                # Host tensors: one clone each is the whole staging, and one long-lived writer
                # thread (DCP's async_save deep-copies generically and starts a thread per save,
                # which costs more than the copy for a small model).
                staged = _host_copy(state)
                if self._writer is None:
                    self._writer = ThreadPoolExecutor(1, thread_name_prefix="linscale-checkpoint")
                fut = self._writer.submit(dcp.save, staged, checkpoint_id=str(tmp), process_group=self.group)
            else:  # device tensors or DTensors: DCP's stager copies them to host memory
                fut = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group)
            fut.add_done_callback(lambda f: self._finish(f, tmp, target, meta, started, done))
        else:
            try:
                with _one_process_quiet():
                    dcp.save(state, checkpoint_id=str(tmp), no_dist=not ldist.active())
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP gathers every rank's failure
                self._failed(step, tmp, e)
            self._commit(tmp, target, meta, started)
            self._raise()
        self.stall_s += time.perf_counter() - t0

    def _state(self, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """What to save; the cheap path for unsharded models once it proved to give the same keys."""
        from linscale.runtime.parallel import is_sharded

        if self._plain_ok is None:
            self._plain_ok = not is_sharded(model) and not _is_zero1(opt)
            if self._plain_ok:  # the first save compares the two (tied weights could name things apart)
                reference = tensor_state(model, opt, init_optimizer=False)
                self._plain_ok = _keys(reference) == _keys(_plain_state(model, opt))
                return reference
        return _plain_state(model, opt) if self._plain_ok else tensor_state(model, opt, init_optimizer=False)

    def _finish(self, fut: Future, tmp: Path, target: Path, meta: dict, started: float, done: threading.Event) -> None:
        """The background thread's end of an asynchronous save: commit it, or record why not."""
        try:
            try:
                fut.result()
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP gathers every rank's failure
                self._failed(meta["step"], tmp, e)
            self._commit(tmp, target, meta, started)
        except Exception as e:  # noqa: BLE001 - raised by wait() on the training thread
            self.error = e
        finally:
            done.set()

    def _failed(self, step: int, tmp: Path, e: BaseException) -> None:
        why = _describe_failure(e, tmp if tmp.exists() else self.root)  # before the partial files go
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = (
            f"the previous checkpoint {step_dir(self.root, self.saved[-1])} is intact"
            if self.saved
            else ("no earlier checkpoint of this run exists")
        )
        fix = "free space there, lower checkpoint.keep_last, or set checkpoint.dir to a larger filesystem"
        raise CheckpointError(f"could not save the checkpoint of step {step} in {self.root}: {why}; {previous}; {fix}")

    def _commit(self, tmp: Path, target: Path, meta: dict, started: float) -> None:
        """Rank 0: checksum the files, write the marker, rename the folder; then apply keep_last."""
        if self.rank != 0:
            self.saved.append(meta["step"])
            return
        try:
            files = sorted(p for p in tmp.iterdir() if p.is_file())
            meta["files"] = {p.name: {"bytes": p.stat().st_size, "crc32": file_crc32(p)} for p in files}
            meta["written_seconds"] = round(time.time() - started, 3)
            atomic_write(tmp / MARKER, (json.dumps(meta, indent=1) + "\n").encode())
            if target.exists():  # a run restarted without resuming saves the same step again
                shutil.rmtree(target)
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            self._failed(meta["step"], tmp, e)
        self.saved.append(meta["step"])
        self.log(f"checkpoint: step {meta['step']} saved in {target}")
        if self.keep_last > 0:
            for old in committed(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def wait(self) -> None:
        """Block until the save in flight, if any, is committed; raise its error."""
        if self.pending is not None:
            t0 = time.perf_counter()
            self.pending.wait()
            self.pending = None
            self.stall_s += time.perf_counter() - t0
        self._raise()

    def close(self) -> None:
        self.wait()
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
