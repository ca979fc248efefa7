"""The flow-matching velocity estimator: a causal 1-D U-Net with transformer blocks (Matcha-TTS style).

Input is the noisy mel ``x``, the encoder output ``mu``, the speaker vector and the prompt-mel condition,
stacked on the channel axis (4 x 80 channels); a sinusoidal embedding of the ODE time ``t`` is added inside
every ResNet block. Convolutions are causal (left padding only), LayerNorm replaces GroupNorm, and in
streaming mode self-attention is restricted to the current and earlier chunks of ``static_chunk_size``
frames, so frames of finished chunks do not change when later frames are added.

Parameter names follow the official ``flow.pt`` (``decoder.estimator.*``). The empty slots in some module
lists (``_Slot``) stand where the original layout keeps parameter-free modules, so indices line up.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from core.models.cosyvoice.config import EstimatorConfig
from core.models.cosyvoice.flow_encoder import chunk_mask


class _Slot(nn.Identity):
    """A parameter-free placeholder keeping checkpoint indices aligned."""


class CausalConv1d(nn.Conv1d):
    """A stride-1 convolution padded on the left only."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)
        self.left = kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C', T)."""
        return super().forward(F.pad(x, (self.left, 0)))


class CausalBlock(nn.Module):
    """Causal conv (k=3) -> LayerNorm over channels -> Mish, masked before and after."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.block = nn.ModuleList([CausalConv1d(dim, dim_out, 3), _Slot(), nn.LayerNorm(dim_out)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C', T)."""
        y = self.block[0](x)
        y = self.block[2](y.transpose(1, 2)).transpose(1, 2)
        return F.mish(y)


class ResnetBlock(nn.Module):
    """Two causal blocks with the time embedding added between them, plus a 1x1 residual projection."""

    def __init__(self, dim: int, dim_out: int, time_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = CausalBlock(dim, dim_out)
        self.block2 = CausalBlock(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T); t: (B, time_dim)."""
        h = self.block1(x) + self.mlp(t).unsqueeze(-1)
        return self.block2(h) + self.res_conv(x)


class Attention(nn.Module):
    """Multi-head self-attention without q/k/v biases (inner width heads x head_dim)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), _Slot()])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, T, dim); mask: boolean (T, T) where True may be attended, or None."""
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)), attn_mask=mask
        )
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class _GeluProj(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class _FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([_GeluProj(dim, 4 * dim), _Slot(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm self-attention and GELU feed-forward (4x), each with a residual."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = _FeedForward(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, dim) -> (B, T, dim)."""
        x = x + self.attn1(self.norm1(x), mask)
        return x + self.ff(self.norm3(x))


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal embedding of t."""

    def __init__(self, in_channels: int, time_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_dim)
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels) -> (B, time_dim)."""
        return self.linear_2(F.silu(self.linear_1(x)))


def sinusoidal_time(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """(B,) times in [0, 1] -> (B, dim) sin/cos features (first half sin, second half cos)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    angle = scale * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((angle.sin(), angle.cos()), dim=-1)


class _Down(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Up(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _parts(stage: nn.Module) -> list[nn.Module]:
    """The modules of a checkpoint-indexed stage (a ModuleList)."""
    return list(cast(nn.ModuleList, stage))


def _transformers(dim: int, config: EstimatorConfig) -> nn.ModuleList:
    return nn.ModuleList(
        TransformerBlock(dim, config.num_heads, config.attention_head_dim) for _ in range(config.n_blocks)
    )


class CausalConditionalDecoder(nn.Module):
    """Predicts the flow velocity d x / d t: (B, 80, T) from x, mu, speaker, condition and t."""

    def __init__(self, config: EstimatorConfig) -> None:
        super().__init__()
        self.config = config
        channels = tuple(config.channels)
        time_dim = channels[0] * 4
        self.time_mlp = TimestepEmbedding(config.in_channels, time_dim)
        self.down_blocks = nn.ModuleList()
        self.mid_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        out_ch = config.in_channels
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            last = i == len(channels) - 1
            down: nn.Module = CausalConv1d(out_ch, out_ch, 3) if last else _Down(out_ch)
            self.down_blocks.append(
                nn.ModuleList([ResnetBlock(in_ch, out_ch, time_dim), _transformers(out_ch, config), down])
            )
        for _ in range(config.num_mid_blocks):
            self.mid_blocks.append(
                nn.ModuleList(
                    [ResnetBlock(channels[-1], channels[-1], time_dim), _transformers(channels[-1], config)]
                )
            )
        up_channels = (*channels[::-1], channels[0])
        for i in range(len(up_channels) - 1):
            out_ch = up_channels[i + 1]
            last = i == len(up_channels) - 2
            up: nn.Module = CausalConv1d(out_ch, out_ch, 3) if last else _Up(out_ch)
            self.up_blocks.append(
                nn.ModuleList(
                    [ResnetBlock(2 * up_channels[i], out_ch, time_dim), _transformers(out_ch, config), up]
                )
            )
        self.final_block = CausalBlock(up_channels[-1], up_channels[-1])
        self.final_proj = nn.Conv1d(up_channels[-1], config.out_channels, 1)

    def _attend(self, blocks: nn.Module, x: torch.Tensor, streaming: bool) -> torch.Tensor:
        mask = chunk_mask(x.size(2), self.config.static_chunk_size, x.device) if streaming else None
        h = x.transpose(1, 2)
        for block in _parts(blocks):
            h = block(h, mask)
        return h.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        *,
        streaming: bool = False,
    ) -> torch.Tensor:
        """x, mu, cond: (B, 80, T); t: (B,); spks: (B, 80) -> velocity (B, 80, T)."""
        temb = self.time_mlp(sinusoidal_time(t, self.config.in_channels).to(t.dtype))
        h = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.size(2)), cond], dim=1)
        skips = []
        for stage in self.down_blocks:
            resnet, blocks, down = _parts(stage)
            h = self._attend(blocks, resnet(h, temb), streaming)
            skips.append(h)
            h = down(h)
        for stage in self.mid_blocks:
            resnet, blocks = _parts(stage)
            h = self._attend(blocks, resnet(h, temb), streaming)
        for stage in self.up_blocks:
            resnet, blocks, up = _parts(stage)
            skip = skips.pop()
            h = torch.cat([h[:, :, : skip.size(-1)], skip], dim=1)
            h = up(self._attend(blocks, resnet(h, temb), streaming))
        return self.final_proj(self.final_block(h))
