"""ASR accuracy and final-call latency on the shared corpus (bench/utterances.py): the ways to run Whisper base.

Methods: (a) transformers WhisperASR, the current baseline (always a padded 30 s window); (b) CT2WhisperASR
with the same 30 s window; (c) CT2WhisperASR fitting the window to the clip; (d) incremental: (c) run on
the audio so far every 0.5 s while the user speaks, and at the end the words the last two partials agree
on (less the last, which may be cut mid-word) are forced with ``transcribe_with_prefix``, so the final call
decodes only the tail. Latency is that of the final transcription call only (what the user waits for after
speaking); WER is the corpus's: all edits over all reference words.

Usage: ``.venv/bin/python bench/bench_asr.py [--ct2 DIR] [--threads N] [--only a,c] [-v]``.
Prints a markdown table, then one ``RESULT`` line.
"""

# ruff: noqa: E402  (sys.path must hold the repo root before project imports)
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_model
from utterances import RATE, Utterance, utterances

from core.models.base import Transcript
from tests.speech import word_error_rate

PARTIAL_EVERY_S = 0.5
Final = Callable[[Utterance], Transcript]


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation (tests/speech.py's normalisation)."""
    return "".join(c.lower() if c.isalnum() or c.isspace() else " " for c in text).split()


def edits(reference: str, hypothesis: str) -> int:
    """Word edits between the two texts."""
    return round(word_error_rate(reference, hypothesis) * max(1, len(words(reference))))


def agreed_prefix(previous: str, latest: str) -> str:
    """The words two partials agree on, less the last (it may be a word cut short), in ``latest``'s spelling."""
    count = 0
    for a, b in zip(words(previous), words(latest), strict=False):
        if a != b:
            break
        count += 1
    # Normalised words map one to one onto whitespace words unless punctuation stands alone; then give up.
    raw = latest.split()
    if len(raw) != len(words(latest)):
        return ""
    return " ".join(raw[: max(0, count - 1)])


def incremental(asr, forced: list[int]) -> Final:  # type: ignore[no-untyped-def]
    """Partials every 0.5 s of audio (untimed), then the timed final call with the agreed prefix forced."""

    def final(u: Utterance) -> Transcript:
        partials = [""]
        step = int(PARTIAL_EVERY_S * RATE)
        for end in range(step, len(u.audio), step):
            partials.append(asr.transcribe(u.audio[:end], "en").text)
        prefix = agreed_prefix(partials[-2], partials[-1]) if len(partials) > 1 else ""
        forced.append(len(prefix.split()))
        return timed(lambda: asr.transcribe_with_prefix(u.audio, prefix, "en"))

    return final


_last_ms: list[float] = []


def timed(call: Callable[[], Transcript]) -> Transcript:
    """Run ``call``, noting its wall time in ms."""
    start = time.perf_counter()
    out = call()
    _last_ms.append((time.perf_counter() - start) * 1000)
    return out


def run(
    methods: dict[str, tuple[str, Final]], corpus: list[Utterance], verbose: bool
) -> dict[str, dict[str, float]]:
    """Each utterance through every method in turn (so a busy spell on a shared machine hits all alike)."""
    errors, ms = dict.fromkeys(methods, 0), {key: list[float]() for key in methods}
    for u in corpus:
        for key, (name, final) in methods.items():
            _last_ms.clear()
            text = final(u).text
            ms[key] += _last_ms
            errors[key] += edits(u.text, text)
            if verbose and edits(u.text, text):
                print(f"  [{name}] {u.voice} {u.duration:.1f}s: {text!r} (ref {u.text!r})", flush=True)
    refs = sum(len(words(u.text)) for u in corpus)
    return {
        key: {
            "wer": errors[key] / refs,
            "p50": float(np.percentile(ms[key], 50)),
            "p95": float(np.percentile(ms[key], 95)),
        }
        for key in methods
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--whisper", default="data/models/whisper-base", help="transformers Whisper folder")
    parser.add_argument("--ct2", default="data/models/whisper-base-ct2", help="CTranslate2 Whisper folder")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for each model")
    parser.add_argument("--only", default="a,b,c,d", help="methods to run, e.g. c,d")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every mistranscribed utterance")
    args = parser.parse_args()
    only = set(args.only.split(","))
    corpus = utterances()
    methods: dict[str, tuple[str, Final]] = {}
    forced: list[int] = []
    if "a" in only:
        import torch
        import transformers

        from core.models.whisper import WhisperASR

        transformers.logging.set_verbosity_error()  # per-call generate() notices
        transformers.logging.disable_progress_bar()
        torch.set_num_threads(args.threads)
        hf = WhisperASR(ROOT / args.whisper, device="cpu", dtype="float32")
        hf.warmup()
        methods["a"] = (
            "transformers WhisperASR (30 s window)",
            lambda u: timed(lambda: hf.transcribe(u.audio, "en")),
        )
    if only & {"b", "c", "d"}:
        from core.models.ct2_whisper_asr import CT2WhisperASR

        full = CT2WhisperASR(ROOT / args.ct2, window="full", intra_threads=args.threads)
        fit = CT2WhisperASR(ROOT / args.ct2, window="fit", intra_threads=args.threads)
        full.warmup()
        fit.warmup()
        methods["b"] = ("CT2 int8, window=full", lambda u: timed(lambda: full.transcribe(u.audio, "en")))
        methods["c"] = (
            f"CT2 int8, window=fit (+{fit.pad_s:g} s)",
            lambda u: timed(lambda: fit.transcribe(u.audio, "en")),
        )
        methods["d"] = ("CT2 fit, incremental + forced prefix", incremental(fit, forced))
    results = run({k: m for k, m in methods.items() if k in only}, corpus, args.verbose)

    total = sum(u.duration for u in corpus)
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cpus, python {platform.python_version()}, threads {args.threads}"
    )
    print(
        f"corpus: {len(corpus)} utterances ({sum(1 for u in corpus if u.pauses)} with a pause), "
        f"{total:.0f} s, {min(u.duration for u in corpus):.1f}-{max(u.duration for u in corpus):.1f} s each; "
        "latency = the final transcription call, one per utterance"
    )
    print()
    print("| method | corpus WER | p50 ms | p95 ms |")
    print("|---|---:|---:|---:|")
    for key, r in results.items():
        print(f"| ({key}) {methods[key][0]} | {r['wer']:.3f} | {r['p50']:.0f} | {r['p95']:.0f} |")
    if forced:
        print(f"\nincremental: {np.mean(forced):.1f} words forced per utterance on average")
    fields = " ".join(
        f"{k}_wer={r['wer']:.3f} {k}_p50_ms={r['p50']:.0f} {k}_p95_ms={r['p95']:.0f}"
        for k, r in results.items()
    )
    print(f"RESULT {fields}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
