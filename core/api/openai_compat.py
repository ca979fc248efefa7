"""OpenAI-compatible endpoints on the gateway, so stock OpenAI clients can use the server (``base_url=.../v1``).

- ``POST /v1/audio/transcriptions``: multipart ``file``, ``model`` (any; the worker's Whisper answers),
  ``language``, ``prompt`` (accepted, not used), ``response_format`` json | text | srt | vtt |
  verbose_json, ``timestamp_granularities[]`` segment (word is refused: the backend has no word times).
  Queued as ``transcribe`` and served by the worker's ``/v1/transcribe``.
- ``POST /v1/audio/speech``: JSON ``input``, ``voice`` (a voice the worker's TTS has, else its default:
  OpenAI's voice names are accepted so that stock clients work), ``response_format`` wav | pcm | opus |
  mp3 | flac (default mp3, as OpenAI's). Served by the worker's ``/v1/speech`` (core/worker/speech_routes.py).
- ``POST /v1/chat/completions``: text messages; ``stream: true`` answers server-sent events in the
  OpenAI chunk format, ended by ``data: [DONE]``. Served by the worker's ``/v1/text_chat``.
- ``GET /v1/models``: the worker's model names plus the usual aliases.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with our stable codes.
No audio library here: formats are checked by magic bytes, audio is made and encoded on the worker.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from core.api.jobs import parse_language
from core.gateway.worker_calls import CallFailed, kind_or, take_ticket, worker_response
from core.protocol import ErrorCode, parse_json
from core.storage.jobs import UnsupportedFormat, detect_format
from core.web import ClosingStream, UploadError, read_upload, unless_disconnected

if TYPE_CHECKING:
    from core.gateway.state import GatewayState

TRANSCRIPTION_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
SPEECH_MEDIA = {
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "opus": "audio/ogg",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
}
ALIASES = ("whisper-1", "tts-1", "gpt-4o-mini")
OWNER = "duplex-voice-server"
_CLIENT_ERRORS = {400, 404, 409, 413, 415, 422}


def openai_error(
    status: int, message: str, code: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error in OpenAI's shape."""
    kind = "invalid_request_error" if status in _CLIENT_ERRORS else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _from_failure(exc: CallFailed) -> JSONResponse:
    return openai_error(exc.status, exc.message, exc.code, headers=exc.headers())


def _from_worker(response: httpx.Response) -> JSONResponse:
    """A worker's ``{"error": {"code", "message"}}`` in OpenAI's shape."""
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    code = str(error.get("code") or ErrorCode.INTERNAL_ERROR.value)
    return openai_error(response.status_code, str(error.get("message") or "the worker failed"), code)


def _client_left() -> JSONResponse:
    """The answer to a client that left before its reply (499, as nginx logs it): nobody reads it."""
    return openai_error(499, "the client went away", ErrorCode.SESSION_CLOSED.value)


# --------------------------------------------------------------------------- transcription formats


