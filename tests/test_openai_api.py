"""The OpenAI-compatible endpoints with the official ``openai`` client against the real gateway and a fake-stack worker.

The fake stack answers every sound with "hello there", replies with its scripted sentence and speaks
0.06 s of tone per character, so every assertion below is exact.
"""

from __future__ import annotations

import asyncio
import io
import json
import wave
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import soundfile as sf
from websockets.asyncio.client import connect

from core.api.openai_compat import to_srt, to_verbose, to_vtt
from tests.services import cluster, until
from tests.test_jobs_api import tone_wav

pytestmark = pytest.mark.slow
REPLY = "Hello! This is a scripted reply from the fake language model."
SECONDS_PER_CHAR = 0.06  # the fake TTS


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with cluster(tmp_path_factory.mktemp("openai-cluster")) as (url, _):
        yield url


@pytest.fixture
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def transcribe(client: openai.OpenAI, fmt: str, **extra: object) -> object:
    return client.audio.transcriptions.create(
        model="whisper-1",
        file=("talk.wav", tone_wav(1.5)),
        response_format=fmt,
        **extra,  # type: ignore[call-overload]
    )


def test_transcription_in_every_format(client: openai.OpenAI) -> None:
    plain = transcribe(client, "json")
    assert plain.text == "hello there"  # type: ignore[attr-defined]
    assert transcribe(client, "text").strip() == "hello there"  # type: ignore[attr-defined]
    assert transcribe(client, "srt") == "1\n00:00:00,000 --> 00:00:01,500\nhello there\n"
    assert transcribe(client, "vtt") == "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nhello there\n"
    verbose = transcribe(client, "verbose_json", timestamp_granularities=["segment"], language="en")
    assert verbose.text == "hello there" and verbose.language == "en"  # type: ignore[attr-defined]
    assert verbose.duration == pytest.approx(1.5)  # type: ignore[attr-defined]
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [(0.0, 1.5, "hello there")]  # type: ignore[attr-defined]


def test_transcription_errors_have_the_openai_shape(client: openai.OpenAI, base: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        transcribe(client, "verbose_json", timestamp_granularities=["word"])
    assert info.value.code == "invalid_event" and "word timestamps" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(model="whisper-1", file=("notes.txt", b"plain text"))
    assert info.value.code == "unsupported_format" and "wav, flac, mp3" in info.value.message
    r = httpx.post(
        f"{base}/v1/audio/transcriptions",
        files={"file": ("a.wav", tone_wav(0.2))},
        data={"response_format": "xml"},
    )
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert (
        r.json()["error"]["type"] == "invalid_request_error"
        and r.json()["error"]["param"] == "response_format"
    )


def _speech(client: openai.OpenAI, text: str, fmt: str) -> bytes:
    response = client.audio.speech.create(model="tts-1", voice="alloy", input=text, response_format=fmt)  # type: ignore[arg-type]
    return response.content


def test_speech_in_every_format(client: openai.OpenAI) -> None:
    text = "Good morning, world."
    seconds = len(text) * SECONDS_PER_CHAR
    wav = _speech(client, text, "wav")
    with wave.open(io.BytesIO(wav)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24_000, 1, 2)
        assert w.getnframes() / 24_000 == pytest.approx(seconds, abs=0.01)
    pcm = _speech(client, text, "pcm")
    assert len(pcm) / 2 / 24_000 == pytest.approx(seconds, abs=0.01)
    assert _speech(client, text, "opus")[:4] == b"OggS"
    assert _speech(client, text, "flac")[:4] == b"fLaC"
    mp3 = _speech(client, text, "mp3")
    assert mp3[:3] == b"ID3" or mp3[0] == 0xFF
    decoded, rate = sf.read(io.BytesIO(mp3))
    assert rate == 24_000 and len(decoded) / rate == pytest.approx(seconds, abs=0.1)


def test_speech_rejects_empty_input(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(model="tts-1", voice="alloy", input="")
    assert info.value.param == "input"


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}],
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == REPLY
    assert reply.choices[0].finish_reason == "stop"


def test_streamed_chat_completion(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) > 5  # one chunk per token, not one blob
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == REPLY
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def _queued(base: str) -> int:
    return int(httpx.get(f"{base}/api/queue", timeout=5).json()["queued"])


def _cancelled(base: str) -> float:
    line = 'gateway_rejected_total{reason="cancelled"} '
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return sum(float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line))


async def test_a_streaming_chat_client_that_leaves_while_queued_gives_up_its_place(base: str) -> None:
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello."}], "stream": True}
    async with connect(base.replace("http", "ws") + "/ws/duplex") as session:  # holds the only worker
        async with asyncio.timeout(10):
            while json.loads(await session.recv())["type"] != "session.created":
                pass
        cancelled = _cancelled(base)
        # The leaver: a raw connection, so when it goes is ours to say.
        url = urlsplit(base)
        _, leaver = await asyncio.open_connection(url.hostname, url.port)
        payload = json.dumps(chat).encode()
        leaver.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await leaver.drain()
        await until(lambda: _queued(base) == 1, "the leaver queued")
        async with httpx.AsyncClient(timeout=30) as client:
            stayer = asyncio.create_task(client.post(f"{base}/v1/chat/completions", json=chat))
            try:
                await until(lambda: _queued(base) == 2, "the stayer queued behind it")
                leaver.close()
                await leaver.wait_closed()
                await until(lambda: _queued(base) == 1, "the leaver's ticket withdrawn")
                assert _cancelled(base) == cancelled + 1
                await session.close()  # the worker frees: the stayer, now first, takes it
                reply = await asyncio.wait_for(stayer, 30)
            finally:
                stayer.cancel()
    assert reply.status_code == 200 and reply.text.endswith("data: [DONE]\n\n")
    chunks = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == REPLY
    assert _queued(base) == 0


def test_chat_rejects_what_it_cannot_do(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="x",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
        )
    assert "only text content" in info.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="x", messages=[])


def test_models_lists_the_workers_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert {"fake-asr", "fake-llm", "fake-tts", "whisper-1", "tts-1"} <= set(ids)


def test_subtitle_formats_from_segments() -> None:
    body = {
        "text": "One. Two.",
        "language": "en",
        "duration_s": 3725.5,
        "segments": [
            {"start": 0.0, "end": 1.25, "text": " One."},
            {"start": 3723.0, "end": 3725.5, "text": " Two."},
        ],
    }
    assert (
        to_srt(body) == "1\n00:00:00,000 --> 00:00:01,250\nOne.\n\n2\n01:02:03,000 --> 01:02:05,500\nTwo.\n"
    )
    assert to_vtt(body) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.250\nOne.\n\n01:02:03.000 --> 01:02:05.500\nTwo.\n"
    )
    verbose = to_verbose(body, with_segments=True)
    assert [s["id"] for s in verbose["segments"]] == [0, 1] and verbose["duration"] == 3725.5
    assert "segments" not in to_verbose(body, with_segments=False)
    assert to_srt({"text": "", "segments": []}) == ""
