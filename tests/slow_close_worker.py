"""A fake worker, run on the test's own event loop, that finishes a session's close only when told to.

It speaks just enough of the worker's surface for the gateway: ``GET /health`` and one WebSocket session
at a time on ``/ws/duplex`` (a second one meanwhile gets ``error`` ``busy`` and close 1013, as a real
worker answers). When the gateway sends a close frame it holds the reply until ``finish_close()``, so a
test can look at the queue while a session is still closing; ``abandoned`` counts the closes the gateway
stopped waiting for before that.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct

from websockets.frames import Frame, Opcode

from core.protocol import ErrorCode, SessionCreated, SessionInfo, dump_event, error_event


def frame_text(payload: bytes) -> bytes:
    """One unmasked text frame, as a server sends it."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class SlowCloseWorker:
    """Serves on 127.0.0.1; ``port`` after ``start()``."""

    def __init__(self) -> None:
        self.port = 0
        self.sessions = 0
        self.refused = 0
        self.abandoned = 0  # closes the gateway stopped waiting for (it drops the connection after a while)
        self.in_session = False
        self.health_checks = 0
        self._checked = asyncio.Event()
        self.closing = asyncio.Event()  # a close frame arrived and its reply is held
        self._finish = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def wait_health_checks(self, n: int) -> None:
        """Return after ``n`` more ``GET /health`` from the gateway: by then its loop has long moved on
        from anything it did just before the first of them."""
        target = self.health_checks + n
        while self.health_checks < target:
            self._checked.clear()
            await self._checked.wait()

    def finish_close(self) -> None:
        """Let the held close complete (the worker is then free)."""
        self._finish.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            if head.startswith("GET /health"):
                self.health_checks += 1
                self._checked.set()
                body = json.dumps({"status": "busy" if self.in_session else "idle"}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
            elif head.startswith("GET /ws/duplex"):
                await self._session(head, reader, writer)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _session(self, head: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        key = next(
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith("sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest()).decode()
        writer.write(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
        )
        if self.in_session:
            self.refused += 1
            writer.write(
                frame_text(error_event(ErrorCode.BUSY, "busy with another session", fatal=True).encode())
            )
            writer.write(_close_frame(1013))
            return
        self.in_session, self.sessions = True, self.sessions + 1
        try:
            created = SessionCreated(session=SessionInfo(id=f"slow-{self.sessions}", models={"asr": "fake"}))
            writer.write(frame_text(dump_event(created).encode()))
            while True:
                opcode = await _read_frame(reader)
                if opcode == 0x8:  # the gateway closes: hold the reply until the test says
                    self.closing.set()
                    finished = asyncio.ensure_future(self._finish.wait())
                    dropped = asyncio.ensure_future(reader.read(1))  # b"": the gateway gave up waiting
                    await asyncio.wait({finished, dropped}, return_when=asyncio.FIRST_COMPLETED)
                    for task in (finished, dropped):
                        task.cancel()
                    self._finish.clear()
                    self.closing.clear()
                    if finished.cancelled() or not finished.result():
                        self.abandoned += 1
                        return
                    writer.write(_close_frame(1000))
                    return
        finally:
            self.in_session = False


def _close_frame(code: int) -> bytes:
    """An unmasked close frame with ``code``."""
    return struct.pack("!BBH", 0x88, 2, code)


async def _read_frame(reader: asyncio.StreamReader) -> int:
    """Read one masked client frame; return its opcode."""
    b0, b1 = await reader.readexactly(2)
    length = b1 & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    await reader.readexactly(4 + length)  # mask and payload
    return b0 & 0x0F
