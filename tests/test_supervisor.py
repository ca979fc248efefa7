"""The worker supervisor: restarts with back-off, counts restarts in the status file, stops its child."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from core.launch.supervisor import next_backoff, parse_args

ROOT = Path(__file__).resolve().parents[1]


def supervise(tmp: Path, *flags: str, child: str) -> subprocess.Popen[bytes]:
    status_file = str(tmp / "worker_3.status")
    cmd = [
        sys.executable,
        "-m",
        "core.launch.supervisor",
        "--name",
        "worker_3",
        "--status",
        status_file,
        *flags,
    ]
    return subprocess.Popen([*cmd, "--", sys.executable, "-c", child], cwd=ROOT, stderr=subprocess.PIPE)


def status(tmp: Path) -> dict[str, Any]:
    try:
        return json.loads((tmp / "worker_3.status").read_text())
    except (OSError, ValueError):
        return {}


def wait_for(check: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


@pytest.mark.parametrize(
    ("current", "ran", "expected"),
    [(0.0, 0.1, 0.5), (0.5, 0.1, 1.0), (4.0, 0.1, 8.0), (8.0, 0.1, 10.0), (8.0, 60.0, 0.5)],
)
def test_backoff_doubles_caps_and_resets(current: float, ran: float, expected: float) -> None:
    assert next_backoff(current, ran, initial=0.5, maximum=10.0, stable_after=30.0) == expected


def test_command_goes_after_the_double_dash() -> None:
    args = parse_args(["--index", "2", "--", "python", "worker.py", "--worker-index", "2"])
    assert args.index == 2 and args.command == ["python", "worker.py", "--worker-index", "2"]
    with pytest.raises(SystemExit):
        parse_args(["--index", "2"])  # no command


def test_a_crashing_child_is_restarted_until_the_limit(tmp_path: Path) -> None:
    sup = supervise(tmp_path, "--initial-backoff", "0.05", "--max-restarts", "3", child="raise SystemExit(3)")
    assert sup.wait(30) == 1
    final = status(tmp_path)
    assert (final["restarts"], final["last_exit"], final["state"]) == (3, 3, "gave_up")


def test_a_killed_child_comes_back_and_stop_ends_both(tmp_path: Path) -> None:
    sup = supervise(tmp_path, "--initial-backoff", "0.05", child="import time; time.sleep(60)")
    try:
        first = wait_for(lambda: status(tmp_path).get("pid"))
        os.kill(first, signal.SIGKILL)
        second = wait_for(lambda: (s := status(tmp_path)).get("restarts") == 1 and s.get("pid"))
        assert second != first
        assert status(tmp_path)["last_exit"] == -signal.SIGKILL
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(15) == 0
        assert status(tmp_path)["state"] == "stopped"
        with pytest.raises(ProcessLookupError):
            os.kill(second, 0)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
