"""``/v1/realtime`` end to end: the official ``openai`` Realtime client -> real gateway -> fake-stack worker.

One spoken turn (a tone the fake ASR hears as "hello there"), with the voice changed by
``session.update`` so that the reply audio (decoded from Opus on the worker) must come back as the
220 Hz tone of the fake TTS's "low" voice. Also: queueing a second client behind the first.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest
from websockets.asyncio.client import connect

from tests.services import cluster

pytestmark = pytest.mark.slow
REPLY = "Hello! This is a scripted reply from the fake language model."
RATE = 24_000


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with cluster(tmp_path_factory.mktemp("realtime-cluster")) as (url, _):
        yield url


def pcm16(seconds: float, frequency: float = 440.0, amplitude: float = 0.3) -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * frequency * t) * 32767).astype("<i2").tobytes()


def dominant_hz(pcm: bytes) -> float:
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / RATE)[int(np.argmax(spectrum))])


async def test_one_spoken_turn_with_the_openai_client(base: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused")
    events: list[Any] = []
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await conn.session.update(
            session={
                "type": "realtime",
                "audio": {
                    "input": {"format": {"type": "audio/pcm", "rate": 24000}},
                    "output": {"voice": "low"},
                },
            }
        )
        # Speech, then a second of silence: the server VAD ends the turn.
        speech = pcm16(0.8) + bytes(2 * RATE)
        for start in range(0, len(speech), 4800):  # 100 ms per event
            await conn.input_audio_buffer.append(
                audio=base64.b64encode(speech[start : start + 4800]).decode()
            )
        async with asyncio.timeout(60):
            async for event in conn:
                events.append(event)
                if event.type == "response.done":
                    break
    kinds = [e.type for e in events]
    assert kinds[:2] == ["session.created", "session.updated"]
    assert events[1].session.audio.output.voice == "low"
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed",
             "response.created", "response.output_audio.delta", "response.output_audio.done", "response.done"]  # fmt: skip
    firsts = [kinds.index(k) for k in order]
    assert firsts == sorted(firsts), kinds
    transcription = events[kinds.index("conversation.item.input_audio_transcription.completed")]
    assert transcription.transcript == "hello there"
    assert transcription.item_id == events[kinds.index("input_audio_buffer.committed")].item_id
    text = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    assert text.strip() == REPLY
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
    seconds = len(audio) / 2 / RATE
    assert seconds == pytest.approx(
        len("Hello!" + "This is a scripted reply from the fake language model.") * 0.06, abs=0.15
    )
    assert dominant_hz(audio) == pytest.approx(220, abs=5)  # the "low" voice, through Opus and back
    done = events[-1].response
    assert done.status == "completed" and done.output[0].content[0].transcript == REPLY


async def test_a_second_client_waits_in_the_queue_and_then_gets_its_session(base: str) -> None:
    url = base.replace("http", "ws") + "/v1/realtime?model=x"
    first = await connect(url)
    assert json.loads(await first.recv())["type"] == "session.created"
    second = await connect(url)
    try:
        queued = json.loads(await asyncio.wait_for(second.recv(), 10))
        assert queued["type"] == "session.queued" and queued["position"] == 1
        await second.send(json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}}))
        await second.send(
            json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm16(0.1)).decode()})
        )
        dropped = json.loads(await asyncio.wait_for(second.recv(), 10))
        assert dropped["type"] == "error" and dropped["error"]["code"] == "not_ready"
        await first.close()
        kinds = []
        async with asyncio.timeout(20):
            while "session.updated" not in kinds:
                kinds.append(json.loads(await second.recv())["type"])
        assert kinds[kinds.index("session.queue_done") :] == [
            "session.queue_done",
            "session.created",
            "session.updated",
        ]
    finally:
        await second.close()
        await first.close()


async def test_bad_events_get_realtime_errors_and_the_session_survives(base: str) -> None:
    async with connect(base.replace("http", "ws") + "/v1/realtime") as ws:
        # the previous test's session may still be releasing the worker: skip our queue events
        first = json.loads(await asyncio.wait_for(ws.recv(), 30))
        while first["type"].startswith("session.queue"):
            first = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert first["type"] == "session.created"
        await ws.send("{oops")
        await ws.send(json.dumps({"type": "conversation.item.create", "event_id": "e7"}))
        await ws.send(b"\x00\x01")
        errors = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(3)]
        assert [e["error"]["code"] for e in errors] == ["bad_json", "unknown_event", "invalid_event"]
        assert errors[1]["error"]["event_id"] == "e7"
        await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Still here."}}))
        updated = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert updated["type"] == "session.updated" and updated["session"]["instructions"] == "Still here."


async def _session(ws: Any) -> dict[str, Any]:
    """The first non-queue event (session.created), skipping the queue while an earlier session releases."""
    event = json.loads(await asyncio.wait_for(ws.recv(), 30))
    while event["type"].startswith("session.queue"):
        event = json.loads(await asyncio.wait_for(ws.recv(), 30))
    return event


async def _reply(ws: Any, event: dict[str, Any]) -> dict[str, Any]:
    await ws.send(json.dumps(event))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
    while reply["type"].startswith("session.queue"):
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return reply


@pytest.mark.parametrize("path", ["/ws/duplex", "/v1/realtime"])
async def test_turn_detection_on_both_websocket_apis(base: str, path: str) -> None:
    realtime = path == "/v1/realtime"

    def update(detection: Any) -> dict[str, Any]:
        if realtime:
            return {
                "type": "session.update",
                "session": {"type": "realtime", "audio": {"input": {"turn_detection": detection}}},
            }
        return {"type": "session.update", "session": {"turn_detection": detection}}

    def detection_of(event: dict[str, Any]) -> dict[str, Any]:
        session = event["session"]
        return session["audio"]["input"]["turn_detection"] if realtime else session["turn_detection"]

    async with connect(base.replace("http", "ws") + path) as ws:
        created = await _session(ws)
        assert created["type"] == "session.created"
        assert detection_of(created) == {"type": "semantic_vad", "eagerness": "auto"}  # the default
        for eagerness in ("low", "medium", "high", "auto"):
            updated = await _reply(ws, update({"type": "semantic_vad", "eagerness": eagerness}))
            assert updated["type"] == "session.updated", updated
            assert detection_of(updated) == {"type": "semantic_vad", "eagerness": eagerness}
        updated = await _reply(ws, update({"type": "server_vad", "silence_duration_ms": 700}))
        assert detection_of(updated) == {"type": "server_vad", "silence_duration_ms": 700}
        for bad in (
            {"type": "semantic_vad", "eagerness": "eventually"},
            {"type": "loud_vad"},
            {"type": "server_vad", "eagerness": "low"},
        ):
            error = await _reply(ws, update(bad))
            assert error["type"] == "error", error
            code = error["error"]["code"] if realtime else error["code"]
            assert code == "invalid_event"
        if realtime:
            error = await _reply(ws, update("semantic_vad"))
            assert error["type"] == "error" and error["error"]["code"] == "invalid_event"
        # the session is still there, with the last good setting
        updated = await _reply(ws, update({"type": "semantic_vad", "eagerness": "high"}))
        assert detection_of(updated) == {"type": "semantic_vad", "eagerness": "high"}
