"""One WebSocket session through the gateway: queue -> lease -> bridge -> release, the same for every
WebSocket API it serves (``/ws/duplex``, ``/v1/realtime``); a :class:`Dialect` holds what differs.

- Queue. The ticket (``audio_duplex``) is taken before the handshake is accepted, so arrival order is
  handshake order. A full queue accepts the socket, sends ``queue_full`` (fatal; the message says when to
  retry) and closes with 1013. While queued the client gets ``session.queued`` then
  ``session.queue_update`` on every change and at least every ``queue_update_interval_s``
  (core/gateway/queue_updates.py: written straight to the connection where the server allows).
- Held while waiting. Text events are held (at most the dialect's frames and bytes) and forwarded in order
  once the worker is connected; audio is dropped — nobody listens yet, and replaying stale speech would get
  an answer to something said minutes ago — and the client is told so once with a non-fatal ``not_ready``.
  Which text counts as audio, and the control events the gateway reads (``session.close`` ends the wait),
  are the dialect's.
- Lease. Once a worker is assigned the gateway connects to it and waits for its first frame; a worker that
  refuses or cannot be reached hands the ticket back to the head of the queue (core/gateway/worker_link.py).
  Then ``session.queue_done`` (``event_id`` ``dispatch-N``, N the gateway-wide dispatch order) is sent, to
  every client on ``/ws/duplex`` and on dialects that say so only to a client that was told it waits.
- Bridge. Frames flow both ways unchanged. A worker that closes its socket ends the session with its own
  close code and reason; one whose socket drops, or that the health checker takes out, ends it with a fatal
  ``worker_lost`` and close 1011; a client that leaves frees its place at once while the worker still
  closes the session.
- Release. The lease is released exactly once however the session ends, and a waiting ticket is withdrawn.
  A client that leaves before its session is bridged abandons its lease (``abandoned``): only sessions
  that ran feed the ETAs' durations.

No audio or model library here: this runs in the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from core.gateway.queue_updates import QueueUpdates
from core.gateway.worker_calls import upstream_query
from core.gateway.worker_link import (
    FIRST_FRAME_TIMEOUT_S,
    Connected,
    NoWorker,
    connect_when_assigned,
    open_worker_socket,
)
from core.protocol import ErrorCode, SessionClosed, SessionQueueDone, dump_event
from core.scheduling.pool import Lease, QueueFull, QueueTimeout, Ticket, TicketCancelled

if TYPE_CHECKING:
    from core.gateway.state import GatewayState

log = logging.getLogger("gateway")

#: What a client event the gateway acts on is: one of these, or None for a frame it passes unread.
Control = str | None
PAUSE, RESUME, CLOSE = "session.pause", "session.resume", "session.close"


@dataclass(frozen=True)
class Dialect:
    """What one WebSocket API does differently in a gateway session; everything else is shared."""

    #: The worker's route for this API.
    worker_path: str
    #: Largest frame accepted from the worker.
    worker_max_size: int
    #: Text events held while waiting: at most this many, and this many bytes.
    held_frames: int
    held_bytes: int
    #: The message of the one ``not_ready`` note a waiting client gets when something it sent is dropped.
    held_note: str
    #: An error event in this API: ``(code, message, fatal) -> text``.
    error: Callable[[ErrorCode, str, bool], str]
    #: The code of an error event the worker sent, or None for any other frame.
    worker_error_code: Callable[[str | bytes], str | None]
    #: Whether a text event is audio, dropped once the client has been told it waits in the queue.
    is_audio: Callable[[str], bool] = lambda text: False
    #: The control event (``PAUSE``, ``RESUME``, ``CLOSE``) a client text frame is, or None.
    control: Callable[[str], Control] = lambda text: None
    #: Looks at a worker's text event as it passes (metrics, pause state).
    on_worker_text: Callable[[GatewayState, Lease, str], None] | None = None
    #: Send ``session.queue_done`` to a client that never waited (False: only after ``session.queued``).
    queue_done_always: bool = True


def session_route(state: GatewayState, path: str, dialect: Dialect) -> WebSocketRoute:
    """The gateway's WebSocket route at ``path``, serving ``dialect`` sessions."""

    async def endpoint(ws: WebSocket) -> None:
        await serve_session(state, ws, dialect)

    return WebSocketRoute(path, endpoint)


