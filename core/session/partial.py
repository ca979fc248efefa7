"""Partial transcripts of an utterance in progress, and the words they agree on.

While the user speaks, the session transcribes the audio so far every ``asr_partial_interval_ms`` of
speech. Whisper rewrites the end of a growing transcript as more audio arrives, but the words that two
successive partials share from the start rarely change again (the *local agreement* policy of streaming
Whisper). Those words, less the last one (it may still be cut mid-word), are forced as the prefix of the
next partial and of the final pass, so at the end of the turn only the tail is left to decode.

Pure bookkeeping: the session runs the ASR and feeds the results in.
"""

from __future__ import annotations


def _norm(word: str) -> str:
    return "".join(c.lower() for c in word if c.isalnum())


class PartialTranscripts:
    """The partials of one utterance (identified by its onset sample)."""

    def __init__(self) -> None:
        self.onset: int | None = None
        self.end = 0  # last sample the latest partial heard
        self._last: list[str] = []
        self._agreed: list[str] = []

    def reset(self, onset: int | None = None) -> None:
        """Forget everything (a new utterance starts at ``onset``)."""
        self.onset, self.end = onset, 0
        self._last, self._agreed = [], []

    def add(self, onset: int, end: int, text: str) -> None:
        """A partial transcript of the utterance starting at ``onset``, over its audio up to ``end``."""
        if onset != self.onset:
            self.reset(onset)
        if end < self.end:
            return  # a late answer about older audio
        words = text.split()
        common = 0
        for a, b in zip(self._last, words, strict=False):
            if not _norm(a) or _norm(a) != _norm(b):
                break
            common += 1
        # Agreement only grows: a later partial that disagrees earlier keeps what was agreed already.
        agreed = words[: max(0, common - 1)]
        if len(agreed) > len(self._agreed):
            self._agreed = agreed
        self._last, self.end = words, end

    def prefix(self, onset: int | None) -> str:
        """The agreed words of the utterance starting at ``onset`` ("" for another utterance or none)."""
        return " ".join(self._agreed) if onset is not None and onset == self.onset else ""
