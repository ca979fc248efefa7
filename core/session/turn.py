"""One reply: ASR on the utterance -> LLM token stream -> clauses -> TTS -> Opus packets to the outbox.

Each stage starts as soon as its first input exists: the LLM streams while the TTS voices the first
clause, and packets reach the outbox while later clauses are still being written. Every model call runs
on the session's executor (one thread per device) with the turn's generation token, so a barge-in
stops the models within one token or one audio chunk; the session cancels the task itself.

Failures of a model call end the turn with an ``error`` event (no traceback) and ``response.done``
with status ``failed``; the session keeps listening.

A *preemptive* turn starts at a pause, before the session knows the user has finished: it runs exactly
like any other (its output held back by the outbox) and learns when the turn was decided, if ever, from
:meth:`Turn.confirm`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from core.audio.opus import OpusEncoder
from core.models.base import OUTPUT_SAMPLE_RATE, ChatMessage, ModelStack, PrefixASR
from core.models.chat import bound_history
from core.protocol import (
    ErrorCode,
    ErrorEvent,
    ResponseCreated,
    ResponseDone,
    ResponseOutputAudioClear,
    ResponseOutputTextDelta,
    TranscriptionCompleted,
    TurnTimings,
    dump_event,
)
from core.session.cancel import GenerationToken
from core.session.executor import iterate_in_executor, run_blocking
from core.session.sender import Outbox, ReplyStats
from core.session.text import SentenceChunker

log = logging.getLogger(__name__)

Outcome = Literal["empty", "completed", "failed"]
#: Longest error message sent to a client.
_MAX_ERROR_CHARS = 300
#: Marks a reply the user cut off. A reply interrupted before any clause was heard is still recorded,
#: as this marker alone: the history keeps alternating user/assistant (some chat templates demand it)
#: and the model learns that it was interrupted before it said anything.
CUT_OFF = "…"


class Conversation:
    """The session's chat history, bounded by turns and characters (``core.models.chat.bound_history``)."""

    def __init__(self, max_turns: int, max_chars: int) -> None:
        self.max_turns = max_turns
        self.max_chars = max_chars
        self.history: list[ChatMessage] = []

    def messages(self, instructions: str, user_text: str) -> list[ChatMessage]:
        """What the LLM sees for a new user message: system prompt, bounded history, the message."""
        history = [*self.history, ChatMessage("user", user_text)]
        bounded = bound_history(history, self.max_turns, self.max_chars)
        return [ChatMessage("system", instructions), *bounded] if instructions else bounded

    def add(self, user_text: str, assistant_text: str) -> None:
        """Remember one exchange (the history itself is trimmed so it cannot grow without end)."""
        self.history += [ChatMessage("user", user_text), ChatMessage("assistant", assistant_text)]
        keep = 2 * (self.max_turns + 1)
        if len(self.history) > keep:
            self.history = self.history[-keep:]


@dataclass(frozen=True)
class TurnRequest:
    """The utterance and the settings a turn starts with; times are on the session clock."""

    index: int
    audio: np.ndarray
    speech_end_at: float
    decided_at: float | None  # None: preemptive, not decided yet
    instructions: str
    language: str | None = None
    voice: str | None = None
    #: Already known text of the utterance (final-transcript check of the session): ASR is skipped.
    transcript: str | None = None
    #: Words the utterance is known to start with (agreed partial transcripts), forced on the ASR.
    asr_prefix: str = ""


@dataclass(frozen=True)
class TurnDeps:
    """What a turn runs on; ``on_audio`` sees TTS audio (recording)."""

    stack: ModelStack
    executor: Executor | None
    outbox: Outbox
    clock: Callable[[], float]
    max_new_tokens: int = 200
    bitrate: int = 32_000
    on_audio: Callable[[np.ndarray], None] | None = None
    on_timings: Callable[[str, TurnTimings], None] | None = None


class _StageFailed(Exception):
    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(stage)
        self.stage = stage
        self.cause = cause


