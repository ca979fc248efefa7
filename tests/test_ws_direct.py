"""Queue updates written straight to uvicorn's transports (core/server/ws_direct.py): the frames are valid
RFC 6455 frames a real client reads in order with the server's own, and the writer stands aside where it
cannot be used (another server, compression, a closed or backlogged socket)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvicorn
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedOK
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from core.gateway.ws_direct import MAX_BACKLOG_BYTES, direct_text_writer, frame_text

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


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65_535, 65_536, 200_000])
def test_frames_parse_as_final_text_frames_of_every_length_class(size: int) -> None:
    payload = ("é" * size).encode()[:size]
    frame = _parse(frame_text(payload))
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.TEXT, True, payload)
    assert not (frame.rsv1 or frame.rsv2 or frame.rsv3)


def test_no_writer_for_a_send_that_is_not_uvicorns_sansio_protocol() -> None:
    async def send(message: dict[str, Any]) -> None:
        pass

    assert direct_text_writer(send) is None


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
        write = direct_text_writer(send)
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
        write = direct_text_writer(send)
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
        writers.append(direct_text_writer(send))
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
        write = direct_text_writer(send)
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
