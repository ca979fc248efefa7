"""The session's input path: binary frames -> packets -> PCM -> ring buffer -> VAD -> speech events.

:class:`InputDecoder` turns frames into 16 kHz float32 audio: Opus packets (length-prefixed) or raw
pcm16, declared by ``session.update`` or detected from the first bytes. A wrong detection must not
cost the session: the first second of raw bytes is kept, and if the Opus path fails inside it the
stream is detected again and replayed. Bad input never raises; it comes back as problem strings, which
:class:`ProblemReporter` turns into at most one ``bad_audio`` error per interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from core.audio.errors import AudioError
from core.audio.framing import PacketFramer, detect_stream_format
from core.audio.opus import OpusDecoder
from core.audio.ringbuffer import PCMRingBuffer
from core.audio.vad import StreamingVAD
from core.session.segmenter import SegmenterConfig, SpeechSegmenter, VoiceEvent

InputFormat = Literal["opus", "pcm16"]
SAMPLE_RATE = 16_000
#: Raw bytes kept to re-detect a stream whose first guess turns out wrong (one second of pcm16).
PROBE_BYTES = 2 * SAMPLE_RATE


@dataclass
class Decoded:
    """What one frame gave: audio chunks, problems, and whether the stream was re-detected."""

    audio: list[np.ndarray] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    restarted: bool = False


class InputDecoder:
    """Frames to float32 PCM for one stream; ``declared`` fixes the format, None detects it."""

    def __init__(self, declared: InputFormat | None = None) -> None:
        self.declared = declared
        self.format: InputFormat | None = declared
        self._probe = bytearray()
        self._framer = PacketFramer()
        self._opus = OpusDecoder(SAMPLE_RATE)
        self._odd = b""  # a pcm16 sample split across frames

    def declare(self, fmt: InputFormat | None) -> None:
        """Fix the format from now on (None: detect again from the next bytes)."""
        if fmt == self.declared and fmt is not None:
            return
        self.declared = fmt
        self.format = fmt
        self._probe.clear()
        self._restart_codecs()

    def feed(self, frame: bytes) -> Decoded:
        """Decode one binary frame; never raises."""
        out = Decoded()
        if self.format is None:
            return self._detect(frame, out)
        if len(self._probe) < PROBE_BYTES and self.declared is None:
            self._probe += frame
        self._decode(frame, out)
        if out.problems and self.declared is None and len(self._probe) < PROBE_BYTES:
            self._redetect(out)
        return out

    def _detect(self, frame: bytes, out: Decoded) -> Decoded:
        self._probe += frame
        guess = detect_stream_format(bytes(self._probe))
        if guess == "unknown":
            if len(self._probe) < PROBE_BYTES:
                return out
            guess = "pcm16"  # an Opus stream would have been recognised after three packets
        self.format = guess
        self._decode(bytes(self._probe), out)
        return out

    def _redetect(self, out: Decoded) -> None:
        guess = detect_stream_format(bytes(self._probe))
        if guess == "unknown" or guess == self.format:
            return
        self.format = guess
        self._restart_codecs()
        replay = Decoded()
        self._decode(bytes(self._probe), replay)
        out.audio, out.restarted = replay.audio, True
        out.problems = [
            f"input re-detected as {guess}; the first {len(self._probe)} bytes were decoded again"
        ]

    def _restart_codecs(self) -> None:
        self._framer.reset()
        self._opus.reset()
        self._odd = b""

    def _decode(self, data: bytes, out: Decoded) -> None:
        if self.format == "pcm16":
            out.audio += self._pcm16(data)
            return
        for packet in self._framer.feed(data):
            try:
                out.audio.append(self._opus.decode(packet))
            except AudioError as exc:
                out.problems.append(exc.message)
                out.audio.append(self._opus.conceal(1))  # keep the timeline continuous
        out.problems += [e.message for e in self._framer.take_errors() if e.kind != "broken"]
        if self._framer.broken:
            # A live session keeps listening: resynchronise at the next frame rather than discard the
            # rest of the stream (the problems are still reported, rate-limited by the session).
            self._framer.reset()

    def _pcm16(self, data: bytes) -> list[np.ndarray]:
        data = self._odd + data
        whole = len(data) & ~1
        self._odd = data[whole:]
        if not whole:
            return []
        return [np.frombuffer(data[:whole], dtype="<i2").astype(np.float32) / 32768.0]


class ProblemReporter:
    """Rate limit for bad-input reports: the first problem at once, then one summary per interval."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._last: float | None = None
        self._count = 0
        self._first = ""
        #: Problems seen in all.
        self.total = 0

    def add(self, problems: list[str], now: float) -> str | None:
        """Account ``problems``; return a message to send now, or None while rate-limited."""
        if not problems:
            return None
        self.total += len(problems)
        if not self._count:
            self._first = problems[0]
        self._count += len(problems)
        if self._last is not None and now - self._last < self.interval_s:
            return None
        count, first = self._count, self._first
        self._last, self._count = now, 0
        if count == 1:
            return first
        return f"{count} audio problems (first: {first})"


class InputPipeline:
    """Decoder, ring buffer, VAD and segmenter of one session's input stream."""

    def __init__(
        self, vad: StreamingVAD, segmenter: SegmenterConfig, ring_s: float, declared: InputFormat | None
    ) -> None:
        self.decoder = InputDecoder(declared)
        self.ring = PCMRingBuffer(ring_s, SAMPLE_RATE)
        self.segmenter = SpeechSegmenter(segmenter)
        self._vad = vad
        self._scored = 0  # absolute sample index where the VAD's next window starts

    @property
    def position(self) -> int:
        """Samples heard so far (the absolute index of the next sample)."""
        return self.ring.total_samples

    def feed(self, frame: bytes, *, listen: bool = True) -> tuple[list[VoiceEvent], Decoded]:
        """Decode ``frame``; unless ``listen`` is off (paused), buffer it and run the VAD over it."""
        decoded = self.decoder.feed(frame)
        if decoded.restarted:
            self.reset_listening()
        events: list[VoiceEvent] = []
        if listen:
            for pcm in decoded.audio:
                events += self._listen(pcm, decoded)
        return events, decoded

    def _listen(self, pcm: np.ndarray, decoded: Decoded) -> list[VoiceEvent]:
        self.ring.append(pcm)
        try:
            probs = self._vad.process(pcm)
        except (AudioError, ValueError) as exc:
            decoded.problems.append(f"VAD refused the audio: {exc}")
            probs = []
        events: list[VoiceEvent] = []
        size = self._vad.window_samples
        for p in probs:
            events += self.segmenter.window(p, self._scored, self._scored + size)
            self._scored += size
        return events + self.segmenter.advance(self.position)

    def reset_listening(self) -> None:
        """Forget VAD state and the utterance in progress (a resume, a re-detected stream)."""
        self._vad.reset()
        self.segmenter.reset()
        self._scored = self.position

    def audio(self, start: int, end: int) -> np.ndarray:
        """Buffered audio between absolute sample indices ``start`` and ``end`` (clamped to what is held)."""
        chunk = self.ring.read_since(max(start, self.ring.start_sample))
        return chunk[: max(0, end - max(start, self.ring.start_sample))]