class Turn:
    """One reply of the assistant; :meth:`run` it as a task, cancel the task to stop it."""

    def __init__(
        self, request: TurnRequest, deps: TurnDeps, token: GenerationToken, conversation: Conversation
    ) -> None:
        self.request = request
        self.deps = deps
        self.token = token
        self.conversation = conversation
        self.response_id = f"resp_{request.index}"
        self.item_id = f"item_{request.index}"
        self.transcript = ""
        self.text = ""
        self.created = False
        self._first_packet_queued = False
        self._marks: dict[str, float] = {}
        self._clauses: list[str] = []  # what the TTS was asked to say, in order
        self._clause_tag: int | None = None  # the clause whose last audio goes in the next packet
        self._all_queued = False  # every packet of the reply is in the outbox
        self._remembered = False  # the exchange is in the conversation history
        self.decided_at = request.decided_at
        #: What ended the user's turn and what the judges said (``TurnTimings``), set by the session.
        self.end_of_turn: str | None = None
        self.turn_probability: float | None = None
        self.text_probability: float | None = None
        self.outcome: Outcome | None = None
        #: Set once the transcript is known (empty when ASR failed).
        self.transcribed = asyncio.Event()

    @property
    def preemptive(self) -> bool:
        """Whether this reply started before its turn was decided."""
        return self.request.decided_at is None

    def confirm(self, decided_at: float) -> None:
        """The user's turn was decided at ``decided_at`` (session clock): this reply is the one to send."""
        self.decided_at = decided_at

    def judged(
        self, end_of_turn: str, turn_probability: float | None, text_probability: float | None
    ) -> None:
        """Note what ended the user's turn and what the turn model and the words judge said of it."""
        self.end_of_turn = end_of_turn
        self.turn_probability = turn_probability
        self.text_probability = text_probability

    @property
    def generation(self) -> int:
        """The generation this reply's output is tagged with."""
        return self.token.generation

    async def run(self) -> Outcome:
        """Transcribe, and answer unless the transcript is empty."""
        self.outcome = await self._run()
        return self.outcome

    async def _run(self) -> Outcome:
        try:
            try:
                self.transcript = await self._transcribe()
            finally:
                self.transcribed.set()
            if not self.transcript:
                return "empty"
            self._put(TranscriptionCompleted(item_id=self.item_id, transcript=self.transcript))
            self._create()
            await self._respond()
        except _StageFailed as failed:
            self._fail(failed.stage, failed.cause)
            return "failed"
        self._finish("completed")
        return "completed"

    def cancelled(self, stats: ReplyStats) -> list[BaseModel]:
        """The events that end this reply after a barge-in or cancel (none if no response was created).

        The history and ``response.done(cancelled).text`` get :meth:`heard_text`, not the whole reply:
        the next turn should build on what the user actually heard before interrupting.
        """
        heard = self.heard_text(stats)
        self._remember(heard)
        if not self.created:
            return []
        done = self._done_event("cancelled", stats, self.deps.clock(), text=heard)
        return [ResponseOutputAudioClear(response_id=self.response_id), done]

    def heard_text(self, stats: ReplyStats) -> str:
        """The clauses whose last packet was sent (``stats.clauses_sent``), with :data:`CUT_OFF` if cut.

        Clauses are the TTS's text, i.e. cleaned for speech: that is what was heard. The whole reply
        when it was all sent; :data:`CUT_OFF` alone when nothing was.
        """
        if self._all_queued and stats.clauses_sent >= len(self._clauses):
            return self.text.strip()
        return " ".join(self._clauses[: stats.clauses_sent]) + CUT_OFF

    # ----------------------------------------------------------------------------------- stages

    async def _transcribe(self) -> str:
        stack, req = self.deps.stack, self.request
        if req.transcript is not None:
            return req.transcript.strip()
        self._mark("asr_start")
        try:
            if req.asr_prefix and isinstance(stack.asr, PrefixASR):
                call = functools.partial(
                    stack.asr.transcribe_with_prefix, req.audio, req.asr_prefix, req.language
                )
                result = await run_blocking(self.deps.executor, call)
            else:
                result = await run_blocking(self.deps.executor, stack.asr.transcribe, req.audio, req.language)
        except Exception as exc:
            raise _StageFailed("asr", exc) from exc
        self._mark("asr_end")
        return result.text.strip()

    async def _respond(self) -> None:
        messages = self.conversation.messages(self.request.instructions, self.transcript)
        chunks: asyncio.Queue[str | None] = asyncio.Queue()
        await _run_both(self._think(messages, chunks), self._speak(chunks))

    async def _think(self, messages: list[ChatMessage], chunks: asyncio.Queue[str | None]) -> None:
        llm, chunker = self.deps.stack.llm, SentenceChunker()
        factory = functools.partial(
            llm.stream, messages, max_new_tokens=self.deps.max_new_tokens, cancel=self.token
        )
        try:
            async with contextlib.aclosing(iterate_in_executor(factory, self.deps.executor)) as tokens:
                async for delta in tokens:
                    self._mark("first_token")
                    self.text += delta
                    self._put(ResponseOutputTextDelta(response_id=self.response_id, delta=delta))
                    self._queue(chunker.push(delta), chunks)
        except Exception as exc:
            raise _StageFailed("llm", exc) from exc
        self._queue(chunker.flush(), chunks)
        chunks.put_nowait(None)

    def _queue(self, pieces: list[str], chunks: asyncio.Queue[str | None]) -> None:
        for piece in pieces:
            self._mark("first_chunk")
            chunks.put_nowait(piece)

    async def _speak(self, chunks: asyncio.Queue[str | None]) -> None:
        encoder = OpusEncoder(OUTPUT_SAMPLE_RATE, bitrate=self.deps.bitrate)
        while (chunk := await chunks.get()) is not None:
            self._clauses.append(chunk)
            await self._voice(chunk, encoder)
            # The encoder holds a partial frame and lags by its look-ahead, so the clause's last samples
            # leave in the next packet encoded (of the next clause, or of the flush).
            self._clause_tag = len(self._clauses) - 1
        for packet in encoder.flush():
            await self.deps.outbox.put_audio(self.generation, packet, self._take_clause_tag())
        self._all_queued = True

    async def _voice(self, chunk: str, encoder: OpusEncoder) -> None:
        tts, deps = self.deps.stack.tts, self.deps
        factory = functools.partial(tts.synthesize, chunk, voice=self.request.voice, cancel=self.token)
        try:
            async with contextlib.aclosing(iterate_in_executor(factory, deps.executor)) as audio:
                async for pcm in audio:
                    self._mark("first_audio")
                    if deps.on_audio is not None:
                        deps.on_audio(pcm)
                    await self._encode(np.asarray(pcm, dtype=np.float32).reshape(-1), encoder)
        except Exception as exc:
            raise _StageFailed("tts", exc) from exc

    async def _encode(self, pcm: np.ndarray, encoder: OpusEncoder) -> None:
        """Encode and queue ``pcm`` frame by frame; the very first packet is handed to the sender at once."""
        outbox, step = self.deps.outbox, encoder.frame_samples
        for start in range(0, len(pcm), step):
            for packet in encoder.encode(pcm[start : start + step]):
                await outbox.put_audio(self.generation, packet, self._take_clause_tag())
                if not self._first_packet_queued:
                    self._first_packet_queued = True
                    await asyncio.sleep(0)  # let the sender send it before the rest is encoded

    def _remember(self, assistant_text: str) -> None:
        """Add this exchange to the history, once."""
        if self.transcript and not self._remembered:
            self._remembered = True
            self.conversation.add(self.transcript, assistant_text)

    def _take_clause_tag(self) -> int | None:
        tag, self._clause_tag = self._clause_tag, None
        return tag

    # ----------------------------------------------------------------------------------- events

    def _put(self, event: BaseModel) -> None:
        self.deps.outbox.put_text(self.generation, dump_event(event))

    def _create(self) -> None:
        if not self.created:
            self.created = True
            self._put(ResponseCreated(response_id=self.response_id))

    def _finish(self, status: Literal["completed", "failed"]) -> None:
        def build(stats: ReplyStats, now: float) -> str:
            # Generation ends before playback does: a barge-in may still cut this reply until its
            # response.done is sent, so the history learns of the whole reply only now.
            if status == "completed":
                self._remember(self.text.strip())
            return dump_event(self._done_event(status, stats, now))

        self.deps.outbox.put_done(self.generation, build)

    def _fail(self, stage: str, exc: BaseException) -> None:
        log.error("turn %d: %s failed", self.request.index, stage, exc_info=exc)
        message = f"{stage} failed: {type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
        # In the turn's own lane, like the rest of its reply: a preemptive draft's failure is held with it,
        # and dropped with it when the draft is discarded (nothing of a discarded draft reaches the client).
        self._put(ErrorEvent(code=ErrorCode.INTERNAL_ERROR, message=message))
        self._create()
        self._finish("failed")

    def _done_event(
        self,
        status: Literal["completed", "cancelled", "failed"],
        stats: ReplyStats,
        now: float,
        text: str | None = None,
    ) -> ResponseDone:
        """``text``: the reply's text as the event reports it (for ``cancelled``: what was heard)."""
        timings = self.timings(stats, now)
        if self.deps.on_timings is not None:
            self.deps.on_timings(status, timings)
        text = self.text.strip() if text is None else text
        return ResponseDone(response_id=self.response_id, status=status, text=text, timings=timings)

    # ----------------------------------------------------------------------------------- timings

    def _mark(self, name: str) -> None:
        self._marks.setdefault(name, self.deps.clock())

    def timings(self, stats: ReplyStats, now: float) -> TurnTimings:
        """Per-stage latencies so far; ``stats`` carries the sender's stamp of the first packet sent."""
        m, req = self._marks.get, self.request
        return TurnTimings(
            endpoint_ms=_ms(req.speech_end_at, self.decided_at),
            end_of_turn=self.end_of_turn,  # type: ignore[arg-type]
            turn_probability=_round(self.turn_probability),
            text_probability=_round(self.text_probability),
            preemptive=self.preemptive,
            asr_ms=_ms(m("asr_start"), m("asr_end")),
            llm_first_token_ms=_ms(m("asr_end"), m("first_token")),
            first_sentence_ms=_ms(m("asr_end"), m("first_chunk")),
            tts_first_audio_ms=_ms(m("first_chunk"), m("first_audio")),
            voice_to_voice_ms=_ms(req.speech_end_at, stats.first_audio_at),
            total_ms=_ms(self.decided_at, now),
            audio_s=round(stats.audio_s, 3),
        )


def _round(p: float | None) -> float | None:
    return None if p is None else round(p, 3)


def _ms(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) * 1000, 3)


async def _run_both(first: Coroutine[Any, Any, None], second: Coroutine[Any, Any, None]) -> None:
    """Run two coroutines concurrently; the first failure cancels the other and is raised."""
    tasks = [asyncio.create_task(first), asyncio.create_task(second)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