class _ClientGone(Exception):
    """The client disconnected or sent ``session.close`` before its session started."""


@dataclass
class _Held:
    """What a waiting client sent, to forward once its session starts."""

    dialect: Dialect
    texts: list[str] = field(default_factory=list)
    size: int = 0
    noted: bool = False
    closed_by_client: bool = False

    def keep(self, text: str | None, queued: bool) -> str | None:
        """Hold ``text`` (None: a binary frame) or drop it; the first drop returns the note for the client."""
        d = self.dialect
        if (
            text is not None
            and not (queued and d.is_audio(text))
            and len(self.texts) < d.held_frames
            and self.size + len(text) <= d.held_bytes
        ):
            self.texts.append(text)
            self.size += len(text)
            return None
        if self.noted:
            return None
        self.noted = True
        return d.error(ErrorCode.NOT_READY, d.held_note, False)


async def serve_session(state: GatewayState, ws: WebSocket, dialect: Dialect) -> None:
    """One client WebSocket: queue, connect to a worker, bridge; the lease is released exactly once."""
    pool = state.pool
    try:
        ticket = pool.submit("audio_duplex")
    except QueueFull as full:
        await ws.accept()
        message = f"{full}; retry_after_s={full.retry_after_s:.0f}"
        await _close_client(ws, 1013, "queue full", dialect.error(ErrorCode.QUEUE_FULL, message, True))
        return
    lease: Lease | None = None
    upstream: ClientConnection | None = None
    held = _Held(dialect)
    try:
        await ws.accept()
        lease, upstream, first = await _wait_for_worker(state, ws, ticket, held)
        if dialect.queue_done_always or ticket.sent is not None:
            done = SessionQueueDone(
                waited_s=round(pool.clock() - ticket.enqueued_at, 3),
                event_id=f"dispatch-{ticket.dispatch_seq}",
            )
            await ws.send_text(dump_event(done))
        if first is not None:
            await (ws.send_text(first) if isinstance(first, str) else ws.send_bytes(first))
        for text in held.texts:
            await upstream.send(text)
        await _bridge(state, ws, lease, upstream, dialect)
    except _ClientGone:
        if held.closed_by_client:
            await _close_client(ws, 1000, "", dump_event(SessionClosed(reason="client_closed")))
    except QueueTimeout as exc:
        await _close_client(ws, 1013, "queue timeout", dialect.error(ErrorCode.QUEUE_TIMEOUT, str(exc), True))
    except NoWorker as exc:
        await _close_client(ws, 1011, "no worker", dialect.error(ErrorCode.WORKER_LOST, str(exc), True))
    except (TicketCancelled, WebSocketDisconnect, OSError):  # the client went away between two steps
        pass
    except Exception:  # never a traceback to the client; the log has it
        log.exception("%s session failed", dialect.worker_path)
        error = dialect.error(ErrorCode.INTERNAL_ERROR, "gateway error", True)
        await _close_client(ws, 1011, "internal error", error)
    finally:
        if upstream is not None:  # closed already when the bridge ran; bounded by close_timeout otherwise
            with contextlib.suppress(Exception):
                await upstream.close()
        if lease is not None and not lease.released:
            lease.release("error")
        pool.cancel(ticket)  # frees a ticket still waiting; no-op once released


# --------------------------------------------------------------------------- waiting


