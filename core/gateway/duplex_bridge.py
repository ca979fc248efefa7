"""``WS /ws/duplex`` on the gateway: queue the client (``audio_duplex``), then bridge its frames unchanged to
a worker's ``/ws/duplex``. Every audio frame passes here, so the client socket is raw ASGI calls.

WebSocket life: the ticket is taken before the handshake is accepted (arrival order is handshake order).
While queued the client gets ``session.queued`` then ``session.queue_update`` on every change and at least
every ``queue_update_interval_s``. Text frames the client sends meanwhile are held (at most
``HELD_TEXT_FRAMES`` / ``HELD_TEXT_BYTES``) and forwarded in order once the worker is connected; binary
audio sent while queued is dropped — nobody is listening yet, and replaying stale speech to the model
would answer something the user said minutes ago — and the client is told so once with a non-fatal
``error`` (``not_ready``). ``session.close`` while queued ends the wait (``session.closed``). A full queue
accepts the socket, sends ``error`` ``queue_full`` (fatal; the message says when to retry) and closes
with 1013, so a browser can show why.
When a worker is assigned, the gateway connects to it and waits for its first frame; a worker that
refuses (``busy`` while tearing down the previous session, retried briefly; ``not_ready``) or cannot be
reached hands the ticket back to the head of the queue (:func:`connect_when_assigned`, shared with
``/v1/realtime``). Only then is ``session.queue_done`` sent (its ``event_id`` is ``dispatch-N``, N the
gateway-wide dispatch order) and frames flow both ways unchanged.
The gateway reads only ``session.pause/resume/close`` from the client and ``response.done`` (timings for
/metrics) and ``session.paused/resumed`` from the worker. A worker socket that drops, or a worker taken
out by the health checker, ends the session with ``error`` ``worker_lost`` (fatal) and close code 1011.

No audio or model library here: this runs in the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from core.gateway.worker_calls import (
    BUSY_RETRY_DELAYS_S,
    CONNECT_TIMEOUT_S,
    MAX_ATTEMPTS,
    WorkerRefused,
    WorkerUnreachable,
    upstream_query,
)
from core.gateway.ws_direct import direct_text_writer
from core.protocol import ErrorCode, SessionClosed, SessionQueueDone, dump_event, error_event
from core.scheduling.pool import Lease, Pool, QueueFull, QueueSink, QueueTimeout, Ticket, TicketCancelled

if TYPE_CHECKING:
    from core.gateway.state import GatewayState

log = logging.getLogger("gateway")

HELD_TEXT_FRAMES = 32
HELD_TEXT_BYTES = 256 * 1024
WORKER_FIRST_FRAME_TIMEOUT_S = 10.0
WORKER_WS_MAX_SIZE = 4 * 1024 * 1024

#: A worker's first frame: the socket and that frame (None when the worker said nothing in time).
Connected = tuple[ClientConnection, str | bytes | None]


_QUEUE_EVENT_FORMATS = {
    first: b'{"type":"%s","position":%%d,"eta_s":%%.2f,"queue_length":%%d}'
    % (b"session.queued" if first else b"session.queue_update")
    for first in (True, False)
}


def _queue_event_bytes(position: int, eta_s: float, queue_length: int, first: bool) -> bytes:
    """The UTF-8 JSON of ``session.queued`` (``first``) or ``session.queue_update``: a ``QueueSink``'s values."""
    # Hand-formatted bytes: this is the one event sent to thousands of waiting clients at once.
    return _QUEUE_EVENT_FORMATS[first] % (position, eta_s, queue_length)


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


class NoWorker(Exception):
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


