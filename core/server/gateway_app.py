"""The gateway: one process, no torch (DESIGN §1, §4). Queue with ETA, routing, health, TLS, demo, metrics.

Routes: ``GET /health`` (open), ``GET /metrics`` (Prometheus text), ``GET /api/queue``,
``GET|PUT /api/config/eta``, ``POST /v1/chat`` and ``POST /v1/transcribe`` (queued as ``chat`` and
``transcribe``, proxied to the worker), ``WS /ws/duplex`` (queued as ``audio_duplex``, then bridged to the
worker frame for frame), and the static demo at ``/``.

WebSocket life: the ticket is taken before the handshake is accepted (arrival order is handshake order).
While queued the client gets ``session.queued`` then ``session.queue_update`` on every change and at least
every ``queue_update_interval_s``. Text frames the client sends meanwhile are held (at most
``HELD_TEXT_FRAMES`` / ``HELD_TEXT_BYTES``) and forwarded in order once the worker is connected; binary
audio sent while queued is dropped — nobody is listening yet, and replaying stale speech to the model
would answer something the user said minutes ago — and the client is told so once with a non-fatal
``error`` (``not_ready``). ``session.close`` while queued ends the wait (``session.closed``). A full queue
accepts the socket, sends ``error`` ``queue_full`` (fatal; the message says when to retry) and closes
with 1013, so a browser can show why; the HTTP endpoints answer 503 with ``Retry-After``.
When a worker is assigned, the gateway connects to it and waits for its first frame; a worker that
refuses (``busy`` while tearing down the previous session, retried briefly; ``not_ready``) or cannot be
reached hands the ticket back to the head of the queue. Only then is ``session.queue_done`` sent (its
``event_id`` is ``dispatch-N``, N the gateway-wide dispatch order) and frames flow both ways unchanged.
The gateway reads only ``session.pause/resume/close`` from the client and ``response.done`` (timings for
/metrics) and ``session.paused/resumed`` from the worker. A worker socket that drops, or a worker taken
out by the health checker, ends the session with ``error`` ``worker_lost`` (fatal) and close code 1011.

Worker restarts (in /health, /api/queue, /metrics) come from the worker's /health field ``restarts`` when
it has one, else from the supervisor's status file ``<log_dir>/worker_N.status`` (JSON with ``restarts``),
N being the ``worker_index`` the worker reports, or its position in ``--workers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import mimetypes
import resource
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from core.config import Config
from core.protocol import ErrorCode, SessionClosed, SessionQueueDone, dump_event, error_event
from core.scheduling.eta import DurationModel, EtaSettings, EtaSettingsError
from core.scheduling.pool import (
    Lease,
    Pool,
    QueueFull,
    QueueStatus,
    QueueTimeout,
    Ticket,
    TicketCancelled,
    Worker,
)
from core.server.auth import ApiKeyMiddleware, resolve_api_key
from core.server.jobs_api import JobService
from core.server.metrics import GatewayMetrics
from core.server.openai_api import openai_routes
from core.server.realtime_bridge import realtime_route

log = logging.getLogger("gateway")

ROOT = Path(__file__).resolve().parents[2]
HELD_TEXT_FRAMES = 32
HELD_TEXT_BYTES = 256 * 1024
#: Back-off while a worker still tears down the previous session and answers ``busy``.
BUSY_RETRY_DELAYS_S = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0)
#: A ticket handed back this many times by refusing workers ends with ``worker_lost``.
MAX_ATTEMPTS = 3
WORKER_OPEN_TIMEOUT_S = 5.0
WORKER_FIRST_FRAME_TIMEOUT_S = 10.0
WORKER_WS_MAX_SIZE = 4 * 1024 * 1024
#: Per-session frame cap for the client side (Opus frames are tiny; JSON events are capped at 64 KiB).
CLIENT_WS_MAX_SIZE = 1 << 20


class GatewayError(ValueError):
    """Bad gateway arguments (a worker address, a port)."""


# --------------------------------------------------------------------------- state


@dataclass
class GatewayState:
    """Everything the gateway process knows; one instance per app."""

    config: Config
    pool: Pool
    metrics: GatewayMetrics
    api_key: str | None
    static_dir: Path
    tls: bool = False
    started_at: float = field(default_factory=time.monotonic)
    http: httpx.AsyncClient | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    worker_index: dict[int, int] = field(default_factory=dict)  # pool index -> worker_index it reports


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


def _error(status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code.value, "message": message}}, status_code=status, headers=headers
    )


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(int(max(1, seconds)))}


def _queue_event(status: QueueStatus) -> str:
    # Hand-formatted: this is the one event sent to thousands of waiting clients at once.
    kind = "session.queued" if status.first else "session.queue_update"
    return (
        f'{{"type":"{kind}","position":{status.position},"eta_s":{round(status.eta_s, 2)},'
        f'"queue_length":{status.queue_length}}}'
    )


def _send_eagerly(send: Awaitable[None]) -> None:
    """Run a send now, without a task; if it must wait (a client that does not read), finish it later.

    A send to a client that reads completes without suspending, so one queue change reaches thousands of
    waiting clients in one pass rather than one task wake-up each (Python 3.12 calls this an eager task).
    Sends to one client stay in order: a suspended one waits on the socket's ``writable`` event in FIFO
    order with any later send. A failing send is dropped: the client is gone and its handler will notice.
    """
    coro = send if isinstance(send, Coroutine) else _awaiting(send)
    try:
        waiting_on = coro.send(None)
    except (Exception, asyncio.CancelledError):  # StopIteration: sent; anything else: the client is gone
        return
    if waiting_on is None:  # a bare yield: try again on the next loop turn
        asyncio.get_running_loop().call_soon(_resume, coro, None)
    else:
        waiting_on._asyncio_future_blocking = False
        waiting_on.add_done_callback(functools.partial(_resume, coro))


async def _awaiting(awaitable: Awaitable[None]) -> None:
    await awaitable


def _resume(coro: Coroutine[Any, Any, None], _: object) -> None:
    _send_eagerly(coro)


def _upstream_query(query: str) -> str:
    """The client's query string minus ``api_key`` (the worker needs no key and must not log it)."""
    pairs = [(k, v) for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True) if k != "api_key"]
    return ("?" + urllib.parse.urlencode(pairs)) if pairs else ""


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
        response = await state.http.get(f"http://{worker.address}/health", timeout=timeout)
        body = response.json()
    except httpx.ConnectError as exc:
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


