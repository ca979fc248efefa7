"""Gateway benchmark: hop latency, ETA accuracy, and how many waiting clients one core keeps updated.

    .venv/bin/python bench/bench_gateway.py [--quick] [--max-clients 10000] [--budget-s 240]

Everything runs on loopback against mock workers (tests/mock_worker.py); the gateway is a real
``gateway.py --http`` process: one single-threaded event loop, so it uses at most one core. For part 3, where
the machine has two or more CPUs, the gateway is pinned to the first and this process (the clients) and the
mock workers to the others, so that the gateway has one core of its own, as the result claims; on a shared
machine, where a pinned process cannot move off a core someone else is busy on, ``--no-pin`` leaves it to the
scheduler. Parts 1 and 2 are never pinned, as start_all.sh does not pin: pinned, a frame through the gateway
wakes a process on the other CPU at every step, and on a VM guest that halts at once when idle each such
wake-up is an exit to the host (the hop's median rose by about a tenth of a millisecond on the development VM).

1. Hop latency: a 100-byte binary frame echoed by the mock worker, round trip through the gateway vs.
   straight to the worker, interleaved rounds in the same run; p50/p95 and what the hop adds.
2. ETA accuracy: a seeded mixed workload (duplex sessions 100-300 ms, HTTP chat/transcribe 30-100 ms,
   Poisson arrivals faster than two workers serve) — the ETA each WebSocket client was first given
   vs. the wait it had (``session.queue_done.waited_s``): mean absolute error.
3. Waiting clients: a lean client (hand-written WebSocket over asyncio.Protocol; thousands of sockets in
   one process) fills the queue in steps; at each step the served client leaves five times (a "burst":
   every waiting client moves up; the step's count is the fewest waiting at any of its bursts), and the
   lag from that moment until each waiting client receives its new position is measured. The result is
   the largest step whose median per-burst lag p95 is under 100 ms (the median keeps one burst stalled by
   another tenant of a shared machine from deciding it; the pooled p95 over all bursts and each burst's
   p95 are printed too). During a burst the clients' process naps 0.5 ms at a time instead of sleeping
   in epoll_wait, so that the gateway's sends do not pay to wake it up, as remote clients would not make
   them; its lags are up to that much late, against the gateway (``--client-wait epoll`` waits asyncio's
   own way; ``_wait_for_frames`` says more). "max gap" is the longest time a client went without an
   update (the periodic
   ones are due every 3 s). Meanwhile a live session on the second worker echoes a frame through the
   gateway every 5 ms from its own process: its round trips during the bursts show what telling
   thousands of waiting clients costs the sessions that are talking. The peer: at the gateway's last two
   steps, the same clients and bursts against bench/fanout_floor.py, a bare asyncio server pinned to the same
   core that only writes each waiting client its new position. Its lag is the floor this machine sets for a
   server built like ours (one event loop, one send per client); the gap to it is the gateway's own work.

Ends with ``RESULT hop_p95_ms=... eta_mae_s=... max_waiting_clients=...``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import ctypes.util
import gc
import itertools
import json
import math
import multiprocessing
import os
import random
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from machine import cpu_model, idle_note
from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
LAG_TARGET_S = 0.100
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, check: Callable[[httpx.Response], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check(httpx.get(url, timeout=1)):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready in {timeout} s")


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def spawn(args: list[str], tmp: Path, cpu: int | None) -> subprocess.Popen[bytes]:
    """Start ``python *args`` in ``tmp`` (output to procs.log), pinned to ``cpu`` when one is given."""

    def pin() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    env = {k: v for k, v in os.environ.items() if k != "DUPLEX_API_KEY"}
    log = open(tmp / "procs.log", "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [PY, *args], stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin, env=env, cwd=tmp
    )


def cpu_s(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Cluster:
    """Mock workers and one gateway, stopped on exit."""

    def __init__(self, tmp: Path, n_workers: int, service: dict[str, Any], gateway_cpu: int | None) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.worker_ports = [free_port() for _ in range(n_workers)]
        for i, port in enumerate(self.worker_ports):
            self._spawn(
                [str(ROOT / "tests" / "mock_worker.py"), "--port", str(port), "--index", str(i)], tmp, None
            )
        for port in self.worker_ports:
            wait_http(f"http://127.0.0.1:{port}/health", lambda r: r.status_code == 200)
        self.port = free_port()
        config = tmp / f"gw_{self.port}.json"
        config.write_text(json.dumps({"service": {"log_dir": str(tmp), "data_dir": str(tmp), **service}}))
        workers = ",".join(f"127.0.0.1:{p}" for p in self.worker_ports)
        args = [str(ROOT / "gateway.py"), "--http", "--host", "127.0.0.1", "--port", str(self.port)]
        self.gateway = self._spawn([*args, "--workers", workers, "--config", str(config)], tmp, gateway_cpu)
        wait_http(self.http + "/health", lambda r: r.json()["status"] == "ok")

    def _spawn(self, args: list[str], tmp: Path, cpu: int | None) -> subprocess.Popen[bytes]:
        proc = spawn(args, tmp, cpu)
        self.procs.append(proc)
        return proc

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_ws(self, i: int = 0) -> str:
        return f"ws://127.0.0.1:{self.worker_ports[i]}/ws/duplex"

    def gateway_ws(self, query: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}/ws/duplex{query}"

    def gateway_rss_mb(self) -> float:
        return rss_mb(self.gateway.pid)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else float("nan")


# --------------------------------------------------------------------------- 1. hop latency


async def _open_session(url: str, tries: int = 50) -> ClientConnection:
    for _ in range(tries):  # the worker may still be tearing down the previous session
        ws = await connect(url, compression=None, ping_interval=None, proxy=None, open_timeout=10)
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "session.created":
                return ws
            if event["type"] == "error":
                await ws.close()
                await asyncio.sleep(0.05)
                break
    raise RuntimeError(f"no session on {url}")


async def _round_trips(url: str, n: int) -> list[float]:
    ws = await _open_session(url)
    payload = bytes(range(100))
    times = []
    try:
        for _ in range(20):  # warm-up
            await ws.send(payload)
            await ws.recv()
        for _ in range(n):
            t0 = time.perf_counter()
            await ws.send(payload)
            reply = await ws.recv()
            times.append(time.perf_counter() - t0)
            assert reply == payload
    finally:
        await ws.close()
    return times


async def bench_hop(cluster: Cluster, rounds: int, per_round: int) -> dict[str, float]:
    direct: list[float] = []
    via: list[float] = []
    ms = 1000.0
    for i in range(rounds):
        d = await _round_trips(cluster.worker_ws(0), per_round)
        v = await _round_trips(cluster.gateway_ws(), per_round)
        direct += d
        via += v
        # Per round, so that a round another tenant of the machine disturbed shows as one.
        print(
            f"   round {i + 1}: direct p50 / p95 {pct(d, 0.5) * ms:.3f} / {pct(d, 0.95) * ms:.3f} ms,"
            f" through the gateway {pct(v, 0.5) * ms:.3f} / {pct(v, 0.95) * ms:.3f} ms",
            flush=True,
        )
    out = {
        "direct_p50": pct(direct, 0.5) * ms,
        "direct_p95": pct(direct, 0.95) * ms,
        "gateway_p50": pct(via, 0.5) * ms,
        "gateway_p95": pct(via, 0.95) * ms,
        "n": len(via),
    }
    out["added_p50"] = out["gateway_p50"] - out["direct_p50"]
    out["added_p95"] = out["gateway_p95"] - out["direct_p95"]
    return out


# --------------------------------------------------------------------------- 2. ETA accuracy


async def _duplex_client(url: str, start: float, results: list[tuple[float, float]]) -> None:
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    eta = 0.0
    async with await connect(url, compression=None, ping_interval=None, proxy=None, open_timeout=30) as ws:
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


async def bench_eta(cluster: Cluster, n: int, seed: int = 7) -> dict[str, float]:
    rng = random.Random(seed)
    results: list[tuple[float, float]] = []
    tasks = []
    t = time.monotonic() + 0.2
    async with httpx.AsyncClient(base_url=cluster.http, timeout=120) as client:
        for _ in range(n):
            t += rng.expovariate(1 / 0.06)  # ~16 arrivals/s against ~2 workers x ~6/s
            if rng.random() < 0.7:
                ms = rng.uniform(100, 300)
                tasks.append(_duplex_client(cluster.gateway_ws(f"?duration_ms={ms:.0f}"), t, results))
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


# --------------------------------------------------------------------------- 3. waiting clients


class HitCounter:
    """Counts armed clients that received something; wakes the bench when all did."""

    def __init__(self) -> None:
        self.target = 0
        self.count = 0
        self.done = asyncio.Event()

    def arm(self, target: int) -> None:
        self.target, self.count = target, 0
        self.done.clear()
        if target == 0:
            self.done.set()

    def hit(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.done.set()


class LeanClient(asyncio.Protocol):
    """A minimal WebSocket client. ``data_received`` only timestamps raw chunks (cheap, so the clock
    reads when the bytes arrive); ``process`` parses them later into text frames and answers pings."""

    def __init__(self, host: str, hits: HitCounter) -> None:
        self.host, self.hits = host, hits
        self.transport: asyncio.Transport | None = None
        self.chunks: list[tuple[float, bytes]] = []
        self.buffer = b""
        self.open = False
        self.closed = False
        self.armed = False
        self.frames: list[tuple[float, dict[str, Any]]] = []
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET /ws/duplex HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        self.chunks.append((time.monotonic(), data))
        if self.armed:
            self.armed = False
            self.hits.hit()
        if not self.ready.done():
            self.process()

    def process(self) -> None:
        """Parse the chunks received so far."""
        for t, data in self.chunks:
            self.buffer += data
            if not self.open:
                head, sep, rest = self.buffer.partition(b"\r\n\r\n")
                if not sep:
                    continue
                if not head.startswith(b"HTTP/1.1 101"):
                    self._fail(head.split(b"\r\n", 1)[0].decode(errors="replace"))
                    return
                self.open, self.buffer = True, rest
            self._frames(t)
        self.chunks.clear()

    def _frames(self, t: float) -> None:
        while len(self.buffer) >= 2:
            opcode, length = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
            offset = 2
            if length == 126:
                if len(self.buffer) < 4:
                    return
                (length,), offset = struct.unpack(">H", self.buffer[2:4]), 4
            elif length == 127:
                if len(self.buffer) < 10:
                    return
                (length,), offset = struct.unpack(">Q", self.buffer[2:10]), 10
            if len(self.buffer) < offset + length:
                return
            payload, self.buffer = self.buffer[offset : offset + length], self.buffer[offset + length :]
            if opcode == 1:
                self.frames.append((t, json.loads(payload)))
                if not self.ready.done():
                    self.ready.set_result(None)
            elif opcode == 9:
                self._send_masked(0xA, payload)
            elif opcode == 8:
                self.closed = True

    def _send_masked(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        if self.transport is not None and len(payload) < 126:
            self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection lost before the first event"))

    def position(self) -> int | None:
        """The last position heard (0 once served)."""
        for _, event in reversed(self.frames):
            if "position" in event:
                return int(event["position"])
            if event["type"] in ("session.queue_done", "session.created"):
                return 0
        return None

    def moved_at(self, since: float, before: int) -> float | None:
        """When the first event after ``since`` said the client moved up."""
        for t, event in self.frames:
            if t >= since and (
                event.get("position", before) < before or event["type"] == "session.queue_done"
            ):
                return t
        return None

    def leave(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _connect_lean(port: int, count: int, hits: HitCounter, concurrency: int = 100) -> list[LeanClient]:
    loop = asyncio.get_running_loop()
    clients: list[LeanClient] = []
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            _, proto = await loop.create_connection(
                lambda: LeanClient(f"127.0.0.1:{port}", hits), "127.0.0.1", port
            )
            await asyncio.wait_for(proto.ready, 30)
            clients.append(proto)

    await asyncio.gather(*(one() for _ in range(count)))
    return clients


def _live_echo(url: str, ready: Any, stop: Any, out: Any) -> None:
    """In its own process (so this one's work on thousands of sockets does not time it): a live session
    echoing a 100-byte frame through the gateway every 5 ms; sends ``(sent_at, rtt)`` pairs to ``out``."""

    async def run() -> None:
        ws = await _open_session(url)
        ready.set()
        samples: list[tuple[float, float]] = []
        payload = bytes(range(100))
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                await ws.send(payload)
                await ws.recv()
                samples.append((t0, time.monotonic() - t0))
                await asyncio.sleep(0.005)
        finally:
            out.put(samples)
            await ws.close()

    asyncio.run(run())


def _rtts_within(samples: list[tuple[float, float]], windows: list[tuple[float, float]]) -> list[float]:
    return [rtt for t, rtt in samples if any(a <= t <= b for a, b in windows)]


#: How this process waits for the waiting clients' frames during a burst (``--client-wait``).
CLIENT_WAIT = "nap"
NAP_S = 0.0005


async def _wait_for_frames(mode: str) -> None:
    """Keep this process's event loop out of a blocking epoll_wait while a burst arrives (modes nap, spin).

    This process stands in for thousands of remote clients. Asleep in epoll_wait, every frame the gateway
    sends it is a wake-up of a process on another CPU, and the gateway's send pays for it: an inter-processor
    interrupt, on a VM an exit to the host. Remote browsers put no such cost on the gateway's core; on the
    development VM perf showed it as the largest kernel symbol of the gateway's sends
    (_raw_spin_unlock_irqrestore, the wake-up). "nap" sleeps NAP_S at a time outside epoll, then reads whatever arrived: no wake-ups,
    little CPU, and the lags it stamps are up to about NAP_S late, against the server. "spin" polls without
    sleeping (a whole CPU; only where the machine has cores to spare). "epoll" is asyncio's own waiting.
    """
    if mode == "epoll":
        await asyncio.sleep(3600)
    while True:
        if mode == "nap":
            time.sleep(NAP_S)  # blocking on purpose: the loop must not wait in epoll meanwhile
        await asyncio.sleep(0)


BURSTS: list[tuple[float, float]] = []  # (start, last client told) of every burst


async def _trigger(clients: list[LeanClient], hits: HitCounter, timeout: float) -> tuple[list[float], int]:
    """The served client leaves; returns each waiting client's lag to its new position, and the misses."""
    for c in clients:
        c.process()
    served = [c for c in clients if not c.closed and c.position() == 0]
    waiting = [c for c in clients if not c.closed and (c.position() or 0) > 0]
    before = {id(c): c.position() or 0 for c in waiting}
    for c in waiting:
        c.armed = True
    hits.arm(len(waiting))
    waiter = asyncio.create_task(_wait_for_frames(CLIENT_WAIT))
    # This process stands in for thousands of remote clients and holds every frame they heard: a collection
    # of that heap stalls its loop (measured: 85-125 ms with 4,000-6,000 clients), and the bytes that
    # arrive meanwhile would be stamped late, a lag of the bench, not of the gateway. Collect between bursts.
    gc.disable()
    t0 = time.monotonic()
    BURSTS.append((t0, t0))
    for c in served:
        c.leave()
    try:
        lags: dict[int, float] = {}
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
        BURSTS[-1] = (t0, t0 + max(lags.values(), default=0.0))
    return list(lags.values()), len(waiting) - len(lags)


async def _step(
    port: int, pid: int, clients: list[LeanClient], hits: HitCounter, level: int, triggers: int
) -> dict[str, Any]:
    """One step of part 3: connect clients up to ``level`` waiting, then ``triggers`` bursts in a row.

    The row: the fewest waiting at any burst, the pooled lag percentiles (p95 inf where a client never
    heard), each burst's p95 and their median, and the server's (``pid``) CPU per update.
    """
    t_conn = time.monotonic()
    # One served client plus ``level`` waiting at the last burst: every burst moves at least ``level`` up.
    target = level + triggers + 1
    clients.extend(await _connect_lean(port, target - len([c for c in clients if not c.closed]), hits))
    connect_s = time.monotonic() - t_conn
    await asyncio.sleep(0.5)
    since = time.monotonic()
    cpu_before = cpu_s(pid)
    lags: list[float] = []
    bursts: list[float] = []
    missed, fewest_waiting = 0, target
    for _ in range(triggers):
        got, miss = await _trigger(clients, hits, timeout=5.0)
        fewest_waiting = min(fewest_waiting, len(got) + miss)
        lags += got
        bursts.append(pct(got, 0.95) if not miss else float("inf"))
        missed += miss
        await asyncio.sleep(0.3)
    return {
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


async def bench_waiting(
    cluster: Cluster, levels: list[int], triggers: int, budget_s: float
) -> list[dict[str, Any]]:
    clients: list[LeanClient] = []
    rows: list[dict[str, Any]] = []
    hits = HitCounter()
    # A live session on the other worker, echoing through the gateway the whole time: what the bursts
    # cost the sessions that are talking.
    ctx = multiprocessing.get_context("fork")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    live = ctx.Process(target=_live_echo, args=(cluster.gateway_ws(), ready, stop, out), daemon=True)
    live.start()
    if not await asyncio.to_thread(ready.wait, 30):
        raise RuntimeError("the live echo session did not start")
    windows: list[list[tuple[float, float]]] = []
    started = time.monotonic()
    try:
        for level in levels:
            if time.monotonic() - started > budget_s:
                break
            first_burst = len(BURSTS)
            row = await _step(cluster.port, cluster.gateway.pid, clients, hits, level, triggers)
            windows.append(BURSTS[first_burst:])
            for _ in range(7):  # let every client see periodic updates; answer pings meanwhile
                await asyncio.sleep(0.5)
                for c in clients:
                    c.process()
            row["max_gap_s"] = _max_update_gap(clients, row["since"])
            row["rss_mb"] = cluster.gateway_rss_mb()
            rows.append(row)
            print(
                f"  {row['waiting']:>6} waiting: lag p50 {row['lag_p50_ms']:7.1f} ms  p95 {row['lag_p95_ms']:7.1f} ms"
                f"  (median burst p95 {row['burst_p95_ms']:7.1f} ms)  max {row['lag_max_ms']:7.1f} ms"
                f"  missed {row['missed']}  max gap {row['max_gap_s']:.2f} s  gateway CPU {row['cpu_us']:.0f} us/update"
                f"  gateway RSS {row['rss_mb']:.0f} MB  (connect {row['connect_s']:.1f} s)"
                f"  bursts p95 {' '.join(f'{b:.0f}' for b in row['bursts_p95_ms'])} ms",
                flush=True,
            )
            if row["burst_p95_ms"] >= LAG_TARGET_S * 1000:
                break
    finally:
        for c in clients:
            c.leave()
        stop.set()
        samples: list[tuple[float, float]] = await asyncio.to_thread(out.get, True, 30)
        live.join(10)
    for row, level_windows in zip(rows, windows, strict=False):
        rtts = _rtts_within(samples, level_windows)
        row["live_p50_ms"], row["live_p95_ms"] = pct(rtts, 0.5) * 1000, pct(rtts, 0.95) * 1000
        row["live_max_ms"], row["live_frames"] = max(rtts, default=math.nan) * 1000, len(rtts)
        print(
            f"  {row['waiting']:>6} waiting: live session echo RTT during the bursts p50 {row['live_p50_ms']:.2f}"
            f" ms  p95 {row['live_p95_ms']:.2f} ms  max {row['live_max_ms']:.2f} ms ({len(rtts)} frames)"
        )
    return rows


async def bench_peer(port: int, pid: int, levels: list[int], triggers: int) -> list[dict[str, Any]]:
    """Part 3 against the bare fan-out server (bench/fanout_floor.py): the same clients, trigger and levels."""
    clients: list[LeanClient] = []
    rows: list[dict[str, Any]] = []
    hits = HitCounter()
    try:
        for level in levels:
            row = await _step(port, pid, clients, hits, level, triggers)
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


# --------------------------------------------------------------------------- main


def _heap_for_reads() -> bool:
    """Serve this process's socket reads from the heap rather than a fresh mapping each (glibc only).

    asyncio reads with ``recv(256 KiB)``; the buffer is over glibc's initial mmap threshold (128 KiB), so
    each read maps, shrinks and later unmaps its own pages until something happens to raise the threshold.
    With thousands of clients in this process that costs more kernel time per burst than the server spends
    sending it: the clients, not the server, were the bottleneck in some runs (a fresh process) and not in
    others (one whose threshold an earlier large free had raised). At 1 MiB every run reads the same way.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 20))
    except (OSError, AttributeError):
        return False


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):
        return soft


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--max-clients", type=int, default=10_000)
    p.add_argument("--budget-s", type=float, default=240.0, help="time cap for part 3")
    p.add_argument("--parts", default="1,2,3", help="which parts to run (comma-separated)")
    p.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="part 3: do not pin the gateway to the first CPU and the rest to the others (a shared machine)",
    )
    p.add_argument(
        "--client-wait",
        choices=("nap", "epoll", "spin"),
        default="nap",
        help="part 3: how the clients wait for a burst's frames (see _wait_for_frames; default %(default)s)",
    )
    args = p.parse_args(argv)
    global CLIENT_WAIT  # read by _trigger, deep inside the asyncio parts
    CLIENT_WAIT = args.client_wait
    fds = _raise_fd_limit()
    heap_reads = _heap_for_reads()
    max_clients = min(args.max_clients, (fds - 200) // 2 if fds < 40_000 else args.max_clients)
    cpus = sorted(os.sched_getaffinity(0))
    gateway_cpu = cpus[0] if args.pin and len(cpus) > 1 else None
    pinned = f"pinned to CPU {gateway_cpu} in part 3" if gateway_cpu is not None else "not pinned"
    load = os.getloadavg()[0]
    print(
        f"bench_gateway: {cpu_model()}, {os.cpu_count()} CPUs, load {load:.1f}, gateway {pinned}, fd limit {fds}"
        f", part 3 clients wait by {CLIENT_WAIT}"
        f"{idle_note()}{'' if heap_reads else ', clients read through mmap (not glibc)'}"
    )
    levels = [
        lvl
        for lvl in (250, 500, 1000, 2000, 3000, 4000, 5000, 6000, 8000, 10_000, 15_000)
        if lvl <= max_clients
    ]
    if args.quick:
        levels = [lvl for lvl in levels if lvl <= 500]

    parts = {int(x) for x in args.parts.split(",") if x.strip()}
    nan = float("nan")
    hop = dict.fromkeys(
        ("direct_p50", "direct_p95", "gateway_p50", "gateway_p95", "added_p50", "added_p95", "n"), nan
    )
    eta = dict.fromkeys(("clients", "queued", "mae", "bias", "mean_wait", "p95_error"), nan)
    rows: list[dict[str, Any]] = []
    peer_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_gw_") as tmp:
        base = {"health_interval_s": 0.5, "queue_update_interval_s": 3.0}
        if 1 in parts:
            cluster = Cluster(Path(tmp), 1, base, None)
            try:
                print("1. hop latency (100-byte echo, round trip)", flush=True)
                hop = asyncio.run(bench_hop(cluster, 2 if args.quick else 5, 200 if args.quick else 600))
            finally:
                cluster.stop()
        if 2 in parts:
            eta_service = {**base, "eta_audio_duplex_s": 0.2, "eta_chat_s": 0.065, "eta_transcribe_s": 0.065}
            cluster = Cluster(Path(tmp), 2, eta_service, None)
            try:
                print("2. ETA accuracy (mixed workload)", flush=True)
                eta = asyncio.run(bench_eta(cluster, 40 if args.quick else 150))
            finally:
                cluster.stop()
        if 3 in parts:
            if gateway_cpu is not None:  # the clients and the mock workers (spawned from here) off its core
                os.sched_setaffinity(0, set(cpus[1:]))
            cluster = Cluster(Path(tmp), 2, {**base, "max_queue_size": 20_000}, gateway_cpu)
            try:
                print(
                    "3. waiting clients kept updated (lag from a dispatch to each client's new position)",
                    flush=True,
                )
                rows = asyncio.run(bench_waiting(cluster, levels, triggers=5, budget_s=args.budget_s))
            finally:
                cluster.stop()
        if 3 in parts and rows:
            # The peer at the steps where the gateway's result was decided (its last two).
            port = free_port()
            floor = spawn(
                [str(ROOT / "bench" / "fanout_floor.py"), "--port", str(port)], Path(tmp), gateway_cpu
            )
            try:
                wait_port(port)
                print("   the same against a bare fan-out server on the same core (bench/fanout_floor.py)")
                peer_rows = asyncio.run(bench_peer(port, floor.pid, levels[: len(rows)][-2:], triggers=5))
            finally:
                floor.kill()
                floor.wait(5)

    good = [r["waiting"] for r in rows if r["burst_p95_ms"] < LAG_TARGET_S * 1000]
    max_waiting = max(good) if good else 0
    print()
    print("| measure | value |")
    print("| --- | --- |")
    print(f"| echo RTT direct to worker p50 / p95 | {hop['direct_p50']:.3f} / {hop['direct_p95']:.3f} ms |")
    print(f"| echo RTT through gateway p50 / p95 | {hop['gateway_p50']:.3f} / {hop['gateway_p95']:.3f} ms |")
    print(
        f"| added by the gateway hop p50 / p95 | {hop['added_p50']:.3f} / {hop['added_p95']:.3f} ms ({hop['n']} frames) |"
    )
    print(
        f"| ETA mean abs error | {eta['mae']:.3f} s (p95 {eta['p95_error']:.3f} s, bias {eta['bias']:+.3f} s, "
        f"mean wait {eta['mean_wait']:.3f} s, {eta['queued']} queued clients) |"
    )
    for r in rows:
        print(
            f"| {r['waiting']} waiting: update lag p50 / p95 (median burst p95) / max | {r['lag_p50_ms']:.1f} / "
            f"{r['lag_p95_ms']:.1f} ({r['burst_p95_ms']:.1f}) / {r['lag_max_ms']:.1f} ms, "
            f"max gap {r['max_gap_s']:.2f} s, gateway RSS {r['rss_mb']:.0f} MB |"
        )
    for r in rows:
        if "live_p50_ms" in r:
            print(
                f"| {r['waiting']} waiting: live session echo RTT during the bursts p50 / p95 / max | "
                f"{r['live_p50_ms']:.2f} / {r['live_p95_ms']:.2f} / {r['live_max_ms']:.2f} ms |"
            )
    for r in peer_rows:
        print(
            f"| {r['waiting']} waiting, bare fan-out peer: update lag p50 / p95 (median burst p95) | "
            f"{r['lag_p50_ms']:.1f} / {r['lag_p95_ms']:.1f} ({r['burst_p95_ms']:.1f}) ms, CPU {r['cpu_us']:.0f} us/update |"
        )
    print(f"| waiting clients with update lag p95 < 100 ms (median of 5 bursts) | {max_waiting} |")
    big = [r for r in rows if r["waiting"] >= 900]
    if big:
        cpu_us = statistics.median(r["cpu_us"] for r in big)
        print(
            f"| gateway CPU per update (>= 900 waiting) | {cpu_us:.0f} us: one uncontended core sends "
            f"{0.095 / (cpu_us / 1e6):.0f} updates in 95 ms |"
        )
    print(
        f"RESULT hop_p95_ms={hop['added_p95']:.3f} eta_mae_s={eta['mae']:.3f} max_waiting_clients={max_waiting}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
