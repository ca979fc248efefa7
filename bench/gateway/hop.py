"""Measure 1, hop latency: one probe frame round trip through the gateway vs. straight to the worker.

Rounds alternate between the two in the same run, so that both see the same machine. On ``/ws/duplex`` the
probe is a 100-byte binary frame the mock worker echoes; on ``/v1/realtime``, where a client's audio is
text, a ``session.update`` of about that size that the mock worker answers with ``session.updated``. Over
HTTPS only the client-gateway leg is TLS (the gateway talks to workers in plain WebSocket, as deployed), so
"what the hop adds" includes the TLS work on that leg.
"""

from __future__ import annotations

import ssl
import time
from typing import Any

from bench.gateway.client import Protocol, open_session
from bench.gateway.cluster import Cluster
from bench.gateway.stats import pct

WARM_UP = 20


async def round_trips(url: str, protocol: Protocol, n: int, tls: ssl.SSLContext | None = None) -> list[float]:
    """``n`` probe round trips on a new session at ``url``, in seconds (after a warm-up)."""
    ws = await open_session(url, tls)
    times = []
    try:
        for _ in range(WARM_UP):
            await ws.send(protocol.probe)
            await ws.recv()
        for _ in range(n):
            t0 = time.perf_counter()
            await ws.send(protocol.probe)
            reply = await ws.recv()
            times.append(time.perf_counter() - t0)
            if not protocol.answers(reply):
                raise RuntimeError(f"unexpected reply on {url}: {reply!r:.80}")
    finally:
        await ws.close()
    return times


async def bench_hop(cluster: Cluster, protocol: Protocol, rounds: int, per_round: int) -> dict[str, Any]:
    """p50/p95 direct and through the gateway, and what the hop adds, in ms; ``n`` frames each way."""
    direct: list[float] = []
    via: list[float] = []
    ms = 1000.0
    for i in range(rounds):
        d = await round_trips(cluster.worker_ws(protocol, 0), protocol, per_round)
        v = await round_trips(cluster.gateway_ws(protocol), protocol, per_round, cluster.ssl)
        direct += d
        via += v
        # Per round, so that a round another tenant of the machine disturbed shows as one.
        print(
            f"   round {i + 1}: direct p50 / p95 {pct(d, 0.5) * ms:.3f} / {pct(d, 0.95) * ms:.3f} ms,"
            f" through the gateway {pct(v, 0.5) * ms:.3f} / {pct(v, 0.95) * ms:.3f} ms",
            flush=True,
        )
    out: dict[str, Any] = {
        "direct_p50": pct(direct, 0.5) * ms,
        "direct_p95": pct(direct, 0.95) * ms,
        "gateway_p50": pct(via, 0.5) * ms,
        "gateway_p95": pct(via, 0.95) * ms,
        "n": len(via),
    }
    out["added_p50"] = out["gateway_p50"] - out["direct_p50"]
    out["added_p95"] = out["gateway_p95"] - out["direct_p95"]
    return out
