"""The production LLM architecture: a tiny random Qwen2 with the real Qwen2.5 tokenizer, via TransformersLLM."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from core.models.base import ChatMessage
from core.models.hf_llm import TextDeltas, TransformersLLM
from tests.tiny_models import QWEN_DEFAULT_SYSTEM, QWEN_SPECIAL_START, build_tiny_qwen2

HELLO = [ChatMessage("system", "You are brief."), ChatMessage("user", "你好! How are you?")]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("qwen") / "tiny-qwen2")


@pytest.fixture(scope="module")
def qwen(qwen_dir: Path) -> TransformersLLM:
    # Random weights: sampling (seeded, so reproducible) wanders over the whole multilingual vocabulary.
    return TransformersLLM(qwen_dir, temperature=1.0, top_p=1.0, seed=0, device="cpu")


def test_qwen_tokenizer_is_the_real_qwen_vocabulary(qwen: TransformersLLM) -> None:
    tok = qwen.tokenizer
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [151644, 872, 198, 6023, 151645]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        QWEN_SPECIAL_START,
        QWEN_SPECIAL_START + 1,
        QWEN_SPECIAL_START + 2,
    ]
    assert len(tok) == 151665
    text = "你好，世界！naïve 🎉 x = 12345"
    assert tok.decode(tok.encode(text)) == text


def test_qwen_chat_template_renders_the_qwen_format(qwen: TransformersLLM) -> None:
    assert qwen.render_prompt(HELLO) == (
        "<|im_start|>system\nYou are brief.<|im_end|>\n"
        "<|im_start|>user\n你好! How are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert qwen.render_prompt([ChatMessage("user", "hi")]).startswith(
        f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    )
    assert qwen.stop_ids >= {QWEN_SPECIAL_START, QWEN_SPECIAL_START + 2}


def test_qwen_greedy_loop_matches_transformers_generate(qwen_dir: Path) -> None:
    greedy = TransformersLLM(qwen_dir, greedy=True, device="cpu")
    ids = list(greedy.token_stream(HELLO, max_new_tokens=10))
    prompt = greedy.prompt_ids(HELLO)
    with torch.inference_mode():
        reference = greedy.model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert ids == reference[0, prompt.shape[1] :].tolist()


def test_qwen_stream_yields_whole_characters(qwen: TransformersLLM) -> None:
    ids = list(qwen.token_stream(HELLO, max_new_tokens=30))
    deltas = list(qwen.stream(HELLO, max_new_tokens=30))
    assert len(deltas) > 5
    text = "".join(deltas)
    # Seeded, so the same reply twice; splitting it into deltas broke no character (random weights may
    # still draw a byte sequence that is not UTF-8: the full decode then has the same U+FFFD).
    assert text == qwen.tokenizer.decode(ids, skip_special_tokens=True)
    assert any(ord(ch) > 0x2E80 for ch in text)  # CJK or other multi-byte text came through
    # The embedding is padded past the tokenizer; those ids are never drawn.
    assert max(ids) < len(qwen.tokenizer)


def test_qwen_text_deltas_hold_back_partial_characters(qwen: TransformersLLM) -> None:
    text = "鑫淼 犇 🐉 是中文"
    ids = qwen.tokenizer.encode(text)
    assert any(qwen.tokenizer.decode([i]).endswith("\ufffd") for i in ids)  # some characters span tokens
    deltas = TextDeltas(qwen.tokenizer)
    pieces = [deltas.push(i) for i in ids] + [deltas.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_qwen_cancel_stops_within_one_token(qwen: TransformersLLM) -> None:
    full = list(qwen.token_stream(HELLO, max_new_tokens=40))
    assert len(full) > 10
    cancel = threading.Event()
    got = []
    for token in qwen.token_stream(HELLO, max_new_tokens=40, cancel=cancel):
        got.append(token)
        if len(got) == 4:
            cancel.set()
    assert got == full[:4]
    deltas_after = []
    cancel.clear()
    for delta in qwen.stream(HELLO, max_new_tokens=40, cancel=cancel):
        if cancel.is_set():
            deltas_after.append(delta)
        cancel.set()
    assert len(deltas_after) <= 1


def test_qwen_static_cache_gives_the_same_reply(qwen_dir: Path, qwen: TransformersLLM) -> None:
    static = TransformersLLM(qwen_dir, temperature=1.0, top_p=1.0, seed=0, device="cpu", static_cache=True)
    expected = list(qwen.token_stream(HELLO, max_new_tokens=12))
    assert list(static.token_stream(HELLO, max_new_tokens=12)) == expected
    # The static cache is shared, so a newer stream ends an unfinished older one instead of corrupting it.
    older = static.token_stream(HELLO, max_new_tokens=12)
    assert [next(older), next(older)] == expected[:2]
    assert list(static.token_stream(HELLO, max_new_tokens=12)) == expected
    assert list(older) == []
