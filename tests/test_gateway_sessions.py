"""The one gateway session behind both WebSocket APIs (``/ws/duplex`` and ``/v1/realtime``): each test runs
on both, against mock workers (tests/mock_worker.py) that serve both.

Covers: waiting in the queue (positions, an update at once when someone ahead leaves, text held and audio
dropped with one note, ``session.queue_done`` with the dispatch order), the worker's close code reaching
the client, a lost worker (``worker_lost``, close 1011), and the path queue updates take: the transport
path in the real gateway process, the ASGI path when a middleware outside the app wraps ``send``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from core.config import Config, ServiceConfig
from core.gateway.app import create_app
from tests.duplex_client import free_port, stop
from tests.test_gateway import Cluster, metric, no_leaks, open_ws, start_gateway, start_mock, wait_until

pytestmark = pytest.mark.slow
PATHS = ["/ws/duplex", "/v1/realtime"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("gw-sessions")
    ports = [free_port(), free_port()]
    mocks = [start_mock(p, i, tmp) for i, p in enumerate(ports)]
    gw_port = free_port()
    service = {"eta_audio_duplex_s": 0.1, "health_interval_s": 0.2, "queue_update_interval_s": 3.0}
    gateway = start_gateway(gw_port, ports, tmp, service)
    c = Cluster(tmp, gw_port, ports, mocks, gateway)
    try:
        wait_until(c.all_healthy, what="gateway with both workers healthy")
        yield c
    finally:
        for proc in [gateway, *c.mocks]:
            stop(proc)


async def next_event(ws: ClientConnection, kind: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """The next text event (of ``kind`` when given), skipping binary frames."""
    async with asyncio.timeout(timeout):
        while True:
            raw = await ws.recv()
            if isinstance(raw, str):
                event = json.loads(raw)
                if kind is None or event["type"] == kind:
                    return event


def error_code(event: dict[str, Any]) -> str:
    """The code of an ``error`` event in either API's shape."""
    assert event["type"] == "error", event
    return event["error"]["code"] if isinstance(event.get("error"), dict) else event["code"]


def audio_frame(path: str) -> str | bytes:
    """A piece of audio as each API sends it: an Opus packet frame, or a Realtime append event."""
    if path == "/ws/duplex":
        return b"\x03\x00abc"
    return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(960)).decode()})


async def open_session(url: str) -> ClientConnection:
    """A session on a worker (waiting through the queue while an earlier one still releases its worker)."""
    ws = await open_ws(url)
    await next_event(ws, "session.created", timeout=10)
    return ws


async def _queue_walk(url: str, busy: list[ClientConnection], path: str) -> None:
    """Two clients wait behind ``busy`` (every worker); the first leaves, then a worker frees up."""
    first = await open_ws(url)
    queued = await next_event(first)
    assert (queued["type"], queued["position"]) == ("session.queued", 1)
    second = await open_ws(url)
    queued = await next_event(second)
    assert (queued["type"], queued["position"]) == ("session.queued", 2)
    await second.send(json.dumps({"type": "session.update", "session": {"instructions": "x"}}))  # held
    await second.send(audio_frame(path))  # dropped, said once
    await second.send(audio_frame(path))
    note = await next_event(second, "error")
    assert error_code(note) == "not_ready" and not note.get("fatal")
    await first.close()
    # at once, not at the 3 s tick; and nothing before it: the second audio frame got no second note
    update = await next_event(second, timeout=2)
    assert (update["type"], update["position"], update["queue_length"]) == ("session.queue_update", 1, 1)
    await busy[0].close()
    done = await next_event(second)
    assert done["type"] == "session.queue_done" and done["event_id"].startswith("dispatch-")
    assert done["waited_s"] > 0
    assert (await next_event(second))["type"] == "session.created"
    assert (await next_event(second))["type"] == "session.updated"  # the held event, forwarded
    for ws in (second, *busy[1:]):
        await ws.close()


