"""Command line of batch transcription (``worker.py --distill`` and ``python -m core.distill.cli``).

    python worker.py --distill MANIFEST --output OUT.jsonl [--batch-size N] [--shard I/N] [--language L]
    python -m core.distill.cli MANIFEST --output OUT.jsonl [...]

Reads the manifest, keeps this shard's ids, skips the ids OUT.jsonl already holds (cutting a torn last
line), loads the ASR of the configured stack and appends one fsynced row per file. Exit status: 0 when
the run finished (files that failed have ``error`` rows), 1 when it could not start (manifest, output or
model), 2 for bad arguments or config, 130 when interrupted (every row written so far is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Generator
from types import FrameType

import numpy as np

from core.config import Config, ConfigError, load_config
from core.distill.manifest import ManifestError, ManifestItem, read_manifest
from core.distill.pipeline import SAMPLE_RATE, DistillOptions, FileResult, transcribe_files
from core.distill.progress import Progress, summary_lines
from core.distill.shard import ShardError, parse_shard, select_shard
from core.distill.writer import OutputError, ResultWriter
from core.models.base import ASR

#: How many rejected manifest rows are listed one by one before the rest are only counted.
_PROBLEMS_SHOWN = 20


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags; unset ones stay None so that config.json still applies."""
    p = argparse.ArgumentParser(
        prog="worker.py --distill", description="Batch transcription of a manifest into resumable JSONL."
    )
    p.add_argument("manifest", nargs="?", help="JSONL of {id, path} rows, a folder, or a Parquet file")
    p.add_argument(
        "--distill", dest="manifest_flag", metavar="MANIFEST", help="the manifest (worker.py form)"
    )
    p.add_argument("--output", "-o", required=True, help="result JSONL (appended to; a re-run resumes)")
    p.add_argument("--batch-size", type=int, default=None, help="clips per ASR batch (distill.batch_size)")
    p.add_argument("--shard", default=None, help="I/N: process only shard I of N (stable hash of the id)")
    p.add_argument("--language", default=None, help="force a language code ('auto' detects per clip)")
    p.add_argument("--decode-workers", type=int, default=None, help="decode threads (distill.decode_workers)")
    p.add_argument("--config", default=None, help="config JSON (default ./config.json when present)")
    p.add_argument("--stack", choices=["auto", "embedded", "production", "fake"], default=None)
    p.add_argument("--gpu-id", type=int, default=None, help="GPU to use (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument(
        "--asr-factory",
        default=None,
        metavar="MODULE:CALLABLE",
        help="build the ASR with CALLABLE(config) instead of the configured stack (custom backends, tests)",
    )
    p.add_argument("--ray", action="store_true", help="run on Ray Data (one ASR actor per GPU)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if (args.manifest is None) == (args.manifest_flag is None):
        p.error("give the manifest once: MANIFEST or --distill MANIFEST")
    args.manifest = args.manifest or args.manifest_flag
    return args


def build_asr(config: Config) -> ASR:
    """The ASR of the configured stack, without loading the rest of it where the registry allows."""
    import core.models.registry as registry

    only_asr: Callable[[Config], ASR] | None = getattr(registry, "build_asr", None)
    if only_asr is not None:
        return only_asr(config)
    return registry.build_stack(config).asr


def _call_factory(spec: str, config: Config) -> ASR:
    module, _, name = spec.partition(":")
    factory = getattr(importlib.import_module(module), name)
    asr = factory(config)
    if not isinstance(asr, ASR):
        raise TypeError(f"{spec} returned {type(asr).__name__}, which is not an ASR")
    return asr


def asr_factory(args: argparse.Namespace, config: Config) -> Callable[[], ASR]:
    """A picklable zero-argument builder of the ASR (Ray actors call it on their own machine)."""
    if args.asr_factory:
        if ":" not in args.asr_factory:
            raise ValueError(f"--asr-factory must be MODULE:CALLABLE, got {args.asr_factory!r}")
        return functools.partial(_call_factory, args.asr_factory, config)
    return functools.partial(build_asr, config)


def _load(args: argparse.Namespace) -> tuple[Config, DistillOptions]:
    language = None if args.language in (None, "auto") else args.language
    overrides = {
        "distill": {
            "batch_size": args.batch_size,
            "decode_workers": args.decode_workers,
            "language": language,
        },
        "model": {"stack": args.stack},
    }
    config = load_config(args.config, overrides)
    return config, DistillOptions.from_config(config.distill)


def _read_items(args: argparse.Namespace) -> tuple[list[ManifestItem], int]:
    """This shard's manifest items, and how many manifest rows were rejected (each reported on stderr)."""
    manifest = read_manifest(args.manifest)
    for problem in manifest.problems[:_PROBLEMS_SHOWN]:
        print(f"distill: manifest {problem}", file=sys.stderr)
    if len(manifest.problems) > _PROBLEMS_SHOWN:
        more = len(manifest.problems) - _PROBLEMS_SHOWN
        print(f"distill: ... and {more} more manifest problems", file=sys.stderr)
    items = list(manifest.items)
    if args.shard:
        index, count = parse_shard(args.shard)
        items = select_shard(items, index, count)
    return items, len(manifest.problems)


def _results(
    args: argparse.Namespace, todo: list[ManifestItem], make_asr: Callable[[], ASR], options: DistillOptions
) -> Generator[FileResult, None, None]:
    if args.ray:
        from core.distill.ray_runner import run_on_ray

        yield from run_on_ray(todo, make_asr, options, address=args.ray_address)
        return
    asr = make_asr()
    # Fail fast on settings the model refuses (an unknown language, say) rather than once per file;
    # a silent clip costs no model time.
    asr.transcribe_batch([np.zeros(SAMPLE_RATE // 10, np.float32)], language=options.language)
    yield from transcribe_files(todo, asr, options)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # stop like Ctrl-C: rows already written are kept, the summary is printed


def main(argv: list[str] | None = None) -> int:
    """Run one distillation (or one shard of it); see the module docstring for the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.gpu_id is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu_id)  # before any model import
    try:
        config, options = _load(args)
        if args.shard:
            parse_shard(args.shard)
        make_asr = asr_factory(args, config)
    except (ConfigError, ShardError, ValueError) as exc:
        print(f"distill: {exc}", file=sys.stderr)
        return 2
    writer = ResultWriter(args.output)
    try:
        items, problems = _read_items(args)  # before opening: a bad manifest leaves no empty output behind
        writer.open()
    except (ManifestError, OutputError) as exc:
        writer.close()
        print(f"distill: {exc}", file=sys.stderr)
        return 1
    if writer.repaired.torn_bytes:
        cut = writer.repaired.torn_bytes
        print(f"distill: cut a torn last line ({cut} bytes) from {args.output}", file=sys.stderr)
    todo = [item for item in items if item.id not in writer.done]
    skipped = len(items) - len(todo)
    on_main = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_main else None
    progress = Progress(len(todo), enabled=not args.no_progress and bool(todo))
    interrupted, failed = False, None
    try:
        if todo:
            # closing(): an interrupt shuts the decode threads down now, not whenever GC gets to them
            with contextlib.closing(_results(args, todo, make_asr, options)) as results:
                for result in results:
                    writer.write(result.to_row())
                    progress.update(result)
    except KeyboardInterrupt:
        interrupted = True
    except OutputError as exc:
        failed = f"distill: {exc}"
    except Exception as exc:  # the model could not be loaded, or the runner itself broke
        failed = f"distill: {type(exc).__name__}: {exc}"
    finally:
        progress.close()
        writer.close()
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    for line in summary_lines(
        progress.tally, skipped=skipped, problems=problems, output=args.output, interrupted=interrupted
    ):
        print(line)
    if failed:
        print(failed, file=sys.stderr)
        return 1
    return 130 if interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
