"""A stand-in worker, for browser tests of the demo page's mechanics behind the real gateway.

It speaks the worker's side of the wire protocol at ``/ws/duplex`` with a scripted assistant: it decodes
the page's real Opus (or pcm16) microphone audio, finds the end of each utterance by its energy, then
answers with a fixed transcript, streamed text deltas and real 24 kHz Opus speech, paced near real time.
Reply packets are deliberately packed several to a frame and split across frames. A new utterance during
a reply is a barge-in (``response.output_audio.clear``); so is ``response.cancel``. Like a worker it
serves one session at a time, answers ``/health``, and refuses a second session as ``busy``.

    python tests/browser/standin_server.py --port P

``GET /standin/stats`` reports what it received, for the tests to check the page's side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from core.audio.framing import PacketFramer, pack_packets  # noqa: E402
from core.audio.opus import OpusDecoder, OpusEncoder  # noqa: E402
from tests.speech import espeak  # noqa: E402

TRANSCRIPT = "What is the capital of France?"
REPLY = "The capital of France is Paris, famous for the Eiffel Tower and the Louvre."
FRAME = 320  # 20 ms at 16 kHz
SPEECH_RMS = 0.01
END_SILENCE_FRAMES = 30  # 600 ms of quiet ends an utterance
MIN_SPEECH_FRAMES = 5
LEAD_S = 0.3  # audio sent ahead of real time, like the real worker's pacing


class Slot:
    """The one session slot, and counters for /standin/stats."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.stats: dict[str, Any] = {
            "sessions": 0,
            "formats": [],
            "voices": [],
            "input_samples": 0,
            "utterances": 0,
            "clears": 0,
        }


