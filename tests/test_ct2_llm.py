"""The CTranslate2 LLM backend on the embedded SmolLM2 (int8): the same answers and judgements the session
relies on from the transformers backend, cancellation within a token, clear errors."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from core.config import Config, DuplexConfig, ModelConfig
from core.models import embedded
from core.models.base import LLM, ChatMessage, TextTurnJudge
from core.models.ct2_llm import CT2LLM, convert, is_complete
from core.models.llm_text import LLMError, render_prompt
from core.models.registry import llm_engine

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
SYSTEM = ChatMessage("system", DuplexConfig().instructions)
FRANCE = [SYSTEM, ChatMessage("user", "What is the capital of France?")]
STORY = [SYSTEM, ChatMessage("user", "Write a long story about a dragon who learns to bake bread.")]


@pytest.fixture(scope="module")
def folder() -> Path:
    return embedded.paths(MODELS).llm_ct2


@pytest.fixture(scope="module")
def llm(folder: Path) -> CT2LLM:
    return CT2LLM(folder, greedy=True)


def test_the_built_folder_is_complete_and_stops_on_the_chat_end(folder: Path, llm: CT2LLM) -> None:
    assert is_complete(folder)
    assert llm.tokenizer.convert_tokens_to_ids("<|im_end|>") in llm.stop_ids
    assert llm.max_context == 8192  # kept from the source checkpoint's config
    assert isinstance(llm, LLM) and isinstance(llm, TextTurnJudge)


def test_the_prompt_is_the_transformers_backends(llm: CT2LLM) -> None:
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(str(embedded.paths(MODELS).llm))
    assert llm.render_prompt(FRANCE) == render_prompt(source, FRANCE)
    assert llm.render_prompt(FRANCE).startswith(f"<|im_start|>system\n{SYSTEM.content}<|im_end|>\n")


def test_answers_the_capital_of_france_as_a_stream(llm: CT2LLM) -> None:
    deltas = list(llm.stream(FRANCE, max_new_tokens=40))
    assert len(deltas) > 3  # streamed piece by piece, not in one block
    assert "Paris" in "".join(deltas)
    assert "<|im_end|>" not in "".join(deltas)
    assert list(llm.stream(FRANCE, max_new_tokens=40)) == deltas  # greedy: the same answer every time


def test_max_new_tokens_bounds_the_reply(llm: CT2LLM) -> None:
    assert len(list(llm.token_stream(STORY, max_new_tokens=5))) == 5
    with pytest.raises(LLMError):
        llm.token_stream(STORY, max_new_tokens=0)


def test_cancel_stops_within_one_token(llm: CT2LLM) -> None:
    full = list(llm.stream(STORY, max_new_tokens=24))
    assert len(full) > 8
    cancel = threading.Event()
    before: list[str] = []
    after: list[str] = []
    for delta in llm.stream(STORY, max_new_tokens=24, cancel=cancel):
        (after if cancel.is_set() else before).append(delta)
        if len(before) == 3:
            cancel.set()
    assert before == full[:3]
    assert after == []


def test_a_cancelled_token_yields_nothing(llm: CT2LLM) -> None:
    cancel = threading.Event()
    cancel.set()
    assert list(llm.stream(FRANCE, cancel=cancel)) == []


class _GatedGenerator:
    """Wraps the real ``ctranslate2.Generator``: counts each reply's decoder steps, and holds the decoder
    before its second step until the test opens the gate (so the decoder cannot run ahead of the test)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.steps: list[int] = []
        self.gate = threading.Event()

    def generate_batch(self, *args: Any, callback: Any, **kwargs: Any) -> Any:
        call = len(self.steps)
        self.steps.append(0)

        def gated(step: Any) -> bool:
            self.steps[call] += 1
            if self.steps[call] == 2:
                self.gate.wait(30)  # a guard against a hang, not a timing assertion
            return bool(callback(step))

        return self.real.generate_batch(*args, callback=gated, **kwargs)


