"""The live duplex session: one WebSocket conversation on a worker (docs/PROTOCOL.md).

The server feeds frames with :meth:`DuplexSession.on_text` / :meth:`DuplexSession.on_binary` and runs
:meth:`DuplexSession.run`, which drives three tasks:

- *receive*: frames in arrival order; binary -> ``audio_in.InputPipeline`` (decode, ring buffer, VAD,
  segmenter) -> speech events; text -> client events;
- *turn*: one reply at a time (``turn.Turn``), started by the state machine;
- *send*: ``sender.Sender`` drains the outbox, pacing audio near real time.

The end of a turn: ``server_vad`` waits for a fixed silence; ``semantic_vad`` asks the stack's turn
model at a short pause (``pause_check_ms``) whether the user has finished, ends the turn when it is
confident and otherwise waits up to the eagerness's silence limit. At the same pause a *preemptive*
reply starts (ASR -> LLM -> TTS) with its output held in the outbox: the confirmed turn adopts it and
releases its output; speech that resumes, or a final transcript that differs, discards it unsent.

Every happening goes through the pure state machine (``state.step``) and its actions are carried out
here, in order. Barge-in and ``response.cancel`` bump the generation (``cancel.CancelScope``), purge the
outbox, cancel the turn task and queue ``response.output_audio.clear`` + ``response.done(cancelled)``:
no packet of the old reply can be sent after the clear. Bad input becomes ``error`` events and the
session carries on; a task that dies unexpectedly closes the session with an ``internal_error``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel

from core.config import Config, Eagerness
from core.models.base import ModelStack, PrefixASR, TextTurnJudge
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
    TurnDetection,
    TurnTimings,
    dump_event,
    parse_client_event,
)
from core.session.audio_in import SAMPLE_RATE, InputPipeline, ProblemReporter
from core.session.cancel import CancelScope
from core.session.counters import SessionCounters
from core.session.executor import run_blocking
from core.session.partial import PartialTranscripts
from core.session.segmenter import SegmenterConfig, VoiceEvent
from core.session.sender import Outbox, Sender
from core.session.state import Action, Event, State, step
from core.session.text import same_words
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
#: A partial transcript starts only while speech runs: at most this much silence after the last voiced window.
PARTIAL_GAP = round(0.06 * SAMPLE_RATE)  # a VAD window and a frame
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
    turn_detection: str = "semantic_vad"
    eagerness: Eagerness = "auto"
    silence_ms: int = 500  # server_vad's silence

    def detection(self) -> dict[str, Any]:
        """The turn detection as ``session.created`` reports it."""
        if self.turn_detection == "semantic_vad":
            return {"type": "semantic_vad", "eagerness": self.eagerness}
        return {"type": "server_vad", "silence_duration_ms": self.silence_ms}


@dataclass(frozen=True)
class _Context:
    event: Event
    voice: VoiceEvent | None = None
    reason: str | None = None


@dataclass(frozen=True)
class _Verdict:
    """What the judges said of the utterance [start, end) at a pause; ``early``: the words shortened its silence."""

    start: int
    end: int
    audio: float | None
    text: float | None
    ended: bool = False  # both were sure: the turn ended at the pause
    early: bool = False


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
        counters: SessionCounters | None = None,
    ) -> None:
        self.session_id = validate_session_id(session_id)
        self.stack, self.config = stack, config
        self._clock = clock or _default_clock()
        self._own_executor = None if executor else ThreadPoolExecutor(1, thread_name_prefix="session-models")
        self._executor: Executor = executor or self._own_executor  # type: ignore[assignment]
        d, audio = config.duplex, config.audio
        detection = d.turn_detection if stack.turn is not None else "server_vad"
        self.settings = LiveSettings(
            d.instructions,
            d.voice,
            config.model.language,
            d.record,
            detection,
            d.eagerness,
            d.endpoint_silence_ms,
        )
        self.counters = counters or SessionCounters()
        self.state = State.LISTENING
        self.close_reason: str | None = None
        self._scope = CancelScope()
        self.outbox = Outbox(self._scope, d.send_queue_packets)
        self.sender = Sender(
            self.outbox, send_text, send_bytes, self._clock,
            lead_s=audio.playback_delay_ms / 1000, frame_s=audio.frame_ms / 1000,
            on_first_audio=self._on_first_audio, on_done=self._on_reply_sent,
        )  # fmt: skip
        self.input = InputPipeline(stack.vad_factory(), self._segmenter_config(), audio.ring_buffer_s, None)
        self.conversation = Conversation(d.history_max_turns, d.history_max_chars)
        self.timeline = Timeline(self._clock, sink=self._record_entry)
        self._problems = ProblemReporter(interval_s=1.0)
        self._recordings_dir = Path(recordings_dir or Path(config.service.data_dir) / "sessions")
        self._recorder: SessionRecorder | None = None
        self._inbox: asyncio.Queue[str | bytes] = asyncio.Queue(maxsize=INBOX_FRAMES)
        self._turn: Turn | None = None
        self._turn_task: asyncio.Task[None] | None = None
        self._draft: Turn | None = None  # a preemptive reply, held until the turn is confirmed
        self._draft_voice: VoiceEvent | None = None  # the pause it started at
        self._draft_task: asyncio.Task[None] | None = None
        self._pause_seq = 0  # bumped at every pause and resume: a late turn-model answer is ignored
        self._judge_task: asyncio.Task[None] | None = None
        self._verdict: _Verdict | None = None  # the judges' latest
        self._pause_text: tuple[int, int, str] | None = (
            None  # (start, end, transcript) made for the words judge
        )
        self._turn_pool: ThreadPoolExecutor | None = None  # the turn model's thread (small ONNX model)
        self._partials = PartialTranscripts()
        self._partial_task: asyncio.Task[None] | None = None
        self._turns = 0
        self._floor = 0  # first sample the next turn may use (audio of earlier turns is not reused)
        self._sender_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._pause_timer: asyncio.Task[None] | None = None
        self._last_activity = self._clock()
        self._last_received = self._clock()  # any frame from the client, even silence
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
        self._last_received = self._clock()
        await self._enqueue(frame if isinstance(frame, str) else bytes(frame).decode("utf-8", "replace"))

    async def on_binary(self, frame: bytes | bytearray | memoryview) -> None:
        """A binary (audio) frame from the client."""
        self._last_received = self._clock()
        await self._enqueue(bytes(frame))

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
            self._spawn(self._watch_receiving(), "receiving")
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
            turn_detection=self.settings.detection(),
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

    async def _enqueue(self, frame: str | bytes) -> None:
        """Put ``frame`` in the inbox, waiting while it is full; give up when the session closes.

        The server's socket reader awaits this: were it to wait on a full inbox after the session
        closed, it would never return and the worker would stay claimed.
        """
        if self.state is State.CLOSED:
            return
        if not self._inbox.full():
            self._inbox.put_nowait(frame)
            return
        put = asyncio.ensure_future(self._inbox.put(frame))
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({put, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            put.cancel()
            closed.cancel()

    async def _receive(self) -> None:
        while True:
            # A client that does not read its events stops being read (its socket fills, not our memory).
            await self.outbox.control_room()
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
        """The next frame; None when the user was speaking and no frame came for the endpoint window.

        The window is this session's own endpoint (its ``turn_detection``: the eagerness's maximum silence or
        ``silence_duration_ms``), so a client that stops streaming is treated like one that sends silence.
        """
        if self.state is not State.USER_SPEAKING:
            return await self._inbox.get()
        endpoint_s = self.input.segmenter.config.endpoint_silence / SAMPLE_RATE
        try:
            async with asyncio.timeout(endpoint_s + STALL_GRACE_S):
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

    async def _watch_receiving(self) -> None:
        """End the session when the client has sent nothing at all for ``receive_timeout_s``."""
        limit = self.config.duplex.receive_timeout_s
        self._last_received = self._clock()
        while True:
            await asyncio.sleep(max(0.0, self._last_received + limit - self._clock()))
            if self.state is State.PAUSED:  # a paused client may go quiet; pause_timeout bounds that
                self._last_received = self._clock()
            elif self._clock() - self._last_received >= limit:
                message = (
                    f"nothing received for {limit:g} s (duplex.receive_timeout_s): the session is closed"
                )
                self._error(ErrorCode.RECEIVE_TIMEOUT, message, fatal=True)
                self._dispatch(Event.CLOSE, reason="receive_timeout")
                return

    async def _pause_countdown(self) -> None:
        await asyncio.sleep(self.config.duplex.pause_timeout)
        self._dispatch(Event.PAUSE_TIMEOUT)

    async def _shutdown(self) -> None:
        self._dispatch(Event.CLOSE, reason="server_closed")  # no-op when already closed
        self._discard_draft("closed")  # a draft held at a pause: counted, so started = used + discarded
        extra = (self._draft_task, self._judge_task, self._partial_task)
        for task in (self._turn_task, self._pause_timer, *extra, *self._tasks):
            if task is not None and task is not self._sender_task:
                task.cancel()
        self.sender.stop()
        sender = self._sender_task
        if sender is not None:
            try:
                await asyncio.wait_for(asyncio.shield(sender), CLOSE_FLUSH_S)
            except (TimeoutError, Exception):  # the socket may be gone; nothing left to report to
                sender.cancel()
        pending = [t for t in (self._turn_task, self._pause_timer, *extra, *self._tasks) if t is not None]
        await asyncio.gather(*pending, return_exceptions=True)
        if self._recorder is not None:
            self._recorder.close()
        if self._own_executor is not None:
            self._own_executor.shutdown(wait=False, cancel_futures=True)
        if self._turn_pool is not None:
            self._turn_pool.shutdown(wait=False, cancel_futures=True)
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
            if event.kind is Event.SPEECH_PAUSE:
                self._on_pause(event)
            elif event.kind is Event.SPEECH_RESUME:
                self._on_resume()
            elif (
                event.kind is Event.BARGE_IN
                and self.state is State.LISTENING
                and self.input.segmenter.started
            ):
                # Speech that began while the reply was still out (too short then to barge in) and went on
                # after it ended: its SPEECH_START was spent while speaking, so the user's turn starts here.
                self._dispatch(Event.SPEECH_START, voice=event)
            else:
                self._dispatch(event.kind, voice=event)
        if listening:
            self._maybe_partial()

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
        if new.turn_detection is not None and not self._set_detection(new.turn_detection):
            return
        if (
            new.record is not None
            and new.record != self.settings.record
            and not self.config.duplex.client_recording
        ):
            state = "on" if self.settings.record else "off"
            self._error(
                ErrorCode.INVALID_EVENT,
                f"record: recording is {state} by the server's config; this server does not let clients change it",
            )
            return
        if new.audio_format is not None:
            self.input.decoder.declare(new.audio_format)
        for name in ("instructions", "voice", "language"):
            if getattr(new, name) is not None:
                setattr(self.settings, name, getattr(new, name))
        if new.record is not None:
            self._set_recording(new.record)
        self._emit(SessionUpdated(session=self.info()))

    def _set_detection(self, detection: TurnDetection) -> bool:
        """Apply a ``turn_detection`` setting; False (after an ``error`` event) when it cannot be."""
        semantic = detection.type == "semantic_vad"
        problem = None
        if semantic and self.stack.turn is None:
            problem = "semantic_vad needs a turn model and this worker has none; use server_vad"
        elif semantic and detection.silence_duration_ms is not None:
            problem = "silence_duration_ms applies to server_vad only"
        elif not semantic and detection.eagerness is not None:
            problem = "eagerness applies to semantic_vad only"
        if problem is not None:
            self._error(ErrorCode.INVALID_EVENT, f"turn_detection: {problem}")
            return False
        s = self.settings
        s.turn_detection = detection.type
        if semantic:
            s.eagerness = detection.eagerness or "auto"
        else:
            s.silence_ms = detection.silence_duration_ms or self.config.duplex.endpoint_silence_ms
        self.input.segmenter.config = self._segmenter_config()
        return True

    def _segmenter_config(self) -> SegmenterConfig:
        d, s = self.config.duplex, self.settings
        endpoint = d.level(s.eagerness).max_silence_ms if s.turn_detection == "semantic_vad" else s.silence_ms
        # Pauses matter to the turn model and to preemptive replies; before the endpoint, or not at all.
        wants_pause = s.turn_detection == "semantic_vad" or d.preemptive_reply
        pause = d.pause_check_ms if wants_pause and d.pause_check_ms < endpoint else 0
        return SegmenterConfig.from_ms(
            sample_rate=SAMPLE_RATE,
            threshold=d.vad_threshold,
            min_speech_ms=d.min_speech_ms,
            barge_in_min_speech_ms=d.barge_in_min_speech_ms,
            endpoint_silence_ms=endpoint,
            max_utterance_s=d.max_utterance_s,
            pause_silence_ms=pause,
        )

    # ------------------------------------------------------------------------------ pauses: turn model, preemptive replies

    def _on_pause(self, event: VoiceEvent) -> None:
        if self.state is not State.USER_SPEAKING:
            return
        self._pause_seq += 1
        if self.config.duplex.preemptive_reply:
            self._start_draft(event)
        if self.settings.turn_detection == "semantic_vad" and self.stack.turn is not None:
            self._stop_judging()
            self._judge_task = asyncio.create_task(self._judge(event, self._pause_seq))

    def _stop_judging(self) -> None:
        if self._judge_task is not None:
            self._judge_task.cancel()
            self._judge_task = None

    def _on_resume(self) -> None:
        if self.state is not State.USER_SPEAKING:
            # Not the user's turn resuming but new speech after it ended (while its final transcript is
            # checked, or during the reply): too short yet to barge in, it must not touch that turn's draft.
            return
        self._pause_seq += 1
        self._stop_judging()
        if self._draft is not None:
            self._discard_draft("resumed")

    def _maybe_partial(self) -> None:
        """While the user speaks, transcribe the audio so far every ``asr_partial_interval_ms`` of it."""
        interval = self.config.duplex.asr_partial_interval_ms
        asr, seg, position = self.stack.asr, self.input.segmenter, self.input.position
        onset = seg.onset
        if (
            not interval
            or not isinstance(asr, PrefixASR)
            or onset is None
            or self.state is not State.USER_SPEAKING
        ):
            return
        if self._partial_task is not None or self._draft is not None:
            return  # one pass at a time; at a pause the preemptive reply's own pass is the one that counts
        if self._partials.onset != onset:
            self._partials.reset(onset)
        heard = max(self._partials.end, onset)
        if position - heard < interval * SAMPLE_RATE // 1000 or position - seg.last_voiced_end > PARTIAL_GAP:
            return
        audio = self.input.audio(max(onset - round(PREROLL_S * SAMPLE_RATE), self._floor), position)
        call = functools.partial(
            asr.transcribe_with_prefix, audio, self._partials.prefix(onset), self.settings.language
        )
        self._partial_task = asyncio.create_task(self._partial(call, onset, position))

    async def _partial(self, call: Callable[[], Any], onset: int, end: int) -> None:
        try:
            result = await run_blocking(self._executor, call)
        except Exception:  # a partial is an optimisation: the final pass still runs without its prefix
            log.exception("session %s: a partial transcript failed", self.session_id)
            return
        finally:
            self._partial_task = None
        self._partials.add(onset, end, result.text)
        self.timeline.mark(
            "partial", onset=onset, end=end, text=result.text, prefix=self._partials.prefix(onset)
        )

    async def _judge(self, event: VoiceEvent, seq: int) -> None:
        """Ask both judges about the utterance up to this pause; end the turn now, sooner, or leave it to silence.

        The turn model hears the audio (prosody); the LLM reads the transcript (is the sentence finished?).
        Both sure: the turn ends now. The words finished but the audio unsure: the silence that ends the
        turn shrinks to ``text_silence_ms``. Unfinished words: only the silence limit ends it.
        """
        model = self.stack.turn
        assert model is not None
        level = self.config.duplex.level(self.settings.eagerness)
        if self._turn_pool is None:
            self._turn_pool = ThreadPoolExecutor(1, thread_name_prefix="turn-model")
        start = max(event.start - round(PREROLL_S * SAMPLE_RATE), self._floor)
        asked = self._clock()
        heard = asyncio.ensure_future(
            run_blocking(self._turn_pool, model.complete_probability, self.input.audio(start, event.at))
        )
        try:
            text = await self._judge_words(event)
            audio = await heard
        except Exception:  # the silence limit still ends the turn
            log.exception("session %s: judging the end of the turn failed", self.session_id)
            return
        finally:
            heard.cancel()
        sure = audio >= level.threshold
        finished = text is None or text >= level.text_threshold
        self.timeline.mark(
            "turn_model",
            p=round(audio, 3),
            text_p=None if text is None else round(text, 4),
            ms=round((self._clock() - asked) * 1000, 1),
        )
        segmenter = self.input.segmenter
        if seq != self._pause_seq or self.state is not State.USER_SPEAKING:
            return
        if segmenter.onset != event.start or segmenter.last_voiced_end != event.end:
            return  # speech came in meanwhile: its own pause will be judged
        self._verdict = _Verdict(event.start, event.end, audio, text, ended=sure and finished)
        if sure and finished:
            voice = segmenter.confirm(self.input.position)
            if voice is not None:
                self.timeline.mark(
                    "voice", event=voice.kind.value, start=voice.start, end=voice.end, at=voice.at
                )
                self._dispatch(Event.SPEECH_END, voice=voice)
        elif finished and text is not None:
            self._verdict = replace(self._verdict, early=True)
            segmenter.end_after(level.text_silence_ms * SAMPLE_RATE // 1000)
            for voice in segmenter.advance(self.input.position):  # the shorter silence may be over already
                self.timeline.mark(
                    "voice", event=voice.kind.value, start=voice.start, end=voice.end, at=voice.at
                )
                self._dispatch(voice.kind, voice=voice)

    async def _judge_words(self, event: VoiceEvent) -> float | None:
        """The LLM's P(the user's message ends here), from the transcript at this pause; None without one."""
        llm = self.stack.llm
        if not isinstance(llm, TextTurnJudge):
            return None
        transcript = await self._pause_transcript(event)
        if transcript is None:
            return None
        if not transcript:
            return 1.0  # nothing was said: nothing to wait for
        messages = self.conversation.messages(self.settings.instructions, transcript)
        return await run_blocking(self._executor, llm.end_of_turn_probability, messages)

    async def _pause_transcript(self, event: VoiceEvent) -> str | None:
        """The transcript up to this pause: the preemptive reply's, or one made here (kept for the turn)."""
        draft, draft_voice = self._draft, self._draft_voice
        if (
            draft is not None
            and draft_voice is not None
            and (draft_voice.start, draft_voice.end) == (event.start, event.end)
        ):
            await draft.transcribed.wait()
            return draft.transcript
        try:
            result = await run_blocking(
                self._executor,
                self.stack.asr.transcribe,
                self._utterance_audio(event),
                self.settings.language,
            )
        except Exception:
            log.exception("session %s: the transcript at a pause failed", self.session_id)
            return None
        self._pause_text = (event.start, event.end, result.text.strip())
        return result.text.strip()

    def _start_draft(self, event: VoiceEvent) -> None:
        draft_voice = self._draft_voice
        if self._draft is not None and draft_voice is not None:
            if (draft_voice.start, draft_voice.end) == (event.start, event.end):
                return
            self._discard_draft("new_pause")
        turn = self._new_turn(event, decided=False)
        self.outbox.hold(turn.generation)
        self._draft, self._draft_voice = turn, event
        self._draft_task = asyncio.create_task(self._run_turn(turn), name=f"session-{self.session_id}-draft")
        self.counters.preemptive_started += 1
        self.timeline.mark("preemptive", index=turn.request.index, outcome="started")

    def _discard_draft(self, why: str) -> None:
        draft, task = self._draft, self._draft_task
        if draft is None:
            return
        self._draft = self._draft_voice = self._draft_task = None
        if self._scope.is_current(draft.generation):
            self._scope.bump()
        self.outbox.purge_stale()
        self.outbox.hold(None)
        if task is not None:
            task.cancel()
        self.counters.preemptive_discarded += 1
        self.timeline.mark("preemptive", index=draft.request.index, outcome="discarded", why=why)

    def _adopt(self, draft: Turn, task: asyncio.Task[None] | None, voice: VoiceEvent) -> None:
        """The turn is confirmed and ``draft`` answers it: send what it held and what it makes from now on."""
        self._draft = self._draft_voice = self._draft_task = None
        now, position = self._clock(), self.input.position
        draft.confirm(now - (position - voice.at) / SAMPLE_RATE)
        self._turn, self._turn_task = draft, task
        self.outbox.release(draft.generation)
        self.counters.preemptive_used += 1
        self.timeline.mark("preemptive", index=draft.request.index, outcome="used")
        if draft.outcome == "empty":  # it already found nothing to answer
            asyncio.get_running_loop().call_soon(self._empty_turn_done, draft)

    def _same_settings(self, turn: Turn) -> bool:
        """``turn`` was started with the session's current instructions, language and voice."""
        r, s = turn.request, self.settings
        return (r.instructions, r.language, r.voice) == (s.instructions, s.language, s.voice)

    def _empty_turn_done(self, turn: Turn) -> None:
        if self._turn is turn:
            self._turn = self._turn_task = None
            self._dispatch(Event.RESPONSE_DONE)

    async def _check_transcript(
        self,
        draft: Turn,
        task: asyncio.Task[None] | None,
        voice: VoiceEvent,
        audio: np.ndarray,
        how: tuple[str, float | None, float | None],
    ) -> None:
        """The confirmed utterance is not the one ``draft`` heard: keep it only if the words are the same."""
        try:
            result = await run_blocking(
                self._executor, self.stack.asr.transcribe, audio, self.settings.language
            )
            final: str | None = result.text.strip()
        except Exception:  # a fresh turn transcribes again and reports the failure as any turn does
            log.exception("session %s: the final transcript failed", self.session_id)
            final = None
        await draft.transcribed.wait()
        if self._draft is not draft:  # cancelled meanwhile
            return
        if final and same_words(final, draft.transcript) and self._same_settings(draft):
            self._adopt(draft, task, voice)
            draft.judged(*how)
            return
        self._discard_draft("transcript_differs" if self._same_settings(draft) else "settings_changed")
        self._begin_turn(voice, audio, transcript=final, how=how)

    def _dispatch(
        self,
        event: Event,
        *,
        voice: VoiceEvent | None = None,
        reason: str | None = None,
    ) -> None:
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
        self._pause_seq += 1
        self._stop_judging()
        known = self._pause_text
        how = self._how_it_ended(voice)
        draft, draft_voice, task = self._draft, self._draft_voice, self._draft_task
        if draft is not None and not self._same_settings(draft):
            self._discard_draft("settings_changed")  # a session.update came after the pause: answer anew
            draft = None
        if draft is not None and draft_voice is not None:
            audio = self._utterance_audio(voice)
            self._floor = voice.at
            if (draft_voice.start, draft_voice.end) == (voice.start, voice.end):
                self._adopt(draft, task, voice)
                draft.judged(*how)
            else:  # more audio than the draft heard: the final transcript decides
                self._turn_task = asyncio.create_task(
                    self._check_transcript(draft, task, voice, audio, how),
                    name=f"session-{self.session_id}-check",
                )
                self._turn_task.add_done_callback(self._turn_ended)
            return
        transcript = known[2] if known is not None and known[:2] == (voice.start, voice.end) else None
        self._begin_turn(voice, transcript=transcript, how=how)

    def _how_it_ended(self, voice: VoiceEvent) -> tuple[str, float | None, float | None]:
        """(what ended the turn, the turn model's P, the words judge's P) for ``voice``; counts it."""
        verdict, self._verdict, self._pause_text = self._verdict, None, None
        if verdict is None or (verdict.start, verdict.end) != (voice.start, voice.end):
            verdict = None
        if voice.kind is Event.COMMIT:
            return "commit", None, None
        if verdict is not None and verdict.ended:
            how = "turn_model"
        elif (
            verdict is not None
            and verdict.early
            and voice.at - voice.end < self.input.segmenter.config.endpoint_silence
        ):
            how = "words"
        else:
            how = "silence"
        if how == "silence":
            self.counters.turns_silence += 1
        else:
            self.counters.turns_semantic += 1
        return how, verdict.audio if verdict else None, verdict.text if verdict else None

    def _begin_turn(
        self,
        voice: VoiceEvent,
        audio: np.ndarray | None = None,
        *,
        transcript: str | None = None,
        how: tuple[str, float | None, float | None] = ("silence", None, None),
    ) -> None:
        turn = self._new_turn(voice, decided=True, audio=audio, transcript=transcript)
        turn.judged(*how)
        self._floor = voice.at
        self._turn = turn
        self._turn_task = asyncio.create_task(self._run_turn(turn), name=f"session-{self.session_id}-turn")
        self._turn_task.add_done_callback(self._turn_ended)

    def _utterance_audio(self, voice: VoiceEvent) -> np.ndarray:
        start = max(voice.start - round(PREROLL_S * SAMPLE_RATE), self._floor)
        return self.input.audio(start, min(self.input.position, voice.end + round(TAIL_S * SAMPLE_RATE)))

    def _new_turn(
        self,
        voice: VoiceEvent,
        *,
        decided: bool,
        audio: np.ndarray | None = None,
        transcript: str | None = None,
    ) -> Turn:
        """A reply to the utterance ``voice`` (preemptive unless ``decided``), on a new generation."""
        now, position = self._clock(), self.input.position
        if audio is None:
            audio = self._utterance_audio(voice)
        self._turns += 1
        self._scope.bump()
        request = TurnRequest(
            index=self._turns,
            audio=audio,
            speech_end_at=now - (position - voice.end) / SAMPLE_RATE,
            decided_at=now - (position - voice.at) / SAMPLE_RATE if decided else None,
            instructions=self.settings.instructions,
            language=self.settings.language,
            voice=self.settings.voice,
            transcript=transcript,
            asr_prefix=self._partials.prefix(voice.start),
        )
        return Turn(request, self._turn_deps(self._turns), self._scope.token(), self.conversation)

    def _cancel_turn(self, ctx: _Context) -> None:
        if self._draft is not None:
            self._discard_draft("cancelled")
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
        if self._draft is not None:
            self._discard_draft("dropped")

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
