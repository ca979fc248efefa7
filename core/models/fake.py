"""Scripted fake models: the real ASR/LLM/TTS/VAD interfaces with chosen answers and chosen latencies.

They let a test or a benchmark write a conversation as a script ("the user's words come back as
'what time is it', the reply starts 0.3 s later, its audio lasts 10 s") and run the real session code
around it. They make real audio (a tone), so the Opus path and the VAD see real samples.

Every delay goes through ``sleep`` (``time.sleep`` by default): the fakes are blocking, as the protocols
demand, and run on the session's executor thread. A virtual-time test passes a ``sleep`` that parks the
thread until the event loop's virtual clock has moved on (``tests/virtual_time.py``), so a 10-second
conversation runs in milliseconds with its timing intact. ``--stack fake`` and ``bench/bench_duplex.py``
use them with real time.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from core.models.base import (
    INPUT_SAMPLE_RATE,
    OUTPUT_SAMPLE_RATE,
    CancelToken,
    ChatMessage,
    ModelStack,
    Segment,
    Transcript,
)

Sleep = Callable[[float], None]
#: Audio quieter than this (RMS) counts as silence for the fake ASR and the fake VAD.
SILENCE_RMS = 0.01


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0


class _Script:
    """Answers taken in order from a list (the last one repeats), or one fixed answer."""

    def __init__(self, answers: str | Sequence[str]) -> None:
        self._answers = [answers] if isinstance(answers, str) else list(answers)
        if not self._answers:
            raise ValueError("a script needs at least one answer")
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> str:
        with self._lock:
            answer = self._answers[min(self._next, len(self._answers) - 1)]
            self._next += 1
            return answer


class FakeASR:
    """Returns the scripted transcript for any audio with sound in it, and "" for silence."""

    name = "fake-asr"

    def __init__(
        self,
        transcript: str | Sequence[str] = "hello there",
        *,
        latency: float = 0.0,
        language: str = "en",
        sleep: Sleep = time.sleep,
    ) -> None:
        self._script = _Script(transcript)
        self.latency = latency
        self.language = language
        self._sleep = sleep
        #: Set to make every call raise it (failure tests).
        self.error: Exception | None = None
        #: Seconds of audio of every call, in order.
        self.calls: list[float] = []
        #: The prefix of every ``transcribe_with_prefix`` call, in order.
        self.prefixes: list[str] = []

    def transcribe(
        self, audio: np.ndarray, language: str | None = None, *, timestamps: bool = False
    ) -> Transcript:
        """The next scripted transcript after ``latency`` seconds ("" when ``audio`` is silent)."""
        self.calls.append(len(audio) / INPUT_SAMPLE_RATE)
        if self.latency > 0:
            self._sleep(self.latency)
        if self.error is not None:
            raise self.error
        if _rms(np.asarray(audio, dtype=np.float32)) < SILENCE_RMS:
            return Transcript("", language or self.language)
        text = self._script.take()
        spans = (Segment(0.0, round(len(audio) / INPUT_SAMPLE_RATE, 3), text),) if timestamps and text else ()
        return Transcript(text, language or self.language, spans)

    def transcribe_with_prefix(
        self, audio: np.ndarray, prefix: str, language: str | None = None
    ) -> Transcript:
        """:meth:`transcribe`, noting the forced ``prefix`` in :attr:`prefixes`."""
        self.prefixes.append(prefix)
        return self.transcribe(audio, language)

    def transcribe_batch(
        self, audios: Sequence[np.ndarray], language: str | None = None, *, timestamps: bool = False
    ) -> list[Transcript]:
        """One :meth:`transcribe` per clip."""
        return [self.transcribe(a, language, timestamps=timestamps) for a in audios]

    def warmup(self) -> None:
        """Nothing to warm."""


_TOKEN = re.compile(r"\s*\S+")


class FakeLLM:
    """Streams the scripted reply word by word: ``ttft`` before the first, ``token_interval`` between."""

    name = "fake-llm"

    def __init__(
        self,
        reply: str | Sequence[str] = "Hello! This is a scripted reply from the fake language model.",
        *,
        ttft: float = 0.0,
        token_interval: float = 0.0,
        sleep: Sleep = time.sleep,
    ) -> None:
        self._script = _Script(reply)
        self.ttft = ttft
        self.token_interval = token_interval
        self._sleep = sleep
        #: Set to raise it after ``error_after`` tokens of the next calls (failure tests).
        self.error: Exception | None = None
        self.error_after = 0
        #: The messages of every call, in order.
        self.calls: list[list[ChatMessage]] = []
        #: Tokens yielded before a cancel was seen, per cancelled call.
        self.cancelled_after: list[int] = []
        #: What :meth:`end_of_turn_probability` answers (1.0: the words never hold a turn open), and after how long.
        self.end_of_turn = 1.0
        self.end_of_turn_latency = 0.0
        #: The user message of every end-of-turn question, in order.
        self.judged: list[str] = []

    def stream(
        self, messages: Sequence[ChatMessage], *, max_new_tokens: int = 256, cancel: CancelToken | None = None
    ) -> Iterator[str]:
        """Yield the next scripted reply as word tokens, stopping within one token of ``cancel``."""
        self.calls.append(list(messages))
        tokens = _TOKEN.findall(self._script.take())[:max_new_tokens]
        for i, token in enumerate(tokens):
            delay = self.ttft if i == 0 else self.token_interval
            if delay > 0:
                self._sleep(delay)
            if cancel is not None and cancel.is_set():
                self.cancelled_after.append(i)
                return
            if self.error is not None and i >= self.error_after:
                raise self.error
            yield token

    def end_of_turn_probability(self, messages: Sequence[ChatMessage]) -> float:
        """The scripted :attr:`end_of_turn` after :attr:`end_of_turn_latency` seconds (a words judge)."""
        self.judged.append(messages[-1].content if messages else "")
        if self.end_of_turn_latency > 0:
            self._sleep(self.end_of_turn_latency)
        return self.end_of_turn

    def warmup(self) -> None:
        """Nothing to warm."""


class FakeTTS:
    """Speaks any text as a tone: ``seconds_per_char`` of audio per character, in ``chunk_s`` chunks.

    ``first_chunk_latency`` passes before the first chunk; every chunk then takes ``realtime_factor``
    times its duration to make (0: as fast as the machine allows). Voice "tone" is 440 Hz, "low" 220 Hz.
    """

    name = "fake-tts"
    voices: tuple[str, ...] = ("tone", "low")

    def __init__(
        self,
        *,
        first_chunk_latency: float = 0.0,
        seconds_per_char: float = 0.06,
        chunk_s: float = 0.2,
        realtime_factor: float = 0.0,
        amplitude: float = 0.3,
        sleep: Sleep = time.sleep,
    ) -> None:
        if seconds_per_char <= 0 or chunk_s <= 0:
            raise ValueError("seconds_per_char and chunk_s must be positive")
        self.first_chunk_latency = first_chunk_latency
        self.seconds_per_char = seconds_per_char
        self.chunk_s = chunk_s
        self.realtime_factor = realtime_factor
        self.amplitude = amplitude
        self._sleep = sleep
        #: Set to make every call raise it (failure tests).
        self.error: Exception | None = None
        #: The text of every call, in order.
        self.calls: list[str] = []

    def duration_of(self, text: str) -> float:
        """Seconds of audio :meth:`synthesize` makes for ``text``."""
        return len(text) * self.seconds_per_char

    def synthesize(
        self, text: str, *, voice: str | None = None, cancel: CancelToken | None = None
    ) -> Iterator[np.ndarray]:
        """Yield the tone for ``text`` chunk by chunk, stopping between chunks once ``cancel`` is set."""
        self.calls.append(text)
        if self.error is not None:
            raise self.error
        frequency = 220.0 if voice == "low" else 440.0
        total = round(self.duration_of(text) * OUTPUT_SAMPLE_RATE)
        step = max(1, round(self.chunk_s * OUTPUT_SAMPLE_RATE))
        for start in range(0, total, step):
            n = min(step, total - start)
            delay = self.realtime_factor * n / OUTPUT_SAMPLE_RATE
            if start == 0:
                delay += self.first_chunk_latency
            if delay > 0:
                self._sleep(delay)
            if cancel is not None and cancel.is_set():
                return
            t = (start + np.arange(n)) / OUTPUT_SAMPLE_RATE
            yield (self.amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)

    def warmup(self) -> None:
        """Nothing to warm."""


class FakeTurnDetector:
    """A scripted turn model: the next of ``probabilities`` (the last repeats) after ``latency`` seconds."""

    name = "fake-turn"

    def __init__(
        self, probabilities: float | Sequence[float] = 0.9, *, latency: float = 0.0, sleep: Sleep = time.sleep
    ) -> None:
        values = [probabilities] if isinstance(probabilities, int | float) else list(probabilities)
        if not values or not all(0.0 <= v <= 1.0 for v in values):
            raise ValueError("probabilities must be in [0, 1]")
        self._values = values
        self._next = 0
        self._lock = threading.Lock()
        self.latency = latency
        self._sleep = sleep
        #: Seconds of audio of every call, in order.
        self.calls: list[float] = []

    def complete_probability(self, audio: np.ndarray) -> float:
        """The next scripted probability."""
        self.calls.append(len(audio) / INPUT_SAMPLE_RATE)
        if self.latency > 0:
            self._sleep(self.latency)
        with self._lock:
            value = self._values[min(self._next, len(self._values) - 1)]
            self._next += 1
        return value

    def warmup(self) -> None:
        """Nothing to warm."""


class FakeVAD:
    """A streaming VAD by energy: a 32 ms window louder than ``threshold_rms`` is speech.

    Probabilities are 0.95 (speech) or 0.02 (silence), so tests drive it with tones and silence.
    """

    window_samples: int = 512

    def __init__(self, threshold_rms: float = SILENCE_RMS * 2) -> None:
        self.threshold_rms = threshold_rms
        self._pending = np.zeros(0, np.float32)

    def process(self, audio: np.ndarray) -> list[float]:
        """Probabilities of the windows completed by ``audio``."""
        samples = np.concatenate([self._pending, np.asarray(audio, dtype=np.float32)])
        whole = len(samples) - len(samples) % self.window_samples
        self._pending = samples[whole:]
        windows = samples[:whole].reshape(-1, self.window_samples)
        return [0.95 if _rms(w) >= self.threshold_rms else 0.02 for w in windows]

    def reset(self) -> None:
        """Forget the partial window."""
        self._pending = np.zeros(0, np.float32)


def build_fake_stack(
    *,
    transcript: str | Sequence[str] = "hello there",
    reply: str | Sequence[str] = "Hello! This is a scripted reply from the fake language model.",
    asr_latency: float = 0.0,
    ttft: float = 0.0,
    token_interval: float = 0.0,
    tts_first_chunk_latency: float = 0.0,
    seconds_per_char: float = 0.06,
    realtime_factor: float = 0.0,
    sleep: Sleep = time.sleep,
    vad_threshold_rms: float = SILENCE_RMS * 2,
    turn_probability: float | Sequence[float] | None = None,
    turn_latency: float = 0.0,
) -> ModelStack:
    """A :class:`ModelStack` of scripted fakes (``kind="fake"``) sharing one ``sleep``.

    ``turn_probability``: a scripted turn model's answers; None gives a stack without one.
    """
    asr = FakeASR(transcript, latency=asr_latency, sleep=sleep)
    llm = FakeLLM(reply, ttft=ttft, token_interval=token_interval, sleep=sleep)
    tts = FakeTTS(
        first_chunk_latency=tts_first_chunk_latency,
        seconds_per_char=seconds_per_char,
        realtime_factor=realtime_factor,
        sleep=sleep,
    )
    turn = None
    if turn_probability is not None:
        turn = FakeTurnDetector(turn_probability, latency=turn_latency, sleep=sleep)
    info = {"asr": asr.name, "llm": llm.name, "tts": tts.name, "vad": "fake-energy"}
    return ModelStack(
        asr=asr,
        llm=llm,
        tts=tts,
        vad_factory=lambda: FakeVAD(vad_threshold_rms),
        turn=turn,
        kind="fake",
        device="cpu",
        info=info if turn is None else {**info, "turn": turn.name},
    )
