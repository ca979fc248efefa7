"""The wire packet stream ``[uint16 little-endian length][Opus packet]``…: framing, packing, base64, detection.

A binary WebSocket frame carries zero or more whole or partial packets; :class:`PacketFramer` turns a
sequence of frames back into packets. This module is pure Python (no libopus), so the gateway can use it.

Error policy of :class:`PacketFramer` (the stream is reliable and ordered, so a bad length means a buggy
client or a stream that is not Opus at all):

- A length of 0 or above ``max_packet_bytes`` (1275, one 20 ms Opus frame at most) is recorded as a
  :class:`FramingError` (``kind="bad_length"``); the rest of that frame is discarded and counted.
- The framer resynchronises at the next frame boundary: the next :meth:`PacketFramer.feed` starts a new
  packet. Every client that writes whole packets per frame (the browser demo does) recovers exactly.
- After ``max_bad_frames`` frames in a row that hit a bad length without a good packet in between, the
  stream is *broken*: one ``kind="broken"`` error is recorded, every later byte is discarded (and
  counted) and :attr:`PacketFramer.broken` stays true until :meth:`PacketFramer.reset`.
- The parser never raises: errors are records, taken with :meth:`PacketFramer.take_errors`, so packets
  parsed before an error in the same frame are never lost.
"""

from __future__ import annotations

import base64
import binascii
import collections
from collections.abc import Iterable
from typing import Final, Literal

from core.audio.errors import FramingError

#: Largest packet on the wire: one 20 ms Opus frame is at most 1275 bytes (RFC 6716 §3.4, R2).
MAX_PACKET_BYTES: Final = 1275
#: Bytes of the little-endian length prefix.
HEADER_BYTES: Final = 2
#: Longest Opus packet duration, in 48 kHz samples (120 ms, RFC 6716 §3.2.5).
MAX_PACKET_SAMPLES_48K: Final = 5760

#: Returned by :func:`opus_packet_samples_48k` for a packet whose TOC/frame-count structure is invalid.
PACKET_MALFORMED: Final = -1
#: Returned by :func:`opus_packet_samples_48k` for a stereo packet (our streams are mono).
PACKET_STEREO: Final = -2

StreamFormat = Literal["opus", "pcm16", "unknown"]

# Frame duration (48 kHz samples) of each TOC configuration (RFC 6716 §3.1, table 2):
# 0-11 SILK NB/MB/WB 10/20/40/60 ms, 12-15 hybrid SWB/FB 10/20 ms, 16-31 CELT 2.5/5/10/20 ms.
_FRAME_SAMPLES_48K: Final = (480, 960, 1920, 2880) * 3 + (480, 960) * 2 + (120, 240, 480, 960) * 4


def opus_packet_samples_48k(packet: bytes) -> int:
    """Duration of a mono Opus packet in 48 kHz samples, from its TOC byte and frame-count code.

    Returns :data:`PACKET_MALFORMED` for an empty packet, a frame-count structure RFC 6716 §3.2 forbids
    or a duration over 120 ms, and :data:`PACKET_STEREO` for a stereo packet. A few byte checks only:
    the payload itself is not inspected (libopus decodes random payloads as noise).
    """
    n = len(packet)
    if n == 0:
        return PACKET_MALFORMED
    toc = packet[0]
    if toc & 0x04:
        return PACKET_STEREO
    frame = _FRAME_SAMPLES_48K[toc >> 3]
    code = toc & 0x03
    if code == 0:
        return frame if n - 1 <= MAX_PACKET_BYTES else PACKET_MALFORMED
    if code == 1:
        # Two frames of equal size: the payload splits evenly.
        return 2 * frame if (n - 1) & 1 == 0 and n - 1 <= 2 * MAX_PACKET_BYTES else PACKET_MALFORMED
    if n < 2:
        return PACKET_MALFORMED
    if code == 2:
        # Two frames; the first one's size is coded in one or two bytes and must fit in the packet.
        first, header = packet[1], 2
        if first >= 252:
            if n < 3:
                return PACKET_MALFORMED
            first, header = first + 4 * packet[2], 3
        rest = n - header - first
        return 2 * frame if 0 <= rest <= MAX_PACKET_BYTES and first <= MAX_PACKET_BYTES else PACKET_MALFORMED
    # Code 3: a frame-count byte; at least one frame and at most 120 ms in all.
    count = packet[1] & 0x3F
    total = count * frame
    return total if count and total <= MAX_PACKET_SAMPLES_48K else PACKET_MALFORMED


