"""Hostile and careless input against the real gateway and a (fake-model) worker on loopback: bodies bounded
while read, chunked or not; JSON nested past any sane depth; strange static paths; operator settings of the
wrong type; and a fuzz run over every JSON route and both WebSocket protocols. Nothing may answer 500, drop
a session without an ``error`` event, or take a process down."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect

from tests.services import WORKER_HEADERS, cluster

MAX_UPLOAD_MB = 1.0
BODY_READ_S = 1.0  # the clusters' body read timeout: a stalled upload is refused after this
HEADER_S = 2.0  # the clusters' request-head deadline
GUARD_S = 15.0  # how long a client waits for something the server should do within BODY_READ_S
DEEP = "[" * 5000 + "]" * 5000  # json.loads alone would raise RecursionError on this
DEEP_OBJECT = '{"a":' * 3000 + "1" + "}" * 3000


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    folder = tmp_path_factory.mktemp("hardening")
    limits = {"body_read_timeout_s": BODY_READ_S, "header_timeout_s": HEADER_S}
    with cluster(folder, stack="fake", max_upload_mb=MAX_UPLOAD_MB, **limits) as found:
        yield found


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A body sent with chunked transfer encoding (no Content-Length): the limit must hold while reading."""
    sent = 0
    while sent < total:
        yield b"x" * min(size, total - sent)
        sent += size


def _metric(gateway: str, sample: str) -> float:
    """One sample of the gateway's /metrics page, by its full name and labels."""
    for line in httpx.get(f"{gateway}/metrics", timeout=10).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{sample} not in /metrics")


def _healthy(url: str) -> None:
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


