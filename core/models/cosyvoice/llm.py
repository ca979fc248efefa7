"""The speech-token language model: a Qwen2 backbone that continues text with 25 Hz speech tokens.

The input sequence is ``[sos] + text + [task] + prompt speech tokens`` as embeddings: text through the Qwen
token embedding, the two markers from a 2-row embedding, speech tokens from their own table. Each step the
last hidden state goes through a linear head over ``speech_token_size + 3`` classes: the speech tokens, end
of speech (``speech_token_size``) and two ids used only in bi-streaming training, which we never sample.

Parameter names follow the official ``llm.pt``: ``llm_embedding``, ``llm.model.model.*`` (the Qwen2 model
inside a ``Qwen2ForCausalLM`` inside a wrapper), ``llm_decoder``, ``speech_embedding``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from core.models.base import CancelToken
from core.models.cosyvoice.config import LMConfig, SamplingConfig


class _CausalLMSlot(nn.Module):
    """Gives the backbone the name ``model`` (a ``Qwen2ForCausalLM`` holds its ``Qwen2Model`` there)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.model = backbone


class _EncoderSlot(nn.Module):
    """The official ``Qwen2Encoder`` wrapper's name for the causal LM: ``llm.model``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.model = _CausalLMSlot(backbone)


class SpeechTokenLM(nn.Module):
    """Qwen2 backbone + speech-token embedding and head."""

    def __init__(self, backbone: nn.Module, config: LMConfig) -> None:
        super().__init__()
        size, vocab = config.hidden_size, config.speech_token_size
        self.config = config
        self.llm_embedding = nn.Embedding(2, size)
        self.llm = _EncoderSlot(backbone)
        self.llm_decoder = nn.Linear(size, vocab + 3)
        self.speech_embedding = nn.Embedding(vocab + 3, size)

    @property
    def backbone(self) -> Any:
        """The transformers ``Qwen2Model``."""
        return self.llm.model.model

    @property
    def eos(self) -> int:
        """The end-of-speech class id."""
        return self.config.speech_token_size

    def prefix(self, text_ids: torch.Tensor, prompt_speech_ids: torch.Tensor) -> torch.Tensor:
        """``[sos] + text + [task] + prompt speech`` embeddings, shape (1, L, hidden); ids are 1-D."""
        device = self.llm_embedding.weight.device
        marks = self.llm_embedding.weight
        parts = [
            marks[0:1],
            self.backbone.embed_tokens(text_ids.to(device)),
            marks[1:2],
            self.speech_embedding(prompt_speech_ids.to(device)),
        ]
        return torch.cat(parts, dim=0).unsqueeze(0)

    def step(self, embeds: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """Run the backbone on new input embeddings; returns float32 log-probs of the last position and the cache."""
        out = self.backbone(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state[:, -1]
        logits = self.llm_decoder(hidden).float()
        return logits.log_softmax(dim=-1)[0], out.past_key_values

    def token_embedding(self, token: int) -> torch.Tensor:
        """The (1, 1, hidden) input embedding of one generated speech token."""
        return self.speech_embedding.weight[token].reshape(1, 1, -1)


class Sampler(Protocol):
    """Picks the next speech token from log-probs (1-D, float32, on the CPU)."""

    def __call__(self, logp: torch.Tensor, history: Sequence[int], allow_eos: bool) -> int: ...


@dataclass
class RasSampler:
    """Repetition-aware sampling: nucleus (top-p within top-k) sampling, falling back to sampling from the
    whole distribution when the nucleus pick already fills ``tau_r`` of the last ``win_size`` tokens."""

    config: SamplingConfig
    eos: int
    generator: torch.Generator
    max_trials: int = 100

    def _nucleus(self, probs: torch.Tensor) -> int:
        sorted_p, order = probs.sort(descending=True, stable=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p  # mass strictly before each candidate
        keep = (before < self.config.top_p) & (torch.arange(len(sorted_p)) < self.config.top_k)
        keep[0] = True
        pick = torch.multinomial(sorted_p[keep], 1, generator=self.generator)
        return int(order[keep][pick])

    def _one(self, probs: torch.Tensor, history: Sequence[int]) -> int:
        token = self._nucleus(probs)
        window = list(history[-self.config.win_size :])
        if window.count(token) >= self.config.win_size * self.config.tau_r:
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        return token

    def __call__(self, logp: torch.Tensor, history: Sequence[int], allow_eos: bool) -> int:
        probs = logp.softmax(dim=0)
        probs[self.eos + 1 :] = 0.0  # the bi-streaming ids never appear in unistream decoding
        for _ in range(self.max_trials):
            token = self._one(probs, history)
            if allow_eos or token != self.eos:
                return token
        # Resampling keeps picking the end: take the best speech token instead of failing the request.
        return int(probs[: self.eos].argmax())


def decode_lengths(n_text_tokens: int, config: LMConfig) -> tuple[int, int]:
    """(min, max) number of speech tokens for a text of ``n_text_tokens`` tokens (prompt text excluded)."""
    return int(n_text_tokens * config.min_token_text_ratio), int(n_text_tokens * config.max_token_text_ratio)


@torch.inference_mode()
def generate(
    lm: SpeechTokenLM,
    prefix: torch.Tensor,
    *,
    min_len: int,
    max_len: int,
    sampler: Sampler,
    cancel: CancelToken | None = None,
    on_logp: Callable[[torch.Tensor], None] | None = None,
) -> Iterator[int]:
    """Yield speech tokens one by one until end of speech, ``max_len`` tokens or ``cancel``.

    ``cancel`` is checked before every step, so a cancelled request costs at most the step in flight.
    """
    tokens: list[int] = []
    cache: Any = None
    embeds = prefix
    for i in range(max_len):
        if cancel is not None and cancel.is_set():
            return
        logp, cache = lm.step(embeds, cache)
        logp = logp.cpu()
        if on_logp is not None:
            on_logp(logp)
        token = sampler(logp, tokens, i >= min_len)
        if token == lm.eos:
            return
        tokens.append(token)
        yield token
        embeds = lm.token_embedding(token)
