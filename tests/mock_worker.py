"""A mock worker for gateway tests and benches: the real worker's endpoints and rules, no models.

    python tests/mock_worker.py --port 22400 [--index 0] [--load-s 0.3] [--duration-ms 0] [--http-ms 50]

- ``GET /health``: ``{"status": "loading"|"idle"|"busy"|"paused", "models", "device", "uptime_s",
  "worker_index", "sessions_served", "pid"}``; 503 while loading (the first ``--load-s`` seconds).
- ``WS /ws/duplex``: one session at a time; a second one gets ``error`` ``busy`` (fatal) and close 1013,
  one while loading ``not_ready``. A session sends ``session.created`` (id ``mock<index>-<pid>-<n>``),
  echoes every binary frame unchanged, answers ``session.update`` / ``pause`` / ``resume`` / ``close`` /
  ``input_audio_buffer.commit`` (a ``response.created`` + ``response.done`` with stage timings) like the
  worker does, and reports bad JSON with a non-fatal ``error``. With ``?duration_ms=D`` (or
  ``--duration-ms``) it ends by itself after D ms: ``response.done``, ``session.closed``
  (``scripted_end``), close 1000 (or ``?close_code=C``). 0 means "until the client closes".
- ``WS /v1/realtime``: the same session rules in the OpenAI Realtime shapes, as far as the gateway sees
  them: refusals are Realtime ``error`` events, the session starts with ``session.created``, answers
  ``session.update`` with ``session.updated``, echoes binary frames, and ends by itself as above.
- ``POST /v1/chat`` and ``POST /v1/transcribe``: hold the worker for ``?duration_ms`` (or ``--http-ms``)
  and answer JSON; 409 ``busy`` while another request or session runs, 503 while loading.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from core.protocol import (
    ErrorCode,
    ProtocolError,
    ResponseCreated,
    ResponseDone,
    SessionClosed,
    SessionCreated,
    SessionInfo,
    SessionPaused,
    SessionResumed,
    SessionUpdated,
    TurnTimings,
    dump_event,
    error_event,
    parse_client_event,
)

TIMINGS = TurnTimings(
    endpoint_ms=12.0, asr_ms=40.0, llm_first_token_ms=25.0, tts_first_audio_ms=30.0, voice_to_voice_ms=110.0
)


@dataclass
class MockState:
    index: int
    duration_ms: float
    http_ms: float
    restarts: int | None
    status: str = "loading"
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    sessions: int = 0
    refused: int = 0
    paused: bool = False
    started: float = field(default_factory=time.monotonic)

    def health(self) -> dict[str, object]:
        body: dict[str, object] = {
            "status": "paused" if self.status == "busy" and self.paused else self.status,
            "models": {"asr": "mock", "llm": "mock", "tts": "mock"},
            "device": "cpu",
            "uptime_s": round(time.monotonic() - self.started, 2),
            "worker_index": self.index,
            "sessions_served": self.sessions,
            "refused": self.refused,
            "pid": os.getpid(),
            # as a real worker counts them: here every session had one preemptive reply, used
            "counters": {"preemptive_started": self.sessions, "preemptive_used": self.sessions},
        }
        if self.restarts is not None:
            body["restarts"] = self.restarts
        return body


def _duration_s(query: dict[str, str], default_ms: float) -> float:
    try:
        return max(0.0, float(query.get("duration_ms", default_ms))) / 1000.0
    except ValueError:
        return default_ms / 1000.0


def _close_code(query: dict[str, str]) -> int:
    try:
        return int(query.get("close_code", 1000))
    except ValueError:
        return 1000


async def _scripted_end(ws: WebSocket, seconds: float, code: int) -> None:
    await asyncio.sleep(seconds)
    with contextlib.suppress(Exception):
        await ws.send_text(dump_event(ResponseDone(response_id="r-end", status="completed", timings=TIMINGS)))
        await ws.send_text(dump_event(SessionClosed(reason="scripted_end")))
        await ws.close(code)


def _realtime_error(code: ErrorCode, message: str) -> str:
    return json.dumps(
        {
            "type": "error",
            "event_id": "event_0",
            "error": {"type": "server_error", "code": code.value, "message": message},
        }
    )


async def _answer_realtime(ws: WebSocket, sid: str, text: str) -> None:
    try:
        kind = json.loads(text).get("type")
    except (ValueError, AttributeError):
        await ws.send_text(_realtime_error(ErrorCode.BAD_JSON, "not JSON"))
        return
    if kind == "session.update":
        await ws.send_text(json.dumps({"type": "session.updated", "session": {"id": sid}}))


async def _answer(ws: WebSocket, state: MockState, sid: str, text: str) -> bool:
    """Answer one client event; False when the session ends."""
    try:
        event = parse_client_event(text)
    except ProtocolError as exc:
        await ws.send_text(dump_event(exc.to_event()))
        return True
    info = SessionInfo(id=sid, models={"asr": "mock"})
    if event.type == "session.close":
        await ws.send_text(dump_event(SessionClosed(reason="client_closed")))
        await ws.close(1000)
        return False
    if event.type == "session.update":
        await ws.send_text(dump_event(SessionUpdated(session=info)))
    elif event.type == "session.pause":
        state.paused = True
        await ws.send_text(dump_event(SessionPaused()))
    elif event.type == "session.resume":
        state.paused = False
        await ws.send_text(dump_event(SessionResumed()))
    elif event.type == "input_audio_buffer.commit":
        await ws.send_text(dump_event(ResponseCreated(response_id="r1")))
        await ws.send_text(dump_event(ResponseDone(response_id="r1", status="completed", timings=TIMINGS)))
    return True


async def duplex(ws: WebSocket) -> None:
    await _session(ws, realtime=False)


async def realtime(ws: WebSocket) -> None:
    await _session(ws, realtime=True)


async def _session(ws: WebSocket, realtime: bool) -> None:
    state: MockState = ws.app.state.mock
    await ws.accept()
    refusal = None
    if state.status == "loading":
        refusal = (ErrorCode.NOT_READY, "worker is loading")
    elif state.lock.locked():
        refusal = (ErrorCode.BUSY, "worker is busy with another session")
    if refusal is not None:
        state.refused += 1
        await ws.send_text(_realtime_error(*refusal) if realtime else error_event(*refusal, fatal=True))
        await ws.close(1013)
        return
    async with state.lock:
        state.status, state.paused = "busy", False
        state.sessions += 1
        sid = f"mock{state.index}-{os.getpid()}-{state.sessions}"
        if realtime:
            await ws.send_text(json.dumps({"type": "session.created", "session": {"id": sid}}))
        else:
            await ws.send_text(
                dump_event(SessionCreated(session=SessionInfo(id=sid, models={"asr": "mock"})))
            )
        query = dict(ws.query_params)
        seconds = _duration_s(query, state.duration_ms)
        ender = asyncio.create_task(_scripted_end(ws, seconds, _close_code(query))) if seconds > 0 else None
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("bytes") is not None:
                    await ws.send_bytes(message["bytes"])
                elif realtime:
                    await _answer_realtime(ws, sid, message.get("text") or "")
                elif not await _answer(ws, state, sid, message.get("text") or ""):
                    break
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            if ender is not None:
                ender.cancel()
            state.status = "idle"


async def health(request: Request) -> Response:
    state: MockState = request.app.state.mock
    return JSONResponse(state.health(), status_code=503 if state.status == "loading" else 200)


async def one_shot(request: Request) -> Response:
    state: MockState = request.app.state.mock
    if state.status == "loading":
        return JSONResponse({"error": {"code": "not_ready", "message": "loading"}}, status_code=503)
    if state.lock.locked():
        state.refused += 1
        return JSONResponse({"error": {"code": "busy", "message": "busy"}}, status_code=409)
    async with state.lock:
        state.status = "busy"
        state.sessions += 1
        try:
            body = await request.body()
            await asyncio.sleep(_duration_s(dict(request.query_params), state.http_ms))
            kind = request.url.path.rsplit("/", 1)[-1]
            return JSONResponse({"text": f"mock {kind}", "worker_index": state.index, "bytes": len(body)})
        finally:
            state.status = "idle"


def create_app(
    index: int = 0,
    load_s: float = 0.3,
    duration_ms: float = 0.0,
    http_ms: float = 50.0,
    restarts: int | None = None,
) -> Starlette:
    """The mock worker app."""
    state = MockState(index=index, duration_ms=duration_ms, http_ms=http_ms, restarts=restarts)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async def load() -> None:
            await asyncio.sleep(load_s)
            state.status = "idle"

        task = asyncio.create_task(load())
        yield
        task.cancel()

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/chat", one_shot, methods=["POST"]),
            Route("/v1/transcribe", one_shot, methods=["POST"]),
            WebSocketRoute("/ws/duplex", duplex),
            WebSocketRoute("/v1/realtime", realtime),
        ],
        lifespan=lifespan,
    )
    app.state.mock = state
    return app


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mock_worker.py", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--load-s", type=float, default=0.3)
    p.add_argument("--duration-ms", type=float, default=0.0)
    p.add_argument("--http-ms", type=float, default=50.0)
    p.add_argument("--restarts", type=int, default=None)
    args = p.parse_args(argv)
    import uvicorn

    app = create_app(args.index, args.load_s, args.duration_ms, args.http_ms, args.restarts)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", ws_per_message_deflate=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
