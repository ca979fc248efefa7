"""``WS /v1/realtime`` on the worker: an OpenAI Realtime connection driving one duplex session in-process.

Mount on the worker app (``app.include_router(realtime_router())``). The gateway queues clients and
bridges their frames here unchanged (core/api/realtime.py), exactly as it does for
``/ws/duplex``. This half owns the audio work, because the gateway must not load numpy or libopus:
input ``input_audio_buffer.append`` pcm16 at 24 kHz is resampled (soxr, streaming) to the session's
16 kHz pcm16, and the session's 24 kHz Opus reply packets are decoded to pcm16 for
``response.output_audio.delta`` (the session's output is the wire format of
``/ws/duplex``: length-prefixed packets). Event mapping: core/api/realtime_events.py; the subset:
docs/REALTIME.md. Like ``/ws/duplex``, one session per worker (``busy`` otherwise, ``not_ready`` while
loading), sharing the worker's lock, executor and status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Any

import numpy as np
import soxr
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from core.api.realtime_events import REALTIME_RATE, RealtimeTranslator, realtime_error
from core.audio.errors import AudioError
from core.audio.framing import PacketFramer
from core.audio.opus import OpusDecoder
from core.models.base import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE
from core.protocol import ErrorCode
from core.session.duplex import DuplexSession

log = logging.getLogger("worker.realtime")


class _Audio:
    """The audio halves: 24 kHz client pcm16 -> 16 kHz session pcm16; 24 kHz Opus reply -> pcm16."""

    def __init__(self) -> None:
        self.resampler = soxr.ResampleStream(REALTIME_RATE, INPUT_SAMPLE_RATE, 1, dtype="int16")
        self.decoder = OpusDecoder(OUTPUT_SAMPLE_RATE)
        self.framer = PacketFramer()
        self.response_id: str | None = None

    def to_session(self, pcm24: bytes) -> bytes:
        samples = np.frombuffer(pcm24, dtype="<i2").astype(np.int16)
        return np.asarray(self.resampler.resample_chunk(samples), dtype="<i2").tobytes()

    def to_client(self, frame: bytes, response_id: str | None) -> bytes:
        """One wire frame of the session (``[uint16 LE length][Opus packet]``...) as pcm16 24 kHz."""
        if response_id != self.response_id:  # every reply is a fresh Opus stream
            self.response_id = response_id
            self.decoder.reset()
            self.framer.reset()
        pcm = []
        for packet in self.framer.feed(frame):
            try:
                pcm.append(self.decoder.decode_int16(packet).astype("<i2").tobytes())
            except AudioError:
                log.warning("dropped an undecodable reply packet")
        return b"".join(pcm)


async def _refuse(ws: WebSocket, code: ErrorCode, message: str) -> None:
    error = {"event_id": "event_0", **realtime_error(code.value, message)}
    await ws.send_text(json.dumps(error))
    await ws.close(code=1013)


def realtime_router() -> APIRouter:
    """The worker's ``/v1/realtime`` WebSocket route."""
    router = APIRouter()

    @router.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        await ws.accept()
        await ws.app.state.worker.serve_exclusively(ws, _refuse, _serve)

    return router


async def _serve(ws: WebSocket, state: Any) -> None:
    translator = RealtimeTranslator(ws.query_params.get("model") or "duplex")
    audio = _Audio()

    async def send_text(text: str) -> None:
        for event in translator.from_session(text):
            await ws.send_text(json.dumps(event))

    async def send_bytes(frame: bytes) -> None:
        event = translator.audio_delta(audio.to_client(frame, translator.response_id))
        if event is not None:
            await ws.send_text(json.dumps(event))

    session = DuplexSession(
        stack=state.stack,
        config=state.config,
        session_id=uuid.uuid4().hex[:16],
        send_text=send_text,
        send_bytes=send_bytes,
        executor=state.executor,
        counters=state.counters,
    )
    state.session = session
    for text in translator.start():
        await session.on_text(text)
    runner = asyncio.create_task(session.run())
    try:
        await _pump(ws, session, translator, audio, runner)
    except WebSocketDisconnect:
        pass
    finally:
        await session.close("client_disconnected" if not runner.done() else "closed")
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # the session reported its own errors
            await runner
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):  # the client may be gone
            await ws.close()


async def _pump(
    ws: WebSocket,
    session: DuplexSession,
    translator: RealtimeTranslator,
    audio: _Audio,
    runner: asyncio.Task[str],
) -> None:
    """Client frames into the session until the client leaves or the session ends."""
    while not runner.done():
        receive = asyncio.create_task(ws.receive())
        done, _ = await asyncio.wait({receive, runner}, return_when=asyncio.FIRST_COMPLETED)
        if receive not in done:
            receive.cancel()
            return
        message = receive.result()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is None:
            error = realtime_error(
                ErrorCode.INVALID_EVENT.value,
                "send audio as input_audio_buffer.append events, not binary frames",
            )
            await ws.send_text(json.dumps({"event_id": "event_binary", **error}))
            continue
        actions = translator.from_client(message["text"])
        for pcm in actions.audio:
            resampled = audio.to_session(pcm)
            if resampled:
                await session.on_binary(resampled)
        for text in actions.to_session:
            await session.on_text(text)
        for reply in actions.to_client:
            await ws.send_text(json.dumps(reply))