class PacketFramer:
    """Incremental parser of one length-prefixed packet stream (see the module doc for the error policy).

    Buffers at most one partial packet (``HEADER_BYTES + max_packet_bytes`` bytes). Not thread-safe:
    one framer per stream.
    """

    #: Error records kept for :meth:`take_errors`; older ones are dropped (still counted in ``error_count``).
    MAX_KEPT_ERRORS: Final = 32

    def __init__(self, max_packet_bytes: int = MAX_PACKET_BYTES, max_bad_frames: int = 4) -> None:
        if not 1 <= max_packet_bytes <= 0xFFFF:
            raise ValueError("max_packet_bytes must be in 1..65535")
        if max_bad_frames < 1:
            raise ValueError("max_bad_frames must be >= 1")
        self.max_packet_bytes = max_packet_bytes
        self.max_bad_frames = max_bad_frames
        self._buf = bytearray()
        self._errors: collections.deque[FramingError] = collections.deque(maxlen=self.MAX_KEPT_ERRORS)
        self.reset()

    def reset(self) -> None:
        """Forget the partial packet, the errors and the counters; a broken stream becomes usable again."""
        self._buf.clear()
        self._errors.clear()
        self._bad_streak = 0
        #: True once the stream is broken (see the module doc); all further input is discarded.
        self.broken = False
        #: Bytes fed so far (the stream offset of the next byte).
        self.bytes_in = 0
        #: Bytes thrown away: the rest of a frame after a bad length, truncated tails, a broken stream.
        self.bytes_discarded = 0
        #: Complete packets returned so far.
        self.packets_out = 0
        #: Errors recorded so far (all of them, including those no longer kept).
        self.error_count = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete packet held until the next frame (0 when the stream is at a boundary)."""
        return len(self._buf)

    def take_errors(self) -> list[FramingError]:
        """Return and forget the error records since the last call (oldest first)."""
        errors = list(self._errors)
        self._errors.clear()
        return errors

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add one frame of stream bytes; return the packets it completes, in order. Never raises."""
        if type(data) is not bytes:
            data = bytes(data)
        n = len(data)
        start = self.bytes_in
        self.bytes_in += n
        if self.broken:
            self.bytes_discarded += n
            return []
        packets: list[bytes] = []
        errors_before = self.error_count
        pos = self._complete_pending(data, packets, start) if self._buf else 0
        limit = self.max_packet_bytes
        while n - pos >= HEADER_BYTES:
            length = data[pos] | (data[pos + 1] << 8)
            if length == 0 or length > limit:
                self._bad_length(length, start + pos, n - pos, delivered=bool(packets))
                pos = n
                break
            end = pos + HEADER_BYTES + length
            if end > n:
                break
            packets.append(data[pos + HEADER_BYTES : end])
            pos = end
        if pos < n:
            self._buf += data[pos:]
        if packets:
            self.packets_out += len(packets)
            if self.error_count == errors_before:
                self._bad_streak = 0
        return packets

    def flush(self) -> FramingError | None:
        """End of stream: drop a partial packet and return (and record) a ``truncated`` error, else None."""
        if not self._buf:
            return None
        held = len(self._buf)
        self._buf.clear()
        self.bytes_discarded += held
        return self._record(
            FramingError(
                f"stream ended inside a packet: {held} byte(s) of an incomplete packet dropped",
                kind="truncated",
                offset=self.bytes_in - held,
            )
        )

    def _complete_pending(self, data: bytes, packets: list[bytes], start: int) -> int:
        """Complete the packet held from earlier frames; return how many bytes of ``data`` it used."""
        buf = self._buf
        pos = 0
        if len(buf) < HEADER_BYTES:
            if not data:
                return 0
            buf.append(data[0])
            pos = 1
            length = buf[0] | (buf[1] << 8)
            if length == 0 or length > self.max_packet_bytes:
                held = len(buf) - 1
                buf.clear()
                self.bytes_discarded += held
                self._bad_length(length, start - held, len(data), delivered=False)
                return len(data)
        length = buf[0] | (buf[1] << 8)
        need = HEADER_BYTES + length - len(buf)
        if len(data) - pos < need:
            buf += data[pos:]
            return len(data)
        buf += data[pos : pos + need]
        packets.append(bytes(buf[HEADER_BYTES:]))
        buf.clear()
        return pos + need

    def _bad_length(self, length: int, offset: int, discarded: int, *, delivered: bool) -> None:
        self.bytes_discarded += discarded
        self._bad_streak = 1 if delivered else self._bad_streak + 1
        what = "zero" if length == 0 else f"{length} > {self.max_packet_bytes}"
        self._record(
            FramingError(
                f"bad packet length ({what}) at stream offset {offset}; {discarded} byte(s) of the frame "
                "dropped, resynchronising at the next frame",
                kind="bad_length",
                offset=offset,
            )
        )
        if self._bad_streak >= self.max_bad_frames:
            self.broken = True
            self._record(
                FramingError(
                    f"{self._bad_streak} frames in a row with bad packet lengths: the stream is not a "
                    "length-prefixed Opus stream; all further input is discarded",
                    kind="broken",
                    offset=offset,
                )
            )

    def _record(self, error: FramingError) -> FramingError:
        self.error_count += 1
        self._errors.append(error)
        return error


