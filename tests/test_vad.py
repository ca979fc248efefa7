"""Silero VAD: real speech found where it is, silence and noise ignored, streaming equal to offline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from core.audio.vad import (
    WINDOW_SAMPLES,
    SileroVAD,
    VADError,
    default_model_path,
    load_silero_session,
    segments_from_probabilities,
    speech_probabilities,
    speech_segments,
)
from tests.speech import espeak, with_silence

RATE = 16_000


@pytest.fixture(scope="module")
def session():
    return load_silero_session()


def speech_bounds(audio: np.ndarray) -> tuple[float, float]:
    """First and last loud sample of a clip, in seconds (espeak's own output has quiet edges)."""
    loud = np.flatnonzero(np.abs(audio) > 0.02)
    return loud[0] / RATE, loud[-1] / RATE


# ------------------------------------------------------------------------- real model, real speech


def test_finds_one_utterance_between_silences(session) -> None:
    speech = espeak("The weather is lovely today, so we should go for a walk")
    first, last = speech_bounds(speech)
    audio = with_silence(speech, 1.0, 1.5)
    segments = speech_segments(audio, session=session)
    assert len(segments) == 1, segments
    start, end = segments[0]
    assert start == pytest.approx(1.0 + first, abs=0.25)
    assert end == pytest.approx(1.0 + last, abs=0.25)


def test_two_utterances_one_second_apart(session) -> None:
    one, two = espeak("Good morning everyone"), espeak("How are you doing today")
    audio = np.concatenate(
        [with_silence(one, 0.5, 0.0), np.zeros(RATE, np.float32), with_silence(two, 0.0, 0.5)]
    )
    segments = speech_segments(audio, session=session)
    assert len(segments) == 2, segments
    second_start = 0.5 + len(one) / RATE + 1.0 + speech_bounds(two)[0]
    assert segments[1][0] == pytest.approx(second_start, abs=0.25)
    assert segments[0][1] < segments[1][0]


def test_silence_and_quiet_noise_have_no_speech(session) -> None:
    assert speech_segments(np.zeros(3 * RATE, np.float32), session=session) == []
    noise = (np.random.default_rng(7).standard_normal(3 * RATE) * 0.01).astype(np.float32)
    assert speech_segments(noise, session=session) == []
    assert speech_probabilities(noise, session).max() < 0.5


def test_other_sample_rates_are_resampled(session) -> None:
    import soxr

    audio = with_silence(espeak("Testing one two three"), 1.0, 1.0)
    at_48k = soxr.resample(audio, RATE, 48_000).astype(np.float32)
    got = speech_segments(at_48k, 48_000, session=session)
    want = speech_segments(audio, session=session)
    assert len(got) == len(want) == 1
    assert got[0] == pytest.approx(want[0], abs=0.07)


def test_streaming_in_random_chunks_equals_one_call(session) -> None:
    audio = with_silence(espeak("Streaming audio arrives in pieces of any size"), 0.3, 0.3)
    whole = SileroVAD(session).process(audio)
    assert len(whole) == len(audio) // WINDOW_SAMPLES
    assert max(whole) > 0.9 and min(whole) < 0.1

    rng = np.random.default_rng(3)
    vad, pieces, pos = SileroVAD(session), [], 0
    while pos < len(audio):
        n = int(rng.integers(1, 3000))
        pieces.extend(vad.process(audio[pos : pos + n]))
        pos += n
    np.testing.assert_allclose(pieces, whole, atol=1e-6)
    # Offline scoring is the same computation (plus one zero-padded partial window at the end).
    np.testing.assert_allclose(speech_probabilities(audio, session)[: len(whole)], whole, atol=1e-6)


def test_long_audio_is_scored_in_blocks_without_seams(session) -> None:
    # 40 s is more than one scoring block (1024 windows = 32.8 s); the tail is a partial window.
    clip = with_silence(espeak("Long recordings are scored a block at a time"), 0.5, 1.5)
    repeats = 8
    audio = np.concatenate([np.tile(clip, repeats), np.zeros(100, np.float32)])
    offline = speech_probabilities(audio, session)
    assert len(offline) == len(audio) // WINDOW_SAMPLES + 1
    vad = SileroVAD(session)  # fed in small pieces, so that no block boundary falls where offline has one
    streamed = [p for i in range(0, len(audio), 7000) for p in vad.process(audio[i : i + 7000])]
    np.testing.assert_allclose(offline[:-1], streamed, atol=1e-6)
    assert len(speech_segments(audio, session=session)) == repeats  # one per spoken sentence


def test_reset_forgets_state_and_streams_do_not_share_it(session) -> None:
    speech = espeak("Hello there")
    a, b = SileroVAD(session), SileroVAD(session)
    first = a.process(speech)
    b.process(np.zeros(1000, np.float32))  # another stream on the same session, with a partial window
    assert a.process(np.zeros(0, np.float32)) == []
    a.reset()
    assert a.process(speech) == pytest.approx(first, abs=1e-6)


def test_sequence_export_gives_the_same_probabilities(session) -> None:
    sequence = load_silero_session(default_model_path("silero_vad_16k_sequence.onnx"))
    audio = with_silence(espeak("Two exports of one network"), 0.2, 0.2)
    np.testing.assert_allclose(
        SileroVAD(sequence).process(audio), SileroVAD(session).process(audio), atol=1e-5
    )


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 512), np.float32),
        np.zeros(512, np.int16),
        np.array([0.0, np.nan] * 256, np.float32),
        [0.0] * 512,
    ],
)
def test_bad_audio_is_a_clear_error(session, bad) -> None:
    with pytest.raises(VADError):
        SileroVAD(session).process(bad)


