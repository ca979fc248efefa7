"""Speech events from VAD probabilities, in samples: start, barge-in, endpoint, clicks, overlong speech."""

from __future__ import annotations

from core.session.segmenter import SegmenterConfig, SpeechSegmenter, VoiceEvent
from core.session.state import Event

W = 512  # window samples
CFG = SegmenterConfig.from_ms(
    sample_rate=16_000, threshold=0.5, min_speech_ms=200, barge_in_min_speech_ms=250,
    endpoint_silence_ms=500, max_utterance_s=3.0,
)  # fmt: skip


def feed(probs: list[float], seg: SpeechSegmenter | None = None) -> list[VoiceEvent]:
    seg = seg or SpeechSegmenter(CFG)
    out: list[VoiceEvent] = []
    for i, p in enumerate(probs):
        out += seg.window(p, i * W, (i + 1) * W)
        out += seg.advance((i + 1) * W)
    return out


def test_a_turn() -> None:
    events = feed([0.0] * 10 + [0.9] * 30 + [0.0] * 20)
    assert [e.kind for e in events] == [Event.SPEECH_START, Event.BARGE_IN, Event.SPEECH_END]
    start, barge, end = events
    assert start.start == 10 * W and start.at == (10 + 7) * W  # 7 windows = 224 ms >= 200 ms
    assert barge.at == (10 + 8) * W  # 256 ms >= 250 ms
    assert end.end == 40 * W  # the last voiced window
    assert end.at == 56 * W  # 16 windows = 512 ms of silence >= 500 ms


def test_endpoint_at_frame_granularity() -> None:
    seg = SpeechSegmenter(CFG)
    for i in range(10):
        seg.window(0.9, i * W, (i + 1) * W)
    assert seg.advance(10 * W + 7999) == []
    (end,) = seg.advance(10 * W + 8000)
    assert end.kind is Event.SPEECH_END and end.at == 10 * W + 8000


def test_clicks_and_short_sounds_are_not_turns() -> None:
    assert feed([0.0, 0.9, 0.0, 0.9, 0.0] + [0.0] * 20) == []
    seg = SpeechSegmenter(CFG)
    feed([0.9] * 3 + [0.0] * 20, seg)
    assert not seg.in_utterance  # forgotten after the silence window


def test_hysteresis_keeps_a_soft_syllable_in_the_utterance() -> None:
    events = feed([0.9] * 10 + [0.4] * 20 + [0.0] * 20)  # 0.4 >= 0.5 - 0.15 while speech runs
    assert events[-1].kind is Event.SPEECH_END and events[-1].end == 30 * W


def test_overlong_speech_is_cut_at_max_utterance() -> None:
    events = feed([0.9] * 200)
    ends = [e for e in events if e.kind is Event.SPEECH_END]
    assert ends and ends[0].end - ends[0].start >= 3 * 16_000
    assert ends[0].end - ends[0].start < 3 * 16_000 + W
