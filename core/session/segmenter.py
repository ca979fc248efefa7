"""Turn VAD probabilities into the session's speech events: start, barge-in and end of turn (endpoint).

Pure bookkeeping in sample indices (absolute positions in the session's input stream), so it is exact
and testable without a clock. Speech is counted in voiced samples, not wall time: a cough followed by
silence never adds up to a turn, and loopback of the assistant's own silence never looks like speech.

Besides the hard endpoint (``endpoint_silence`` of silence), a turn in progress reports a *pause* once
``pause_silence`` of silence follows speech, and a *resume* once ``min_speech`` of speech follows a pause:
the session asks its turn model at the pause and starts a preemptive reply there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from core.session.state import Event

#: How far below the speech threshold a window must fall to count as silence once speech runs (hysteresis).
HYSTERESIS = 0.15


@dataclass(frozen=True)
class VoiceEvent:
    """A speech decision: ``kind`` is SPEECH_START, BARGE_IN, SPEECH_PAUSE, SPEECH_RESUME or SPEECH_END (or
    COMMIT, made by the session).

    ``start`` is the onset of the utterance, ``end`` the end of its last voiced window (for SPEECH_START
    and BARGE_IN: the current position), ``at`` where in the stream the decision was taken.
    """

    kind: Event
    start: int
    end: int
    at: int


@dataclass(frozen=True)
class SegmenterConfig:
    """Thresholds in samples (see ``DuplexConfig`` for their meaning)."""

    threshold: float
    min_speech: int
    barge_in: int
    endpoint_silence: int
    max_utterance: int
    pause_silence: int = 0  # 0: no pause events

    def with_silences(self, *, endpoint_silence: int, pause_silence: int) -> SegmenterConfig:
        """The same config with other silence windows (in samples)."""
        return replace(self, endpoint_silence=endpoint_silence, pause_silence=pause_silence)

    @classmethod
    def from_ms(
        cls,
        *,
        sample_rate: int,
        threshold: float,
        min_speech_ms: int,
        barge_in_min_speech_ms: int,
        endpoint_silence_ms: int,
        max_utterance_s: float,
        pause_silence_ms: int = 0,
    ) -> SegmenterConfig:
        """Build from the config's milliseconds."""
        per_ms = sample_rate / 1000
        return cls(
            threshold=threshold,
            min_speech=round(min_speech_ms * per_ms),
            barge_in=round(barge_in_min_speech_ms * per_ms),
            endpoint_silence=round(endpoint_silence_ms * per_ms),
            max_utterance=round(max_utterance_s * sample_rate),
            pause_silence=round(pause_silence_ms * per_ms),
        )


class SpeechSegmenter:
    """Per-stream state: feed :meth:`window` per VAD window, :meth:`advance` after each chunk of audio."""

    def __init__(self, config: SegmenterConfig) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget the utterance in progress (after a commit, a pause, a format switch)."""
        self._onset: int | None = None
        self._voiced = 0
        self._last_voiced_end = 0
        self._loud = False
        self._started = False
        self._barged = False
        self._paused = False  # a pause was reported for the current silence
        self._early_end: int | None = None  # a nearer endpoint for the current silence (end_after)
        self._resume_voiced: int | None = None  # voiced samples since the last pause, until the resume

    @property
    def in_utterance(self) -> bool:
        """Whether speech was heard and no endpoint has closed it yet."""
        return self._onset is not None

    @property
    def started(self) -> bool:
        """The utterance in progress has reached ``min_speech`` (its SPEECH_START was raised)."""
        return self._started

    @property
    def onset(self) -> int | None:
        """Start sample of the utterance in progress, if any."""
        return self._onset

    def window(self, prob: float, start: int, end: int) -> list[VoiceEvent]:
        """Account one VAD window [start, end) with speech probability ``prob``."""
        cfg = self.config
        threshold = cfg.threshold - HYSTERESIS if self._loud else cfg.threshold
        self._loud = prob >= threshold
        if not self._loud:
            return []
        if self._onset is None:
            self._onset, self._voiced = start, 0
        self._voiced += end - start
        self._last_voiced_end = end
        self._paused = False
        self._early_end = None
        out = self._crossings(end)
        if self._resume_voiced is not None and self._onset is not None:
            self._resume_voiced += end - start
            if self._resume_voiced >= max(cfg.min_speech, 1):
                self._resume_voiced = None
                out.append(VoiceEvent(Event.SPEECH_RESUME, self._onset, end, end))
        return out

    @property
    def last_voiced_end(self) -> int:
        """End sample of the utterance's last voiced window."""
        return self._last_voiced_end

    def _crossings(self, now: int) -> list[VoiceEvent]:
        cfg = self.config
        assert self._onset is not None
        out = []
        if not self._started and self._voiced >= cfg.min_speech:
            self._started = True
            out.append(VoiceEvent(Event.SPEECH_START, self._onset, now, now))
        if not self._barged and self._voiced >= cfg.barge_in:
            self._barged = True
            out.append(VoiceEvent(Event.BARGE_IN, self._onset, now, now))
        if (self._started or self._barged) and now - self._onset >= cfg.max_utterance:
            out.append(self._end(now))
        return out

    def advance(self, position: int) -> list[VoiceEvent]:
        """The stream has reached ``position``: close the utterance once the silence after it is long enough.

        Audio past the last whole VAD window counts as silence here, so the endpoint fires at the
        first input frame that completes the silence window, not up to one VAD window later.
        """
        if self._onset is None:
            return []
        silence = position - self._last_voiced_end
        early = self._early_end is not None and position >= self._early_end
        if silence < self.config.endpoint_silence and not early:
            return self._pause(position, silence)
        if not (self._started or self._barged):
            self.reset()  # too short to be a turn (a cough, a click): forget it quietly
            return []
        return [self._end(position)]

    def _pause(self, position: int, silence: int) -> list[VoiceEvent]:
        cfg = self.config
        if self._paused or not cfg.pause_silence or silence < cfg.pause_silence or not self._started:
            return []
        assert self._onset is not None
        self._paused, self._resume_voiced = True, 0
        return [VoiceEvent(Event.SPEECH_PAUSE, self._onset, self._last_voiced_end, position)]

    def end_after(self, silence: int) -> None:
        """End the utterance once the current silence lasts ``silence`` samples (before the endpoint).

        The session's turn judges use it when they find the user probably done but not surely: the
        endpoint comes sooner for this silence only; speech cancels it.
        """
        if self._onset is not None:
            self._early_end = self._last_voiced_end + silence

    def confirm(self, position: int) -> VoiceEvent | None:
        """End the utterance now on the session's decision (the turn model's); None when there is none."""
        if self._onset is None or not (self._started or self._barged):
            return None
        return self._end(position)

    def finish(self, position: int) -> list[VoiceEvent]:
        """The input stopped at ``position``: end the utterance now (if it is a turn) or forget it."""
        if self._onset is not None and (self._started or self._barged):
            return [self._end(position)]
        self.reset()
        return []

    def _end(self, position: int) -> VoiceEvent:
        assert self._onset is not None
        event = VoiceEvent(Event.SPEECH_END, self._onset, self._last_voiced_end, position)
        self.reset()
        return event
