"""A chat LLM on CTranslate2 (``ctranslate2.Generator``): the embedded SmolLM2 on a CPU, int8.

Decoding one token on a CPU reads every weight once, so it is bound by memory bandwidth: CTranslate2's int8
weights are a quarter of float32's and half of bfloat16's, and its kernels for one-token steps carry little
framework overhead. On the development VM's 2 vCPUs this takes SmolLM2-135M from ≈38 ms a token (transformers,
bf16) to ≈10 ms, which is what brings the first spoken clause of a reply under a quarter of a second
(``bench/bench_llm.py`` measures both in one run).

The prompt is rendered with the checkpoint's own chat template (a transformers tokenizer kept beside the
model), and text is handed out through the same :class:`~core.models.llm_text.TextDeltas` as the transformers
backend, so the session sees the same prompt, stop tokens and text pieces from either engine.

CTranslate2 decodes on its own thread and hands each step to a callback. Ours records the token and returns
whether the cancel token is set, so a barge-in stops the decoder within one token even when nobody is
reading the stream; closing the stream early stops it the same way. There is no KV cache kept between calls:
a prompt of a few hundred tokens prefills in tens of milliseconds here.

A folder for this backend is what ``ctranslate2``'s transformers converter writes (``model.bin``,
``config.json``, ``vocabulary.json``) plus the tokenizer files and ``generation_config.json`` of the source
checkpoint; :func:`convert` writes one.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.models.base import CancelToken, ChatMessage, NeverCancel
from core.models.llm_text import (
    LLMError,
    end_ids,
    judge_prompt,
    prompt_ids,
    render_prompt,
    stop_ids,
    stream_text,
)

#: Files of the source checkpoint kept beside the converted model: the tokenizer and the chat template.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
#: What a complete folder holds.
REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json", "tokenizer_config.json")
#: The largest context we let a prompt use when the folder does not say (SmolLM2 and Qwen2.5 take 8k+).
DEFAULT_MAX_CONTEXT = 8192


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds every file this backend loads."""
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def convert(source: Path, out_dir: Path, *, quantization: str = "int8") -> None:
    """Convert a transformers causal-LM folder into a CTranslate2 folder for :class:`CT2LLM`.

    The weights are quantized (``int8`` by default) by CTranslate2's own converter; the tokenizer files and
    the generation config are copied beside them, and the source's context length is kept in
    ``max_context.json``. The folder is written under a temporary name and renamed into place, so an
    interrupted conversion never leaves a folder that looks complete.
    """
    from ctranslate2.converters import TransformersConverter

    from core.models.convert import write_dir_atomically

    def write(folder: Path) -> None:
        # The converter insists on creating its output folder itself.
        target = folder / "ct2"
        try:
            TransformersConverter(str(source), low_cpu_mem_usage=True).convert(
                str(target), quantization=quantization
            )
        except (OSError, ValueError, RuntimeError, NotImplementedError) as exc:
            raise LLMError(f"cannot convert '{source}' for CTranslate2: {exc}") from exc
        for path in target.iterdir():
            path.replace(folder / path.name)
        target.rmdir()
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
        config = json.loads((source / "config.json").read_text())
        context = config.get("max_position_embeddings")
        (folder / "max_context.json").write_text(json.dumps({"max_context": context}))
        for path in folder.iterdir():
            path.chmod(0o644)

    write_dir_atomically(out_dir, write)


