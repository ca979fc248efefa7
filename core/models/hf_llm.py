"""Any transformers causal LM with a chat template as the ``LLM``: Qwen2.5-7B-Instruct on a GPU, SmolLM2 on a CPU.

Generation is our own loop, one token per forward pass with a KV cache, rather than ``generate`` on a thread
with a ``TextIteratorStreamer``: the loop runs on the caller's thread, checks the cancel token before and
after every forward pass (so a barge-in costs at most the token being computed), needs no thread to clean
up, and hands each token out the moment it exists.

With ``compile=True`` the one-token decode step runs through ``torch.compile`` on a static KV cache, whose
fixed shapes let the compiled graph (and, on CUDA, its CUDA graph) be reused for every token. The static
cache is shared, so a stream started while another is unfinished ends the older one.

Prefix reuse (``prefix_cache=True``, the default): the KV cache of the last call is kept with the token ids
it holds, and the next call starts from the longest token prefix the two prompts share, so only what is new
(normally the user's latest message) is prefilled; the system prompt and the history are not recomputed.
Whatever the conversation became, the cache is first cut back to the shared prefix. ``prefill`` computes
that cache ahead of time (the history while the user is still speaking). An older stream whose cache a
newer call took over continues on a private cache that it refills from scratch. The static cache (the
compiled path) is not reused: its layers keep their own write position, which transformers gives no public
way to move back, so every stream there starts from an empty cache as before.

On a CPU, decoding one token reads every weight once, so it is bound by memory bandwidth: a checkpoint
stored in bfloat16 (the embedded SmolLM2) runs in bfloat16 under ``dtype="auto"`` where the CPU has native
bf16 (AVX512-BF16, AMX), with its linear layers prepacked for oneDNN, which halves the bytes per token
against float32 (torch's plain bf16 matrix-vector product is no faster than float32). Thread count is the
caller's (``torch.set_num_threads``); on a 2-core machine shared with the TTS and VAD, one thread: two
OpenMP threads wait on each other whenever the other core is busy, and a token then costs ten times more.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.models.base import CancelToken, ChatMessage, NeverCancel
from core.models.device import load_placement, resolve_attention, resolve_device, resolve_dtype
from core.models.llm_text import (
    LLMError,
    TextDeltas,
    check_messages,
    end_ids,
    judge_prompt,
    render_prompt,
    stop_ids,
    stream_text,
)

__all__ = ["LLMError", "Sampling", "TextDeltas", "TransformersLLM", "check_messages"]


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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _bf16_checkpoint(path: str | Path) -> bool:
    """Whether a local model folder stores its weights in bfloat16 (by its config.json)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("dtype", config.get("torch_dtype")) == "bfloat16")


def _cpu_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively here (AVX512-BF16 or AMX), and the ops to pack weights exist."""
    try:
        return bool(
            torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):
        return False


class _PackedLinear(torch.nn.Module):
    """A CPU ``nn.Linear`` whose weight oneDNN has reordered once into its own blocked layout.

    torch's plain bfloat16 matmul reads the weight no faster than float32 when one token is decoded (a
    matrix-vector product); the prepacked oneDNN kernel reads half the bytes, which is what decoding on a
    CPU is bound by. Numerically it is the same bf16 product with float32 accumulation.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.inference_mode():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def _pack_linears(model: torch.nn.Module) -> int:
    """Swap every bfloat16 ``nn.Linear`` of a CPU model for a ``_PackedLinear``; returns how many.

    Each swap is checked against the layer it replaces on a random input; on any failure the model is left
    as it was (the plain layers work, only slower).
    """
    swaps = []
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, torch.nn.Linear) and child.weight.dtype == torch.bfloat16:
                swaps.append((parent, child_name, child))
    try:
        packed = [_PackedLinear(child) for _, _, child in swaps]
        probe = torch.randn(3, swaps[0][2].in_features, dtype=torch.bfloat16) if swaps else None
        with torch.inference_mode():
            if probe is not None and not torch.allclose(
                packed[0](probe).float(), swaps[0][2](probe).float(), rtol=2e-2, atol=2e-2
            ):
                return 0
    except (RuntimeError, AttributeError):
        return 0
    for (parent, child_name, _), layer in zip(swaps, packed, strict=True):
        setattr(parent, child_name, layer)
    return len(swaps)


