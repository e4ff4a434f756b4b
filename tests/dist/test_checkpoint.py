"""Checkpoints and fault tolerance end to end: kills, restarts, damaged files, a full disk, divergence.

Most tests compare with one uninterrupted 2-process run (`reference`), which keeps every
checkpoint (steps 3, 6, 9 and 12), and reuse copies of its run directory where a test needs
checkpoints to start from. The GPT runs read a small corpus (the standard library's email
package) so that starting a process stays cheap, and independent runs are started side by side.
"""

import os
import shutil
import subprocess
import sysconfig
import zlib
from pathlib import Path

import pytest
import torch

from linscale.train.checkpoint import CheckpointError, committed, verify

from .conftest import TINY_GPT, Started

pytestmark = pytest.mark.dist

KILL = "LINSCALE_TEST_KILL_AT_STEP"
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "email"
GPT = [
    "train", "gpt", *TINY_GPT, f"--task.corpus_dir={CORPUS}", "--train.global_batch=8", "--train.max_steps=12",
    "--train.log_every=1", "--train.eval_every=0", "--checkpoint.interval=3", "--checkpoint.keep_last=0",
    "--log.save_model=true",
]  # fmt: skip


def _name(step: int) -> str:
    return f"step_{step:08d}"


def _side_by_side(tmp: Path, runs: dict[str, tuple[tuple[str, ...], dict | None]]) -> dict:
    """Run several `linscale ARGS` at once, each in tmp/NAME, to the end (for module-scoped fixtures,
    which cannot use the `linscale` fixtures): {name: (args, env)} -> {name: Run}."""
    started = {name: Started(args, tmp, tmp / name, env, None, 240) for name, (args, env) in runs.items()}
    try:
        return {name: s.finish() for name, s in started.items()}
    finally:
        for s in started.values():
            s.kill()


def _model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt")


