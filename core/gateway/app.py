"""The gateway app: one process, no torch (docs/ARCHITECTURE.md). Queue with ETA, routing, health, TLS, demo,
metrics.

Routes: ``GET /health`` (open), ``GET /metrics`` (Prometheus text), ``GET /api/queue``,
``GET|PUT /api/config/eta``, ``POST /v1/chat`` and ``POST /v1/transcribe`` (queued as ``chat`` and
``transcribe``, proxied to the worker: core/gateway/http_proxy.py), ``WS /ws/duplex`` and
``WS /v1/realtime`` (queued as ``audio_duplex``, then bridged to the worker frame for frame: one session,
core/gateway/session.py, in two dialects: core/gateway/duplex.py, core/api/realtime.py), the jobs and
OpenAI-compatible routes (core/api/), and the static demo at ``/``. A full queue answers the HTTP
endpoints with 503 and ``Retry-After``.

Worker restarts (in /health, /api/queue, /metrics) come from the worker's /health field ``restarts`` when
it has one, else from the supervisor's status file ``<log_dir>/worker_N.status`` (JSON with ``restarts``),
N being the ``worker_index`` the worker reports, or its position in ``--workers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import mimetypes
import resource
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from core import worker_auth
from core.api.jobs import JobService
from core.api.openai_compat import openai_routes
from core.api.realtime import REALTIME
from core.config import Config
from core.gateway.auth import ApiKeyMiddleware, resolve_api_key
from core.gateway.duplex import DUPLEX
from core.gateway.http_proxy import error_response, proxy_request
from core.gateway.metrics import GatewayMetrics
from core.gateway.queue_updates import ServerSendTap
from core.gateway.session import session_route
from core.gateway.state import GatewayState
from core.gateway.voices import voice_routes
from core.protocol import ErrorCode, parse_json
from core.scheduling.eta import DurationModel, EtaSettings, EtaSettingsError
from core.scheduling.pool import Pool, Worker
from core.web import BodyLimit, body_limit

log = logging.getLogger("gateway")

ROOT = Path(__file__).resolve().parents[2]
#: Per-session frame cap for the client side (Opus frames are tiny; JSON events are capped at 64 KiB).
CLIENT_WS_MAX_SIZE = 1 << 20


class GatewayError(ValueError):
    """Bad gateway arguments (a worker address, a port)."""


# --------------------------------------------------------------------------- arguments


def parse_workers(spec: str | list[str] | None, config: Config) -> list[str]:
    """``"localhost:22400,localhost:22401"`` -> ``["127.0.0.1:22400", "127.0.0.1:22401"]``.

    A bare port means ``service.worker_host``; no spec means one worker at ``worker_host:worker_base_port``.
    ``localhost`` becomes 127.0.0.1 because workers listen there and a failed ::1 try costs every connect.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec or [])
    items = [i.strip() for i in items if i.strip()]
    if not items:
        items = [f"{config.service.worker_host}:{config.service.worker_base_port}"]
    out = []
    for item in items:
        host, sep, port_text = item.rpartition(":")
        host = host if sep else config.service.worker_host
        host = "127.0.0.1" if host in ("", "localhost") else host
        try:
            port = int(port_text)
        except ValueError:
            raise GatewayError(f"--workers: {item!r} is not HOST:PORT") from None
        if not 0 < port < 65536:
            raise GatewayError(f"--workers: port {port} out of range in {item!r}")
        address = f"{host}:{port}"
        if address in out:
            raise GatewayError(f"--workers: {address} listed twice")
        out.append(address)
    return out


# --------------------------------------------------------------------------- health


def _status_file_restarts(state: GatewayState, worker: Worker) -> int | None:
    index = state.worker_index.get(worker.index, worker.index)
    path = Path(state.config.service.log_dir) / f"worker_{index}.status"
    try:
        restarts = json.loads(path.read_text()).get("restarts")
    except (OSError, ValueError, AttributeError):
        return None
    return restarts if isinstance(restarts, int) and not isinstance(restarts, bool) else None


