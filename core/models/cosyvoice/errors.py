"""The one error type of the CosyVoice2 backend."""

from __future__ import annotations


class CosyVoiceError(Exception):
    """A CosyVoice2 failure with a short machine-readable ``kind``.

    Kinds: ``tts_model`` (a missing or malformed model folder, file or weight), ``tts_voice`` (an unknown
    voice or a reference recording that cannot be used), ``tts_text`` (text the model cannot speak).
    """

    def __init__(self, message: str, *, kind: str = "tts_model") -> None:
        super().__init__(message)
        self.kind = kind
