"""Test speech: English sentences spoken by espeak-ng, as 16 kHz float32 mono (cached per text)."""

from __future__ import annotations

import functools
import hashlib
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

_CACHE = Path(tempfile.gettempdir()) / "duplex-test-speech"


@functools.lru_cache(maxsize=64)
def espeak(text: str, rate: int = 16_000, wpm: int = 150, voice: str = "en-us") -> np.ndarray:
    """Speak ``text`` with espeak-ng and return float32 mono audio at ``rate``."""
    _CACHE.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(f"{voice}|{wpm}|{text}".encode()).hexdigest()[:16]
    wav = _CACHE / f"{key}.wav"
    if not wav.exists():
        tmp = wav.with_suffix(".tmp.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(tmp), text], check=True)
        tmp.rename(wav)
    audio, sr = sf.read(wav, dtype="float32", always_2d=False)
    if sr != rate:
        audio = soxr.resample(audio, sr, rate)
    return np.ascontiguousarray(audio, dtype=np.float32)


def with_silence(audio: np.ndarray, before_s: float, after_s: float, rate: int = 16_000) -> np.ndarray:
    """Pad ``audio`` with digital silence before and after."""
    return np.concatenate(
        [np.zeros(int(before_s * rate), np.float32), audio, np.zeros(int(after_s * rate), np.float32)]
    )


def word_edits(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edits, reference words) after lower-casing and dropping punctuation."""

    def words(s: str) -> list[str]:
        return "".join(c.lower() if c.isalnum() or c.isspace() else " " for c in s).split()

    ref, hyp = words(reference), words(hypothesis)
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[len(hyp)], len(ref)


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word error rate after lower-casing and dropping punctuation."""
    edits, words = word_edits(reference, hypothesis)
    return edits / max(1, words)
