"""The peer for bench_gateway part 3: the least a Python asyncio server can do to keep a queue told.

    .venv/bin/python bench/fanout_floor.py --port 8123

It speaks just enough WebSocket for the bench's lean clients: the upgrade handshake, then unmasked text
frames. The first client is served (``session.queue_done``); the others wait in arrival order and hear
``session.queued`` with their position. When a client leaves, the next one is served and every other waiting
client is sent a ``session.queue_update`` of the gateway's shape and size at once, in one pass of
``transport.write``. No ETA model, no pool, no tickets, no health checks, no periodic updates, no checks of a
client's state beyond the transport's own.

Measured with the same clients, the same trigger and the same pinning as the gateway, its update lag is the
floor this core sets for any server written like ours (one event loop, one ``send`` per client): the
difference to the gateway is what the gateway's own work costs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import struct
import sys

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"
_UPDATE = b'{"type":"session.queue_update","position":%d,"eta_s":%.2f,"queue_length":%d}'
_QUEUED = b'{"type":"session.queued","position":%d,"eta_s":%.2f,"queue_length":%d}'
_DONE = b'{"type":"session.queue_done","waited_s":0.0}'
_MAX_REQUEST = 16 * 1024


def frame_text(payload: bytes) -> bytes:
    """One unmasked, final text frame (RFC 6455 §5.2): the fewest bytes and steps a server needs per update."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class FloorQueue:
    """The served client and the waiting ones, in arrival order (a dict keeps insertion order)."""

    def __init__(self) -> None:
        self.served: Client | None = None
        self.waiting: dict[Client, None] = {}

    def join(self, client: Client) -> None:
        if self.served is None:
            self.served = client
            client.send(_DONE)
            return
        self.waiting[client] = None
        n = len(self.waiting)
        client.send(_QUEUED % (n, n * 1.0, n))

    def leave(self, client: Client) -> None:
        if client is self.served:
            self.served = None
            if self.waiting:
                head = next(iter(self.waiting))
                del self.waiting[head]
                self.served = head
                head.send(_DONE)
        elif client in self.waiting:
            del self.waiting[client]  # the gateway tells everyone behind a leaver; so does this
        else:
            return  # it never finished its handshake
        n = len(self.waiting)
        for position, waiter in enumerate(self.waiting, start=1):
            waiter.send(_UPDATE % (position, position * 1.0, n))


class Client(asyncio.Protocol):
    """One connection: the upgrade request, then it only listens."""

    def __init__(self, queue: FloorQueue) -> None:
        self.queue = queue
        self.transport: asyncio.Transport | None = None
        self.request = b""
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.open or self.transport is None:
            return  # pongs and the like: nothing this server needs
        self.request += data
        head, sep, _ = self.request.partition(b"\r\n\r\n")
        if not sep:
            if len(self.request) > _MAX_REQUEST:
                self.transport.close()
            return
        key = b""
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        if not key:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()
            return
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.open = True
        self.queue.join(self)

    def send(self, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame_text(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.queue.leave(self)


async def serve(host: str, port: int) -> None:
    """Serve until killed."""
    queue = FloorQueue()
    server = await asyncio.get_running_loop().create_server(lambda: Client(queue), host, port, backlog=4096)
    print(f"fanout_floor listening on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
