"""Text between the LLM and the TTS: an incremental clause/sentence chunker and a cleaner for speech.

The first chunk of a reply decides when the user hears something, so it may end at a clause mark
(, ; : ， 、 ； ：) once it is long enough to sound natural; later chunks end at whole sentences, which a
TTS voices with better prosody. A period only ends a sentence when whitespace follows and the word
before it is not an abbreviation, initials or a list number, so "e.g.", "Dr.", "U.S." and "3.14" stay
whole; that needs one character of look-ahead, which the next token (or :meth:`SentenceChunker.flush`)
brings. Chinese marks end a chunk at once (no spaces follow them).
"""

from __future__ import annotations

import re

_ASCII_ENDS = "!?"
_CJK_ENDS = "。！？"
_ASCII_CLAUSES = ",;:"
_CJK_CLAUSES = "，、；："
_CLOSERS = "\"')]}”’」』）》"
#: Words that end with a period without ending the sentence (lower case, without the final period).
ABBREVIATIONS = frozenset(
    [
        "e.g",
        "i.e",
        "dr",
        "mr",
        "mrs",
        "ms",
        "prof",
        "sr",
        "jr",
        "st",
        "vs",
        "approx",
        "dept",
        "fig",
        "mt",
        "cf",
    ]
)
_INITIALS = re.compile(r"(?:[A-Za-z]\.)*[A-Za-z]")

# Pictographs a TTS would spell out or choke on: emoji blocks, dingbats, arrows/stars, flags, keycaps,
# variation selectors and joiners. Plain symbols such as ° % € are kept: they are spoken.
_EMOJI = re.compile(
    "[\U0001f000-\U0001faff\u2600-\u27bf\u2b00-\u2bff\u2300-\u23ff\ufe0e\ufe0f\u200d\u20e3"
    "\U000e0020-\U000e007f]"
)
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_LINE_MARKUP = re.compile(r"^[ \t]*(?:#{1,6}[ \t]+|>[ \t]*|[-*+][ \t]+)", re.MULTILINE)
_INLINE_MARKUP = re.compile(r"\*+|`+|~~|__|(?<!\w)_(?=\w)|(?<=\w)_(?!\w)")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_MARK = re.compile(r"\s+([,.!?;:。！？，、；：])")
_SPEAKABLE = re.compile(r"\w")


def clean_for_speech(text: str) -> str:
    """``text`` without the markdown and emoji a TTS would read aloud, whitespace collapsed."""
    text = _LINK.sub(r"\1", text)
    text = _LINE_MARKUP.sub("", text)
    text = _INLINE_MARKUP.sub("", text)
    text = _EMOJI.sub("", text)
    text = _SPACE_BEFORE_MARK.sub(r"\1", text)  # what a removed emoji leaves: "there 😀!" -> "there!"
    return _SPACES.sub(" ", text).strip()


def _weight(c: str) -> int:
    # A CJK character carries about as much speech as two Latin letters.
    if c.isspace():
        return 0
    return 2 if "\u3000" <= c <= "\u9fff" or "\uac00" <= c <= "\ud7af" else 1


def _word_before(text: str, end: int) -> str:
    start = end
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    return text[start:end].lstrip("\"'([{“‘")


def _period_ends_sentence(text: str, i: int) -> bool:
    """Whether the '.' at ``i`` (followed by whitespace) ends a sentence."""
    word = _word_before(text, i)
    if not word or word.lower() in ABBREVIATIONS or _INITIALS.fullmatch(word):
        return False
    line_start = text.rfind("\n", 0, i) + 1
    at_line_start = not text[line_start : i - len(word)].strip()
    return not (word.isdigit() and at_line_start)  # "1. " opens a list item


def _skip_closers(text: str, j: int) -> int:
    while j < len(text) and text[j] in _CLOSERS:
        j += 1
    return j


def _boundary_at(text: str, i: int, final: bool, clauses: bool) -> int | None:
    """The cut index if a chunk may end with the character at ``i``, else None (None also means: wait)."""
    c = text[i]
    if c in _CJK_ENDS or (clauses and c in _CJK_CLAUSES):
        return _skip_closers(text, i + 1)
    if c == "\n":
        return i + 1 if text[:i].strip() else None
    ascii_end = c in _ASCII_ENDS or c in ".…"
    if not ascii_end and not (clauses and c in _ASCII_CLAUSES):
        return None
    j = i + 1
    while ascii_end and j < len(text) and text[j] in ".!?…":
        j += 1  # "...", "?!"
    j = _skip_closers(text, j)
    if j == len(text):
        return j if final else None
    if not text[j].isspace():
        return None
    if c == "." and j == i + 1 and not _period_ends_sentence(text, i):
        return None
    return j


class SentenceChunker:
    """Cuts a streamed reply into chunks for the TTS: :meth:`push` each delta, :meth:`flush` at the end.

    Chunks are returned cleaned for speech (:func:`clean_for_speech`); a piece with nothing speakable
    (a lone emoji, a markdown rule) is dropped. ``first_min_chars`` is how long the first chunk must be
    before a clause mark may end it; ``max_chars`` bounds a chunk that never reaches a sentence end.
    """

    def __init__(self, first_min_chars: int = 10, max_chars: int = 220) -> None:
        self.first_min_chars = first_min_chars
        self.max_chars = max_chars
        self._buf = ""
        self._emitted = 0

    def push(self, delta: str) -> list[str]:
        """Add an LLM text delta; return the chunks it completes, in order."""
        self._buf += delta
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """End of the reply: return what is left as chunks."""
        out = self._drain(final=True)
        rest, self._buf = self._buf, ""
        return out + self._emit(rest)

    def _drain(self, final: bool) -> list[str]:
        out: list[str] = []
        while (cut := self._find_cut(final)) is not None:
            piece, self._buf = self._buf[:cut], self._buf[cut:].lstrip()
            out += self._emit(piece)
        return out

    def _find_cut(self, final: bool) -> int | None:
        text = self._buf
        first = self._emitted == 0
        weight = 0
        for i, c in enumerate(text):
            clauses = first and weight >= self.first_min_chars
            weight += _weight(c)
            cut = _boundary_at(text, i, final, clauses)
            if cut is not None:
                return cut
        if len(text) > self.max_chars:
            return self._fallback_cut(text)
        return None

    def _fallback_cut(self, text: str) -> int:
        """A cut for an over-long run without a sentence end: the last clause mark, else the last space."""
        head = text[: self.max_chars]
        for marks in (_ASCII_CLAUSES + _CJK_CLAUSES, " "):
            k = max(head.rfind(m) for m in marks)
            if k > 0:
                return k + 1
        return self.max_chars

    def _emit(self, piece: str) -> list[str]:
        cleaned = clean_for_speech(piece)
        if not _SPEAKABLE.search(cleaned):
            return []
        self._emitted += 1
        return [cleaned]


def same_words(a: str, b: str) -> bool:
    """Whether two transcripts say the same words, ignoring case and punctuation."""

    def words(text: str) -> list[str]:
        return "".join(c.lower() if c.isalnum() or c.isspace() else " " for c in text).split()

    return words(a) == words(b)
