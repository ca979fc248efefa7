"""The embedded LLM: SmolLM2-135M-Instruct converted from its GGUF, served by the transformers backend."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from core.models.base import LLM, ChatMessage
from core.models.chat import bound_history
from core.models.convert.gguf_llm import ConversionError, convert_gguf, installed_gguf, is_complete
from core.models.hf_llm import LLMError, Sampling, TextDeltas, TransformersLLM

BUILT = Path(__file__).resolve().parents[1] / "data" / "models" / "smollm2-135m-instruct"
FRANCE = [ChatMessage("user", "What is the capital of France?")]
STORY = [ChatMessage("user", "Write a long story about a dragon who learns to bake bread.")]


@pytest.fixture(scope="module")
def smollm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if is_complete(BUILT):
        return BUILT
    out = tmp_path_factory.mktemp("llm") / "smollm2"
    convert_gguf(installed_gguf(), out)
    return out


@pytest.fixture(scope="module")
def llm(smollm_dir: Path) -> TransformersLLM:
    return TransformersLLM(smollm_dir, greedy=True)


# --- the converted folder -------------------------------------------------------------------------------


def test_converted_folder_is_a_complete_chat_model(smollm_dir: Path, llm: TransformersLLM) -> None:
    assert is_complete(smollm_dir)
    assert "chat_template" in json.loads((smollm_dir / "tokenizer_config.json").read_text())
    im_end = llm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((smollm_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == im_end
    assert generation["pad_token_id"] == im_end
    assert im_end in llm.stop_ids
    # Digits are split one by one, as in SmolLM2's own tokenizer.
    assert llm.tokenizer.tokenize("2024") == ["2", "0", "2", "4"]


def test_convert_rejects_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ConversionError):
        convert_gguf(bogus, tmp_path / "out")
    with pytest.raises(ConversionError):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temporary folder left behind


# --- answering -----------------------------------------------------------------------------------------


def test_smollm_is_an_llm(llm: TransformersLLM) -> None:
    assert isinstance(llm, LLM)


def test_answers_the_capital_of_france_as_a_stream(llm: TransformersLLM) -> None:
    deltas = list(llm.stream(FRANCE, max_new_tokens=40))
    text = "".join(deltas)
    assert "Paris" in text
    assert len(deltas) > 3  # streamed, not handed over whole
    assert "<|im_end|>" not in text and "<|im_start|>" not in text
    # The hand-written KV-cache loop says exactly what transformers' own greedy generate says.
    prompt = llm.prompt_ids(FRANCE)
    with torch.inference_mode():
        reference = llm.model.generate(prompt, max_new_tokens=40, do_sample=False)
    assert text == llm.tokenizer.decode(reference[0, prompt.shape[1] :], skip_special_tokens=True)


def test_max_new_tokens_bounds_the_reply(llm: TransformersLLM) -> None:
    assert len(list(llm.token_stream(STORY, max_new_tokens=5))) == 5


def test_cancel_stops_within_one_token(llm: TransformersLLM) -> None:
    full = list(llm.stream(STORY, max_new_tokens=24))
    assert len(full) > 8
    cancel = threading.Event()
    before, after = [], []
    for delta in llm.stream(STORY, max_new_tokens=24, cancel=cancel):
        (after if cancel.is_set() else before).append(delta)
        if len(before) == 3:
            cancel.set()
    assert before == full[:3]
    assert len(after) <= 1


def test_cancel_from_another_thread_stops_the_stream(llm: TransformersLLM) -> None:
    cancel, started = threading.Event(), threading.Event()
    late: list[str] = []
    done: list[bool] = []

    def consume() -> None:
        for delta in llm.stream(STORY, max_new_tokens=200, cancel=cancel):
            if cancel.is_set():
                late.append(delta)
            started.set()
        done.append(True)

    worker = threading.Thread(target=consume)
    worker.start()
    assert started.wait(60)
    cancel.set()
    worker.join(60)  # a guard against a hang, not a timing assertion
    assert done == [True]
    assert len(late) <= 1


def test_a_cancelled_token_yields_nothing(llm: TransformersLLM) -> None:
    cancel = threading.Event()
    cancel.set()
    assert list(llm.stream(FRANCE, cancel=cancel)) == []


# --- prompt ---------------------------------------------------------------------------------------------


def test_chat_template_puts_the_system_prompt_first(llm: TransformersLLM) -> None:
    prompt = llm.render_prompt([ChatMessage("system", "You are a pirate."), *FRANCE])
    assert prompt.startswith("<|im_start|>system\nYou are a pirate.<|im_end|>\n")
    assert "SmolLM" not in prompt
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    # Without one, the model's own default system prompt is used.
    assert "named SmolLM" in llm.render_prompt(FRANCE)


@pytest.mark.parametrize(
    "messages",
    [[], [ChatMessage("robot", "hi")], [ChatMessage("user", "hi"), ChatMessage("tool", "x")]],
)
def test_bad_conversations_raise_llm_error(llm: TransformersLLM, messages: list[ChatMessage]) -> None:
    with pytest.raises(LLMError):
        llm.stream(messages)


def test_a_prompt_longer_than_the_context_raises(
    llm: TransformersLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llm, "max_context", 16)
    with pytest.raises(LLMError, match="does not fit"):
        llm.stream(STORY)


def test_a_folder_without_a_model_raises_llm_error(tmp_path: Path) -> None:
    with pytest.raises(LLMError):
        TransformersLLM(tmp_path, device="cpu")


def test_deltas_never_split_a_character(llm: TransformersLLM) -> None:
    text = "Paris, 巴黎 — 東京 🎉 naïve café"
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    # SmolLM2's vocabulary is English: these characters span several tokens, so the test can fail.
    assert any(llm.tokenizer.decode([i]).endswith("\ufffd") for i in ids)
    deltas = TextDeltas(llm.tokenizer)
    pieces = [deltas.push(i) for i in ids] + [deltas.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


# --- sampling -------------------------------------------------------------------------------------------


def test_sampling_picks() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert Sampling(greedy=True).pick(logits) == 1
    assert Sampling(temperature=0.0).pick(logits) == 1
    gen = torch.Generator().manual_seed(0)
    # A tiny top_p keeps only the most likely token; a wide one lets the close second through too.
    assert {Sampling(temperature=1.0, top_p=0.01).pick(logits, gen) for _ in range(50)} == {1}
    assert {Sampling(temperature=1.0, top_p=0.9).pick(logits, gen) for _ in range(200)} == {1, 2}
    with pytest.raises(LLMError):
        Sampling(top_p=0.0)


# --- history bound --------------------------------------------------------------------------------------


def _conv(*spec: str) -> list[ChatMessage]:
    """``"s:text"``, ``"u:text"``, ``"a:text"`` -> messages."""
    roles = {"s": "system", "u": "user", "a": "assistant"}
    return [ChatMessage(roles[s[0]], s[2:]) for s in spec]


@pytest.mark.parametrize(
    ("messages", "max_turns", "max_chars", "kept"),
    [
        # nothing to cut
        (_conv("s:sys", "u:q1"), 8, 100, _conv("s:sys", "u:q1")),
        (_conv("u:q1", "a:r1", "u:q2"), 8, 100, _conv("u:q1", "a:r1", "u:q2")),
        # turn count: the newest turn plus max_turns earlier ones
        (
            _conv("s:sys", "u:q1", "a:r1", "u:q2", "a:r2", "u:q3"),
            1,
            100,
            _conv("s:sys", "u:q2", "a:r2", "u:q3"),
        ),
        (_conv("s:sys", "u:q1", "a:r1", "u:q2", "a:r2", "u:q3"), 0, 100, _conv("s:sys", "u:q3")),
        # characters: whole turns dropped, oldest first; the system prompt is not counted
        (
            _conv("s:" + "x" * 50, "u:aaaa", "a:bbbb", "u:cc", "a:dd", "u:q"),
            8,
            6,
            _conv("s:" + "x" * 50, "u:cc", "a:dd", "u:q"),
        ),
        (
            _conv("u:aaaa", "a:bbbb", "u:cc", "a:dd", "u:q"),
            8,
            13,
            _conv("u:aaaa", "a:bbbb", "u:cc", "a:dd", "u:q"),
        ),
        (_conv("u:aaaa", "a:bbbb", "u:cc", "a:dd", "u:q"), 8, 12, _conv("u:cc", "a:dd", "u:q")),
        # the question being answered stays even when it alone is over the bound
        (_conv("s:sys", "u:q1", "a:r1", "u:" + "y" * 20), 8, 5, _conv("s:sys", "u:" + "y" * 20)),
        # a reply that opens the conversation goes with the first cut
        (_conv("a:hello", "u:q1", "a:r1", "u:q2"), 1, 100, _conv("u:q1", "a:r1", "u:q2")),
        (_conv("a:hello", "u:q1"), 8, 100, _conv("a:hello", "u:q1")),
        # a conversation ending in a reply keeps that whole last turn
        (_conv("u:q1", "a:r1", "u:q2", "a:r2"), 0, 100, _conv("u:q2", "a:r2")),
        # only system messages, or nothing
        (_conv("s:sys"), 8, 100, _conv("s:sys")),
        ([], 8, 100, []),
    ],
)
def test_bound_history(
    messages: list[ChatMessage], max_turns: int, max_chars: int, kept: list[ChatMessage]
) -> None:
    assert bound_history(messages, max_turns, max_chars) == kept


def test_bound_history_rejects_negative_bounds() -> None:
    with pytest.raises(ValueError):
        bound_history(_conv("u:q"), -1, 10)
    with pytest.raises(ValueError):
        bound_history(_conv("u:q"), 1, -10)
