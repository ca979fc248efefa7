"""The batch transcription pipeline: files -> 16 kHz audio -> VAD clips -> batched ASR -> one result per file.

Stages:

1. decode + segment (:func:`decode_file`), on ``decode_workers`` threads that run up to
   ``prefetch_files`` files ahead of the model (the heavy work is in ffmpeg subprocesses, libsndfile,
   soxr and onnxruntime, all of which release the GIL), so the model does not wait for audio;
   VAD segments are merged into clips of up to ``max_segment_s`` (30 s, Whisper's window): the model pays
   a whole window per clip however short it is, and it hears words better with their neighbours;
2. clips from many files are queued and sent to ``ASR.transcribe_batch`` ``batch_size`` at a time
   (:class:`ClipBatcher`): a batch is filled across file boundaries;
3. when a file's last clip is back, its result is assembled (:func:`assemble`): segment times are
   offset by the clip's start, repetition loops are cut, and a file with no speech gets no text.

The pipeline sees the ASR only through the :class:`~core.models.base.ASR` protocol; the loader and
the segmenter are arguments too, so tests and other runners (``ray_runner``) can swap any stage.
One bad file never stops a run: every failure becomes that file's ``error`` result.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from core.audio.errors import AudioError
from core.config import DistillConfig
from core.distill.manifest import ManifestItem
from core.distill.text import collapse_repetitions, loop_free_indices
from core.models.base import ASR, INPUT_SAMPLE_RATE, Segment, Transcript

#: Audio -> speech segments (start, end) in seconds.
Segmenter = Callable[[np.ndarray], Sequence[tuple[float, float]]]
#: A path -> float32 mono audio at 16 kHz (raising ``AudioError`` for a file it cannot read).
Loader = Callable[[str], np.ndarray]

SAMPLE_RATE = INPUT_SAMPLE_RATE
#: Whisper's window: no clip sent to the model is longer.
MODEL_WINDOW_S = 30.0
#: A clip whose loudest sample is below this (-60 dBFS) holds no speech whatever the VAD said.
_SILENCE_PEAK = 1e-3


@dataclass(frozen=True)
class DistillOptions:
    """How a run batches and decodes; see ``DistillConfig`` for the defaults' meaning."""

    batch_size: int = 8
    decode_workers: int = 2
    #: Files decoded ahead of the model; None: max(2 * decode_workers, batch_size); 0: decode inline.
    prefetch_files: int | None = None
    language: str | None = None
    max_segment_s: float = MODEL_WINDOW_S
    min_silence_ms: int = 300
    max_file_s: float = 4 * 3600.0
    #: Ask for timed segments where the ASR's ``transcribe_batch`` takes ``timestamps=True`` (Whisper
    #: does); without them, each clip is one segment.
    timestamps: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.decode_workers < 1:
            raise ValueError("batch_size and decode_workers must be at least 1")
        if not 0 < self.max_segment_s <= MODEL_WINDOW_S:
            raise ValueError(f"max_segment_s must be in (0, {MODEL_WINDOW_S}]")

    @classmethod
    def from_config(cls, config: DistillConfig, **overrides: Any) -> DistillOptions:
        """Options from the ``distill`` config section; None overrides are ignored."""
        values: dict[str, Any] = {
            "batch_size": config.batch_size,
            "decode_workers": config.decode_workers,
            "language": config.language,
            "max_segment_s": config.max_segment_s,
            "min_silence_ms": config.min_silence_ms,
            "max_file_s": config.max_file_s,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def prefetch(self) -> int:
        """How many files may be decoded ahead of the model."""
        if self.prefetch_files is not None:
            return self.prefetch_files
        return max(2 * self.decode_workers, self.batch_size)


@dataclass(frozen=True)
class Clip:
    """A stretch of speech cut from a file: times in seconds from the file's start."""

    start: float
    end: float
    audio: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class DecodedFile:
    """A file after decode and VAD: its clips, or why it failed."""

    item: ManifestItem
    duration_s: float | None = None
    clips: tuple[Clip, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class FileResult:
    """The outcome for one input: a JSONL row of the output."""

    id: str
    path: str
    status: str  # "ok" | "no_speech" | "error"
    duration_s: float | None = None
    language: str | None = None
    text: str = ""
    segments: tuple[Segment, ...] = ()
    error: str | None = None

    def to_row(self) -> dict[str, Any]:
        """The output row; ``error`` appears only on error rows."""
        row: dict[str, Any] = {
            "id": self.id,
            "path": self.path,
            "status": self.status,
            "duration_s": self.duration_s,
            "language": self.language,
            "text": self.text,
            "segments": [{"start": s.start, "end": s.end, "text": s.text} for s in self.segments],
        }
        if self.status == "error":
            row["error"] = self.error or "unknown error"
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> FileResult:
        """The inverse of :meth:`to_row`."""
        segments = tuple(Segment(float(s["start"]), float(s["end"]), str(s["text"])) for s in row["segments"])
        return cls(
            row["id"], row["path"], row["status"], row.get("duration_s"), row.get("language"),
            row.get("text", ""), segments, row.get("error"),
        )  # fmt: skip


def error_result(item: ManifestItem, reason: str, duration_s: float | None = None) -> FileResult:
    """The row of a file that could not be transcribed."""
    return FileResult(item.id, item.path, "error", duration_s, error=reason)


# --- stage 1: decode and segment -------------------------------------------------------------------


def split_long(segments: Iterable[tuple[float, float]], max_s: float) -> list[tuple[float, float]]:
    """Cut every segment longer than ``max_s`` into equal parts no longer than it."""
    out: list[tuple[float, float]] = []
    for start, end in segments:
        parts = max(1, int(np.ceil((end - start) / max_s - 1e-9)))
        step = (end - start) / parts
        out.extend(
            (start + i * step, end if i == parts - 1 else start + (i + 1) * step) for i in range(parts)
        )
    return out


def merge_segments(segments: Iterable[tuple[float, float]], max_s: float) -> list[tuple[float, float]]:
    """Join consecutive segments (and the pauses between them) while the result spans at most ``max_s``."""
    out: list[tuple[float, float]] = []
    for start, end in segments:
        if out and end - out[-1][0] <= max_s + 1e-9:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def default_loader(options: DistillOptions) -> Loader:
    """``core.audio.files.load_audio`` at 16 kHz with the run's length limit."""
    from core.audio.files import load_audio

    return functools.partial(load_audio, sample_rate=SAMPLE_RATE, max_duration_s=options.max_file_s)


def default_segmenter(options: DistillOptions) -> Segmenter:
    """Silero VAD speech segments (pauses under ``min_silence_ms`` bridged), none over ``max_segment_s``."""
    from core.audio.vad import speech_segments

    return functools.partial(
        speech_segments, min_silence_ms=options.min_silence_ms, max_segment_s=options.max_segment_s
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, AudioError):
        # The operator's own output: what the decoder said helps them fix the file.
        detail = f" ({exc.detail})" if exc.detail else ""
        return f"{exc.kind}: {exc.message}{detail}"
    return f"decode failure: {type(exc).__name__}: {exc}"


def decode_file(
    item: ManifestItem, loader: Loader, segmenter: Segmenter, max_segment_s: float
) -> DecodedFile:
    """Decode one file and cut its speech into clips; every failure is returned, never raised."""
    if item.error is not None:
        return DecodedFile(item, error=f"bad manifest row: {item.error}")
    try:
        audio = loader(item.path)
        duration = round(len(audio) / SAMPLE_RATE, 3)
        window = min(max_segment_s, MODEL_WINDOW_S)
        bounds = merge_segments(split_long(segmenter(audio), window), window)
    except Exception as exc:  # one bad file must never stop the run
        return DecodedFile(item, error=_reason(exc))
    longest = round(min(max_segment_s, MODEL_WINDOW_S) * SAMPLE_RATE)
    clips = []
    for start, end in bounds:
        first = round(start * SAMPLE_RATE)
        stop = min(round(end * SAMPLE_RATE), first + longest)  # rounding never makes a clip over the window
        # A copy, so that the whole file's audio is freed once decoded: only speech waits for the model.
        piece = audio[first:stop].copy()
        if piece.size and float(np.max(np.abs(piece))) >= _SILENCE_PEAK:
            clips.append(Clip(round(start, 3), round(end, 3), piece))
    return DecodedFile(item, duration, tuple(clips))


def decode_ahead(
    items: Iterable[ManifestItem], decode: Callable[[ManifestItem], DecodedFile], workers: int, depth: int
) -> Iterator[DecodedFile]:
    """``decode`` over ``items`` in order, up to ``depth`` files ahead on ``workers`` threads (0: inline)."""
    if depth <= 0:
        yield from map(decode, items)
        return
    source = iter(items)
    with ThreadPoolExecutor(workers, thread_name_prefix="distill-decode") as pool:
        pending: deque[Future[DecodedFile]] = deque(
            pool.submit(decode, i) for i in itertools.islice(source, depth)
        )
        try:
            while pending:
                done = pending.popleft().result()
                for item in itertools.islice(source, 1):  # keep the queue full before the model runs
                    pending.append(pool.submit(decode, item))
                yield done
        finally:
            for future in pending:  # a consumer that stops early does not wait for the whole queue
                future.cancel()


# --- stage 2: batched ASR --------------------------------------------------------------------------


def takes_timestamps(asr: ASR) -> bool:
    """Whether ``asr.transcribe_batch`` has a ``timestamps`` keyword (an extension of the ASR protocol)."""
    try:
        return "timestamps" in inspect.signature(asr.transcribe_batch).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False


def run_asr(
    asr: ASR, audios: Sequence[np.ndarray], language: str | None, *, timestamps: bool = False
) -> list[Transcript | str]:
    """Transcripts for ``audios``; when the batch fails, each clip is retried alone and a failure is its reason.

    ``timestamps`` asks for timed segments; pass it only for an ASR that :func:`takes_timestamps`.
    """
    try:
        if timestamps:
            out = cast(Any, asr).transcribe_batch(audios, language=language, timestamps=True)
        else:
            out = asr.transcribe_batch(audios, language=language)
        if len(out) != len(audios):
            raise RuntimeError(f"the ASR returned {len(out)} transcripts for {len(audios)} clips")
        return list(out)
    except Exception as exc:
        if len(audios) == 1:
            return [f"asr failure: {type(exc).__name__}: {exc}"]
    return [run_asr(asr, [audio], language, timestamps=timestamps)[0] for audio in audios]


@dataclass
class _OpenFile:
    decoded: DecodedFile
    results: list[Transcript | str | None]
    remaining: int


class ClipBatcher:
    """Queues clips from many files and runs them through the ASR ``batch_size`` at a time.

    ``add`` a decoded file, ``run_batch`` while ``ready``, ``flush`` at the end; each returns the files
    that are complete. A file's result comes out as soon as its last clip is transcribed.
    """

    def __init__(
        self, asr: ASR, batch_size: int, language: str | None = None, *, timestamps: bool = True
    ) -> None:
        self.asr = asr
        self.batch_size = batch_size
        self.language = language
        self.timestamps = timestamps and takes_timestamps(asr)
        self._files: dict[int, _OpenFile] = {}
        self._queue: deque[tuple[int, int]] = deque()
        self._next_key = 0
        #: Sizes of the batches run so far (for tests and the benchmark).
        self.batch_sizes: list[int] = []

    def add(self, decoded: DecodedFile) -> list[FileResult]:
        """Queue a file's clips; a file with an error or no clips is complete at once."""
        if decoded.error is not None or not decoded.clips:
            return [assemble(decoded, [], self.language)]
        key = self._next_key
        self._next_key += 1
        n = len(decoded.clips)
        self._files[key] = _OpenFile(decoded, [None] * n, n)
        self._queue.extend((key, i) for i in range(n))
        return []

    @property
    def ready(self) -> bool:
        """True when a full batch is queued."""
        return len(self._queue) >= self.batch_size

    @property
    def queued(self) -> int:
        """Clips waiting for the model."""
        return len(self._queue)

    def run_batch(self) -> list[FileResult]:
        """Transcribe up to ``batch_size`` queued clips; the files this completes."""
        take = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
        if not take:
            return []
        self.batch_sizes.append(len(take))
        audios = [self._files[key].decoded.clips[i].audio for key, i in take]
        finished: list[FileResult] = []
        for (key, i), result in zip(
            take, run_asr(self.asr, audios, self.language, timestamps=self.timestamps), strict=True
        ):
            entry = self._files[key]
            entry.results[i] = result
            entry.remaining -= 1
            if entry.remaining == 0:
                del self._files[key]
                finished.append(assemble(entry.decoded, entry.results, self.language))
        return finished

    def flush(self) -> list[FileResult]:
        """Run every queued clip; the files this completes."""
        out: list[FileResult] = []
        while self._queue:
            out.extend(self.run_batch())
        return out


# --- stage 3: per-file aggregation -----------------------------------------------------------------


def _clip_segments(clip: Clip, transcript: Transcript) -> list[Segment]:
    """A clip's transcript as file-time segments (clip-relative times offset by the clip's start)."""
    length = clip.end - clip.start
    if not transcript.segments:
        text = collapse_repetitions(transcript.text)
        return [Segment(clip.start, clip.end, text)] if text else []
    out = []
    for seg in transcript.segments:
        text = collapse_repetitions(seg.text)
        if text:
            start = clip.start + min(max(seg.start, 0.0), length)
            end = clip.start + min(max(seg.end, seg.start, 0.0), length)
            out.append(Segment(round(start, 3), round(end, 3), text))
    return out


def assemble(
    decoded: DecodedFile, results: Sequence[Transcript | str | None], language: str | None
) -> FileResult:
    """One file's result from its clips' transcripts (a ``str`` result is a failure reason)."""
    item = decoded.item
    if decoded.error is not None:
        return error_result(item, decoded.error, decoded.duration_s)
    failures = [r for r in results if isinstance(r, str)]
    if failures:
        return error_result(item, failures[0], decoded.duration_s)
    segments: list[Segment] = []
    votes: Counter[str] = Counter()
    for clip, transcript in zip(decoded.clips, results, strict=True):
        assert isinstance(transcript, Transcript)
        segments.extend(_clip_segments(clip, transcript))
        if transcript.language and transcript.text.strip():
            votes[transcript.language] += round((clip.end - clip.start) * 1000)
    # A loop can also span segments ("Thank you." as ten segments in a row): keep one of them.
    segments = [segments[i] for i in loop_free_indices([s.text.casefold() for s in segments])]
    if not segments:
        return FileResult(item.id, item.path, "no_speech", decoded.duration_s, language)
    detected = votes.most_common(1)[0][0] if votes else language
    text = " ".join(s.text for s in segments)
    return FileResult(item.id, item.path, "ok", decoded.duration_s, detected, text, tuple(segments))


# --- the whole pipeline ----------------------------------------------------------------------------


def transcribe_files(
    items: Iterable[ManifestItem],
    asr: ASR,
    options: DistillOptions,
    *,
    loader: Loader | None = None,
    segmenter: Segmenter | None = None,
    batcher: ClipBatcher | None = None,
) -> Iterator[FileResult]:
    """Transcribe ``items``, yielding each file's result as soon as it is complete (not in input order)."""
    decode = functools.partial(
        decode_file,
        loader=loader or default_loader(options),
        segmenter=segmenter or default_segmenter(options),
        max_segment_s=options.max_segment_s,
    )
    batcher = batcher or ClipBatcher(asr, options.batch_size, options.language, timestamps=options.timestamps)
    for decoded in decode_ahead(items, decode, options.decode_workers, options.prefetch):
        yield from batcher.add(decoded)
        while batcher.ready:
            yield from batcher.run_batch()
    yield from batcher.flush()
