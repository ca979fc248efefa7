"""The three spectral front ends the CosyVoice2 prompt path was trained with.

* :func:`whisper_log_mel` — Whisper's 128-band log-mel at 16 kHz, the input of ``speech_tokenizer_v2.onnx``.
* :func:`kaldi_fbank` — Kaldi's 80-band log filterbank at 16 kHz (25 ms Povey windows every 10 ms,
  pre-emphasis, DC removal), mean-normalised per recording, the input of ``campplus.onnx``.
* :func:`prompt_mel` — the 80-band, 24 kHz natural-log mel (hop 480, i.e. 50 Hz) the flow generates and
  takes the prompt speaker's frames in.

Mel filters are Slaney-style (the librosa default), built with ``transformers.audio_utils``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from core.models.cosyvoice.config import MelConfig


@lru_cache(maxsize=8)
def _slaney_filters(n_fft: int, n_mels: int, sample_rate: int, fmin: float, fmax: float) -> torch.Tensor:
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(
        num_frequency_bins=n_fft // 2 + 1,
        num_mel_filters=n_mels,
        min_frequency=fmin,
        max_frequency=fmax,
        sampling_rate=sample_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(bank.T.astype(np.float32))  # (n_mels, bins)


def _tensor(audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(audio, dtype=torch.float32)
    return t.reshape(-1)


def whisper_log_mel(audio_16k: np.ndarray | torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """Whisper's log-mel: (1, n_mels, samples // 160), values roughly in [-1, 1.5]."""
    x = _tensor(audio_16k)
    spec = torch.stft(x, 400, 160, window=torch.hann_window(400), return_complex=True)
    power = spec[..., :-1].abs() ** 2
    log_spec = torch.clamp(_slaney_filters(400, n_mels, 16000, 0.0, 8000.0) @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).unsqueeze(0)


def _kaldi_mel(f: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(f, torch.Tensor):
        return 1127.0 * torch.log(1.0 + f / 700.0)
    return 1127.0 * math.log(1.0 + f / 700.0)


@lru_cache(maxsize=4)
def _kaldi_banks(num_bins: int, padded: int, sample_rate: int, low: float) -> torch.Tensor:
    """Kaldi's triangular mel banks over the FFT bins (num_bins, padded // 2 + 1); the Nyquist bin is 0."""
    high = sample_rate / 2
    mel_low, mel_high = float(_kaldi_mel(low)), float(_kaldi_mel(high))
    delta = (mel_high - mel_low) / (num_bins + 1)
    index = torch.arange(num_bins).unsqueeze(1)
    left, center, right = (mel_low + (index + k) * delta for k in range(3))
    mel = _kaldi_mel(sample_rate / padded * torch.arange(padded // 2)).unsqueeze(0)  # type: ignore[union-attr]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(banks, (0, 1))


def kaldi_fbank(audio_16k: np.ndarray | torch.Tensor, num_bins: int = 80) -> torch.Tensor:
    """Kaldi log-mel filterbank (frames, num_bins) of 16 kHz audio in [-1, 1], with edges snipped."""
    x = _tensor(audio_16k)
    size, shift, padded = 400, 160, 512
    if x.numel() < size:
        return torch.zeros(0, num_bins)
    frames = x.unfold(0, size, shift)  # (n, 400)
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - 0.97 * previous
    frames = frames * torch.hann_window(size, periodic=False).pow(0.85)
    power = torch.fft.rfft(F.pad(frames, (0, padded - size))).abs().pow(2.0)
    energies = power @ _kaldi_banks(num_bins, padded, 16000, 20.0).T
    return torch.clamp(energies, min=torch.finfo(torch.float32).eps).log()


def prompt_mel(audio_24k: np.ndarray | torch.Tensor, config: MelConfig = MelConfig()) -> torch.Tensor:
    """The flow's log-mel of 24 kHz audio: (frames, 80) with frames ≈ samples / 480."""
    x = _tensor(audio_24k).unsqueeze(0)
    pad = (config.n_fft - config.hop_size) // 2
    x = F.pad(x.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(
        x,
        config.n_fft,
        hop_length=config.hop_size,
        win_length=config.win_size,
        window=torch.hann_window(config.win_size),
        center=False,
        return_complex=True,
    )
    magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    fmax = config.fmax if config.fmax is not None else config.sampling_rate / 2
    filters = _slaney_filters(config.n_fft, config.num_mels, config.sampling_rate, config.fmin, fmax)
    mel = torch.log(torch.clamp(filters @ magnitude, min=1e-5))
    return mel[0].transpose(0, 1)
