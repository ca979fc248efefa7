"""Any transformers causal LM with a chat template as the ``LLM``: Qwen2.5-7B-Instruct on a GPU, SmolLM2 on a CPU.

Generation is our own loop, one token per forward pass with a KV cache, rather than ``generate`` on a thread
with a ``TextIteratorStreamer``: the loop runs on the caller's thread, checks the cancel token before and
after every forward pass (so a barge-in costs at most the token being computed), needs no thread to clean
up, and hands each token out the moment it exists.

With ``compile=True`` the one-token decode step runs through ``torch.compile`` on a static KV cache, whose
fixed shapes let the compiled graph (and, on CUDA, its CUDA graph) be reused for every token. The static
cache is shared, so a stream started while another is unfinished ends the older one.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.models.base import CancelToken, ChatMessage, NeverCancel
from core.models.device import resolve_attention, resolve_device, resolve_dtype

ROLES = ("system", "user", "assistant")
# End-of-turn markers of the common chat formats: stopping on them too guards against a generation config
# that names only the end-of-text token.
_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class LLMError(RuntimeError):
    """An LLM that cannot be loaded, or a request it cannot serve (bad messages, prompt too long)."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy, or temperature and nucleus (top-p) sampling."""

    temperature: float = 0.7
    top_p: float = 0.9
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise LLMError(f"bad sampling settings: temperature={self.temperature}, top_p={self.top_p}")

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """The next token id from a 1-D row of logits."""
        if self.greedy or self.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p >= 1.0:
            return int(torch.multinomial(probs, 1, generator=generator))
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest head of the distribution whose mass reaches top_p (the first token always).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= self.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])


class TextDeltas:
    """Turns token ids, one at a time, into text pieces that never end inside a character.

    A character can span several byte-level tokens (most CJK characters, emoji), and decoding such a token
    alone gives U+FFFD. Text is decoded over a short window of recent tokens and released only once it no
    longer ends in U+FFFD. The window starts one emitted piece back, so tokenizers whose decoding of a
    token depends on its neighbour (SentencePiece's leading space) decode it as in the full text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._start = 0  # first id of the decode window
        self._done = 0  # ids before this are already out as text
        self._done_text = ""  # the window's text up to _done

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def push(self, token_id: int) -> str:
        """Add one token; returns the new complete text (often "" while a character is unfinished)."""
        self._ids.append(token_id)
        text = self._decode(self._ids[self._start :])
        if text.endswith("\ufffd") or len(text) <= len(self._done_text):
            return ""
        delta = text[len(self._done_text) :]
        self._start, self._done = self._done, len(self._ids)
        self._done_text = self._decode(self._ids[self._start : self._done])
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the very end of the output)."""
        text = self._decode(self._ids[self._start :])
        tail = text[len(self._done_text) :]
        self._start = self._done = len(self._ids)
        self._done_text = ""
        return tail


def check_messages(messages: Sequence[ChatMessage]) -> None:
    """A clear ``LLMError`` for a conversation a chat template cannot render."""
    if not messages:
        raise LLMError("no messages to answer")
    for message in messages:
        if message.role not in ROLES:
            raise LLMError(f"unknown message role '{message.role}' (expected one of {', '.join(ROLES)})")
        if not isinstance(message.content, str):
            raise LLMError("message content must be text")


def _has_accelerate() -> bool:
    return importlib.util.find_spec("accelerate") is not None


def _stop_ids(tokenizer: Any, generation_config: Any) -> frozenset[int]:
    ids: set[int] = set()
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    added = tokenizer.get_added_vocab()
    ids.update(added[token] for token in _END_OF_TURN if token in added)
    return frozenset(int(i) for i in ids)


