"""CosyVoice2 streaming synthesis: first-chunk latency and real-time factor, with random weights.

Rows: the TINY test model (tests/cosyvoice_tiny.py) on the CPU in float32, and the real CosyVoice2-0.5B
sizes (Qwen2.5-0.5B LM, the released flow and vocoder sizes) on a CUDA GPU in bfloat16 with SDPA
attention, without and with ``torch.compile`` (flow estimator and vocoder). Compute does not depend on the
weights' values, so random weights measure the real cost; the random LM never picks "end of speech", so
every request decodes the maximum, 20 speech tokens per text token (stated in the table). Without a GPU
the production rows print "not measured (no GPU)".

Each row: one warm-up request, then ``--runs`` requests of the same text with a 3 s random voice prompt;
first-chunk latency is from the ``synthesize`` call to the first audio chunk (25 + lookahead tokens
decoded, the flow and the vocoder run once), RTF is wall time over audio time (< 1 is faster than real
time). Medians are reported. Usage: ``.venv/bin/python bench/bench_cosyvoice.py [--runs N]``.
Prints a table, then one ``RESULT`` line.
"""

# ruff: noqa: E402  (thread limits must be set before torch is imported)
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_model

from core.models.base import OUTPUT_SAMPLE_RATE
from core.models.cosyvoice.frontend import TextTokenizer
from core.models.cosyvoice.loader import compile_modules, place
from core.models.cosyvoice.streaming import VoicePrompt
from core.models.cosyvoice.tts import CosyVoice2TTS
from tests.cosyvoice_tiny import PRODUCTION, TINY, Dims, random_modules, tiny_folder

TEXT = "Hello there, this is a short test of the streaming voice."
PROMPT_TOKENS = 75  # 3 s at 25 Hz


@dataclass(frozen=True)
class Row:
    """One benchmark configuration."""

    label: str
    dims: Dims
    device: str
    dtype: torch.dtype
    compile: bool


@dataclass(frozen=True)
class Measure:
    """Medians over the runs of one row."""

    first_chunk_ms: float
    rtf: float
    audio_s: float
    chunks: int


def random_prompt(seed: int = 0) -> VoicePrompt:
    """A voice prompt of the usual size with random content (no LM prompt: the cross-lingual form)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 6561, (1, PROMPT_TOKENS), generator=g)
    none = torch.zeros(0, dtype=torch.long)
    feat = torch.randn(1, 2 * PROMPT_TOKENS, 80, generator=g) - 5.0
    return VoicePrompt(none, none, tokens, feat, torch.randn(1, 192, generator=g))


def build(row: Row, tokenizer: TextTokenizer) -> CosyVoice2TTS:
    """A TTS over random modules of the row's size, placed and (maybe) compiled."""
    modules = place(random_modules(row.dims), torch.device(row.device), row.dtype)
    if row.compile:
        compile_modules(modules)
    return CosyVoice2TTS.from_parts(modules, tokenizer, voices={"bench": random_prompt()}, seed=0)


def one_request(tts: CosyVoice2TTS) -> tuple[float, float, float, int]:
    """(seconds to the first chunk, total seconds, audio seconds, chunks) of one request."""
    start = time.perf_counter()
    first, samples, chunks = 0.0, 0, 0
    for chunk in tts.synthesize(TEXT, voice="bench"):
        if chunks == 0:
            first = time.perf_counter() - start
        samples += len(chunk)
        chunks += 1
    return first, time.perf_counter() - start, samples / OUTPUT_SAMPLE_RATE, chunks


def measure(row: Row, tokenizer: TextTokenizer, runs: int) -> Measure:
    """Warm up once, then the medians of ``runs`` requests."""
    tts = build(row, tokenizer)
    one_request(tts)
    results = [one_request(tts) for _ in range(runs)]
    return Measure(
        first_chunk_ms=1000 * statistics.median(r[0] for r in results),
        rtf=statistics.median(r[1] / r[2] for r in results),
        audio_s=statistics.median(r[2] for r in results),
        chunks=int(statistics.median(r[3] for r in results)),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed requests per row (median kept)")
    args = parser.parse_args()
    torch.set_num_threads(1 if not torch.cuda.is_available() else torch.get_num_threads())
    tokenizer = TextTokenizer(tiny_folder(TINY) / "CosyVoice-BlankEN")
    n_text = len(tokenizer.encode(TEXT))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    rows = [
        Row("tiny, cpu, float32, eager", TINY, "cpu", torch.float32, False),
        Row("CosyVoice2-0.5B size, cuda, bf16, sdpa, eager", PRODUCTION, "cuda", torch.bfloat16, False),
        Row("CosyVoice2-0.5B size, cuda, bf16, sdpa, compile", PRODUCTION, "cuda", torch.bfloat16, True),
    ]
    print(f"machine: {cpu_model()}, {os.cpu_count()} cpus, gpu: {gpu or 'none'}, torch {torch.__version__}")
    print(f"text: {TEXT!r} ({n_text} tokens -> {20 * n_text} speech tokens, {0.8 * n_text:.1f} s of audio)")
    print(
        f"voice prompt: {PROMPT_TOKENS} tokens; {args.runs} timed runs per row after one warm-up; CPU rows on 1 thread"
    )
    print()
    print(f"{'configuration':50} {'first chunk ms':>15} {'RTF':>8} {'audio s':>8} {'chunks':>7}")
    results: dict[str, Measure | None] = {}
    for row in rows:
        if row.device == "cuda" and gpu is None:
            results[row.label] = None
            print(f"{row.label:50} {'not measured (no GPU)':>40}")
            continue
        m = measure(row, tokenizer, args.runs)
        results[row.label] = m
        print(f"{row.label:50} {m.first_chunk_ms:15.0f} {m.rtf:8.3f} {m.audio_s:8.1f} {m.chunks:7d}")

    def fmt(label: str, attr: str, digits: int) -> str:
        m = results[label]
        return "na" if m is None else f"{getattr(m, attr):.{digits}f}"

    tiny, eager, compiled = (r.label for r in rows)
    print()
    print(
        f"RESULT tiny_cpu_first_chunk_ms={fmt(tiny, 'first_chunk_ms', 0)} tiny_cpu_rtf={fmt(tiny, 'rtf', 3)} "
        f"prod_gpu_first_chunk_ms={fmt(eager, 'first_chunk_ms', 0)} prod_gpu_rtf={fmt(eager, 'rtf', 3)} "
        f"prod_gpu_compiled_first_chunk_ms={fmt(compiled, 'first_chunk_ms', 0)} "
        f"prod_gpu_compiled_rtf={fmt(compiled, 'rtf', 3)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