class TransformersLLM:
    """A chat LLM from a hub id or a local transformers folder, streaming its reply token by token.

    The conversation is given whole on every call (the session keeps it; see ``core.models.chat``). One
    stream is meant to run at a time; iterate it on one thread and cancel it from any thread. With
    ``prefix_cache`` the KV cache of one call is kept for the next (see the module docstring).
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
        prefix_cache: bool = True,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(device, error=LLMError)
        self.dtype = resolve_dtype(dtype, self.device, error=LLMError)
        # A checkpoint stored in bf16 loses nothing run in bf16; on a CPU with native bf16 that is also
        # faster (AMX prefill, half the weight bytes per decoded token once the layers are packed).
        if dtype == "auto" and self.device.type == "cpu" and _bf16_checkpoint(path) and _cpu_bf16():
            self.dtype = torch.bfloat16
        self.attn_implementation = resolve_attention(attn_implementation, self.device, self.dtype)
        self.sampling = Sampling(temperature=temperature, top_p=top_p, greedy=greedy)
        self.name = name or f"transformers:{Path(str(path)).name or path}"
        # Straight onto the GPU (accelerate's device_map); without it the weights pass through CPU memory.
        placement = load_placement(self.device)
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
        self.packed_layers = 0
        if self.device.type == "cpu" and self.dtype == torch.bfloat16 and not compile and _cpu_bf16():
            self.packed_layers = _pack_linears(self.model)
        self.max_context = min(max_context, int(self.model.config.max_position_embeddings))
        self.stop_ids = stop_ids(self.tokenizer, getattr(self.model.generation_config, "eos_token_id", None))
        self._end_ids = end_ids(self.tokenizer, self.stop_ids)
        # Embedding matrices are often padded past the tokenizer; those ids are no text and must not be drawn.
        self._vocab_size = len(self.tokenizer)
        self.seed = seed
        self._static = compile if static_cache is None else static_cache
        self.prefix_cache = prefix_cache
        self._cache: Any = None  # the static cache, made once and kept (a compiled graph is bound to it)
        # The shared KV cache: the call that last used it (``_owner``), the ids it holds (``_held``, the
        # first ``_held_len`` of that list, which only grows) and, once its owner is done, the logits after
        # them. Every step that reads or writes it holds ``_lock``.
        self._lock = threading.Lock()
        self._kv: Any = None
        self._owner: object | None = None
        self._held: list[int] = []
        self._held_len = 0
        self._held_logits: torch.Tensor | None = None
        self._decode_forward = self.model.forward
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._decode_forward = torch.compile(self.model.forward, mode=mode)

    def render_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text the model sees: the chat template applied, ending where the reply begins."""
        return render_prompt(self.tokenizer, messages)

    def prompt_ids(self, messages: Sequence[ChatMessage]) -> torch.Tensor:
        """The prompt as a (1, length) tensor of token ids on the model's device."""
        return torch.tensor([self._ids(self.render_prompt(messages))], dtype=torch.long, device=self.device)

    def _ids(self, text: str) -> list[int]:
        # The template writes any BOS itself, so the tokenizer must not add another.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prefill(self, messages: Sequence[ChatMessage]) -> None:
        """Compute and keep the KV cache of ``messages``, so a later call that starts with them starts faster.

        Meant for the part of the conversation that is already known while the user speaks (system prompt
        and history): the reply's call then prefills only the new message. A conversation ending in a user
        message is rendered as a prompt (ready for the reply), any other without the generation prompt,
        so it is a prefix of the next turn's prompt. Does nothing with ``prefix_cache`` off or on the
        static cache (which is not reused).
        """
        if not self.prefix_cache or self._static:
            return
        check_messages(messages)
        ids = self._ids(
            render_prompt(self.tokenizer, messages, generation_prompt=messages[-1].role == "user")
        )
        if not ids:
            return
        if len(ids) > self.max_context:
            raise LLMError(f"prompt of {len(ids)} tokens does not fit the context of {self.max_context}")
        owner = object()
        with self._lock:
            cache, fed, logits = self._claim(owner, ids)
            if logits is None:
                logits = self._feed(self.model.forward, ids, fed, cache)
                self._held_len = len(ids)
            self._release(owner, logits)

    def end_of_turn_probability(self, messages: Sequence[ChatMessage]) -> float:
        """P that the last message (the user's, as heard so far) ends right after its last word.

        Its final punctuation is dropped first (ASR puts a period after half a sentence as readily as after a
        whole one), so this is the probability that the model's next token closes the message or is a
        sentence mark: near 0 for "I would like to order", well above for "What is the capital of France".
        One forward pass; the prefix cache makes the system prompt and history free, and the reply's call
        that usually follows reuses what this one fed.
        """
        prompt = judge_prompt(self.tokenizer, messages)
        if prompt is None:
            return 0.0
        ids = self._ids(prompt)
        if len(ids) > self.max_context:
            raise LLMError(f"prompt of {len(ids)} tokens does not fit the context of {self.max_context}")
        owner = object()
        with self._lock:
            if self.prefix_cache and not self._static:
                cache, fed, logits = self._claim(owner, ids)
                if logits is None:
                    logits = self._feed(self.model.forward, ids, fed, cache)
                    self._held_len = len(ids)
                self._release(owner, logits)
            else:
                logits = self._feed(self.model.forward, ids, 0, self._new_cache())
        probs = torch.softmax(logits[: self._vocab_size].float(), dim=-1)
        return float(probs[list(self._end_ids)].sum())

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
        prompt = self._ids(self.render_prompt(messages))
        if not prompt:
            raise LLMError("the chat template rendered an empty prompt")
        room = self.max_context - len(prompt)
        if room < 1:
            raise LLMError(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_context}")
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
        return stream_text(self.tokenizer, tokens, cancel)

    def warmup(self) -> None:
        """Generate a few tokens, so kernels (and compiled graphs) are ready before the first user."""
        for _ in self.stream([ChatMessage("user", "Hello!")], max_new_tokens=8):
            pass

    def _new_cache(self) -> Any:
        from transformers import DynamicCache, StaticCache

        if not self._static:
            return DynamicCache(config=self.model.config)
        if self._cache is None:
            self._cache = StaticCache(config=self.model.config, max_cache_len=self.max_context)
        with torch.inference_mode():  # its tensors were made in inference mode and may only change there
            self._cache.reset()
        return self._cache

    def _claim(self, owner: object, prompt: list[int]) -> tuple[Any, int, torch.Tensor | None]:
        """Make ``owner`` the user of the shared cache, cut back to what it shares with ``prompt``.

        Returns the cache, how many prompt tokens it already holds, and the logits after the whole prompt
        when the cache holds exactly the prompt (else None: at least one token is left to feed).
        """
        kept = 0
        reuse = self.prefix_cache and not self._static and self._kv is not None
        if reuse and self._kv.get_seq_length() == self._held_len:
            kept = _common_prefix(self._held[: self._held_len], prompt)
        logits = self._held_logits if kept == len(prompt) == self._held_len else None
        if logits is None:
            kept = min(kept, len(prompt) - 1)
        if kept == 0:
            cache = self._new_cache()
        else:
            cache = self._kv
            if self._held_len > kept:
                cache.crop(kept - self._held_len)
        self._kv, self._owner, self._held_logits = cache, owner, None
        self._held, self._held_len = prompt, kept
        return cache, kept, logits

    def _release(self, owner: object, logits: torch.Tensor | None = None) -> None:
        """``owner`` is done: its cache stays for the next call, with the logits after the ids it holds."""
        if self._owner is owner:
            self._owner = None
            self._held_logits = None if logits is None else logits.clone()

    def _drop(self) -> None:
        """Forget the shared cache (a forward pass failed halfway, so its layers may disagree)."""
        self._kv, self._owner, self._held, self._held_len, self._held_logits = None, None, [], 0, None

    def _feed(self, forward: Any, seq: list[int], fed: int, cache: Any) -> torch.Tensor:
        """Run ``seq[fed:]`` through the model at positions ``fed``...; returns the logits after it."""
        ids = torch.tensor([seq[fed:]], dtype=torch.long, device=self.device)
        try:
            with torch.inference_mode():
                return self._forward(forward, ids, fed, cache)
        except BaseException:
            if cache is self._kv:
                self._drop()
            raise

    def _next_token(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        if logits.shape[-1] > self._vocab_size:
            logits = logits.clone()
            logits[self._vocab_size :] = float("-inf")
        with torch.inference_mode():
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

    def _decode(self, prompt: list[int], budget: int, cancel: CancelToken) -> Iterator[int]:
        owner = object()
        # A seed makes every reply reproducible: the same conversation gets the same answer.
        generator = None if self.seed is None else torch.Generator(self.device).manual_seed(self.seed)
        seq = list(prompt)  # the prompt and the reply so far; the cache holds seq[:fed]
        cache: Any = None
        fed, shared = 0, True
        logits: torch.Tensor | None = None
        try:
            for _ in range(budget):
                if cancel.is_set():
                    return
                with self._lock:
                    if cache is None:
                        cache, fed, logits = self._claim(owner, seq)
                    elif shared and self._owner is not owner:
                        if self._static:  # the one static cache now serves a newer stream
                            return
                        # A newer call took the cache over (and may have cut it): go on alone, refilling a
                        # private cache from scratch.
                        cache, fed, shared = self._new_cache(), 0, False
                    if logits is None:
                        # The prompt (variable length) runs eagerly; only the one-token step is compiled.
                        forward = self._decode_forward if len(seq) - fed == 1 else self.model.forward
                        logits = self._feed(forward, seq, fed, cache)
                        fed = len(seq)
                        if shared:
                            self._held_len = fed
                    token = self._next_token(logits, generator)
                if token in self.stop_ids or cancel.is_set():
                    return
                seq.append(token)
                logits = None
                yield token
        finally:
            # Stopped, cancelled or closed: the cache holds seq[:fed]; the logits after it, where known,
            # let a call with exactly that prompt skip its forward pass.
            with self._lock:
                self._release(owner, logits)
