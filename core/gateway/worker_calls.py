"""Requests to a worker through the gateway's ETA queue, for the gateway's HTTP routes and API modules.

- :func:`take_ticket` and :func:`worker_response`: one request to a worker through the ETA queue. The
  ticket waits for a worker; a worker that refuses (``409`` busy while it tears down a session, retried
  briefly; ``503`` loading) or cannot be reached hands the ticket back to the head of the queue, at most
  ``MAX_ATTEMPTS`` times; the lease is released exactly once, however the caller's block ends. A caller
  cancelled (its client left) while the worker runs the request leaves the request running: the worker
  cannot drop it half done, so the lease is held until the worker answers, and the next client is not
  sent to a worker still busy with it. A caller cancelled before its request reached the worker
  releases the lease as ``abandoned`` (it ran nothing, so it says nothing about durations).
- :func:`upstream_query`: a client's query string as a worker may see it.

No audio or model library here: this runs in the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import httpx

from core.protocol import ErrorCode
from core.scheduling.pool import Lease, Outcome, Pool, QueueFull, QueueTimeout, Ticket, TicketCancelled

if TYPE_CHECKING:
    from core.gateway.state import GatewayState

#: Back-off while a worker still tears down the previous session and answers 409 busy.
BUSY_RETRY_DELAYS_S = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0)
#: A ticket handed back this many times by refusing workers fails with ``worker_lost``.
MAX_ATTEMPTS = 3
CONNECT_TIMEOUT_S = 5.0


class CallFailed(Exception):
    """A queued worker call that could not be served; carries the HTTP status and a stable code."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after_s = status, code, message, retry_after_s

    def headers(self) -> dict[str, str] | None:
        """``Retry-After`` when there is one."""
        return None if self.retry_after_s is None else {"Retry-After": str(int(max(1, self.retry_after_s)))}


class WorkerRefused(Exception):
    """The worker answered but would not take the request (busy or loading)."""


class WorkerUnreachable(Exception):
    """The worker could not be reached."""


def take_ticket(pool: Pool, kind: str) -> Ticket:
    """Queue a request of ``kind``; :class:`CallFailed` (503) when the queue is full."""
    try:
        return pool.submit(kind)
    except QueueFull as full:
        raise CallFailed(503, ErrorCode.QUEUE_FULL.value, str(full), full.retry_after_s) from None


def kind_or(pool: Pool, preferred: str, fallback: str) -> str:
    """``preferred`` when the ETA model knows that request type, else ``fallback``."""
    return preferred if preferred in pool.durations.settings.baselines else fallback


Prepare = Callable[[], Awaitable[dict[str, Any]]]


