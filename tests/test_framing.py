"""Length-prefixed packet framing: exact reassembly, bounded buffering, error policy, base64, detection."""

from __future__ import annotations

import base64
import itertools
import struct
import subprocess
from pathlib import Path

import numpy as np
import opuslib
import pytest
import soundfile as sf
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st

from core.audio.errors import FramingError
from core.audio.framing import (
    HEADER_BYTES,
    MAX_PACKET_BYTES,
    PACKET_MALFORMED,
    PACKET_STEREO,
    PacketFramer,
    b64_to_packets,
    detect_stream_format,
    opus_packet_samples_48k,
    pack_packets,
    packets_to_b64,
    unpack_packets,
)
from tests.speech import espeak, with_silence

packet_st = st.binary(min_size=1, max_size=MAX_PACKET_BYTES)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """Split ``data`` at the given offsets (any order, duplicates allowed: empty frames)."""
    bounds = [0, *sorted(p % (len(data) + 1) for p in points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- reassembly ---------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(packet_st, max_size=12), st.lists(st.integers(min_value=0), max_size=30))
def test_any_split_reassembles_exactly(packets: list[bytes], points: list[int]) -> None:
    framer = PacketFramer()
    out: list[bytes] = []
    for frame in cut(pack_packets(packets), points):
        out += framer.feed(frame)
        assert framer.pending_bytes <= HEADER_BYTES + MAX_PACKET_BYTES
    assert out == packets
    assert framer.pending_bytes == 0
    assert framer.flush() is None
    assert framer.error_count == 0 and framer.take_errors() == []
    assert framer.packets_out == len(packets)


def test_accepts_bytearray_and_memoryview() -> None:
    stream = pack_packets([b"\x48abc", b"\x48de"])
    framer = PacketFramer()
    assert framer.feed(bytearray(stream[:4])) == []
    assert framer.feed(memoryview(stream)[4:]) == [b"\x48abc", b"\x48de"]
    assert all(type(p) is bytes for p in PacketFramer().feed(memoryview(stream)))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=8))
def test_random_bytes_never_raise_and_stay_bounded(frames: list[bytes]) -> None:
    framer = PacketFramer()
    delivered = 0
    for frame in frames:
        for packet in framer.feed(frame):
            assert 1 <= len(packet) <= MAX_PACKET_BYTES
            delivered += HEADER_BYTES + len(packet)
        assert framer.pending_bytes <= HEADER_BYTES + MAX_PACKET_BYTES
    framer.flush()
    assert framer.pending_bytes == 0
    assert all(isinstance(e, FramingError) for e in framer.take_errors())
    # Every byte is accounted for: delivered in a packet or counted as discarded.
    assert delivered + framer.bytes_discarded == framer.bytes_in == sum(map(len, frames))


# --- error policy -------------------------------------------------------------------------------------


def test_bad_length_keeps_earlier_packets_and_resyncs_at_next_frame() -> None:
    framer = PacketFramer()
    good = pack_packets([b"\x48one", b"\x48two"])
    frame = good + b"\x00\x00" + b"junk after the bad length"
    assert framer.feed(frame) == [b"\x48one", b"\x48two"]
    (error,) = framer.take_errors()
    assert error.kind == "bad_length" and error.offset == len(good)
    assert framer.bytes_discarded == len(frame) - len(good)
    assert framer.pending_bytes == 0
    # The next frame starts a new packet: the stream recovers exactly.
    assert framer.feed(pack_packets([b"\x48three"])) == [b"\x48three"]
    assert not framer.broken and framer.error_count == 1


def test_oversized_length_is_an_error_not_a_wait() -> None:
    framer = PacketFramer()
    assert framer.feed(struct.pack("<H", MAX_PACKET_BYTES + 1) + b"x" * 10) == []
    assert framer.pending_bytes == 0  # nothing buffered for a packet that can never be valid
    assert [e.kind for e in framer.take_errors()] == ["bad_length"]


def test_bad_length_split_across_frames_is_caught() -> None:
    framer = PacketFramer()
    assert framer.feed(b"\xff") == []
    assert framer.pending_bytes == 1
    assert framer.feed(b"\xff" + b"rest") == []
    assert [e.kind for e in framer.take_errors()] == ["bad_length"]
    assert framer.pending_bytes == 0 and framer.bytes_discarded == 6


def test_consecutive_bad_frames_break_the_stream_until_reset() -> None:
    framer = PacketFramer(max_bad_frames=3)
    for _ in range(3):
        assert framer.feed(b"\x00\x00\x01\x02") == []
    assert framer.broken
    kinds = [e.kind for e in framer.take_errors()]
    assert kinds == ["bad_length"] * 3 + ["broken"]
    # Broken: even valid packets are discarded and counted, with no new error records.
    good = pack_packets([b"\x48ok"])
    assert framer.feed(good) == []
    assert framer.take_errors() == []
    assert framer.bytes_discarded == 12 + len(good)
    framer.reset()
    assert not framer.broken and framer.feed(good) == [b"\x48ok"]


