"""The bench's WebSocket clients, for both APIs (``/ws/duplex``, ``/v1/realtime``) and over TLS or not.

- :class:`Protocol`: an API's path and the one event the mock worker answers (the hop's probe).
- :func:`open_session`: a websockets-library client that waits for ``session.created`` (the hop, the live
  session of the waiting measure).
- :class:`LeanClient`: a hand-written WebSocket client over ``asyncio.Protocol``, thousands in one process,
  for the clients that wait in the queue. Both APIs tell a waiting client the same events
  (``session.queued``, ``session.queue_update``, ``session.queue_done``; core/gateway/queue_updates.py),
  and a client that did not wait hears ``session.created`` first on both, so one parser serves both.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

#: ~100 bytes of binary: the mock worker echoes binary frames unchanged on either API.
DUPLEX_PROBE = bytes(range(100))
#: A Realtime client's audio is text; the text event the mock worker answers (``session.updated``) stands
#: in for it, padded to about the size of the duplex probe.
REALTIME_PROBE = json.dumps({"type": "session.update", "session": {"instructions": "x" * 58}})


@dataclass(frozen=True)
class Protocol:
    """One of the gateway's WebSocket APIs, as the bench uses it."""

    name: str
    path: str
    #: The frame the hop measure sends; the worker answers each with one frame.
    probe: str | bytes

    def answers(self, reply: str | bytes) -> bool:
        """Whether ``reply`` is the worker's answer to :attr:`probe`."""
        if isinstance(self.probe, bytes):
            return reply == self.probe
        return isinstance(reply, str) and '"session.updated"' in reply


PROTOCOLS = {
    "duplex": Protocol("duplex", "/ws/duplex", DUPLEX_PROBE),
    "realtime": Protocol("realtime", "/v1/realtime", REALTIME_PROBE),
}


async def open_session(url: str, tls: ssl.SSLContext | None = None, tries: int = 50) -> ClientConnection:
    """A connection on which ``session.created`` has arrived (retried while the worker is still busy)."""
    for _ in range(tries):  # the worker may still be tearing down the previous session
        ws = await connect(url, compression=None, ping_interval=None, proxy=None, open_timeout=10, ssl=tls)
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "session.created":
                return ws
            if event["type"] == "error":
                await ws.close()
                await asyncio.sleep(0.05)
                break
    raise RuntimeError(f"no session on {url}")


class HitCounter:
    """Counts armed clients that received something; wakes the bench when all did."""

    def __init__(self) -> None:
        self.target = 0
        self.count = 0
        self.done = asyncio.Event()

    def arm(self, target: int) -> None:
        """Expect ``target`` clients to receive something."""
        self.target, self.count = target, 0
        self.done.clear()
        if target == 0:
            self.done.set()

    def hit(self) -> None:
        """One armed client received something."""
        self.count += 1
        if self.count >= self.target:
            self.done.set()


class LeanClient(asyncio.Protocol):
    """A minimal WebSocket client. ``data_received`` only timestamps raw chunks (cheap, so the clock
    reads when the bytes arrive); ``process`` parses them later into text frames and answers pings.

    Over TLS the same class runs under asyncio's SSL protocol: the chunks it stamps are already decrypted,
    so the stamp includes this process's decryption, as a remote client's would."""

    def __init__(self, host: str, path: str, hits: HitCounter) -> None:
        self.host, self.path, self.hits = host, path, hits
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
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
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
        """Close the connection (no close frame: a client that vanishes)."""
        if self.transport is not None:
            self.transport.close()


async def connect_lean(
    port: int,
    path: str,
    tls: ssl.SSLContext | None,
    count: int,
    hits: HitCounter,
    concurrency: int = 100,
) -> list[LeanClient]:
    """``count`` lean clients on 127.0.0.1:``port`` at ``path``, each once it heard its first event."""
    loop = asyncio.get_running_loop()
    clients: list[LeanClient] = []
    sem = asyncio.Semaphore(concurrency)
    host = f"127.0.0.1:{port}"

    async def one() -> None:
        async with sem:
            _, proto = await loop.create_connection(
                lambda: LeanClient(host, path, hits),
                "127.0.0.1",
                port,
                ssl=tls,
                server_hostname="127.0.0.1" if tls is not None else None,
            )
            await asyncio.wait_for(proto.ready, 30)
            clients.append(proto)

    await asyncio.gather(*(one() for _ in range(count)))
    return clients
