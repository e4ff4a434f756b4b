"""Each bad input ends with one clear message naming the fix, a non-zero exit and no stray process."""

import socket

import pytest

from .conftest import TINY_GPT

pytestmark = pytest.mark.dist


def _one_error(run, *needles: str) -> str:
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("linscale: error:")]
    assert len(errors) == 1, run.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize(
    ("task", "needles"),
    [
        ("no/such/file.py:MyTask", ("not found", "no/such/file.py")),
        ("just_a_word", ("unknown task", "path/to/my_task.py:MyTask")),
        ("tests/dist/tasks.py:", ("malformed task",)),
        ("tests/dist/tasks.py:Missing", ("no class 'Missing'", "Recorder")),
        ("no_such_module_xyz:Task", ("cannot import module",)),
    ],
)
def test_missing_or_malformed_task(linscale, task, needles):
    _one_error(linscale("train", task, "--train.max_steps=1"), *needles)


def test_unknown_config_key_suggests_the_right_one(linscale, tmp_path):
    _one_error(linscale("train", "gpt", "--train.max_step=5"), "max_step", "did you mean 'max_steps'")
    cfg = tmp_path / "run.toml"
    cfg.write_text("[optim]\nlearning_rate = 0.1\n")
    _one_error(linscale("train", "gpt", "--config", str(cfg)), "learning_rate", "[optim]")


def test_batch_that_does_not_divide_proposes_valid_values(linscale):
    err = _one_error(
        linscale("train", "gpt", "--nproc-per-node=2", "--train.global_batch=7"),
        "global_batch=7",
        "--train.global_batch=6",
        "--train.global_batch=8",
    )
    assert "2 replicas" in err
    _one_error(
        linscale("train", "gpt", "--nproc-per-node=2", "--train.global_batch=8", "--train.micro_batch=3"),
        "micro_batch=3",
        "--train.micro_batch=2",
    )


def test_port_in_use(linscale):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        _one_error(
            linscale("train", "gpt", *TINY_GPT, "--nproc-per-node=2", f"--master-port={port}", "--train.max_steps=2"),
            f"port {port}",
            "--master-port",
        )


def test_worker_crash_ends_the_job_with_the_cause(linscale, tmp_path):
    run = linscale(
        "train",
        "tests/dist/tasks.py:Recorder",
        "--nproc-per-node=2",
        "--train.global_batch=8",
        "--train.max_steps=20",
        "--task.crash_rank=1",
        "--log.progress=false",
        env={"LINSCALE_TEST_OUT": str(tmp_path)},
        timeout=120,
    )
    _one_error(run, "worker rank 1", "deliberate failure in the test task")
    assert "Traceback" in run.stderr  # the failing rank's own traceback is shown above the summary line
