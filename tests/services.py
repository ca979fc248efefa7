"""Test support: the real ``worker.py`` and ``gateway.py`` started on loopback with a test config (the job
API, OpenAI-compatible and realtime tests use them)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


#: The worker secret the test gateways and workers share (core/worker_auth.py); a test that calls a worker
#: directly sends ``WORKER_HEADERS``.
WORKER_SECRET = "test-worker-secret-0123456789abcdef"
WORKER_HEADERS = {"X-Worker-Secret": WORKER_SECRET}


async def until(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll ``check`` (bounded, yielding to the loop between tries) until it is truthy."""
    try:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def _spawn(script: str, args: list[str], err: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DUPLEX_WORKER_SECRET": WORKER_SECRET}
    env.pop("DUPLEX_API_KEY", None)
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=err.open("wb"),
    )


def write_config(path: Path, data_dir: Path, log_dir: Path, **service: Any) -> Path:
    """A config file with the given data and log folders, fast health checks and extra service/audio fields."""
    audio = {"max_upload_mb": service.pop("max_upload_mb")} if "max_upload_mb" in service else {}
    body = {
        "service": {"data_dir": str(data_dir), "log_dir": str(log_dir), "health_interval_s": 0.2, **service},
        "audio": audio,
    }
    path.write_text(json.dumps(body))
    return path


def start_worker(port: int, stack: str, config: Path, err: Path) -> subprocess.Popen[bytes]:
    """The real worker on loopback."""
    return _spawn(
        "worker.py",
        ["--worker-index", "0", "--port", str(port), "--stack", stack, "--config", str(config)],
        err,
    )


def start_gateway(port: int, workers: str, config: Path, err: Path) -> subprocess.Popen[bytes]:
    """The real gateway (plain HTTP, loopback)."""
    args = [
        "--http",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        workers,
        "--config",
        str(config),
    ]
    return _spawn("gateway.py", args, err)


@contextlib.contextmanager
def cluster(folder: Path, stack: str = "fake", **service: Any) -> Iterator[tuple[str, str]]:
    """A worker (``stack``) and the real gateway on loopback; yields (gateway URL, worker URL)."""
    from tests.duplex_client import free_port, stop, wait_healthy

    config = write_config(folder / "config.json", folder / "data", folder / "logs", **service)
    worker_port, gateway_port = free_port(), free_port()
    worker = start_worker(worker_port, stack, config, folder / "worker.err")
    gateway = start_gateway(gateway_port, f"127.0.0.1:{worker_port}", config, folder / "gateway.err")
    try:
        worker_url, gateway_url = f"http://127.0.0.1:{worker_port}", f"http://127.0.0.1:{gateway_port}"
        wait_healthy(worker_url, worker, 600)
        wait_healthy(gateway_url, gateway, 60)
        wait_until_served(gateway_url)
        yield gateway_url, worker_url
    finally:
        stop(gateway)
        stop(worker)


def wait_until_served(gateway_url: str, timeout: float = 30.0) -> None:
    """Wait until the gateway's health checks have put a worker in the pool."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(gateway_url + "/health", timeout=2).json()["status"] == "ok":
                return
        time.sleep(0.05)
    raise AssertionError("no worker joined the gateway's pool")
