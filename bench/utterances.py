"""The shared benchmark corpus for the ASR latency work: short spoken questions and commands.

Each phrase is spoken by two voices, espeak-ng (``tests.speech.espeak``) and the embedded Piper voice
(24 kHz, resampled to 16 kHz), so a result does not hinge on one synthesizer. Some phrases are two halves
with a stretch of digital silence between them, like a speaker who stops to think mid-sentence: that is
where a turn detector ends a turn too early and where an incremental ASR must not lose words. Audio is
cached under tmp/bench-utterances/ (keyed by voice and text), so every run sees the same samples.

Usage: ``.venv/bin/python bench/utterances.py`` prints the corpus with durations.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RATE = 16_000
CACHE = ROOT / "tmp" / "bench-utterances"
VOICES = ("espeak", "piper")
EDGE_S = 0.15  # digital silence before and after each utterance, as a VAD segment would keep

#: (first part, second part or None, pause in seconds between them). Phrases Whisper base hears exactly.
#: A pause comes where the words so far do not make a sentence ("I would like to order ... a large pizza"):
#: a pause after a complete clause ("Tell me something interesting. ... About the ocean.") is a finished
#: turn by any listener's judgement, so it would measure nothing about cutting a speaker off.
PHRASES: tuple[tuple[str, str | None, float], ...] = (
    ("What day is it today?", None, 0.0),
    ("Tell me a joke.", None, 0.0),
    ("How are you today?", None, 0.0),
    ("What is the capital of France?", None, 0.0),
    ("Good morning, how are you today?", None, 0.0),
    ("Can you recommend a good book to read?", None, 0.0),
    ("How long does it take to get to the airport?", None, 0.0),
    ("Please turn off the lights in the kitchen and lock the front door.", None, 0.0),
    ("Tomorrow morning I have an important meeting with my manager, so please wake me up early.", None, 0.0),
    (
        "I would like to know the difference between a crocodile and an alligator, "
        "and which one is more dangerous.",
        None,
        0.0,
    ),
    ("I would like to order", "a large pizza with cheese.", 0.6),
    ("Can you tell me", "how far away the moon is?", 0.5),
    ("Tell me something interesting about", "the ocean.", 0.4),
    ("Please remind me to", "call my mother tomorrow.", 0.8),
    ("Can you play", "some relaxing music?", 0.7),
    ("What is the best way", "to learn a new language?", 0.6),
    ("How do I get", "to the museum from here?", 0.5),
    (
        "Before we start the meeting, could you please summarize",
        "the main points from the report we discussed yesterday?",
        0.5,
    ),
)


@dataclass(frozen=True)
class Utterance:
    """One spoken sentence: 16 kHz float32 mono, with where its deliberate pauses are."""

    text: str
    audio: np.ndarray = field(repr=False, compare=False)
    #: (start_s, length_s) of each deliberate pause of digital silence inside the sentence.
    pauses: tuple[tuple[float, float], ...]
    voice: str

    @property
    def duration(self) -> float:
        """Length of the audio in seconds."""
        return len(self.audio) / RATE


@cache
def _piper():  # type: ignore[no-untyped-def]
    from core.models.embedded import paths
    from core.models.piper import PiperTTS

    found = paths(ROOT / "data" / "models")
    return PiperTTS(found.piper_onnx, found.piper_json)


def _speak(text: str, voice: str) -> np.ndarray:
    """``text`` spoken by ``voice``, edge silence trimmed; cached as a 16 kHz wav."""
    key = hashlib.sha1(f"{voice}|{text}".encode()).hexdigest()[:16]
    wav = CACHE / f"{voice}-{key}.wav"
    if not wav.exists():
        if voice == "espeak":
            from tests.speech import espeak

            audio = espeak(text)
        elif voice == "piper":
            import soxr

            tts = _piper()
            audio = soxr.resample(np.concatenate(list(tts.synthesize(text))), tts.sample_rate, RATE)
        else:
            raise ValueError(f"unknown voice {voice!r}; known: {VOICES}")
        loud = np.flatnonzero(np.abs(audio) > 1e-3)  # both voices start and end with near-silence
        audio = audio[loud[0] : loud[-1] + 1] if loud.size else audio
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = wav.with_suffix(".tmp.wav")
        sf.write(tmp, np.asarray(audio, np.float32), RATE, subtype="FLOAT")
        tmp.replace(wav)
    audio, _ = sf.read(wav, dtype="float32", always_2d=False)
    return np.ascontiguousarray(audio, dtype=np.float32)


@cache
def utterances() -> list[Utterance]:
    """The corpus: every phrase in every voice, 1–8 s each, in a fixed order."""
    edge = np.zeros(int(EDGE_S * RATE), np.float32)
    out = []
    for voice in VOICES:
        for first, second, pause_s in PHRASES:
            parts, pauses = [edge, _speak(first, voice)], []
            text = first
            if second is not None:
                start = sum(len(p) for p in parts) / RATE
                pauses.append((start, pause_s))
                parts += [np.zeros(int(pause_s * RATE), np.float32), _speak(second, voice)]
                text = f"{first} {second}"
            audio = np.concatenate([*parts, edge])
            out.append(Utterance(text, audio, tuple(pauses), voice))
    return out


def main() -> None:
    """Print the corpus with durations."""
    corpus = utterances()
    for u in corpus:
        pauses = " ".join(f"pause {s:.2f}+{n:.2f}s" for s, n in u.pauses)
        print(f"{u.voice:7s} {u.duration:5.2f} s  {u.text}  {pauses}")
    total = sum(u.duration for u in corpus)
    paused = sum(1 for u in corpus if u.pauses)
    print(f"{len(corpus)} utterances, {paused} with a pause, {total:.1f} s in all")


if __name__ == "__main__":
    main()
