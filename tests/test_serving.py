"""core.serving against real clients: slow or silent request heads and TLS handshakes are dropped, as is
the rest of a request body the app answered without reading when it does not all come in time; complete
requests (slow ones within the bound, kept-alive ones, WebSockets) are served, and one address's connections
are bounded. Each server is tests/serving_server.py in its own process; with SERVING_PLAIN=1 it runs plain
``uvicorn.run``, and every test here that checks a bound fails.

No assert is on elapsed time: a client waits, with a generous guard, for the server to close or to answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUARD_S = 10.0  # how long a client waits for something the server should do well within a second
HEADER_S = 1.0  # the request-head deadline of the servers that test it
BODY_S = 1.0  # their deadline for the rest of a request body the app answered without reading
UNREAD = (401, b'{"error": "unauthorized"}')  # serving_server.py's answer at /unread, the body not read


@dataclass(frozen=True)
class Server:
    port: int
    tls: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _server(
    folder: Path, header_s: float, handshake_s: float, per_address: int, tls: bool, body_s: float = 30
) -> Iterator[Server]:
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    args = [str(port), str(header_s), str(handshake_s), str(body_s), str(per_address)]
    if tls:
        from core.tls import ensure_certificate

        cert, key = ensure_certificate(folder / "tls", ["127.0.0.1"])
        args += [str(cert), str(key)]
    err = folder / "server.err"
    with err.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "serving_server.py"), *args], cwd=ROOT, stderr=sink
        )
    try:
        deadline = time.monotonic() + 60
        while b"Uvicorn running on" not in err.read_bytes():  # logged once it listens
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        yield Server(port, tls)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """HTTP, head deadline HEADER_S, unread-body deadline BODY_S, no connection bound."""
    with _server(tmp_path_factory.mktemp("plain"), HEADER_S, 30, 0, tls=False, body_s=BODY_S) as server:
        yield server


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """HTTPS, handshake deadline 0.5 s, head deadline HEADER_S, unread-body deadline BODY_S, no connection
    bound."""
    with _server(tmp_path_factory.mktemp("tls"), HEADER_S, 0.5, 0, tls=True, body_s=BODY_S) as server:
        yield server


def _connect(server: Server, handshake: bool = True) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=GUARD_S)
    if server.tls and handshake:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context.wrap_socket(sock)
    return sock


def _wait_closed(sock: socket.socket, guard: float = GUARD_S) -> bytes | None:
    """What the server sent before it closed the connection; None when it was still open after ``guard``."""
    data = b""
    deadline = time.monotonic() + guard
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            return None
        except OSError:  # reset, or a TLS connection cut without close_notify
            return data
        if not chunk:
            return data
        data += chunk
    return None


def _header_line(n: int) -> bytes:
    return f"x-trickle-{n}: 1\r\n".encode()


def _trickle_until_closed(
    sock: socket.socket, first: bytes, gap: float = 0.2, part: Callable[[int], bytes] = _header_line
) -> bytes | None:
    """Send ``first``, then one more ``part`` (by default a header line, never ending the head) every ``gap``
    seconds; what the server sent before closing, or None when it had not closed after GUARD_S."""
    sock.sendall(first)
    deadline = time.monotonic() + GUARD_S
    n = 0
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], gap)
        if readable:
            return _wait_closed(sock, left)
        try:
            sock.sendall(part(n))
        except OSError:
            return _wait_closed(sock, left)
        n += 1
    return None


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    sock.settimeout(GUARD_S)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before a response")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin1").split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in lines[1:])
    length = int(fields.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed mid-body")
        body += chunk
    return int(lines[0].split()[1]), body[:length]


def _get(sock: socket.socket, path: str = "/") -> tuple[int, bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nhost: test\r\n\r\n".encode())
    return _read_response(sock)


def _served(server: Server, path: str = "/") -> socket.socket | None:
    """A new connection that got a response (kept open), or None when the server closed it."""
    try:
        sock = _connect(server)
        status, _ = _get(sock, path)
    except OSError:
        return None
    assert status == 200
    return sock


def _served_soon(server: Server) -> socket.socket:
    """A new connection that is served, retrying while the server has not yet seen a closed one go."""
    deadline = time.monotonic() + GUARD_S
    while (sock := _served(server)) is None:
        assert time.monotonic() < deadline, "no connection admitted again"
        time.sleep(0.05)
    return sock


def _dropped(server: Server) -> dict[str, int]:
    """What the server counts as dropped so far, by reason (its ``/dropped`` page)."""
    with _connect(server) as sock:
        status, body = _get(sock, "/dropped")
    assert status == 200
    return dict(json.loads(body))


# -- request heads


def test_trickled_head_is_dropped_with_408(plain: Server) -> None:
    before = _dropped(plain)["header_timeout"]
    with _connect(plain) as sock:
        sent = _trickle_until_closed(sock, b"GET / HTTP/1.1\r\nhost: test\r\n")
    assert sent is not None, "a head trickled one line at a time was never dropped"
    assert sent.startswith(b"HTTP/1.1 408 ")
    assert _dropped(plain)["header_timeout"] == before + 1  # counted, for the gateway's /metrics


def test_silent_connection_is_dropped(plain: Server) -> None:
    with _connect(plain) as sock:
        assert _wait_closed(sock) == b"", "a connection that sent nothing was never dropped"


def test_complete_requests_are_served_and_kept_alive(plain: Server) -> None:
    with _connect(plain) as sock:
        # a slow head that still ends within the deadline
        for part in (b"GET /slow HTTP/1.1\r\n", b"host: te", b"st\r\nx-a: 1\r\n", b"\r\n"):
            sock.sendall(part)
            time.sleep(0.05)
        assert _read_response(sock) == (200, b"http GET /slow")
        # idle between requests is uvicorn's keep-alive (5 s), not the head deadline
        time.sleep(HEADER_S * 1.5)
        assert _get(sock, "/again") == (200, b"http GET /again")
        # and the next head has a deadline of its own
        sent = _trickle_until_closed(sock, b"GET /third HTTP/1.1\r\n")
    assert sent is not None and sent.startswith(b"HTTP/1.1 408 "), sent


def test_websocket_outlives_the_head_deadline(plain: Server) -> None:
    with _connect(plain) as sock:
        _upgrade(sock)
        assert _wait_closed(sock, HEADER_S * 2) is None, "an open WebSocket was closed"


def _upgrade(sock: socket.socket) -> None:
    sock.sendall(
        b"GET /ws HTTP/1.1\r\nhost: test\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
    )
    status, _ = _read_response(sock)
    assert status == 101


# -- request bodies the app answered without reading


def _answered_unread(sock: socket.socket, framing: bytes, part: bytes = b"") -> None:
    """POST to /unread with ``part`` of its body: the app's 401 comes whole, the body still owed."""
    sock.sendall(b"POST /unread HTTP/1.1\r\nhost: test\r\n" + framing + b"\r\n" + part)
    assert _read_response(sock) == UNREAD


