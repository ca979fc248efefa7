"""Streaming token -> waveform for one request: when to run the flow, and how chunks are stitched.

Schedule: the first chunk covers 25 tokens (plus the few that align prompt + chunk to the flow's 25-token
attention chunks) and waits for 3 more, which the flow's pre-lookahead layer reads ahead; each later chunk
doubles, up to 100 tokens. Every chunk re-runs the flow on all tokens so far (the fixed noise and chunked
attention keep earlier frames unchanged) and keeps the frames from the last chunk's end.

Stitching: the vocoder keeps its last 8 mel frames and the matching 8 x 480 samples of excitation and
audio; the next chunk is vocoded with those 8 frames in front (and the same excitation there), and its
first 3840 samples are cross-faded with the held-back audio by a Hamming window. So each chunk but the
last holds back 3840 samples, and a request yields exactly 960 samples (40 ms) per token in total.

All of this state lives in a :class:`TokenToWave` made per request; the modules it calls hold none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from core.models.cosyvoice.flow import CausalFlow
from core.models.cosyvoice.hift import HiFTGenerator

FIRST_HOP = 25
MAX_HOP = 100
HOP_GROWTH = 2
MEL_CACHE_FRAMES = 8


@dataclass
class ChunkSchedule:
    """Which token counts trigger a chunk. ``prompt_tokens`` is the flow prompt's token count."""

    prompt_tokens: int
    lookahead: int = 3
    first_hop: int = FIRST_HOP
    max_hop: int = MAX_HOP
    growth: int = HOP_GROWTH
    offset: int = 0
    hop: int = field(init=False)

    def __post_init__(self) -> None:
        self.hop = self.first_hop

    @property
    def this_hop(self) -> int:
        """Tokens the next chunk covers."""
        if self.offset == 0:
            # Pad the first chunk so prompt + chunk ends on a multiple of the flow's attention chunk.
            pad = math.ceil(self.prompt_tokens / self.first_hop) * self.first_hop - self.prompt_tokens
            return self.hop + pad
        return self.hop

    def ready(self, n_tokens: int) -> bool:
        """True when ``n_tokens`` generated tokens are enough for the next chunk (lookahead included)."""
        return n_tokens - self.offset >= self.this_hop + self.lookahead

    def advance(self) -> tuple[int, int]:
        """Take the next chunk: (its first token, tokens to pass the flow, lookahead included)."""
        start, end = self.offset, self.offset + self.this_hop
        self.offset = end
        self.hop = min(self.max_hop, self.hop * self.growth)
        return start, end + self.lookahead


@dataclass(frozen=True)
class VoicePrompt:
    """What conditions synthesis on a speaker: all tensors on the CPU, batch dim 1.

    ``text_ids`` (1-D) and ``lm_speech_ids`` (1-D) prompt the language model (empty: no LM prompt);
    ``flow_speech_ids`` (1, P), ``feat`` (1, 2P, 80) and ``embedding`` (1, 192) condition the flow.
    """

    text_ids: torch.Tensor
    lm_speech_ids: torch.Tensor
    flow_speech_ids: torch.Tensor
    feat: torch.Tensor
    embedding: torch.Tensor

    @staticmethod
    def empty(spk_dim: int = 192, embedding: torch.Tensor | None = None) -> VoicePrompt:
        """No recording: nothing for the LM, only an (optional) speaker embedding for the flow."""
        none = torch.zeros(0, dtype=torch.long)
        return VoicePrompt(
            text_ids=none,
            lm_speech_ids=none,
            flow_speech_ids=none.reshape(1, 0),
            feat=torch.zeros(1, 0, 80),
            embedding=torch.zeros(0, spk_dim) if embedding is None else embedding.reshape(1, -1).float(),
        )


@dataclass
class TokenToWave:
    """Per-request streaming vocoding state: the vocoder's cached mel, excitation and audio tail."""

    flow: CausalFlow
    hift: HiFTGenerator
    prompt: VoicePrompt
    generator: torch.Generator
    token_mel_ratio: int = 2
    mel_cache: torch.Tensor | None = None
    source_cache: torch.Tensor | None = None
    speech_cache: torch.Tensor | None = None
    window: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.window = np.hamming(2 * self.source_cache_len)

    @property
    def source_cache_len(self) -> int:
        """Samples held back at each chunk end (the vocoder cache, 8 frames)."""
        return MEL_CACHE_FRAMES * self.hift.config.hop_size

    def _crossfade(self, speech: torch.Tensor) -> torch.Tensor:
        if self.speech_cache is None:
            return speech
        n = len(self.window) // 2
        head = speech[:, :n].double().cpu().numpy() * self.window[:n]
        tail = self.speech_cache[:, -n:].double().cpu().numpy() * self.window[n:]
        speech = speech.clone()
        speech[:, :n] = torch.from_numpy(head + tail).to(speech.dtype)
        return speech

    def chunk(
        self, tokens: torch.Tensor, token_offset: int, *, finalize: bool, streaming: bool = True
    ) -> torch.Tensor:
        """Audio (1, samples) float32 of ``tokens`` (1, N) from ``token_offset`` on.

        Unless ``finalize``, the last lookahead tokens are only read ahead and the last 3840 samples are held
        back for the next chunk's cross-fade.
        """
        p = self.prompt
        mel = self.flow(
            tokens, p.flow_speech_ids, p.feat, p.embedding, streaming=streaming, finalize=finalize
        )
        mel = mel[:, :, token_offset * self.token_mel_ratio :]
        cache_source = None
        if self.mel_cache is not None:
            mel = torch.cat([self.mel_cache.to(mel.device), mel], dim=2)
            cache_source = self.source_cache
        speech, source = self.hift(mel.float(), self.generator, cache_source)
        speech = self._crossfade(speech.float().cpu())
        if finalize:
            return speech
        keep = self.source_cache_len
        self.mel_cache = mel[:, :, -MEL_CACHE_FRAMES:]
        self.source_cache = source[:, :, -keep:]
        self.speech_cache = speech[:, -keep:]
        return speech[:, :-keep]
