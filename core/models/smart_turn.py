"""Smart Turn v3.2: a semantic end-of-turn model (int8 ONNX, a Whisper Tiny encoder, ~8 MB).

It hears the last 8 s of the utterance as Whisper log-mel features (80 mels x 800 frames) and says how likely
the speaker has finished: intonation and grammar, not silence length. Preprocessing follows what the
model was trained on: an utterance shorter than 8 s is padded with zeros at the *start* (the end, which
decides, sits at the same place every time), and the whole 8 s window, padding included, is normalised to
zero mean and unit variance before the log-mel spectrogram. Features are computed here in numpy (one
vectorised STFT), bit for bit equal to ``transformers.WhisperFeatureExtractor(chunk_length=8)``'s numpy path
at a fraction of its cost.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from core.models.base import INPUT_SAMPLE_RATE

#: The model hears this many seconds; longer audio keeps its end.
WINDOW_SECONDS = 8
WINDOW_SAMPLES = WINDOW_SECONDS * INPUT_SAMPLE_RATE
N_FFT = 400
HOP = 160
N_MELS = 80
#: Frames the model takes: Whisper's centred STFT gives one more, and Whisper drops the last.
N_FRAMES = WINDOW_SAMPLES // HOP


class SmartTurnError(ValueError):
    """Audio Smart Turn cannot judge (wrong shape or type, empty, NaN or infinite), or an unloadable model."""


def _mel_filters() -> np.ndarray:
    # The very filter bank WhisperFeatureExtractor builds (Slaney scale and norm, float64): features match.
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=N_MELS,
        min_frequency=0.0,
        max_frequency=INPUT_SAMPLE_RATE / 2,
        sampling_rate=INPUT_SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return np.ascontiguousarray(bank.T)  # (80 mels, 201 bins)


class LogMel:
    """Whisper log-mel features of exactly 8 s of 16 kHz audio: (80, 800) float32.

    Bit for bit what transformers' numpy ``WhisperFeatureExtractor`` path gives (which is also what the
    model's reference inference computes), in one vectorised STFT instead of its per-frame loop. The int8
    model is that touchy: its quantised activations step, so features off by 2e-5 (transformers' float32
    torch path) can move a borderline probability by 0.15. Hence the float64 maths and the complex64
    rounding below, which only copy the reference.
    """

    def __init__(self) -> None:
        self.filters = _mel_filters()
        self.window = np.hanning(N_FFT + 1)[:-1]  # periodic Hann, as Whisper's STFT uses

    def __call__(self, window: np.ndarray) -> np.ndarray:
        """Features of one 8 s window (normalised here, over the padding too, as the model was trained)."""
        x = window.astype(np.float32)
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        x = np.pad(x, N_FFT // 2, mode="reflect").astype(np.float64)  # centred frames
        frames = sliding_window_view(x, N_FFT)[::HOP][:N_FRAMES]  # Whisper drops the last frame: never made
        # The reference keeps the spectrum as complex64 before squaring in float64: so do we.
        spec = np.fft.rfft(frames * self.window, axis=-1).astype(np.complex64)
        power = np.abs(spec, dtype=np.float64) ** 2
        log_mel = np.log10(np.maximum(1e-10, self.filters @ power.T)).astype(np.float32)
        log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
        return (log_mel + 4.0) / 4.0


def prepare(audio: np.ndarray) -> np.ndarray:
    """Check ``audio`` and return its last 8 s as 1-D float32, zero-padded at the start to exactly 8 s."""
    if not isinstance(audio, np.ndarray):
        raise SmartTurnError(f"audio must be a numpy array, got {type(audio).__name__}")
    if not np.issubdtype(audio.dtype, np.floating):
        raise SmartTurnError(f"audio must be float (mono, in [-1, 1]), got dtype {audio.dtype}")
    if audio.ndim == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)
    if audio.ndim != 1:
        raise SmartTurnError(f"audio must be mono: 1-D, (n, 1) or (1, n), got shape {audio.shape}")
    if audio.size == 0:
        raise SmartTurnError("audio is empty")
    if not np.isfinite(audio).all():
        raise SmartTurnError("audio holds NaN or infinite samples")
    tail = audio[-WINDOW_SAMPLES:]
    out = np.zeros(WINDOW_SAMPLES, np.float32)
    out[WINDOW_SAMPLES - tail.size :] = tail
    return out


class SmartTurn:
    """The Smart Turn v3.2 ONNX model on the CPU, as a :class:`core.models.base.TurnDetector`."""

    name = "smart-turn-v3.2"

    def __init__(self, onnx_path: str | Path, *, threads: int = 1) -> None:
        """Load the model; ``threads`` intra-op threads (one call is ~8 MB of int8 matmuls: one is plenty)."""
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise SmartTurnError(f"Smart Turn model not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
            raise SmartTurnError(f"cannot load Smart Turn model {path}: {exc}") from exc
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or list(inputs[0].shape)[1:] != [N_MELS, N_FRAMES]:
            raise SmartTurnError(
                f"{path} is not a Smart Turn v3 model (inputs {[(i.name, i.shape) for i in inputs]})"
            )
        self._input = inputs[0].name
        self._features = LogMel()

    def complete_probability(self, audio: np.ndarray) -> float:
        """P(turn complete) for the utterance so far (float32 mono 16 kHz; only the last 8 s are used)."""
        features = self._features(prepare(audio))[np.newaxis]
        (out,) = self._session.run(None, {self._input: features})
        # The graph ends in a sigmoid (its output is named "logits" nonetheless); clip float rounding anyway.
        return float(np.clip(np.asarray(out).reshape(-1)[0], 0.0, 1.0))

    def warmup(self) -> None:
        """Judge 1 s of low noise once, so the first real call pays no start-up cost."""
        noise = np.random.default_rng(0).normal(0.0, 1e-3, INPUT_SAMPLE_RATE).astype(np.float32)
        self.complete_probability(noise)
