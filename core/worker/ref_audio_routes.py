"""HTTP routes for reference voices: upload, list, delete (mounted on the worker app).

    POST   /v1/voices         multipart: file (audio, 1-30 s), name, text (optional transcript),
                              replace (optional, "true" to overwrite) -> 201 {voice}
    GET    /v1/voices         -> {"voices": [...uploaded...], "model_voices": [...the TTS's own...]}
    DELETE /v1/voices/{name}  -> 204

A stored voice is also handed to the live TTS when it can take one (``add_voice``: CosyVoice2), on the
executor given (the model's thread), so that a recording the model cannot use is refused at upload time
and nothing is kept. :func:`connect_voices` lets the TTS find stored voices by name after a restart.
Errors use the worker's body shape: ``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from core.protocol import ErrorCode
from core.storage.ref_audio import RefAudioError, RefAudioRegistry, check_name

log = logging.getLogger("server.voices")

_STATUS: dict[str, tuple[int, ErrorCode]] = {
    "bad_name": (400, ErrorCode.INVALID_EVENT),
    "bad_text": (400, ErrorCode.INVALID_EVENT),
    "bad_audio": (400, ErrorCode.BAD_AUDIO),
    "too_large": (413, ErrorCode.PAYLOAD_TOO_LARGE),
    "exists": (409, ErrorCode.INVALID_EVENT),
    "not_found": (404, ErrorCode.NOT_FOUND),
    "storage": (500, ErrorCode.INTERNAL_ERROR),
}


def _error(status: int, code: ErrorCode, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code.value, "message": message}}, status_code=status)


def _from(exc: RefAudioError) -> JSONResponse:
    status, code = _STATUS.get(exc.kind, (400, ErrorCode.INVALID_EVENT))
    return _error(status, code, str(exc))


def connect_voices(tts: Any, registry: RefAudioRegistry) -> None:
    """Let a TTS that resolves voice names lazily (CosyVoice2's ``voice_resolver``) find stored voices."""
    if hasattr(tts, "voice_resolver"):
        tts.voice_resolver = registry.resolve


def _truthy(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on")


def build_ref_audio_router(
    registry: RefAudioRegistry,
    get_tts: Callable[[], Any] | None = None,
    *,
    executor: Executor | None = None,
) -> APIRouter:
    """The /v1/voices routes over ``registry``; ``get_tts`` returns the live TTS (or None while loading)."""
    router = APIRouter()

    async def blocking(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def live_tts() -> Any:
        tts = get_tts() if get_tts is not None else None
        return tts if tts is not None and hasattr(tts, "add_voice") else None

    @router.post("/v1/voices", status_code=201)
    async def upload_voice(request: Request) -> Response:
        limit = registry.max_upload_bytes
        if int(request.headers.get("content-length") or 0) > limit * 1.4 + 65536:
            return _error(413, ErrorCode.PAYLOAD_TOO_LARGE, f"request body over {limit} bytes")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return _error(
                415, ErrorCode.UNSUPPORTED_FORMAT, "send multipart/form-data with file, name and text"
            )
        try:
            form = await request.form()
        except Exception as exc:  # malformed multipart body: the parser's words go to the log
            log.info("unreadable voice upload form: %r", exc)
            return _error(400, ErrorCode.INVALID_EVENT, "unreadable form: send multipart/form-data")
        upload, name, text = form.get("file"), form.get("name"), form.get("text")
        if not isinstance(upload, UploadFile):
            return _error(400, ErrorCode.INVALID_EVENT, "the form has no 'file' upload")
        if not isinstance(name, str):
            return _error(400, ErrorCode.INVALID_EVENT, "the form has no 'name'")
        if text is not None and not isinstance(text, str):
            return _error(400, ErrorCode.INVALID_EVENT, "'text' must be a plain field")
        data = await upload.read(limit + 1)
        try:
            voice = await blocking(
                lambda: registry.add(
                    name,
                    data,
                    text=text,
                    filename=upload.filename or "",
                    replace=_truthy(form.get("replace")),
                )
            )
        except RefAudioError as exc:
            return _from(exc)
        tts = live_tts()
        if tts is not None:
            try:
                await blocking(tts.add_voice, voice.name, registry.path(voice), voice.text)
            except Exception as exc:  # the model refused the recording: keep nothing
                log.warning("TTS rejected reference voice %r: %s", voice.name, exc)
                await blocking(registry.remove, voice.name)
                return _error(
                    400, ErrorCode.BAD_AUDIO, "the TTS cannot use this recording (see the worker log)"
                )
        return JSONResponse(voice.public(), status_code=201)

    @router.get("/v1/voices")
    async def list_voices() -> Response:
        tts = get_tts() if get_tts is not None else None
        uploaded = [v.public() for v in registry.voices()]
        names = {v["name"] for v in uploaded}
        model = [n for n in getattr(tts, "voices", ()) if n not in names]
        return JSONResponse({"voices": uploaded, "model_voices": model})

    @router.delete("/v1/voices/{name}", status_code=204)
    async def delete_voice(name: str) -> Response:
        try:
            check_name(name)
            await blocking(registry.remove, name)
        except RefAudioError as exc:
            return _from(exc)
        tts = live_tts()
        if tts is not None and hasattr(tts, "remove_voice"):
            await blocking(tts.remove_voice, name)
        return Response(status_code=204)

    return router