def test_good_frames_between_bad_ones_keep_the_stream_alive() -> None:
    framer = PacketFramer(max_bad_frames=2)
    good = pack_packets([b"\x48ok"])
    for _ in range(5):
        assert framer.feed(b"\x00\x00") == []
        assert framer.feed(good) == [b"\x48ok"]
    assert not framer.broken and framer.error_count == 5


def test_truncated_tail_is_reported_on_flush() -> None:
    framer = PacketFramer()
    stream = pack_packets([b"\x48whole", b"\x48cut short"])
    assert framer.feed(stream[:-3]) == [b"\x48whole"]
    assert framer.pending_bytes == HEADER_BYTES + len(b"\x48cut short") - 3
    error = framer.flush()
    assert error is not None and error.kind == "truncated"
    assert error.offset == len(pack_packets([b"\x48whole"]))
    assert framer.pending_bytes == 0
    assert framer.take_errors() == [error]
    assert framer.flush() is None


def test_kept_error_records_are_bounded() -> None:
    framer = PacketFramer(max_bad_frames=10**6)
    for _ in range(1000):
        framer.feed(b"\x00\x00")
    assert framer.error_count == 1000
    assert len(framer.take_errors()) == PacketFramer.MAX_KEPT_ERRORS


# --- packing and base64 -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, MAX_PACKET_BYTES + 1])
def test_pack_rejects_invalid_packet_sizes(size: int) -> None:
    with pytest.raises(FramingError, match=r"1\.\.1275"):
        pack_packets([b"\x48ok", b"x" * size])


@settings(max_examples=100, deadline=None)
@given(st.lists(packet_st, max_size=8))
def test_base64_round_trip(packets: list[bytes]) -> None:
    text = packets_to_b64(packets)
    assert base64.b64decode(text) == pack_packets(packets)
    assert b64_to_packets(text) == packets
    assert b64_to_packets(text.encode()) == packets


def test_base64_tolerates_line_breaks() -> None:
    text = packets_to_b64([b"\x48" * 100])
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    assert b64_to_packets(wrapped) == [b"\x48" * 100]


@pytest.mark.parametrize("text", ["not base64!", "AAA", "AA=A", "=AAA", "é"])
def test_bad_base64_is_a_clear_error(text: str) -> None:
    with pytest.raises(FramingError, match="base64") as info:
        b64_to_packets(text)
    assert info.value.kind == "bad_base64"


def test_base64_of_a_broken_stream_is_an_error() -> None:
    stream = pack_packets([b"\x48abc"])
    with pytest.raises(FramingError) as info:
        b64_to_packets(base64.b64encode(stream[:-1]))
    assert info.value.kind == "truncated"
    with pytest.raises(FramingError) as info:
        unpack_packets(stream + b"\x00\x00")
    assert info.value.kind == "bad_length"
    with pytest.raises(FramingError) as info:
        b64_to_packets(packets_to_b64([b"x" * 900] * 4), max_bytes=1000)
    assert info.value.kind == "too_large"


# --- TOC parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet", "samples"),
    [
        (bytes([9 << 3]) + b"x" * 40, 960),  # SILK WB 20 ms, one frame
        (bytes([11 << 3]), 2880),  # SILK WB 60 ms, empty frame (DTX)
        (bytes([16 << 3]) + b"x", 120),  # CELT NB 2.5 ms
        (bytes([(9 << 3) | 1]) + b"ab", 1920),  # code 1: two equal frames
        (bytes([(9 << 3) | 1]) + b"abc", PACKET_MALFORMED),  # code 1 with an odd payload
        (bytes([(9 << 3) | 2, 3]) + b"abcde", 1920),  # code 2: 3 + 2 bytes
        (bytes([(9 << 3) | 2, 9]) + b"abc", PACKET_MALFORMED),  # code 2: first frame overruns
        (bytes([(9 << 3) | 2, 252]), PACKET_MALFORMED),  # code 2: two-byte size cut off
        (bytes([(9 << 3) | 2]), PACKET_MALFORMED),
        (bytes([(9 << 3) | 3, 3]) + b"abc", 2880),  # code 3: three 20 ms frames
        (bytes([(9 << 3) | 3, 0]), PACKET_MALFORMED),  # code 3: zero frames
        (bytes([(9 << 3) | 3, 7]) + b"x" * 7, PACKET_MALFORMED),  # 140 ms > 120 ms
        (bytes([(9 << 3) | 4]) + b"x", PACKET_STEREO),
        (b"", PACKET_MALFORMED),
    ],
)
def test_opus_packet_samples(packet: bytes, samples: int) -> None:
    assert opus_packet_samples_48k(packet) == samples


