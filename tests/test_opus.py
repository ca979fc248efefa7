"""Opus codec: speech survives a round trip on both paths, garbage is refused cleanly, losses are concealed."""

from __future__ import annotations

import contextlib

import numpy as np
import opuslib
import opuslib.api.ctl as opus_ctl
import opuslib.api.encoder as opus_enc
import pytest
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st

from core.audio.errors import AudioError, OpusPacketError
from core.audio.framing import PacketFramer, pack_packets
from core.audio.opus import OpusDecoder, OpusEncoder, validate_packet
from tests.speech import espeak, with_silence

TEXT = "Hello there, this is a test of the voice server codec."


def aligned_correlation(reference: np.ndarray, decoded: np.ndarray, delay: int, search: int = 8) -> float:
    """Best correlation of ``reference`` with ``decoded`` shifted by ``delay`` ± ``search`` samples."""
    n = reference.size
    best = -1.0
    for lag in range(max(0, delay - search), delay + search + 1):
        seg = decoded[lag : lag + n]
        if seg.size == n:
            best = max(best, float(np.corrcoef(reference, seg)[0, 1]))
    return best


@pytest.fixture(scope="module")
def speech16() -> np.ndarray:
    return with_silence(espeak(TEXT), 0.2, 0.2)


@pytest.fixture(scope="module")
def packets16(speech16: np.ndarray) -> list[bytes]:
    """The input path: a client's 16 kHz voice encoder."""
    enc = OpusEncoder(16_000, application="voip", bitrate=24_000)
    return enc.encode(speech16) + enc.flush()


# --- round trips --------------------------------------------------------------------------------------


def test_input_path_round_trip_keeps_speech(speech16: np.ndarray, packets16: list[bytes]) -> None:
    dec = OpusDecoder()
    framer = PacketFramer()
    stream = pack_packets(packets16)
    frames = [stream[i : i + 333] for i in range(0, len(stream), 333)]  # packets split across frames
    decoded = np.concatenate([dec.decode(p) for frame in frames for p in framer.feed(frame)])
    assert decoded.dtype == np.float32
    assert dec.packets_decoded == len(packets16)
    lookahead = OpusEncoder(16_000, application="voip").lookahead
    assert decoded.size >= speech16.size + lookahead
    assert aligned_correlation(speech16, decoded, lookahead) > 0.9


def test_output_path_round_trip_keeps_speech() -> None:
    speech24 = soxr.resample(with_silence(espeak(TEXT), 0.2, 0.2), 16_000, 24_000).astype(np.float32)
    enc = OpusEncoder()  # the server's output encoder: 24 kHz, 20 ms, application "audio"
    assert enc.sample_rate == 24_000 and enc.frame_samples == 480
    # TTS arrives in chunks of arbitrary size.
    chunks = np.array_split(speech24, [1000, 1001, 5000, 17_777, 30_000])
    packets = [p for chunk in chunks for p in enc.encode(chunk)] + enc.flush()
    bits_per_s = sum(map(len, packets)) * 8 / (len(packets) * 0.02)
    assert 20_000 < bits_per_s < 40_000  # the configured 32 kbit/s, VBR
    dec = OpusDecoder(24_000)
    decoded = np.concatenate([dec.decode(p) for p in packets])
    assert aligned_correlation(speech24, decoded, enc.lookahead) > 0.9


def test_int16_and_float_inputs_and_outputs_agree(speech16: np.ndarray) -> None:
    as_int16 = (speech16 * 32767).astype(np.int16)
    float_packets = OpusEncoder(16_000).encode(as_int16.astype(np.float32) / 32768)
    int_packets = OpusEncoder(16_000).encode(as_int16)
    assert int_packets == float_packets
    a, b = OpusDecoder(), OpusDecoder()
    for p in int_packets[:50]:
        f = a.decode(p)
        i = b.decode_int16(p)
        assert i.dtype == np.int16 and i.size == f.size == 320
        assert np.max(np.abs(f * 32768 - i)) <= 1.5


