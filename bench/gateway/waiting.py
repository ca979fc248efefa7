"""Measure 3, waiting clients: how many one gateway core keeps told of their place with lag p95 < 100 ms.

Lean clients (client.LeanClient; thousands in this process) fill the queue in steps. At each step the
served client leaves five times (a "burst": every waiting client moves up; the step's count is the fewest
waiting at any of its bursts), and the lag from that moment until each waiting client receives its new
position is measured. A step passes when the median of its bursts' p95 is under 100 ms (the median keeps one
burst stalled by another tenant of a shared machine from deciding it). Meanwhile a live session on the
second worker sends the protocol's probe through the gateway every 5 ms from its own process: its round
trips during the bursts show what telling thousands of waiting clients costs the sessions that talk.
:func:`bench_peer` runs the same clients and bursts against bench/fanout_floor.py (plain WebSocket, a bare
asyncio server that only writes each waiting client its new position): the floor this machine sets for a
server built like ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import math
import multiprocessing
import ssl
import statistics
import time
from typing import Any

from bench.gateway.client import PROTOCOLS, HitCounter, LeanClient, Protocol, connect_lean, open_session
from bench.gateway.cluster import Cluster, cpu_s
from bench.gateway.stats import pct

LAG_TARGET_S = 0.100
TRIGGERS = 5
NAP_S = 0.0005
#: (start, last client told) of one burst.
Window = tuple[float, float]


async def wait_for_frames(mode: str) -> None:
    """Keep this process's event loop out of a blocking epoll_wait while a burst arrives (modes nap, spin).

    This process stands in for thousands of remote clients. Asleep in epoll_wait, every frame the gateway
    sends it is a wake-up of a process on another CPU, and the gateway's send pays for it: an inter-processor
    interrupt, on a VM an exit to the host. Remote browsers put no such cost on the gateway's core; on the
    development VM perf showed it as the largest kernel symbol of the gateway's sends
    (_raw_spin_unlock_irqrestore, the wake-up). "nap" sleeps NAP_S at a time outside epoll, then reads
    whatever arrived: no wake-ups, little CPU, and the lags it stamps are up to about NAP_S late, against the
    server. "spin" polls without sleeping (a whole CPU; only where the machine has cores to spare). "epoll"
    is asyncio's own waiting.
    """
    if mode == "epoll":
        await asyncio.sleep(3600)
    while True:
        if mode == "nap":
            time.sleep(NAP_S)  # blocking on purpose: the loop must not wait in epoll meanwhile
        await asyncio.sleep(0)


async def trigger(
    clients: list[LeanClient], hits: HitCounter, timeout: float, client_wait: str
) -> tuple[list[float], int, Window]:
    """The served client leaves; returns each waiting client's lag to its new position, the misses, and
    the burst's window."""
    for c in clients:
        c.process()
    served = [c for c in clients if not c.closed and c.position() == 0]
    waiting = [c for c in clients if not c.closed and (c.position() or 0) > 0]
    before = {id(c): c.position() or 0 for c in waiting}
    for c in waiting:
        c.armed = True
    hits.arm(len(waiting))
    waiter = asyncio.create_task(wait_for_frames(client_wait))
    # This process stands in for thousands of remote clients and holds every frame they heard: a collection
    # of that heap stalls its loop (measured: 85-125 ms with 4,000-6,000 clients), and the bytes that
    # arrive meanwhile would be stamped late, a lag of the bench, not of the gateway. Collect between bursts.
    gc.disable()
    t0 = time.monotonic()
    lags: dict[int, float] = {}
    for c in served:
        c.leave()
    try:
        deadline = t0 + timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hits.done.wait(), timeout)
        while True:
            for c in waiting:
                c.process()
                if id(c) not in lags and (t := c.moved_at(t0, before[id(c)])) is not None:
                    lags[id(c)] = t - t0
            if len(lags) == len(waiting) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    finally:
        gc.enable()
        waiter.cancel()
        for c in waiting:
            c.armed = False
    return list(lags.values()), len(waiting) - len(lags), (t0, t0 + max(lags.values(), default=0.0))


