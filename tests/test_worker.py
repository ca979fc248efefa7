"""The worker process on loopback: the fake stack for the protocol edges, the embedded stack for real speech."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect

from core.audio.framing import pack_packets, packets_to_b64
from core.models import embedded
from tests.duplex_client import (
    encode_16k,
    free_port,
    open_session,
    start_worker,
    stop,
    stream,
    wait_for,
    wait_healthy,
)
from tests.services import WORKER_HEADERS
from tests.speech import espeak, with_silence

ROOT = Path(__file__).resolve().parents[1]


def tone(seconds: float, freq: float = 220.0, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (level * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def fake_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    proc = start_worker(port, "fake", tmp_path_factory.mktemp("fake-worker"))
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, 60)
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


def test_health_reports_state_models_and_device(fake_worker: str) -> None:
    body = httpx.get(f"http://{fake_worker}/health").json()
    assert body["status"] == "idle"
    assert body["stack"] == "fake" and body["device"] == "cpu"
    assert set(body["models"]) >= {"asr", "llm", "tts", "vad"}
    assert body["uptime_s"] >= 0


async def test_second_concurrent_session_gets_busy(fake_worker: str) -> None:
    ws, _got, task = await open_session(f"ws://{fake_worker}/ws/duplex")
    try:
        assert httpx.get(f"http://{fake_worker}/health").json()["status"] == "busy"
        async with connect(f"ws://{fake_worker}/ws/duplex", additional_headers=WORKER_HEADERS) as second:
            event = json.loads(await asyncio.wait_for(second.recv(), 10))
            assert event["type"] == "error" and event["code"] == "busy"
        r = httpx.post(f"http://{fake_worker}/v1/chat", json={"text": "hi"}, headers=WORKER_HEADERS)
        assert r.status_code == 409 and r.json()["error"]["code"] == "busy"
    finally:
        await ws.close()
        task.cancel()


async def test_a_session_opened_as_the_last_one_closes_is_served(fake_worker: str) -> None:
    # A client that hangs up and reconnects at once races the worker's teardown of its first session (the
    # close handshake completes before the worker's handler has seen the disconnect): it must be served.
    for i in range(10):
        ws, got, task = await open_session(f"ws://{fake_worker}/ws/duplex")
        await stream(ws, encode_16k(tone(0.2)), realtime=False)  # a session with work in hand
        await ws.close()
        task.cancel()
        assert got.of("error") == []
        if i % 2:  # a one-shot request right after the hang-up is served too
            async with httpx.AsyncClient(base_url=f"http://{fake_worker}", headers=WORKER_HEADERS) as client:
                r = await client.post("/v1/chat", json={"text": "hello"}, timeout=30)
            assert r.status_code == 200, r.text


async def test_bad_input_gets_errors_and_the_session_survives(fake_worker: str) -> None:
    ws, got, task = await open_session(f"ws://{fake_worker}/ws/duplex")
    try:
        await ws.send('{"type": "session.update", "session": {"audio_format": "opus"}}')
        await ws.send("{not json")
        await ws.send('{"type": "no.such.event"}')
        await ws.send(b"\x00\x00garbage")  # a zero-length packet header
        await ws.send(pack_packets([b"\xff" * 40]))  # stereo/invalid Opus
        await wait_for(got, "error", 10, count=3)
        codes = {e["code"] for e in got.of("error")}
        assert {"bad_json", "unknown_event"} <= codes
        assert "bad_audio" in codes
        assert all("Traceback" not in e["message"] for e in got.of("error"))
        # still alive: a real turn (tone = speech for the fake VAD) is answered
        await stream(
            ws, encode_16k(np.concatenate([tone(1.0), np.zeros(16_000, np.float32)])), realtime=False
        )
        await ws.send('{"type": "input_audio_buffer.commit"}')
        done = await wait_for(got, "response.done", 20)
        assert done["status"] == "completed"
        assert (
            got.of("conversation.item.input_audio_transcription.completed")[0]["transcript"] == "hello there"
        )
    finally:
        await ws.close()
        task.cancel()


def test_http_chat_and_transcribe_errors_are_clear_json(fake_worker: str) -> None:
    base = f"http://{fake_worker}"
    ok = httpx.post(f"{base}/v1/chat", json={"text": "hello"}, timeout=30, headers=WORKER_HEADERS).json()
    assert ok["text"].startswith("Hello!") and ok["audio_s"] > 0.5
    cases = [
        ({"json": {"audio_packets_b64": "!!!"}}, 400, "bad_audio"),
        ({"json": {"audio_packets_b64": base64.b64encode(b"\x00\x00").decode()}}, 400, "bad_audio"),
        ({"json": {"audio_file_b64": base64.b64encode(b"not audio at all").decode()}}, 400, "bad_audio"),
        ({"json": {"unknown": 1}}, 400, "invalid_event"),
        ({"json": {}}, 400, "bad_audio"),
        ({"files": {"file": ("x.txt", b"hello", "text/plain")}}, 400, "bad_audio"),
    ]
    for kwargs, status, code in cases:
        r = httpx.post(f"{base}/v1/transcribe", timeout=30, headers=WORKER_HEADERS, **kwargs)  # type: ignore[arg-type]
        assert r.status_code == status, (kwargs, r.text)
        assert r.json()["error"]["code"] == code
    assert httpx.get(f"{base}/health").json()["status"] == "idle"


# --------------------------------------------------------------------------- the embedded stack


@pytest.fixture(scope="module")
def embedded_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not embedded.is_built(ROOT / "data" / "models"):
        pytest.skip("embedded models not built: run bash install.sh")
    port = free_port()
    proc = start_worker(port, "embedded", tmp_path_factory.mktemp("embedded-worker"))
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, 600)
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


QUESTION = "What is the capital of France?"


@pytest.mark.slow
async def test_spoken_question_gets_a_spoken_answer(embedded_worker: str) -> None:
    ws, got, task = await open_session(f"ws://{embedded_worker}/ws/duplex")
    try:
        speech = with_silence(espeak(QUESTION, voice="en-gb"), 0.3, 1.2)
        await stream(ws, encode_16k(speech))
        silence = encode_16k(np.zeros(16_000 * 30, np.float32))
        feeder = asyncio.create_task(stream(ws, silence))  # a loopback client keeps sending silence
        done = await wait_for(got, "response.done", 180)
        feeder.cancel()
        transcript = got.of("conversation.item.input_audio_transcription.completed")[0]["transcript"].lower()
        assert "capital" in transcript and "france" in transcript
        reply = "".join(e["delta"] for e in got.of("response.output_text.delta"))
        assert reply.strip() and done["status"] == "completed"
        assert done["text"].strip() == reply.strip()
        assert got.decoded_seconds() > 0.5
        t = done["timings"]
        for key in (
            "asr_ms",
            "llm_first_token_ms",
            "first_sentence_ms",
            "tts_first_audio_ms",
            "voice_to_voice_ms",
        ):
            assert t[key] is not None and t[key] > 0, key
        assert got.types().index("input_audio_buffer.speech_started") < got.types().index("response.created")
    finally:
        await ws.close()
        task.cancel()


@pytest.mark.slow
async def test_talking_over_the_reply_clears_it(embedded_worker: str) -> None:
    ws, got, task = await open_session(f"ws://{embedded_worker}/ws/duplex")
    try:
        await ws.send(json.dumps({"type": "session.update", "session": {
            "instructions": "You are a storyteller. Always answer with a long story of at least ten sentences."}}))  # fmt: skip
        await stream(ws, encode_16k(with_silence(espeak("Tell me a long story about a dragon."), 0.3, 1.0)))
        silence = asyncio.create_task(stream(ws, encode_16k(np.zeros(16_000 * 60, np.float32))))
        await wait_for(got, "response.created", 120)
        while not got.packets:  # wait for the first reply audio
            await asyncio.sleep(0.02)
        silence.cancel()
        await stream(ws, encode_16k(with_silence(espeak("Stop. Wait a moment please."), 0.0, 1.0)))
        clear = await wait_for(got, "response.output_audio.clear", 30)
        cancelled = await wait_for(got, "response.done", 30)
        assert cancelled["status"] == "cancelled" and cancelled["response_id"] == clear["response_id"]
        i_clear = got.events.index(clear)
        later = [e for e in got.events[i_clear:] if e["type"] == "response.created"]
        end = got.events.index(later[0]) if later else len(got.events)
        stale = [p for i, p in got.packets if i_clear <= i < end]
        assert stale == [], f"{len(stale)} packets of the cancelled response after the clear"
    finally:
        await ws.close()
        task.cancel()


@pytest.mark.slow
def test_http_transcribe_and_chat_with_real_models(embedded_worker: str) -> None:
    base = f"http://{embedded_worker}"
    speech = with_silence(espeak(QUESTION, voice="en-gb"), 0.2, 0.3)
    buf = io.BytesIO()
    sf.write(buf, speech, 16_000, format="WAV")
    r = httpx.post(
        f"{base}/v1/transcribe",
        files={"file": ("q.wav", buf.getvalue(), "audio/wav")},
        timeout=120,
        headers=WORKER_HEADERS,
    )
    assert r.status_code == 200, r.text
    assert "capital" in r.json()["text"].lower()
    r = httpx.post(
        f"{base}/v1/chat",
        json={"audio_packets_b64": packets_to_b64(encode_16k(speech))},
        timeout=180,
        headers=WORKER_HEADERS,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert "france" in body["transcript"].lower() and body["text"] and body["audio_s"] > 0.5


# --------------------------------------------------------------------------- CosyVoice2 through the worker


@pytest.fixture(scope="module")
def cosyvoice_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.cosyvoice_tiny import MICRO, tiny_folder

    folder = tiny_folder(MICRO)
    log_dir = tmp_path_factory.mktemp("cosyvoice-worker")
    ref = log_dir / "ref.wav"
    sf.write(ref, espeak("This is the voice I would like you to use."), 16_000)
    port = free_port()
    proc = start_worker(
        port, "fake", log_dir, extra_config={"model": {"tts": "cosyvoice2", "tts_path": str(folder), "device": "cpu"},
                                             "audio": {"ref_audio_path": str(ref)}}
    )  # fmt: skip
    try:
        health = wait_healthy(f"http://127.0.0.1:{port}", proc, 300)
        assert health["models"]["tts"].startswith("cosyvoice2")
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.mark.slow
async def test_cosyvoice_worker_answers_a_duplex_turn_with_audio(cosyvoice_worker: str) -> None:
    ws, got, task = await open_session(f"ws://{cosyvoice_worker}/ws/duplex")
    try:
        await stream(
            ws, encode_16k(np.concatenate([tone(1.0), np.zeros(16_000, np.float32)])), realtime=False
        )
        await ws.send('{"type": "input_audio_buffer.commit"}')
        done = await wait_for(got, "response.done", 240)
        assert done["status"] == "completed"
        assert got.decoded_seconds() > 0.5
        assert done["timings"]["tts_first_audio_ms"] is not None
    finally:
        await ws.close()
        task.cancel()
