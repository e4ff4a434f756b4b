"""Checkpoint folders on disk: commit markers, verification, choosing the one to resume from, and a
save/load round trip in one process (no process group)."""

import errno
import json
import warnings
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from linscale.runtime.device import Device
from linscale.train import checkpoint as ckpt
from linscale.train.checkpoint import (
    FORMAT,
    MARKER,
    Checkpointer,
    CheckpointError,
    check_compatible,
    committed,
    newest_valid,
    remove_abandoned,
    resolve_resume,
    verify,
)

CPU = Device("cpu", 0, "gloo", "cpu", 1)
FILES = {".metadata": b"index of the shards", "__0_0.distcp": bytes(range(256)) * 8, "__1_0.distcp": b"rank 1" * 50}


def make(root: Path, step: int, files: dict[str, bytes] = FILES, marker: bool = True, name: str = "") -> Path:
    """A checkpoint folder as a save leaves it: the files, then the marker describing them."""
    path = root / (name or f"step_{step:08d}")
    path.mkdir(parents=True)
    for fname, data in files.items():
        (path / fname).write_bytes(data)
    if marker:
        meta = {
            "format": FORMAT,
            "step": step,
            "files": {f: {"bytes": len(d), "crc32": zlib.crc32(d)} for f, d in files.items()},
        }
        (path / MARKER).write_text(json.dumps(meta))
    return path


class Warnings(list):
    def __call__(self, text: str) -> None:
        self.append(text)


# --- committed, verify -----------------------------------------------------------------------------------


def test_committed_lists_only_marked_step_folders_in_step_order(tmp_path):
    assert committed(tmp_path / "missing") == []
    big = make(tmp_path, 100_000_000)  # nine digits: ordered by number, not by name
    three = make(tmp_path, 3)
    twenty = make(tmp_path, 20)
    make(tmp_path, 30, marker=False)  # a save that never committed
    make(tmp_path, 40, name="step_00000040.tmp")  # being written, even with a marker
    make(tmp_path, 50, name="step_latest")
    make(tmp_path, 60, name="other_00000060")
    (tmp_path / "step_00000070").write_text("a file, not a folder")
    assert committed(tmp_path) == [three, twenty, big]


def test_verify_returns_the_marker_of_an_intact_checkpoint(tmp_path):
    path = make(tmp_path, 7)
    (path / "notes.txt").write_text("not part of the checkpoint")  # files outside the marker do not matter
    meta = verify(path)
    assert meta["step"] == 7 and set(meta["files"]) == set(FILES)


def test_verify_finds_missing_truncated_and_altered_files(tmp_path):
    missing = make(tmp_path, 1)
    (missing / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"step_00000001 is missing __1_0\.distcp"):
        verify(missing)

    truncated = make(tmp_path, 2)
    (truncated / "__0_0.distcp").write_bytes(FILES["__0_0.distcp"][:1000])
    with pytest.raises(CheckpointError, match=r"truncated or damaged: __0_0\.distcp has 1000 bytes of 2048"):
        verify(truncated)

    altered = make(tmp_path, 3)
    data = bytearray(FILES["__0_0.distcp"])
    data[1024] ^= 0x01  # one bit, same size
    (altered / "__0_0.distcp").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step_00000003 is damaged: __0_0\.distcp does not match its checksum"):
        verify(altered)


def test_unreadable_or_foreign_markers_are_refused(tmp_path):
    broken = make(tmp_path, 1)
    (broken / MARKER).write_text('{"format": "linscale-check')  # cut short
    with pytest.raises(CheckpointError, match=r"step_00000001 has an unreadable linscale\.json"):
        verify(broken)
    foreign = make(tmp_path, 2)
    (foreign / MARKER).write_text(json.dumps({"format": "someone else's v9", "files": {}}))
    with pytest.raises(CheckpointError, match="is not a linscale-checkpoint v1 checkpoint"):
        verify(foreign)


# --- newest_valid, resolve_resume ------------------------------------------------------------------------


def test_newest_valid_falls_back_past_damaged_checkpoints_with_a_warning(tmp_path):
    warned = Warnings()
    assert newest_valid(tmp_path, warned) is None and warned == []
    first = make(tmp_path, 3)
    second = make(tmp_path, 6)
    newest = make(tmp_path, 9)
    (newest / "__0_0.distcp").write_bytes(b"short")
    (second / "__1_0.distcp").unlink()
    assert newest_valid(tmp_path, warned) == first
    assert len(warned) == 2
    assert "step_00000009 is truncated or damaged" in warned[0] and "falling back" in warned[0]
    assert "step_00000006 is missing __1_0.distcp" in warned[1]
    (first / MARKER).write_text("{}")
    assert newest_valid(tmp_path, Warnings()) is None  # nothing left to resume from


