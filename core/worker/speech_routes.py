"""Worker endpoints behind the gateway's OpenAI-compatible API: text to speech, and text-only chat.

Mount on the worker app (``app.include_router(speech_router())``); they use the worker's ``WorkerState``
(``app.state.worker``): the model stack, its single executor thread, and its lock (one request or
session at a time: 409 ``busy`` otherwise, 503 ``not_ready`` while loading, like the worker's own routes).

- ``POST /v1/speech`` ``{input, voice, response_format}`` -> audio bytes: ``wav`` (PCM 16-bit), ``pcm``
  (raw s16le, 24 kHz mono), ``opus`` (Ogg Opus), ``mp3``, ``flac``; all encoded in-process by libsndfile.
  A voice the TTS does not have falls back to the configured voice (OpenAI's voice names are accepted).
- ``POST /v1/text_chat`` ``{messages: [{role, content}], max_tokens, stream}`` -> ``{text, finish_reason}``,
  or with ``stream`` newline-delimited JSON: ``{"delta": ...}`` lines, then ``{"done": true,
  "finish_reason": ...}`` (or ``{"error": {...}}``). A client that leaves stops the model within a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import numpy as np
import soundfile as sf
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.models.base import OUTPUT_SAMPLE_RATE, ChatMessage, ModelStack
from core.protocol import ErrorCode, parse_json
from core.session.executor import iterate_in_executor
from core.web import ClosingStream

log = logging.getLogger("worker.speech")

#: libsndfile container and subtype per response format (None: raw samples).
ENCODINGS: dict[str, tuple[str, str] | None] = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "opus": ("OGG", "OPUS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "pcm": None,
}
MEDIA_TYPES = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "opus": "audio/ogg",
    "mp3": "audio/mpeg",
    "pcm": "audio/pcm",
}


class SpeechIn(BaseModel):
    """Body of ``POST /v1/speech``."""

    model_config = ConfigDict(extra="forbid")
    input: str = Field(min_length=1, max_length=4096)
    voice: str | None = Field(None, max_length=128)
    response_format: Literal["wav", "pcm", "opus", "mp3", "flac"] = "wav"


class TextMessage(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=32_000)


class TextChatIn(BaseModel):
    """Body of ``POST /v1/text_chat``."""

    model_config = ConfigDict(extra="forbid")
    messages: list[TextMessage] = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    stream: bool = False


def _error(status: int, code: ErrorCode, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code.value, "message": message}}, status_code=status)


def encode_audio(audio: np.ndarray, fmt: str) -> bytes:
    """Float32 mono 24 kHz audio in ``fmt`` (see :data:`ENCODINGS`)."""
    audio = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    encoding = ENCODINGS[fmt]
    if encoding is None:
        return (audio * 32767.0).round().astype("<i2").tobytes()
    buf = io.BytesIO()
    sf.write(buf, audio, OUTPUT_SAMPLE_RATE, format=encoding[0], subtype=encoding[1])
    return buf.getvalue()


def _speak_blocking(stack: ModelStack, text: str, voice: str | None, fmt: str) -> bytes:
    chunks = [np.asarray(c, dtype=np.float32).reshape(-1) for c in stack.tts.synthesize(text, voice=voice)]
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return encode_audio(audio, fmt)


def _worker(request: Request) -> Any:
    return request.app.state.worker


async def _claim(state: Any) -> JSONResponse | None:
    """Take the worker (``WorkerState.claim``); the refusal to send when it cannot be had."""
    if state.stack is None:
        return _error(503, ErrorCode.NOT_READY, f"worker is {state.status}")
    if not await state.claim():
        return _error(409, ErrorCode.BUSY, "worker is busy with another session")
    return None


async def _body(request: Request, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(parse_json(await request.body()))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        return _error(400, ErrorCode.INVALID_EVENT, f"{where}: {first['msg']}")
    except ValueError as exc:  # not JSON, not UTF-8, or nested too deeply
        return _error(400, ErrorCode.BAD_JSON, f"the body is not valid JSON ({exc.__class__.__name__})")


def speech_router() -> APIRouter:
    """The worker's ``/v1/speech`` and ``/v1/text_chat`` routes."""
    router = APIRouter()

    @router.post("/v1/speech")
    async def speech(request: Request) -> Response:
        state = _worker(request)
        body = await _body(request, SpeechIn)
        if isinstance(body, Response):
            return body
        refused = await _claim(state)
        if refused is not None:
            return refused
        voices = state.stack.tts.voices
        voice = body.voice if body.voice in voices else state.config.duplex.voice
        try:
            loop = asyncio.get_running_loop()
            job = functools.partial(_speak_blocking, state.stack, body.input, voice, body.response_format)
            audio = await loop.run_in_executor(state.executor, job)
        except Exception:
            log.exception("speech failed")
            return _error(500, ErrorCode.INTERNAL_ERROR, "the TTS failed on this request")
        finally:
            state.release()
        return Response(audio, media_type=MEDIA_TYPES[body.response_format])

    @router.post("/v1/text_chat")
    async def text_chat(request: Request) -> Response:
        state = _worker(request)
        body = await _body(request, TextChatIn)
        if isinstance(body, Response):
            return body
        refused = await _claim(state)
        if refused is not None:
            return refused
        release = state.release

        limit = min(body.max_tokens or state.config.model.max_new_tokens, 4096)
        messages = [ChatMessage(m.role, m.content) for m in body.messages]  # no voice persona: a text API
        stream = _llm_lines(state.stack, messages, limit, state.executor)
        if body.stream:
            return ClosingStream(stream, _once(release), media_type="application/x-ndjson")
        try:
            pieces, last = [], {}
            async for line in stream:
                item = json.loads(line)
                if "delta" in item:
                    pieces.append(item["delta"])
                last = item
        finally:
            release()
        if "error" in last:
            return JSONResponse(last, status_code=500)
        return JSONResponse(
            {"text": "".join(pieces).strip(), "finish_reason": last.get("finish_reason", "stop")}
        )

    return router


def _once(fn: Callable[[], None]) -> Callable[[], Any]:
    done = False

    async def run() -> None:
        nonlocal done
        if not done:
            done = True
            fn()

    return run


async def _llm_lines(
    stack: ModelStack, messages: list[ChatMessage], limit: int, executor: Any
) -> AsyncIterator[str]:
    """The LLM's reply as NDJSON lines; closing this generator early cancels the model within a token."""
    cancel = threading.Event()
    factory = functools.partial(stack.llm.stream, messages, max_new_tokens=limit, cancel=cancel)
    count = 0
    try:
        async with contextlib.aclosing(iterate_in_executor(factory, executor)) as deltas:
            async for delta in deltas:
                count += 1
                yield json.dumps({"delta": delta}) + "\n"
        # The protocol has no end reason; a reply that used every allowed token was most likely cut.
        yield json.dumps({"done": True, "finish_reason": "length" if count >= limit else "stop"}) + "\n"
    except Exception as exc:
        log.exception("text chat failed")
        yield (
            json.dumps(
                {
                    "error": {
                        "code": ErrorCode.INTERNAL_ERROR.value,
                        "message": f"the LLM failed: {exc.__class__.__name__}",
                    }
                }
            )
            + "\n"
        )
    finally:
        cancel.set()