# --------------------------------------------------------------------------- WebSocket: waiting

ASGIMessage = dict[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]


class ClientSocket:
    """The client's WebSocket as raw ASGI calls: every audio frame passes here, so no wrapper per frame."""

    __slots__ = ("receive", "scope", "send")

    def __init__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        self.scope, self.receive, self.send = scope, receive, send

    async def accept(self) -> None:
        """Complete the handshake."""
        if (await self.receive())["type"] != "websocket.connect":
            raise ConnectionError("the client left during the handshake")
        await self.send({"type": "websocket.accept"})

    async def send_text(self, text: str) -> None:
        """Send one text frame."""
        await self.send({"type": "websocket.send", "text": text})

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame."""
        await self.send({"type": "websocket.close", "code": code, "reason": reason})


class _ClientGone(Exception):
    """The client disconnected or sent ``session.close`` before its session started."""


class _NoWorker(Exception):
    """Workers kept refusing the ticket."""


@dataclass
class _Held:
    """What a queued client sent before its session started."""

    texts: list[str] = field(default_factory=list)
    size: int = 0
    noted: bool = False
    closed_by_client: bool = False

    def note_once(self) -> str | None:
        if self.noted:
            return None
        self.noted = True
        return error_event(
            ErrorCode.NOT_READY,
            "no session yet: audio sent while queued is dropped, and text events beyond "
            f"{HELD_TEXT_FRAMES} frames; start streaming after session.queue_done",
        )


def _client_event_type(text: str) -> str | None:
    # Parse only the few events the gateway acts on; everything else passes through unread.
    if "session.pause" not in text and "session.resume" not in text and "session.close" not in text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    kind = data.get("type") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


async def _hold_client(ws: ClientSocket, held: _Held) -> None:
    """Read the client while it waits; returns when it leaves or closes the session."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            note = held.note_once()
        elif _client_event_type(text) == "session.close":
            held.closed_by_client = True
            return
        elif len(held.texts) < HELD_TEXT_FRAMES and held.size + len(text) <= HELD_TEXT_BYTES:
            held.texts.append(text)
            held.size += len(text)
            note = None
        else:
            note = held.note_once()
        if note is not None:
            await ws.send_text(note)