@contextlib.asynccontextmanager
async def worker_response(
    state: GatewayState,
    ticket: Ticket,
    path: str,
    prepare: Prepare,
    *,
    stream: bool = False,
    on_lease: Callable[[Lease], Awaitable[None]] | None = None,
    on_requeue: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[httpx.Response]:
    """Wait for ``ticket``'s worker and POST to its ``path``; yield the response (body unread when ``stream``).

    ``prepare`` builds the httpx request arguments (``content``/``json``/``files``/``data``/``headers``)
    once a worker is assigned, so queued requests hold no body. ``on_lease`` runs each time a worker is
    assigned, ``on_requeue`` each time that worker refused or could not be reached and the ticket went
    back to the head of the queue (so a caller that showed the request as started can show it waiting).
    Raises :class:`CallFailed` when no worker serves the request; the ticket is withdrawn and the lease
    released when the block exits.
    """
    pool = state.pool
    try:
        response, lease = await _send(state, ticket, path, prepare, stream, on_lease, on_requeue)
        outcome: Outcome = "completed"
        try:
            yield response
        except httpx.HTTPError as exc:  # the worker's stream broke mid-body: it died
            outcome = "worker_lost"
            raise CallFailed(
                502, ErrorCode.WORKER_LOST.value, f"the worker stopped mid-reply ({exc.__class__.__name__})"
            ) from None
        except asyncio.CancelledError:
            outcome = "client_left"
            raise
        except BaseException:
            outcome = "error"
            raise
        finally:
            await response.aclose()
            lease.release(outcome)
    finally:
        pool.cancel(ticket)  # withdraws a ticket still waiting; no-op once released


async def _send(
    state: GatewayState,
    ticket: Ticket,
    path: str,
    prepare: Prepare,
    stream: bool,
    on_lease: Callable[[Lease], Awaitable[None]] | None,
    on_requeue: Callable[[], Awaitable[None]] | None,
) -> tuple[httpx.Response, Lease]:
    pool = state.pool
    while True:
        try:
            lease = await pool.wait_assigned(ticket)
        except QueueTimeout as exc:
            raise CallFailed(503, ErrorCode.QUEUE_TIMEOUT.value, str(exc), pool.retry_after_s()) from None
        except TicketCancelled:
            raise CallFailed(499, ErrorCode.SESSION_CLOSED.value, "the request was withdrawn") from None
        try:
            if on_lease is not None:
                await on_lease(lease)
            return await _post(state, lease, path, await prepare(), stream), lease
        except WorkerUnreachable as exc:
            pool.mark_down(lease.worker, str(exc))
        except WorkerRefused as exc:
            pool.mark_refusing(lease.worker, str(exc))
        except httpx.TimeoutException:
            lease.release("error")
            limit = state.config.service.request_timeout
            raise CallFailed(
                504, ErrorCode.WORKER_LOST.value, f"the worker did not answer within {limit:g} s"
            ) from None
        except httpx.HTTPError as exc:
            lease.release("worker_lost")
            raise CallFailed(
                502, ErrorCode.WORKER_LOST.value, f"the worker stopped mid-request ({exc.__class__.__name__})"
            ) from None
        except asyncio.CancelledError:
            # The client left. A request the worker has is released when the worker answers (_exchange);
            # before that nothing ran on the worker.
            if lease.finishing is None:
                lease.release("abandoned")
            raise
        except BaseException:
            lease.release("error")
            raise
        if ticket.attempts + 1 >= MAX_ATTEMPTS:
            lease.release("refused")
            raise CallFailed(
                502,
                ErrorCode.WORKER_LOST.value,
                f"no worker would take the request after {MAX_ATTEMPTS} tries",
            )
        pool.requeue(ticket)
        if on_requeue is not None:
            await on_requeue()


async def _post(
    state: GatewayState, lease: Lease, path: str, kwargs: dict[str, Any], stream: bool
) -> httpx.Response:
    assert state.http is not None, "the gateway's lifespan has not started"
    timeout = httpx.Timeout(state.config.service.request_timeout, connect=CONNECT_TIMEOUT_S)
    url = state.worker_url(lease.worker.address, path)
    for delay in (*BUSY_RETRY_DELAYS_S, None):
        request = state.http.build_request("POST", url, timeout=timeout, **kwargs)
        try:
            response = await _exchange(state.http, lease, request, stream)
        except httpx.ConnectError as exc:
            raise WorkerUnreachable(f"cannot connect ({exc.__class__.__name__})") from None
        if response.status_code == 503:
            await response.aclose()
            raise WorkerRefused("loading")
        if response.status_code != 409:
            return response
        await response.aclose()
        if delay is None:
            raise WorkerRefused("busy_external")
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def _exchange(
    http: httpx.AsyncClient, lease: Lease, request: httpx.Request, stream: bool
) -> httpx.Response:
    """Send ``request`` to the lease's worker and return its answer.

    Once sent, the request is the worker's: a worker runs it to the end even if nobody waits for the
    answer. So a caller cancelled meanwhile does not cancel the request; the lease is released when the
    worker has answered (``Lease.release_when_done``), and until then the worker is busy to the queue.
    """
    sending = asyncio.ensure_future(http.send(request, stream=stream))
    try:
        return await asyncio.shield(sending)
    except asyncio.CancelledError:
        lease.release_when_done(_unread(sending))
        raise


async def _unread(sending: asyncio.Future[httpx.Response]) -> Outcome:
    """Wait for an answer nobody will read, close it, and say how the lease ends."""
    try:
        response = await sending
    except httpx.ConnectError:
        return "abandoned"  # it never reached the worker
    except httpx.TimeoutException:
        return "error"
    except httpx.HTTPError:
        return "worker_lost"  # as when a client waits for it: the worker dropped the connection
    await response.aclose()
    # A refusal (busy, loading) ran nothing; any other answer is a request the worker ran, whose duration
    # the ETAs should learn from.
    return "abandoned" if response.status_code in (409, 503) else "client_left"


def upstream_query(query: str) -> str:
    """A query string minus ``api_key`` (workers need no key and must not log it)."""
    pairs = [(k, v) for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True) if k != "api_key"]
    return ("?" + urllib.parse.urlencode(pairs)) if pairs else ""