# --- stream format detection --------------------------------------------------------------------------

TEXTS = [
    "Hello there, this is a test of the voice server.",
    "Seven silly snakes slithered south past the station.",
    "What time is it in Paris right now?",
]


def opus_packets(
    audio16k: np.ndarray, rate: int = 16_000, app: str = "voip", bitrate: int = 24_000
) -> list[bytes]:
    """Real Opus packets from libopus (as a browser would send): 20 ms frames of ``audio16k``."""
    audio = soxr.resample(audio16k, 16_000, rate) if rate != 16_000 else audio16k
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    enc = opuslib.Encoder(rate, 1, app)
    enc.bitrate = bitrate
    f = rate // 50
    return [enc.encode(pcm[i : i + f].tobytes(), f) for i in range(0, len(pcm) - f + 1, f)]


def ogg_opus_packets(path: Path) -> list[bytes]:
    """Audio packets of an Ogg Opus file (RFC 7845), skipping the two header packets."""
    data, pos, packets, partial = path.read_bytes(), 0, [], b""
    while pos < len(data):
        assert data[pos : pos + 4] == b"OggS"
        nsegs = data[pos + 26]
        lacing = data[pos + 27 : pos + 27 + nsegs]
        body = pos + 27 + nsegs
        for size in lacing:
            partial += data[body : body + size]
            body += size
            if size < 255:
                packets.append(partial)
                partial = b""
        pos = body
    return packets[2:]


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize(
    "encoder",
    [
        {"rate": 16_000, "app": "voip", "bitrate": 24_000},
        {"rate": 16_000, "app": "audio", "bitrate": 64_000},
        {"rate": 16_000, "app": "voip", "bitrate": 8_000},
        {"rate": 48_000, "app": "audio", "bitrate": 32_000},
    ],
)
@pytest.mark.parametrize("lead_silence", [0.0, 0.5])
def test_detects_real_opus_streams(text: str, encoder: dict, lead_silence: float) -> None:
    packets = opus_packets(with_silence(espeak(text), lead_silence, 0.0), **encoder)
    stream = pack_packets(packets)
    assert detect_stream_format(stream[:2]) == "unknown"
    assert detect_stream_format(pack_packets(packets[:3])) == "opus"
    # A prefix that ends inside the fourth packet, as a WebSocket frame might.
    assert detect_stream_format(stream[: len(pack_packets(packets[:3])) + 5]) == "opus"
    assert detect_stream_format(stream) == "opus"


def test_detects_opus_from_ffmpeg_libopus(tmp_path: Path) -> None:
    wav, ogg = tmp_path / "speech.wav", tmp_path / "speech.opus"
    sf.write(wav, with_silence(espeak(TEXTS[0]), 0.3, 0.0), 16_000)
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(wav), "-c:a", "libopus", "-b:a", "20k", str(ogg)],
        check=True,
        timeout=60,
    )
    packets = ogg_opus_packets(ogg)
    assert len(packets) > 50
    assert detect_stream_format(pack_packets(packets[:4])) == "opus"
    assert detect_stream_format(pack_packets(packets)) == "opus"


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("gain", [1.0, 0.1, 0.01])
@pytest.mark.parametrize("lead_silence", [0.0, 0.5])
def test_detects_real_pcm16_speech(text: str, gain: float, lead_silence: float) -> None:
    audio = with_silence(espeak(text), lead_silence, 0.0) * gain
    data = pcm16(audio)
    assert detect_stream_format(data[:20]) == "unknown"  # too few samples to say
    assert detect_stream_format(data[:640]) == "pcm16"  # one 20 ms frame
    assert detect_stream_format(data) == "pcm16"


def test_detects_pcm16_with_microphone_noise() -> None:
    rng = np.random.default_rng(0)
    audio = with_silence(espeak(TEXTS[1]), 0.5, 0.0)
    noisy = audio + rng.normal(0, 0.003, audio.size).astype(np.float32)
    assert detect_stream_format(pcm16(noisy)[:640]) == "pcm16"
    assert detect_stream_format(pcm16(noisy)) == "pcm16"


def test_digital_silence_is_pcm16() -> None:
    assert detect_stream_format(bytes(640)) == "pcm16"


def test_loud_noise_is_unknown() -> None:
    rng = np.random.default_rng(1)
    assert detect_stream_format(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()) == "unknown"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4000))
def test_detection_never_raises(data: bytes) -> None:
    assert detect_stream_format(data) in ("opus", "pcm16", "unknown")
