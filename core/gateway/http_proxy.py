"""The gateway's one-shot HTTP endpoints (``POST /v1/chat``, ``POST /v1/transcribe``): queue the request,
then proxy its body to the assigned worker and its answer back (``worker_calls.worker_response``: a worker
that refuses or cannot be reached hands the ticket back to the head of the queue).

A full queue answers 503 with ``Retry-After`` before the body is read.

No audio or model library here: this runs in the gateway.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.gateway.worker_calls import CallFailed, upstream_query, worker_response
from core.protocol import ErrorCode
from core.scheduling.pool import QueueFull, Ticket
from core.web import read_body, unless_disconnected

if TYPE_CHECKING:
    from core.gateway.state import GatewayState

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


async def _proxy_ticket(
    state: GatewayState, ticket: Ticket, path: str, body: bytes, request: Request
) -> Response:
    headers = {"content-type": request.headers.get("content-type", "application/octet-stream")}

    async def prepare() -> dict[str, Any]:
        return {"content": body, "headers": headers}

    target = f"{path}{upstream_query(request.url.query)}"
    try:  # plain HTTP hears no queue updates: the wait shows only in X-Queue-Wait-S
        async with worker_response(state, ticket, target, prepare) as response:
            media = response.headers.get("content-type", "application/json")
            return Response(
                response.content,
                status_code=response.status_code,
                media_type=media,
                headers={"X-Queue-Wait-S": f"{ticket.waited_s:.3f}"},
            )
    except CallFailed as failed:
        return error_response(failed.status, ErrorCode(failed.code), failed.message, failed.headers())


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
    body = await read_body(request, limit)
    if body is None:
        return error_response(413, ErrorCode.PAYLOAD_TOO_LARGE, f"request body over {limit} bytes")
    try:
        ticket = pool.submit(kind)
    except QueueFull as full:
        return error_response(503, ErrorCode.QUEUE_FULL, str(full), retry_after(full.retry_after_s))
    try:
        answer = await unless_disconnected(request, _proxy_ticket(state, ticket, path, body, request))
    except Exception:
        log.exception("proxied %s request failed", kind)
        return error_response(500, ErrorCode.INTERNAL_ERROR, "gateway error")
    finally:
        pool.cancel(ticket)  # frees a waiting ticket; the lease was released when the call ended
    if answer is None:
        return error_response(499, ErrorCode.SESSION_CLOSED, "the client went away")  # nobody reads it
    return answer
