"""The distillation pipeline on Ray Data: decode + VAD as CPU tasks, one ASR actor per GPU, any number of machines.

    files --map(decode_file, CPU)--> decoded rows --map_batches(ASR actor, 1 GPU each)--> result rows

The stages are the ones of :mod:`core.distill.pipeline` (``decode_file``, ``ClipBatcher``, ``assemble``),
so results match a local run: an actor receives ``files_per_batch`` decoded files at a time and batches
their clips across files. Result rows stream back to the driver, which writes them with the same
resumable writer as a local run (the driver filters out ids already written before starting).

Ray is an optional extra (``requirements/ray.txt``); nothing else imports this module. Between stages a
row is two columns, JSON text and raw float32 bytes, because Arrow cannot hold ragged lists of arrays
and infers different types for empty and non-empty lists in different blocks. On a cluster, every node
needs this repository importable at the same path (or pass a ``runtime_env`` to ``ray.init`` yourself
before calling :func:`run_on_ray`); a local Ray started here gets the repository on ``PYTHONPATH``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.distill.manifest import ManifestItem
from core.distill.pipeline import (
    Clip,
    ClipBatcher,
    DecodedFile,
    DistillOptions,
    FileResult,
    decode_file,
    default_loader,
    default_segmenter,
)
from core.models.base import ASR

_REPO_ROOT = Path(__file__).resolve().parents[2]
_DECODE_CPUS = 0.5


def decoded_to_row(decoded: DecodedFile) -> dict[str, Any]:
    """A decoded file as a Ray row: JSON metadata and the clips' samples concatenated as bytes."""
    item = decoded.item
    meta = {
        "id": item.id,
        "path": item.path,
        "item_error": item.error,
        "duration_s": decoded.duration_s,
        "error": decoded.error,
        "clips": [[c.start, c.end, int(c.audio.size)] for c in decoded.clips],
    }
    audio = b"".join(np.ascontiguousarray(c.audio, dtype="<f4").tobytes() for c in decoded.clips)
    return {"meta": json.dumps(meta), "audio": audio}


def row_to_decoded(meta_text: str, audio_bytes: bytes) -> DecodedFile:
    """The inverse of :func:`decoded_to_row`."""
    meta = json.loads(meta_text)
    samples = np.frombuffer(audio_bytes, dtype="<f4").astype(np.float32)
    clips, offset = [], 0
    for start, end, n in meta["clips"]:
        clips.append(Clip(float(start), float(end), samples[offset : offset + n]))
        offset += n
    item = ManifestItem(meta["id"], meta["path"], meta["item_error"])
    return DecodedFile(item, meta["duration_s"], tuple(clips), meta["error"])


def _decode_row(row: dict[str, Any], options: DistillOptions) -> dict[str, Any]:
    """CPU stage: one manifest row -> one decoded row (never raises for a bad file)."""
    item = ManifestItem(row["id"], row["path"], row["error"] or None)
    decoded = decode_file(item, default_loader(options), default_segmenter(options), options.max_segment_s)
    return decoded_to_row(decoded)


class ASRActor:
    """GPU stage: holds one ASR for its lifetime and transcribes batches of decoded files."""

    def __init__(self, make_asr: Callable[[], ASR], options: DistillOptions) -> None:
        self.asr = make_asr()
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Decoded rows in, JSON result rows out (one per file)."""
        opts = self.options
        batcher = ClipBatcher(self.asr, opts.batch_size, opts.language, timestamps=opts.timestamps)
        results: list[FileResult] = []
        for meta, audio in zip(batch["meta"], batch["audio"], strict=True):
            results.extend(batcher.add(row_to_decoded(str(meta), bytes(audio))))
            while batcher.ready:
                results.extend(batcher.run_batch())
        results.extend(batcher.flush())
        return {"row": np.array([json.dumps(r.to_row()) for r in results], dtype=object)}


def _init_ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # A local Ray: its worker processes must import core.* like the driver does.
        env = {"env_vars": {"PYTHONPATH": str(_REPO_ROOT)}}
        ray.init(num_cpus=num_cpus, runtime_env=env, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


def run_on_ray(
    items: Sequence[ManifestItem],
    make_asr: Callable[[], ASR],
    options: DistillOptions,
    *,
    address: str | None = None,
    actors: int | None = None,
    files_per_batch: int | None = None,
    num_cpus: int | None = None,
) -> Iterator[FileResult]:
    """Transcribe ``items`` on Ray, yielding each file's result as it arrives (not in input order).

    ``make_asr`` must be picklable (a module-level function or a ``functools.partial`` of one): each
    actor calls it once. With GPUs in the cluster there is one actor per GPU unless ``actors`` says
    otherwise; without, ``actors`` (default 1) CPU actors.
    """
    import ray

    if not items:
        return
    _init_ray(address, num_cpus)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's own bar counts files, hours and throughput
    context.print_on_execution_start = False
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = actors or max(gpus, 1)
    rows = [{"id": i.id, "path": i.path, "error": i.error or ""} for i in items]
    ds: ray.data.Dataset = ray.data.from_items(rows)
    # Half a CPU per decode task: the heavy part runs in an ffmpeg child process, and resources that
    # differ from the actor's keep Ray from fusing decoding into the model actor (the model would wait).
    ds = ds.map(functools.partial(_decode_row, options=options), num_cpus=_DECODE_CPUS)
    ds = ds.map_batches(
        ASRActor,
        fn_constructor_kwargs={"make_asr": make_asr, "options": options},
        batch_size=files_per_batch or options.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=count),
        num_cpus=1,
        num_gpus=1 if gpus else 0,
    )
    for row in ds.iter_rows():
        yield FileResult.from_row(json.loads(row["row"]))