async def open_worker_socket(
    url: str,
    *,
    max_size: int,
    first_frame_timeout_s: float,
    error_code: Callable[[str | bytes], str | None],
) -> Connected:
    """Open a worker's WebSocket at ``url`` and read its first frame; a ``busy`` worker is retried briefly.

    ``error_code`` reads the code of an error event in the worker's protocol (None for any other frame).
    Raises ``WorkerRefused`` (busy past the retries, or loading) or ``WorkerUnreachable``.
    """
    for delay in (*BUSY_RETRY_DELAYS_S, None):
        try:
            conn = await websockets.connect(
                url,
                open_timeout=CONNECT_TIMEOUT_S,
                close_timeout=1.0,
                compression=None,
                max_size=max_size,
                proxy=None,
            )
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise WorkerUnreachable(f"cannot open its WebSocket ({exc.__class__.__name__})") from None
        try:
            first = await asyncio.wait_for(conn.recv(), first_frame_timeout_s)
        except TimeoutError:
            return conn, None  # a quiet worker: bridge anyway
        except ConnectionClosed:
            raise WorkerUnreachable("it closed the WebSocket without a word") from None
        except BaseException:  # cancelled (the client left): never leave the worker a session nobody owns
            conn.transport.abort()
            raise
        code = error_code(first)
        if code not in (ErrorCode.BUSY.value, ErrorCode.NOT_READY.value):
            return conn, first
        await conn.close()
        if code == ErrorCode.NOT_READY.value or delay is None:
            raise WorkerRefused("loading" if code == ErrorCode.NOT_READY.value else "busy_external")
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def connect_when_assigned(
    pool: Pool, ticket: Ticket, connect: Callable[[Lease], Awaitable[Connected]]
) -> tuple[Lease, ClientConnection, str | bytes | None]:
    """Wait for ``ticket``'s worker and ``connect`` to it; a refusing or unreachable worker hands the ticket
    back to the head of the queue. Raises :class:`NoWorker` after ``MAX_ATTEMPTS`` refusals."""
    while True:
        lease = await pool.wait_assigned(ticket)
        try:
            conn, first = await connect(lease)
        except WorkerUnreachable as exc:
            pool.mark_down(lease.worker, str(exc))
        except WorkerRefused as exc:
            pool.mark_refusing(lease.worker, str(exc))
        else:
            if not lease.lost.is_set():
                return lease, conn, first
            conn.transport.abort()  # the health check took the worker out while we connected
        if ticket.attempts + 1 >= MAX_ATTEMPTS:
            lease.release("refused")
            raise NoWorker(f"no worker would take the session after {MAX_ATTEMPTS} tries")
        pool.requeue(ticket)


def _error_code(frame: str | bytes) -> str | None:
    if not isinstance(frame, str) or '"error"' not in frame:
        return None
    try:
        data = json.loads(frame)
    except ValueError:
        return None
    return data.get("code") if isinstance(data, dict) and data.get("type") == "error" else None


def _queue_sink(ws: ClientSocket) -> QueueSink:
    """Where the pool pushes this client's queue statuses: straight to its socket when the server allows."""
    write = direct_text_writer(ws.send)
    if write is None:
        return lambda *status: _send_eagerly(
            ws.send({"type": "websocket.send", "text": _queue_event_bytes(*status).decode()})
        )

    def sink(position: int, eta_s: float, queue_length: int, first: bool) -> None:
        # A False from write (closing, or not reading) needs nothing: the next update carries the position.
        write(_queue_event_bytes(position, eta_s, queue_length, first))

    return sink


async def _queue_then_connect(
    state: GatewayState, ws: ClientSocket, ticket: Ticket, query: str
) -> tuple[Lease, ClientConnection, str | bytes | None]:
    """Wait in the queue (telling the client), then connect to the assigned worker."""
    state.pool.watch(ticket, _queue_sink(ws))

    def connect(lease: Lease) -> Awaitable[Connected]:
        return open_worker_socket(
            f"ws://{lease.worker.address}/ws/duplex{query}",
            max_size=WORKER_WS_MAX_SIZE,
            first_frame_timeout_s=WORKER_FIRST_FRAME_TIMEOUT_S,
            error_code=_error_code,
        )

    return await connect_when_assigned(state.pool, ticket, connect)


async def _wait_for_worker(
    state: GatewayState, ws: ClientSocket, ticket: Ticket, held: _Held
) -> tuple[Lease, ClientConnection, str | bytes | None]:
    """Queue and connect while reading the client; raise ``_ClientGone`` if it leaves first."""
    reader = asyncio.create_task(_hold_client(ws, held))
    main = asyncio.create_task(
        _queue_then_connect(state, ws, ticket, upstream_query(ws.scope["query_string"].decode()))
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
        # Waiting clients hear their new places without waiting for the close handshake (bounded by
        # close_timeout); the next session on this worker connects once the worker has ended this one.
        await lease.release_while_closing("client_left", upstream.close())
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
    except NoWorker as exc:
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
