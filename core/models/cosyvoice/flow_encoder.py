"""The flow's token encoder: a conformer-style stack at 25 Hz, a x2 upsampling, a second stack at 50 Hz.

Attention is Transformer-XL relative-position attention (ESPnet's "rel_pos_espnet" variant): scores are
``(q + u)·k`` plus ``(q + v)·W p(i - j)``, where ``p(r)`` is the sinusoidal encoding of the signed distance
``r``. In streaming mode each position sees its own chunk and every chunk before it (``static_chunk_size``
tokens, doubled after the upsampling), which is what makes the early mel frames final before the text
ends. A small causal "pre-lookahead" convolution lets each token look ``pre_lookahead_len`` tokens ahead;
while streaming, those future tokens are passed as ``context`` instead of being zero-padded.

Only batch size 1 without padding is supported: inference runs one utterance at a time.
Parameter names follow the official ``flow.pt`` (``encoder.*``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.models.cosyvoice.config import EncoderConfig


def relative_positions(
    length: int, d_model: int, *, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Sinusoidal encodings of the distances ``length-1, ..., 0, ..., -(length-1)``: (1, 2L-1, d_model)."""
    distance = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device).unsqueeze(1)
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d_model)
    )
    angle = distance * inv_freq
    pe = torch.empty(2 * length - 1, d_model, dtype=torch.float32, device=device)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)
    return pe.unsqueeze(0).to(dtype)


def chunk_mask(length: int, chunk: int, device: torch.device) -> torch.Tensor | None:
    """Boolean (length, length) mask: position i sees every position before the end of its chunk.

    ``chunk <= 0`` means full attention (None).
    """
    if chunk <= 0:
        return None
    pos = torch.arange(length, device=device)
    chunk_end = (pos // chunk + 1) * chunk
    return pos.unsqueeze(0) < chunk_end.unsqueeze(1)


class RelPositionAttention(nn.Module):
    """Multi-head self-attention with relative positions and the two learned biases ``u``, ``v``."""

    def __init__(self, heads: int, size: int) -> None:
        super().__init__()
        self.heads, self.d_k = heads, size // heads
        self.linear_q = nn.Linear(size, size)
        self.linear_k = nn.Linear(size, size)
        self.linear_v = nn.Linear(size, size)
        self.linear_out = nn.Linear(size, size)
        self.linear_pos = nn.Linear(size, size, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.d_k))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1, self.heads, self.d_k)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (1, T, size); pos: (1, 2T-1, size); mask: boolean (T, T) or None."""
        length = x.size(1)
        q = self._heads(self.linear_q(x))  # (1, T, H, d): the biases u, v broadcast over T here
        k = self._heads(self.linear_k(x)).transpose(1, 2)  # (1, H, T, d)
        v = self._heads(self.linear_v(x)).transpose(1, 2)
        p = self._heads(self.linear_pos(pos)).transpose(1, 2)  # (1, H, 2T-1, d)
        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        by_distance = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))
        # Column T-1-i+j of row i holds distance i-j: pick those out to get a (T, T) matrix.
        rows = torch.arange(length, device=x.device)
        index = (length - 1 - rows).unsqueeze(1) + rows.unsqueeze(0)
        by_distance = by_distance.gather(-1, index.expand(*by_distance.shape[:2], length, length))
        scores = (content + by_distance) / math.sqrt(self.d_k)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(x.size(0), length, -1)
        return self.linear_out(out)


class FeedForward(nn.Module):
    """Position-wise feed-forward with SiLU."""

    def __init__(self, size: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(size, hidden)
        self.w_2 = nn.Linear(hidden, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…, size) -> (…, size)."""
        return self.w_2(F.silu(self.w_1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm block: relative-position self-attention, then feed-forward, each with a residual."""

    def __init__(self, size: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.self_attn = RelPositionAttention(heads, size)
        self.feed_forward = FeedForward(size, hidden)
        self.norm_mha = nn.LayerNorm(size, eps=1e-12)
        self.norm_ff = nn.LayerNorm(size, eps=1e-12)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(1, T, size) -> (1, T, size)."""
        x = x + self.self_attn(self.norm_mha(x), pos, mask)
        return x + self.feed_forward(self.norm_ff(x))


class LinearInput(nn.Module):
    """Linear + LayerNorm input projection, scaled by sqrt(size) as the positional scheme expects."""

    def __init__(self, in_size: int, size: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(in_size, size), nn.LayerNorm(size, eps=1e-5))
        self.scale = math.sqrt(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(1, T, in_size) -> (1, T, size)."""
        return self.out(x) * self.scale


class PreLookahead(nn.Module):
    """Causal convolution over ``lookahead + 1`` tokens to the right, then a 3-token causal convolution."""

    def __init__(self, channels: int, lookahead: int) -> None:
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (1, T, C); context: (1, <=lookahead, C) future tokens, or None for the end of the text."""
        y = x.transpose(1, 2)
        if context is not None and context.size(1) > 0:
            y = torch.cat([y, context.transpose(1, 2)], dim=2)
            y = F.pad(y, (0, self.lookahead - context.size(1)))
        else:
            y = F.pad(y, (0, self.lookahead))
        y = F.leaky_relu(self.conv1(y))
        y = self.conv2(F.pad(y, (2, 0)))
        return y.transpose(1, 2) + x


class Upsample(nn.Module):
    """Nearest-neighbour x``stride`` in time, then a causal convolution."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, kernel_size=2 * stride + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(1, C, T) -> (1, C, stride·T)."""
        y = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(F.pad(y, (2 * self.stride, 0)))


class UpsampleConformerEncoder(nn.Module):
    """Token embeddings (1, T, input_size) -> features (1, 2T, output_size)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        size = config.output_size
        self.config = config
        self.embed = LinearInput(config.input_size, size)
        self.pre_lookahead_layer = PreLookahead(size, config.pre_lookahead_len)
        self.encoders = nn.ModuleList(
            EncoderLayer(size, config.attention_heads, config.linear_units) for _ in range(config.num_blocks)
        )
        self.up_layer = Upsample(size, config.up_stride)
        self.up_embed = LinearInput(size, size)
        self.up_encoders = nn.ModuleList(
            EncoderLayer(size, config.attention_heads, config.linear_units)
            for _ in range(config.num_up_blocks)
        )
        self.after_norm = nn.LayerNorm(size, eps=1e-5)

    def _stack(self, layers: nn.ModuleList, x: torch.Tensor, chunk: int) -> torch.Tensor:
        pos = relative_positions(x.size(1), x.size(2), device=x.device, dtype=x.dtype)
        mask = chunk_mask(x.size(1), chunk, x.device)
        for layer in layers:
            x = layer(x, pos, mask)
        return x

    def forward(
        self, xs: torch.Tensor, context: torch.Tensor | None = None, *, streaming: bool = False
    ) -> torch.Tensor:
        """Encode ``xs``; ``context`` holds the lookahead tokens that follow it (streaming chunks)."""
        if xs.size(0) != 1:
            raise ValueError("the flow encoder runs one utterance at a time (batch size 1)")
        chunk = self.config.static_chunk_size if streaming else 0
        x = self.embed(xs)
        ctx = self.embed(context) if context is not None and context.size(1) > 0 else None
        x = self.pre_lookahead_layer(x, ctx)
        x = self._stack(self.encoders, x, chunk)
        x = self.up_layer(x.transpose(1, 2)).transpose(1, 2)
        x = self._stack(self.up_encoders, self.up_embed(x), chunk * self.config.up_stride)
        return self.after_norm(x)