async def check_worker(state: GatewayState, worker: Worker) -> None:
    """One health check: refused -> out at once; other failures count; a good answer (re)joins."""
    assert state.http is not None
    timeout = min(2.0, max(0.2, state.config.service.health_interval_s))
    try:
        response = await state.http.get(state.worker_url(worker.address, "/health"), timeout=timeout)
        body = response.json()
    except httpx.ConnectError as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate verify failed" in str(exc):
            reason = "TLS: the worker's certificate is not trusted (set service.worker_ca_file)"
            if worker.last_error != reason:
                log.warning("worker %s: %s", worker.address, reason)
            state.pool.mark_down(worker, reason)
        else:
            state.pool.mark_down(worker, f"connection refused ({exc.__class__.__name__})")
        return
    except (httpx.HTTPError, ValueError) as exc:
        state.pool.note_health_failure(worker, f"health check failed: {exc.__class__.__name__}")
        return
    status = body.get("status") if isinstance(body, dict) else None
    if not isinstance(status, str) or response.status_code not in (200, 503):
        state.pool.note_health_failure(worker, f"odd /health answer (HTTP {response.status_code})")
        return
    if isinstance(body.get("worker_index"), int):
        state.worker_index[worker.index] = body["worker_index"]
    restarts = body.get("restarts")
    if not isinstance(restarts, int) or isinstance(restarts, bool):
        restarts = _status_file_restarts(state, worker)
    state.pool.mark_health(worker, status, restarts)
    state.metrics.observe_worker_counters(worker.index, body.get("counters"))


async def _health_loop(state: GatewayState) -> None:
    interval = state.config.service.health_interval_s
    while True:
        try:
            await asyncio.gather(*(check_worker(state, w) for w in state.pool.workers))
        except Exception:  # the loop must outlive any surprise
            log.exception("health check round failed")
        await asyncio.sleep(interval)


async def _tick_loop(state: GatewayState) -> None:
    period = min(0.25, state.config.service.queue_update_interval_s / 4)
    while True:
        await asyncio.sleep(period)
        try:
            state.pool.tick(slack_s=2 * period)  # due a little early: the client sees one every < 3 s
        except Exception:
            log.exception("queue tick failed")


# --------------------------------------------------------------------------- ETA config


class EtaUpdate(BaseModel):
    """Body of ``PUT /api/config/eta``: any subset; ``reset`` forgets the learned averages."""

    # strict: an operator's typo ("yes" for a flag, true for a count) is refused, not read as something else
    model_config = ConfigDict(extra="forbid", strict=True)
    baselines_s: dict[str, float] | None = None
    ema_alpha: float | None = None
    ema_min_samples: int | None = None
    reset: bool = False


def apply_eta_update(durations: DurationModel, body: bytes) -> dict[str, Any]:
    """Validate and apply an ETA update; raise ``EtaSettingsError`` with a one-line reason."""
    try:
        update = EtaUpdate.model_validate(parse_json(body or b"{}"))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise EtaSettingsError(f"{where}: {first['msg']}") from None
    except ValueError as exc:
        raise EtaSettingsError(f"the body is not valid JSON ({exc.__class__.__name__})") from None
    settings = durations.settings.updated(update.baselines_s, update.ema_alpha, update.ema_min_samples)
    durations.reconfigure(settings, reset=update.reset)
    return durations.describe()


# --------------------------------------------------------------------------- app


#: Longer page paths than this are no page of ours (and a 10,000-character one must not reach the file system).
MAX_STATIC_PATH = 256


def _static_response(static_dir: Path, path: str) -> Response:
    if len(path) > MAX_STATIC_PATH or "\x00" in path:  # the OS refuses both with an exception, not a 404
        return error_response(404, ErrorCode.NOT_FOUND, "no such page")
    root = static_dir.resolve()
    try:
        target = (root / path).resolve() if path else root
        if target.is_dir():
            target = target / "index.html"
        found = target.is_file()
    except (OSError, ValueError):
        return error_response(404, ErrorCode.NOT_FOUND, "no such page")
    inside = target.is_relative_to(root) and not any(
        p.startswith(".") for p in target.relative_to(root).parts
    )
    if not inside or not found:
        return error_response(404, ErrorCode.NOT_FOUND, f"no such page: /{path}")
    media = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    return FileResponse(target, media_type=media, headers={"Cache-Control": "no-cache"})


