"""Transcript clean-up: cutting the repetition loops that Whisper falls into on hard audio.

A decoder stuck in a loop writes one phrase over and over ("Thank you. Thank you. Thank you. ...").
A phrase of up to ``max_phrase`` units that repeats back to back ``min_repeats`` times or more is kept
once. Units are words (compared without case and punctuation); a long word with no spaces (text in
a script without spaces, or "hahahaha...") is looked at character by character too. Two or three
repeats are left alone: people do say "no, no, no".
"""

from __future__ import annotations

from collections.abc import Sequence

#: A phrase repeated this many times back to back (or more) is a loop.
MIN_REPEATS = 4
#: The longest phrase, in words, looked for.
MAX_PHRASE_WORDS = 16
#: Words at least this long are also searched for character-level loops.
_LONG_WORD = 20
_MAX_PHRASE_CHARS = 24


def loop_free_indices(
    keys: Sequence[str], *, min_repeats: int = MIN_REPEATS, max_phrase: int = MAX_PHRASE_WORDS
) -> list[int]:
    """Indices of ``keys`` to keep once every looped phrase is reduced to one copy.

    At each position the shortest phrase that repeats ``min_repeats`` times wins, so that "ha ha ha ha"
    keeps one "ha", not one "ha ha".
    """
    if min_repeats < 2 or max_phrase < 1:
        raise ValueError("min_repeats must be at least 2 and max_phrase at least 1")
    keep: list[int] = []
    i, n = 0, len(keys)
    while i < n:
        step = 1
        for k in range(1, min(max_phrase, (n - i) // min_repeats) + 1):
            phrase = keys[i : i + k]
            repeats = 1
            while keys[i + repeats * k : i + (repeats + 1) * k] == phrase:
                repeats += 1
            if repeats >= min_repeats:
                keep.extend(range(i, i + k))
                step = repeats * k
                break
        if step == 1:
            keep.append(i)
        i += step
    return keep


def _word_key(word: str) -> str:
    key = "".join(c for c in word.casefold() if c.isalnum())
    return key or word  # a word of punctuation only compares as itself


def _collapse_chars(word: str, min_repeats: int) -> str:
    if len(word) < _LONG_WORD:
        return word
    keep = loop_free_indices(list(word.casefold()), min_repeats=min_repeats, max_phrase=_MAX_PHRASE_CHARS)
    return "".join(word[i] for i in keep)


def collapse_repetitions(
    text: str, *, min_repeats: int = MIN_REPEATS, max_phrase_words: int = MAX_PHRASE_WORDS
) -> str:
    """``text`` with every looped phrase kept once and whitespace normalised to single spaces."""
    words = [_collapse_chars(w, min_repeats) for w in text.split()]
    keep = loop_free_indices(
        [_word_key(w) for w in words], min_repeats=min_repeats, max_phrase=max_phrase_words
    )
    return " ".join(words[i] for i in keep)