def test_chunking_does_not_change_the_packets(speech16: np.ndarray) -> None:
    whole = OpusEncoder(16_000).encode(speech16)
    enc = OpusEncoder(16_000)
    pieces = [p for chunk in np.array_split(speech16, 37) for p in enc.encode(chunk)]
    assert pieces == whole
    assert enc.pending_samples == speech16.size % 320


def test_flush_pads_the_tail_and_lookahead() -> None:
    enc = OpusEncoder(24_000)
    assert enc.flush() == []  # nothing fed, nothing to flush
    assert enc.encode(np.ones(100, np.float32) * 0.1) == []
    assert enc.pending_samples == 100
    tail = enc.flush()
    assert len(tail) == -(-(100 + enc.lookahead) // 480)
    assert enc.pending_samples == 0 and enc.flush() == []
    # The stream goes on after a flush.
    assert len(enc.encode(np.zeros(960, np.float32))) == 2


def test_flushed_tail_is_audible() -> None:
    """The last real samples come out of the decoder (the look-ahead is flushed too)."""
    enc = OpusEncoder(24_000)
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(24_000) / 24_000)).astype(np.float32)
    packets = enc.encode(tone) + enc.flush()
    dec = OpusDecoder(24_000)
    decoded = np.concatenate([dec.decode(p) for p in packets])
    last = decoded[enc.lookahead + tone.size - 480 : enc.lookahead + tone.size]
    assert np.sqrt(np.mean(last**2)) > 0.2


def test_encoder_settings_and_reset() -> None:
    enc = OpusEncoder(24_000, bitrate=24_000, complexity=2)
    assert opus_enc.encoder_ctl(enc._state, opus_ctl.get_bitrate) == 24_000
    assert opus_enc.encoder_ctl(enc._state, opus_ctl.get_complexity) == 2
    enc.encode(np.zeros(700, np.float32))
    enc.reset()
    assert enc.pending_samples == 0 and enc.flush() == []
    assert opus_enc.encoder_ctl(enc._state, opus_ctl.get_bitrate) == 24_000


@pytest.mark.parametrize("bad", [np.zeros((10, 2), np.float32), np.zeros(10, np.int32), np.zeros(10, bool)])
def test_encoder_rejects_non_mono_or_odd_dtypes(bad: np.ndarray) -> None:
    with pytest.raises(AudioError):
        OpusEncoder().encode(bad)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        OpusEncoder(44_100)
    with pytest.raises(ValueError):
        OpusEncoder(bitrate=1_000_000)
    with pytest.raises(ValueError):
        OpusDecoder(22_050)


# --- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet", "kind"),
    [
        (b"", "bad_length"),
        (b"\x48" + b"x" * 1275, "bad_length"),
        (bytes([0x48 | 0x04]) + b"stereo", "stereo"),
        (bytes([0x48 | 0x01]) + b"odd", "malformed"),
        (bytes([0x48 | 0x03, 0x00]), "malformed"),
        (bytes([0x48 | 0x03, 0x07]) + b"x" * 20, "malformed"),  # 7 × 20 ms > 120 ms
    ],
)
def test_invalid_packets_are_refused_before_libopus(packet: bytes, kind: str) -> None:
    with pytest.raises(OpusPacketError) as info:
        validate_packet(packet)
    assert info.value.kind == kind
    dec = OpusDecoder()
    with pytest.raises(OpusPacketError):
        dec.decode(packet)
    with pytest.raises(OpusPacketError):
        dec.decode_int16(packet)
    assert dec.packets_rejected == 2 and dec.packets_decoded == 0