@pytest.mark.parametrize("framing", [b"content-length: 100000\r\n", b"transfer-encoding: chunked\r\n"])
@pytest.mark.parametrize("which", ["plain", "tls"])
def test_unread_body_trickled_after_the_response_is_dropped(
    request: pytest.FixtureRequest, which: str, framing: bytes
) -> None:
    # Each byte of the body used to stop the connection's last timer (uvicorn's keep-alive): one byte now
    # and then held it for ever. The rest of the body must all come within BODY_S of the response.
    server: Server = request.getfixturevalue(which)
    before = _dropped(server)["unread_body"]
    with _connect(server) as sock:
        _answered_unread(sock, framing, b"12")  # (a chunk size's first digits, when chunked)
        sent = _trickle_until_closed(sock, b"3", part=lambda _: b"4")
    assert sent == b"", "a body trickled after its response held the connection"
    assert _dropped(server)["unread_body"] == before + 1  # counted, for the gateway's /metrics


def test_unread_body_sent_in_time_keeps_the_connection(plain: Server) -> None:
    before = _dropped(plain)["unread_body"]
    with _connect(plain) as sock:
        _answered_unread(sock, b"content-length: 10\r\n", b"01234")
        sock.sendall(b"56789")  # the rest, within the bound: discarded, and the connection goes on
        time.sleep(max(BODY_S, HEADER_S) * 1.5)  # idle now is keep-alive: neither deadline runs
        assert _get(sock, "/after") == (200, b"http GET /after")
        # the rest of the body and the next request in one write
        _answered_unread(sock, b"transfer-encoding: chunked\r\n")
        sock.sendall(b"3\r\nabc\r\n0\r\n\r\nGET /next HTTP/1.1\r\nhost: test\r\n\r\n")
        assert _read_response(sock) == (200, b"http GET /next")
        # a body the app reads: kept alive as ever, and not timed once read
        sock.sendall(b"POST /read HTTP/1.1\r\nhost: test\r\ncontent-length: 5\r\n\r\nhello")
        assert _read_response(sock) == (200, b"http POST /read")
        time.sleep(BODY_S * 1.5)
        assert _get(sock, "/again") == (200, b"http GET /again")
    assert _dropped(plain)["unread_body"] == before


# -- TLS handshakes


def test_tls_connection_without_handshake_is_dropped(tls: Server) -> None:
    with _connect(tls, handshake=False) as sock:
        assert _wait_closed(sock) is not None, "a TLS connection that never began its handshake stayed open"


