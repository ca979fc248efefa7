"""Queue updates (core/gateway/queue_updates.py). On the transport path the frames are valid RFC 6455 frames
a real client reads in order with the server's own, and the writer stands aside where it cannot be used
(another server, compression, a closed or backlogged socket). On the ASGI path a client has at most one
send in flight, hears the latest status, and hears nothing once its updates are stopped."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvicorn
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedOK
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol
from websockets.streams import StreamReader

from core.gateway.queue_updates import MAX_BACKLOG_BYTES, SERVER_SEND_KEY, QueueUpdates, direct_writer

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def _parse(data: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    gen = Frame.parse(reader.read_exact, mask=False)
    try:
        next(gen)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    raise AssertionError("incomplete frame")


class _Transport(asyncio.WriteTransport):
    """Collects what is written."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class _Connection:
    """A server's per-connection object laid out as uvicorn's websockets-sansio one: ``conn``, ``transport``,
    and ``send`` as its method; the handshake done through the websockets protocol object itself."""

    def __init__(self) -> None:
        self.conn, self.transport = ServerProtocol(), _Transport()
        key = base64.b64encode(os.urandom(16)).decode()
        self.conn.receive_data(
            f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        request = self.conn.events_received()[0]
        self.conn.send_response(self.conn.accept(request))
        self.conn.data_to_send()  # the handshake answer, not under test

    async def send(self, message: dict[str, Any]) -> None:
        pass


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65_535, 65_536, 200_000])
def test_frames_parse_as_final_text_frames_of_every_length_class(size: int) -> None:
    payload = ("é" * size).encode()[:size]
    server = _Connection()
    write = direct_writer(server.send)
    assert write is not None and write(payload)
    frame = _parse(bytes(server.transport.data))
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.TEXT, True, payload)
    assert not (frame.rsv1 or frame.rsv2 or frame.rsv3)


def test_no_writer_for_a_send_that_is_not_a_websockets_protocol_connection() -> None:
    async def send(message: dict[str, Any]) -> None:
        pass

    class Other:  # a server object of another kind: a transport, but no websockets protocol object
        conn = object()
        transport = _Transport()

        async def send(self, message: dict[str, Any]) -> None:
            pass

    assert direct_writer(send) is None
    assert direct_writer(Other().send) is None
    assert direct_writer(None) is None
    assert QueueUpdates({}, _never_called).path == "asgi"  # no server send on the scope
    assert QueueUpdates({SERVER_SEND_KEY: _Connection().send}, _never_called).path == "transport"


async def _never_called(text: str) -> None:
    raise AssertionError("the transport path must not use the ASGI send")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def _serve(app: App, *, deflate: bool) -> AsyncIterator[int]:
    port = _free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        ws="websockets-sansio",
        ws_per_message_deflate=deflate,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


async def test_direct_frames_reach_a_real_client_in_order_with_the_servers_own() -> None:
    wrote: list[bool] = []
    done = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        write = direct_writer(send)
        assert write is not None
        await send({"type": "websocket.send", "text": "one"})
        wrote.extend([write("två".encode()), write(b"x" * 70_000)])
        await send({"type": "websocket.send", "text": "four"})
        await receive()  # until the client leaves
        wrote.append(write(b"after close"))
        done.set()

    async with _serve(app, deflate=False) as port:
        async with connect(f"ws://127.0.0.1:{port}/", compression=None) as ws:
            got = [await asyncio.wait_for(ws.recv(), 5) for _ in range(4)]
        await asyncio.wait_for(done.wait(), 5)
    assert got == ["one", "två", "x" * 70_000, "four"]
    assert wrote == [True, True, False]  # nothing written to a closed connection


