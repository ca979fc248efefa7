"""Serving an ASGI app with uvicorn, dropping idle and slow clients: ``serve`` replaces ``uvicorn.run``.

uvicorn times out nothing before a request's head is complete: a client that trickles one header line every
few seconds, or that opens a TLS connection and never finishes the handshake, keeps its socket forever
(uvicorn's ``timeout_keep_alive`` only runs between requests, and it stops at the first byte of the next
one). Four bounds are added here, each on the connection: three before the app sees anything, one after it
answered:

- **Request head** (``Limits.header_timeout_s``): a connection must deliver a complete request head within
  this long of being opened (after the TLS handshake), and a later request on a kept-alive connection within
  this long of its first byte. It is a deadline for the whole head, not for each read, so trickling does not
  extend it. A client that sent part of a head gets ``408 Request Timeout``; one that sent nothing is closed.
  Idle time between requests stays uvicorn's ``timeout_keep_alive``.
- **An unread request body** (``Limits.body_read_timeout_s``): an app may answer without reading the body
  (401, 404, 503); uvicorn then discards the rest as it comes, so that the connection can be kept alive, but
  times nothing once a byte of it arrives (its keep-alive timer stops at any byte), and a client trickling
  the body would hold the connection for ever. Here the rest of the body must all come within this long of
  the response's end (nginx discards an unread body the same way, within ``lingering_time``): then the
  connection is kept alive as usual; otherwise it is closed. The response has been sent whole either way.
- **TLS handshake** (``Limits.tls_handshake_timeout_s``): asyncio bounds a server handshake (60 s by
  default), but uvicorn does not pass the bound on. So uvicorn serves plain TCP here and each connection is
  upgraded with ``loop.start_tls(..., ssl_handshake_timeout=...)`` (public asyncio API); once the handshake
  is done the HTTP protocol is connected to the TLS transport, as when uvicorn does TLS itself, and given any
  request bytes that came with the handshake's last message.
- **Connections per client address** (``Limits.max_connections_per_address``): counted from TCP accept, so
  connections still in their TLS handshake count too; one over the bound is closed at once. IPv6 clients are
  counted per /64 (one host usually holds a whole /64). ``Limits.exempt`` networks are not counted: by default
  loopback, where a local reverse proxy, the tests and the benchmarks connect from.

The server stays uvicorn (not e.g. Hypercorn, which has timeouts of its own): the gateway's queue updates
write to uvicorn's websockets-sansio protocol objects directly (core.gateway.queue_updates), and uvicorn's
``Config(http=..., ws=...)`` takes protocol classes, so the bounds are small subclasses of its own protocols
rather than a new dependency. HTTP is pinned to h11, the pure-Python implementation installed with uvicorn
(httptools is not installed), so the head deadline hooks into one parser's states. A WebSocket connection is
handed from the HTTP protocol to a WebSocket protocol object; that class is subclassed only to give the
connection's count back when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import h11
import uvicorn
from uvicorn.config import STARTUP_FAILURE, WS_PROTOCOLS
from uvicorn.importer import import_from_string
from uvicorn.protocols.http.h11_impl import H11Protocol

from core.config import ServiceConfig

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
# Sent to a client whose partial request head ran out of time; the connection closes after it.
_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


@dataclass(frozen=True)
class Limits:
    """How long a client may take to start a request (and to finish a body the app answered unread), and how
    many connections one address may hold."""

    header_timeout_s: float = 10.0
    tls_handshake_timeout_s: float = 10.0
    body_read_timeout_s: float = 30.0  # for the rest of a request body the app answered without reading
    max_connections_per_address: int = 0  # 0: no bound
    exempt: tuple[IPNetwork, ...] = LOOPBACK  # client networks the bound does not apply to


def limits_from(service: ServiceConfig, *, per_address: bool = True) -> Limits:
    """The service config's limits; ``per_address=False`` leaves the connection count unbounded (a worker,
    whose one client is the gateway)."""
    return Limits(
        header_timeout_s=service.header_timeout_s,
        tls_handshake_timeout_s=service.tls_handshake_timeout_s,
        body_read_timeout_s=service.body_read_timeout_s,
        max_connections_per_address=service.max_connections_per_address if per_address else 0,
        exempt=service.connection_limit_exempt,
    )


class AddressCounter:
    """Open connections per client address, against ``Limits.max_connections_per_address``.

    A connection is known by an object that stays the same while it is open (its transport); ``admit`` and
    ``release`` may be called more than once for one connection.
    """

    def __init__(self, limits: Limits) -> None:
        self.limit = limits.max_connections_per_address
        self.exempt = limits.exempt
        self.open: dict[str, int] = {}  # counted address -> open connections
        self.refused = 0  # connections closed for being over the bound, since start
        self.head_timeouts = 0  # connections dropped for a request head not complete in time, since start
        self.handshake_failures = 0  # TLS handshakes that timed out or failed, since start
        self.unread_bodies = 0  # connections closed for an unread request body not sent in time, since start
        self._owner: dict[object, str] = {}  # connection -> its counted address
        self._warned: set[str] = set()

    def dropped(self) -> dict[str, int]:
        """Connections this server dropped since start, by reason (for ``/metrics``)."""
        return {
            "per_address_limit": self.refused,
            "header_timeout": self.head_timeouts,
            "tls_handshake": self.handshake_failures,
            "unread_body": self.unread_bodies,
        }

    def key(self, peername: Any) -> str | None:
        """The address a peer is counted under, or None where it is not counted."""
        if self.limit <= 0 or not isinstance(peername, tuple) or not peername:
            return None
        try:
            ip = ipaddress.ip_address(str(peername[0]).split("%", 1)[0])
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
        if any(ip in net for net in self.exempt):
            return None
        if isinstance(ip, ipaddress.IPv6Address):
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)

    def admit(self, conn: object, peername: Any) -> bool:
        """Count ``conn`` under its peer's address; False (and not counted) when that address is full."""
        if conn in self._owner:
            return True
        key = self.key(peername)
        if key is None:
            return True
        count = self.open.get(key, 0)
        if count >= self.limit:
            self.refused += 1
            if (
                key not in self._warned
            ):  # once while the address stays at its bound: a flood must not flood the log
                self._warned.add(key)
                log.warning("%s holds %d connections, the most one address may; refusing more", key, count)
            return False
        self.open[key] = count + 1
        self._owner[conn] = key
        return True

    def release(self, conn: object) -> None:
        """``conn`` closed: its address may open another."""
        key = self._owner.pop(conn, None)
        if key is None:
            return
        count = self.open[key] - 1
        if count:
            self.open[key] = count
        else:
            del self.open[key]
        self._warned.discard(key)

    def rename(self, old: object, new: object) -> None:
        """The connection counted as ``old`` goes on as ``new`` (its TLS transport replaces the TCP one)."""
        key = self._owner.pop(old, None)
        if key is not None:
            self._owner[new] = key


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head, one for the rest of a request body the
    app answered without reading, and the per-address count.

    ``serve`` makes a subclass per server that sets the class attributes.
    """

    header_timeout_s: ClassVar[float] = Limits.header_timeout_s
    body_read_timeout_s: ClassVar[float] = Limits.body_read_timeout_s
    counter: ClassVar[AddressCounter] = AddressCounter(Limits())

    _head_deadline: asyncio.TimerHandle | None = None
    _drain_deadline: asyncio.TimerHandle | None = None
    _got_bytes = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.counter.admit(transport, transport.get_extra_info("peername")):
            transport.close()
            return
        self._await_head()

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        super().data_received(data)
        if self._drain_deadline is not None:
            if self._draining():
                return  # more of the unread body, discarded by uvicorn: its deadline goes on
            self._stop_drain_deadline()  # the body is all in: the connection goes on as after any request
            if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
                self._keep_alive()  # and no byte of a next request yet: idle, as after any response
                return
        if self.conn.their_state is h11.IDLE:
            # Still before a complete head. On a kept-alive connection this is the next request's first
            # data: its deadline starts now (uvicorn's keep-alive timer has just been stopped by it).
            if self._head_deadline is None and not self.transport.is_closing():
                self._await_head()
        else:
            self._stop_head_deadline()  # a head arrived (or the connection failed or upgraded)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_deadline()
        self._stop_drain_deadline()
        self.counter.release(self.transport)
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._draining():
            # Answered before the request body was all read: uvicorn discards the rest as it comes (and keeps
            # the connection), but times nothing once a byte of it arrives. The rest gets a deadline.
            self._stop_drain_deadline()
            self._drain_deadline = self.loop.call_later(self.body_read_timeout_s, self._drain_timed_out)

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._stop_head_deadline()
        super().handle_websocket_upgrade(event)

    def _await_head(self) -> None:
        self._stop_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _draining(self) -> bool:
        """The response is sent and the request body not all received."""
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY

    def _stop_drain_deadline(self) -> None:
        if self._drain_deadline is not None:
            self._drain_deadline.cancel()
            self._drain_deadline = None

    def _drain_timed_out(self) -> None:
        self._drain_deadline = None
        if self.transport.is_closing() or not self._draining():
            return
        self.counter.unread_bodies += 1
        self._unset_keepalive_if_required()
        self.conn.send(h11.ConnectionClosed())
        self.transport.close()

    def _keep_alive(self) -> None:
        """Idle between requests: uvicorn's keep-alive timeout, as it sets after a response."""
        self._unset_keepalive_if_required()
        if self.transport.is_closing():
            return
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._got_bytes and self.conn.our_state is h11.IDLE:
            self.transport.write(_REQUEST_TIMEOUT)
        self.counter.head_timeouts += 1
        self.transport.close()


