"""PCM ring buffer: keeps the newest audio, counts what it drops, reads by age and by absolute index."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.audio.errors import AudioError
from core.audio.ringbuffer import PCMRingBuffer


def ramp(start: int, n: int) -> np.ndarray:
    """Distinct, exactly representable samples: absolute index i holds i / 2**20."""
    return (np.arange(start, start + n) / 2**20).astype(np.float32)


def test_drops_oldest_and_counts_them() -> None:
    buf = PCMRingBuffer(capacity_s=1.0, sample_rate=100)
    assert buf.capacity == 100
    assert buf.append(ramp(0, 60)) == 0
    assert buf.append(ramp(60, 60)) == 20
    assert buf.dropped_samples == 20 and len(buf) == 100
    np.testing.assert_array_equal(buf.read_all(), ramp(20, 100))
    # One append larger than the whole buffer keeps its own newest samples.
    assert buf.append(ramp(120, 250)) == 250
    assert buf.dropped_samples == 270
    np.testing.assert_array_equal(buf.read_all(), ramp(270, 100))
    assert buf.total_samples == 370 and buf.start_sample == 270


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=64),
    st.lists(st.one_of(st.integers(0, 100), st.tuples(st.just("consume"), st.integers(0, 80))), max_size=30),
)
def test_matches_a_plain_list_model(capacity: int, ops: list) -> None:
    buf = PCMRingBuffer(capacity_s=capacity / 1000, sample_rate=1000)
    model: list[float] = []
    written = dropped = 0
    for op in ops:
        if isinstance(op, tuple):
            got = buf.consume(op[1])
            expect, model = model[: op[1]], model[op[1] :]
            np.testing.assert_array_equal(got, np.array(expect, np.float32))
            continue
        chunk = ramp(written, op)
        written += op
        model += chunk.tolist()
        over = max(0, len(model) - capacity)
        dropped += over
        model = model[over:]
        assert buf.append(chunk) == over
        assert len(buf) == len(model) and buf.dropped_samples == dropped
        np.testing.assert_array_equal(buf.read_all(), np.array(model, np.float32))
        np.testing.assert_array_equal(buf.read_last(7), np.array(model[-7:], np.float32))
        np.testing.assert_array_equal(buf.peek(5), np.array(model[:5], np.float32))
    assert buf.total_samples == written


def test_read_last_seconds_and_durations() -> None:
    buf = PCMRingBuffer(capacity_s=2.0, sample_rate=16_000)
    buf.append(ramp(0, 24_000))
    assert buf.duration_s == pytest.approx(1.5)
    np.testing.assert_array_equal(buf.read_last_s(0.5), ramp(16_000, 8_000))
    assert buf.read_last_s(10).size == 24_000
    assert buf.read_last(0).size == 0 and buf.read_last(-5).size == 0


def test_read_since_absolute_index_survives_drops() -> None:
    buf = PCMRingBuffer(capacity_s=1.0, sample_rate=100)
    buf.append(ramp(0, 80))
    speech_start = 50
    buf.append(ramp(80, 60))  # drops samples 0..39: the utterance is still whole
    np.testing.assert_array_equal(buf.read_since(speech_start), ramp(50, 90))
    buf.append(ramp(140, 30))  # now samples up to 69 are gone: clamped to what is held
    np.testing.assert_array_equal(buf.read_since(speech_start), ramp(70, 100))
    assert buf.read_since(10**9).size == 0


def test_clear_keeps_counters_and_timeline() -> None:
    buf = PCMRingBuffer(capacity_s=1.0, sample_rate=100)
    buf.append(ramp(0, 150))
    buf.clear()
    assert len(buf) == 0 and buf.read_all().size == 0
    assert buf.dropped_samples == 50 and buf.start_sample == 150
    buf.append(ramp(150, 10))
    np.testing.assert_array_equal(buf.read_since(150), ramp(150, 10))


def test_consume_is_not_a_drop() -> None:
    buf = PCMRingBuffer(capacity_s=1.0, sample_rate=100)
    buf.append(ramp(0, 90))
    np.testing.assert_array_equal(buf.consume(30), ramp(0, 30))
    buf.append(ramp(90, 40))  # fits: 60 + 40 = 100
    assert buf.dropped_samples == 0
    np.testing.assert_array_equal(buf.read_all(), ramp(30, 100))


def test_reads_are_copies() -> None:
    buf = PCMRingBuffer(capacity_s=1.0, sample_rate=10)
    buf.append(np.ones(5, np.float32))
    out = buf.read_all()
    out[:] = 0
    assert buf.read_all().sum() == 5


def test_int16_is_scaled_and_bad_input_refused() -> None:
    buf = PCMRingBuffer(capacity_s=1.0, sample_rate=10)
    buf.append(np.array([16384, -32768], np.int16))
    np.testing.assert_array_equal(buf.read_all(), np.array([0.5, -1.0], np.float32))
    with pytest.raises(AudioError):
        buf.append(np.zeros((4, 2), np.float32))
    with pytest.raises(AudioError):
        buf.append(np.zeros(4, np.int64))
    with pytest.raises(ValueError):
        PCMRingBuffer(capacity_s=0)