def pack_packets(packets: Iterable[bytes]) -> bytes:
    """Length-prefix and concatenate packets; raises :class:`FramingError` for an empty or oversized one."""
    out = bytearray()
    for i, packet in enumerate(packets):
        n = len(packet)
        if n == 0 or n > MAX_PACKET_BYTES:
            raise FramingError(
                f"packet {i} has {n} bytes; a packet must have 1..{MAX_PACKET_BYTES}", kind="bad_length"
            )
        out += n.to_bytes(2, "little")
        out += packet
    return bytes(out)


def unpack_packets(data: bytes) -> list[bytes]:
    """Split a complete packet stream (an HTTP body, a file); any bad length or truncated tail raises."""
    packets: list[bytes] = []
    pos, n = 0, len(data)
    while pos < n:
        if n - pos < HEADER_BYTES:
            raise FramingError(
                f"stream ends inside a length prefix at offset {pos}", kind="truncated", offset=pos
            )
        length = data[pos] | (data[pos + 1] << 8)
        if length == 0 or length > MAX_PACKET_BYTES:
            raise FramingError(
                f"bad packet length {length} at offset {pos} (must be 1..{MAX_PACKET_BYTES})",
                kind="bad_length",
                offset=pos,
            )
        end = pos + HEADER_BYTES + length
        if end > n:
            raise FramingError(
                f"stream ends inside a packet at offset {pos} ({n - pos - HEADER_BYTES} of {length} bytes)",
                kind="truncated",
                offset=pos,
            )
        packets.append(data[pos + HEADER_BYTES : end])
        pos = end
    return packets


def packets_to_b64(packets: Iterable[bytes]) -> str:
    """Base64 (standard alphabet, padded) of the packed stream, for JSON bodies over HTTP."""
    return base64.b64encode(pack_packets(packets)).decode("ascii")


def b64_to_packets(text: str | bytes, *, max_bytes: int | None = None) -> list[bytes]:
    """Decode base64 of a packed stream into packets; :class:`FramingError` on bad base64 or framing.

    ``max_bytes`` bounds the decoded size (checked before decoding, from the base64 length).
    """
    if isinstance(text, str):
        try:
            raw = text.encode("ascii")
        except UnicodeEncodeError:
            raise FramingError(
                "audio is not valid base64 (non-ASCII characters)", kind="bad_base64"
            ) from None
    else:
        raw = bytes(text)
    raw = b"".join(raw.split())  # tolerate line breaks (MIME-style wrapping)
    if max_bytes is not None and len(raw) // 4 * 3 > max_bytes:
        raise FramingError(f"audio is larger than {max_bytes} bytes", kind="too_large")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FramingError(f"audio is not valid base64: {exc}", kind="bad_base64") from None
    return unpack_packets(data)


# --- stream format detection -------------------------------------------------------------------------

