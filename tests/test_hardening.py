"""Hostile and careless input against the real gateway and a (fake-model) worker on loopback: bodies bounded
while read, chunked or not; JSON nested past any sane depth; strange static paths; operator settings of the
wrong type; and a fuzz run over every JSON route and both WebSocket protocols. Nothing may answer 500, drop
a session without an ``error`` event, or take a process down."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect

from tests.services import WORKER_HEADERS, cluster

MAX_UPLOAD_MB = 1.0
DEEP = "[" * 5000 + "]" * 5000  # json.loads alone would raise RecursionError on this
DEEP_OBJECT = '{"a":' * 3000 + "1" + "}" * 3000


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with cluster(tmp_path_factory.mktemp("hardening"), stack="fake", max_upload_mb=MAX_UPLOAD_MB) as found:
        yield found


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A body sent with chunked transfer encoding (no Content-Length): the limit must hold while reading."""
    sent = 0
    while sent < total:
        yield b"x" * min(size, total - sent)
        sent += size


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
