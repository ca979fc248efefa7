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
from core.models.hf_llm import (
    LLMError,
    Sampling,
    TextDeltas,
    TransformersLLM,
    _cpu_bf16,
    _PackedLinear,
)
from tests.tiny_models import build_tiny_qwen2

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
    return TransformersLLM(smollm_dir, greedy=True, device="cpu")  # CPU expectations, GPU host or not


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
    before: list[str] = []
    after: list[str] = []
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


# --- prefix reuse ---------------------------------------------------------------------------------------

VOICE_SYSTEM = "You are a helpful voice assistant. Answer in one or two short spoken sentences."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("reuse") / "tiny-qwen2")


def _fed(llm: TransformersLLM, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records how many tokens each forward pass of ``llm`` is given."""
    sizes: list[int] = []
    real = llm._forward

    def spy(forward: object, ids: torch.Tensor, start: int, cache: object) -> torch.Tensor:
        sizes.append(ids.shape[1])
        return real(forward, ids, start, cache)

    monkeypatch.setattr(llm, "_forward", spy)
    return sizes


def _reply(llm: TransformersLLM, messages: list[ChatMessage], n: int = 10) -> list[int]:
    return list(llm.token_stream(messages, max_new_tokens=n))


def _conversation_replies(
    llm: TransformersLLM, reference: TransformersLLM, n: int = 10
) -> list[tuple[list[int], list[int]]]:
    """A voice conversation run on ``llm``: (its reply, the reply of ``reference`` to the same messages) each.

    The turns: follow-ups on the same history, a prefill of the history while "the user speaks", an edited
    old message, a changed system prompt, a stream cancelled halfway whose partial reply enters the history,
    the same conversation twice, and a prefill of the whole prompt before the stream.
    """
    tok = llm.tokenizer
    pairs: list[tuple[list[int], list[int]]] = []

    def turn(messages: list[ChatMessage]) -> str:
        got, want = _reply(llm, messages, n), _reply(reference, messages, n)
        pairs.append((got, want))
        return str(tok.decode(got, skip_special_tokens=True))

    system = ChatMessage("system", VOICE_SYSTEM)
    history = [system, ChatMessage("user", "What's the weather like in Lisbon in spring?")]
    history.append(ChatMessage("assistant", turn(history)))
    history.append(ChatMessage("user", "And what should I see there in two days?"))
    history.append(ChatMessage("assistant", turn(history)))
    llm.prefill(history)  # the history, computed while the next question is being spoken
    history.append(ChatMessage("user", "How do I get from the airport to the centre?"))
    history.append(ChatMessage("assistant", turn(history)))
    # An earlier message edited: only the system prompt is still shared.
    edited = [system, ChatMessage("user", "What's the weather like in Porto in spring?"), *history[2:]]
    edited.append(ChatMessage("user", "Thanks!"))
    turn(edited)
    turn([ChatMessage("system", "You are a pirate."), *edited[1:]])
    # Cancelled after three tokens (barge-in); the partial reply goes into the history.
    cancel = threading.Event()
    asked = [*history, ChatMessage("user", "Tell me a long story about the tram.")]
    partial: list[int] = []
    for token in llm.token_stream(asked, max_new_tokens=n, cancel=cancel):
        partial.append(token)
        if len(partial) == 3:
            cancel.set()
    pairs.append((partial, _reply(reference, asked, 3)))
    history = [*asked, ChatMessage("assistant", str(tok.decode(partial, skip_special_tokens=True)))]
    history.append(ChatMessage("user", "Sorry, just the short version please."))
    turn(history)
    turn(history)  # exactly the same prompt again
    history.append(ChatMessage("user", "One more thing."))
    llm.prefill(history)  # the whole prompt, ready for the reply
    turn(history)
    return pairs


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_prefix_reuse_gives_the_replies_of_a_fresh_cache(tiny_dir: Path, static: bool) -> None:
    llm = TransformersLLM(tiny_dir, greedy=True, device="cpu", static_cache=static, max_context=512)
    reference = TransformersLLM(tiny_dir, greedy=True, device="cpu", prefix_cache=False)
    assert llm.prefix_cache and not reference.prefix_cache
    pairs = _conversation_replies(llm, reference)
    assert all(len(got) > 0 for got, _ in pairs)
    for i, (got, want) in enumerate(pairs):
        assert got == want, f"turn {i}"


def test_prefix_reuse_prefills_only_what_is_new(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = TransformersLLM(tiny_dir, greedy=True, device="cpu")
    fed = _fed(llm, monkeypatch)
    first = [ChatMessage("system", VOICE_SYSTEM), ChatMessage("user", "Hello there, who are you?")]
    reply = _reply(llm, first, 6)
    assert fed == [len(llm.prompt_ids(first)[0])] + [1] * 5
    second = [*first, ChatMessage("assistant", llm.tokenizer.decode(reply)), ChatMessage("user", "Why?")]
    fed.clear()
    _reply(llm, second, 3)
    # The cache held the first prompt and the reply but its last token (never fed); the second prompt
    # repeats the first (its final "\n" may merge with the reply's first bytes), then the reply as far as
    # its text tokenizes back to the same ids (random weights draw byte sequences that may not).
    held = [*llm.prompt_ids(first)[0].tolist(), *reply[:-1]]
    prompt = llm.prompt_ids(second)[0].tolist()
    shared = next((i for i, (x, y) in enumerate(zip(held, prompt, strict=False)) if x != y), len(held))
    assert shared >= len(llm.prompt_ids(first)[0]) - 1
    assert fed == [len(prompt) - shared, 1, 1]
    # prefill then a stream of the same prompt: the stream starts from the prefilled logits.
    third = [*second, ChatMessage("assistant", "Because."), ChatMessage("user", "Ok.")]
    fed.clear()
    llm.prefill(third)
    assert len(fed) == 1
    fed.clear()
    _reply(llm, third, 3)
    assert fed == [1, 1]  # no prompt pass, only the steps after the first token
    # Without reuse every call prefills the whole prompt, and prefill does nothing.
    llm.prefix_cache = False
    fed.clear()
    llm.prefill(third)
    _reply(llm, third, 2)
    assert fed == [len(llm.prompt_ids(third)[0]), 1]


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "fresh"])
def test_an_older_stream_survives_a_newer_one(tiny_dir: Path, reuse: bool) -> None:
    llm = TransformersLLM(tiny_dir, greedy=True, device="cpu", prefix_cache=reuse)
    reference = TransformersLLM(tiny_dir, greedy=True, device="cpu", prefix_cache=False)
    a = [ChatMessage("system", VOICE_SYSTEM), ChatMessage("user", "First question?")]
    b = [ChatMessage("system", VOICE_SYSTEM), ChatMessage("user", "Another one entirely.")]
    want_a, want_b = _reply(reference, a, 12), _reply(reference, b, 12)
    older = llm.token_stream(a, max_new_tokens=12)
    got_a = [next(older), next(older)]
    # The newer stream takes the shared cache over and cuts it to the system prompt ...
    assert _reply(llm, b, 12) == want_b
    # ... so the older one goes on on a cache of its own, with the same reply.
    got_a += list(older)
    assert got_a == want_a
    # A prefill in between does the same.
    older = llm.token_stream(a, max_new_tokens=12)
    got_a = [next(older)]
    llm.prefill(b)
    assert got_a + list(older) == want_a
    assert _reply(llm, b, 12) == want_b


def test_a_static_cache_is_not_reused(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = TransformersLLM(tiny_dir, greedy=True, device="cpu", static_cache=True, max_context=512)
    fed = _fed(llm, monkeypatch)
    a = [ChatMessage("system", VOICE_SYSTEM), ChatMessage("user", "First question?")]
    want = _reply(llm, a, 6)
    llm.prefill(a)  # nothing to keep
    assert fed == [len(llm.prompt_ids(a)[0])] + [1] * 5
    fed.clear()
    assert _reply(llm, a, 6) == want
    assert fed == [len(llm.prompt_ids(a)[0])] + [1] * 5  # the whole prompt again
    # The one static cache serves the newest stream: an unfinished older one ends.
    older = llm.token_stream(a, max_new_tokens=6)
    assert next(older) == want[0]
    assert _reply(llm, a, 6) == want
    assert list(older) == []


def test_a_failed_forward_pass_forgets_the_cache(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = TransformersLLM(tiny_dir, greedy=True, device="cpu")
    conv = [ChatMessage("system", VOICE_SYSTEM), ChatMessage("user", "Hello?")]
    want = _reply(llm, conv, 8)
    real = llm._forward

    def fails_after(forward: object, ids: torch.Tensor, start: int, cache: object) -> torch.Tensor:
        real(forward, ids, start, cache)  # the cache is written, then the call fails
        raise RuntimeError("out of memory")

    monkeypatch.setattr(llm, "_forward", fails_after)
    with pytest.raises(RuntimeError):
        _reply(llm, [*conv, ChatMessage("assistant", "Hi."), ChatMessage("user", "Bye?")])
    monkeypatch.setattr(llm, "_forward", real)
    assert _reply(llm, conv, 8) == want


def test_smollm_reuse_gives_the_replies_of_a_fresh_cache(llm: TransformersLLM) -> None:
    reference = TransformersLLM(llm.model.name_or_path, greedy=True, device="cpu", prefix_cache=False)
    for i, (got, want) in enumerate(_conversation_replies(llm, reference, n=6)):
        assert got == want, f"turn {i}"


# --- bfloat16 on the CPU --------------------------------------------------------------------------------

needs_bf16 = pytest.mark.skipif(not _cpu_bf16(), reason="this CPU has no native bfloat16 (AVX512-BF16/AMX)")


@needs_bf16
def test_a_bf16_checkpoint_runs_in_bf16_on_the_cpu(smollm_dir: Path, llm: TransformersLLM) -> None:
    # The converted folder stores bfloat16: "auto" keeps it so, with every linear layer packed for oneDNN.
    assert json.loads((smollm_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert llm.dtype == torch.bfloat16
    assert llm.packed_layers == 7 * llm.model.config.num_hidden_layers + 1  # and the LM head
    fp32 = TransformersLLM(smollm_dir, greedy=True, device="cpu", dtype="float32")
    assert fp32.dtype == torch.float32 and fp32.packed_layers == 0
    assert "Paris" in "".join(fp32.stream(FRANCE, max_new_tokens=20))


@needs_bf16
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_the_layer(bias: bool) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 40, bias=bias).to(torch.bfloat16)
    packed = _PackedLinear(layer)
    with torch.inference_mode():
        for shape in [(1, 1, 96), (1, 7, 96), (5, 96)]:
            x = torch.randn(shape, dtype=torch.bfloat16)
            got, want = packed(x), layer(x)
            assert got.shape == want.shape and got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("said", "finished"),
    [
        ("I would like to order.", False),  # ASR's period after half a sentence does not fool it
        ("Can you tell me", False),
        ("Please remind me to", False),
        ("What is the best way", False),
        ("What is the capital of France?", True),
        ("Tell me a joke.", True),
        ("I would like to order a large pizza with cheese.", True),
        ("How long does it take to get to the airport", True),
    ],
)
def test_the_words_judge_tells_a_finished_sentence_from_half_of_one(
    llm: TransformersLLM, said: str, finished: bool
) -> None:
    from core.config import DuplexConfig

    threshold = DuplexConfig().eagerness_medium.text_threshold
    system = ChatMessage("system", DuplexConfig().instructions)
    p = llm.end_of_turn_probability([system, ChatMessage("user", said)])
    assert (p >= threshold) == finished, p
    # and the reply's call after it starts from what it fed (prefix reuse), with the same answer as fresh
    assert llm.end_of_turn_probability([system, ChatMessage("user", said)]) == pytest.approx(p, rel=1e-3)


def test_the_words_judge_refuses_a_conversation_not_ending_with_the_user(llm: TransformersLLM) -> None:
    with pytest.raises(LLMError):
        llm.end_of_turn_probability([ChatMessage("user", "hi"), ChatMessage("assistant", "hello")])
    assert llm.end_of_turn_probability([ChatMessage("user", " ... ")]) == 0.0
