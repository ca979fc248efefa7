"""Measure 2, ETA accuracy: a seeded mixed workload, and the ETA each WebSocket client was first given vs.
the wait it had (``session.queue_done.waited_s``).

Sessions of 100-300 ms on the API measured, HTTP chat/transcribe of 30-100 ms, Poisson arrivals faster than
two workers serve them. On ``/v1/realtime`` only a client that was told it waits hears ``session.queue_done``;
those are the ones scored on either API.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import statistics
import time
from typing import Any

import httpx
from websockets.asyncio.client import connect

from bench.gateway.client import Protocol
from bench.gateway.cluster import Cluster
from bench.gateway.stats import pct


async def _ws_client(
    url: str, tls: ssl.SSLContext | None, start: float, results: list[tuple[float, float]]
) -> None:
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    eta = 0.0
    async with await connect(
        url, compression=None, ping_interval=None, proxy=None, open_timeout=30, ssl=tls
    ) as ws:
        async for raw in ws:
            event = json.loads(raw)
            if event["type"] == "session.queued":
                eta = event["eta_s"]
            elif event["type"] == "session.queue_done":
                results.append((eta, event["waited_s"]))
            elif event["type"] in ("session.closed", "error"):
                break


async def _http_client(client: httpx.AsyncClient, path: str, start: float) -> None:
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    r = await client.post(path, json={"text": "hi"})
    r.raise_for_status()


async def bench_eta(cluster: Cluster, protocol: Protocol, n: int, seed: int = 7) -> dict[str, Any]:
    """Mean and p95 absolute ETA error, bias and mean wait (s) over the clients that waited."""
    rng = random.Random(seed)
    results: list[tuple[float, float]] = []
    tasks = []
    t = time.monotonic() + 0.2
    verify: Any = cluster.ssl or True
    async with httpx.AsyncClient(base_url=cluster.http, timeout=120, verify=verify) as client:
        for _ in range(n):
            t += rng.expovariate(1 / 0.06)  # ~16 arrivals/s against ~2 workers x ~6/s
            if rng.random() < 0.7:
                ms = rng.uniform(100, 300)
                url = cluster.gateway_ws(protocol, f"?duration_ms={ms:.0f}")
                tasks.append(_ws_client(url, cluster.ssl, t, results))
            else:
                path = rng.choice(["/v1/chat", "/v1/transcribe"])
                tasks.append(_http_client(client, f"{path}?duration_ms={rng.uniform(30, 100):.0f}", t))
        await asyncio.wait_for(asyncio.gather(*tasks), 300)
    queued = [(eta, waited) for eta, waited in results if waited > 0.0 or eta > 0.0]
    errors = [abs(eta - waited) for eta, waited in queued]
    return {
        "clients": len(results),
        "queued": len(queued),
        "mae": statistics.mean(errors) if errors else float("nan"),
        "bias": statistics.mean(eta - w for eta, w in queued) if queued else float("nan"),
        "mean_wait": statistics.mean(w for _, w in queued) if queued else float("nan"),
        "p95_error": pct(errors, 0.95),
    }