async def _connect_worker(lease: Lease, query: str) -> tuple[ClientConnection, str | bytes | None]:
    """Open the worker's /ws/duplex and read its first frame; raise ``_Refused`` or ``_Unreachable``."""
    url = f"ws://{lease.worker.address}/ws/duplex{query}"
    for delay in (*BUSY_RETRY_DELAYS_S, None):
        try:
            conn = await websockets.connect(
                url,
                open_timeout=WORKER_OPEN_TIMEOUT_S,
                close_timeout=1.0,
                compression=None,
                max_size=WORKER_WS_MAX_SIZE,
                proxy=None,
            )
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise _Unreachable(f"cannot open its WebSocket ({exc.__class__.__name__})") from None
        try:
            first = await asyncio.wait_for(conn.recv(), WORKER_FIRST_FRAME_TIMEOUT_S)
        except TimeoutError:
            return conn, None  # a quiet worker: bridge anyway
        except ConnectionClosed:
            raise _Unreachable("it closed the WebSocket without a word") from None
        except BaseException:  # cancelled (the client left): never leave the worker a session nobody owns
            conn.transport.abort()
            raise
        code = _error_code(first)
        if code not in (ErrorCode.BUSY.value, ErrorCode.NOT_READY.value):
            return conn, first
        await conn.close()
        if code == ErrorCode.NOT_READY.value or delay is None:
            raise _Refused("loading" if code == ErrorCode.NOT_READY.value else "busy_external")
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def _error_code(frame: str | bytes) -> str | None:
    if not isinstance(frame, str) or '"error"' not in frame:
        return None
    try:
        data = json.loads(frame)
    except ValueError:
        return None
    return data.get("code") if isinstance(data, dict) and data.get("type") == "error" else None


class _Refused(Exception):
    """The worker answered but would not take the session (busy or loading)."""


class _Unreachable(Exception):
    """The worker could not be reached."""


async def _queue_then_connect(
    state: GatewayState, ws: ClientSocket, ticket: Ticket, query: str
) -> tuple[Lease, ClientConnection, str | bytes | None]:
    """Wait in the queue (telling the client), then connect to the assigned worker."""
    pool = state.pool
    pool.watch(
        ticket,
        lambda status: _send_eagerly(ws.send({"type": "websocket.send", "text": _queue_event(status)})),
    )
    while True:
        lease = await pool.wait_assigned(ticket)
        try:
            conn, first = await _connect_worker(lease, query)
        except _Unreachable as exc:
            pool.mark_down(lease.worker, str(exc))
        except _Refused as exc:
            pool.mark_refusing(lease.worker, str(exc))
        else:
            if not lease.lost.is_set():
                return lease, conn, first
            conn.transport.abort()  # the health check took the worker out while we connected
        if ticket.attempts + 1 >= MAX_ATTEMPTS:
            lease.release("refused")
            raise _NoWorker(f"no worker would take the session after {MAX_ATTEMPTS} tries")
        pool.requeue(ticket)