def _timestamp(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _segments(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The worker's segments, or one segment spanning the audio when the backend gives none."""
    segments = [
        s for s in body.get("segments") or [] if isinstance(s, dict) and str(s.get("text", "")).strip()
    ]
    if not segments and str(body.get("text", "")).strip():
        segments = [{"start": 0.0, "end": float(body.get("duration_s") or 0.0), "text": body["text"]}]
    return segments


def to_srt(body: dict[str, Any]) -> str:
    """SubRip subtitles of a transcription."""
    blocks = [
        f"{i}\n{_timestamp(s['start'], ',')} --> {_timestamp(s['end'], ',')}\n{str(s['text']).strip()}\n"
        for i, s in enumerate(_segments(body), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(body: dict[str, Any]) -> str:
    """WebVTT subtitles of a transcription."""
    cues = [
        f"{_timestamp(s['start'], '.')} --> {_timestamp(s['end'], '.')}\n{str(s['text']).strip()}\n"
        for s in _segments(body)
    ]
    return "WEBVTT\n\n" + "\n".join(cues)


def to_verbose(body: dict[str, Any], with_segments: bool) -> dict[str, Any]:
    """OpenAI's ``verbose_json`` transcription object."""
    out: dict[str, Any] = {
        "task": "transcribe",
        "language": body.get("language") or "",
        "duration": float(body.get("duration_s") or 0.0),
        "text": str(body.get("text", "")),
    }
    if with_segments:
        out["segments"] = [
            {"id": i, "seek": 0, "start": float(s["start"]), "end": float(s["end"]), "text": str(s["text"]),
             "tokens": [], "temperature": 0.0, "avg_logprob": 0.0, "compression_ratio": 0.0, "no_speech_prob": 0.0}
            for i, s in enumerate(_segments(body))
        ]  # fmt: skip
    return out


def format_transcription(body: dict[str, Any], fmt: str, with_segments: bool) -> Response:
    """The worker's transcription answered in ``fmt``."""
    text = str(body.get("text", ""))
    if fmt == "text":
        return PlainTextResponse(text + "\n")
    if fmt == "srt":
        return PlainTextResponse(to_srt(body))
    if fmt == "vtt":
        return PlainTextResponse(to_vtt(body), media_type="text/vtt")
    if fmt == "verbose_json":
        return JSONResponse(to_verbose(body, with_segments))
    usage = {"type": "duration", "seconds": round(float(body.get("duration_s") or 0.0), 3)}
    return JSONResponse({"text": text, "usage": usage})


# --------------------------------------------------------------------------- request bodies


class SpeechRequest(BaseModel):
    """Body of ``POST /v1/audio/speech`` (OpenAI's fields; ``speed`` and ``instructions`` are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str = "tts-1"
    input: str = Field(min_length=1, max_length=4096)
    voice: str | dict[str, Any] | None = None
    response_format: Literal["wav", "pcm", "opus", "mp3", "flac"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    instructions: str | None = None


class ChatMessageIn(BaseModel):
    """One chat message; content is a string or a list of text parts."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; ValueError for a part that is not text."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content is supported, got a {str(part.get('type'))[:32]!r} part")
            pieces.append(part["text"])
        return "".join(pieces)


class ChatRequest(BaseModel):
    """Body of ``POST /v1/chat/completions`` (sampling options are accepted and left to the worker's config)."""

    model_config = ConfigDict(extra="ignore")
    model: str = "gpt-4o-mini"
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=512)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    n: int = Field(1, ge=1, le=1)


def _validation_error(exc: ValidationError) -> JSONResponse:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or None
    return openai_error(400, f"{where or 'body'}: {first['msg']}", ErrorCode.INVALID_EVENT.value, where)


async def _json_body(request: Request) -> Any:
    try:
        return parse_json(await request.body() or b"null")
    except ValueError:
        return None


# --------------------------------------------------------------------------- handlers


class OpenAIEndpoints:
    """The handlers; ``state`` is the gateway's."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    async def transcriptions(self, request: Request) -> Response:
        pool = self.state.pool
        if pool.is_full():
            return _from_failure(
                CallFailed(503, ErrorCode.QUEUE_FULL.value, "the queue is full", pool.retry_after_s())
            )
        try:
            upload = await read_upload(request, int(self.state.config.audio.max_upload_mb * 1024 * 1024))
            ext = detect_format(upload.data, upload.filename)
            language = parse_language(upload.get("language"))
        except UploadError as exc:
            return openai_error(exc.status, exc.message, exc.code, exc.param)
        except UnsupportedFormat as exc:
            return openai_error(400, str(exc), ErrorCode.UNSUPPORTED_FORMAT.value, "file")
        except ValueError as exc:
            return openai_error(400, str(exc), ErrorCode.INVALID_EVENT.value, "language")
        fmt = upload.get("response_format") or "json"
        if fmt not in TRANSCRIPTION_FORMATS:
            return openai_error(
                400,
                f"response_format must be one of {', '.join(TRANSCRIPTION_FORMATS)}",
                ErrorCode.INVALID_EVENT.value,
                "response_format",
            )
        if (upload.get("stream") or "false").lower() == "true":
            return openai_error(
                400, "streamed transcription is not supported", ErrorCode.INVALID_EVENT.value, "stream"
            )
        granularities = upload.fields.get("timestamp_granularities[]", []) + upload.fields.get(
            "timestamp_granularities", []
        )
        if "word" in granularities:
            return openai_error(
                400,
                "word timestamps are not supported by this backend; use segment",
                ErrorCode.INVALID_EVENT.value,
                "timestamp_granularities",
            )
        fields = {"language": language} if language else {}
        files = {"file": (f"audio.{ext}", upload.data, "application/octet-stream")}

        async def work() -> Response:
            async def prepare() -> dict[str, Any]:
                return {"files": files, "data": fields}

            ticket = take_ticket(pool, "transcribe")
            async with worker_response(self.state, ticket, "/v1/transcribe", prepare) as response:
                if response.status_code != 200:
                    return _from_worker(response)
                body = response.json()
            return format_transcription(body, fmt, not granularities or "segment" in granularities)

        return await self._served(request, work())

    async def speech(self, request: Request) -> Response:
        try:
            body = SpeechRequest.model_validate(await _json_body(request))
        except ValidationError as exc:
            return _validation_error(exc)
        voice = body.voice.get("id") if isinstance(body.voice, dict) else body.voice
        payload = {"input": body.input, "voice": voice, "response_format": body.response_format}

        async def work() -> Response:
            async def prepare() -> dict[str, Any]:
                return {"json": payload}

            ticket = take_ticket(self.state.pool, kind_or(self.state.pool, "speech", "chat"))
            async with worker_response(self.state, ticket, "/v1/speech", prepare) as response:
                if response.status_code != 200:
                    return _from_worker(response)
                return Response(response.content, media_type=SPEECH_MEDIA[body.response_format])

        return await self._served(request, work())

    async def chat(self, request: Request) -> Response:
        try:
            body = ChatRequest.model_validate(await _json_body(request))
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages
            ]
        except ValidationError as exc:
            return _validation_error(exc)
        except ValueError as exc:
            return openai_error(400, str(exc), ErrorCode.INVALID_EVENT.value, "messages")
        payload = {
            "messages": messages,
            "max_tokens": body.max_completion_tokens or body.max_tokens,
            "stream": body.stream,
        }
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        async def prepare() -> dict[str, Any]:
            return {"json": payload}

        if body.stream:
            return await self._chat_stream(request, body.model, reply_id, created, prepare)

        async def work() -> Response:
            ticket = take_ticket(self.state.pool, "chat")
            async with worker_response(self.state, ticket, "/v1/text_chat", prepare) as response:
                if response.status_code != 200:
                    return _from_worker(response)
                answer = response.json()
            message = {"role": "assistant", "content": answer.get("text", "")}
            return JSONResponse({
                "id": reply_id, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": message, "finish_reason": answer.get("finish_reason", "stop")}],
            })  # fmt: skip

        return await self._served(request, work())

    async def _chat_stream(
        self, request: Request, model: str, reply_id: str, created: int, prepare: Any
    ) -> Response:
        """Queue first (errors still get a status code), then relay the worker's deltas as SSE chunks.

        The wait for a worker is watched for the client leaving, as the other routes' are: a client gone
        while queued withdraws its ticket at once, so it holds no place in the queue and never a worker.
        """
        stack = AsyncExitStack()

        async def open_reply() -> httpx.Response:
            ticket = take_ticket(self.state.pool, kind_or(self.state.pool, "streaming", "chat"))
            return await stack.enter_async_context(
                worker_response(self.state, ticket, "/v1/text_chat", prepare, stream=True)
            )

        try:
            # Cancelled when the client leaves: worker_response's exit withdraws a waiting ticket at once
            # (counted as cancelled, as a queued WebSocket client that leaves) or releases its lease.
            response = await unless_disconnected(request, open_reply())
            if response is None:
                await stack.aclose()
                return _client_left()
            if response.status_code != 200:
                await response.aread()
                await stack.aclose()
                return _from_worker(response)
        except CallFailed as exc:
            await stack.aclose()
            return _from_failure(exc)
        except BaseException:
            await stack.aclose()
            raise

        def chunk(delta: dict[str, str], finish: str | None) -> bytes:
            data = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
            return f"data: {json.dumps(data)}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""}, None)
            finish = "stop"
            try:
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if "delta" in item:
                        yield chunk({"content": item["delta"]}, None)
                    elif "error" in item:
                        error = {"message": item["error"].get("message", "the worker failed"), "type": "server_error",
                                 "param": None, "code": item["error"].get("code")}  # fmt: skip
                        yield f"data: {json.dumps({'error': error})}\n\n".encode()
                        return
                    elif item.get("done"):
                        finish = item.get("finish_reason", "stop")
            except (httpx.HTTPError, ValueError):
                error = {"message": "the worker stopped mid-reply", "type": "server_error", "param": None,
                         "code": ErrorCode.WORKER_LOST.value}  # fmt: skip
                yield f"data: {json.dumps({'error': error})}\n\n".encode()
                return
            yield chunk({}, finish)
            yield b"data: [DONE]\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return ClosingStream(events(), stack.aclose, media_type="text/event-stream", headers=headers)

    async def models(self, _: Request) -> Response:
        names = [*(await self._worker_models()), *ALIASES]
        unique = list(dict.fromkeys(names))
        data = [{"id": name, "object": "model", "created": 0, "owned_by": OWNER} for name in unique]
        return JSONResponse({"object": "list", "data": data})

    async def _worker_models(self) -> list[str]:
        """Model names from a healthy worker's /health (empty when none answers)."""
        state = self.state
        if state.http is None:
            return []
        for worker in [w for w in state.pool.workers if w.healthy]:
            try:
                models = (
                    (await state.http.get(state.worker_url(worker.address, "/health"), timeout=2.0))
                    .json()
                    .get("models")
                )
            except (httpx.HTTPError, ValueError, AttributeError):
                continue
            if isinstance(models, dict):
                return [str(v) for v in models.values() if v]
        return []

    async def _served(self, request: Request, work: Any) -> Response:
        try:
            response = await unless_disconnected(request, work)
        except CallFailed as exc:
            return _from_failure(exc)
        return response if response is not None else _client_left()


def openai_routes(state: GatewayState) -> list[BaseRoute]:
    """The OpenAI-compatible routes (mount them before the gateway's catch-all static route)."""
    api = OpenAIEndpoints(state)
    return [
        Route("/v1/audio/transcriptions", api.transcriptions, methods=["POST"]),
        Route("/v1/audio/speech", api.speech, methods=["POST"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
    ]
