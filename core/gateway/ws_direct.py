"""Write small server→client WebSocket text frames straight to the socket's transport.

One queue change (a dispatch moves everyone up) sends one ``session.queue_update`` to every waiting
client, thousands in one pass. Through the ASGI ``send`` each of them costs a coroutine, a message dict,
the websockets library's frame object and extension pass, and a list join before the bytes reach the
transport; here a frame is two header bytes and the UTF-8 payload handed to ``transport.write``.

This works only under uvicorn's ``websockets-sansio`` protocol (the one the gateway asks for), reached
through the bound ``send`` the server hands the application; :func:`direct_text_writer` returns None for
anything else and the caller keeps the ASGI path. It is safe to bypass the protocol object for whole
text frames because a server's frames are unmasked and self-contained: the protocol keeps no outgoing
state between whole messages, no per-message extension may be active (checked: permessage-deflate would
set RSV1 and compress), and uvicorn's own sends write synchronously to the same transport, so frames from
both paths keep their order.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

#: Updates are snapshots: a client whose socket already has this much unsent has not read the last
#: ones, and another would only grow the gateway's memory. It gets the next one once it catches up.
MAX_BACKLOG_BYTES = 64 * 1024

_OPEN = State.OPEN
_TEXT_FIN = 0x81
_SHORT_HEADERS = [bytes((_TEXT_FIN, n)) for n in range(126)]


def frame_text(payload: bytes) -> bytes:
    """One unmasked, final text frame (RFC 6455 §5.2) carrying ``payload``."""
    n = len(payload)
    if n < 126:
        return _SHORT_HEADERS[n] + payload
    if n < 1 << 16:
        return struct.pack("!BBH", _TEXT_FIN, 126, n) + payload
    return struct.pack("!BBQ", _TEXT_FIN, 127, n) + payload


def direct_text_writer(send: Callable[..., Any]) -> Callable[[bytes], bool] | None:
    """A function that writes one text frame (its UTF-8 payload given) to the client of this ASGI
    ``send``, or None where the server is not one this can write for.

    Call it after the handshake is accepted. The function returns False, writing nothing, when the
    connection is closing or its client has ``MAX_BACKLOG_BYTES`` unread.
    """
    proto = getattr(send, "__self__", None)
    if not isinstance(proto, WebSocketsSansIOProtocol):
        return None
    conn, transport = proto.conn, proto.transport
    if not proto.handshake_complete or conn.extensions or transport is None:
        return None

    is_closing, buffered, transmit = transport.is_closing, transport.get_write_buffer_size, transport.write

    def write(payload: bytes) -> bool:
        # conn.state leaves OPEN with every close frame uvicorn sends or answers (send_close, fail, a close
        # received), and is_closing covers a transport closed without one: between them, every case in
        # which uvicorn sets its own close_sent.
        if conn.state is not _OPEN or is_closing() or buffered() > MAX_BACKLOG_BYTES:
            return False
        transmit(frame_text(payload))
        return True

    return write