def _assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def _flat(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def _checkpoint_tensors(path: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds (model, optimizer states, each rank's RNG state), by name."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{path.parent.parent.name}-{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    return _flat(torch.load(out))


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under `root`: size, modification time and checksum."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, zlib.crc32(p.read_bytes()))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _copy_run(src: Path, dst: Path, keep_until: int | None = None) -> Path:
    """A copy of a run directory; with `keep_until`, as if the run had stopped after that step's checkpoint."""
    shutil.copytree(src, dst)
    if keep_until is not None:
        for ckpt in committed(dst / "checkpoints"):
            if int(ckpt.name.removeprefix("step_")) > keep_until:
                shutil.rmtree(ckpt)
        (dst / "model.pt").unlink()
        (dst / "summary.json").unlink()
    return dst


def _logged_steps(run) -> list[int]:
    return [m["step"] for m in run.metrics() if "train_loss" in m]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Three 2-process runs side by side: the uninterrupted reference, one saving asynchronously (and
    keeping 2 checkpoints), and one whose rank 1 is killed at step 7 and restarted by the launcher."""
    tmp = tmp_path_factory.mktemp("two_process_runs")
    args = (*GPT, "--nproc-per-node=2")
    keep_all = tuple(a for a in args if not a.startswith("--checkpoint.keep_last="))
    return _side_by_side(
        tmp,
        {
            "reference": (args, None),
            "async": ((*keep_all, "--checkpoint.async_save=true", "--checkpoint.keep_last=2"), None),
            "restarted": ((*args, "--max-restarts=1"), {KILL: "1:7"}),
        },
    )


@pytest.fixture(scope="module")
def reference(two_process_runs):
    """The uninterrupted 2-process run every resumed 2-process run must reproduce bit for bit."""
    run = two_process_runs["reference"]
    assert run.returncode == 0, run.output
    assert [p.name for p in committed(run.run_dir / "checkpoints")] == [_name(s) for s in (3, 6, 9, 12)]
    assert _logged_steps(run) == list(range(1, 13))
    # The loss must move, or equal trajectories after a resume would prove little.
    assert run.losses()[-1] < run.losses()[0] - 0.3
    return run


# --- killed and resumed -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nproc", "strategy", "kill"), [(1, "ddp", "5"), (2, "zero3", "1:8")], ids=["1proc", "2proc-zero3-rank1"]
)
def test_killed_run_resumes_bit_identical(linscale_bg, tmp_path, nproc, strategy, kill):
    args = [*GPT, f"--nproc-per-node={nproc}", f"--parallel.strategy={strategy}"]
    # The uninterrupted run and the one to be killed run side by side.
    ref_bg = linscale_bg(*args, run_dir=tmp_path / "ref")
    killed_bg = linscale_bg(*args, run_dir=tmp_path / "run", env={KILL: kill})
    ref, killed = ref_bg.finish(), killed_bg.finish()
    assert ref.returncode == 0, ref.output
    assert killed.returncode != 0, killed.output
    at = int(kill.split(":")[-1]) // 3 * 3  # the newest checkpoint before the kill
    ckpts = killed.run_dir / "checkpoints"
    assert [p.name for p in committed(ckpts)] == [_name(s) for s in range(3, at + 1, 3)]
    assert verify(ckpts / _name(at))["step"] == at
    assert not (killed.run_dir / "model.pt").exists()

    resumed = linscale_bg(*args, run_dir=killed.run_dir).finish()  # checkpoint.resume=auto, the default
    assert resumed.returncode == 0, resumed.output
    assert f"resumed from {ckpts / _name(at)} (step {at}," in resumed.output
    summary = resumed.summary()
    assert summary["resumed_from_step"] == at and summary["global_step"] == 12
    assert summary["train_steps"] == 12 - at
    # The killed run's metrics after its checkpoint were dropped and logged again, once.
    assert _logged_steps(resumed) == list(range(1, 13))
    assert resumed.losses() == ref.losses()
    _assert_identical(_model(resumed.run_dir), _model(ref.run_dir))


def test_max_restarts_recovers_a_killed_worker(two_process_runs, reference):
    run = two_process_runs["restarted"]
    assert run.returncode == 0, run.output
    assert "restart 1 of 1" in run.output
    # Rank 1 finished step 7, which needed rank 0 past the commit of step 6.
    assert f"resumed from {run.run_dir / 'checkpoints' / _name(6)} (step 6," in run.output
    assert run.summary()["resumed_from_step"] == 6
    _assert_identical(_model(run.run_dir), _model(reference.run_dir))


def test_resume_with_another_world_size_and_strategy_follows_the_reference(linscale, linscale_bg, tmp_path, reference):
    # A ZeRO-1 run loses rank 0; one process (DDP) and four (ZeRO-1, the optimizer states resharded)
    # continue from its checkpoint. ZeRO-1 trains like DDP, so the reference applies throughout.
    killed = linscale(*GPT, "--nproc-per-node=2", "--parallel.strategy=zero1", env={KILL: "0:7"})
    assert killed.returncode != 0, killed.output
    assert [p.name for p in committed(killed.run_dir / "checkpoints")] == [_name(3), _name(6)]
    assert verify(killed.run_dir / "checkpoints" / _name(6))["strategy"] == "zero1"
    started = {
        (n, strategy): linscale_bg(
            *GPT,
            f"--nproc-per-node={n}",
            f"--parallel.strategy={strategy}",
            run_dir=_copy_run(killed.run_dir, tmp_path / f"world{n}"),
        )
        for n, strategy in ((1, "ddp"), (4, "zero1"))
    }
    runs = {n: s.finish() for (n, _), s in started.items()}
    want = _model(reference.run_dir)
    for n, run in runs.items():
        assert run.returncode == 0, run.output
        summary = run.summary()
        assert summary["resumed_from_step"] == 6 and summary["world_size"] == n
        assert "written by 2 process(es)" in run.output
        assert _logged_steps(run) == list(range(1, 13))
        # Up to the checkpoint these are the killed run's losses; after it, the same samples per step.
        torch.testing.assert_close(run.losses(), reference.losses(), rtol=1e-5, atol=0)
        got = _model(run.run_dir)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # The smaller world keeps the checkpoint's micro-batch and accumulates instead.
    assert runs[1].summary()["batch"] == "8 = 4 x 2 x 1"
    assert runs[4].summary()["batch"] == "8 = 2 x 1 x 4"


def _recorded(out: Path, world: int, first_step: int, steps: int, accum: int) -> dict[int, list[int]]:
    """Sample indices per optimizer step from the Recorder's files (one line per micro-batch, per rank)."""
    per_step: dict[int, list[int]] = {}
    for rank in range(world):
        lines = (out / f"rank{rank}.txt").read_text().splitlines()
        assert len(lines) >= steps * accum, f"rank {rank} recorded {len(lines)} micro-batches"
        for j, line in enumerate(lines[: steps * accum]):
            per_step.setdefault(first_step + j // accum, []).extend(int(v) for v in line.split())
    return {s: sorted(v) for s, v in per_step.items()}


def test_resumed_run_reads_every_sample_once_per_epoch(linscale_bg, tmp_path):
    # 64 samples, global batch 8: steps 0-7 are epoch 0, steps 8-11 half of epoch 1.
    args = ["train", "tests/dist/tasks.py:Recorder", "--train.global_batch=8", "--train.micro_batch=2",
            "--train.max_steps=12", "--checkpoint.interval=3", "--log.progress=false"]  # fmt: skip
    outs = {name: tmp_path / f"out-{name}" for name in ("ref", "killed", "world1", "world4")}
    for out in outs.values():
        out.mkdir()
    # Rank 0 dies on reaching step 3, after committing the step-3 checkpoint: it recorded exactly
    # steps 0-2. Rank 1 may have read step 3's samples before it was stopped; they are ignored.
    ref_bg = linscale_bg(*args, "--nproc-per-node=2", env={"LINSCALE_TEST_OUT": str(outs["ref"])})
    killed_bg = linscale_bg(*args, "--nproc-per-node=2", env={"LINSCALE_TEST_OUT": str(outs["killed"]), KILL: "0:3"})
    ref, killed = ref_bg.finish(), killed_bg.finish()
    assert ref.returncode == 0, ref.output
    assert killed.returncode != 0, killed.output
    assert len((outs["killed"] / "rank0.txt").read_text().splitlines()) == 3 * 2
    started = {
        n: linscale_bg(
            *args,
            f"--nproc-per-node={n}",
            env={"LINSCALE_TEST_OUT": str(outs[f"world{n}"])},
            run_dir=_copy_run(killed.run_dir, tmp_path / f"world{n}"),
        )
        for n in (1, 4)
    }
    want = _recorded(outs["ref"], 2, 0, 12, accum=2)
    epoch0 = [i for s in range(8) for i in want[s]]
    assert sorted(epoch0) == list(range(64))
    epoch1 = [i for s in range(8, 12) for i in want[s]]
    assert len(set(epoch1)) == len(epoch1) == 32
    before = _recorded(outs["killed"], 2, 0, 3, accum=2)
    for n, s in started.items():
        run = s.finish()
        assert run.returncode == 0, run.output
        assert run.summary()["resumed_from_step"] == 3
        assert "(step 3, 24 samples consumed" in run.output
        after = _recorded(outs[f"world{n}"], n, 3, 9, accum=8 // (2 * n))
        for rank in range(n):  # nothing read beyond the last step
            assert len((outs[f"world{n}"] / f"rank{rank}.txt").read_text().splitlines()) == 9 * 8 // (2 * n)
        assert {**before, **after} == want, f"{n} process(es) after the resume read other samples"


# --- damaged, foreign and missing checkpoints ---------------------------------------------------------


def test_damaged_and_incomplete_checkpoints_are_skipped(linscale_bg, tmp_path, reference):
    run_dir = _copy_run(reference.run_dir, tmp_path / "run", keep_until=12)
    ckpts = run_dir / "checkpoints"
    # The newest checkpoint is truncated, the one before has a flipped byte (its size unchanged).
    with open(ckpts / _name(12) / "__0_0.distcp", "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) // 2)
    flipped = ckpts / _name(9) / "__1_0.distcp"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    # A complete copy of a checkpoint left without its marker by a killed save, at a newer step.
    abandoned = ckpts / (_name(11) + ".tmp")
    shutil.copytree(ckpts / _name(9), abandoned)
    (abandoned / "linscale.json").unlink()

    run = linscale_bg(*GPT, "--nproc-per-node=2", run_dir=run_dir).finish()
    assert run.returncode == 0, run.output
    out = run.output
    assert f"removed 1 incomplete checkpoint(s) of a stopped save: {abandoned.name}" in out
    assert not abandoned.exists() and not list(ckpts.glob("*.tmp"))
    assert f"warning: checkpoint {ckpts / _name(12)} is truncated or damaged: __0_0.distcp has" in out
    assert f"warning: checkpoint {ckpts / _name(9)} is damaged: __1_0.distcp does not match its checksum" in out
    assert run.summary()["resumed_from_step"] == 6
    assert f"resumed from {ckpts / _name(6)} (step 6," in out
    _assert_identical(_model(run_dir), _model(reference.run_dir))
    for step in (9, 12):  # saved again, whole
        assert verify(ckpts / _name(step))["step"] == step


@pytest.fixture(scope="module")
def refused(reference, tmp_path_factory):
    """Two resumes that must be refused, run side by side: another model's run directory, and a
    folder without checkpoints."""
    tmp = tmp_path_factory.mktemp("refused")
    other = _copy_run(reference.run_dir, tmp / "other", keep_until=12)
    empty = tmp / "empty"
    empty.mkdir()
    before = _snapshot(other / "checkpoints")
    config_before = (other / "config.toml").read_text()
    args = [a for a in GPT if not a.startswith("--task.d_model=")]
    runs = _side_by_side(
        tmp,
        {
            "other": ((*args, "--task.d_model=32", "--nproc-per-node=1"), None),
            "fresh": ((*GPT, "--nproc-per-node=1", f"--checkpoint.resume={empty}"), None),
        },
    )
    model_run, empty_run = runs["other"], runs["fresh"]
    return {
        "model": model_run,
        "empty": empty_run,
        "empty_dir": empty,
        "before": before,
        "after": _snapshot(other / "checkpoints"),
        "config_before": config_before,
    }


def test_resume_of_another_models_run_is_refused(refused):
    run = refused["model"]
    assert run.returncode != 0, run.output
    out = run.output
    assert f"checkpoint {run.run_dir / 'checkpoints' / _name(12)} was written for a different model" in out
    # A differing key with the checkpoint's shape and the model's.
    assert "different shape: " in out and "blocks.0.attn.proj.weight [64, 64] (model [32, 32])" in out
    assert "Traceback" not in out
    assert refused["after"] == refused["before"], "the refused resume changed the checkpoint folder"


def test_resume_from_a_folder_without_checkpoints_is_refused(refused):
    run = refused["empty"]
    assert run.returncode != 0, run.output
    assert f"{refused['empty_dir']}: no complete checkpoint there" in run.output
    assert "Traceback" not in run.output
    assert not (run.run_dir / "checkpoints").exists()


def test_refused_resume_keeps_the_runs_config(refused):
    assert (refused["model"].run_dir / "config.toml").read_text() == refused["config_before"]


def test_refusals_name_options_that_exist(refused):
    for run in (refused["model"], refused["empty"]):
        assert "--resume " not in run.output.replace("--checkpoint.resume", ""), run.output


# --- a full disk --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def disk_full(reference, tmp_path_factory):
    """2-process runs, one saving synchronously and one asynchronously, side by side, whose checkpoint
    folders (small tmpfs mounts) hold the step-3 checkpoint but not step 6's as well."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    size = sum(p.stat().st_size for p in (reference.run_dir / "checkpoints" / _name(3)).iterdir())
    tmp = tmp_path_factory.mktemp("disk_full")
    mounts = {mode: tmp / f"mnt-{mode}" for mode in ("sync", "async")}
    mounted = []
    args = [a for a in GPT if not a.startswith("--train.max_steps=")]
    try:
        for mnt in mounts.values():
            mnt.mkdir()
            # Room for one checkpoint and a half.
            cmd = ["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2 // 1024}k", "tmpfs", str(mnt)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
            mounted.append(mnt)
        common = (*args, "--train.max_steps=6", "--nproc-per-node=2")
        runs = _side_by_side(
            tmp,
            {
                mode: ((*common, f"--checkpoint.dir={mnt}", f"--checkpoint.async_save={mode == 'async'}"), None)
                for mode, mnt in mounts.items()
            },
        )
        results = {}
        for mode, mnt in mounts.items():
            try:
                intact: dict | Exception = verify(mnt / _name(3))
            except CheckpointError as e:
                intact = e
            left = sorted(p.name for p in mnt.iterdir())
            results[mode] = {"run": runs[mode], "mnt": mnt, "intact": intact, "left": left}
        yield results
    finally:
        for mnt in mounted:
            subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_full_disk_keeps_the_previous_checkpoint(disk_full, mode):
    got = disk_full[mode]
    if mode == "sync":
        assert got["run"].returncode != 0, got["run"].output
    assert "checkpoint: step 3 saved" in got["run"].output
    assert isinstance(got["intact"], dict) and got["intact"]["step"] == 3, got["intact"]
    assert [p.name for p in committed(got["mnt"])] == [_name(3)]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_full_disk_stops_the_run_saying_so(disk_full, mode):
    got = disk_full[mode]
    run = got["run"]
    assert run.returncode != 0, run.output  # async: the failed save of the last step must not pass unnoticed
    out = run.output
    assert "could not save the checkpoint of step 6" in out and "no space left" in out
    assert f"the previous checkpoint {got['mnt'] / _name(3)} is intact" in out
    assert got["left"] == [_name(3)], "a .tmp folder was left behind"


# --- asynchronous saves ------------------------------------------------------------------------------


def test_async_save_writes_the_same_checkpoints(two_process_runs, tmp_path, reference):
    run = two_process_runs["async"]
    assert run.returncode == 0, run.output
    summary = run.summary()
    assert summary["checkpoints_saved"] == 4
    assert summary["checkpoint_last"] == str(run.run_dir / "checkpoints" / _name(12))
    _assert_identical(_model(run.run_dir), _model(reference.run_dir))
    ckpts = run.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [_name(9), _name(12)]  # keep_last, and no .tmp
    for step in (9, 12):
        got, want = verify(ckpts / _name(step)), verify(reference.run_dir / "checkpoints" / _name(step))
        for key in ("step", "samples_consumed", "scheduler", "world_size", "global_batch"):
            assert got[key] == want[key], key
        _assert_identical(
            _checkpoint_tensors(ckpts / _name(step), tmp_path),
            _checkpoint_tensors(reference.run_dir / "checkpoints" / _name(step), tmp_path),
        )


# --- non-finite losses and spikes --------------------------------------------------------------------

FAULTY = [
    "train", "tests/dist/fault_tasks.py:Faulty", "--nproc-per-node=2", "--train.global_batch=64",
    "--train.max_steps=12", "--train.log_every=1", "--runtime.precision=fp32", "--log.progress=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """Two runs side by side. "skips": rank 1's loss is NaN at steps 4 and 5, every rank's is 10x at
    step 9. "diverges": rank 1's loss is NaN from step 4 on; 3 such steps in a row stop the run."""
    tmp = tmp_path_factory.mktemp("faults")
    return _side_by_side(
        tmp,
        {
            "skips": ((*FAULTY, "--task.nan_steps=4,5", "--task.spike_step=9", "--log.save_model=true"), None),
            "diverges": ((*FAULTY, "--task.nan_from=4", "--train.max_nonfinite=3", "--checkpoint.interval=3"), None),
        },
    )


def test_nonfinite_steps_are_skipped(faults):
    faulty = faults["skips"]
    assert faulty.returncode == 0, faulty.output
    for step in (4, 5):
        assert f"step {step}: the loss or a gradient is NaN/Inf: step skipped" in faulty.output
    assert faulty.summary()["nonfinite_skipped_steps"] == 2
    model = _model(faulty.run_dir)
    assert all(torch.isfinite(t).all() for t in model.values())
    assert all(v == v for v in faulty.losses()[5:]), "a NaN reached the parameters"


def test_loss_spike_is_reported(faults):
    faulty = faults["skips"]
    assert faulty.returncode == 0, faulty.output
    assert "step 9: loss spike:" in faulty.output
    assert faulty.summary()["loss_spikes"] == 1


def test_divergence_stops_the_run_naming_the_intact_checkpoint(faults):
    run = faults["diverges"]
    assert run.returncode != 0, run.output
    assert "training diverged: 3 steps in a row up to step 6" in run.output
    assert "the newest checkpoint, step 3, is intact" in run.output
    ckpts = run.run_dir / "checkpoints"
    assert [p.name for p in committed(ckpts)] == [_name(3)]
    assert verify(ckpts / _name(3))["step"] == 3
    assert not list(ckpts.glob("*.tmp"))
