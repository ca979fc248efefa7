"""The worker's HTTP/WebSocket app: one model stack, one live session at a time.

``GET /health`` (503 while loading), ``WS /ws/duplex`` (docs/PROTOCOL.md), ``POST /v1/chat`` (audio or text in, reply
text and speech out), ``POST /v1/transcribe`` (audio in, text and segments out). Models load on a background
thread after the server starts listening, so /health can say "loading". The models of a reply (ASR, LLM, TTS)
are called from the stack's single executor thread; the end-of-turn model is asked on a session's own one-thread
pool so that it never waits behind a reply, and CTranslate2 decodes on its own threads, driven from the executor.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.audio.errors import AudioError
from core.audio.files import load_audio_bytes
from core.audio.framing import b64_to_packets, packets_to_b64
from core.audio.opus import OpusDecoder, OpusEncoder
from core.config import Config
from core.models.base import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, ChatMessage, ModelStack
from core.protocol import ErrorCode, error_event, parse_json
from core.session.counters import SessionCounters
from core.session.duplex import DuplexSession
from core.session.executor import device_executor
from core.session.text import SentenceChunker
from core.storage.ref_audio import RefAudioRegistry
from core.web import BodyLimit, body_limit
from core.worker.realtime import realtime_router
from core.worker.ref_audio_routes import build_ref_audio_router, connect_voices
from core.worker.speech_routes import speech_router
from core.worker_auth import WorkerSecretMiddleware, resolve_worker_secret

log = logging.getLogger("worker")

#: How long a new session waits for the previous one to finish closing before it is refused as ``busy``.
HANDOVER_WAIT_S = 1.5

Status = Literal["loading", "idle", "busy", "paused", "error"]


@dataclass
class WorkerState:
    """Everything the app knows about itself; one instance per process."""

    config: Config
    index: int
    status: Status = "loading"
    stack: ModelStack | None = None
    error: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    executor: ThreadPoolExecutor = field(default_factory=lambda: device_executor("model"))
    session: DuplexSession | None = None
    sessions_served: int = 0
    #: Preemptive replies and end-of-turn decisions of every session this worker served.
    counters: SessionCounters = field(default_factory=SessionCounters)

    async def serve_exclusively(
        self,
        ws: WebSocket,
        refuse: Callable[[WebSocket, ErrorCode, str], Awaitable[None]],
        serve: Callable[[WebSocket, WorkerState], Awaitable[None]],
    ) -> None:
        """Run ``serve`` as this worker's only live session; ``refuse`` the socket while loading or busy."""
        if self.stack is None:
            await refuse(ws, ErrorCode.NOT_READY, f"worker is {self.status}")
            return
        if not await self.claim():
            await refuse(ws, ErrorCode.BUSY, "worker is busy with another session")
            return
        try:
            self.sessions_served += 1
            await serve(ws, self)
        finally:
            self.release()

    async def claim(self) -> bool:
        """Take the worker for one session or request (then :meth:`release` it); False when another still
        holds it after ``HANDOVER_WAIT_S``.

        The wait is for a session that is closing: its client may have hung up a moment ago (the close
        handshake ends before this process has handled the disconnect) and this is its next request.
        """
        try:
            async with asyncio.timeout(HANDOVER_WAIT_S):
                await self.lock.acquire()
        except TimeoutError:
            return False
        self.status = "busy"
        return True

    def release(self) -> None:
        """Give the worker back after :meth:`claim`."""
        self.session = None
        self.status = "idle"
        self.lock.release()

    def health(self) -> dict[str, Any]:
        """The /health body."""
        status: Status = self.status
        if status == "busy" and self.session is not None and self.session.paused:
            status = "paused"
        body: dict[str, Any] = {
            "status": status,
            "worker_index": self.index,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "sessions_served": self.sessions_served,
            "counters": self.counters.snapshot(),
        }
        if self.stack is not None:
            body.update(models=dict(self.stack.info), device=self.stack.device, stack=self.stack.kind)
        if self.error:
            body["error"] = self.error
        return body


def _load(state: WorkerState, build: Callable[[], ModelStack], voices: RefAudioRegistry) -> None:
    try:
        t0 = time.monotonic()
        stack = build()
        connect_voices(stack.tts, voices)
        # On the thread that will serve: CUDA graphs captured in warm-up are per thread, and would be
        # recorded again on the first real turn if captured here.
        state.executor.submit(stack.warmup).result()
        state.stack = stack
        state.status = "idle"
        log.info("models ready in %.1f s: %s", time.monotonic() - t0, stack.info)
    except Exception as exc:  # a broken model must show in /health, not kill the process
        log.exception("model loading failed")
        state.status, state.error = "error", f"model loading failed: {exc}"


def _json_error(status: int, code: ErrorCode, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code.value, "message": message}}, status_code=status)