class TransformersLLM:
    """A chat LLM from a hub id or a local transformers folder, streaming its reply token by token.

    The conversation is given whole on every call (the session keeps it; see ``core.models.chat``). One
    stream is meant to run at a time; iterate it on one thread and cancel it from any thread.
    """

    # transformers' auto classes are typed loosely; Any keeps mypy from guessing wrong.
    model: Any
    tokenizer: Any

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        attn_implementation: str = "auto",
        compile: bool = False,
        temperature: float = 0.7,
        top_p: float = 0.9,
        greedy: bool = False,
        seed: int | None = None,
        max_context: int = 8192,
        static_cache: bool | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(device, error=LLMError)
        self.dtype = resolve_dtype(dtype, self.device, error=LLMError)
        self.attn_implementation = resolve_attention(attn_implementation, self.device, self.dtype)
        self.sampling = Sampling(temperature=temperature, top_p=top_p, greedy=greedy)
        self.name = name or f"transformers:{Path(str(path)).name or path}"
        # Straight onto the GPU needs accelerate's device_map; without it the weights pass through CPU memory.
        placement = (
            {"device_map": str(self.device)} if _has_accelerate() and self.device.type == "cuda" else {}
        )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=self.dtype, attn_implementation=self.attn_implementation, **placement
            )
        except (OSError, ValueError, ImportError) as exc:
            raise LLMError(f"cannot load an LLM from '{path}': {exc}") from exc
        if not self.tokenizer.chat_template:
            raise LLMError(f"'{path}' has no chat template: not a chat model")
        self.model.eval()
        if not placement:
            self.model.to(device=self.device)
        self.max_context = min(max_context, int(self.model.config.max_position_embeddings))
        self.stop_ids = _stop_ids(self.tokenizer, self.model.generation_config)
        # Embedding matrices are often padded past the tokenizer; those ids are no text and must not be drawn.
        self._vocab_size = len(self.tokenizer)
        self.seed = seed
        self._static = compile if static_cache is None else static_cache
        self._cache: Any = None
        self._owner: object | None = None
        self._decode_forward = self.model.forward
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._decode_forward = torch.compile(self.model.forward, mode=mode)

    def render_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text the model sees: the chat template applied, ending where the reply begins."""
        check_messages(messages)
        rendered = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
        return str(rendered)

    def prompt_ids(self, messages: Sequence[ChatMessage]) -> torch.Tensor:
        """The prompt as a (1, length) tensor of token ids on the model's device."""
        # The template writes any BOS itself, so the tokenizer must not add another.
        ids = self.tokenizer(self.render_prompt(messages), add_special_tokens=False)["input_ids"]
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def token_stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_new_tokens: int = 256,
        cancel: CancelToken | None = None,
    ) -> Iterator[int]:
        """Yield the reply's token ids (without the end-of-turn token); stop within one once ``cancel`` is set."""
        if max_new_tokens < 1:
            raise LLMError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        prompt = self.prompt_ids(messages)
        room = self.max_context - prompt.shape[1]
        if room < 1:
            raise LLMError(
                f"prompt of {prompt.shape[1]} tokens does not fit the context of {self.max_context}"
            )
        return self._decode(
            prompt, min(max_new_tokens, room), cancel if cancel is not None else NeverCancel()
        )

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_new_tokens: int = 256,
        cancel: CancelToken | None = None,
    ) -> Iterator[str]:
        """Yield the reply as text pieces as tokens are generated; stop within one token once ``cancel`` is set."""
        cancel = cancel if cancel is not None else NeverCancel()
        tokens = self.token_stream(messages, max_new_tokens=max_new_tokens, cancel=cancel)
        return self._text(tokens, cancel)

    def _text(self, tokens: Iterator[int], cancel: CancelToken) -> Iterator[str]:
        deltas = TextDeltas(self.tokenizer)
        for token in tokens:
            piece = deltas.push(token)
            if piece:
                yield piece
        tail = deltas.flush()
        if tail and not cancel.is_set():
            yield tail

    def warmup(self) -> None:
        """Generate a few tokens, so kernels (and compiled graphs) are ready before the first user."""
        for _ in self.stream([ChatMessage("user", "Hello!")], max_new_tokens=8):
            pass

    def _new_cache(self, owner: object) -> Any:
        from transformers import DynamicCache, StaticCache

        if not self._static:
            return DynamicCache(config=self.model.config)
        if self._cache is None:
            self._cache = StaticCache(config=self.model.config, max_cache_len=self.max_context)
        with torch.inference_mode():  # its tensors were made in inference mode and may only change there
            self._cache.reset()
        self._owner = owner
        return self._cache

    def _next_token(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        if logits.shape[-1] > self._vocab_size:
            logits = logits.clone()
            logits[self._vocab_size :] = float("-inf")
        return self.sampling.pick(logits, generator)

    def _forward(self, forward: Any, ids: torch.Tensor, start: int, cache: Any) -> torch.Tensor:
        positions = torch.arange(start, start + ids.shape[1], device=self.device)
        out = forward(
            input_ids=ids,
            position_ids=positions.unsqueeze(0),
            cache_position=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[0, -1]

    def _decode(self, prompt: torch.Tensor, budget: int, cancel: CancelToken) -> Iterator[int]:
        owner = object()
        cache = self._new_cache(owner)
        # A seed makes every reply reproducible: the same conversation gets the same answer.
        generator = None if self.seed is None else torch.Generator(self.device).manual_seed(self.seed)
        ids, forward, position = prompt, self.model.forward, 0
        for _ in range(budget):
            if cancel.is_set() or (self._static and self._owner is not owner):
                return
            with torch.inference_mode():
                logits = self._forward(forward, ids, position, cache)
                token = self._next_token(logits, generator)
            if token in self.stop_ids or cancel.is_set():
                return
            yield token
            position += ids.shape[1]
            # The prompt (variable length) runs eagerly; only the fixed-shape one-token step is compiled.
            ids, forward = torch.tensor([[token]], device=self.device), self._decode_forward
