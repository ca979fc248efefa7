"""Error types of the audio transport: every bad-input failure in core/audio raises one of these."""

from __future__ import annotations


class AudioError(Exception):
    """Base of all audio errors; ``kind`` is a short machine-readable reason (stable, for logs and metrics).

    The message is ours and safe to show a client; ``detail`` is what a decoder said (ffmpeg's last line,
    which can hold memory addresses and library internals), for the log and the operator's own outputs only.
    """

    kind: str = "audio_error"

    def __init__(self, message: str, *, kind: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind
        self.detail = detail

    @property
    def message(self) -> str:
        """The human-readable message (no traceback, safe to show a client)."""
        return str(self.args[0]) if self.args else self.kind


class FramingError(AudioError):
    """A malformed length-prefixed packet stream (bad length, truncated tail, bad base64, broken stream).

    ``offset`` is the stream byte offset where the problem was found (-1 where none applies).
    """

    kind = "framing"

    def __init__(self, message: str, *, kind: str | None = None, offset: int = -1) -> None:
        super().__init__(message, kind=kind)
        self.offset = offset


class OpusPacketError(AudioError):
    """An Opus packet that fails validation or that libopus refuses to decode."""

    kind = "opus_packet"


class AudioFileError(AudioError):
    """An audio or video file (or upload) that cannot be turned into audio: missing, undecodable, too long…"""

    kind = "audio_file"
