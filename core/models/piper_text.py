"""Text for the Piper voice: cleaned, split into sentences and clauses, cut into chunks of bounded length.

Each chunk is spoken by one model call. The splitting is ours rather than espeak-ng's because we decide
where a sentence ends: "Dr. Smith" stays one sentence, a line break ends one, and dashes and ellipses are
pauses. A chunk goes to the phonemizer as plain text with each clause's punctuation rewritten after it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

#: Longest text one ``synthesize`` call accepts (a spoken reply is far shorter).
MAX_TEXT_CHARS = 10_000
#: A clause without punctuation longer than this is cut at spaces, so that no model call grows unbounded.
_MAX_CLAUSE_CHARS = 250
#: A run-on "sentence" longer than this is spoken in several chunks, cut at clause boundaries.
_MAX_CHUNK_CHARS = 400
SENTENCE_END = ".!?"


class TTSError(Exception):
    """A TTS failure with a short machine-readable ``kind``: bad text or voice, missing or bad model."""

    def __init__(self, message: str, *, kind: str = "tts") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Clause:
    """A piece of a sentence spoken in one breath, and the punctuation that ends it ("" for none)."""

    text: str
    end: str


_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e"})
_BREAK = re.compile(
    r"""(?P<punct>\.{2,}|…|[.!?]+|[,;:])["'”’»)\]]*(?=\s|$)   # punctuation before a space or the end
      | \s[-–—]+\s | [–—]+                                   # a dash between words
      | (?P<newline>\n)""",
    re.VERBOSE,
)


def sanitize(text: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """Drop control and invisible format characters, keep line breaks, reject over-long or non-string text."""
    if not isinstance(text, str):
        raise TTSError(f"text must be a string, got {type(text).__name__}", kind="tts_input")
    if len(text) > max_chars:
        raise TTSError(f"text is {len(text)} characters, the limit is {max_chars}", kind="tts_input")
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    kept = []
    for ch in text:
        if ch == "\n" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
            kept.append(ch)
        elif ch in "\t\u2028\u2029":
            kept.append(" " if ch == "\t" else "\n")
    # "[[ ... ]]" is the phonemizer's inline phoneme syntax: text must never reach it as such.
    return "".join(kept).replace("[", "(").replace("]", ")")


def split_sentences(text: str) -> list[list[Clause]]:
    """Sanitized text -> sentences -> clauses, at punctuation followed by a space, dashes and line breaks."""
    sentences: list[list[Clause]] = []
    current: list[Clause] = []
    pos = 0
    for match in (*_BREAK.finditer(text), None):
        start, stop = (match.start(), match.end()) if match else (len(text), len(text))
        piece = text[pos:start].strip()
        if match and match.group("punct") == "." and _last_word(piece) in _ABBREVIATIONS:
            continue  # "Dr. Smith": the clause goes on past the abbreviation's dot
        pos = stop
        end = _terminator(match)
        if any(ch.isalnum() for ch in piece):
            current.extend(_bound(piece, end))
        elif (
            end in SENTENCE_END and current
        ):  # a mark with no words before it ("Hello, !") ends the last clause
            current[-1] = Clause(current[-1].text, end)
        if current and (match is None or end in SENTENCE_END):
            sentences.append(current)
            current = []
    return sentences


def _last_word(piece: str) -> str:
    words = piece.split()
    return words[-1].lower() if words else ""


def _terminator(match: re.Match[str] | None) -> str:
    if match is None or match.group("newline"):
        return "."
    punct = match.group("punct")
    if punct is None or punct.startswith("..") or punct == "…":
        return ","  # dashes and ellipses are pauses, not sentence ends
    for mark in "?!.,;:":
        if mark in punct:
            return mark
    return "."


def _bound(piece: str, end: str) -> list[Clause]:
    """Split an over-long clause at spaces into pieces of bounded length; only the last keeps ``end``."""
    parts: list[str] = []
    for word in piece.split():
        word = word[:_MAX_CLAUSE_CHARS]
        if parts and len(parts[-1]) + 1 + len(word) <= _MAX_CLAUSE_CHARS:
            parts[-1] += " " + word
        else:
            parts.append(word)
    return [Clause(p, end if i == len(parts) - 1 else "") for i, p in enumerate(parts)]


def chunk_sentences(sentences: Sequence[Sequence[Clause]]) -> list[list[Clause]]:
    """One chunk per sentence, except that a run-on sentence is cut at clauses into chunks of bounded length."""
    chunks: list[list[Clause]] = []
    for sentence in sentences:
        chunk: list[Clause] = []
        size = 0
        for clause in sentence:
            if chunk and size + len(clause.text) > _MAX_CHUNK_CHARS:
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append(clause)
            size += len(clause.text) + 1
        chunks.append(chunk)
    return chunks


def chunk_texts(text: str) -> list[str]:
    """Sanitized text -> the text of each chunk, every clause followed by the punctuation that ends it."""
    return [" ".join(c.text + c.end for c in chunk) for chunk in chunk_sentences(split_sentences(text))]
