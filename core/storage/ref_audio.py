"""The reference-voice registry: uploaded recordings a zero-shot TTS can speak like.

Layout under the root (``data/ref_audio`` by default): one ``<name>.wav`` per voice (the upload decoded to
24 kHz mono 16-bit) and ``registry.json`` with each voice's transcript, duration and creation time. The
JSON is rewritten atomically (temporary file + rename) under a lock, so a crash never leaves half a file.

Uploads are checked before anything is written: the audio must decode (any format core.audio.files
reads), last 1-30 s and not be silent. Names are 1-64 characters of letters, digits, ``_`` and ``-``,
starting with a letter or digit: no path separators, no dots, nothing a file system could read as a path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from core.audio.errors import AudioError
from core.audio.files import load_audio_bytes
from core.storage.private import private_dir

log = logging.getLogger("storage.ref_audio")

SAMPLE_RATE = 24_000
MIN_SECONDS = 1.0
MAX_SECONDS = 30.0
MAX_TEXT_CHARS = 1000
#: RMS below this (about -60 dBFS) counts as silence.
SILENCE_RMS = 1e-3
#: Names the TTS gives its own voices; an upload may not take them.
RESERVED_NAMES = frozenset({"default"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_REGISTRY = "registry.json"


class RefAudioError(Exception):
    """A rejected upload or lookup; ``kind`` is one of bad_name, bad_text, bad_audio, too_large, exists,
    not_found, storage."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class RefVoice:
    """One stored reference voice."""

    name: str
    file: str
    duration_s: float
    created_at: float
    text: str | None = None

    def public(self) -> dict[str, Any]:
        """What an API may show (no file-system path)."""
        return {
            "name": self.name,
            "duration_s": self.duration_s,
            "created_at": self.created_at,
            "text": self.text,
        }


def check_name(name: str) -> str:
    """``name`` if it is a valid voice name, else :class:`RefAudioError` (kind ``bad_name``)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RefAudioError(
            f"invalid voice name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit",
            kind="bad_name",
        )
    return name


def check_audio(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Duration in seconds of a usable reference recording, else :class:`RefAudioError` (``bad_audio``)."""
    duration = len(audio) / sample_rate
    if duration < MIN_SECONDS:
        raise RefAudioError(
            f"the recording lasts {duration:.2f} s; at least {MIN_SECONDS:g} s is needed", kind="bad_audio"
        )
    if duration > MAX_SECONDS:
        raise RefAudioError(
            f"the recording lasts {duration:.1f} s; at most {MAX_SECONDS:g} s is allowed", kind="bad_audio"
        )
    if (
        not np.isfinite(audio).all()
        or float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) < SILENCE_RMS
    ):
        raise RefAudioError("the recording is silent", kind="bad_audio")
    return duration