def test_tls_unfinished_handshake_is_dropped(tls: Server) -> None:
    before = _dropped(tls)["tls_handshake"]
    with _connect(tls, handshake=False) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello record, never finished
        assert _wait_closed(sock) is not None, "a TLS handshake that never finished stayed open"
    assert _dropped(tls)["tls_handshake"] == before + 1


def test_tls_requests_are_served_and_heads_bounded(tls: Server) -> None:
    with _connect(tls) as sock:
        assert _get(sock, "/x") == (200, b"https GET /x")
    with _connect(tls) as sock:  # handshake done, then nothing
        assert _wait_closed(sock) is not None, "a TLS connection that sent no request stayed open"


def test_tls_request_sent_with_the_handshake_finish_is_served(tls: Server) -> None:
    # The request rides in the same segment as the client's Finished, so the server's TLS layer has it the
    # moment the handshake ends: the HTTP protocol must be connected before it is handed any data.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_client = context.wrap_bio(incoming, outgoing)
    with _connect(tls, handshake=False) as sock:
        while True:
            try:
                tls_client.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                chunk = sock.recv(65536)
                assert chunk, "closed mid-handshake"
                incoming.write(chunk)
        tls_client.write(b"GET /early HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        sock.sendall(outgoing.read())  # Finished and the request, in one write
        answer = b""
        while True:
            try:
                data = tls_client.read(65536)
            except ssl.SSLWantReadError:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                incoming.write(chunk)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"https GET /early"), answer


# -- connections per address


def test_connections_per_address_are_bounded(tmp_path: Path) -> None:
    with _server(tmp_path, 30, 30, 3, tls=False) as server:
        held = [_served(server, f"/{i}") for i in range(3)]
        assert all(held), "the first 3 connections were not all served"
        with _connect(server) as extra:
            assert _wait_closed(extra) is not None, "a 4th connection from one address was kept"
        open_ = [sock for sock in held if sock is not None]
        counted = json.loads(_get(open_[0], "/dropped")[1])  # on a kept-alive one of the three
        assert counted == {"per_address_limit": 1, "header_timeout": 0, "tls_handshake": 0, "unread_body": 0}
        open_.pop().close()
        open_.append(_served_soon(server))
        # a WebSocket holds its place too, and gives it back when it closes
        open_.pop().close()
        ws = _served_soon(server)
        _upgrade(ws)
        with _connect(server) as extra:
            assert _wait_closed(extra) is not None, "a connection over the bound was kept"
        ws.close()
        open_.append(_served_soon(server))
        for sock in open_:
            sock.close()


def test_tls_handshakes_count_against_the_bound(tmp_path: Path) -> None:
    with _server(tmp_path, 30, 30, 2, tls=True) as server:
        silent = [_connect(server, handshake=False) for _ in range(2)]
        # counted from TCP accept: the two still owe their handshakes (for 30 s) and hold both places
        with _connect(server, handshake=False) as extra:
            assert _wait_closed(extra) is not None, "a 3rd connection from one address was kept"
        silent.pop().close()
        _served_soon(server).close()
        for sock in silent:
            sock.close()


@pytest.mark.skipif(os.environ.get("SERVING_PLAIN") == "1", reason="tests the serving layer's own parts")
def test_address_keys() -> None:
    import ipaddress

    from core.serving import AddressCounter, Limits

    counter = AddressCounter(Limits(max_connections_per_address=1))
    assert counter.key(("127.0.0.1", 1)) is None  # loopback is exempt by default
    assert counter.key(("::ffff:127.0.0.1", 1, 0, 0)) is None
    assert counter.key(("192.0.2.7", 1)) == "192.0.2.7"
    assert counter.key(("::ffff:192.0.2.7", 1, 0, 0)) == "192.0.2.7"
    assert (
        counter.key(("2001:db8::1", 1, 0, 0)) == counter.key(("2001:db8::ffff", 2, 0, 0)) == "2001:db8::/64"
    )
    assert counter.key("/tmp/socket") is None
    a, b = object(), object()
    assert counter.admit(a, ("192.0.2.7", 1)) and counter.admit(a, ("192.0.2.7", 1))
    assert not counter.admit(b, ("192.0.2.7", 2)) and counter.refused == 1
    counter.release(b)  # never counted: changes nothing
    assert counter.open == {"192.0.2.7": 1}
    counter.release(a)
    assert counter.open == {} and counter.admit(b, ("192.0.2.7", 2))
    unbounded = AddressCounter(Limits(exempt=(ipaddress.ip_network("10.0.0.0/8"),)))
    assert unbounded.key(("192.0.2.7", 1)) is None