# --- bodies ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["gateway", "worker"])
@pytest.mark.parametrize("path", ["/v1/transcribe", "/v1/chat"])
def test_a_chunked_body_past_the_limit_is_refused_while_it_is_read(
    urls: tuple[str, str], target: str, path: str
) -> None:
    gateway, worker = urls
    base, headers = (gateway, {}) if target == "gateway" else (worker, WORKER_HEADERS)
    r = httpx.post(
        f"{base}{path}",
        content=_chunks(6 * 1024 * 1024),
        headers={**headers, "content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"
    _healthy(base)
    assert httpx.post(f"{base}/v1/chat", json={"text": "hi"}, headers=headers, timeout=30).status_code == 200


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One whole response from a raw socket: its status line and its ``content-length`` body."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        data = sock.recv(65536)
        assert data, f"the connection closed mid-head: {answer!r}"
        answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    fields = dict(line.lower().split(b": ", 1) for line in lines)
    while len(body) < int(fields[b"content-length"]):
        data = sock.recv(65536)
        assert data, f"the connection closed mid-body: {body!r}"
        body += data
    return status, body


@pytest.mark.parametrize("target", ["gateway", "worker"])
@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_that_stalls_is_refused_with_408(urls: tuple[str, str], target: str, chunked: bool) -> None:
    # The head is complete, part of the body comes, then nothing: the request must not hold its worker
    # route (or a connection) for ever. No assert on elapsed time: the client only waits, with a guard.
    gateway, worker = urls
    refused = 'gateway_request_bodies_refused_total{reason="read_timeout"}'
    before = _metric(gateway, refused)
    url = httpx.URL(gateway if target == "gateway" else worker)
    secret = "".join(f"{k}: {v}\r\n" for k, v in WORKER_HEADERS.items()) if target == "worker" else ""
    framing = "transfer-encoding: chunked\r\n" if chunked else "content-length: 1000\r\n"
    head = f"POST /v1/chat HTTP/1.1\r\nhost: {url.host}\r\ncontent-type: application/json\r\n{framing}{secret}\r\n"
    part = b'5\r\n{"tex\r\n' if chunked else b'{"tex'
    with socket.create_connection((url.host, url.port), timeout=GUARD_S) as sock:
        sock.sendall(head.encode() + part)
        status, body = _read_response(sock)
    assert status.startswith(b"HTTP/1.1 408"), status
    assert json.loads(body)["error"]["code"] == "receive_timeout", body
    assert _metric(gateway, refused) == before + (target == "gateway")
    base, headers = (gateway, {}) if target == "gateway" else (worker, WORKER_HEADERS)
    assert httpx.post(f"{base}/v1/chat", json={"text": "hi"}, headers=headers, timeout=30).status_code == 200


def test_a_request_head_that_never_ends_is_dropped_and_counted(urls: tuple[str, str]) -> None:
    gateway, _ = urls
    dropped = 'gateway_connections_dropped_total{reason="header_timeout"}'
    before = _metric(gateway, dropped)
    url = httpx.URL(gateway)
    with socket.create_connection((url.host, url.port), timeout=GUARD_S) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")  # and the blank line never comes
        answer = b""
        while data := sock.recv(4096):
            answer += data
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert _metric(gateway, dropped) == before + 1
    assert _metric(gateway, 'gateway_connections_dropped_total{reason="per_address_limit"}') == 0  # loopback


def test_a_body_answered_unread_must_then_come_in_time(urls: tuple[str, str]) -> None:
    # POST /health is answered (405) without its body being read. The rest of the body must then all come
    # within body_read_timeout_s, or the connection is closed: a byte every so often used to hold it for ever.
    gateway, _ = urls
    dropped = 'gateway_connections_dropped_total{reason="unread_body"}'
    before = _metric(gateway, dropped)
    url = httpx.URL(gateway)
    with socket.create_connection((url.host, url.port), timeout=GUARD_S) as sock:
        sock.sendall(b"POST /health HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n{")
        status, body = _read_response(sock)
        assert status.startswith(b"HTTP/1.1 405 "), status  # the whole answer came first
        assert json.loads(body)["error"]["code"], body
        closed, deadline = False, time.monotonic() + GUARD_S
        while not closed and time.monotonic() < deadline:
            try:
                if select.select([sock], [], [], 0.2)[0]:
                    closed = sock.recv(65536) == b""
                else:
                    sock.sendall(b" ")  # one more byte of the body
            except OSError:  # reset
                closed = True
    assert closed, "a body trickled after its answer held the connection"
    assert _metric(gateway, dropped) == before + 1


def test_a_declared_length_past_the_limit_is_refused_before_reading(urls: tuple[str, str]) -> None:
    gateway, _ = urls
    r = httpx.post(f"{gateway}/v1/chat/completions", content=b"{" * (3 * 1024 * 1024), timeout=60)
    assert r.status_code == 413


# --- JSON nested past any sane depth ---------------------------------------------------------------------


@pytest.mark.parametrize("body", [DEEP, DEEP_OBJECT])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/audio/speech", "/v1/chat", "/api/config/eta"])
def test_deep_json_on_http_is_a_400(urls: tuple[str, str], path: str, body: str) -> None:
    gateway, worker = urls
    method = "PUT" if path == "/api/config/eta" else "POST"
    r = httpx.request(
        method, f"{gateway}{path}", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
    if path in ("/v1/chat",):  # and on the worker itself
        w = httpx.post(
            f"{worker}{path}",
            content=body,
            headers={**WORKER_HEADERS, "content-type": "application/json"},
            timeout=30,
        )
        assert w.status_code == 400 and w.json()["error"]["code"] == "bad_json", w.text
    _healthy(gateway)


async def _open(url: str, path: str) -> ClientConnection:
    ws = await connect(url.replace("http", "ws") + path, open_timeout=30, max_size=None)
    await _next_of(ws, ("session.created",), 30)  # after any queue events
    return ws


async def _next_of(ws: ClientConnection, kinds: tuple[str, ...], timeout: float = 20) -> dict[str, Any]:
    async def find() -> dict[str, Any]:
        while True:
            frame = await ws.recv()
            if isinstance(frame, str):
                event = json.loads(frame)
                if event["type"] in kinds:
                    return dict(event)

    return await asyncio.wait_for(find(), timeout)


@pytest.mark.parametrize("path", ["/ws/duplex", "/v1/realtime"])
async def test_deep_json_on_a_websocket_gets_an_error_and_the_session_goes_on(
    urls: tuple[str, str], path: str
) -> None:
    gateway, _ = urls
    ws = await _open(gateway, path)
    try:
        for body in (DEEP, DEEP_OBJECT):
            await ws.send(body)
            error = await _next_of(ws, ("error",))
            assert (error.get("error") or error).get("code") == "bad_json", error
        update = {"type": "session.update", "session": {"instructions": "Be brief."}}
        await ws.send(json.dumps(update))
        updated = await _next_of(ws, ("session.updated",))
        assert updated["session"]["instructions"] == "Be brief."
    finally:
        await ws.close()


# --- static paths and operator settings ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/%00", "/index.html%00.js", "/" + "a" * 10_000, "/" + "a/" * 3000])
def test_strange_static_paths_are_404s(urls: tuple[str, str], path: str) -> None:
    gateway, _ = urls
    r = httpx.get(gateway + path, timeout=30)
    assert r.status_code in (404, 414), (path[:40], r.status_code)
    _healthy(gateway)


@pytest.mark.parametrize(
    "body",
    [{"ema_min_samples": True}, {"reset": "yes"}, {"ema_min_samples": 2.5}, {"baselines_s": {"chat": "3"}}],
)
def test_eta_settings_of_the_wrong_type_are_refused(urls: tuple[str, str], body: dict[str, Any]) -> None:
    gateway, _ = urls
    before = httpx.get(f"{gateway}/api/config/eta", timeout=10).json()
    r = httpx.put(f"{gateway}/api/config/eta", json=body, timeout=10)
    assert r.status_code == 400, r.text
    assert httpx.get(f"{gateway}/api/config/eta", timeout=10).json() == before  # nothing changed


# --- fuzz ------------------------------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
# Bodies that look like ours, with fields of any value, and anything at all.
_keys = st.sampled_from(
    ["text", "messages", "model", "input", "voice", "stream", "language", "audio_packets_b64",
     "audio_file_b64", "baselines_s", "ema_alpha", "reset", "max_tokens", "response_format", "speed"]
)  # fmt: skip
_bodies = st.dictionaries(_keys, _json, max_size=5) | _json
_ROUTES = [
    ("POST", "/v1/chat"),
    ("POST", "/v1/transcribe"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/audio/speech"),
    ("PUT", "/api/config/eta"),
]
_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(route=st.sampled_from(_ROUTES), body=_bodies)
def test_fuzz_json_routes_never_answer_500(urls: tuple[str, str], route: tuple[str, str], body: Any) -> None:
    gateway, _ = urls
    method, path = route
    r = httpx.request(method, f"{gateway}{path}", content=json.dumps(body), timeout=60,
                      headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code < 500, (path, body, r.status_code, r.text[:300])


_events = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            [
                "session.update",
                "input_audio_buffer.commit",
                "response.cancel",
                "input_audio_buffer.append",
                "response.create",
                "conversation.item.create",
                "session.pause",
                "nonsense",
            ]
        )
    },
    optional={"session": _json, "audio": _json, "item": _json, "event_id": _json},
)


@pytest.mark.parametrize("path", ["/ws/duplex", "/v1/realtime"])
def test_fuzz_websocket_events_get_answers_not_a_dropped_session(urls: tuple[str, str], path: str) -> None:
    gateway, _ = urls

    @_FUZZ
    @given(frames=st.lists(_events | _json, min_size=1, max_size=6))
    def one_session(frames: list[Any]) -> None:
        asyncio.run(_session(gateway, path, frames))

    one_session()


async def _session(gateway: str, path: str, frames: list[Any]) -> None:
    ws = await _open(gateway, path)
    try:
        for frame in frames:
            if isinstance(frame, dict) and frame.get("type") == "session.pause":
                continue  # a paused session is a legal state, not a failure; the probe below needs it live
            await ws.send(json.dumps(frame))
        # The session still answers: a valid update gets its session.updated (errors may come before it).
        await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "ok"}}))
        updated = await _next_of(ws, ("session.updated",))
        assert updated["type"] == "session.updated"
    finally:
        await ws.close()


