"""How a waiting client hears its place in the queue: ``session.queued``, then ``session.queue_update``.

One queue change (a dispatch moves everyone up) tells every waiting client, thousands in one pass, so an
update must cost little and never wait for the client. Two paths, the first one the server allows:

- ``transport``: the update is handed to the connection's websockets protocol object (``send_text``, then
  what the connection has to send is written to its transport), as ``websockets.broadcast`` does: no
  coroutine, no ASGI message, and the protocol object keeps its own framing and state. The object is found
  through the server's own ``send``, which :class:`ServerSendTap` records on the scope before any
  middleware can wrap it; only public websockets calls are made on it, and anything unexpected (another
  server, another websockets major version, compression) leaves the client on the ASGI path.
- ``asgi``: the update goes through the application's WebSocket ``send``. At most one send is in flight per
  client; a newer status replaces one not yet sent (an update is a snapshot), so a client that does not
  read costs one pending send, not a growing queue.

A client on the transport path that has ``MAX_BACKLOG_BYTES`` unread gets no more updates until it catches
up; the next one it can take carries its current place. ``/metrics`` counts waiting clients by path
(``gateway_queue_update_clients_total``).

No audio or model library here: this runs in the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal

try:  # the Sans-I/O protocol object of websockets >= 11; without it, every client takes the ASGI path
    from websockets.protocol import Protocol as _WsProtocol
    from websockets.protocol import State as _WsState

    _OPEN: Any = _WsState.OPEN
except ImportError:  # pragma: no cover - depends on the installed websockets
    _WsProtocol = None  # type: ignore[assignment,misc]
    _OPEN = None

from core.scheduling.pool import QueueSink

#: Updates are snapshots: a client whose socket already has this much unsent has not read the last
#: ones, and another would only grow the gateway's memory. It gets the next one once it catches up.
MAX_BACKLOG_BYTES = 64 * 1024
#: Where :class:`ServerSendTap` leaves the server's own ``send`` in a WebSocket scope.
SERVER_SEND_KEY = "gateway.server_send"

UpdatePath = Literal["transport", "asgi"]
UPDATE_PATHS: tuple[UpdatePath, ...] = ("transport", "asgi")

_QUEUE_EVENT_FORMATS = {
    first: b'{"type":"%s","position":%%d,"eta_s":%%.2f,"queue_length":%%d}'
    % (b"session.queued" if first else b"session.queue_update")
    for first in (True, False)
}


def queue_event_bytes(position: int, eta_s: float, queue_length: int, first: bool) -> bytes:
    """The UTF-8 JSON of ``session.queued`` (``first``) or ``session.queue_update``: a ``QueueSink``'s values.

    The same event on every WebSocket API (the OpenAI Realtime one has it as an extension)."""
    # Hand-formatted bytes: this is the one event sent to thousands of waiting clients at once.
    return _QUEUE_EVENT_FORMATS[first] % (position, eta_s, queue_length)


class ServerSendTap:
    """ASGI wrapper that records the server's ``send`` on each WebSocket scope (``SERVER_SEND_KEY``).

    Put it outermost: middleware inside it may wrap ``send`` as it likes without taking the transport path
    away from the queue updates."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            scope[SERVER_SEND_KEY] = send
        await self.app(scope, receive, send)


def direct_writer(send: object) -> Callable[[bytes], bool] | None:
    """A function that sends one text message (its UTF-8 payload given) through the websockets protocol
    object behind the server's ``send``, or None where there is none to use.

    Call it after the handshake is accepted. The function returns False, sending nothing, when the
    connection is not open, its transport is closing, or its client has ``MAX_BACKLOG_BYTES`` unread.
    """
    server = getattr(send, "__self__", None)  # the server's per-connection object, when send is its method
    conn = getattr(server, "conn", None)
    transport = getattr(server, "transport", None)
    if _WsProtocol is None or not isinstance(conn, _WsProtocol):
        return None
    if not isinstance(transport, asyncio.WriteTransport) or conn.state is not _OPEN:
        return None
    if conn.extensions:  # compression: each update would be deflated here; the ASGI path does that work
        return None
    is_closing, buffered, write_bytes = transport.is_closing, transport.get_write_buffer_size, transport.write
    send_text, data_to_send = conn.send_text, conn.data_to_send

    def write(payload: bytes) -> bool:
        # The protocol object leaves OPEN with every close frame sent or received; is_closing covers a
        # transport closed without one.
        if conn.state is not _OPEN or is_closing() or buffered() > MAX_BACKLOG_BYTES:
            return False
        send_text(payload)
        for data in data_to_send():
            write_bytes(data)
        return True

    return write


class QueueUpdates:
    """One waiting client's queue updates: ``sink`` is what the pool calls, on the path chosen at start."""

    __slots__ = ("_pending", "_send_text", "_stopped", "_task", "path", "sink")

    def __init__(self, scope: MutableMapping[str, Any], send_text: Callable[[str], Awaitable[None]]) -> None:
        """``send_text`` is the application's own text send, for the ASGI path."""
        self._send_text = send_text
        self._pending: bytes | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        write = direct_writer(scope.get(SERVER_SEND_KEY))
        self.path: UpdatePath = "asgi" if write is None else "transport"
        self.sink: QueueSink = self._asgi_sink if write is None else _transport_sink(write)

    def _asgi_sink(self, position: int, eta_s: float, queue_length: int, first: bool) -> None:
        if self._stopped:
            return
        self._pending = queue_event_bytes(position, eta_s, queue_length, first)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._pending is not None:
                payload, self._pending = self._pending, None
                await self._send_text(payload.decode())
        except Exception:  # the client is gone; its session handler finds out on its own
            self._pending = None
        finally:
            self._task = None

    async def stop(self) -> None:
        """No more updates: drop an unsent one, so that nothing reaches the client after what follows."""
        self._stopped, self._pending = True, None
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _transport_sink(write: Callable[[bytes], bool]) -> QueueSink:
    formats = _QUEUE_EVENT_FORMATS

    def sink(position: int, eta_s: float, queue_length: int, first: bool) -> None:
        # A False from write (closing, or not reading) needs nothing: the next update carries the position.
        write(formats[first] % (position, eta_s, queue_length))

    return sink
