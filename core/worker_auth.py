"""The link between a gateway and its workers: a shared secret a worker requires, and optional TLS.

A worker's port runs every model route (transcribe, speech, chat, both WebSockets, voice upload and delete)
and a direct session takes the worker out of the gateway's pool; any process that can reach the port could
use it. So the gateway sends ``X-Worker-Secret`` with every request and WebSocket handshake, and a worker
refuses everything but ``/health`` without it, with 401 (for a WebSocket, at the handshake: no socket is
ever accepted without it).

Where the secret comes from, first found wins: the ``DUPLEX_WORKER_SECRET`` environment variable, then
``service.worker_secret`` in config.json (what workers on other machines use: set the same value on every
host), then the file ``worker_secret`` under ``service.data_dir``, made on first start (32 random bytes,
hex, mode 0600) by whichever of gateway and workers starts first and read by the others. ``start_all.sh``
starts all of them on one data folder, so a local install needs no setting.

With ``service.worker_tls`` (workers on other hosts, across a network) workers serve HTTPS and WSS and the
gateway verifies their certificate: see :func:`worker_tls_files` and :func:`worker_ssl_context`.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from core.config import ServiceConfig
from core.protocol import ErrorCode
from core.storage.private import open_private_binary, private_dir
from core.tls import ensure_certificate

ENV_VAR = "DUPLEX_WORKER_SECRET"
HEADER = "X-Worker-Secret"
FILE_NAME = "worker_secret"
#: Where workers keep a self-signed certificate when none is configured (under ``service.data_dir``).
TLS_DIR = "tls-worker"
#: Paths a worker serves to anyone: the gateway's health checks and a supervisor's probes carry no secret
#: on purpose (they reveal the state, never a model).
OPEN_PATHS = frozenset({"/health"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]


class WorkerSecretError(RuntimeError):
    """The secret file cannot be read or made (a clear message naming the file and the fix)."""


def resolve_worker_secret(service: ServiceConfig) -> str:
    """The secret in force (see the module docstring); makes the file on first use."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return env
    if service.worker_secret and service.worker_secret.strip():
        return service.worker_secret.strip()
    return _file_secret(Path(service.data_dir) / FILE_NAME)


def _file_secret(path: Path) -> str:
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    if not path.parent.exists():
        private_dir(path.parent)
    tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # one per caller
    try:
        with open_private_binary(tmp) as fh:
            fh.write(secrets.token_hex(32).encode())
        with contextlib.suppress(FileExistsError):  # another process made it first: theirs is the one
            os.link(tmp, path)  # atomic, and never replaces: every process ends up reading one secret
    except OSError as exc:
        raise WorkerSecretError(f"cannot make the worker secret {path}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return _read(path)


def _read(path: Path) -> str:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkerSecretError(f"cannot read the worker secret {path}: {exc}") from exc
    if len(text) < 16:
        raise WorkerSecretError(f"the worker secret in {path} is too short (delete it to make a new one)")
    return text


def worker_tls_files(service: ServiceConfig) -> tuple[Path, Path] | None:
    """The (certificate, key) a worker serves TLS with, or None without ``service.worker_tls``.

    The configured pair when both are set; else a self-signed one under ``data_dir/tls-worker/`` naming
    ``worker_host`` (the gateway on the same host trusts it from there; another host is given the
    certificate as ``worker_ca_file``).
    """
    if not service.worker_tls:
        return None
    if service.worker_tls_cert and service.worker_tls_key:
        return Path(service.worker_tls_cert), Path(service.worker_tls_key)
    return ensure_certificate(Path(service.data_dir) / TLS_DIR, [service.worker_host])


def worker_ssl_context(service: ServiceConfig) -> ssl.SSLContext | None:
    """What the gateway verifies workers' certificates with, or None when it reaches them in the clear."""
    if not service.worker_tls:
        return None
    local = Path(service.data_dir) / TLS_DIR / "cert.pem"
    ca = service.worker_ca_file or (str(local) if local.is_file() else None)
    context = ssl.create_default_context(cafile=ca)  # hostname checked: the certificate names the worker
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def worker_scheme(service: ServiceConfig, *, websocket: bool = False) -> str:
    """``http``/``ws``, or ``https``/``wss`` with ``service.worker_tls``."""
    if websocket:
        return "wss" if service.worker_tls else "ws"
    return "https" if service.worker_tls else "http"


def headers(secret: str) -> dict[str, str]:
    """The header a gateway sends to its workers."""
    return {HEADER: secret}


def _presented(scope: Scope) -> str | None:
    wanted = HEADER.lower().encode()
    for name, value in scope.get("headers", ()):
        if name == wanted:
            return bytes(value).decode("latin-1").strip()
    return None


class WorkerSecretMiddleware:
    """Pure ASGI middleware of a worker: every path but ``OPEN_PATHS`` needs the shared secret."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self._secret = secret.encode()

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        presented = _presented(scope)
        if (
            scope["type"] not in ("http", "websocket")
            or scope.get("path", "") in OPEN_PATHS
            or (presented is not None and hmac.compare_digest(self._secret, presented.encode()))
        ):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {
                "error": {
                    "code": ErrorCode.UNAUTHORIZED.value,
                    "message": f"this is a worker: it serves its gateway only ({HEADER} missing or wrong)",
                }
            }
        ).encode()
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 401, "headers": head})
            await send({"type": "http.response.body", "body": body})
        elif "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": 401, "headers": head})
            await send({"type": "websocket.http.response.body", "body": body})
        else:  # a server without the denial extension: close before accepting
            await send({"type": "websocket.close", "code": 1008})
