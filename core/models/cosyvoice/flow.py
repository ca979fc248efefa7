"""Speech tokens -> 80-band mel at 50 Hz: the token encoder, then conditional flow matching.

The prompt's tokens are encoded together with the new ones, and the prompt's mel is given to the estimator
as a condition, so the new frames continue the prompt speaker's voice. The ODE is solved with a fixed
number of Euler steps on a cosine time schedule, with classifier-free guidance (a second, unconditioned
estimator pass in the same batch). The starting noise is one fixed sequence (seed 0) sliced to length:
re-running the flow on a longer token prefix reproduces the frames it already produced, which is what
lets the streaming path recompute from the start and keep only the new frames.

Parameter names follow the official ``flow.pt``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.models.cosyvoice.config import FlowConfig
from core.models.cosyvoice.flow_encoder import UpsampleConformerEncoder
from core.models.cosyvoice.flow_estimator import CausalConditionalDecoder

#: Length of the fixed noise (frames at 50 Hz: 300 s), as in the released model.
NOISE_FRAMES = 50 * 300


def fixed_noise(channels: int = 80, frames: int = NOISE_FRAMES) -> torch.Tensor:
    """The deterministic starting noise: standard normal from a CPU generator seeded with 0."""
    return torch.randn(1, channels, frames, generator=torch.Generator().manual_seed(0))


class FlowMatching(nn.Module):
    """Holds the estimator and solves the guided flow ODE from the fixed noise."""

    noise: torch.Tensor

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        self.estimator = CausalConditionalDecoder(config.estimator)
        self.register_buffer("noise", fixed_noise(config.output_size), persistent=False)

    def time_span(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The ODE time points in [0, 1]."""
        t = torch.linspace(0, 1, self.config.cfm.n_timesteps + 1, device=device, dtype=dtype)
        if self.config.cfm.t_scheduler == "cosine":
            t = 1 - torch.cos(t * 0.5 * torch.pi)
        return t

    def forward(
        self, mu: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor, *, streaming: bool
    ) -> torch.Tensor:
        """mu, cond: (1, 80, T); spks: (1, 80) -> mel (1, 80, T) in float32."""
        frames = mu.size(2)
        if frames > self.noise.size(2):
            raise ValueError(f"the flow handles at most {self.noise.size(2)} frames, got {frames}")
        x = self.noise[:, :, :frames].to(mu.dtype)
        span = self.time_span(mu.device, mu.dtype)
        cfg = self.config.cfm.inference_cfg_rate
        # Row 0 is conditioned, row 1 is the unconditioned pass of classifier-free guidance.
        mu2 = torch.cat([mu, torch.zeros_like(mu)])
        spks2 = torch.cat([spks, torch.zeros_like(spks)])
        cond2 = torch.cat([cond, torch.zeros_like(cond)])
        t, dt = span[0], span[1] - span[0]
        for step in range(1, len(span)):
            v = self.estimator(x.expand(2, -1, -1), mu2, t.expand(2), spks2, cond2, streaming=streaming)
            v_cond, v_free = v[:1], v[1:]
            x = x + dt * ((1.0 + cfg) * v_cond - cfg * v_free)
            t = t + dt
            if step < len(span) - 1:
                dt = span[step + 1] - t
        return x.float()


class CausalFlow(nn.Module):
    """Tokens (+ prompt tokens, prompt mel, speaker embedding) -> mel of the new tokens."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        self.input_embedding = nn.Embedding(config.vocab_size, config.input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.output_size)
        self.encoder = UpsampleConformerEncoder(config.encoder)
        self.encoder_proj = nn.Linear(config.encoder.output_size, config.output_size)
        self.decoder = FlowMatching(config)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        prompt_tokens: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        *,
        streaming: bool,
        finalize: bool,
    ) -> torch.Tensor:
        """Mel (1, 80, frames) of ``tokens`` (1, N) after the prompt.

        ``prompt_tokens`` (1, P) and ``prompt_feat`` (1, 2P, 80) may be empty; ``embedding`` is (1, 192) or
        (0, 192) for none. Unless ``finalize``, the last ``pre_lookahead_len`` tokens are only looked ahead
        at, so ``2 x (N - lookahead)`` frames come out; at the end of the text all ``2N`` do.
        """
        weight = self.spk_embed_affine_layer.weight
        dtype = weight.dtype
        if embedding.numel() == 0:
            embedding = torch.zeros(1, self.config.spk_embed_dim, device=weight.device, dtype=dtype)
        spks = self.spk_embed_affine_layer(F.normalize(embedding.to(weight.device).float(), dim=1).to(dtype))
        all_tokens = torch.cat([prompt_tokens, tokens], dim=1).to(weight.device)
        x = self.input_embedding(all_tokens.clamp(min=0).long())
        if finalize:
            h = self.encoder(x, streaming=streaming)
        else:
            ahead = self.config.pre_lookahead_len
            h = self.encoder(x[:, :-ahead], x[:, -ahead:], streaming=streaming)
        prompt_frames = prompt_feat.size(1)
        mu = self.encoder_proj(h).transpose(1, 2)
        cond = torch.zeros_like(mu)
        cond[:, :, :prompt_frames] = prompt_feat.to(mu.device, mu.dtype).transpose(1, 2)
        mel = self.decoder(mu, spks, cond, streaming=streaming)
        return mel[:, :, prompt_frames:]
