"""The model interfaces the session and the batch pipeline see: ASR, LLM, TTS and the stack that holds them.

Backends implement these protocols; nothing above this module imports a backend. Every call here is
blocking and never runs on the event loop: ASR, LLM and TTS calls come from the worker's per-device executor
thread, the end-of-turn model's from a session's own one-thread pool (it must not wait behind a reply).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from core.audio.vad import StreamingVAD

#: Sample rate every ASR input and VAD input is at.
INPUT_SAMPLE_RATE = 16_000
#: Sample rate every TTS backend must yield (it resamples itself when its model speaks at another rate).
OUTPUT_SAMPLE_RATE = 24_000


class CancelToken(Protocol):
    """Anything with ``is_set()``: a ``threading.Event`` or the session's cancel scope."""

    def is_set(self) -> bool: ...


class NeverCancel:
    """A token that is never set, for calls nobody will cancel (warm-up, batch jobs)."""

    def is_set(self) -> bool:
        return False


@dataclass(frozen=True)
class Segment:
    """A piece of a transcript with times in seconds from the start of the audio."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    """What ASR made of one piece of audio."""

    text: str
    language: str | None = None
    segments: tuple[Segment, ...] = ()


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation; role is "system", "user" or "assistant"."""

    role: str
    content: str


@runtime_checkable
class ASR(Protocol):
    """Speech to text. Audio is float32 mono in [-1, 1] at ``INPUT_SAMPLE_RATE``."""

    name: str

    def transcribe(
        self, audio: np.ndarray, language: str | None = None, *, timestamps: bool = False
    ) -> Transcript:
        """Transcribe one utterance; silence or noise gives an empty text, never invented words.

        With ``timestamps`` the transcript carries timed segments where the backend can make them.
        """
        ...

    def transcribe_batch(
        self, audios: Sequence[np.ndarray], language: str | None = None, *, timestamps: bool = False
    ) -> list[Transcript]:
        """Transcribe several clips (each at most 30 s) in one batched forward pass."""
        ...

    def warmup(self) -> None:
        """Run once on dummy input so the first real request pays no start-up cost."""
        ...


@runtime_checkable
class PrefixASR(Protocol):
    """An ASR that can continue a transcript whose first words are already known (incremental decoding)."""

    def transcribe_with_prefix(
        self, audio: np.ndarray, prefix: str, language: str | None = None
    ) -> Transcript:
        """Transcribe ``audio`` whose transcript starts with ``prefix`` (forced); the text includes it."""
        ...


@runtime_checkable
class TextTurnJudge(Protocol):
    """An LLM that can judge from the words whether the user's message is finished."""

    def end_of_turn_probability(self, messages: Sequence[ChatMessage]) -> float:
        """P that the last message (the user's, as transcribed so far) ends where it stops now.

        Its final punctuation is ignored (ASR adds a period to half a sentence as readily as to a whole
        one): the probability is that of ending, or of a sentence mark, right after its last word.
        """
        ...


@runtime_checkable
class LLM(Protocol):
    """A chat model that streams its reply as text deltas."""

    name: str

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_new_tokens: int = 256,
        cancel: CancelToken | None = None,
    ) -> Iterator[str]:
        """Yield the reply as text pieces; stop within one token once ``cancel`` is set."""
        ...

    def warmup(self) -> None:
        """Generate a few tokens so kernels and caches are ready."""
        ...


@runtime_checkable
class TTS(Protocol):
    """Text to speech, streamed as float32 mono chunks at ``OUTPUT_SAMPLE_RATE``."""

    name: str
    voices: tuple[str, ...]

    def synthesize(
        self, text: str, *, voice: str | None = None, cancel: CancelToken | None = None
    ) -> Iterator[np.ndarray]:
        """Yield audio chunks for ``text``; the first as early as the model allows."""
        ...

    def warmup(self) -> None:
        """Synthesize a short phrase once."""
        ...


@runtime_checkable
class TurnDetector(Protocol):
    """Semantic end of turn: the probability that the user has finished speaking."""

    name: str

    def complete_probability(self, audio: np.ndarray) -> float:
        """P(turn complete) for the utterance so far: float32 mono at ``INPUT_SAMPLE_RATE``, any length.

        Only the last 8 s are used.
        """
        ...

    def warmup(self) -> None:
        """Run once on dummy input so the first real request pays no start-up cost."""
        ...


@dataclass(frozen=True)
class ModelStack:
    """The three models and a VAD factory one worker serves with."""

    asr: ASR
    llm: LLM
    tts: TTS
    #: A fresh streaming VAD per session (VADs carry per-stream state).
    vad_factory: Callable[[], StreamingVAD]
    #: The semantic end-of-turn model, where the stack has one (silence alone ends a turn otherwise).
    turn: TurnDetector | None = None
    kind: str = "embedded"
    device: str = "cpu"
    info: dict[str, str] = field(default_factory=dict)

    def warmup(self) -> None:
        """Warm every model up; the worker calls this before it reports ready."""
        self.asr.warmup()
        self.llm.warmup()
        self.tts.warmup()
        self.vad_factory().reset()
        if self.turn is not None:
            self.turn.warmup()