#: Packets that must chain consistently before a stream is called Opus.
DETECT_MIN_PACKETS: Final = 3
#: PCM16 samples needed before a stream that is not Opus is called PCM16 (20 ms at 16 kHz).
DETECT_MIN_PCM_SAMPLES: Final = 320
_DETECT_MAX_PACKETS: Final = 16
_DETECT_MAX_SAMPLES: Final = 8192


def _opus_chain(data: bytes) -> int:
    """Consistent Opus packets at the start of ``data``: their count, or -1 if the chain breaks.

    Consistent: every length in 1..1275, every packet mono with a valid TOC structure, all of the same
    duration (an encoder keeps its frame size; a misread PCM stream does not).
    """
    pos, count, duration, n = 0, 0, 0, len(data)
    while count < _DETECT_MAX_PACKETS and n - pos >= HEADER_BYTES:
        length = data[pos] | (data[pos + 1] << 8)
        if length == 0 or length > MAX_PACKET_BYTES:
            return -1
        end = pos + HEADER_BYTES + length
        if end > n:
            # An incomplete packet can still be checked by its TOC byte.
            if opus_packet_samples_48k(data[pos + HEADER_BYTES : pos + HEADER_BYTES + 1]) < 0:
                return -1
            break
        samples = opus_packet_samples_48k(data[pos + HEADER_BYTES : end])
        if samples < 0 or (duration and samples != duration):
            return -1
        duration = samples
        count += 1
        pos = end
    return count


# High bytes of int16 samples in [-8192, 8191] (below -12 dBFS): 0x00..0x1F and 0xE0..0xFF.
_QUIET_HIGH_BYTE: Final = bytes(1 if h < 0x20 or h >= 0xE0 else 0 for h in range(256))


def _pcm_speech_likeness(data: bytes) -> tuple[int, float, float]:
    """(samples, fraction of samples below -12 dBFS, fraction of high bytes that are 0x00/0xFF).

    Speech PCM16 is mostly quiet (>90% of samples under -12 dBFS, high bytes near 0x00/0xFF);
    compressed Opus bytes are close to uniform (about 25%). Pure bytes arithmetic: no numpy here, so
    the gateway can import this module.
    """
    high = data[1 : 2 * _DETECT_MAX_SAMPLES : 2]
    n = len(high)
    if n == 0:
        return 0, 0.0, 0.0
    quiet = high.translate(_QUIET_HIGH_BYTE).count(1) / n
    near_zero = (high.count(0) + high.count(0xFF)) / n
    return n, quiet, near_zero


def detect_stream_format(first_bytes: bytes | bytearray | memoryview) -> StreamFormat:
    """Guess whether a client's first bytes are an Opus packet stream or raw PCM16 LE speech.

    ``"opus"``: at least :data:`DETECT_MIN_PACKETS` length-prefixed packets chain exactly with valid mono
    TOC bytes and one frame duration, and the bytes do not read as quiet PCM. ``"pcm16"``: not such a
    chain, and at least :data:`DETECT_MIN_PCM_SAMPLES` samples that read as speech-level PCM (mostly
    under -12 dBFS). ``"unknown"``: not enough bytes yet, or neither (loud noise, a foreign format).

    How a caller should use it: keep every byte received until the format is decided, call this again
    on the whole prefix each time a frame arrives while it answers ``"unknown"``, and decode the kept
    bytes once it answers. A wrong guess is cheap if the caller keeps the first second of raw bytes: if
    the Opus path then reports a framing or packet error within that second, call this again on the kept
    bytes (plus newer ones) and restart decoding from the start with the new answer. If it still answers
    ``"unknown"`` after about a second of bytes, treat the stream as ``"pcm16"`` (an Opus stream would
    have been recognised after three packets) or close it with a clear error.
    """
    data = bytes(first_bytes)
    chain = _opus_chain(data)
    samples, quiet, near_zero = _pcm_speech_likeness(data)
    if chain >= DETECT_MIN_PACKETS:
        # Near-silent PCM of small positive samples can chain as tiny packets; real Opus never reads as
        # all-quiet samples with 0x00/0xFF high bytes, so that case goes to PCM.
        if samples >= DETECT_MIN_PCM_SAMPLES and quiet > 0.98 and near_zero > 0.95:
            return "pcm16"
        return "opus"
    if samples >= DETECT_MIN_PCM_SAMPLES and quiet >= 0.8:
        return "pcm16"
    return "unknown"
