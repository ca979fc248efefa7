"""Session recordings under ``data/sessions/<id>/``: what the user said, what the assistant said, and when.

Layout of one session directory:

- ``meta.json``: session settings and models (rewritten atomically: temp file + rename);
- ``user.wav``: the user's input, 16 kHz mono pcm16, appended as it arrives;
- ``assistant_<n>.wav``: the assistant's audio of turn ``n``, 24 kHz mono pcm16;
- ``timeline.jsonl``: one JSON object per line (``{"t": seconds, "kind": ..., ...}``).

Audio is flushed at least every ``flush_interval_s`` seconds with the WAV header patched to the data
written so far, and every timeline line is flushed as it is written, so a crash loses at most the last
second. A recording that fails (disk full, permissions) logs once and stops; it never ends a session.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from core.storage.private import open_private_binary, open_private_text, private_dir, write_private

log = logging.getLogger(__name__)

_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
USER_SAMPLE_RATE = 16_000
ASSISTANT_SAMPLE_RATE = 24_000


class RecordingError(ValueError):
    """A session id that is not safe as a directory name, or a recording that cannot start."""


def validate_session_id(session_id: str) -> str:
    """Return ``session_id`` if it is 1-128 of [A-Za-z0-9_-] not starting with - or _, else raise."""
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise RecordingError(
            f"invalid session id {str(session_id)[:64]!r}: use 1-128 letters, digits, '-' or '_'"
        )
    return session_id


def session_dir(root: str | Path, session_id: str) -> Path:
    """The directory of ``session_id`` under ``root`` (validated; never outside ``root``)."""
    base = Path(root).resolve()
    path = (base / validate_session_id(session_id)).resolve()
    if path.parent != base:
        raise RecordingError(f"session id {session_id!r} escapes the recordings directory")
    return path


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temp file and a rename, so a reader never sees half a file."""
    write_private(path, json.dumps(data, indent=2, ensure_ascii=False, default=str).encode("utf-8"))


def _pcm16(audio: np.ndarray) -> bytes:
    samples = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    return (samples * 32767.0).astype("<i2").tobytes()


class WavAppender:
    """A mono pcm16 WAV file written in pieces; the header is valid after every :meth:`flush`."""

    def __init__(self, path: Path, sample_rate: int) -> None:
        self.path = path
        self._file: BinaryIO = open_private_binary(path)  # closed in close()
        self._wav = wave.open(self._file, "wb")  # noqa: SIM115
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(sample_rate)
        self._pending: list[bytes] = []
        self.samples = 0

    def append(self, audio: np.ndarray) -> None:
        """Queue float audio in [-1, 1] (written at the next :meth:`flush`)."""
        data = _pcm16(audio)
        self._pending.append(data)
        self.samples += len(data) // 2

    def flush(self) -> None:
        """Write queued audio, patch the header (``wave`` does it on every write) and flush to the OS."""
        if self._pending:
            self._wav.writeframes(b"".join(self._pending))
            self._pending.clear()
        self._file.flush()

    def close(self) -> None:
        """Flush and close (the files are closed even when the flush fails)."""
        try:
            self.flush()
        finally:
            try:
                self._wav.close()
            finally:
                self._file.close()


class SessionRecorder:
    """Writes one session's recording (see the module doc). Every method is safe to call after a failure."""

    def __init__(
        self,
        root: str | Path,
        session_id: str,
        meta: dict[str, Any],
        clock: Callable[[], float],
        *,
        flush_interval_s: float = 1.0,
    ) -> None:
        self.dir = session_dir(root, session_id)
        self._clock = clock
        self.flush_interval_s = flush_interval_s
        self.failed = False
        self._meta = dict(meta, session_id=session_id)
        self._assistant: WavAppender | None = None
        self._assistant_turn: int | None = None
        try:
            private_dir(self.dir.parent)
            private_dir(self.dir)
            write_json_atomic(self.dir / "meta.json", self._meta)
            self._user = WavAppender(self.dir / "user.wav", USER_SAMPLE_RATE)
            self._timeline = open_private_text(self.dir / "timeline.jsonl", append=True)
        except OSError as exc:
            raise RecordingError(f"cannot record session {session_id}: {exc}") from exc
        self._last_flush = clock()

    def user_audio(self, audio: np.ndarray) -> None:
        """Append user input audio (16 kHz float32)."""
        self._guard(self._user.append, audio)
        self._maybe_flush()

    def assistant_audio(self, turn: int, audio: np.ndarray) -> None:
        """Append assistant audio (24 kHz float32) of turn ``turn`` (a new turn starts a new file)."""
        if self.failed:
            return
        if turn != self._assistant_turn:
            self.end_assistant_turn()
            self._assistant_turn = turn
            self._assistant = self._guard(
                WavAppender, self.dir / f"assistant_{turn}.wav", ASSISTANT_SAMPLE_RATE
            )
        if self._assistant is not None:
            self._guard(self._assistant.append, audio)
        self._maybe_flush()

    def end_assistant_turn(self) -> None:
        """Close the current assistant file, if any."""
        if self._assistant is not None:
            self._guard(self._assistant.close)
        self._assistant, self._assistant_turn = None, None

    def event(self, entry: dict[str, Any]) -> None:
        """Append one timeline entry and flush it."""
        if not self.failed:
            self._guard(self._write_line, entry)

    def update_meta(self, **fields: Any) -> None:
        """Merge ``fields`` into meta.json (rewritten atomically)."""
        self._meta.update(fields)
        if not self.failed:
            self._guard(write_json_atomic, self.dir / "meta.json", self._meta)

    def flush(self) -> None:
        """Write everything queued."""
        if self.failed:
            return
        self._guard(self._user.flush)
        if self._assistant is not None:
            self._guard(self._assistant.flush)
        self._last_flush = self._clock()

    def close(self) -> None:
        """Flush and close every file (quietly, also after a failure)."""
        for appender in (self._assistant, self._user):
            if appender is not None:
                with contextlib.suppress(OSError, ValueError, wave.Error):
                    appender.close()
        self._assistant = None
        self.failed = True  # nothing more is written
        with contextlib.suppress(OSError):
            self._timeline.close()

    def _write_line(self, entry: dict[str, Any]) -> None:
        self._timeline.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
        self._timeline.flush()

    def _maybe_flush(self) -> None:
        if not self.failed and self._clock() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.failed:
            return None
        try:
            return fn(*args)
        except (OSError, ValueError, wave.Error) as exc:
            log.error("recording of %s stopped: %s", self.dir.name, exc)
            self.failed = True
            return None
