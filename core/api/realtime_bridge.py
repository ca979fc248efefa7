"""``WS /v1/realtime`` on the gateway: queue the client (``audio_duplex``), then bridge its frames unchanged
to a worker's ``/v1/realtime`` (core/worker/realtime.py), where the OpenAI Realtime events are
translated onto a duplex session.

The translation needs numpy and libopus, which the gateway must never import (tests/test_layering.py
walks every import, function-level ones included), so it lives on the worker and this module only moves
frames. While queued the client gets our ``session.queued`` / ``session.queue_update`` events (an
extension to the Realtime API; clients ignore event types they do not know) and ``session.queue_done``
when a worker is assigned. Events sent before the session starts are held and forwarded in order
(Realtime clients stream audio right after connecting, while the gateway still connects to the worker),
except ``input_audio_buffer.append`` sent while the client is told it waits in the queue: speech from
minutes ago would get a stale answer, so it is dropped (said once, non-fatal), as on ``/ws/duplex``. Gateway-side failures are Realtime ``error`` events: ``queue_full`` (close 1013),
``queue_timeout`` (1013), ``worker_lost`` (1011).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from core.api.realtime_events import realtime_error
from core.gateway.duplex_bridge import Connected, NoWorker, connect_when_assigned, open_worker_socket
from core.gateway.worker_calls import upstream_query
from core.protocol import ErrorCode
from core.scheduling.pool import Lease, QueueFull, QueueStatus, QueueTimeout, Ticket, TicketCancelled

if TYPE_CHECKING:
    from core.gateway.state import GatewayState

log = logging.getLogger("gateway.realtime")

HELD_FRAMES = 256
HELD_BYTES = 1 << 20  # about 8 s of base64 pcm16 at 24 kHz
FIRST_FRAME_TIMEOUT_S = 10.0
WORKER_MAX_SIZE = 16 * 1024 * 1024  # base64 audio events are large
_event_ids = itertools.count(1)


def _error_text(code: ErrorCode, message: str) -> str:
    return json.dumps({"event_id": f"gw_event_{next(_event_ids)}", **realtime_error(code.value, message)})


def _queue_text(status: QueueStatus) -> str:
    kind = "session.queued" if status.first else "session.queue_update"
    return json.dumps(
        {
            "type": kind,
            "position": status.position,
            "eta_s": round(status.eta_s, 2),
            "queue_length": status.queue_length,
        }
    )


class _Gone(Exception):
    """The client left while queued."""


class _Held:
    """Text events a queued client sent, to forward once its session starts."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.size = 0
        self.noted = False

    def keep(self, text: str, queued: bool) -> str | None:
        """Hold ``text`` (or drop it); returns a note for the client the first time something is dropped."""
        stale = queued and '"input_audio_buffer.append"' in text
        if not stale and len(self.texts) < HELD_FRAMES and self.size + len(text) <= HELD_BYTES:
            self.texts.append(text)
            self.size += len(text)
            return None
        if self.noted:
            return None
        self.noted = True
        return _error_text(
            ErrorCode.NOT_READY,
            "no session yet: audio sent while queued is dropped; stream after session.queue_done",
        )


def realtime_route(state: GatewayState) -> WebSocketRoute:
    """The gateway's ``/v1/realtime`` route."""

    async def endpoint(ws: WebSocket) -> None:
        await serve_realtime(state, ws)

    return WebSocketRoute("/v1/realtime", endpoint)


async def serve_realtime(state: GatewayState, ws: WebSocket) -> None:
    """One Realtime client: queue, connect to a worker, bridge; the lease is released exactly once."""
    pool = state.pool
    try:
        ticket = pool.submit("audio_duplex")
    except QueueFull as full:
        await ws.accept()
        await _close(
            ws, 1013, _error_text(ErrorCode.QUEUE_FULL, f"{full}; retry_after_s={full.retry_after_s:.0f}")
        )
        return
    lease: Lease | None = None
    upstream: ClientConnection | None = None
    try:
        await ws.accept()
        held = _Held()
        lease, upstream, first = await _wait_for_worker(state, ws, ticket, held)
        if ticket.sent is not None:  # the client was told it was queued: tell it the wait is over
            waited = round(pool.clock() - ticket.enqueued_at, 3)
            await ws.send_text(json.dumps({"type": "session.queue_done", "waited_s": waited}))
        if first is not None:
            await (ws.send_text(first) if isinstance(first, str) else ws.send_bytes(first))
        for text in held.texts:
            await upstream.send(text)
        await _bridge(ws, lease, upstream)
    except (_Gone, TicketCancelled, WebSocketDisconnect, OSError):
        pass
    except QueueTimeout as exc:
        await _close(ws, 1013, _error_text(ErrorCode.QUEUE_TIMEOUT, str(exc)))
    except NoWorker as exc:
        await _close(ws, 1011, _error_text(ErrorCode.WORKER_LOST, str(exc)))
    except Exception:
        log.exception("realtime session failed")
        await _close(ws, 1011, _error_text(ErrorCode.INTERNAL_ERROR, "gateway error"))
    finally:
        if upstream is not None:
            with contextlib.suppress(Exception):
                await upstream.close()
        if lease is not None and not lease.released:
            lease.release("error")
        pool.cancel(ticket)