def test_bad_model_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(VADError):
        load_silero_session(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(VADError):
        load_silero_session(tmp_path / "junk.onnx")


# ------------------------------------------------------------------------ pure segmenter (tables)

# 0.1 s windows keep the tables readable; no padding unless the case is about padding.
W = dict(window_s=0.1, min_speech_s=0.2, min_silence_s=0.3, pad_s=0.0)


@pytest.mark.parametrize(
    ("probs", "kwargs", "want"),
    [
        pytest.param([], {}, [], id="empty"),
        pytest.param([0.1] * 10, {}, [], id="silence"),
        pytest.param([0, 0, 0.9, 0.9, 0.9, 0, 0], {}, [(0.2, 0.5)], id="one"),
        pytest.param([0.9] * 5, {}, [(0.0, 0.5)], id="speech-to-the-end"),
        # Hysteresis: 0.4 is below the threshold but above neg (0.35), so speech goes on through it.
        pytest.param([0, 0.9, 0.4, 0.4, 0.9, 0], {}, [(0.1, 0.5)], id="hysteresis-holds"),
        pytest.param([0, 0.4, 0.4, 0.4, 0], {}, [], id="never-enters-below-threshold"),
        pytest.param(
            [0, 0.9, 0.3, 0.9, 0.9, 0],
            {"min_silence_s": 0.0, "min_speech_s": 0.0},
            [(0.1, 0.2), (0.3, 0.5)],
            id="neg-exit",
        ),
        # A 0.2 s pause (< min_silence 0.3) is bridged; a 0.3 s pause is not.
        pytest.param([0.9, 0.9, 0, 0, 0.9, 0.9], {}, [(0.0, 0.6)], id="short-pause-merged"),
        pytest.param([0.9, 0.9, 0, 0, 0, 0.9, 0.9], {}, [(0.0, 0.2), (0.5, 0.7)], id="long-pause-splits"),
        pytest.param([0, 0.9, 0, 0, 0, 0], {}, [], id="too-short-dropped"),
        pytest.param([0, 0.9, 0.9, 0, 0], {}, [(0.1, 0.3)], id="exactly-min-speech-kept"),
        pytest.param([0, 0, 0.9, 0.9, 0, 0], {"pad_s": 0.1}, [(0.1, 0.5)], id="padded"),
        pytest.param([0.9, 0.9, 0, 0], {"pad_s": 0.15, "duration_s": 0.35}, [(0.0, 0.35)], id="pad-clipped"),
        # Pads of 0.3 s each would overlap across a 0.4 s pause: the two segments meet halfway.
        pytest.param(
            [0.9, 0.9, 0, 0, 0, 0, 0.9, 0.9], {"pad_s": 0.3}, [(0.0, 0.4), (0.4, 0.8)], id="pads-meet-halfway"
        ),
        pytest.param([0, 0.9, 0.9, 0], {"threshold": 0.95}, [], id="higher-threshold"),
    ],
)
def test_segments_from_probabilities(probs, kwargs, want) -> None:
    got = segments_from_probabilities(probs, **{**W, **kwargs})
    assert got == want


def test_overlong_segment_is_cut_in_its_longest_pause() -> None:
    # 2 s of speech with two short (bridged) pauses at 0.5 s and 1.2-1.4 s; at most 1.5 s per segment.
    probs = [0.9] * 20
    probs[5] = 0.1
    probs[12:14] = [0.1, 0.1]
    got = segments_from_probabilities(probs, **{**W, "max_segment_s": 1.5})
    assert got == [(0.0, 1.3), (1.3, 2.0)]


def test_overlong_segment_without_pause_is_cut_at_its_quietest_window() -> None:
    probs = [0.9] * 40
    probs[25] = 0.6
    got = segments_from_probabilities(probs, **{**W, "max_segment_s": 3.0})
    assert got == [(0.0, 2.55), (2.55, 4.0)]
    assert all(end - start <= 3.0 for start, end in got)


def test_every_piece_of_a_long_recording_is_short_enough() -> None:
    rng = np.random.default_rng(0)
    probs = np.clip(rng.normal(0.8, 0.2, 5000), 0, 1)  # 160 s of mostly speech at 32 ms windows
    got = segments_from_probabilities(probs, max_segment_s=30.0)
    assert all(0 < end - start <= 30.0 for start, end in got)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(got))
    assert got[-1][1] == pytest.approx(5000 * 0.032)


@pytest.mark.parametrize(
    "kwargs",
    [{"threshold": 1.5}, {"threshold": 0.5, "neg_threshold": 0.7}, {"max_segment_s": 0.01}, {"pad_s": -1}],
)
def test_bad_parameters_are_clear_errors(kwargs) -> None:
    with pytest.raises(VADError):
        segments_from_probabilities([0.5, 0.6], **kwargs)
    with pytest.raises(VADError):
        segments_from_probabilities([[0.5]])
