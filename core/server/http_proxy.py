"""The gateway's one-shot HTTP endpoints (``POST /v1/chat``, ``POST /v1/transcribe``): queue the request,
then proxy its body to the assigned worker and its answer back.

A full queue answers 503 with ``Retry-After`` before the body is read; a worker that refuses (409 busy,
retried briefly; 503 loading) or cannot be reached hands the ticket back to the head of the queue.

No audio or model library here: this runs in the gateway.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.protocol import ErrorCode
from core.scheduling.pool import Lease, QueueFull, QueueTimeout, Ticket
from core.server.gateway_http import (
    BUSY_RETRY_DELAYS_S,
    CONNECT_TIMEOUT_S,
    MAX_ATTEMPTS,
    WorkerRefused,
    WorkerUnreachable,
    upstream_query,
    wait_disconnect,
)

if TYPE_CHECKING:
    from core.server.gateway_state import GatewayState

log = logging.getLogger("gateway")


def error_response(
    status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The gateway's JSON error body ``{"error": {"code", "message"}}`` with ``status``."""
    return JSONResponse(
        {"error": {"code": code.value, "message": message}}, status_code=status, headers=headers
    )


def retry_after(seconds: float) -> dict[str, str]:
    """A ``Retry-After`` header of at least one second."""
    return {"Retry-After": str(int(max(1, seconds)))}


async def _read_body(request: Request, limit: int) -> bytes | None:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _post_worker(
    state: GatewayState, lease: Lease, path: str, body: bytes, request: Request
) -> httpx.Response:
    assert state.http is not None
    url = f"http://{lease.worker.address}{path}{upstream_query(request.url.query)}"
    headers = {"content-type": request.headers.get("content-type", "application/octet-stream")}
    timeout = httpx.Timeout(state.config.service.request_timeout, connect=CONNECT_TIMEOUT_S)
    for delay in (*BUSY_RETRY_DELAYS_S, None):
        try:
            response = await state.http.post(url, content=body, headers=headers, timeout=timeout)
        except httpx.ConnectError as exc:
            raise WorkerUnreachable(f"cannot connect ({exc.__class__.__name__})") from None
        if response.status_code == 503:
            raise WorkerRefused("loading")
        if response.status_code != 409:
            return response
        if delay is None:
            raise WorkerRefused("busy_external")
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
        except WorkerUnreachable as exc:
            pool.mark_down(lease.worker, str(exc))
        except WorkerRefused as exc:
            pool.mark_refusing(lease.worker, str(exc))
        except httpx.TimeoutException:
            lease.release("error")
            message = f"the worker did not answer within {state.config.service.request_timeout:g} s"
            return error_response(504, ErrorCode.WORKER_LOST, message)
        except httpx.HTTPError as exc:  # the connection broke mid-request: the worker died
            lease.release("worker_lost")
            return error_response(
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
            return error_response(
                502, ErrorCode.WORKER_LOST, f"no worker would take the request after {MAX_ATTEMPTS} tries"
            )
        pool.requeue(ticket)


async def proxy_request(state: GatewayState, request: Request, kind: str, path: str) -> Response:
    """Queue a one-shot request as ``kind`` and proxy it to the worker's ``path``."""
    pool = state.pool
    limit = int(state.config.audio.max_upload_mb * 1024 * 1024 * 1.4) + 65536  # base64 and form overhead
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return error_response(413, ErrorCode.PAYLOAD_TOO_LARGE, f"request body over {limit} bytes")
    if pool.is_full():  # answer before reading a body we could not queue
        pool.listener.on_reject("queue_full")
        return error_response(
            503, ErrorCode.QUEUE_FULL, "the queue is full", retry_after(pool.retry_after_s())
        )
    body = await _read_body(request, limit)
    if body is None:
        return error_response(413, ErrorCode.PAYLOAD_TOO_LARGE, f"request body over {limit} bytes")
    try:
        ticket = pool.submit(kind)
    except QueueFull as full:
        return error_response(503, ErrorCode.QUEUE_FULL, str(full), retry_after(full.retry_after_s))
    work = asyncio.create_task(_proxy_ticket(state, ticket, path, body, request))
    watch = asyncio.create_task(wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        return error_response(499, ErrorCode.SESSION_CLOSED, "the client went away")  # nobody reads it
    except QueueTimeout as exc:
        return error_response(503, ErrorCode.QUEUE_TIMEOUT, str(exc), retry_after(pool.retry_after_s()))
    except Exception:
        log.exception("proxied %s request failed", kind)
        return error_response(500, ErrorCode.INTERNAL_ERROR, "gateway error")
    finally:
        for task in (work, watch):
            task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
        if ticket.lease is not None and not ticket.lease.released and not watch.done():
            ticket.lease.release("error")
        pool.cancel(ticket)  # frees a waiting ticket, or the worker of a client that left