async def _close(ws: WebSocket, code: int, text: str | None = None) -> None:
    with contextlib.suppress(Exception):  # the client may be gone already
        if text is not None:
            await ws.send_text(text)
        await ws.close(code=code)


async def _hold(ws: WebSocket, held: _Held, ticket: Ticket) -> None:
    """Read a client that has no session yet, until it leaves."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        queued = ticket.sent is not None  # it was told it waits in the queue
        note = held.keep(text, queued) if text is not None else held.keep('"input_audio_buffer.append"', True)
        if note is not None:
            await ws.send_text(note)


async def _wait_for_worker(
    state: GatewayState, ws: WebSocket, ticket: Ticket, held: _Held
) -> tuple[Lease, ClientConnection, str | bytes | None]:
    updates: asyncio.Queue[QueueStatus] = asyncio.Queue()
    state.pool.watch(ticket, lambda *status: updates.put_nowait(QueueStatus(*status)))

    async def tell() -> None:
        while True:
            await ws.send_text(_queue_text(await updates.get()))

    query = upstream_query(ws.scope.get("query_string", b"").decode("latin-1"))
    reader = asyncio.create_task(_hold(ws, held, ticket))
    teller = asyncio.create_task(tell())
    main = asyncio.create_task(_connect_when_assigned(state, ticket, query))
    try:
        await asyncio.wait({reader, main}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (reader, teller, main):
            task.cancel()
        await asyncio.gather(reader, teller, main, return_exceptions=True)
    if not main.cancelled() and main.exception() is None:
        if reader.done() and not reader.cancelled():  # connected in the instant the client left
            await main.result()[1].close()
            raise _Gone
        return main.result()
    if main.cancelled():
        raise _Gone
    raise main.exception()  # type: ignore[misc]


async def _connect_when_assigned(
    state: GatewayState, ticket: Ticket, query: str
) -> tuple[Lease, ClientConnection, str | bytes | None]:
    def connect(lease: Lease) -> Awaitable[Connected]:
        return open_worker_socket(
            f"ws://{lease.worker.address}/v1/realtime{query}",
            max_size=WORKER_MAX_SIZE,
            first_frame_timeout_s=FIRST_FRAME_TIMEOUT_S,
            error_code=_error_code,
        )

    return await connect_when_assigned(state.pool, ticket, connect)


def _error_code(frame: str | bytes) -> str | None:
    if not isinstance(frame, str) or '"error"' not in frame:
        return None
    try:
        event: Any = json.loads(frame)
    except ValueError:
        return None
    if (
        not isinstance(event, dict)
        or event.get("type") != "error"
        or not isinstance(event.get("error"), dict)
    ):
        return None
    return event["error"].get("code")


async def _bridge(ws: WebSocket, lease: Lease, upstream: ClientConnection) -> None:
    """Pump frames both ways until one side ends."""

    async def client_to_worker() -> str:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return "client_left"
            data = message.get("text") if message.get("text") is not None else message.get("bytes")
            if data is None:
                continue
            try:
                await upstream.send(data)
            except ConnectionClosed as exc:
                return "worker_closed" if exc.rcvd is not None else "worker_gone"

    async def worker_to_client() -> str:
        try:
            async for message in upstream:
                await (ws.send_text(message) if isinstance(message, str) else ws.send_bytes(message))
        except ConnectionClosed as exc:
            return "worker_closed" if exc.rcvd is not None else "worker_gone"
        except (OSError, RuntimeError, WebSocketDisconnect):
            return "client_left"
        return "worker_closed"

    c2w = asyncio.create_task(client_to_worker())
    w2c = asyncio.create_task(worker_to_client())
    lost = asyncio.create_task(lease.lost.wait())
    done, pending = await asyncio.wait({c2w, w2c, lost}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    end = w2c.result() if w2c in done else c2w.result() if c2w in done else "worker_gone"
    if end == "worker_gone":
        lease.release("worker_lost")
        await _close(
            ws,
            1011,
            _error_text(ErrorCode.WORKER_LOST, "the worker serving this session stopped; please reconnect"),
        )
    elif end == "client_left":
        await lease.release_while_closing("client_left", upstream.close())
    else:
        lease.release("completed")
        await _close(ws, 1000)