def default_threads() -> int:
    """Threads for one decoder: half the cores, 1 to 4.

    One token is a chain of small matrix-vector products; on a small machine shared with ASR, TTS and the
    VAD, a second thread mostly waits for a busy core (measured: 2 threads ≈3× slower a token than 1 on
    the 2-vCPU VM while anything else runs).
    """
    return max(1, min(4, (os.cpu_count() or 2) // 2))


class CT2LLM:
    """A chat LLM from a CTranslate2 folder (see :func:`convert`), streaming its reply token by token.

    Implements ``LLM`` and ``TextTurnJudge``. The conversation is given whole on every call. Several streams
    may run at once (CTranslate2 queues them); cancel any of them from any thread.
    """

    tokenizer: Any

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        device: str = "cpu",
        compute_type: str = "auto",
        intra_threads: int = 0,
        temperature: float = 0.7,
        top_p: float = 0.9,
        greedy: bool = False,
        seed: int | None = None,
        max_context: int | None = None,
    ) -> None:
        import ctranslate2
        from transformers import AutoTokenizer

        folder = Path(path)
        if not is_complete(folder):
            missing = [n for n in REQUIRED_FILES if not (folder / n).is_file()]
            raise LLMError(f"'{path}' is not a CTranslate2 chat model folder (missing {', '.join(missing)})")
        if temperature < 0 or not 0 < top_p <= 1:
            raise LLMError(f"bad sampling settings: temperature={temperature}, top_p={top_p}")
        self.device = "cuda" if device.startswith("cuda") else "cpu"
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        self.threads = intra_threads or default_threads()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self.generator = ctranslate2.Generator(
                str(folder),
                device=self.device,
                device_index=index,
                compute_type=compute_type,
                intra_threads=self.threads,
                inter_threads=1,
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise LLMError(f"cannot load a CTranslate2 LLM from '{path}': {exc}") from exc
        if not self.tokenizer.chat_template:
            raise LLMError(f"'{path}' has no chat template: not a chat model")
        self.name = name or f"ctranslate2:{folder.name}"
        self.compute_type = compute_type
        self.temperature, self.top_p, self.greedy = temperature, top_p, greedy or temperature == 0
        if seed is not None:
            ctranslate2.set_random_seed(seed)
        self.max_context = max_context or self._folder_context(folder)
        eos = None
        if (folder / "generation_config.json").is_file():
            eos = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
        self.stop_ids = stop_ids(self.tokenizer, eos)
        self._stop_tokens = self.tokenizer.convert_ids_to_tokens(sorted(self.stop_ids))
        self._end_ids = sorted(end_ids(self.tokenizer, self.stop_ids))

    @staticmethod
    def _folder_context(folder: Path) -> int:
        try:
            value = json.loads((folder / "max_context.json").read_text()).get("max_context")
        except (OSError, ValueError):
            value = None
        return int(value) if isinstance(value, int) and value > 0 else DEFAULT_MAX_CONTEXT

    def render_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text the model sees: the chat template applied, ending where the reply begins."""
        return render_prompt(self.tokenizer, messages)

    def _tokens(self, text: str) -> list[str]:
        ids = prompt_ids(self.tokenizer, text)
        if len(ids) > self.max_context:
            raise LLMError(f"prompt of {len(ids)} tokens does not fit the context of {self.max_context}")
        return list(self.tokenizer.convert_ids_to_tokens(ids))

    def end_of_turn_probability(self, messages: Sequence[ChatMessage]) -> float:
        """P that the last message (the user's, as heard so far) ends right after its last word.

        The same question as ``TransformersLLM.end_of_turn_probability``: the next token's probability of
        closing the message or being a sentence mark, after the message with its final punctuation dropped.
        One forward pass over the prompt.
        """
        prompt = judge_prompt(self.tokenizer, messages)
        if prompt is None:
            return 0.0
        tokens = self._tokens(prompt)
        try:
            logits = np.asarray(self.generator.forward_batch([tokens]), dtype=np.float32)[0, -1]
        except (ValueError, RuntimeError) as exc:
            raise LLMError(f"the LLM could not score the message: {exc}") from exc
        logits = logits[: len(self.tokenizer)]
        logits = logits - logits.max()
        probs = np.exp(logits)
        return float(probs[self._end_ids].sum() / probs.sum())

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
        tokens = self._tokens(self.render_prompt(messages))
        if not tokens:
            raise LLMError("the chat template rendered an empty prompt")
        room = self.max_context - len(tokens)
        if room < 1:
            raise LLMError(f"prompt of {len(tokens)} tokens does not fit the context of {self.max_context}")
        return self._decode(
            tokens, min(max_new_tokens, room), cancel if cancel is not None else NeverCancel()
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

    def _decode(self, tokens: list[str], budget: int, cancel: CancelToken) -> Iterator[int]:
        if cancel.is_set():
            return
        steps: queue.SimpleQueue[int | BaseException | None] = queue.SimpleQueue()
        closed = threading.Event()

        def on_step(step: Any) -> bool:
            steps.put(int(step.token_id))
            return bool(closed.is_set() or cancel.is_set())  # True stops the decoder

        sampling: dict[str, Any] = (
            {"sampling_topk": 1}
            if self.greedy
            else {"sampling_topk": 0, "sampling_topp": self.top_p, "sampling_temperature": self.temperature}
        )
        try:
            pending = self.generator.generate_batch(
                [tokens],
                max_length=budget,
                beam_size=1,
                end_token=self._stop_tokens,
                include_prompt_in_result=False,
                asynchronous=True,
                callback=on_step,
                **sampling,
            )[0]
        except (ValueError, RuntimeError) as exc:
            raise LLMError(f"the LLM could not start a reply: {exc}") from exc

        def wait() -> None:
            try:
                pending.result()
            except BaseException as exc:  # handed to the reader, who raises it
                steps.put(exc)
            steps.put(None)

        threading.Thread(target=wait, name="ct2-llm-wait", daemon=True).start()
        try:
            while (item := steps.get()) is not None:
                if isinstance(item, BaseException):
                    raise LLMError(f"the LLM failed mid-reply: {item}") from item
                if item in self.stop_ids or cancel.is_set():
                    return
                yield item
        finally:
            # Stopped, cancelled or closed early: the decoder stops at its next step.
            closed.set()

    def warmup(self) -> None:
        """Generate a few tokens and score a message, so the first user pays no start-up cost."""
        for _ in self.stream([ChatMessage("user", "Hello!")], max_new_tokens=8):
            pass
        self.end_of_turn_probability([ChatMessage("user", "Hello")])
