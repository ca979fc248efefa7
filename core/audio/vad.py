"""Silero voice activity detection: streaming for live sessions, offline for files (onnxruntime).

The Silero v5/v6 ONNX model scores one 512-sample window (32 ms at 16 kHz) at a time. Each call sees the
window with the last 64 samples of the previous window prepended (its "context"), and carries an LSTM
state from window to window; leaving either out gives plausible-looking but wrong probabilities.

One ``InferenceSession`` (``load_silero_session``) is shared by every stream of a process; the
recurrent state, the context and any partial window live in each ``SileroVAD``. Two exports of the
same network are understood: the stock streaming model (``silero_vad.onnx``: inputs ``input``,
``state``, ``sr``) and the sequence model (``silero_vad_16k_sequence.onnx``: inputs ``input``, ``h``,
``c``) that scores many windows per call and gives bit-identical probabilities.

``segments_from_probabilities`` is the pure part of offline segmentation (hysteresis, merging,
padding, splitting of overlong segments); ``speech_segments`` runs the model and then it.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from core.audio.errors import AudioError

if TYPE_CHECKING:  # onnxruntime is imported lazily: models.base imports this module for the protocol
    import onnxruntime as ort

#: The only rate the model is run at.
SAMPLE_RATE = 16_000
#: Samples per analysis window, and the samples of the previous window the model sees before it.
WINDOW_SAMPLES = 512
CONTEXT_SAMPLES = 64
#: Seconds per window (32 ms).
WINDOW_S = WINDOW_SAMPLES / SAMPLE_RATE
#: Model file used when no path is given (the one core.models.embedded pins by hash).
DEFAULT_MODEL = "silero_vad.onnx"
_STATE_SHAPE = (2, 1, 128)
#: Windows scored per block (about 33 s of audio): bounds the transient memory of long inputs.
_BLOCK_WINDOWS = 1024


class StreamingVAD(Protocol):
    """Per-stream VAD: feed 16 kHz float32 audio of any length, get one speech probability per window."""

    #: Samples per analysis window (512 at 16 kHz = 32 ms).
    window_samples: int

    def process(self, audio: np.ndarray) -> list[float]:
        """Feed audio; return the speech probability of every window completed by it, in order."""
        ...

    def reset(self) -> None:
        """Forget all state (carried audio and the model's recurrent state)."""
        ...


class VADError(AudioError):
    """Bad input to the VAD (wrong shape, type, rate or non-finite samples) or an unusable model file."""

    kind = "vad"


# ----------------------------------------------------------------------------------------- model


def default_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of a model file shipped in the installed ``silero-vad`` package (found without importing it)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise VADError("the silero-vad package is not installed: run `bash install.sh`", kind="vad_model")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.is_file():
        raise VADError(f"silero-vad ships no {name} (looked in {path.parent})", kind="vad_model")
    return path


def load_silero_session(path: str | Path | None = None) -> ort.InferenceSession:
    """Load a Silero ONNX model once per process (one intra-op thread: a window is far too small to split)."""
    import onnxruntime as ort

    model = Path(path) if path is not None else default_model_path()
    if not model.is_file():
        raise VADError(f"Silero VAD model not found: {model}", kind="vad_model")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # the sequence export has unused initializers that ORT warns about
    try:
        session = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
        raise VADError(f"cannot load Silero VAD model {model}: {exc}", kind="vad_model") from exc
    _model_kind(session)  # fail now, not on the first window, for an ONNX file that is not Silero
    return session


_default_session: ort.InferenceSession | None = None
_default_lock = threading.Lock()


def default_session() -> ort.InferenceSession:
    """The process-wide session of the default model, loaded on first use."""
    global _default_session
    with _default_lock:
        if _default_session is None:
            _default_session = load_silero_session()
        return _default_session


def _model_kind(session: ort.InferenceSession) -> str:
    names = {i.name for i in session.get_inputs()}
    if {"input", "state", "sr"} <= names:
        return "stream"
    if {"input", "h", "c"} <= names:
        return "sequence"
    raise VADError(f"not a Silero VAD model (inputs {sorted(names)})", kind="vad_model")


def _score(
    session: ort.InferenceSession, kind: str, frames: np.ndarray, state: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of ``frames`` (n, CONTEXT+WINDOW samples, context already prepended) and the new state."""
    if kind == "sequence":
        probs, h, c = session.run(
            ["speech_probs", "hn", "cn"], {"input": frames, "h": state[0:1], "c": state[1:2]}
        )
        return np.asarray(probs, dtype=np.float32).reshape(-1), np.concatenate([h, c])
    out = np.empty(len(frames), dtype=np.float32)
    sr = np.array(SAMPLE_RATE, dtype=np.int64)
    for i in range(len(frames)):
        prob, state = session.run(None, {"input": frames[i : i + 1], "state": state, "sr": sr})
        out[i] = prob[0, 0]
    return out, state


def _score_windows(
    session: ort.InferenceSession, kind: str, samples: np.ndarray, state: np.ndarray, context: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score whole windows of ``samples`` block by block; returns probabilities, state and context after them.

    Blocks bound memory: windows with their context take 1.1x the audio (260 MB for an hour in one piece).
    """
    parts = []
    step = _BLOCK_WINDOWS * WINDOW_SAMPLES
    for offset in range(0, len(samples), step):
        frames = _with_context(samples[offset : offset + step], context)
        probs, state = _score(session, kind, frames, state)
        context = frames[-1, -CONTEXT_SAMPLES:].copy()
        parts.append(probs)
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), state, context


def _with_context(samples: np.ndarray, context: np.ndarray) -> np.ndarray:
    """Cut whole windows out of ``samples`` and prepend to each the tail of the window before it."""
    windows = samples.reshape(-1, WINDOW_SAMPLES)
    before = np.empty((len(windows), CONTEXT_SAMPLES), dtype=np.float32)
    before[0] = context
    before[1:] = windows[:-1, -CONTEXT_SAMPLES:]
    return np.ascontiguousarray(np.concatenate([before, windows], axis=1))


def _as_samples(audio: object) -> np.ndarray:
    """Validate 1-D float audio and return it as contiguous float32."""
    if not isinstance(audio, np.ndarray):
        raise VADError(f"audio must be a numpy array, got {type(audio).__name__}")
    if audio.ndim != 1:
        raise VADError(f"audio must be mono (1-D), got shape {audio.shape}")
    if not np.issubdtype(audio.dtype, np.floating):
        raise VADError(f"audio must be float samples in [-1, 1], got dtype {audio.dtype}")
    samples = np.ascontiguousarray(audio, dtype=np.float32)
    if not np.isfinite(samples).all():
        raise VADError("audio contains NaN or infinite samples")
    return samples


# ------------------------------------------------------------------------------------- streaming


class SileroVAD:
    """Streaming Silero VAD for one stream; ``session`` may be shared by many streams and threads."""

    window_samples: int = WINDOW_SAMPLES

    def __init__(self, session: ort.InferenceSession | None = None) -> None:
        self._session = session if session is not None else default_session()
        self._kind = _model_kind(self._session)
        self.reset()

    def reset(self) -> None:
        """Forget the carried partial window, the context samples and the recurrent state."""
        self._state = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def process(self, audio: np.ndarray) -> list[float]:
        """Feed 16 kHz float32 mono audio; the probabilities of the windows it completes, in order."""
        samples = _as_samples(audio)
        if self._pending.size:
            samples = np.concatenate([self._pending, samples])
        whole = len(samples) - len(samples) % WINDOW_SAMPLES
        self._pending = samples[whole:].copy()
        if whole == 0:
            return []
        probs, self._state, self._context = _score_windows(
            self._session, self._kind, samples[:whole], self._state, self._context
        )
        return [float(p) for p in probs]


# --------------------------------------------------------------------------------------- offline


def speech_probabilities(audio: np.ndarray, session: ort.InferenceSession | None = None) -> np.ndarray:
    """One probability per window of 16 kHz audio; a last partial window is scored zero-padded."""
    samples = _as_samples(audio)
    session = session if session is not None else default_session()
    kind = _model_kind(session)
    whole = samples.size - samples.size % WINDOW_SAMPLES
    state = np.zeros(_STATE_SHAPE, dtype=np.float32)
    context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
    probs, state, context = _score_windows(session, kind, samples[:whole], state, context)
    if whole < samples.size:  # pad only the tail: copying hours of audio to pad it would double the memory
        last = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
        last[: samples.size - whole] = samples[whole:]
        probs = np.concatenate([probs, _score_windows(session, kind, last, state, context)[0]])
    return probs


def _speech_runs(probs: np.ndarray, threshold: float, neg_threshold: float) -> list[tuple[int, int]]:
    """Window runs [start, end) of speech: enter at ``threshold``, leave below ``neg_threshold``."""
    runs: list[tuple[int, int]] = []
    start = -1
    for i, p in enumerate(probs.tolist()):
        if start < 0:
            if p >= threshold:
                start = i
        elif p < neg_threshold:
            runs.append((start, i))
            start = -1
    if start >= 0:
        runs.append((start, len(probs)))
    return runs


def _bridge(runs: list[tuple[int, int]], min_gap: float) -> list[tuple[int, int]]:
    """Join runs separated by fewer than ``min_gap`` windows (a breath is not the end of an utterance)."""
    merged: list[tuple[int, int]] = []
    for start, end in runs:
        if merged and start - merged[-1][1] < min_gap:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _cut_point(probs: np.ndarray, lo: float, hi: float, window_s: float, neg_threshold: float) -> float:
    """Where to split a segment between ``lo`` and ``hi`` seconds: mid-pause if there is one, else the quietest window."""
    first, last = math.ceil(lo / window_s), min(len(probs), math.floor(hi / window_s))
    if last <= first:
        return hi
    quiet = probs[first:last] < neg_threshold
    best_len, best_mid, run_start = 0, -1, -1
    for i, q in enumerate([*quiet.tolist(), False]):
        if q and run_start < 0:
            run_start = i
        elif not q and run_start >= 0:
            if i - run_start > best_len:
                best_len, best_mid = i - run_start, (run_start + i) // 2
            run_start = -1
    if best_len:
        return (first + best_mid) * window_s
    return (first + int(np.argmin(probs[first:last])) + 0.5) * window_s


def segments_from_probabilities(
    probs: Sequence[float] | np.ndarray,
    *,
    window_s: float = WINDOW_S,
    threshold: float = 0.5,
    neg_threshold: float | None = None,
    min_speech_s: float = 0.25,
    min_silence_s: float = 0.3,
    pad_s: float = 0.1,
    max_segment_s: float = 30.0,
    duration_s: float | None = None,
) -> list[tuple[float, float]]:
    """Turn per-window speech probabilities into (start, end) speech segments in seconds.

    A segment opens at a window with probability >= ``threshold`` and closes at the first window below
    ``neg_threshold`` (default ``threshold - 0.15``); pauses shorter than ``min_silence_s`` are bridged;
    segments shorter than ``min_speech_s`` are dropped; each side is padded by ``pad_s`` (neighbours
    whose padding would overlap meet halfway); a segment longer than ``max_segment_s`` is cut at the
    longest pause in the second half of its allowed length (or its quietest window) until none is.
    """
    p = np.asarray(probs, dtype=np.float64)
    if neg_threshold is None:
        neg_threshold = max(threshold - 0.15, 0.01)
    _check_params(p, window_s, threshold, neg_threshold, min_speech_s, min_silence_s, pad_s, max_segment_s)
    total = len(p) * window_s if duration_s is None else float(duration_s)
    runs = _bridge(_speech_runs(p, threshold, neg_threshold), min_silence_s / window_s - 1e-9)
    runs = [(s, e) for s, e in runs if (e - s) * window_s >= min_speech_s - 1e-9]
    padded: list[tuple[float, float]] = []
    previous_end = 0.0
    for s, e in runs:
        start, end = max(0.0, s * window_s - pad_s), min(total, e * window_s + pad_s)
        if padded and start < padded[-1][1]:
            middle = (previous_end + s * window_s) / 2  # halfway across the unpadded pause
            padded[-1] = (padded[-1][0], middle)
            start = middle
        padded.append((start, end))
        previous_end = e * window_s
    out: list[tuple[float, float]] = []
    for start, end in padded:
        while end - start > max_segment_s:
            cut = _cut_point(p, start + max_segment_s / 2, start + max_segment_s, window_s, neg_threshold)
            out.append((start, cut))
            start = cut
        out.append((start, end))
    return [(round(a, 6), round(b, 6)) for a, b in out]  # window maths leaves float noise like 0.956000001


def _check_params(
    p: np.ndarray,
    window_s: float,
    threshold: float,
    neg_threshold: float,
    min_speech_s: float,
    min_silence_s: float,
    pad_s: float,
    max_segment_s: float,
) -> None:
    if p.ndim != 1 or not np.isfinite(p).all():
        raise VADError("probabilities must be a 1-D sequence of finite numbers")
    if not 0.0 < threshold < 1.0 or not 0.0 < neg_threshold <= threshold:
        raise VADError(f"need 0 < neg_threshold <= threshold < 1, got {neg_threshold} and {threshold}")
    if window_s <= 0 or min(min_speech_s, min_silence_s, pad_s) < 0:
        raise VADError("window_s must be positive and the durations non-negative")
    if max_segment_s < 4 * window_s:
        raise VADError(f"max_segment_s must be at least {4 * window_s:.3f} s, got {max_segment_s}")


def speech_segments(
    audio: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    threshold: float = 0.5,
    min_speech_ms: int = 250,
    min_silence_ms: int = 300,
    speech_pad_ms: int = 100,
    max_segment_s: float = 30.0,
    *,
    session: ort.InferenceSession | None = None,
) -> list[tuple[float, float]]:
    """Speech segments (start, end) in seconds of a whole recording; audio at another rate is resampled."""
    samples = _as_samples(audio)
    if not 8_000 <= sample_rate <= 192_000:
        raise VADError(f"unsupported sample rate {sample_rate} Hz")
    if sample_rate != SAMPLE_RATE and samples.size:
        import soxr

        samples = np.ascontiguousarray(soxr.resample(samples, sample_rate, SAMPLE_RATE), dtype=np.float32)
    probs = speech_probabilities(samples, session)
    return segments_from_probabilities(
        probs,
        threshold=threshold,
        min_speech_s=min_speech_ms / 1000,
        min_silence_s=min_silence_ms / 1000,
        pad_s=speech_pad_ms / 1000,
        max_segment_s=max_segment_s,
        duration_s=len(samples) / SAMPLE_RATE,
    )
