"""Test support: the job API, OpenAI-compatible routes and ``/v1/realtime`` on the gateway and worker apps.

Until ``core/server/gateway_app.py`` and ``core/server/worker_app.py`` mount these routes themselves,
:func:`mount_gateway` / :func:`mount_worker` add them to an app built by the real ``create_app``, and
:func:`start_gateway` / :func:`start_worker` run the real ``gateway.py`` / ``worker.py`` entry points
with ``create_app`` wrapped accordingly. Once the apps mount the routes, both functions do nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def mount_gateway(app: Any) -> Any:
    """Add the job, OpenAI and realtime routes (before the static catch-all) and start/stop the job service."""
    from core.server.jobs_api import JobService
    from core.server.openai_api import openai_routes
    from core.server.realtime_bridge import realtime_route

    router = app.http_app.router
    if any(getattr(r, "path", None) == "/api/v1/asr/submit" for r in router.routes):
        return app
    state = app.state
    jobs = JobService(state)
    router.routes[:0] = [*jobs.routes(), *openai_routes(state), realtime_route(state)]
    inner = router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(asgi_app: Any) -> AsyncIterator[None]:
        async with inner(asgi_app):
            await jobs.start()
            try:
                yield
            finally:
                await jobs.stop()

    router.lifespan_context = lifespan
    app.jobs = jobs
    return app


def mount_worker(app: Any) -> Any:
    """Add ``/v1/speech``, ``/v1/text_chat`` and ``/v1/realtime`` to a worker app."""
    from core.server.realtime_worker import realtime_router
    from core.server.speech_routes import speech_router

    if any(getattr(r, "path", None) == "/v1/speech" for r in app.router.routes):
        return app
    app.include_router(speech_router())
    app.include_router(realtime_router())
    return app


def gateway_main(argv: list[str]) -> int:
    """``gateway.py`` with the routes mounted."""
    import core.server.gateway_app as gateway_app
    import gateway

    create = gateway_app.create_app
    gateway_app.create_app = lambda *a, **k: mount_gateway(create(*a, **k))  # type: ignore[assignment]
    return gateway.main(argv)


def worker_main(argv: list[str]) -> int:
    """``worker.py`` (serving mode) with the routes mounted."""
    import core.server.worker_app as worker_app
    from core.server.worker_cli import main

    create = worker_app.create_app
    worker_app.create_app = lambda *a, **k: mount_worker(create(*a, **k))  # type: ignore[assignment]
    return main(argv)


def _spawn(entry: str, args: list[str], err: Path) -> subprocess.Popen[bytes]:
    code = f"import sys; from tests.mounting import {entry}; sys.exit({entry}(sys.argv[1:]))"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DUPLEX_API_KEY", None)
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
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
    """A worker on loopback with the routes mounted."""
    return _spawn(
        "worker_main",
        ["--worker-index", "0", "--port", str(port), "--stack", stack, "--config", str(config)],
        err,
    )


def start_gateway(port: int, workers: str, config: Path, err: Path) -> subprocess.Popen[bytes]:
    """The real gateway (plain HTTP, loopback) with the routes mounted."""
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
    return _spawn("gateway_main", args, err)


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