async def step(
    port: int,
    path: str,
    tls: ssl.SSLContext | None,
    pid: int,
    clients: list[LeanClient],
    hits: HitCounter,
    level: int,
    client_wait: str,
) -> dict[str, Any]:
    """One step: connect clients up to ``level`` waiting, then ``TRIGGERS`` bursts in a row.

    The row: the fewest waiting at any burst, the pooled lag percentiles (p95 inf where a client never
    heard), each burst's p95 and their median, the server's (``pid``) CPU per update, and the bursts'
    windows.
    """
    t_conn = time.monotonic()
    # One served client plus ``level`` waiting at the last burst: every burst moves at least ``level`` up.
    target = level + TRIGGERS + 1
    clients.extend(
        await connect_lean(port, path, tls, target - len([c for c in clients if not c.closed]), hits)
    )
    connect_s = time.monotonic() - t_conn
    await asyncio.sleep(0.5)
    since = time.monotonic()
    cpu_before = cpu_s(pid)
    lags: list[float] = []
    bursts: list[float] = []
    windows: list[Window] = []
    missed, fewest_waiting = 0, target
    for _ in range(TRIGGERS):
        got, miss, window = await trigger(clients, hits, 5.0, client_wait)
        fewest_waiting = min(fewest_waiting, len(got) + miss)
        lags += got
        bursts.append(pct(got, 0.95) if not miss else float("inf"))
        windows.append(window)
        missed += miss
        await asyncio.sleep(0.3)
    return {
        "level": level,
        "waiting": fewest_waiting,
        "connect_s": connect_s,
        "since": since,
        "lag_p50_ms": pct(lags, 0.5) * 1000,
        "lag_p95_ms": pct(lags, 0.95) * 1000 if not missed else float("inf"),
        "lag_max_ms": max(lags) * 1000 if lags else float("nan"),
        "bursts_p95_ms": [b * 1000 for b in bursts],
        "burst_p95_ms": statistics.median(bursts) * 1000,
        "cpu_us": (cpu_s(pid) - cpu_before) / max(1, len(lags)) * 1e6,
        "missed": missed,
        "windows": windows,
    }


def _max_update_gap(clients: list[LeanClient], since: float) -> float:
    gaps = []
    for c in clients:
        c.process()
        times = [
            t for t, e in c.frames if t >= since and e["type"] in ("session.queue_update", "session.queued")
        ]
        gaps += [b - a for a, b in itertools.pairwise(times)]
    return max(gaps) if gaps else float("nan")


def _live_echo(url: str, protocol_name: str, tls_cafile: str | None, ready: Any, stop: Any, out: Any) -> None:
    """In its own process (so this one's work on thousands of sockets does not time it): a live session
    sending the protocol's probe through the gateway every 5 ms; sends ``(sent_at, rtt)`` pairs to ``out``."""
    protocol = PROTOCOLS[protocol_name]
    tls = ssl.create_default_context(cafile=tls_cafile) if tls_cafile else None

    async def run() -> None:
        ws = await open_session(url, tls)
        ready.set()
        samples: list[tuple[float, float]] = []
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                await ws.send(protocol.probe)
                await ws.recv()
                samples.append((t0, time.monotonic() - t0))
                await asyncio.sleep(0.005)
        finally:
            out.put(samples)
            await ws.close()

    asyncio.run(run())


def _rtts_within(samples: list[tuple[float, float]], windows: list[Window]) -> list[float]:
    return [rtt for t, rtt in samples if any(a <= t <= b for a, b in windows)]