class AudioIn(BaseModel):
    """Audio in a JSON body: length-prefixed Opus packets (16 kHz) or a whole audio file, base64."""

    model_config = ConfigDict(extra="forbid")
    audio_packets_b64: str | None = Field(None, description="[uint16 LE len][Opus packet]... base64")
    audio_file_b64: str | None = Field(None, description="an audio file (wav, flac, mp3, ...) base64")
    text: str | None = Field(None, max_length=8000, description="chat only: text instead of audio")
    language: str | None = Field(None, max_length=16)
    instructions: str | None = Field(None, max_length=8000)
    voice: str | None = Field(None, max_length=128)
    response_format: Literal["opus", "wav"] = "opus"


def _decode_packets(b64: str, max_bytes: int) -> np.ndarray:
    decoder = OpusDecoder(INPUT_SAMPLE_RATE)
    packets = b64_to_packets(b64, max_bytes=max_bytes)
    if not packets:
        raise AudioError("no audio packets")
    return np.concatenate([decoder.decode(p) for p in packets]).astype(np.float32)


async def _read_audio(request: Request, config: Config) -> tuple[np.ndarray | None, AudioIn]:
    """Audio and options from a multipart upload (``file`` field) or a JSON body."""
    max_bytes = int(config.audio.max_upload_mb * 1024 * 1024)
    length = int(request.headers.get("content-length") or 0)
    if length > max_bytes * 1.4 + 65536:
        raise _TooLarge(f"request body over {config.audio.max_upload_mb:g} MB")
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        fields = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
        opts = AudioIn.model_validate(fields)
        if upload is None or isinstance(upload, str):
            return None, opts
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise _TooLarge(f"upload over {config.audio.max_upload_mb:g} MB")
        return load_audio_bytes(data, INPUT_SAMPLE_RATE, max_duration_s=config.audio.max_audio_s), opts
    try:
        body = parse_json(await request.body())
    except ValueError as exc:  # not JSON, not UTF-8, or nested too deeply
        raise AudioError(f"the body is not valid JSON ({exc.__class__.__name__})", kind="bad_json") from None
    opts = AudioIn.model_validate(body)
    if opts.audio_packets_b64:
        return _decode_packets(opts.audio_packets_b64, max_bytes), opts
    if opts.audio_file_b64:
        try:
            data = base64.b64decode(opts.audio_file_b64, validate=True)
        except ValueError:
            raise AudioError("audio_file_b64 is not valid base64") from None
        return load_audio_bytes(data, INPUT_SAMPLE_RATE, max_duration_s=config.audio.max_audio_s), opts
    return None, opts


class _TooLarge(Exception):
    pass


def _encode_reply(chunks: list[np.ndarray], fmt: str) -> tuple[str, float]:
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    seconds = len(audio) / OUTPUT_SAMPLE_RATE
    if fmt == "wav":
        buf = io.BytesIO()
        sf.write(buf, audio, OUTPUT_SAMPLE_RATE, format="WAV", subtype="PCM_16")
        return base64.b64encode(buf.getvalue()).decode(), seconds
    enc = OpusEncoder(OUTPUT_SAMPLE_RATE)
    return packets_to_b64([*enc.encode(audio), *enc.flush()]), seconds


def _chat_blocking(
    stack: ModelStack, config: Config, audio: np.ndarray | None, opts: AudioIn
) -> dict[str, Any]:
    t0 = time.monotonic()
    transcript, language = opts.text or "", opts.language
    if audio is not None:
        result = stack.asr.transcribe(audio, language=opts.language or config.model.language)
        transcript, language = result.text, result.language
    t_asr = time.monotonic()
    if not transcript.strip():
        return {"transcript": "", "language": language, "text": "", "audio_b64": "", "audio_s": 0.0}
    messages = [
        ChatMessage("system", opts.instructions or config.duplex.instructions),
        ChatMessage("user", transcript),
    ]
    chunker = SentenceChunker()
    reply: list[str] = []
    audio_out: list[np.ndarray] = []
    voice = opts.voice or config.duplex.voice
    for delta in stack.llm.stream(messages, max_new_tokens=config.model.max_new_tokens):
        reply.append(delta)
        for sentence in chunker.push(delta):
            audio_out.extend(stack.tts.synthesize(sentence, voice=voice))
    for sentence in chunker.flush():
        audio_out.extend(stack.tts.synthesize(sentence, voice=voice))
    b64, seconds = _encode_reply(audio_out, opts.response_format)
    return {
        "transcript": transcript,
        "language": language,
        "text": "".join(reply).strip(),
        "audio_format": opts.response_format,
        "audio_sample_rate": OUTPUT_SAMPLE_RATE,
        "audio_b64": b64,
        "audio_s": round(seconds, 3),
        "timings": {
            "asr_ms": round((t_asr - t0) * 1000, 1),
            "total_ms": round((time.monotonic() - t0) * 1000, 1),
        },
    }


def _transcribe_blocking(stack: ModelStack, audio: np.ndarray, language: str | None) -> dict[str, Any]:
    result = stack.asr.transcribe(audio, language=language, timestamps=True)
    return {
        "text": result.text,
        "language": result.language,
        "duration_s": round(len(audio) / INPUT_SAMPLE_RATE, 3),
        "segments": [{"start": s.start, "end": s.end, "text": s.text} for s in result.segments],
    }


