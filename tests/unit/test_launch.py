"""linscale.runtime.launch: the early port check and the worker-failure message (no spawning)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from linscale.runtime.launch import LaunchError, _failure_message, check_port_free


def test_port_in_use_is_reported():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(LaunchError) as err:
            check_port_free("127.0.0.1", port)
    msg = str(err.value)
    assert f"port {port}" in msg
    assert "127.0.0.1" in msg
    assert "--master-port" in msg


def test_free_port_passes():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check_port_free("127.0.0.1", port)  # closed again: free
    # The check itself must release the port.
    check_port_free("127.0.0.1", port)


def failure(timestamp: float, exitcode: int, pid: int, message) -> SimpleNamespace:
    return SimpleNamespace(timestamp=timestamp, exitcode=exitcode, pid=pid, message=message)


def test_failure_message_names_first_failure():
    err = SimpleNamespace(
        failures={
            1: failure(20.0, -15, 202, "<N/A>"),
            0: failure(10.0, 1, 101, {"message": "Traceback ...\nValueError: bad batch", "extraInfo": {}}),
            2: failure(30.0, -15, 303, "<N/A>"),
        }
    )
    msg = _failure_message(err)
    assert msg.startswith("worker rank 0 (pid 101) failed with exit code 1: ValueError: bad batch")
    assert "2 other worker(s)" in msg


def test_failure_message_signal_and_no_detail():
    err = SimpleNamespace(failures={3: failure(1.0, -9, 42, "<N/A>")})
    msg = _failure_message(err)
    assert msg.startswith("worker rank 3 (pid 42) failed with signal 9;")
    assert "other worker" not in msg


def test_failure_message_without_failures():
    assert _failure_message(RuntimeError("agent died")) == "agent died"


def test_failure_message_skips_ranks_that_lost_their_peer():
    # Rank 1 failed first, but only because rank 0 had died: rank 0 is the cause.
    err = SimpleNamespace(
        failures={
            1: failure(5.0, 1, 202, {"message": "RuntimeError: [gloo] Connection closed by peer [10.0.0.1]:1234"}),
            0: failure(6.0, 1, 101, {"message": "Traceback\nKeyError: 'x'"}),
        }
    )
    msg = _failure_message(err)
    assert msg.startswith("worker rank 0 (pid 101) failed with exit code 1: KeyError: 'x'")
    assert "1 other worker(s)" in msg


def test_failure_message_all_consequences_falls_back_to_earliest():
    err = SimpleNamespace(
        failures={
            2: failure(9.0, 1, 3, {"message": "Broken pipe"}),
            4: failure(2.0, 1, 5, {"message": "Connection reset by peer"}),
        }
    )
    assert _failure_message(err).startswith("worker rank 4 (pid 5)")
