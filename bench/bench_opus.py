"""Input-path decode throughput: PacketFramer + OpusDecoder against a bare opuslib decode loop.

Real speech (espeak-ng, ~10 s) is encoded to 16 kHz / 20 ms Opus packets, length-prefixed and cut into
WebSocket-like frames (one packet, several, or a packet split across frames). Both loops decode the same
packets on one pinned core; the best of several interleaved rounds is kept (the machine may be shared).

Usage: ``.venv/bin/python bench/bench_opus.py [--rounds N]``. Prints a table, then one ``RESULT`` line.
"""

# ruff: noqa: E402  (thread limits must be set before numpy is imported)
from __future__ import annotations

import os

# One thread everywhere, before numpy loads its BLAS.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import ctypes
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import opuslib
import opuslib.api.decoder as opus_dec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_model

from core.audio.framing import PacketFramer, pack_packets
from core.audio.opus import OpusDecoder, OpusEncoder
from tests.speech import espeak

RATE = 16_000
FRAME = 320  # 20 ms at 16 kHz
PACKETS_PER_STREAM_S = 50
SENTENCES = [
    "Good morning, I would like to book a table for two people tonight.",
    "Could you tell me how long the drive to the airport usually takes?",
    "The weather looks fine, but bring an umbrella just in case it rains.",
]


def pin_to_one_core() -> str:
    """Pin this process to one CPU (the first it may use); return which, for the report."""
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"cpu {cpu}"
    return "not pinned (no sched_setaffinity)"


def make_stream() -> tuple[list[bytes], list[bytes], float]:
    """(packets, websocket frames, audio seconds) of real speech encoded like a browser would."""
    speech = np.concatenate([espeak(s) for s in SENTENCES])
    enc = OpusEncoder(RATE, application="voip", bitrate=24_000)
    packets = enc.encode(speech) + enc.flush()
    stream = pack_packets(packets)
    # Frames of 0.3..2.5 packets' worth of bytes: whole packets, several per frame, and splits.
    rng = np.random.default_rng(0)
    mean = len(stream) / len(packets)
    frames, pos = [], 0
    while pos < len(stream):
        size = max(1, int(mean * rng.uniform(0.3, 2.5)))
        frames.append(stream[pos : pos + size])
        pos += size
    return packets, frames, len(packets) * FRAME / RATE


def run_ours(frames: list[bytes], out_int16: bool = False) -> int:
    framer, dec = PacketFramer(), OpusDecoder(RATE)
    decode = dec.decode_int16 if out_int16 else dec.decode
    n = 0
    for frame in frames:
        for packet in framer.feed(frame):
            decode(packet)
            n += 1
    return n


def run_bare(packets: list[bytes]) -> int:
    dec = opuslib.Decoder(RATE, 1)
    for packet in packets:
        dec.decode(packet, FRAME)
    return len(packets)


def run_floor(packets: list[bytes]) -> int:
    """libopus through ctypes into one reused buffer: no validation, no framing, no copy out."""
    dec = opuslib.Decoder(RATE, 1)
    buf = (ctypes.c_float * 1920)()
    ptr = ctypes.cast(buf, ctypes.POINTER(ctypes.c_float))
    fn, state = opus_dec.libopus_decode_float, dec.decoder_state
    for packet in packets:
        fn(state, packet, len(packet), ptr, 1920, 0)
    return len(packets)


def best_time(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    """Seconds for ``repeats`` calls of ``fn`` (one timing) and the packets they decoded."""
    start = time.perf_counter()
    n = sum(fn() for _ in range(repeats))
    return time.perf_counter() - start, n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (best kept)")
    parser.add_argument("--repeats", type=int, default=5, help="passes over the stream per timing")
    args = parser.parse_args()
    pinned = pin_to_one_core()
    packets, frames, audio_s = make_stream()
    cases: dict[str, Callable[[], int]] = {
        "framer + OpusDecoder.decode (float32)": lambda: run_ours(frames),
        "framer + OpusDecoder.decode_int16": lambda: run_ours(frames, out_int16=True),
        "bare opuslib.Decoder.decode (int16)": lambda: run_bare(packets),
        "libopus floor (ctypes, no checks)": lambda: run_floor(packets),
    }
    for fn in cases.values():  # warm-up: imports, caches, page faults
        fn()
    best = dict.fromkeys(cases, float("inf"))
    counts = dict.fromkeys(cases, 0)
    for _ in range(args.rounds):
        for name, fn in cases.items():
            seconds, n = best_time(fn, args.repeats)
            if seconds < best[name]:
                best[name], counts[name] = seconds, n
    pps = {name: counts[name] / best[name] for name in cases}

    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cpus, python {platform.python_version()}, pinned to {pinned}"
    )
    print(f"stream: {len(packets)} packets ({audio_s:.1f} s of espeak speech, 16 kHz Opus, 24 kbit/s voip),")
    print(
        f"        {len(frames)} WebSocket-like frames; best of {args.rounds} rounds x {args.repeats} passes"
    )
    print()
    print(f"{'decoder':40} {'packets/s':>11} {'us/packet':>10} {'realtime x':>11} {'streams/core':>13}")
    for name in cases:
        print(
            f"{name:40} {pps[name]:11.0f} {1e6 / pps[name]:10.2f} "
            f"{pps[name] * FRAME / RATE:11.0f} {int(pps[name] / PACKETS_PER_STREAM_S):13d}"
        )
    ours, bare = pps["framer + OpusDecoder.decode (float32)"], pps["bare opuslib.Decoder.decode (int16)"]
    ratio = ours / bare
    streams = int(ours / PACKETS_PER_STREAM_S)
    print()
    print(
        f"ratio ours/bare = {ratio:.2f} (target >= 0.8); one core sustains ~{streams} concurrent 16 kHz streams"
    )
    print(
        f"RESULT ratio={ratio:.2f} streams_per_core={streams} ours_pps={ours:.0f} bare_pps={bare:.0f} "
        f"ours_us_per_packet={1e6 / ours:.2f} bare_us_per_packet={1e6 / bare:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
