"""Audio and video files (and uploads) to float32 mono PCM at a chosen rate.

soundfile (libsndfile: wav, flac, ogg/vorbis, mp3, aiff…) reads what it can in-process; everything else
(mp4/mkv/webm video, m4a/aac, ogg/opus, wma…) goes through ``ffprobe``/``ffmpeg`` subprocesses: never a
shell, always ``-nostdin``, a timeout, and the path passed as an absolute ``file:`` URL so that a name
starting with ``-`` is never an option and a name like ``http:x`` is never a protocol. Both paths decode
at the file's own rate and resample with soxr. Every failure is an :class:`AudioFileError` whose
``kind`` is one of ``missing``, ``unreadable``, ``empty``, ``too_large``, ``too_long``, ``no_audio``,
``undecodable``, ``timeout``, ``ffmpeg_missing``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Final

import numpy as np
import soundfile as sf
import soxr

from core.audio.errors import AudioFileError

log = logging.getLogger("audio.files")

#: Longest audio accepted by default (seconds); callers serving uploads should pass a smaller one.
DEFAULT_MAX_DURATION_S: Final = 4 * 3600.0
#: Default wall-clock limit of one ffmpeg/ffprobe run (seconds).
DEFAULT_TIMEOUT_S: Final = 300.0
_PROBE_TIMEOUT_S: Final = 30.0


def load_audio(
    path: str | os.PathLike[str],
    sample_rate: int = 16_000,
    *,
    max_duration_s: float | None = DEFAULT_MAX_DURATION_S,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> np.ndarray:
    """Decode an audio or video file to float32 mono at ``sample_rate``; :class:`AudioFileError` if not."""
    p = _checked_path(path)
    audio = _read_soundfile(p, p.name, max_duration_s)
    if audio is None:
        audio = _read_ffmpeg(p, max_duration_s, timeout_s)
    return _finish(audio, sample_rate, p.name)


def load_audio_bytes(
    data: bytes,
    sample_rate: int = 16_000,
    *,
    max_duration_s: float | None = DEFAULT_MAX_DURATION_S,
    max_bytes: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    suffix: str = "",
) -> np.ndarray:
    """Decode an uploaded file's bytes like :func:`load_audio`.

    ``suffix`` (e.g. ``".mp4"``, from the upload's name) only names the temporary file ffmpeg reads;
    formats are always detected from the content.
    """
    if not data:
        raise AudioFileError("the uploaded audio is empty", kind="empty")
    if max_bytes is not None and len(data) > max_bytes:
        raise AudioFileError(f"the upload has {len(data)} bytes; the limit is {max_bytes}", kind="too_large")
    audio = _read_soundfile(io.BytesIO(data), "upload", max_duration_s)
    if audio is None:
        safe_suffix = suffix if suffix[1:].isalnum() and suffix.startswith(".") and len(suffix) <= 8 else ""
        fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=safe_suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            audio = _read_ffmpeg(Path(tmp), max_duration_s, timeout_s, name="upload")
        finally:
            os.unlink(tmp)
    return _finish(audio, sample_rate, "upload")


def probe_duration(path: str | os.PathLike[str], *, timeout_s: float = _PROBE_TIMEOUT_S) -> float:
    """Duration in seconds of a file's audio, from its header (soundfile) or ffprobe; no full decode."""
    p = _checked_path(path)
    try:
        info = sf.info(str(p))
        if info.samplerate > 0 and info.frames > 0:
            return float(info.frames / info.samplerate)
    except Exception:  # libsndfile cannot read it: ffprobe can tell
        pass
    _, duration = _probe(p, timeout_s, p.name)
    if duration is None:
        raise AudioFileError(f"{p.name}: the duration is not known without decoding", kind="undecodable")
    return duration


# --- helpers -----------------------------------------------------------------------------------------


def _checked_path(path: str | os.PathLike[str]) -> Path:
    p = Path(os.fspath(path))
    name = p.name or str(p)
    if not p.exists():
        raise AudioFileError(f"{name}: no such file", kind="missing")
    if not p.is_file():
        raise AudioFileError(f"{name}: not a regular file", kind="unreadable")
    if not os.access(p, os.R_OK):
        raise AudioFileError(f"{name}: permission denied", kind="unreadable")
    if p.stat().st_size == 0:
        raise AudioFileError(f"{name}: the file is empty", kind="empty")
    return p


def _too_long(name: str, duration: float, max_duration_s: float) -> AudioFileError:
    return AudioFileError(
        f"{name}: {duration:.1f} s of audio; the limit is {max_duration_s:.0f} s", kind="too_long"
    )


def _read_soundfile(
    source: Path | io.BytesIO, name: str, max_duration_s: float | None
) -> tuple[np.ndarray, int] | None:
    """(audio, rate) via libsndfile, or None when libsndfile cannot read it (then ffmpeg may)."""
    try:
        f = sf.SoundFile(source if isinstance(source, io.BytesIO) else str(source))
    except Exception:  # any format libsndfile does not know, or a header it rejects
        return None
    with f:
        rate = int(f.samplerate)
        if rate <= 0:
            return None
        if max_duration_s is not None and f.frames > max_duration_s * rate:
            raise _too_long(name, f.frames / rate, max_duration_s)
        try:
            data = f.read(dtype="float32", always_2d=True)
        except Exception:  # a corrupt body after a good header: ffmpeg is more forgiving
            return None
    return data.mean(axis=1, dtype=np.float32), rate


def _run(cmd: list[str], timeout_s: float, name: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s, check=False
        )
    except FileNotFoundError:
        raise AudioFileError(
            f"{cmd[0]} is not installed; cannot decode {name}", kind="ffmpeg_missing"
        ) from None
    except subprocess.TimeoutExpired:
        raise AudioFileError(f"{name}: decoding took longer than {timeout_s:.0f} s", kind="timeout") from None


def _undecodable(name: str, detail: str) -> AudioFileError:
    """A clean client-facing error; what ffmpeg said goes to the log and ``detail`` only."""
    log.info("cannot decode %s: %s", name, detail)
    return AudioFileError(f"{name}: unsupported or corrupt audio file", kind="undecodable", detail=detail)


def _last_line(stderr: bytes, p: Path, name: str) -> str:
    """ffmpeg's last error line, with our file URL replaced by the public name (no server paths)."""
    text = stderr.decode("utf-8", "replace").replace(_file_url(p), name)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no details"


def _file_url(p: Path) -> str:
    # An absolute file: URL: never an option (no leading '-'), never another protocol.
    return "file:" + str(p.resolve())


def _probe(p: Path, timeout_s: float, name: str) -> tuple[int, float | None]:
    """(sample rate, duration or None) of the first audio stream, via ffprobe."""
    cmd = [
        "ffprobe", "-v", "error", "-select_streams", "a:0",
        "-show_entries", "stream=sample_rate,duration:format=duration", "-of", "json", _file_url(p),
    ]  # fmt: skip
    result = _run(cmd, min(timeout_s, _PROBE_TIMEOUT_S), name)
    if result.returncode != 0:
        raise _undecodable(name, _last_line(result.stderr, p, name))
    try:
        info: dict[str, Any] = json.loads(result.stdout or b"{}")
    except ValueError:
        info = {}
    streams = info.get("streams") or []
    if not streams:
        raise AudioFileError(f"{name}: the file has no audio stream", kind="no_audio")
    rate = _to_number(streams[0].get("sample_rate"))
    if not rate or rate <= 0:
        raise AudioFileError(f"{name}: the audio stream has no sample rate", kind="undecodable")
    duration = _to_number(streams[0].get("duration")) or _to_number(
        (info.get("format") or {}).get("duration")
    )
    return int(rate), duration


def _to_number(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _read_ffmpeg(
    p: Path, max_duration_s: float | None, timeout_s: float, name: str | None = None
) -> tuple[np.ndarray, int]:
    name = name or p.name
    rate, duration = _probe(p, timeout_s, name)
    if max_duration_s is not None and duration is not None and duration > max_duration_s:
        raise _too_long(name, duration, max_duration_s)
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-i", _file_url(p)]
    cmd += ["-map", "0:a:0", "-vn", "-sn", "-dn", "-ac", "1", "-ar", str(rate)]
    if max_duration_s is not None:
        # A hard bound whatever the header claimed: one second past the limit proves "too long".
        cmd += ["-t", f"{max_duration_s + 1.0:.3f}"]
    cmd += ["-f", "f32le", "pipe:1"]
    result = _run(cmd, timeout_s, name)
    if result.returncode != 0:
        raise _undecodable(name, _last_line(result.stderr, p, name))
    audio = np.frombuffer(result.stdout[: len(result.stdout) // 4 * 4], dtype="<f4").astype(np.float32)
    if max_duration_s is not None and audio.size > max_duration_s * rate:
        raise _too_long(name, audio.size / rate, max_duration_s)
    return audio, rate


def _finish(decoded: tuple[np.ndarray, int], sample_rate: int, name: str) -> np.ndarray:
    audio, rate = decoded
    if audio.size == 0:
        raise AudioFileError(f"{name}: the file holds no audio samples", kind="empty")
    audio = np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0)
    if rate != sample_rate:
        audio = soxr.resample(audio, rate, sample_rate)
    return np.ascontiguousarray(audio, dtype=np.float32)