class Session:
    """One live call: input decoding, utterance detection and the scripted reply."""

    def __init__(self, ws: WebSocket, slot: Slot, reply_pcm: np.ndarray) -> None:
        self.ws = ws
        self.slot = slot
        self.reply_pcm = reply_pcm
        self.format = "opus"
        self.framer = PacketFramer()
        self.decoder = OpusDecoder(16_000)
        self.pcm = np.zeros(0, np.float32)
        self.speech_frames = 0
        self.quiet_frames = 0
        self.in_speech = False
        self.paused = False
        self.audio_ms = 0
        self.reply: asyncio.Task[None] | None = None
        self.response_id = ""
        self.ids = itertools.count(1)

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps(event))

    async def on_text(self, text: str) -> bool:
        """Handle one client event; False when the session should end."""
        event = json.loads(text)
        kind = event.get("type")
        if kind == "session.update":
            settings = event.get("session", {})
            if "audio_format" in settings:
                self.format = settings["audio_format"]
                self.slot.stats["formats"].append(self.format)
            if "voice" in settings:
                self.slot.stats["voices"].append(settings["voice"])
            await self.send({"type": "session.updated", "session": self.info(settings.get("voice"))})
        elif kind == "session.pause":
            self.paused = True
            await self.cancel_reply()
            await self.send({"type": "session.paused"})
        elif kind == "session.resume":
            self.paused = False
            await self.send({"type": "session.resumed"})
        elif kind == "response.cancel":
            await self.cancel_reply()
        elif kind == "session.close":
            await self.cancel_reply()
            await self.send({"type": "session.closed", "reason": "client_closed"})
            return False
        return True

    def info(self, voice: str | None = "amy") -> dict[str, Any]:
        return {
            "id": "standin",
            "playback_delay_ms": 200,
            "voice": voice or "amy",
            "voices": ["amy", "joe"],
            "models": {"asr": "stand-in", "llm": "stand-in", "tts": "espeak-ng"},
        }

    async def on_audio(self, data: bytes) -> None:
        if self.format == "pcm16":
            samples = np.frombuffer(data[: len(data) // 2 * 2], "<i2").astype(np.float32) / 32768
        else:
            packets = self.framer.feed(data)
            samples = np.concatenate([self.decoder.decode(p) for p in packets]) if packets else np.zeros(0)
        self.slot.stats["input_samples"] += len(samples)
        if self.paused:
            return
        self.pcm = np.concatenate([self.pcm, samples.astype(np.float32)])
        while len(self.pcm) >= FRAME:
            frame, self.pcm = self.pcm[:FRAME], self.pcm[FRAME:]
            self.audio_ms += 20
            await self.on_frame(float(np.sqrt(np.mean(frame**2))))

    async def on_frame(self, level: float) -> None:
        loud = level > SPEECH_RMS
        self.speech_frames = self.speech_frames + 1 if loud else 0
        self.quiet_frames = 0 if loud else self.quiet_frames + 1
        if not self.in_speech and self.speech_frames >= MIN_SPEECH_FRAMES:
            self.in_speech = True
            await self.cancel_reply()  # talking over the reply is a barge-in
            await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": self.audio_ms})
        elif self.in_speech and self.quiet_frames >= END_SILENCE_FRAMES:
            self.in_speech = False
            self.slot.stats["utterances"] += 1
            await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": self.audio_ms})
            item = f"item_{next(self.ids)}"
            await self.send(
                {
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": item,
                    "transcript": TRANSCRIPT,
                }
            )
            self.reply = asyncio.create_task(self.speak())

    async def cancel_reply(self) -> None:
        if self.reply is None or self.reply.done():
            return
        self.reply.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reply
        self.slot.stats["clears"] += 1
        await self.send({"type": "response.output_audio.clear", "response_id": self.response_id})
        await self.send({"type": "response.done", "response_id": self.response_id, "status": "cancelled"})

    async def speak(self) -> None:
        self.response_id = rid = f"resp_{next(self.ids)}"
        t0 = time.monotonic()
        await self.send({"type": "response.created", "response_id": rid})
        for word in REPLY.split(" "):
            await self.send({"type": "response.output_text.delta", "response_id": rid, "delta": word + " "})
        encoder = OpusEncoder(24_000)
        packets = [*encoder.encode(self.reply_pcm), *encoder.flush()]
        start = time.monotonic()
        # Five packets per buffer, cut at an odd offset: the page must reassemble split packets.
        for i in range(0, len(packets), 5):
            ahead = i * 0.02 - (time.monotonic() - start)
            if ahead > LEAD_S:
                await asyncio.sleep(ahead - LEAD_S)
            blob = pack_packets(packets[i : i + 5])
            cut = len(blob) // 2 + 1
            await self.ws.send_bytes(blob[:cut])
            await self.ws.send_bytes(blob[cut:])
        total_ms = (time.monotonic() - t0) * 1000
        timings = {
            "voice_to_voice_ms": 42.0, "endpoint_ms": 230.0, "turn_probability": 0.91, "preemptive": True,
            "asr_ms": 10.0, "llm_first_token_ms": 5.0, "total_ms": total_ms,
        }  # fmt: skip
        await self.send(
            {"type": "response.done", "response_id": rid, "status": "completed", "timings": timings}
        )


def create_app() -> FastAPI:
    """The stand-in worker app: /health, the duplex WebSocket, and /standin/stats."""
    app = FastAPI()
    slot = Slot()
    reply_pcm = espeak(REPLY, rate=24_000)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "busy" if slot.lock.locked() else "idle", "worker_index": 0}

    @app.get("/standin/stats")
    async def stats() -> dict[str, Any]:
        return slot.stats

    @app.websocket("/ws/duplex")
    async def duplex(ws: WebSocket) -> None:
        await ws.accept()
        if slot.lock.locked():
            busy = {"type": "error", "code": "busy", "message": "stand-in is busy", "fatal": True}
            await ws.send_text(json.dumps(busy))
            await ws.close(code=1013)
            return
        async with slot.lock:
            slot.stats["sessions"] += 1
            with contextlib.suppress(WebSocketDisconnect):
                await run_session(Session(ws, slot, reply_pcm))

    return app


async def run_session(session: Session) -> None:
    ws = session.ws
    await session.send({"type": "session.created", "session": session.info()})
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            if message.get("bytes") is not None:
                await session.on_audio(message["bytes"])
            elif message.get("text") is not None and not await session.on_text(message["text"]):
                await ws.close()
                break
    finally:
        if session.reply is not None:
            session.reply.cancel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    uvicorn.run(create_app(), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
