"""What every chat LLM backend shares, without torch: errors, message checks, stop tokens, text deltas, the
words judge's prompt.

The transformers backend (``hf_llm``) and the CTranslate2 backend (``ct2_llm``) both render prompts with the
checkpoint's own chat template (a transformers tokenizer) and hand text out through :class:`TextDeltas`, so the
two behave the same to the session: same prompt, same stop tokens, same text pieces.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from core.models.base import CancelToken, ChatMessage

ROLES = ("system", "user", "assistant")
#: End-of-turn markers of the common chat formats: stopping on them too guards against a generation config
#: that names only the end-of-text token.
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
#: Punctuation that ASR may put after the last word; the words judge looks at the words before it.
END_MARKS = ".?!…,;:。？！，；：、"
#: Marks that may end a user's message, each one token in the common vocabularies.
SENTENCE_MARKS = ".?!。？！"


class LLMError(RuntimeError):
    """An LLM that cannot be loaded, or a request it cannot serve (bad messages, prompt too long)."""


def check_messages(messages: Sequence[ChatMessage]) -> None:
    """A clear ``LLMError`` for a conversation a chat template cannot render."""
    if not messages:
        raise LLMError("no messages to answer")
    for message in messages:
        if message.role not in ROLES:
            raise LLMError(f"unknown message role '{message.role}' (expected one of {', '.join(ROLES)})")
        if not isinstance(message.content, str):
            raise LLMError("message content must be text")


def render_prompt(tokenizer: Any, messages: Sequence[ChatMessage], *, generation_prompt: bool = True) -> str:
    """The prompt text a model sees: its chat template applied, ending where the reply begins."""
    check_messages(messages)
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=generation_prompt,
        tokenize=False,
    )
    return str(rendered)


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt (the template writes any BOS itself, so none is added)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_ids(tokenizer: Any, eos_token_id: int | list[int] | None) -> frozenset[int]:
    """Ids that end a reply: the generation config's EOS, the tokenizer's, and any chat end-of-turn token."""
    ids: set[int] = set()
    ids.update(
        eos_token_id if isinstance(eos_token_id, list) else [eos_token_id] if eos_token_id is not None else []
    )
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    added = tokenizer.get_added_vocab()
    ids.update(added[token] for token in END_OF_TURN if token in added)
    return frozenset(int(i) for i in ids)


def end_ids(tokenizer: Any, stops: frozenset[int]) -> frozenset[int]:
    """What may end a user's message: a stop token or a sentence mark that is a single token."""
    marks = [tokenizer.encode(m, add_special_tokens=False) for m in SENTENCE_MARKS]
    return stops | {ids[0] for ids in marks if len(ids) == 1}


def judge_prompt(tokenizer: Any, messages: Sequence[ChatMessage]) -> str | None:
    """The words judge's prompt: the conversation up to the user's last word, message left open.

    The final punctuation is dropped (ASR puts a period after half a sentence as readily as after a whole
    one), so the next token's distribution says whether the message ends there. None when the user said
    nothing but punctuation.
    """
    check_messages(messages)
    if messages[-1].role != "user":
        raise LLMError("the last message must be the user's")
    text = messages[-1].content.rstrip(END_MARKS + " \t\n")
    if not text.strip():
        return None
    shown = [*messages[:-1], ChatMessage("user", text)]
    rendered = render_prompt(tokenizer, shown, generation_prompt=False)
    return rendered[: rendered.rfind(text) + len(text)]


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


def stream_text(tokenizer: Any, tokens: Iterator[int], cancel: CancelToken) -> Iterator[str]:
    """A reply's token ids as text pieces (:class:`TextDeltas`); nothing held back is sent after a cancel."""
    deltas = TextDeltas(tokenizer)
    for token in tokens:
        piece = deltas.push(token)
        if piece:
            yield piece
    tail = deltas.flush()
    if tail and not cancel.is_set():
        yield tail