def test_resolve_resume_none_and_auto(tmp_path):
    root = tmp_path / "checkpoints"
    assert resolve_resume("auto", root, Warnings()) is None  # a new run: no folder yet
    make(root, 3)
    newest = make(root, 6)
    assert resolve_resume("none", root, Warnings()) is None
    assert resolve_resume("auto", root, Warnings()) == newest


def test_resolve_resume_accepts_a_checkpoint_a_checkpoints_folder_or_a_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    older = make(run_dir / "checkpoints", 3)
    newest = make(run_dir / "checkpoints", 6)
    elsewhere = tmp_path / "elsewhere"  # the current run's own folder plays no part
    make(elsewhere, 9)
    assert resolve_resume(str(older), elsewhere, Warnings()) == older
    assert resolve_resume(str(run_dir / "checkpoints"), elsewhere, Warnings()) == newest
    assert resolve_resume(str(run_dir), elsewhere, Warnings()) == newest


def test_a_named_damaged_checkpoint_is_refused_not_replaced(tmp_path):
    older = make(tmp_path, 3)
    named = make(tmp_path, 6)
    (named / "__0_0.distcp").write_bytes(b"")
    assert older.exists()
    with pytest.raises(CheckpointError, match=r"step_00000006 is truncated or damaged"):
        resolve_resume(str(named), tmp_path, Warnings())


def test_resolve_resume_explains_a_path_without_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path, Warnings())
    empty = tmp_path / "empty"
    empty.mkdir()
    make(empty / "checkpoints", 3, marker=False)  # an uncommitted save counts for nothing
    with pytest.raises(CheckpointError, match=r"no complete checkpoint there \(looked for step_\*/linscale\.json"):
        resolve_resume(str(empty), tmp_path, Warnings())


def test_remove_abandoned_deletes_only_unfinished_step_folders(tmp_path):
    assert remove_abandoned(tmp_path / "missing") == []
    keep = make(tmp_path, 3)
    gone = [make(tmp_path, 6, name="step_00000006.tmp"), make(tmp_path, 9, marker=False, name="step_00000009.tmp")]
    other = make(tmp_path, 0, name="scratch.tmp")
    (tmp_path / "step_00000012.tmp").write_text("a file")
    assert sorted(remove_abandoned(tmp_path)) == gone
    assert not any(p.exists() for p in gone)
    assert keep.exists() and other.exists() and (tmp_path / "step_00000012.tmp").exists()
    assert committed(tmp_path) == [keep]


# --- check_compatible ------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, width: int = 4, extra: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.out = nn.Linear(width, 2)
        if extra:
            self.head = nn.Linear(2, 2)


def _saved(tmp_path: Path, model: nn.Module) -> Path:
    path = tmp_path / "ckpt"
    with warnings.catch_warnings():  # DCP notes that there is no process group: intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(path), no_dist=True)
    return path


def test_check_compatible_accepts_the_same_model(tmp_path):
    path = _saved(tmp_path, Net())
    check_compatible(path, {"model": Net().state_dict()})


def test_check_compatible_names_differing_shapes_and_keys(tmp_path):
    path = _saved(tmp_path, Net(width=4))
    with pytest.raises(CheckpointError) as info:
        check_compatible(path, {"model": Net(width=8, extra=True).state_dict()})
    msg = str(info.value)
    assert f"checkpoint {path} was written for a different model" in msg
    assert "not in the checkpoint: head.bias, head.weight" in msg
    assert "different shape: inp.bias [4] (model [8]), inp.weight [4, 3] (model [8, 3]), out.weight [2, 4] " in msg
    assert "out.bias" not in msg  # same shape in both
    with pytest.raises(CheckpointError, match="only in the checkpoint: head.bias, head.weight"):
        check_compatible(_saved(tmp_path / "b", Net(extra=True)), {"model": Net().state_dict()})


def test_check_compatible_shortens_long_lists(tmp_path):
    wide = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)])
    path = _saved(tmp_path, wide)
    narrow = nn.Sequential(*[nn.Linear(3, 3) for _ in range(5)])
    with pytest.raises(CheckpointError, match=r"different shape: (\S+ \[[\d, ]+\] \(model \[[\d, ]+\]\), ){5}\S+ "
                       r"\[[\d, ]+\] \(model \[[\d, ]+\]\) and 4 more\."):  # fmt: skip
        check_compatible(path, {"model": narrow.state_dict()})


# --- Checkpointer, in one process ------------------------------------------------------------------------