async def _wait_for_worker(
    state: GatewayState, ws: ClientSocket, ticket: Ticket, held: _Held
) -> tuple[Lease, ClientConnection, str | bytes | None]:
    """Queue and connect while reading the client; raise ``_ClientGone`` if it leaves first."""
    reader = asyncio.create_task(_hold_client(ws, held))
    main = asyncio.create_task(
        _queue_then_connect(state, ws, ticket, _upstream_query(ws.scope["query_string"].decode()))
    )
    try:
        await asyncio.wait({reader, main}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (reader, main):
            if not task.done():
                task.cancel()
        await asyncio.gather(reader, main, return_exceptions=True)
    if main.cancelled() or not reader.cancelled():
        if not main.cancelled() and main.exception() is None:  # connected in the same instant the client left
            _lease, conn, _ = main.result()
            await conn.close()
        state.pool.cancel(ticket)
        raise _ClientGone
    return main.result()


# --------------------------------------------------------------------------- WebSocket: bridging


async def _client_to_worker(ws: ClientSocket, upstream: ClientConnection, lease: Lease) -> str:
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return "client_left"
        data = message.get("bytes")
        try:
            if data is not None:
                await upstream.send(data)
                continue
            text = message.get("text") or ""
            kind = _client_event_type(text)
            if kind == "session.pause":
                lease.paused = True
            elif kind == "session.resume":
                lease.paused = False
            await upstream.send(text)
        except ConnectionClosed as exc:
            return "worker_closed" if exc.rcvd is not None else "worker_gone"


async def _worker_to_client(
    state: GatewayState, ws: ClientSocket, upstream: ClientConnection, lease: Lease
) -> str:
    try:
        async for message in upstream:
            if isinstance(message, str):
                _inspect_worker_text(state, lease, message)
                await ws.send({"type": "websocket.send", "text": message})
            else:
                await ws.send({"type": "websocket.send", "bytes": message})
    except ConnectionClosed as exc:
        # A close frame from the worker is a session end it chose (its own error event went before it);
        # no close frame means its socket dropped: the worker is gone.
        return "worker_closed" if exc.rcvd is not None else "worker_gone"
    except (OSError, RuntimeError):  # the client went away mid-send
        return "client_left"
    return "worker_closed"


def _inspect_worker_text(state: GatewayState, lease: Lease, text: str) -> None:
    if "response.done" in text or "session.paused" in text or "session.resumed" in text:
        try:
            event = json.loads(text)
        except ValueError:
            return
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "response.done":
            state.metrics.observe_response(event)
        elif kind in ("session.paused", "session.resumed"):
            lease.paused = kind == "session.paused"


async def _close_client(ws: ClientSocket, code: int, reason: str = "", text: str | None = None) -> None:
    with contextlib.suppress(Exception):  # the client may be gone already; nothing left to tell it
        if text is not None:
            await ws.send_text(text)
        await ws.close(code=code, reason=reason[:120])


async def _bridge(state: GatewayState, ws: ClientSocket, lease: Lease, upstream: ClientConnection) -> None:
    """Pump frames both ways until one side ends; release the lease exactly once."""
    c2w = asyncio.create_task(_client_to_worker(ws, upstream, lease))
    w2c = asyncio.create_task(_worker_to_client(state, ws, upstream, lease))
    lost = asyncio.create_task(lease.lost.wait())
    done, pending = await asyncio.wait({c2w, w2c, lost}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    end = w2c.result() if w2c in done else c2w.result() if c2w in done else "worker_gone"
    if end == "worker_gone":
        lease.release("worker_lost")  # also takes the worker out of the pool
        log.warning("session on worker %d (%s) lost", lease.worker.index, lease.worker.address)
        message = "the worker serving this session stopped; please reconnect"
        await _close_client(ws, 1011, "worker lost", error_event(ErrorCode.WORKER_LOST, message, fatal=True))
        await upstream.close()  # after telling the client: a hung worker may take close_timeout
    elif end == "client_left":
        await upstream.close()  # bounded by close_timeout; lets the worker end the session first
        lease.release("client_left")
    else:
        lease.release("completed")
        await _close_client(ws, _forwardable(upstream.close_code), upstream.close_reason or "")


def _forwardable(code: int | None) -> int:
    """A close code the gateway may send on (1005/1006/1015 are reserved for "none received")."""
    if code is None or code in (1004, 1005, 1006, 1015) or not (1000 <= code <= 1014 or 3000 <= code <= 4999):
        return 1000 if code in (None, 1005) else 1011
    return code


async def serve_duplex(state: GatewayState, ws: ClientSocket) -> None:
    """One client WebSocket: queue, connect, bridge."""
    try:
        ticket = state.pool.submit("audio_duplex")
    except QueueFull as full:
        await ws.accept()
        text = error_event(
            ErrorCode.QUEUE_FULL, f"{full}; retry_after_s={full.retry_after_s:.0f}", fatal=True
        )
        await _close_client(ws, 1013, "queue full", text)
        return
    lease: Lease | None = None
    upstream: ClientConnection | None = None
    held = _Held()
    try:
        await ws.accept()
        lease, upstream, first = await _wait_for_worker(state, ws, ticket, held)
        done = SessionQueueDone(
            waited_s=round(state.pool.clock() - ticket.enqueued_at, 3),
            event_id=f"dispatch-{ticket.dispatch_seq}",
        )
        await ws.send_text(dump_event(done))
        if first is not None:
            await ws.send({"type": "websocket.send", "text" if isinstance(first, str) else "bytes": first})
        for text in held.texts:
            await upstream.send(text)
        await _bridge(state, ws, lease, upstream)
    except _ClientGone:
        if held.closed_by_client:
            await _close_client(ws, 1000, "", dump_event(SessionClosed(reason="client_closed")))
    except QueueTimeout as exc:
        await _close_client(
            ws, 1013, "queue timeout", error_event(ErrorCode.QUEUE_TIMEOUT, str(exc), fatal=True)
        )
    except TicketCancelled:
        pass
    except _NoWorker as exc:
        await _close_client(ws, 1011, "no worker", error_event(ErrorCode.WORKER_LOST, str(exc), fatal=True))
    except OSError:  # the client went away between two steps (uvicorn's ClientDisconnected)
        pass
    except Exception:  # never a traceback to the client; the log has it
        log.exception("duplex session failed")
        await _close_client(
            ws, 1011, "internal error", error_event(ErrorCode.INTERNAL_ERROR, "gateway error", fatal=True)
        )
    finally:
        if upstream is not None:  # closed already when the bridge ran; bounded by close_timeout otherwise
            with contextlib.suppress(Exception):
                await upstream.close()
        if lease is not None and not lease.released:
            lease.release("error")
        state.pool.cancel(ticket)  # frees a ticket still waiting; no-op once released


# --------------------------------------------------------------------------- HTTP proxy


async def _read_body(request: Request, limit: int) -> bytes | None:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _wait_disconnect(request: Request) -> None:
    # After the body is read, the next ASGI message is http.disconnect when the client leaves.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _post_worker(
    state: GatewayState, lease: Lease, path: str, body: bytes, request: Request
) -> httpx.Response:
    assert state.http is not None
    url = f"http://{lease.worker.address}{path}{_upstream_query(request.url.query)}"
    headers = {"content-type": request.headers.get("content-type", "application/octet-stream")}
    timeout = httpx.Timeout(state.config.service.request_timeout, connect=WORKER_OPEN_TIMEOUT_S)
    for delay in (*BUSY_RETRY_DELAYS_S, None):
        try:
            response = await state.http.post(url, content=body, headers=headers, timeout=timeout)
        except httpx.ConnectError as exc:
            raise _Unreachable(f"cannot connect ({exc.__class__.__name__})") from None
        if response.status_code == 503:
            raise _Refused("loading")
        if response.status_code != 409:
            return response
        if delay is None:
            raise _Refused("busy_external")
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def _proxy_ticket(
    state: GatewayState, ticket: Ticket, path: str, body: bytes, request: Request
) -> Response:
    pool = state.pool
    while True:
        lease = await pool.wait_assigned(ticket)  # plain HTTP has no way to hear queue updates
        try:
            response = await _post_worker(state, lease, path, body, request)
        except _Unreachable as exc:
            pool.mark_down(lease.worker, str(exc))
        except _Refused as exc:
            pool.mark_refusing(lease.worker, str(exc))
        except httpx.TimeoutException:
            lease.release("error")
            message = f"the worker did not answer within {state.config.service.request_timeout:g} s"
            return _error(504, ErrorCode.WORKER_LOST, message)
        except httpx.HTTPError as exc:  # the connection broke mid-request: the worker died
            lease.release("worker_lost")
            return _error(
                502, ErrorCode.WORKER_LOST, f"the worker stopped mid-request ({exc.__class__.__name__})"
            )
        else:
            lease.release("completed")
            headers = {"X-Queue-Wait-S": f"{ticket.waited_s:.3f}"}
            media = response.headers.get("content-type", "application/json")
            return Response(
                response.content, status_code=response.status_code, media_type=media, headers=headers
            )
        if ticket.attempts + 1 >= MAX_ATTEMPTS:
            lease.release("refused")
            return _error(
                502, ErrorCode.WORKER_LOST, f"no worker would take the request after {MAX_ATTEMPTS} tries"
            )
        pool.requeue(ticket)


async def proxy_request(state: GatewayState, request: Request, kind: str, path: str) -> Response:
    """Queue a one-shot request as ``kind`` and proxy it to the worker's ``path``."""
    pool = state.pool
    limit = int(state.config.audio.max_upload_mb * 1024 * 1024 * 1.4) + 65536  # base64 and form overhead
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return _error(413, ErrorCode.PAYLOAD_TOO_LARGE, f"request body over {limit} bytes")
    if pool.is_full():  # answer before reading a body we could not queue
        pool.listener.on_reject("queue_full")
        return _error(503, ErrorCode.QUEUE_FULL, "the queue is full", _retry_after(pool.retry_after_s()))
    body = await _read_body(request, limit)
    if body is None:
        return _error(413, ErrorCode.PAYLOAD_TOO_LARGE, f"request body over {limit} bytes")
    try:
        ticket = pool.submit(kind)
    except QueueFull as full:
        return _error(503, ErrorCode.QUEUE_FULL, str(full), _retry_after(full.retry_after_s))
    work = asyncio.create_task(_proxy_ticket(state, ticket, path, body, request))
    watch = asyncio.create_task(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        return _error(499, ErrorCode.SESSION_CLOSED, "the client went away")  # nobody reads it
    except QueueTimeout as exc:
        return _error(503, ErrorCode.QUEUE_TIMEOUT, str(exc), _retry_after(pool.retry_after_s()))
    except Exception:
        log.exception("proxied %s request failed", kind)
        return _error(500, ErrorCode.INTERNAL_ERROR, "gateway error")
    finally:
        for task in (work, watch):
            task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
        if ticket.lease is not None and not ticket.lease.released and not watch.done():
            ticket.lease.release("error")
        pool.cancel(ticket)  # frees a waiting ticket, or the worker of a client that left


# --------------------------------------------------------------------------- ETA config


class EtaUpdate(BaseModel):
    """Body of ``PUT /api/config/eta``: any subset; ``reset`` forgets the learned averages."""

    model_config = ConfigDict(extra="forbid", strict=False)
    baselines_s: dict[str, float] | None = None
    ema_alpha: float | None = None
    ema_min_samples: int | None = None
    reset: bool = False


def apply_eta_update(durations: DurationModel, body: bytes) -> dict[str, Any]:
    """Validate and apply an ETA update; raise ``EtaSettingsError`` with a one-line reason."""
    try:
        update = EtaUpdate.model_validate_json(body or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise EtaSettingsError(f"{where}: {first['msg']}") from None
    settings = durations.settings.updated(update.baselines_s, update.ema_alpha, update.ema_min_samples)
    durations.reconfigure(settings, reset=update.reset)
    return durations.describe()


# --------------------------------------------------------------------------- app


def _static_response(static_dir: Path, path: str) -> Response:
    root = static_dir.resolve()
    target = (root / path).resolve() if path else root
    if target.is_dir():
        target = target / "index.html"
    inside = target.is_relative_to(root) and not any(
        p.startswith(".") for p in target.relative_to(root).parts
    )
    if not inside or not target.is_file():
        return _error(404, ErrorCode.NOT_FOUND, f"no such page: /{path}")
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
    return _error(exc.status_code, code, str(exc.detail))


async def _crash(_: Request, exc: Exception) -> Response:
    log.error("request failed: %r", exc)
    return _error(500, ErrorCode.INTERNAL_ERROR, "gateway error")


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
            return _error(400, ErrorCode.INVALID_EVENT, str(exc))
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
        static_dir=Path(static_dir) if static_dir is not None else ROOT / "static",
        tls=tls,
    )
    jobs = JobService(state)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        state.http = httpx.AsyncClient(trust_env=False, limits=httpx.Limits(max_keepalive_connections=32))
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

    http_app = Starlette(
        # the job, OpenAI and realtime routes come before the static catch-all of _routes
        routes=[*jobs.routes(), *openai_routes(state), realtime_route(state), *_routes(state)],
        exception_handlers={StarletteHTTPException: _http_error, Exception: _crash},
        lifespan=lifespan,
    )
    return GatewayApp(http_app, state)


class GatewayApp:
    """The ASGI app: ``WS /ws/duplex`` served raw (the hot path), everything else by Starlette;
    the API key is checked in front of both."""

    def __init__(self, http_app: Starlette, state: GatewayState) -> None:
        self.http_app, self.state = http_app, state
        self._guarded = ApiKeyMiddleware(self._route, state.api_key)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._guarded(scope, receive, send)

    async def _route(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and scope["path"] == "/ws/duplex":
            await serve_duplex(self.state, ClientSocket(scope, receive, send))
        else:
            await self.http_app(scope, receive, send)


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
    # collections for good and collect the young generation less often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)


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
    import uvicorn

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
        from core.server.tls import TLSError, ensure_certificate

        try:
            cert, key = ensure_certificate(Path(service.data_dir) / "tls", [service.gateway_host])
        except TLSError as exc:
            log.error("%s", exc)
            return 2
        ssl = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    app = create_app(config, addresses, static_dir=static_dir, tls=not service.http)
    _tune_gc()
    scheme = "http" if service.http else "https"
    log.info("gateway on %s://%s:%d (log %s)", scheme, service.gateway_host, service.gateway_port, log_path)
    uvicorn.run(
        app,
        host=service.gateway_host,
        port=service.gateway_port,
        log_level="warning",
        access_log=False,
        ws_per_message_deflate=False,  # Opus does not compress; deflate only costs latency
        ws_max_size=CLIENT_WS_MAX_SIZE,
        timeout_graceful_shutdown=2,
        **ssl,  # type: ignore[arg-type]
    )
    return 0