def _print_row(row: dict[str, Any]) -> None:
    print(
        f"  {row['waiting']:>6} waiting: lag p50 {row['lag_p50_ms']:7.1f} ms  p95 {row['lag_p95_ms']:7.1f} ms"
        f"  (median burst p95 {row['burst_p95_ms']:7.1f} ms)  max {row['lag_max_ms']:7.1f} ms"
        f"  missed {row['missed']}  max gap {row['max_gap_s']:.2f} s  gateway CPU {row['cpu_us']:.0f} us/update"
        f"  gateway RSS {row['rss_mb']:.0f} MB  (connect {row['connect_s']:.1f} s)"
        f"  bursts p95 {' '.join(f'{b:.0f}' for b in row['bursts_p95_ms'])} ms",
        flush=True,
    )


async def bench_waiting(
    cluster: Cluster, protocol: Protocol, levels: list[int], budget_s: float, client_wait: str
) -> list[dict[str, Any]]:
    """Step through ``levels`` until a step misses the target or ``budget_s`` is spent; one row per step."""
    clients: list[LeanClient] = []
    rows: list[dict[str, Any]] = []
    hits = HitCounter()
    # A live session on the other worker, talking through the gateway the whole time: what the bursts
    # cost the sessions that are talking.
    ctx = multiprocessing.get_context("fork")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    cafile = str(cluster.cert) if cluster.tls else None
    live = ctx.Process(
        target=_live_echo,
        args=(cluster.gateway_ws(protocol), protocol.name, cafile, ready, stop, out),
        daemon=True,
    )
    live.start()
    if not await asyncio.to_thread(ready.wait, 30):
        raise RuntimeError("the live echo session did not start")
    started = time.monotonic()
    try:
        for level in levels:
            if time.monotonic() - started > budget_s:
                break
            row = await step(
                cluster.port,
                protocol.path,
                cluster.ssl,
                cluster.gateway.pid,
                clients,
                hits,
                level,
                client_wait,
            )
            for _ in range(7):  # let every client see periodic updates; answer pings meanwhile
                await asyncio.sleep(0.5)
                for c in clients:
                    c.process()
            row["max_gap_s"] = _max_update_gap(clients, row["since"])
            row["rss_mb"] = cluster.gateway_rss_mb()
            rows.append(row)
            _print_row(row)
            if row["burst_p95_ms"] >= LAG_TARGET_S * 1000:
                break
    finally:
        for c in clients:
            c.leave()
        stop.set()
        samples: list[tuple[float, float]] = await asyncio.to_thread(out.get, True, 30)
        live.join(10)
    for row in rows:
        rtts = _rtts_within(samples, row["windows"])
        row["live_p50_ms"], row["live_p95_ms"] = pct(rtts, 0.5) * 1000, pct(rtts, 0.95) * 1000
        row["live_max_ms"], row["live_frames"] = max(rtts, default=math.nan) * 1000, len(rtts)
        print(
            f"  {row['waiting']:>6} waiting: live session RTT during the bursts p50 {row['live_p50_ms']:.2f}"
            f" ms  p95 {row['live_p95_ms']:.2f} ms  max {row['live_max_ms']:.2f} ms ({len(rtts)} frames)"
        )
    return rows


async def bench_peer(port: int, pid: int, levels: list[int], client_wait: str) -> list[dict[str, Any]]:
    """The same clients, bursts and levels against the bare fan-out server (bench/fanout_floor.py)."""
    clients: list[LeanClient] = []
    rows: list[dict[str, Any]] = []
    hits = HitCounter()
    try:
        for level in levels:
            row = await step(port, "/ws/duplex", None, pid, clients, hits, level, client_wait)
            rows.append(row)
            print(
                f"  {row['waiting']:>6} waiting, bare fan-out peer: lag p50 {row['lag_p50_ms']:7.1f} ms"
                f"  p95 {row['lag_p95_ms']:7.1f} ms  (median burst p95 {row['burst_p95_ms']:7.1f} ms)"
                f"  missed {row['missed']}  CPU {row['cpu_us']:.0f} us/update"
                f"  bursts p95 {' '.join(f'{b:.0f}' for b in row['bursts_p95_ms'])} ms",
                flush=True,
            )
    finally:
        for c in clients:
            c.leave()
    return rows