def _trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        model.out(model.inp(torch.randn(4, 3))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_save_commits_keeps_the_newest_and_loads_everything_back(tmp_path):
    logged = []
    model, opt = _trained(0)
    saver = Checkpointer(tmp_path, keep_last=2, async_save=False, rank=0, device=CPU, log=logged.append)
    for step in (1, 2, 3):
        saver.save(step, model, opt, {"samples_consumed": 8 * step, "scheduler": {"last_epoch": step}})
    saver.close()
    assert saver.saved == [1, 2, 3]
    assert committed(tmp_path) == [tmp_path / "step_00000002", tmp_path / "step_00000003"]  # keep_last=2
    assert not list(tmp_path.glob("*.tmp"))
    assert logged[-1] == f"checkpoint: step 3 saved in {tmp_path / 'step_00000003'}"
    meta = verify(tmp_path / "step_00000003")
    assert meta["samples_consumed"] == 24 and meta["scheduler"] == {"last_epoch": 3}
    assert {".metadata", "__0_0.distcp"} <= set(meta["files"]) and MARKER not in meta["files"]

    rng_at_save = torch.get_rng_state()
    torch.rand(5)  # the generator moves on after the save ...
    fresh, fresh_opt = _trained(1)  # ... and a different model and optimizer are loaded into
    loaded = ckpt.load(tmp_path / "step_00000003", fresh, fresh_opt, CPU, rank=0)
    assert loaded["step"] == 3 and loaded["rng_restored"]
    assert torch.equal(torch.get_rng_state(), rng_at_save)
    for (name, want), got in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key]), key


def test_save_replaces_a_checkpoint_of_the_same_step(tmp_path):
    model, opt = _trained(0)
    saver = Checkpointer(tmp_path, keep_last=0, async_save=False, rank=0, device=CPU, log=lambda _: None)
    saver.save(5, model, opt, {"attempt": 1})
    saver.save(5, model, opt, {"attempt": 2})  # a run restarted without resuming reaches step 5 again
    assert committed(tmp_path) == [tmp_path / "step_00000005"]
    assert verify(tmp_path / "step_00000005")["attempt"] == 2


def test_a_full_disk_is_reported_as_such_and_leaves_no_tmp_folder(tmp_path, monkeypatch):
    from torch.distributed.checkpoint.api import CheckpointException

    def full_disk(state, checkpoint_id, **kwargs):
        # What DCP raises when a shard's write meets a full disk: torch.save's writer fails with a
        # RuntimeError whose context is the OSError, wrapped per rank with its traceback.
        Path(checkpoint_id).mkdir(parents=True, exist_ok=True)
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        try:
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904
        except RuntimeError as e:
            raise CheckpointException("write", {0: (e, None)}) from None

    model, opt = _trained(0)
    saver = Checkpointer(tmp_path, keep_last=0, async_save=False, rank=0, device=CPU, log=lambda _: None)
    saver.save(3, model, opt, {})
    monkeypatch.setattr(ckpt.dcp, "save", full_disk)
    try:
        saver.save(6, model, opt, {})
    except BaseException as e:  # noqa: BLE001 - what escapes is the point of the test
        error = e
    assert isinstance(error, CheckpointError), f"{type(error).__name__} escaped: {error}"
    assert "could not save the checkpoint of step 6" in str(error) and "no space left on the device" in str(error)
    assert f"the previous checkpoint {tmp_path / 'step_00000003'} is intact" in str(error)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]


@pytest.mark.parametrize("flag", [["--resume", "none"], ["--checkpoint.resume=none"]])
def test_train_takes_resume_as_a_flag_or_a_setting(flag):
    import argparse

    from linscale.cli import train as cli_train

    parser = argparse.ArgumentParser()
    cli_train.add_parser(parser.add_subparsers())
    args, rest = parser.parse_known_args(["train", "gpt", *flag])
    _, cfg = cli_train.prepare(args, rest)
    assert cfg.checkpoint.resume == "none"
    args, rest = parser.parse_known_args(["train", "gpt"])
    assert cli_train.prepare(args, rest)[1].checkpoint.resume == "auto"


def test_set_aside_moves_newer_checkpoints_out_of_resume_and_keep_last_reach(tmp_path):
    from linscale.train.checkpoint import set_aside

    for step in (3, 6, 9):
        make(tmp_path, step)
    moved = set_aside(tmp_path, 3)
    assert [p.name.split("-")[0] for p in moved] == ["step_00000006", "step_00000009"]
    assert committed(tmp_path) == [tmp_path / "step_00000003"]
    assert all(p.parent == tmp_path / "superseded" and verify(p) for p in moved)  # kept whole, not deleted
    assert set_aside(tmp_path, -1)[0].name.startswith("step_00000003") and committed(tmp_path) == []