async def _wait_for_worker(
    state: GatewayState, ws: WebSocket, ticket: Ticket, held: _Held
) -> tuple[Lease, ClientConnection, str | bytes | None]:
    """Queue and connect while reading the client; raise ``_ClientGone`` if it leaves first."""
    dialect = held.dialect
    updates = QueueUpdates(ws.scope, ws.send_text)
    state.metrics.observe_queue_update_path(updates.path)
    state.pool.watch(ticket, updates.sink)
    query = upstream_query(ws.scope.get("query_string", b"").decode("latin-1"))

    def connect(lease: Lease) -> Awaitable[Connected]:
        return open_worker_socket(
            state.worker_url(lease.worker.address, f"{dialect.worker_path}{query}", websocket=True),
            max_size=dialect.worker_max_size,
            first_frame_timeout_s=FIRST_FRAME_TIMEOUT_S,
            error_code=dialect.worker_error_code,
            headers=state.worker_headers,
            ssl=state.worker_ssl,
        )

    reader = asyncio.create_task(_hold_client(ws, held, ticket))
    main = asyncio.create_task(connect_when_assigned(state.pool, ticket, connect))
    try:
        await asyncio.wait({reader, main}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (reader, main):
            if not task.done():
                task.cancel()
        await asyncio.gather(reader, main, return_exceptions=True)
        await updates.stop()  # before session.queue_done: no update may follow it
    if main.cancelled() or not reader.cancelled():
        if not main.cancelled() and main.exception() is None:  # connected in the same instant the client left
            _lease, conn, _ = main.result()
            await conn.close()
        state.pool.cancel(ticket)  # a lease it held is abandoned: never bridged, no duration for the ETAs
        raise _ClientGone
    return main.result()


async def _hold_client(ws: WebSocket, held: _Held, ticket: Ticket) -> None:
    """Read the client while it waits; returns when it leaves or closes the session."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is not None and held.dialect.control(text) == CLOSE:
            held.closed_by_client = True
            return
        note = held.keep(text, queued=ticket.sent is not None)  # queued: it was told it waits
        if note is not None:
            await ws.send_text(note)


# --------------------------------------------------------------------------- bridging


async def _client_to_worker(ws: WebSocket, upstream: ClientConnection, lease: Lease, dialect: Dialect) -> str:
    control = dialect.control
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
            kind = control(text)
            if kind == PAUSE:
                lease.paused = True
            elif kind == RESUME:
                lease.paused = False
            await upstream.send(text)
        except ConnectionClosed as exc:
            return "worker_closed" if exc.rcvd is not None else "worker_gone"


async def _worker_to_client(
    state: GatewayState, ws: WebSocket, upstream: ClientConnection, lease: Lease, dialect: Dialect
) -> str:
    inspect = dialect.on_worker_text
    try:
        async for message in upstream:
            if isinstance(message, str):
                if inspect is not None:
                    inspect(state, lease, message)
                await ws.send_text(message)
            else:
                await ws.send_bytes(message)
    except ConnectionClosed as exc:
        # A close frame from the worker is a session end it chose (its own error event went before it);
        # no close frame means its socket dropped: the worker is gone.
        return "worker_closed" if exc.rcvd is not None else "worker_gone"
    except (OSError, RuntimeError, WebSocketDisconnect):  # the client went away mid-send
        return "client_left"
    return "worker_closed"


async def _bridge(
    state: GatewayState, ws: WebSocket, lease: Lease, upstream: ClientConnection, dialect: Dialect
) -> None:
    """Pump frames both ways until one side ends; release the lease exactly once."""
    c2w = asyncio.create_task(_client_to_worker(ws, upstream, lease, dialect))
    w2c = asyncio.create_task(_worker_to_client(state, ws, upstream, lease, dialect))
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
        await _close_client(ws, 1011, "worker lost", dialect.error(ErrorCode.WORKER_LOST, message, True))
        await upstream.close()  # after telling the client: a hung worker may take close_timeout
    elif end == "client_left":
        # Waiting clients hear their new places without waiting for the close handshake (bounded by
        # close_timeout); the next session on this worker connects once the worker has ended this one.
        await lease.release_while_closing("client_left", upstream.close())
    else:
        lease.release("completed")
        await _close_client(ws, forwardable(upstream.close_code), upstream.close_reason or "")


async def _close_client(ws: WebSocket, code: int, reason: str = "", text: str | None = None) -> None:
    with contextlib.suppress(Exception):  # the client may be gone already; nothing left to tell it
        if text is not None:
            await ws.send_text(text)
        await ws.close(code=code, reason=reason[:120])


def forwardable(code: int | None) -> int:
    """A close code the gateway may send on (1005/1006/1015 are reserved for "none received")."""
    if code is None or code in (1004, 1005, 1006, 1015) or not (1000 <= code <= 1014 or 3000 <= code <= 4999):
        return 1000 if code in (None, 1005) else 1011
    return code