@pytest.mark.parametrize("how", ["cancel", "close the stream"])
def test_the_decoder_itself_stops_within_a_step(
    llm: CT2LLM, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Not only the reader: CTranslate2's decoder thread stops at its next step, so a barge-in frees the CPU."""
    gated = _GatedGenerator(llm.generator)
    monkeypatch.setattr(llm, "generator", gated)
    cancel = threading.Event()
    stream = llm.token_stream(STORY, max_new_tokens=200, cancel=cancel)
    next(stream)
    if how == "close the stream":
        stream.close()
    else:
        cancel.set()
    gated.gate.set()
    if how == "cancel":
        assert list(stream) == []
    # The next reply runs only once the stopped one has let go of the decoder (there is one decoder thread).
    list(llm.token_stream(FRANCE, max_new_tokens=2))
    assert gated.steps[0] == 2  # stopped at the step after the cancel, not after 200


@pytest.mark.parametrize(
    ("said", "finished"),
    [
        ("I would like to order", False),
        ("What is the best way to", False),
        ("Can you tell me", False),
        ("What is the capital of France.", True),
        ("I would like to order a large pizza with cheese.", True),
        ("How long does it take to get to the airport", True),
    ],
)
def test_the_words_judge_tells_a_finished_sentence_from_half_of_one(
    llm: CT2LLM, said: str, finished: bool
) -> None:
    threshold = DuplexConfig().eagerness_medium.text_threshold
    p = llm.end_of_turn_probability([SYSTEM, ChatMessage("user", said)])
    assert 0.0 <= p <= 1.0
    assert (p >= threshold) == finished, p


def test_the_words_judge_refuses_a_conversation_not_ending_with_the_user(llm: CT2LLM) -> None:
    with pytest.raises(LLMError):
        llm.end_of_turn_probability([ChatMessage("user", "hi"), ChatMessage("assistant", "hello")])
    assert llm.end_of_turn_probability([ChatMessage("user", " ... ")]) == 0.0


@pytest.mark.parametrize(
    "messages",
    [[], [ChatMessage("robot", "hi")], [ChatMessage("user", 3)]],  # type: ignore[arg-type]
    ids=["empty", "bad-role", "not-text"],
)
def test_bad_conversations_raise_llm_error(llm: CT2LLM, messages: list[ChatMessage]) -> None:
    with pytest.raises(LLMError):
        list(llm.stream(messages))


def test_a_prompt_longer_than_the_context_raises(folder: Path) -> None:
    small = CT2LLM(folder, greedy=True, max_context=32)
    with pytest.raises(LLMError, match="context"):
        list(small.stream(STORY))
    with pytest.raises(LLMError, match="context"):
        small.end_of_turn_probability(STORY)


def test_a_folder_without_a_model_raises_llm_error(tmp_path: Path) -> None:
    with pytest.raises(LLMError, match=r"missing model\.bin"):
        CT2LLM(tmp_path)
    with pytest.raises(LLMError):
        CT2LLM(MODELS / "smollm2-135m-ct2", temperature=-1)


def test_convert_refuses_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    with pytest.raises(LLMError, match="cannot convert"):
        convert(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no temporary folder left behind


@pytest.mark.parametrize(
    ("stack", "device", "engine", "want"),
    [
        ("embedded", "cpu", "auto", "ctranslate2"),
        ("embedded", "cuda", "auto", "transformers"),
        ("production", "cpu", "auto", "transformers"),
        ("production", "cuda", "auto", "transformers"),
        ("embedded", "cpu", "transformers", "transformers"),
        ("production", "cuda", "ctranslate2", "ctranslate2"),
    ],
)
def test_llm_engine_choice(stack: str, device: str, engine: str, want: str) -> None:
    model = ModelConfig(stack=stack, device=device, llm_engine=engine)  # type: ignore[arg-type]
    assert llm_engine(Config(model=model).model, stack) == want
