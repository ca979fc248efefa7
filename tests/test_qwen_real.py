"""The production LLM path (core/models/hf_llm.py) on real Qwen weights: Qwen2.5-Coder-0.5B-Instruct.

The checkpoint is opt-in (``bash install.sh --with-qwen``, core/models/qwen_gguf.py); without it every test
here skips and says so. Greedy decoding, so the answers are reproducible; replies are kept short because a
0.5B model decodes a few tokens a second on a small shared CPU.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from core.models import embedded, qwen_gguf
from core.models.base import ChatMessage
from core.models.hf_llm import TransformersLLM
from tests.duplex_client import (
    encode_16k,
    free_port,
    open_session,
    start_worker,
    stop,
    stream,
    wait_for,
    wait_healthy,
)
from tests.speech import espeak, with_silence

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "data" / "models"
CJK = re.compile(r"[\u4e00-\u9fff]")
IM_START, IM_END, END_OF_TEXT = 151644, 151645, 151643

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not qwen_gguf.is_built(MODELS),
        reason=f"the real Qwen checkpoint is not built: run `{qwen_gguf.INSTALL_HINT}` (opt-in)",
    ),
]


@pytest.fixture(scope="module")
def qwen() -> TransformersLLM:
    return TransformersLLM(qwen_gguf.path(MODELS), greedy=True, device="cpu")


def ask(llm: TransformersLLM, question: str, max_new_tokens: int = 16) -> list[str]:
    return list(llm.stream([ChatMessage("user", question)], max_new_tokens=max_new_tokens))


def test_real_qwen_is_a_qwen2_model_with_the_chatml_template(qwen: TransformersLLM) -> None:
    assert qwen.model.config.model_type == "qwen2"
    assert qwen.model.config.num_hidden_layers == 24 and qwen.model.config.hidden_size == 896
    assert qwen.render_prompt([ChatMessage("system", "Be brief."), ChatMessage("user", "你好")]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )
    # Qwen's template writes its own system turn when the conversation has none.
    assert qwen.render_prompt([ChatMessage("user", "hi")]).startswith("<|im_start|>system\nYou are Qwen")
    assert qwen.tokenizer.encode("<|im_start|>user\nhi<|im_end|>") == [IM_START, 872, 198, 6023, IM_END]


def test_real_qwen_stops_at_its_end_of_turn_token(qwen: TransformersLLM) -> None:
    assert {IM_END, END_OF_TEXT} <= set(qwen.stop_ids)
    budget = 40
    tokens = list(
        qwen.token_stream([ChatMessage("user", "Reply with the single word: yes")], max_new_tokens=budget)
    )
    assert 0 < len(tokens) < budget  # it ended by itself, on a stop token it does not hand out
    assert not set(tokens) & set(qwen.stop_ids)
    assert "yes" in qwen.tokenizer.decode(tokens).lower()


def test_real_qwen_streams_an_english_answer(qwen: TransformersLLM) -> None:
    pieces = ask(qwen, "What is the capital of France? Answer in one short sentence.")
    assert len(pieces) > 2  # streamed piece by piece, not handed over whole
    assert "Paris" in "".join(pieces)


def test_real_qwen_answers_in_chinese(qwen: TransformersLLM) -> None:
    reply = "".join(ask(qwen, "中国的首都是哪里？请用一句话回答。"))
    assert "北京" in reply
    assert len(CJK.findall(reply)) >= 4


def test_real_qwen_barge_in_stops_the_reply_mid_way(qwen: TransformersLLM) -> None:
    cancel = threading.Event()
    stream_ = qwen.token_stream(
        [ChatMessage("user", "Count from one to fifty in words, separated by commas.")],
        max_new_tokens=60,
        cancel=cancel,
    )
    heard = [next(stream_) for _ in range(4)]
    cancel.set()  # the user talks over the reply
    assert list(stream_) == []  # not one token after the barge-in
    assert "one" in qwen.tokenizer.decode(heard).lower()
    # The model serves the next turn as before (its cache was cut back, not left half written).
    assert "Paris" in "".join(ask(qwen, "What is the capital of France? Answer in one short sentence."))


def test_real_qwen_words_judge_tells_a_finished_question_from_half_a_sentence(qwen: TransformersLLM) -> None:
    finished = qwen.end_of_turn_probability([ChatMessage("user", "What is the capital of France?")])
    half = qwen.end_of_turn_probability([ChatMessage("user", "I would like to order a")])
    assert finished > 10 * half
    assert half < 0.05


@pytest.fixture(scope="module")
def qwen_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A worker on the production stack with the real Qwen as ``model.llm_path`` (Whisper base, Piper)."""
    if not embedded.is_built(MODELS):
        pytest.skip("embedded models not built: run bash install.sh")
    port = free_port()
    model = {
        "asr_path": str(MODELS / embedded.WHISPER_DIR),
        "llm_path": str(qwen_gguf.path(MODELS)),
        "tts": "piper",
        "device": "cpu",
        "temperature": 0.0,
        "max_new_tokens": 24,
    }
    proc = start_worker(
        port, "production", tmp_path_factory.mktemp("qwen-worker"), extra_config={"model": model}
    )
    try:
        health = wait_healthy(f"http://127.0.0.1:{port}", proc, 600)
        assert health["stack"] == "production" and health["models"]["llm"].endswith(qwen_gguf.QWEN_DIR)
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


async def test_a_duplex_session_answers_with_the_real_qwen(qwen_worker: str) -> None:
    ws, got, task = await open_session(f"ws://{qwen_worker}/ws/duplex")
    try:
        await stream(
            ws, encode_16k(with_silence(espeak("What is the capital of France?", voice="en-gb"), 0.3, 1.2))
        )
        feeder = asyncio.create_task(stream(ws, encode_16k(np.zeros(16_000 * 60, np.float32))))
        done = await wait_for(got, "response.done", 240)
        feeder.cancel()
    finally:
        task.cancel()
        await ws.close()
    transcript = got.of("conversation.item.input_audio_transcription.completed")[0]["transcript"].lower()
    assert "capital" in transcript
    assert done["status"] == "completed" and "Paris" in done["text"]
    assert got.decoded_seconds() > 0.5  # spoken, not only written
