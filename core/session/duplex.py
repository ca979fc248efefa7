"""The live duplex session: one WebSocket conversation on a worker (DESIGN §5).

The server feeds frames with :meth:`DuplexSession.on_text` / :meth:`DuplexSession.on_binary` and runs
:meth:`DuplexSession.run`, which drives three tasks:

- *receive*: frames in arrival order; binary -> ``audio_in.InputPipeline`` (decode, ring buffer, VAD,
  segmenter) -> speech events; text -> client events;
- *turn*: one reply at a time (``turn.Turn``), started by the state machine;
- *send*: ``sender.Sender`` drains the outbox, pacing audio near real time.

Every happening goes through the pure state machine (``state.step``) and its actions are carried out
here, in order. Barge-in and ``response.cancel`` bump the generation (``cancel.CancelScope``), purge the
outbox, cancel the turn task and queue ``response.output_audio.clear`` + ``response.done(cancelled)``:
no packet of the old reply can be sent after the clear. Bad input becomes ``error`` events and the
session carries on; a task that dies unexpectedly closes the session with an ``internal_error``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from core.config import Config
from core.models.base import ModelStack
from core.protocol import (
    ErrorCode,
    ErrorEvent,
    InputAudioBufferCommit,
    ProtocolError,
    ResponseCancel,
    ResponseDone,
    ResponseOutputAudioClear,
    SessionClose,
    SessionClosed,
    SessionCreated,
    SessionInfo,
    SessionPause,
    SessionPaused,
    SessionResume,
    SessionResumed,
    SessionUpdate,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TurnTimings,
    dump_event,
    parse_client_event,
)
from core.session.audio_in import SAMPLE_RATE, InputPipeline, ProblemReporter
from core.session.cancel import CancelScope
from core.session.segmenter import SegmenterConfig, VoiceEvent
from core.session.sender import Outbox, Sender
from core.session.state import Action, Event, State, step
from core.session.timeline import Timeline
from core.session.turn import Conversation, Turn, TurnDeps, TurnRequest
from core.storage.recordings import RecordingError, SessionRecorder, validate_session_id

log = logging.getLogger(__name__)

#: Audio kept before the VAD onset (the first window is often late) and after the last voiced window.
PREROLL_S = 0.2
TAIL_S = 0.1
#: Frames waiting for the receive task before ``on_text``/``on_binary`` make the socket reader wait.
INBOX_FRAMES = 256
#: Beyond the endpoint window, how long input may pause mid-utterance before the turn ends anyway
#: (clients may send up to a second of audio per frame).
STALL_GRACE_S = 1.0
#: How long ``close()`` waits for the sender to flush ``session.closed``.
CLOSE_FLUSH_S = 2.0
_CLOSE_REASONS = {Event.PAUSE_TIMEOUT: "pause_timeout", Event.IDLE_TIMEOUT: "idle_timeout"}


@dataclass
class LiveSettings:
    """The settings a client may change with ``session.update``."""

    instructions: str
    voice: str | None = None
    language: str | None = None
    record: bool = False


@dataclass(frozen=True)
class _Context:
    event: Event
    voice: VoiceEvent | None = None
    reason: str | None = None


def _default_clock() -> Callable[[], float]:
    try:
        return asyncio.get_running_loop().time
    except RuntimeError:
        return time.monotonic  # what the default event loop's time() is


class DuplexSession:
    """One live conversation. Not thread-safe: every method runs on the event loop."""

    def __init__(
        self,
        stack: ModelStack,
        config: Config,
        session_id: str,
        send_text: Callable[[str], Awaitable[None]],
        send_bytes: Callable[[bytes], Awaitable[None]],
        *,
        executor: Executor | None = None,
        clock: Callable[[], float] | None = None,
        recordings_dir: str | Path | None = None,
    ) -> None:
        self.session_id = validate_session_id(session_id)
        self.stack, self.config = stack, config
        self._clock = clock or _default_clock()
        self._own_executor = None if executor else ThreadPoolExecutor(1, thread_name_prefix="session-models")
        self._executor: Executor = executor or self._own_executor  # type: ignore[assignment]
        d, audio = config.duplex, config.audio
        self.settings = LiveSettings(d.instructions, d.voice, config.model.language, d.record)
        self.state = State.LISTENING
        self.close_reason: str | None = None
        self._scope = CancelScope()
        self.outbox = Outbox(self._scope, d.send_queue_packets)
        self.sender = Sender(
            self.outbox, send_text, send_bytes, self._clock,
            lead_s=audio.playback_delay_ms / 1000, frame_s=audio.frame_ms / 1000,
            on_first_audio=self._on_first_audio, on_done=self._on_reply_sent,
        )  # fmt: skip
        self.input = InputPipeline(stack.vad_factory(), _segmenter_config(config), audio.ring_buffer_s, None)
        self.conversation = Conversation(d.history_max_turns, d.history_max_chars)
        self.timeline = Timeline(self._clock, sink=self._record_entry)
        self._problems = ProblemReporter(interval_s=1.0)
        self._recordings_dir = Path(recordings_dir or Path(config.service.data_dir) / "sessions")
        self._recorder: SessionRecorder | None = None
        self._inbox: asyncio.Queue[str | bytes] = asyncio.Queue(maxsize=INBOX_FRAMES)
        self._turn: Turn | None = None
        self._turn_task: asyncio.Task[None] | None = None
        self._turns = 0
        self._floor = 0  # first sample the next turn may use (audio of earlier turns is not reused)
        self._sender_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._pause_timer: asyncio.Task[None] | None = None
        self._last_activity = self._clock()
        self._closed = asyncio.Event()
        self._finished = asyncio.Event()
        self._running = False

    # ------------------------------------------------------------------------------ server API

    @property
    def paused(self) -> bool:
        """Whether the client paused the session."""
        return self.state is State.PAUSED

    async def on_text(self, frame: str | bytes) -> None:
        """A text frame from the client (processed in order with audio by the receive task)."""
        if self.state is not State.CLOSED:
            await self._inbox.put(
                frame if isinstance(frame, str) else bytes(frame).decode("utf-8", "replace")
            )

    async def on_binary(self, frame: bytes | bytearray | memoryview) -> None:
        """A binary (audio) frame from the client."""
        if self.state is not State.CLOSED:
            await self._inbox.put(bytes(frame))

    async def run(self) -> str:
        """Serve until the session closes; return the close reason."""
        self._running = True
        try:
            if self.settings.record:
                self._start_recording()
            self._emit(SessionCreated(session=self.info()))
            self._sender_task = self._spawn(self.sender.run(), "sender")
            self._spawn(self._receive(), "receive")
            self._spawn(self._watch_idle(), "idle")
            await self._closed.wait()
        finally:
            await self._shutdown()
        return self.close_reason or "closed"

    async def close(self, reason: str = "server_closed") -> None:
        """End the session (idempotent) and wait until :meth:`run` has flushed and stopped."""
        self._dispatch(Event.CLOSE, reason=reason)
        if self._running:
            try:
                await asyncio.wait_for(self._finished.wait(), CLOSE_FLUSH_S + 1)
            except TimeoutError:
                log.warning("session %s did not stop in time", self.session_id)

    def info(self) -> SessionInfo:
        """The effective settings, as ``session.created`` / ``session.updated`` carry them."""
        s, audio = self.settings, self.config.audio
        return SessionInfo(
            id=self.session_id,
            input_audio_format=self.input.decoder.declared or "auto",
            playback_delay_ms=audio.playback_delay_ms,
            frame_ms=audio.frame_ms,
            voice=s.voice,
            voices=list(self.stack.tts.voices),
            language=s.language,
            instructions=s.instructions,
            record=self._recorder is not None,
            models=dict(self.stack.info),
        )

    # ------------------------------------------------------------------------------ tasks

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"session-{self.session_id}-{name}")
        task.add_done_callback(self._task_ended)
        self._tasks.append(task)
        return task

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()  # retrieved even after close, so that asyncio does not warn about it
        if self.state is State.CLOSED:
            return
        name = task.get_name().rsplit("-", 1)[-1]
        if exc is None:
            log.error("session %s: %s task ended early", self.session_id, name)
            self._dispatch(Event.CLOSE, reason="internal_error")
        elif name == "sender":  # the socket is gone: nothing more can be sent
            log.info("session %s: send failed (%s)", self.session_id, exc)
            self._dispatch(Event.CLOSE, reason="disconnected")
        else:
            log.error("session %s: %s task failed", self.session_id, name, exc_info=exc)
            self._error(ErrorCode.INTERNAL_ERROR, f"session {name} failed: {type(exc).__name__}", fatal=True)
            self._dispatch(Event.CLOSE, reason="internal_error")

    async def _receive(self) -> None:
        while True:
            frame = await self._next_frame()
            if self.state is State.CLOSED:
                continue
            if frame is None:  # the client stopped streaming mid-utterance: that ends the turn too
                for event in self.input.segmenter.finish(self.input.position):
                    self._dispatch(event.kind, voice=event)
                continue
            try:
                if isinstance(frame, bytes):
                    self._on_audio(frame)
                else:
                    self._on_client_text(frame)
            except Exception as exc:  # one bad frame must not end the conversation
                log.exception("session %s: a frame could not be handled", self.session_id)
                self._error(ErrorCode.INTERNAL_ERROR, f"a frame could not be handled: {type(exc).__name__}")

    async def _next_frame(self) -> str | bytes | None:
        """The next frame; None when the user was speaking and no frame came for the endpoint window."""
        if self.state is not State.USER_SPEAKING:
            return await self._inbox.get()
        try:
            async with asyncio.timeout(self.config.duplex.endpoint_silence_ms / 1000 + STALL_GRACE_S):
                return await self._inbox.get()
        except TimeoutError:
            return None

    async def _watch_idle(self) -> None:
        limit = self.config.duplex.idle_timeout
        while True:
            await asyncio.sleep(max(0.0, self._last_activity + limit - self._clock()))
            if self.state is not State.LISTENING:
                self._touch()  # a turn, speech or a pause is activity (the pause has its own timeout)
            elif self._clock() - self._last_activity >= limit:
                self._dispatch(Event.IDLE_TIMEOUT)

    async def _pause_countdown(self) -> None:
        await asyncio.sleep(self.config.duplex.pause_timeout)
        self._dispatch(Event.PAUSE_TIMEOUT)

    async def _shutdown(self) -> None:
        self._dispatch(Event.CLOSE, reason="server_closed")  # no-op when already closed
        for task in (self._turn_task, self._pause_timer, *self._tasks):
            if task is not None and task is not self._sender_task:
                task.cancel()
        self.sender.stop()
        sender = self._sender_task
        if sender is not None:
            try:
                await asyncio.wait_for(asyncio.shield(sender), CLOSE_FLUSH_S)
            except (TimeoutError, Exception):  # the socket may be gone; nothing left to report to
                sender.cancel()
        pending = [t for t in (self._turn_task, self._pause_timer, *self._tasks) if t is not None]
        await asyncio.gather(*pending, return_exceptions=True)
        if self._recorder is not None:
            self._recorder.close()
        if self._own_executor is not None:
            self._own_executor.shutdown(wait=False, cancel_futures=True)
        self._finished.set()

    # ------------------------------------------------------------------------------ input

    def _on_audio(self, frame: bytes) -> None:
        listening = self.state is not State.PAUSED
        events, decoded = self.input.feed(frame, listen=listening)
        message = self._problems.add(decoded.problems, self._clock())
        if message is not None:
            self._error(ErrorCode.BAD_AUDIO, message)
        if listening and self._recorder is not None:
            for pcm in decoded.audio:
                self._recorder.user_audio(pcm)
        for event in events:
            self.timeline.mark("voice", event=event.kind.value, start=event.start, end=event.end, at=event.at)
            self._touch()
            self._dispatch(event.kind, voice=event)

    def _on_client_text(self, frame: str) -> None:
        try:
            event = parse_client_event(frame)
        except ProtocolError as exc:
            self._emit(exc.to_event())
            return
        self._touch()
        self.timeline.mark("client", type=event.type)
        if isinstance(event, SessionUpdate):
            self._update(event)
        elif isinstance(event, InputAudioBufferCommit):
            self._commit()
        elif isinstance(event, ResponseCancel):
            self._dispatch(Event.CANCEL)
        elif isinstance(event, SessionPause):
            self._dispatch(Event.PAUSE)
        elif isinstance(event, SessionResume):
            self._dispatch(Event.RESUME)
        elif isinstance(event, SessionClose):
            self._dispatch(Event.CLOSE, reason="client_closed")

    def _commit(self) -> None:
        position, onset = self.input.position, self.input.segmenter.onset
        start = onset if onset is not None else self._floor
        self._dispatch(Event.COMMIT, voice=VoiceEvent(Event.COMMIT, start, position, position))

    def _update(self, event: SessionUpdate) -> None:
        new, voices = event.session, self.stack.tts.voices
        if new.voice is not None and voices and new.voice not in voices:
            self._error(ErrorCode.INVALID_EVENT, f"unknown voice {new.voice!r}; voices: {', '.join(voices)}")
            return
        if new.audio_format is not None:
            self.input.decoder.declare(new.audio_format)
        for name in ("instructions", "voice", "language"):
            if getattr(new, name) is not None:
                setattr(self.settings, name, getattr(new, name))
        if new.record is not None:
            self._set_recording(new.record)
        self._emit(SessionUpdated(session=self.info()))

    # ------------------------------------------------------------------------------ state machine

    def _dispatch(self, event: Event, *, voice: VoiceEvent | None = None, reason: str | None = None) -> None:
        transition = step(self.state, event)
        if transition.state is not self.state:
            self.state = transition.state
            self.timeline.mark("state", state=transition.state.value, event=event.value)
        context = _Context(event, voice, reason)
        for action in transition.actions:
            self._ACTIONS[action](self, context)

    def _emit_speech_started(self, ctx: _Context) -> None:
        start = ctx.voice.start if ctx.voice else self.input.position
        self._emit(SpeechStarted(audio_start_ms=_ms(start)))

    def _emit_speech_stopped(self, ctx: _Context) -> None:
        end = ctx.voice.end if ctx.voice else self.input.position
        self._emit(SpeechStopped(audio_end_ms=_ms(end)))

    def _start_turn(self, ctx: _Context) -> None:
        voice = ctx.voice
        assert voice is not None
        if voice.kind is Event.COMMIT:
            self.input.segmenter.reset()
        now, position = self._clock(), self.input.position
        start = max(voice.start - round(PREROLL_S * SAMPLE_RATE), self._floor)
        audio = self.input.audio(start, min(position, voice.end + round(TAIL_S * SAMPLE_RATE)))
        self._floor = voice.at
        self._turns += 1
        self._scope.bump()
        request = TurnRequest(
            index=self._turns,
            audio=audio,
            speech_end_at=now - (position - voice.end) / SAMPLE_RATE,
            decided_at=now - (position - voice.at) / SAMPLE_RATE,
            instructions=self.settings.instructions,
            language=self.settings.language,
            voice=self.settings.voice,
        )
        self._turn = Turn(request, self._turn_deps(self._turns), self._scope.token(), self.conversation)
        self._turn_task = asyncio.create_task(
            self._run_turn(self._turn), name=f"session-{self.session_id}-turn"
        )
        self._turn_task.add_done_callback(self._turn_ended)

    def _cancel_turn(self, ctx: _Context) -> None:
        self._scope.bump()
        self.outbox.purge_stale()
        if self._turn_task is not None:
            self._turn_task.cancel()

    def _clear_audio(self, ctx: _Context) -> None:
        turn, self._turn, self._turn_task = self._turn, None, None
        if turn is None:
            return
        for event in turn.cancelled(self.sender.take_stats(turn.generation)):
            self._emit(event, reset_playhead=isinstance(event, ResponseOutputAudioClear))

    def _drop_utterance(self, ctx: _Context) -> None:
        self.input.segmenter.reset()

    def _emit_paused(self, ctx: _Context) -> None:
        self._emit(SessionPaused())

    def _emit_resumed(self, ctx: _Context) -> None:
        self.input.reset_listening()
        self._emit(SessionResumed())

    def _start_pause_timer(self, ctx: _Context) -> None:
        self._pause_timer = asyncio.create_task(self._pause_countdown())

    def _stop_pause_timer(self, ctx: _Context) -> None:
        if self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None

    def _close(self, ctx: _Context) -> None:
        self.close_reason = _CLOSE_REASONS.get(ctx.event) or ctx.reason or "closed"
        self._scope.close()
        self.outbox.purge_stale()
        self._emit(SessionClosed(reason=self.close_reason))
        self._closed.set()

    _ACTIONS: ClassVar[dict[Action, Callable[[DuplexSession, _Context], None]]] = {
        Action.EMIT_SPEECH_STARTED: _emit_speech_started,
        Action.EMIT_SPEECH_STOPPED: _emit_speech_stopped,
        Action.START_TURN: _start_turn,
        Action.CANCEL_TURN: _cancel_turn,
        Action.CLEAR_AUDIO: _clear_audio,
        Action.DROP_UTTERANCE: _drop_utterance,
        Action.EMIT_PAUSED: _emit_paused,
        Action.EMIT_RESUMED: _emit_resumed,
        Action.START_PAUSE_TIMER: _start_pause_timer,
        Action.STOP_PAUSE_TIMER: _stop_pause_timer,
        Action.CLOSE: _close,
    }

    # ------------------------------------------------------------------------------ turns

    def _turn_deps(self, index: int) -> TurnDeps:
        recorder = self._recorder
        return TurnDeps(
            stack=self.stack,
            executor=self._executor,
            outbox=self.outbox,
            clock=self._clock,
            on_error=lambda message: self._error(ErrorCode.INTERNAL_ERROR, message),
            max_new_tokens=self.config.model.max_new_tokens,
            bitrate=self.config.audio.output_bitrate,
            on_audio=(lambda pcm: recorder.assistant_audio(index, pcm)) if recorder else None,
            on_timings=lambda status, t: self._turn_timings(index, status, t),
        )

    async def _run_turn(self, turn: Turn) -> None:
        outcome = await turn.run()
        self.timeline.mark("turn", index=turn.request.index, outcome=outcome, transcript=turn.transcript)
        if outcome == "empty" and self._turn is turn:
            self._turn = self._turn_task = None
            self._dispatch(Event.RESPONSE_DONE)

    def _turn_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("session %s: turn failed", self.session_id, exc_info=exc)
        self._error(ErrorCode.INTERNAL_ERROR, f"the reply failed: {type(exc).__name__}")
        turn = self._turn
        if turn is not None and self._turn_task is task:
            self._turn = self._turn_task = None
            if turn.created:
                self._emit(
                    ResponseDone(response_id=turn.response_id, status="failed", text=turn.text.strip())
                )
            self._dispatch(Event.RESPONSE_DONE)

    def _turn_timings(self, index: int, status: str, timings: TurnTimings) -> None:
        self.timeline.mark("timings", index=index, status=status, **timings.model_dump(exclude_none=True))

    def _on_first_audio(self, generation: int, at: float) -> None:
        if self._turn is not None and self._turn.generation == generation:
            self._dispatch(Event.RESPONSE_STARTED)

    def _on_reply_sent(self, generation: int) -> None:
        if self._turn is not None and self._turn.generation == generation:
            self._turn = self._turn_task = None
            self._touch()
            if self._recorder is not None:
                self._recorder.end_assistant_turn()
            self._dispatch(Event.RESPONSE_DONE)

    # ------------------------------------------------------------------------------ output, recording

    def _emit(self, event: BaseModel, *, reset_playhead: bool = False) -> None:
        self.outbox.control(dump_event(event), reset_playhead=reset_playhead)
        self.timeline.mark("sent", type=getattr(event, "type", type(event).__name__))

    def _error(self, code: ErrorCode, message: str, *, fatal: bool = False) -> None:
        self._emit(ErrorEvent(code=code, message=message, fatal=fatal))

    def _touch(self) -> None:
        self._last_activity = self._clock()

    def _set_recording(self, on: bool) -> None:
        self.settings.record = on
        if on and self._recorder is None:
            self._start_recording()
        elif not on and self._recorder is not None:
            self._recorder.close()
            self._recorder = None

    def _start_recording(self) -> None:
        meta = {"config": self.config.duplex.model_dump(), "models": dict(self.stack.info)}
        try:
            self._recorder = SessionRecorder(self._recordings_dir, self.session_id, meta, self._clock)
        except RecordingError as exc:
            self.settings.record = False
            self._error(ErrorCode.INTERNAL_ERROR, f"recording is unavailable: {exc}")

    def _record_entry(self, entry: dict[str, Any]) -> None:
        if self._recorder is not None:
            self._recorder.event(entry)


def _ms(sample: int) -> int:
    return int(sample * 1000 // SAMPLE_RATE)


def _segmenter_config(config: Config) -> SegmenterConfig:
    d = config.duplex
    return SegmenterConfig.from_ms(
        sample_rate=SAMPLE_RATE,
        threshold=d.vad_threshold,
        min_speech_ms=d.min_speech_ms,
        barge_in_min_speech_ms=d.barge_in_min_speech_ms,
        endpoint_silence_ms=d.endpoint_silence_ms,
        max_utterance_s=d.max_utterance_s,
    )
