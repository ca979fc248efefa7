"""Optional API key for the gateway: ``service.api_key`` or the ``DUPLEX_API_KEY`` environment variable.

Checked on HTTP (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``) and on the WebSocket (the same
headers, or the ``api_key`` query parameter, since browsers cannot set headers on a WebSocket). ``/health``
and the static demo stay open; everything under ``/api/``, ``/v1/``, ``/ws/`` and ``/metrics`` is checked.
A refusal is ``401 {"error": {"code": "unauthorized", ...}}`` — for a WebSocket as an HTTP response to
the handshake (ASGI denial response), so no socket is ever accepted without the key.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from core.protocol import ErrorCode

ENV_VAR = "DUPLEX_API_KEY"
PROTECTED_PREFIXES = ("/api/", "/v1/", "/ws/", "/metrics")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]


def resolve_api_key(configured: str | None) -> str | None:
    """The key in force: the environment variable when set and non-empty, else the config; None: no key."""
    env = os.environ.get(ENV_VAR, "").strip()
    key = env or (configured or "").strip()
    return key or None


def presented_key(scope: Scope) -> str | None:
    """The key a request carries (header first; the query parameter on WebSockets only)."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key":
            return value.decode("latin-1").strip()
    if scope["type"] == "websocket":
        for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
            if k == "api_key":
                return v
    return None


def key_matches(expected: str, presented: str | None) -> bool:
    """Constant-time comparison."""
    return presented is not None and hmac.compare_digest(expected.encode(), presented.encode())


def is_protected(path: str) -> bool:
    """Whether ``path`` needs the key."""
    return path.startswith(PROTECTED_PREFIXES)


class ApiKeyMiddleware:
    """Pure ASGI middleware: refuses protected paths without the key; adds no per-message cost."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if (
            self.api_key is None
            or scope["type"] not in ("http", "websocket")
            or not is_protected(scope.get("path", ""))
            or key_matches(self.api_key, presented_key(scope))
        ):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {"error": {"code": ErrorCode.UNAUTHORIZED.value, "message": "missing or wrong API key"}}
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": 401, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:  # a server without the denial extension: close before accepting (the client sees 403)
            await send({"type": "websocket.close", "code": 1008})
