"""The HiFT vocoder: mel (50 Hz) -> 24 kHz waveform through a neural source filter and an iSTFT head.

An F0 predictor reads the mel; the F0 track, upsampled to the sample rate, drives a harmonic sine source
(fundamental + ``nb_harmonics`` overtones, unvoiced parts replaced by noise) that is merged to one channel.
The generator upsamples the mel with transposed convolutions and at each scale adds the source's STFT,
downsampled to match; a last convolution predicts log-magnitude and phase of a small STFT (n_fft 16, hop 4)
whose inverse is the waveform.

Random numbers (harmonic start phases, the source noise) come from a ``torch.Generator`` passed per call,
so a request's audio depends on its own seed only. Weight normalisation is folded into plain weights when
the checkpoint is loaded (see loader.py). Parameter names follow the official ``hift.pt``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.models.cosyvoice.config import F0Config, HiFTConfig


def _padding(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


class Snake(nn.Module):
    """x + sin²(αx)/α with a learned per-channel α."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C, T)."""
        alpha = self.alpha.unsqueeze(0).unsqueeze(-1)
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """Three dilated Snake-conv-Snake-conv residual units."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=_padding(kernel, d)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, padding=_padding(kernel)) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C, T)."""
        for conv1, conv2, act1, act2 in zip(
            self.convs1, self.convs2, self.activations1, self.activations2, strict=True
        ):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class F0Predictor(nn.Module):
    """Five conv+ELU layers and a linear read-out: mel (B, 80, T) -> F0 in Hz (B, T), non-negative."""

    def __init__(self, config: F0Config) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [
                nn.Conv1d(
                    config.in_channels if i == 0 else config.cond_channels, config.cond_channels, 3, padding=1
                ),
                nn.ELU(),
            ]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(config.cond_channels, config.num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, 80, T) -> (B, T)."""
        return torch.abs(self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1))


class HarmonicSource(nn.Module):
    """Sine source of F0 and its overtones, noise where unvoiced, merged by a linear layer and tanh."""

    def __init__(self, config: HiFTConfig) -> None:
        super().__init__()
        self.harmonics = config.nb_harmonics + 1
        self.sample_rate = config.sampling_rate
        self.upsample = config.hop_size
        self.amp = config.nsf_alpha
        self.noise_std = config.nsf_sigma
        self.voiced_threshold = config.nsf_voiced_threshold
        self.l_linear = nn.Linear(self.harmonics, 1)

    def _sines(self, f0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """f0: (B, L, 1) Hz at the sample rate -> harmonic sines (B, L, H)."""
        overtones = torch.arange(1, self.harmonics + 1, device=f0.device, dtype=f0.dtype)
        cycles = (f0 * overtones / self.sample_rate) % 1
        start = torch.rand(f0.size(0), self.harmonics, generator=generator).to(f0.device)
        start[:, 0] = 0  # the fundamental starts at phase 0, overtones at random phases
        cycles[:, 0, :] = cycles[:, 0, :] + start
        # Integrate the phase at frame rate and interpolate back: cheap, and smooth between frames.
        frames = F.interpolate(
            cycles.transpose(1, 2), scale_factor=1 / self.upsample, mode="linear"
        ).transpose(1, 2)
        phase = torch.cumsum(frames, dim=1) * 2 * math.pi
        phase = F.interpolate(
            phase.transpose(1, 2) * self.upsample, scale_factor=self.upsample, mode="linear"
        )
        return torch.sin(phase.transpose(1, 2)) * self.amp

    @staticmethod
    def _noise(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Standard normal noise shaped like ``like`` (B, L, H), drawn from ``generator``."""
        b, length, h = like.shape
        if like.device.type == "cpu":
            # Drawn into a (B, H, L) buffer seen as (B, L, H), as the reference draws it: normal_ on such a
            # strided view takes the generator's numbers in another order than a contiguous draw, and
            # matching it keeps CPU output equal to the reference's for the same seed.
            return torch.empty(b, h, length, dtype=like.dtype).transpose(1, 2).normal_(generator=generator)
        # On an accelerator: a contiguous draw there (the strided CPU draw costs ~15 ms per second of audio),
        # from a device generator seeded by the request's generator, so a request stays reproducible.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        device_generator = torch.Generator(device=like.device).manual_seed(seed)
        return torch.randn(like.shape, generator=device_generator, device=like.device, dtype=like.dtype)

    def forward(self, f0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """f0: (B, L, 1) -> excitation (B, L, 1)."""
        sines = self._sines(f0, generator)
        voiced = (f0 > self.voiced_threshold).to(sines.dtype)
        noise_amp = voiced * self.noise_std + (1 - voiced) * self.amp / 3
        noise = self._noise(sines, generator)
        return torch.tanh(self.l_linear(sines * voiced + noise_amp * noise))


class HiFTGenerator(nn.Module):
    """Mel (B, 80, T) -> waveform (B, T·hop) in [-audio_limit, audio_limit]."""

    stft_window: torch.Tensor

    def __init__(self, config: HiFTConfig) -> None:
        super().__init__()
        self.config = config
        base = config.base_channels
        spec_ch = config.n_fft + 2
        self.m_source = HarmonicSource(config)
        self.conv_pre = nn.Conv1d(config.in_channels, base, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(base // 2**i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes, strict=True))
        )
        # The source STFT enters each scale after a strided conv down to that scale's frame rate.
        rates = [1, *config.upsample_rates[::-1][:-1]]
        cumulative = [math.prod(rates[: i + 1]) for i in range(len(rates))][::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(
            zip(
                cumulative,
                config.source_resblock_kernel_sizes,
                config.source_resblock_dilation_sizes,
                strict=False,
            )
        ):
            ch = base // 2 ** (i + 1)
            down = nn.Conv1d(spec_ch, ch, 1) if u == 1 else nn.Conv1d(spec_ch, ch, u * 2, u, padding=u // 2)
            self.source_downs.append(down)
            self.source_resblocks.append(ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, d)
            for i in range(len(self.ups))
            for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes, strict=True)
        )
        self.conv_post = nn.Conv1d(base // 2 ** len(self.ups), spec_ch, 7, padding=3)
        self.f0_predictor = F0Predictor(config.f0)
        window = torch.hann_window(config.n_fft, periodic=True, dtype=torch.float64).float()
        self.register_buffer("stft_window", window, persistent=False)

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        n_fft, hop = self.config.n_fft, self.config.hop_len
        spec = torch.stft(x, n_fft, hop, n_fft, window=self.stft_window, return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1)

    def _istft(self, log_mag: torch.Tensor, phase_in: torch.Tensor) -> torch.Tensor:
        magnitude = torch.clip(torch.exp(log_mag), max=1e2)
        phase = torch.sin(phase_in)  # as trained: the phase passes through sin first
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        n_fft, hop = self.config.n_fft, self.config.hop_len
        return torch.istft(spec, n_fft, hop, n_fft, window=self.stft_window)

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, T) and excitation (B, 1, T·hop) -> waveform (B, T·hop)."""
        s = self._stft(source.squeeze(1))
        x = self.conv_pre(mel)
        kernels = len(self.config.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, self.config.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s))
            x = sum(self.resblocks[i * kernels + j](x) for j in range(kernels)) / kernels
        x = self.conv_post(F.leaky_relu(x))
        bins = self.config.n_fft // 2 + 1
        wave = self._istft(x[:, :bins], x[:, bins:])
        return torch.clamp(wave, -self.config.audio_limit, self.config.audio_limit)

    def excitation(self, mel: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The source signal (B, 1, T·hop) for a mel."""
        f0 = self.f0_predictor(mel)
        f0 = F.interpolate(f0.unsqueeze(1), scale_factor=float(self.config.hop_size), mode="nearest")
        return self.m_source(f0.transpose(1, 2), generator).transpose(1, 2)

    @torch.inference_mode()
    def forward(
        self, mel: torch.Tensor, generator: torch.Generator, cache_source: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveform (B, T·hop) and the excitation used; ``cache_source`` overrides the excitation's start
        (the end of the previous chunk's) so that chunk boundaries stay continuous."""
        source = self.excitation(mel, generator)
        if cache_source is not None and cache_source.size(2) > 0:
            source[:, :, : cache_source.size(2)] = cache_source.to(source.dtype)
        return self.decode(mel, source), source