class CountedWebSocket(asyncio.Protocol):
    """Mixed into a uvicorn WebSocket protocol: gives the connection's count back when it closes.

    After an upgrade the HTTP protocol no longer hears of the connection, so this is where it ends.
    """

    counter: ClassVar[AddressCounter]
    _counted: object = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._counted = transport
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.counter.release(self._counted)


class TLSAcceptor(asyncio.Protocol):
    """A TCP connection until its TLS handshake is done; then ``http_class`` serves the TLS transport.

    uvicorn creates one per accepted connection with the arguments it gives an HTTP protocol. ``serve``
    makes a subclass per server that sets the class attributes.
    """

    http_class: ClassVar[type[BoundedH11Protocol]]
    context: ClassVar[ssl.SSLContext]
    handshake_timeout_s: ClassVar[float]
    counter: ClassVar[AddressCounter]
    # Handshakes under way: the loop keeps only weak references to tasks.
    handshakes: ClassVar[set[asyncio.Task[None]]]

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._args = (config, server_state, app_state)
        self._loop = _loop or asyncio.get_event_loop()
        self._raw: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = cast(asyncio.Transport, transport)
        if not self.counter.admit(raw, raw.get_extra_info("peername")):
            raw.close()
            return
        self._raw = raw
        raw.pause_reading()  # nothing is read here: the handshake's first bytes are for start_tls
        task = self._loop.create_task(self._handshake(raw))
        self.handshakes.add(task)
        task.add_done_callback(self.handshakes.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        # Only while this object is still the TCP connection's protocol (before start_tls takes it over).
        if self._raw is not None:
            self.counter.release(self._raw)

    async def _handshake(self, raw: asyncio.Transport) -> None:
        handover = _Handover()
        try:
            tls = await self._loop.start_tls(
                raw, handover, self.context, server_side=True, ssl_handshake_timeout=self.handshake_timeout_s
            )
        except asyncio.CancelledError:  # the server is stopping
            self.counter.release(raw)
            raise
        except Exception as exc:  # timed out, reset, not TLS: start_tls has closed the connection
            log.debug("TLS handshake with %s failed: %r", raw.get_extra_info("peername"), exc)
            self.counter.handshake_failures += 1
            self.counter.release(raw)
            return
        if tls is None or handover.lost:  # closed between the handshake and now
            self.counter.release(raw)
            return
        config, server_state, app_state = self._args
        http = self.http_class(
            config=config, server_state=server_state, app_state=app_state, _loop=self._loop
        )
        self.counter.rename(raw, tls)
        tls.set_protocol(http)
        http.connection_made(tls)
        handover.hand_to(http)


class _Handover(asyncio.Protocol):
    """The TLS connection's protocol from the end of its handshake until the HTTP protocol is connected.

    The TLS layer delivers data that came with the client's last handshake message (often the request
    itself) as soon as the handshake ends, before ``start_tls`` returns; an HTTP protocol must not see data
    before ``connection_made``, so it is kept here and passed on. Calls the loop had already scheduled for
    this object (a connection lost meanwhile) are passed on too.
    """

    def __init__(self) -> None:
        self.early: list[bytes] = []
        self.eof = False
        self.lost = False
        self._to: asyncio.Protocol | None = None

    def hand_to(self, protocol: asyncio.Protocol) -> None:
        """``protocol`` is connected: give it what arrived so far, and anything that still comes here."""
        self._to = protocol
        transport = cast(H11Protocol, protocol).transport
        for chunk in self.early:
            if transport.is_closing():
                break
            protocol.data_received(chunk)
        if self.eof:
            protocol.eof_received()
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self._to is not None:
            self._to.data_received(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool | None:
        if self._to is not None:
            return self._to.eof_received()
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._to is not None:
            self._to.connection_lost(exc)
        else:
            self.lost = True


def server_context(certfile: str, keyfile: str | None) -> ssl.SSLContext:
    """A server TLS context with OpenSSL's default protocols and ciphers, offering HTTP/1.1 by ALPN."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    context.set_alpn_protocols(["http/1.1"])
    return context


@dataclass(frozen=True)
class Protocols:
    """The protocol classes one server runs with, bound to its limits and counter."""

    http: type[asyncio.Protocol]
    ws: type[asyncio.Protocol] | None
    counter: AddressCounter


def protocols(
    limits: Limits,
    *,
    ws: str = "auto",
    tls: ssl.SSLContext | None = None,
    counter: AddressCounter | None = None,
) -> Protocols:
    """Subclasses of uvicorn's protocols that enforce ``limits`` (``ws`` names a uvicorn WebSocket one);
    ``counter`` (made here when not given) counts connections and what was dropped."""
    counter = counter if counter is not None else AddressCounter(limits)
    http: type[asyncio.Protocol] = type(
        "ServedH11Protocol",
        (BoundedH11Protocol,),
        {
            "header_timeout_s": limits.header_timeout_s,
            "body_read_timeout_s": limits.body_read_timeout_s,
            "counter": counter,
        },
    )
    if tls is not None:
        http = type(
            "ServedTLSAcceptor",
            (TLSAcceptor,),
            {
                "http_class": http,
                "context": tls,
                "handshake_timeout_s": limits.tls_handshake_timeout_s,
                "counter": counter,
                "handshakes": set(),
            },
        )
    ws_path = WS_PROTOCOLS.get(ws, ws)
    ws_class = None
    if ws_path is not None:
        base = import_from_string(ws_path)
        ws_class = (
            None
            if base is None
            else type(f"Counted{base.__name__}", (CountedWebSocket, base), {"counter": counter})
        )
    return Protocols(http=http, ws=ws_class, counter=counter)


def serve(
    app: Any,
    *,
    host: str,
    port: int,
    limits: Limits,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    ws: str = "auto",
    counter: AddressCounter | None = None,
    **options: Any,
) -> None:
    """Serve ``app`` until stopped, as ``uvicorn.run`` would, within ``limits``.

    ``options`` go to ``uvicorn.Config`` (log level, WebSocket settings, graceful shutdown, ...). Pass a
    ``counter`` to read what the server dropped (``AddressCounter.dropped``). Exits with uvicorn's
    startup-failure status when the server could not start (e.g. the port is taken).
    """
    tls = server_context(ssl_certfile, ssl_keyfile) if ssl_certfile else None
    bound = protocols(limits, ws=ws, tls=tls, counter=counter)
    config = uvicorn.Config(app, host=host, port=port, http=bound.http, ws=bound.ws or "none", **options)
    server = uvicorn.Server(config)
    # uvicorn re-raises the Ctrl-C it caught once it has shut down
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
