"""Local agreement of partial transcripts: what is forced as the prefix of the final pass."""

from __future__ import annotations

import pytest

from core.session.partial import PartialTranscripts


@pytest.mark.parametrize(
    ("partials", "prefix"),
    [
        ([], ""),
        (["I would like"], ""),  # one partial agrees with nothing
        (["I would like", "I would like to order"], "I would"),  # the last agreed word is held back
        (
            ["I would like to", "I would like to order a", "I would like to order a large"],
            "I would like to order",
        ),
        (["What is the", "Where is the nearest"], ""),  # no common start
        (
            ["I would like to", "I would like to order", "I'd like to order a pizza"],
            "I would like",
        ),  # agreement never shrinks
        (
            ["Hello, there", "hello there friend"],
            "hello",
        ),  # case and punctuation do not break it; newest spelling
    ],
)
def test_agreed_prefix(partials: list[str], prefix: str) -> None:
    p = PartialTranscripts()
    for i, text in enumerate(partials):
        p.add(100, 1000 * (i + 1), text)
    assert p.prefix(100) == prefix


def test_another_utterance_starts_afresh_and_late_answers_are_ignored() -> None:
    p = PartialTranscripts()
    p.add(100, 1000, "I would like to")
    p.add(100, 2000, "I would like to order")
    assert p.prefix(100) == "I would like"
    assert p.prefix(5000) == "" and p.prefix(None) == ""
    p.add(100, 1500, "something older")  # about less audio than the latest: ignored
    assert p.prefix(100) == "I would like"
    p.add(5000, 6000, "new words here")
    assert p.prefix(100) == "" and p.prefix(5000) == ""
