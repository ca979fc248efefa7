"""Voice management through the gateway: ``GET /v1/voices``, ``POST /v1/voices``, ``DELETE /v1/voices/{name}``.

Reference voices live on the workers (each keeps a registry under its data folder; the TTS loads a voice
from it on demand). These are small management calls, not model work, so they skip the queue. A read asks
one healthy worker. A change goes to every healthy worker, so workers on other hosts, with registries of
their own, all learn the voice; workers on one host share a registry and each simply agrees. The client
gets the first worker's answer, or 502 when the workers disagree (the voice is then on some of them only,
which the message says).
"""

from __future__ import annotations

import logging

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from core.gateway.http_proxy import error_response
from core.gateway.state import GatewayState
from core.protocol import ErrorCode
from core.web import body_limit, read_body

log = logging.getLogger("gateway.voices")
TIMEOUT_S = 120.0  # an upload is decoded and resampled by the worker


def voice_routes(state: GatewayState) -> list[BaseRoute]:
    """The three routes, proxied to the workers."""

    async def forward(request: Request) -> Response:
        workers = [w for w in state.pool.workers if w.healthy]
        if not workers:
            return error_response(503, ErrorCode.NOT_READY, "no worker is up to manage voices")
        body = await read_body(request, body_limit(state.config.audio.max_upload_mb))
        if body is None:
            return error_response(413, ErrorCode.PAYLOAD_TOO_LARGE, "the upload is too large")
        if request.method == "GET":
            workers = workers[:1]
        assert state.http is not None, "the gateway's lifespan has not started"
        headers = {"content-type": request.headers.get("content-type", "application/octet-stream")}
        answers: list[httpx.Response] = []
        for worker in workers:
            try:
                answers.append(
                    await state.http.request(
                        request.method,
                        state.worker_url(worker.address, request.url.path),
                        content=body,
                        headers=headers,
                        timeout=TIMEOUT_S,
                    )
                )
            except httpx.HTTPError as exc:
                log.warning("voices: worker %s unreachable: %r", worker.address, exc)
                return error_response(502, ErrorCode.WORKER_LOST, "a worker could not be reached; try again")
        first = answers[0]
        if any(a.status_code != first.status_code for a in answers[1:]):
            statuses = ", ".join(
                f"{w.address}: {a.status_code}" for w, a in zip(workers, answers, strict=True)
            )
            log.warning("voices: workers disagree on %s %s (%s)", request.method, request.url.path, statuses)
            done = sum(a.status_code < 300 for a in answers)
            return error_response(
                502, ErrorCode.WORKER_LOST, f"the change took on {done} of {len(answers)} workers; try again"
            )
        media = first.headers.get("content-type")
        return Response(first.content, status_code=first.status_code, media_type=media)

    return [
        Route("/v1/voices", forward, methods=["GET", "POST"]),
        Route("/v1/voices/{name}", forward, methods=["DELETE"]),
    ]