# --- voice management through the gateway ----------------------------------------------------------------


def test_voices_are_managed_through_the_gateway(urls: tuple[str, str]) -> None:
    from tests.speech import espeak
    from tests.test_cosyvoice_voices import wav_bytes

    gateway, worker = urls
    recording = wav_bytes(espeak("Hello, this is my reference voice."))
    form = {"name": "alice", "text": "Hello, this is my reference voice."}
    added = httpx.post(f"{gateway}/v1/voices", data=form, files={"file": ("a.wav", recording)}, timeout=60)
    assert added.status_code == 201, added.text
    assert added.json()["name"] == "alice"
    names = [v["name"] for v in httpx.get(f"{gateway}/v1/voices", timeout=30).json()["voices"]]
    assert "alice" in names
    # it is the worker's registry the gateway reached (read there with the secret)
    direct = httpx.get(f"{worker}/v1/voices", headers=WORKER_HEADERS, timeout=30).json()["voices"]
    assert "alice" in [v["name"] for v in direct]
    assert httpx.delete(f"{gateway}/v1/voices/alice", timeout=30).status_code == 204
    assert "alice" not in [v["name"] for v in httpx.get(f"{gateway}/v1/voices", timeout=30).json()["voices"]]
    bad = httpx.post(f"{gateway}/v1/voices", data={"name": "../evil"}, files={"file": ("a.wav", recording)})
    assert bad.status_code == 400, bad.text