def _health_body(state: GatewayState) -> dict[str, Any]:
    view = state.pool.describe(max_tickets=0)
    return {
        "status": "ok" if view["healthy"] else "degraded",
        "uptime_s": round(time.monotonic() - state.started_at, 1),
        "tls": state.tls,
        "queue_length": view["queued"],
        "active_sessions": view["busy"],
        "workers": view["workers"],
    }


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = ErrorCode.NOT_FOUND if exc.status_code in (404, 405) else ErrorCode.INVALID_EVENT
    return error_response(exc.status_code, code, str(exc.detail))


async def _crash(_: Request, exc: Exception) -> Response:
    log.error("request failed: %r", exc)
    return error_response(500, ErrorCode.INTERNAL_ERROR, "gateway error")


def _routes(state: GatewayState) -> list[BaseRoute]:
    pool, durations, metrics = state.pool, state.pool.durations, state.metrics

    async def health(_: Request) -> Response:
        return JSONResponse(_health_body(state))

    async def metrics_page(_: Request) -> Response:
        return PlainTextResponse(metrics.render(pool), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def queue(_: Request) -> Response:
        view = pool.describe()
        view["expected_duration_s"] = durations.describe()["expected_s"]
        return JSONResponse(view)

    async def eta_config(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(durations.describe())
        try:
            view = apply_eta_update(durations, await request.body())
        except EtaSettingsError as exc:
            return error_response(400, ErrorCode.INVALID_EVENT, str(exc))
        pool.changed()  # waiting clients hear the new ETAs
        log.info("ETA settings changed: %s", view["baselines_s"])
        return JSONResponse(view)

    async def chat(request: Request) -> Response:
        return await proxy_request(state, request, "chat", "/v1/chat")

    async def transcribe(request: Request) -> Response:
        return await proxy_request(state, request, "transcribe", "/v1/transcribe")

    async def static(request: Request) -> Response:
        return _static_response(state.static_dir, request.path_params.get("path", ""))

    return [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
        Route("/api/queue", queue, methods=["GET"]),
        Route("/api/config/eta", eta_config, methods=["GET", "PUT"]),
        Route("/v1/chat", chat, methods=["POST"]),
        Route("/v1/transcribe", transcribe, methods=["POST"]),
        Route("/{path:path}", static, methods=["GET"]),
    ]


def create_app(
    config: Config,
    workers: list[str],
    *,
    static_dir: str | Path | None = None,
    tls: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> GatewayApp:
    """The gateway app. Health checks and queue ticks run while the app's lifespan runs."""
    service = config.service
    metrics = GatewayMetrics()
    durations = DurationModel(EtaSettings.from_config(service))
    pool = Pool(
        workers,
        durations,
        max_queue_size=service.max_queue_size,
        request_timeout=service.request_timeout,
        update_interval_s=service.queue_update_interval_s,
        clock=clock,
        listener=metrics,
    )
    state = GatewayState(
        config=config,
        pool=pool,
        metrics=metrics,
        api_key=resolve_api_key(service.api_key),
        worker_headers=worker_auth.headers(worker_auth.resolve_worker_secret(service)),
        worker_ssl=worker_auth.worker_ssl_context(service),
        static_dir=Path(static_dir) if static_dir is not None else ROOT / "static",
        tls=tls,
    )
    jobs = JobService(state)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        state.http = httpx.AsyncClient(
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=32),
            headers=state.worker_headers,
            verify=state.worker_ssl if state.worker_ssl is not None else True,
        )
        state.tasks = [asyncio.create_task(_health_loop(state)), asyncio.create_task(_tick_loop(state))]
        await jobs.start()
        log.info(
            "gateway up: %d worker(s) %s, queue %d", len(workers), ", ".join(workers), service.max_queue_size
        )
        try:
            yield
        finally:
            await jobs.stop()
            for task in state.tasks:
                task.cancel()
            await asyncio.gather(*state.tasks, return_exceptions=True)
            await state.http.aclose()

    sessions = [session_route(state, "/ws/duplex", DUPLEX), session_route(state, "/v1/realtime", REALTIME)]
    starlette_app = Starlette(
        # the job, OpenAI and WebSocket routes come before the static catch-all of _routes
        routes=[*jobs.routes(), *openai_routes(state), *voice_routes(state), *sessions, *_routes(state)],
        exception_handlers={StarletteHTTPException: _http_error, Exception: _crash},
        lifespan=lifespan,
    )
    return GatewayApp(starlette_app, state)


class GatewayApp:
    """The ASGI app: the API key is checked in front of every route, and outermost each WebSocket scope
    gets the server's own ``send``, so queue updates keep their fast path whatever wraps ``send`` inside."""

    def __init__(self, starlette_app: Starlette, state: GatewayState) -> None:
        self.state = state
        limit = body_limit(state.config.audio.max_upload_mb)
        bounded = BodyLimit(
            ApiKeyMiddleware(starlette_app, state.api_key),
            limit,
            read_timeout_s=state.config.service.body_read_timeout_s,
        )
        state.metrics.body_refusals = bounded.refusals
        self._app = ServerSendTap(bounded)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)


# --------------------------------------------------------------------------- process


def _setup_logging(log_dir: str) -> Path:
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    path = Path(log_dir) / "gateway.log"
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(
        level=logging.INFO, format=fmt, handlers=[logging.FileHandler(path), logging.StreamHandler()]
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health check is noise
    return path


def _tune_gc() -> None:
    # Thousands of queued sockets make a large, long-lived heap; frequent collections of it pause every
    # client's updates (measured: 0.6 s pauses with 3,000 waiting clients). Leave start-up objects out of
    # collections for good and collect the young generation less often. Survivors move on to the old
    # generation after two young collections: with the default twenty, a wave of arrivals piled up in the
    # middle generation and its collection paused the loop ~90 ms with 5,000 waiting (measured; ≤ 34 ms
    # with two).
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 2, 100)


def _raise_fd_limit() -> None:
    # Every waiting client is a socket; the common soft limit of 1024 would cap the queue well below
    # max_queue_size.
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def run(config: Config, workers: str | list[str] | None, *, static_dir: str | Path | None = None) -> int:
    """Serve until stopped; returns the exit status."""
    from core.serving import AddressCounter, limits_from, serve

    service = config.service
    try:
        addresses = parse_workers(workers, config)
    except GatewayError as exc:
        print(f"gateway.py: {exc}", file=sys.stderr)
        return 2
    log_path = _setup_logging(service.log_dir)
    _raise_fd_limit()
    ssl: dict[str, str] = {}
    if not service.http:
        from core.tls import TLSError, ensure_certificate

        try:
            cert, key = ensure_certificate(Path(service.data_dir) / "tls", [service.gateway_host])
        except TLSError as exc:
            log.error("%s", exc)
            return 2
        ssl = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    app = create_app(config, addresses, static_dir=static_dir, tls=not service.http)
    limits = limits_from(service)
    connections = AddressCounter(limits)
    app.state.metrics.connection_drops = connections.dropped
    _tune_gc()
    scheme = "http" if service.http else "https"
    log.info("gateway on %s://%s:%d (log %s)", scheme, service.gateway_host, service.gateway_port, log_path)
    serve(
        app,
        limits=limits,
        counter=connections,
        host=service.gateway_host,
        port=service.gateway_port,
        log_level="warning",
        access_log=False,
        ws="websockets-sansio",  # its protocol objects take queue updates directly (queue_updates)
        ws_per_message_deflate=False,  # Opus does not compress; deflate only costs latency
        ws_max_size=CLIENT_WS_MAX_SIZE,
        timeout_graceful_shutdown=2,
        **ssl,  # type: ignore[arg-type]
    )
    return 0
