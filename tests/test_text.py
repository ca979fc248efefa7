"""The LLM-to-TTS text chunker and the speech cleaner, table-tested, fed whole and token by token."""

from __future__ import annotations

import re

import pytest

from core.session.text import SentenceChunker, clean_for_speech


def chunks(text: str, *, step: int | None = None, **kw: int) -> list[str]:
    """Chunk ``text`` fed in pieces of ``step`` characters (None: word-like LLM tokens)."""
    chunker = SentenceChunker(**kw)
    pieces = (
        re.findall(r"\s*\S+", text)
        if step is None
        else [text[i : i + step] for i in range(0, len(text), step)]
    )
    out: list[str] = []
    for piece in pieces:
        out += chunker.push(piece)
    return out + chunker.flush()


CASES = [
    # the first chunk may end at a clause once it is long enough; later ones only at sentence ends
    (
        "Well, the capital of France, as you know, is Paris. It is big, old, and lovely.",
        ["Well, the capital of France,", "as you know, is Paris.", "It is big, old, and lovely."],
    ),
    ("Sure, I can help with that.", ["Sure, I can help with that."]),  # "Sure," is too short alone
    ("Hi. How are you?", ["Hi.", "How are you?"]),
    ("Really?! Yes... I think so!", ["Really?!", "Yes...", "I think so!"]),
    # periods that do not end a sentence
    ("Dr. Smith said e.g. this one. Next.", ["Dr. Smith said e.g. this one.", "Next."]),
    ("Pi is 3.14 roughly. Next.", ["Pi is 3.14 roughly.", "Next."]),
    ("I live in the U.S. now, you know. Ok.", ["I live in the U.S. now,", "you know.", "Ok."]),
    ("It costs 1,000 dollars. Ok.", ["It costs 1,000 dollars.", "Ok."]),
    ("Meet at 5 p.m. today. Ok.", ["Meet at 5 p.m. today.", "Ok."]),
    ('He said "stop." Then left.', ['He said "stop."', "Then left."]),
    # Chinese punctuation ends chunks at once; the first may end at a clause mark
    (
        "你好，我是你的助手，很高兴认识你。今天天气很好！你呢？",
        ["你好，我是你的助手，", "很高兴认识你。", "今天天气很好！", "你呢？"],
    ),
    ("首先、其次；最后。", ["首先、其次；", "最后。"]),
    ("好的。", ["好的。"]),
    # markdown and emoji a TTS would read aloud are removed
    ("**Hello** there 😀! Have a `nice` day 🎉.", ["Hello there!", "Have a nice day."]),
    ("# Title\n- first item\n- second item\n", ["Title", "first item", "second item"]),
    ("See [the docs](https://x.y/z) now.", ["See the docs now."]),
    ("👍", []),
    ("", []),
    ("no punctuation at all", ["no punctuation at all"]),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
@pytest.mark.parametrize("step", [None, 1, 7, 10_000])
def test_chunks(text: str, expected: list[str], step: int | None) -> None:
    assert chunks(text, step=step) == expected


def test_the_first_clause_is_out_as_soon_as_it_exists() -> None:
    chunker = SentenceChunker()
    assert chunker.push("Well, the capital of France,") == []  # a comma needs the next character
    assert chunker.push(" as") == ["Well, the capital of France,"]
    assert chunker.push(" you know, is Paris") == []  # later chunks wait for the sentence end
    assert chunker.push(". It") == ["as you know, is Paris."]
    assert chunker.flush() == ["It"]


def test_a_long_run_without_sentence_end_is_cut() -> None:
    text = "word " * 100
    out = chunks(text, max_chars=60)
    assert all(len(c) <= 60 for c in out)
    assert " ".join(out).split() == text.split()


def test_first_min_chars() -> None:
    assert chunks("Yes, of course it is.", first_min_chars=3) == ["Yes,", "of course it is."]
    assert chunks("Yes, of course it is.", first_min_chars=10) == ["Yes, of course it is."]


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("**bold** and *it* and __u__", "bold and it and u"),
        ("~~gone~~ `code` ```block```", "gone code block"),
        ("> quoted", "quoted"),
        ("snake_case stays", "snake_case stays"),
        ("It is 25°C and 30% off €5", "It is 25°C and 30% off €5"),
        ("flags 🇫🇷 hearts ❤️ family 👨‍👩‍👧 keycap 1️⃣", "flags hearts family keycap 1"),
        ("  spaced \n\n out  ", "spaced out"),
    ],
)
def test_clean_for_speech(raw: str, clean: str) -> None:
    assert clean_for_speech(raw) == clean