@pytest.mark.parametrize("path", PATHS)
async def test_both_apis_wait_in_the_queue_alike(cluster: Cluster, path: str) -> None:
    url = f"ws://127.0.0.1:{cluster.gateway_port}{path}"
    transport_before = metric(cluster, 'gateway_queue_update_clients_total{path="transport"}')
    busy = [await open_session(url), await open_session(url)]
    await _queue_walk(url, busy, path)
    wait_until(lambda: no_leaks(cluster), timeout=5, what="no leaks")
    # the real gateway process (uvicorn's websockets-sansio) writes every client's updates directly
    assert metric(cluster, 'gateway_queue_update_clients_total{path="transport"}') - transport_before == 4
    assert metric(cluster, 'gateway_queue_update_clients_total{path="asgi"}') == 0


@pytest.mark.parametrize("path", PATHS)
async def test_both_apis_forward_the_workers_close_code(cluster: Cluster, path: str) -> None:
    ws = await open_ws(f"ws://127.0.0.1:{cluster.gateway_port}{path}?duration_ms=50&close_code=4001")
    kinds = []
    with pytest.raises(ConnectionClosed):
        while True:
            kinds.append((await next_event(ws))["type"])
    assert ws.close_code == 4001
    # a client that never waited: session.queue_done on our protocol; a stock Realtime client expects
    # session.created first
    expected = ["session.created"] if path == "/v1/realtime" else ["session.queue_done", "session.created"]
    assert kinds[: len(expected)] == expected
    wait_until(lambda: no_leaks(cluster), timeout=5, what="no leaks")


@pytest.mark.parametrize("path", PATHS)
async def test_both_apis_report_a_lost_worker(cluster: Cluster, path: str) -> None:
    ws = await open_ws(f"ws://127.0.0.1:{cluster.gateway_port}{path}")
    created = await next_event(ws, "session.created", timeout=10)
    index = int(created["session"]["id"].split("-")[0].removeprefix("mock"))
    cluster.mocks[index].send_signal(signal.SIGKILL)
    error = await next_event(ws, "error", timeout=3)
    assert error_code(error) == "worker_lost"
    with pytest.raises(ConnectionClosed):
        await next_event(ws, timeout=3)
    assert ws.close_code == 1011
    cluster.mocks[index].wait(5)
    cluster.mocks[index] = start_mock(cluster.worker_ports[index], index, cluster.tmp)
    wait_until(cluster.all_healthy, timeout=10, what="the restarted worker back in the pool")
    wait_until(lambda: no_leaks(cluster), timeout=5, what="no leaks")


# --------------------------------------------------------------------------- the ASGI path


class _WrapsSend:
    """A middleware outside the gateway app that wraps ``send``, as a logging or tracing one would."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def wrapped(message: Any) -> None:
            await send(message)

        await self.app(scope, receive, wrapped)


@contextlib.asynccontextmanager
async def _in_process_gateway(worker_port: int) -> AsyncIterator[str]:
    """The gateway app on this event loop (uvicorn, websockets-sansio), behind :class:`_WrapsSend`."""
    service = ServiceConfig(health_interval_s=0.2, queue_update_interval_s=3.0, eta_audio_duplex_s=0.1)
    app = create_app(Config(service=service), [f"127.0.0.1:{worker_port}"])
    port = free_port()
    config = uvicorn.Config(
        _WrapsSend(app), host="127.0.0.1", port=port, ws="websockets-sansio", log_level="warning"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=2) as client:
            async with asyncio.timeout(15):
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get("/health")).json()["status"] == "ok":
                            break
                    await asyncio.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        await task


@pytest.mark.parametrize("path", PATHS)
async def test_queue_updates_take_the_asgi_path_when_send_is_wrapped(tmp_path: Path, path: str) -> None:
    worker_port = free_port()
    mock = await asyncio.to_thread(start_mock, worker_port, 0, tmp_path)
    try:
        async with _in_process_gateway(worker_port) as base:
            url = base.replace("http", "ws") + path
            busy = [await open_session(url)]
            await _queue_walk(url, busy, path)
            async with httpx.AsyncClient(base_url=base, timeout=5) as client:
                text = (await client.get("/metrics")).text
    finally:
        await asyncio.to_thread(stop, mock)
    assert 'gateway_queue_update_clients_total{path="asgi"} 3' in text
    assert 'gateway_queue_update_clients_total{path="transport"} 0' in text