class RefAudioRegistry:
    """Reference voices stored on disk; safe to use from several threads."""

    def __init__(
        self, root: str | Path = "data/ref_audio", *, max_upload_bytes: int = 50 * 1024 * 1024
    ) -> None:
        self.root = Path(root)
        self.max_upload_bytes = max_upload_bytes
        self._lock = threading.Lock()
        self._voices = self._read()

    # ------------------------------------------------------------------------------- persistence

    def _read(self) -> dict[str, RefVoice]:
        path = self.root / _REGISTRY
        if not path.is_file():
            return {}
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            entries = raw["voices"]
            voices = {name: RefVoice(name=name, **entry) for name, entry in entries.items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Keep the unreadable file for a human and start empty rather than refuse to serve.
            aside = path.with_name(f"{_REGISTRY}.unreadable-{int(time.time())}")
            log.error("%s is unreadable (%s); moved to %s", path, exc, aside.name)
            os.replace(path, aside)
            return {}
        kept = {}
        for name, voice in voices.items():
            if _NAME.fullmatch(name) and voice.file == f"{name}.wav" and (self.root / voice.file).is_file():
                kept[name] = voice
            else:
                log.warning("registry entry %r has no valid audio file; ignored", name)
        return kept

    def _write(self, voices: dict[str, RefVoice]) -> None:
        body = {
            "version": 1,
            "voices": {n: {k: v for k, v in asdict(r).items() if k != "name"} for n, r in voices.items()},
        }
        self._atomic(self.root / _REGISTRY, json.dumps(body, indent=2, ensure_ascii=False).encode("utf-8"))

    def _atomic(self, path: Path, data: bytes) -> None:
        private_dir(self.root)  # users' voices: owner-only (mkstemp makes the file 0600)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------------------------ access

    def voices(self) -> list[RefVoice]:
        """All voices, by name."""
        with self._lock:
            return [self._voices[n] for n in sorted(self._voices)]

    def get(self, name: str) -> RefVoice:
        """One voice; ``not_found`` if absent."""
        check_name(name)
        with self._lock:
            voice = self._voices.get(name)
        if voice is None:
            raise RefAudioError(f"no reference voice named {name!r}", kind="not_found")
        return voice

    def path(self, voice: RefVoice) -> Path:
        """The voice's wav file."""
        return self.root / voice.file

    def resolve(self, name: str) -> tuple[Path, str | None] | None:
        """(wav file, transcript) of a voice, or None: the shape ``CosyVoice2TTS.voice_resolver`` takes."""
        try:
            voice = self.get(name)
        except RefAudioError:
            return None
        return self.path(voice), voice.text

    def add(
        self, name: str, data: bytes, *, text: str | None = None, filename: str = "", replace: bool = False
    ) -> RefVoice:
        """Validate and store an uploaded recording under ``name``."""
        check_name(name)
        if name in RESERVED_NAMES:
            raise RefAudioError(f"{name!r} is reserved for the configured voice", kind="bad_name")
        if text is not None:
            text = text.strip() or None
            if text is not None and len(text) > MAX_TEXT_CHARS:
                raise RefAudioError(
                    f"the transcript is longer than {MAX_TEXT_CHARS} characters", kind="bad_text"
                )
        if len(data) > self.max_upload_bytes:
            raise RefAudioError(f"the upload is over {self.max_upload_bytes} bytes", kind="too_large")
        with self._lock:
            if name in self._voices and not replace:
                raise RefAudioError(
                    f"a voice named {name!r} exists (send replace=true to overwrite it)", kind="exists"
                )
        try:
            audio = load_audio_bytes(
                data,
                SAMPLE_RATE,
                max_duration_s=MAX_SECONDS + 0.5,
                max_bytes=self.max_upload_bytes,
                suffix=Path(filename).suffix,
            )
        except AudioError as exc:
            raise RefAudioError(f"cannot use this recording: {exc}", kind="bad_audio") from exc
        duration = check_audio(audio)
        voice = RefVoice(
            name=name, file=f"{name}.wav", duration_s=round(duration, 3), created_at=time.time(), text=text
        )
        buf = _wav_bytes(audio)
        with self._lock:
            if name in self._voices and not replace:
                raise RefAudioError(
                    f"a voice named {name!r} exists (send replace=true to overwrite it)", kind="exists"
                )
            try:
                self._atomic(self.root / voice.file, buf)
                updated = {**self._voices, name: voice}
                self._write(updated)
            except OSError as exc:
                raise RefAudioError(f"cannot store the voice: {exc}", kind="storage") from exc
            self._voices = updated
        log.info("reference voice %r stored (%.1f s)", name, duration)
        return voice

    def remove(self, name: str) -> RefVoice:
        """Delete a voice and its file; ``not_found`` if absent."""
        check_name(name)
        with self._lock:
            voice = self._voices.get(name)
            if voice is None:
                raise RefAudioError(f"no reference voice named {name!r}", kind="not_found")
            updated = {n: v for n, v in self._voices.items() if n != name}
            try:
                self._write(updated)
            except OSError as exc:
                raise RefAudioError(f"cannot update the registry: {exc}", kind="storage") from exc
            self._voices = updated
            (self.root / voice.file).unlink(missing_ok=True)
        log.info("reference voice %r removed", name)
        return voice


def _wav_bytes(audio: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()