def test_packets_libopus_refuses_become_our_error() -> None:
    # Code 3, one 20 ms frame, padding flag set with a padding length larger than the packet.
    packet = bytes([0x48 | 0x03, 0x41, 0xFF, 0xFF, 0x10])
    with pytest.raises(OpusPacketError) as info:
        OpusDecoder().decode(packet)
    assert info.value.kind == "undecodable"


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=0, max_size=1400))
def test_random_bytes_never_raise_anything_but_our_error(packet: bytes) -> None:
    dec = OpusDecoder()
    for decode in (dec.decode, dec.decode_int16):
        try:
            out = decode(packet)
        except OpusPacketError:
            continue
        assert out.ndim == 1 and 0 < out.size <= 1920


def test_decoder_survives_garbage_between_good_packets(packets16: list[bytes]) -> None:
    rng = np.random.default_rng(3)
    dec = OpusDecoder()
    good = 0
    for i, p in enumerate(packets16):
        if i % 5 == 0:
            with contextlib.suppress(OpusPacketError):
                dec.decode(rng.integers(0, 256, rng.integers(1, 200), dtype=np.uint8).tobytes())
        assert dec.decode(p).size == 320
        good += 1
    assert dec.packets_decoded >= good


# --- concealment --------------------------------------------------------------------------------------


def log_spectral_distance(x: np.ndarray, y: np.ndarray) -> float:
    w = np.hanning(x.size)
    fx = np.log10(np.abs(np.fft.rfft(x * w)) ** 2 + 1e-8)
    fy = np.log10(np.abs(np.fft.rfft(y * w)) ** 2 + 1e-8)
    return float(np.sqrt(np.mean((10 * (fx - fy)) ** 2)))


def test_conceal_shapes_and_recovery(packets16: list[bytes]) -> None:
    dec = OpusDecoder()
    assert dec.conceal(0).size == 0
    for p in packets16[:30]:
        dec.decode(p)
    gap = dec.conceal(3)
    assert gap.dtype == np.float32 and gap.size == 3 * 320
    assert dec.frames_concealed == 3
    # An invalid "next packet" falls back to plain concealment instead of raising.
    assert dec.conceal(1, next_packet=b"").size == 320
    assert dec.decode(packets16[34]).size == 320


def test_concealment_resembles_the_lost_speech() -> None:
    """PLC continues the voice; in-band FEC from the next packet rebuilds the lost frame better."""
    speech = espeak(TEXT)
    pcm = (speech * 32767).astype(np.int16)
    enc = opuslib.Encoder(16_000, 1, "voip")  # a client with in-band FEC on, as WebRTC-style senders do
    enc.bitrate = 24_000
    opus_enc.encoder_ctl(enc.encoder_state, opus_ctl.set_inband_fec, 1)
    opus_enc.encoder_ctl(enc.encoder_state, opus_ctl.set_packet_loss_perc, 20)
    packets = [enc.encode(pcm[i : i + 320].tobytes(), 320) for i in range(0, pcm.size - 320, 320)]
    ref_dec = OpusDecoder()
    reference = np.concatenate([ref_dec.decode(p) for p in packets])
    distances: dict[str, list[float]] = {"plc": [], "fec": [], "silence": []}
    for lost in range(20, len(packets) - 2, 3):
        truth = reference[lost * 320 : (lost + 1) * 320]
        if np.sqrt(np.mean(truth**2)) < 0.02:
            continue  # only frames where there is speech to lose
        for mode in ("plc", "fec"):
            dec = OpusDecoder()
            for p in packets[:lost]:
                dec.decode(p)
            filled = dec.conceal(1, next_packet=packets[lost + 1] if mode == "fec" else None)
            distances[mode].append(log_spectral_distance(filled, truth))
        distances["silence"].append(log_spectral_distance(np.full(320, 1e-5, np.float32), truth))
    median = {k: float(np.median(v)) for k, v in distances.items()}
    assert len(distances["plc"]) >= 20
    assert median["plc"] < median["silence"] / 3
    assert median["fec"] < median["plc"]
