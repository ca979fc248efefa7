"""What the gateway process knows (config, queue, metrics, HTTP client); shared by the gateway's modules."""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from core.config import Config
from core.gateway.metrics import GatewayMetrics
from core.scheduling.pool import Pool


@dataclass
class GatewayState:
    """Everything the gateway process knows; one instance per app."""

    config: Config
    pool: Pool
    metrics: GatewayMetrics
    api_key: str | None
    static_dir: Path
    tls: bool = False
    #: Sent with every request and WebSocket handshake to a worker (the shared secret, core/worker_auth.py).
    worker_headers: dict[str, str] = field(default_factory=dict)
    #: Verifies the workers' certificates when the gateway reaches them over TLS (None: in the clear).
    worker_ssl: ssl.SSLContext | None = None

    def worker_url(self, address: str, path: str, *, websocket: bool = False) -> str:
        """The URL of ``path`` on the worker at ``address`` (``https``/``wss`` when the link is TLS)."""
        if websocket:
            return f"{'wss' if self.worker_ssl else 'ws'}://{address}{path}"
        return f"{'https' if self.worker_ssl else 'http'}://{address}{path}"

    started_at: float = field(default_factory=time.monotonic)
    http: httpx.AsyncClient | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    worker_index: dict[int, int] = field(default_factory=dict)  # pool index -> worker_index it reports