# --- the body bound itself, on the virtual clock ----------------------------------------------------------


@pytest.mark.parametrize(
    ("parts", "expect_status", "app_saw"),
    [
        # (seconds before each body part, more_body) ... then the app waits for the client to leave
        ([(0.0, True), (0.9, False)], 200, "whole"),  # each part within the 1 s bound: served
        ([(0.0, True), (5.0, False)], 408, "disconnect"),  # the second part is late: refused
        ([(0.0, False)], 200, "whole"),  # a complete body: the app may wait for the client for ever
    ],
)
def test_the_body_read_timeout_applies_only_while_the_body_is_incomplete(
    parts: list[tuple[float, bool]], expect_status: int, app_saw: str
) -> None:
    from core.web import BodyLimit
    from tests import virtual_time

    async def body() -> tuple[list[dict[str, Any]], str]:
        loop = asyncio.get_running_loop()
        sent: list[dict[str, Any]] = []
        left = list(parts)

        async def receive() -> dict[str, Any]:
            if not left:
                await loop.create_future()  # the client stays connected and sends nothing more
            delay, more = left.pop(0)
            await asyncio.sleep(delay)
            return {"type": "http.request", "body": b"{}", "more_body": more}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            nonlocal saw
            while (message := await receive())["type"] == "http.request" and message["more_body"]:
                pass
            saw = "disconnect" if message["type"] == "http.disconnect" else "whole"
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok", "more_body": True})
            with contextlib.suppress(TimeoutError):  # a streaming response waits for the client to leave
                async with asyncio.timeout(100.0):
                    await receive()

        saw = ""
        await BodyLimit(app, max_bytes=1000, read_timeout_s=1.0)(
            {"type": "http", "headers": []}, receive, send
        )
        return sent, saw

    sent, saw = virtual_time.run(body())
    assert sent[0]["status"] == expect_status and saw == app_saw
    if expect_status == 408:
        assert json.loads(sent[1]["body"])["error"]["code"] == "receive_timeout"
        assert len(sent) == 2  # the app's own answer after the client "left" is dropped
