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


PAUSING = SegmenterConfig.from_ms(
    sample_rate=16_000, threshold=0.5, min_speech_ms=200, barge_in_min_speech_ms=250,
    endpoint_silence_ms=1200, max_utterance_s=30.0, pause_silence_ms=200,
)  # fmt: skip


def kinds(events: list[VoiceEvent]) -> list[Event]:
    return [e.kind for e in events]


def test_a_pause_before_the_endpoint_is_reported_once() -> None:
    events = feed([0.9] * 20 + [0.0] * 45, SpeechSegmenter(PAUSING))
    assert kinds(events) == [Event.SPEECH_START, Event.BARGE_IN, Event.SPEECH_PAUSE, Event.SPEECH_END]
    pause, end = events[2], events[3]
    assert pause.end == end.end == 20 * W  # both about the same utterance
    assert pause.at == 27 * W  # 7 windows = 224 ms >= 200 ms of silence
    assert end.at == 58 * W  # 38 windows = 1216 ms >= 1200 ms


def test_speech_after_a_pause_resumes_the_utterance_and_pauses_again() -> None:
    # 640 ms speech, 320 ms pause, 320 ms speech, silence
    events = feed([0.9] * 20 + [0.0] * 10 + [0.9] * 10 + [0.0] * 45, SpeechSegmenter(PAUSING))
    assert kinds(events) == [
        Event.SPEECH_START, Event.BARGE_IN, Event.SPEECH_PAUSE, Event.SPEECH_RESUME, Event.SPEECH_PAUSE, Event.SPEECH_END,
    ]  # fmt: skip
    first, resume, second, end = events[2:]
    assert first.start == second.start == end.start == 0  # one utterance throughout
    assert resume.at == (30 + 7) * W  # min_speech (200 ms) of speech after the pause
    assert (first.end, second.end, end.end) == (20 * W, 40 * W, 40 * W)


def test_a_click_after_a_pause_is_no_resume_but_moves_the_pause() -> None:
    events = feed([0.9] * 20 + [0.0] * 10 + [0.9] * 2 + [0.0] * 45, SpeechSegmenter(PAUSING))
    assert kinds(events) == [
        Event.SPEECH_START, Event.BARGE_IN, Event.SPEECH_PAUSE, Event.SPEECH_PAUSE, Event.SPEECH_END,
    ]  # fmt: skip
    assert events[3].end == 32 * W


def test_no_pause_events_without_a_pause_window() -> None:
    assert Event.SPEECH_PAUSE not in kinds(feed([0.9] * 20 + [0.0] * 45))


def test_confirm_ends_the_utterance_on_the_sessions_word() -> None:
    seg = SpeechSegmenter(PAUSING)
    feed([0.9] * 20 + [0.0] * 8, seg)
    end = seg.confirm(28 * W)
    assert (
        end is not None
        and end.kind is Event.SPEECH_END
        and (end.start, end.end, end.at) == (0, 20 * W, 28 * W)
    )
    assert not seg.in_utterance and seg.confirm(30 * W) is None


def test_end_after_brings_the_endpoint_nearer_for_this_silence_only() -> None:
    seg = SpeechSegmenter(PAUSING)
    feed([0.9] * 20 + [0.0] * 8, seg)  # the pause is reported at 7 windows of silence
    seg.end_after(16 * W)  # 512 ms instead of the 1200 ms endpoint
    assert seg.advance(20 * W + 16 * W - 1) == []
    (end,) = seg.advance(20 * W + 16 * W)
    assert end.kind is Event.SPEECH_END and end.end == 20 * W


def test_speech_cancels_an_earlier_end() -> None:
    seg = SpeechSegmenter(PAUSING)
    feed([0.9] * 20 + [0.0] * 8, seg)
    seg.end_after(10 * W)
    events = seg.window(0.9, 28 * W, 29 * W)  # speech again before it
    for i in range(29, 29 + 20):
        events += seg.window(0.0, i * W, (i + 1) * W) + seg.advance((i + 1) * W)
    assert Event.SPEECH_END not in kinds(events)  # 20 windows of silence < the 1200 ms endpoint
