"""A small process supervisor: run a command, restart it with back-off when it exits, report the count.

    python -m core.launch.supervisor --name worker_0 --status tmp/worker_0.status -- python worker.py ...
    python -m core.launch.supervisor --index 0 [--status-dir tmp] -- python worker.py --worker-index 0

Every exit is unexpected for a server, so the child is restarted whatever its exit code, after a back-off
that doubles from ``--initial-backoff`` up to ``--max-backoff`` and resets once a run lasted
``--stable-after`` seconds. The status file (``--status``, default ``<status-dir>/<name>.status`` with
``<name>`` = ``worker_<index>``; JSON, replaced atomically) holds ``restarts``, ``pid``, ``state`` (running
/ backoff / stopped / gave_up), ``last_exit`` and timestamps; the gateway reads ``restarts`` from
``tmp/worker_N.status``. SIGTERM or SIGINT stops the child (SIGTERM, then SIGKILL after
``--stop-timeout``) and the supervisor. ``--max-restarts N`` gives up after N restarts (0: never).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType


@dataclass
class Status:
    """What the status file says."""

    name: str
    command: list[str]
    state: str = "starting"
    pid: int | None = None
    restarts: int = 0
    last_exit: int | None = None
    started_at: float | None = None
    updated_at: float = field(default_factory=time.time)


def write_status(path: Path, status: Status) -> None:
    """Replace the status file atomically (a reader never sees half a file)."""
    status.updated_at = time.time()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(status)))
    os.replace(tmp, path)


def next_backoff(
    current: float, ran_s: float, *, initial: float, maximum: float, stable_after: float
) -> float:
    """The wait before the next start: reset after a stable run, else double (capped)."""
    if ran_s >= stable_after:
        return initial
    return min(maximum, current * 2) if current > 0 else initial


class Supervisor:
    """Runs one child until told to stop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.name = args.name or f"worker_{args.index}"
        self.path = Path(args.status) if args.status else Path(args.status_dir) / f"{self.name}.status"
        self.status = Status(name=self.name, command=list(args.command))
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False

    def _stop(self, signum: int, _: FrameType | None) -> None:
        self.stopping = True

    def _start(self) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(self.args.command)
        self.status.pid, self.status.state, self.status.started_at = child.pid, "running", time.time()
        write_status(self.path, self.status)
        return child

    def _wait(self, child: subprocess.Popen[bytes]) -> int | None:
        """The child's exit code, or None when we were told to stop first."""
        while not self.stopping:
            try:
                return child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
        return None

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _terminate(self, child: subprocess.Popen[bytes]) -> None:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=self.args.stop_timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def run(self) -> int:
        """Supervise until stopped or out of restarts; returns the exit status."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        backoff = 0.0
        while True:
            started = time.monotonic()
            try:
                child = self._start()
            except OSError as exc:
                print(f"supervisor {self.name}: cannot start {self.args.command[0]}: {exc}", file=sys.stderr)
                code: int | None = 127
            else:
                code = self._wait(child)
                if code is None:
                    self._terminate(child)
            if self.stopping:
                self.status.state, self.status.pid = "stopped", None
                write_status(self.path, self.status)
                return 0
            self.status.last_exit = code
            if self.args.max_restarts and self.status.restarts >= self.args.max_restarts:
                self.status.state, self.status.pid = "gave_up", None
                write_status(self.path, self.status)
                print(
                    f"supervisor {self.name}: giving up after {self.status.restarts} restarts",
                    file=sys.stderr,
                )
                return 1
            backoff = next_backoff(
                backoff,
                time.monotonic() - started,
                initial=self.args.initial_backoff,
                maximum=self.args.max_backoff,
                stable_after=self.args.stable_after,
            )
            self.status.state, self.status.pid = "backoff", None
            write_status(self.path, self.status)
            print(
                f"supervisor {self.name}: exit {code}; restarting in {backoff:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            self._sleep(backoff)
            if self.stopping:
                self.status.state = "stopped"
                write_status(self.path, self.status)
                return 0
            self.status.restarts += 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags before ``--``; the command after it."""
    p = argparse.ArgumentParser(
        prog="python -m core.launch.supervisor", description="Restart a command when it exits."
    )
    p.add_argument("--index", type=int, default=0, help="N in the default name worker_N")
    p.add_argument("--name", default=None, help="label for messages and the default status file name")
    p.add_argument("--status", default=None, help="status file path (default <status-dir>/<name>.status)")
    p.add_argument("--status-dir", default="tmp")
    p.add_argument("--initial-backoff", type=float, default=1.0)
    p.add_argument("--max-backoff", type=float, default=30.0)
    p.add_argument("--stable-after", type=float, default=60.0, help="a run this long resets the back-off")
    p.add_argument("--max-restarts", type=int, default=0, help="give up after this many restarts (0: never)")
    p.add_argument("--stop-timeout", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        p.error("no command given (put it after --)")
    return args


if __name__ == "__main__":
    raise SystemExit(Supervisor(parse_args(sys.argv[1:])).run())
