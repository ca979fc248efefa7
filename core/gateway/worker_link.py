"""The gateway's WebSocket to a worker: open it once the queue assigns a worker, and hand the ticket back to
the head of the queue when that worker refuses or cannot be reached.

A worker that is still tearing down its previous session answers ``busy`` and is retried briefly; one that
is loading answers ``not_ready``; either way, after ``MAX_ATTEMPTS`` workers refused, the session fails with
:class:`NoWorker`. Shared by every WebSocket API the gateway bridges (core/gateway/session.py).

No audio or model library here: this runs in the gateway.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections.abc import Awaitable, Callable

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from core.gateway.worker_calls import (
    BUSY_RETRY_DELAYS_S,
    CONNECT_TIMEOUT_S,
    MAX_ATTEMPTS,
    WorkerRefused,
    WorkerUnreachable,
)
from core.protocol import ErrorCode
from core.scheduling.pool import Lease, Pool, Ticket

#: How long a worker may take to say its first word (``session.created``, or why it refuses).
FIRST_FRAME_TIMEOUT_S = 10.0

#: A worker's first frame: the socket and that frame (None when the worker said nothing in time).
Connected = tuple[ClientConnection, str | bytes | None]


class NoWorker(Exception):
    """Workers kept refusing the ticket."""


async def open_worker_socket(
    url: str,
    *,
    max_size: int,
    first_frame_timeout_s: float,
    error_code: Callable[[str | bytes], str | None],
    headers: dict[str, str] | None = None,
    ssl: ssl_module.SSLContext | None = None,
) -> Connected:
    """Open a worker's WebSocket at ``url`` and read its first frame; a ``busy`` worker is retried briefly.

    ``error_code`` reads the code of an error event in the worker's protocol (None for any other frame).
    Raises ``WorkerRefused`` (busy past the retries, or loading) or ``WorkerUnreachable``.
    """
    for delay in (*BUSY_RETRY_DELAYS_S, None):
        try:
            conn = await websockets.connect(
                url,
                additional_headers=headers,
                ssl=ssl,
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