async def test_nothing_is_written_after_the_server_sends_its_close() -> None:
    wrote: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        write = direct_writer(send)
        assert write is not None
        wrote.append(write(b"before"))
        await send({"type": "websocket.close", "code": 1000})
        wrote.append(write(b"after our close"))  # the client has not answered yet: the transport is open
        await receive()

    async with _serve(app, deflate=False) as port, connect(f"ws://127.0.0.1:{port}/", compression=None) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "before"
        with pytest.raises(ConnectionClosedOK):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1000
    assert wrote == [True, False]


async def test_no_writer_when_the_client_negotiated_compression() -> None:
    writers: list[object] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        writers.append(direct_writer(send))
        await send({"type": "websocket.send", "text": "plain path"})
        await receive()

    async with _serve(app, deflate=True) as port, connect(f"ws://127.0.0.1:{port}/") as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "plain path"
    assert writers == [None]


async def test_a_client_that_does_not_read_gets_no_more_once_its_backlog_is_full() -> None:
    outcome: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        write = direct_writer(send)
        assert write is not None
        chunk = b"y" * 60_000
        written = 0
        for _ in range(2_000):  # 120 MB at most: far past any socket buffer
            if not write(chunk):
                break
            written += 1
            await asyncio.sleep(0)
        transport = send.__self__.transport
        outcome.set_result((written, transport.get_write_buffer_size()))
        await receive()

    async with _serve(app, deflate=False) as port:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        written, backlog = await asyncio.wait_for(outcome, 30)  # never reads past the handshake
        writer.close()
    assert 0 < written < 2_000
    assert MAX_BACKLOG_BYTES < backlog <= MAX_BACKLOG_BYTES + 70_000  # stopped at the first write past it


# --------------------------------------------------------------------------- the ASGI path


def _event(text: str) -> tuple[str, int]:
    event = json.loads(text)
    return event["type"], event["position"]


async def test_asgi_path_has_one_send_in_flight_and_sends_the_latest_status_next() -> None:
    sent: list[str] = []
    release, in_flight, two_sent = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def send_text(text: str) -> None:
        in_flight.set()
        await release.wait()
        sent.append(text)
        if len(sent) == 2:
            two_sent.set()

    updates = QueueUpdates({}, send_text)
    assert updates.path == "asgi"
    updates.sink(3, 1.0, 3, True)
    await asyncio.wait_for(in_flight.wait(), 5)  # the first send waits on a client that does not read
    updates.sink(2, 0.5, 2, False)
    updates.sink(1, 0.25, 1, False)  # replaces the one not sent yet
    release.set()
    await asyncio.wait_for(two_sent.wait(), 5)
    await updates.stop()
    assert [_event(t) for t in sent] == [("session.queued", 3), ("session.queue_update", 1)]


async def test_asgi_path_sends_nothing_once_stopped() -> None:
    sent: list[str] = []
    release, in_flight = asyncio.Event(), asyncio.Event()

    async def send_text(text: str) -> None:
        in_flight.set()
        await release.wait()
        sent.append(text)

    updates = QueueUpdates({}, send_text)
    updates.sink(2, 1.0, 2, True)
    await asyncio.wait_for(in_flight.wait(), 5)
    updates.sink(1, 0.5, 1, False)
    await updates.stop()  # what follows (session.queue_done) must not be overtaken by an old status
    release.set()
    updates.sink(1, 0.1, 1, False)
    for _ in range(10):  # let any task that could still send run (none may)
        await asyncio.sleep(0)
    assert sent == []


async def test_asgi_path_survives_a_failed_send() -> None:
    sent: list[str] = []
    delivered = asyncio.Event()
    failures = [OSError("the client is gone")]

    async def send_text(text: str) -> None:
        if failures:
            raise failures.pop()
        sent.append(text)
        delivered.set()

    updates = QueueUpdates({}, send_text)
    updates.sink(2, 1.0, 2, True)
    for _ in range(10):  # the failing send runs and is dropped
        await asyncio.sleep(0)
    updates.sink(1, 0.5, 1, False)
    await asyncio.wait_for(delivered.wait(), 5)
    await updates.stop()
    assert [_event(t) for t in sent] == [("session.queue_update", 1)]