def create_app(config: Config, build_stack: Callable[[], ModelStack], index: int = 0) -> FastAPI:
    """The worker app; models are built by ``build_stack`` on a background thread at start-up."""
    state = WorkerState(config=config, index=index)
    voices = RefAudioRegistry(
        Path(config.service.data_dir) / "ref_audio",
        max_upload_bytes=int(config.audio.max_upload_mb * 1024 * 1024),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Models load on a thread while the server starts listening, so that /health can say "loading".
        threading.Thread(
            target=_load, args=(state, build_stack, voices), name="model-load", daemon=True
        ).start()
        yield

    app = FastAPI(title="duplex worker", docs_url=None, redoc_url=None, lifespan=lifespan)
    # Every route but /health serves the gateway only (core/worker_auth.py).
    app.add_middleware(WorkerSecretMiddleware, secret=resolve_worker_secret(config.service))
    app.add_middleware(  # outermost: checked first
        BodyLimit,
        max_bytes=body_limit(config.audio.max_upload_mb),
        read_timeout_s=config.service.body_read_timeout_s,
    )
    app.state.worker = state
    app.include_router(
        build_ref_audio_router(
            voices, lambda: state.stack.tts if state.stack else None, executor=state.executor
        )
    )

    app.include_router(speech_router())
    app.include_router(realtime_router())

    @app.get("/health")
    async def health() -> JSONResponse:
        code = 200 if state.status in ("idle", "busy") else 503
        return JSONResponse(state.health(), status_code=code)

    async def _one_shot(
        request: Request, job: Callable[[ModelStack, np.ndarray | None, AudioIn], dict[str, Any]]
    ):
        if state.stack is None:
            return _json_error(503, ErrorCode.NOT_READY, f"worker is {state.status}")
        # Claimed before the body is read: a request never waits behind a session that starts meanwhile.
        if not await state.claim():
            return _json_error(409, ErrorCode.BUSY, "worker is busy with another session")
        try:
            try:
                audio, opts = await _read_audio(request, config)
            except _TooLarge as exc:
                return _json_error(413, ErrorCode.PAYLOAD_TOO_LARGE, str(exc))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "body"
                return _json_error(400, ErrorCode.INVALID_EVENT, f"{where}: {first['msg']}")
            except AudioError as exc:
                code = ErrorCode.BAD_JSON if exc.kind == "bad_json" else ErrorCode.BAD_AUDIO
                return _json_error(400, code, str(exc))
            loop = asyncio.get_running_loop()
            return JSONResponse(await loop.run_in_executor(state.executor, job, state.stack, audio, opts))
        except AudioError as exc:
            return _json_error(400, ErrorCode.BAD_AUDIO, str(exc))
        except Exception:
            log.exception("one-shot request failed")
            return _json_error(500, ErrorCode.INTERNAL_ERROR, "the models failed on this request")
        finally:
            state.release()

    @app.post("/v1/transcribe")
    async def transcribe(request: Request) -> JSONResponse:
        def job(stack: ModelStack, audio: np.ndarray | None, opts: AudioIn) -> dict[str, Any]:
            if audio is None:
                raise AudioError("no audio: send a 'file' upload, audio_packets_b64 or audio_file_b64")
            return _transcribe_blocking(stack, audio, opts.language or config.model.language)

        return await _one_shot(request, job)

    @app.post("/v1/chat")
    async def chat(request: Request) -> JSONResponse:
        def job(stack: ModelStack, audio: np.ndarray | None, opts: AudioIn) -> dict[str, Any]:
            if audio is None and not (opts.text and opts.text.strip()):
                raise AudioError("no input: send audio (file, packets or file base64) or text")
            return _chat_blocking(stack, config, audio, opts)

        return await _one_shot(request, job)

    @app.websocket("/ws/duplex")
    async def duplex(ws: WebSocket) -> None:
        await ws.accept()
        await state.serve_exclusively(ws, _refuse, _run_session)

    return app


async def _refuse(ws: WebSocket, code: ErrorCode, message: str) -> None:
    await ws.send_text(error_event(code, message, fatal=True))
    await ws.close(code=1013)  # "try again later"


async def _run_session(ws: WebSocket, state: WorkerState) -> None:
    assert state.stack is not None
    session = DuplexSession(
        stack=state.stack,
        config=state.config,
        session_id=uuid.uuid4().hex[:16],
        send_text=ws.send_text,
        send_bytes=ws.send_bytes,
        executor=state.executor,
        counters=state.counters,
    )
    state.session = session
    runner = asyncio.create_task(session.run())
    try:
        while not runner.done():
            receive = asyncio.create_task(ws.receive())
            done, _ = await asyncio.wait({receive, runner}, return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
                break
            message = receive.result()
            if message["type"] == "websocket.disconnect":
                break
            if message.get("bytes") is not None:
                await session.on_binary(message["bytes"])
            elif message.get("text") is not None:
                await session.on_text(message["text"])
    except WebSocketDisconnect:
        pass
    finally:
        await session.close("client_disconnected" if not runner.done() else "closed")
        runner.cancel()
        # the session already reported its own errors to the client
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await runner
        with contextlib.suppress(RuntimeError):
            await ws.close()
