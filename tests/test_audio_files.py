"""Audio files and uploads: real formats decode to the same speech; every bad input is an AudioFileError."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from core.audio.errors import AudioFileError
from core.audio.files import load_audio, load_audio_bytes, probe_duration
from tests.speech import espeak

TEXT = "The quick brown fox jumps over the lazy dog."


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True, timeout=60)


def best_correlation(reference: np.ndarray, other: np.ndarray, max_lag: int = 2000) -> float:
    """Peak normalised cross-correlation within ±``max_lag`` samples (codecs add delay and padding)."""
    n = reference.size + other.size
    spec = np.fft.rfft(other, n) * np.conj(np.fft.rfft(reference, n))
    xcorr = np.fft.irfft(spec, n)
    window = np.concatenate([xcorr[: max_lag + 1], xcorr[-max_lag:]])
    return float(window.max() / (np.linalg.norm(reference) * np.linalg.norm(other)))


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return espeak(TEXT)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory, speech: np.ndarray) -> dict[str, Path]:
    """The same speech as wav (16 kHz), flac (44.1 kHz stereo), mp3, mp4 video (aac), webm (opus)."""
    d = tmp_path_factory.mktemp("media")
    wav = d / "speech.wav"
    sf.write(wav, speech, 16_000)
    files = {"wav": wav}
    files["flac"] = d / "speech.flac"
    ffmpeg("-i", str(wav), "-ar", "44100", "-ac", "2", str(files["flac"]))
    files["mp3"] = d / "speech.mp3"
    ffmpeg("-i", str(wav), "-b:a", "64k", str(files["mp3"]))
    files["mp4"] = d / "speech.mp4"
    ffmpeg(
        "-f", "lavfi", "-i", "color=c=black:s=64x64:r=10", "-i", str(wav), "-shortest",
        "-c:v", "libx264", "-c:a", "aac", "-b:a", "64k", str(files["mp4"]),
    )  # fmt: skip
    files["webm"] = d / "speech.webm"
    ffmpeg("-i", str(wav), "-c:a", "libopus", "-b:a", "32k", str(files["webm"]))
    return files


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "mp4", "webm"])
def test_formats_decode_to_the_same_speech(media: dict[str, Path], speech: np.ndarray, fmt: str) -> None:
    audio = load_audio(media[fmt])
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size - speech.size) < 0.1 * 16_000  # codec padding only
    assert best_correlation(speech, audio) > 0.9
    assert probe_duration(media[fmt]) == pytest.approx(speech.size / 16_000, abs=0.1)


def test_resamples_to_the_requested_rate(media: dict[str, Path], speech: np.ndarray) -> None:
    for fmt in ("wav", "mp4"):
        audio = load_audio(media[fmt], sample_rate=24_000)
        assert audio.size == pytest.approx(speech.size * 1.5, abs=0.1 * 24_000)


@pytest.mark.parametrize("fmt", ["wav", "mp4"])
def test_uploaded_bytes_decode_like_files(media: dict[str, Path], fmt: str) -> None:
    from_bytes = load_audio_bytes(media[fmt].read_bytes(), suffix=f".{fmt}")
    np.testing.assert_allclose(from_bytes, load_audio(media[fmt]), atol=1e-6)


def test_path_starting_with_dash_is_a_file_not_an_option(
    media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # mp4 goes through ffmpeg; names that are real ffmpeg options.
    for name in ("-version", "-i.mp4", "-y"):
        (tmp_path / name).write_bytes(media["mp4"].read_bytes())
        assert load_audio(name).size > 16_000
        assert probe_duration(name) > 1.0
    (tmp_path / "-speech.wav").write_bytes(media["wav"].read_bytes())
    assert load_audio("-speech.wav").size > 16_000


def test_colon_in_name_is_not_a_protocol(
    media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("http:clip.mp4").write_bytes(media["mp4"].read_bytes())
    assert load_audio("http:clip.mp4").size > 16_000


def expect_error(kind: str, fn, *args, **kwargs) -> AudioFileError:  # type: ignore[no-untyped-def]
    with pytest.raises(AudioFileError) as info:
        fn(*args, **kwargs)
    assert info.value.kind == kind, info.value
    return info.value


def test_missing_path(tmp_path: Path) -> None:
    err = expect_error("missing", load_audio, tmp_path / "nope.wav")
    assert "nope.wav" in str(err) and str(tmp_path) not in str(err)
    expect_error("missing", probe_duration, tmp_path / "nope.wav")


def test_directory_and_empty_file(tmp_path: Path) -> None:
    expect_error("unreadable", load_audio, tmp_path)
    (tmp_path / "empty.wav").write_bytes(b"")
    expect_error("empty", load_audio, tmp_path / "empty.wav")
    expect_error("empty", load_audio_bytes, b"")


NOBODY = 65534


def _kind_as_nobody(path: Path) -> str:
    """``load_audio(path)``'s error kind in a forked child that has dropped root for the ``nobody`` user."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                load_audio(path)
                outcome = "read"
            except AudioFileError as exc:
                outcome = exc.kind
            os.write(write_end, outcome.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, outcome
    return outcome


def test_unreadable_file(media: dict[str, Path], tmp_path: Path) -> None:
    if os.geteuid() != 0:
        locked = tmp_path / "locked.wav"
        locked.write_bytes(media["wav"].read_bytes())
        locked.chmod(0)
        expect_error("unreadable", load_audio, locked)
        return
    # Root reads any file, so the check runs as an unprivileged user (CI runs as root), in a folder that
    # user may enter, on a file only root may read.
    folder = Path(tempfile.mkdtemp(prefix="unreadable-"))
    try:
        folder.chmod(0o711)
        locked = folder / "locked.wav"
        locked.write_bytes(media["wav"].read_bytes())
        locked.chmod(0o600)
        assert _kind_as_nobody(locked) == "unreadable"
        locked.chmod(0o644)
        assert _kind_as_nobody(locked) == "read"  # the same file, readable: the user and folder were fine
    finally:
        shutil.rmtree(folder)


def test_corrupt_files(media: dict[str, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    err = expect_error("undecodable", load_audio, garbage)
    assert str(tmp_path) not in str(err)  # no server paths in messages
    broken_mp4 = tmp_path / "broken.mp4"
    broken_mp4.write_bytes(media["mp4"].read_bytes()[:300])
    expect_error("undecodable", load_audio, broken_mp4)
    err = expect_error("undecodable", load_audio_bytes, garbage.read_bytes(), suffix=".mp4")
    assert "/tmp" not in str(err) and "upload" in str(err)


def test_decoder_output_stays_out_of_client_messages(
    media: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ffmpeg's words ("[mov,mp4 @ 0x55d1...] moov atom not found") go to the log and ``detail``, not the message."""
    broken = media["mp4"].read_bytes()[:300]
    with caplog.at_level("INFO", logger="audio.files"):
        err = expect_error("undecodable", load_audio_bytes, broken, suffix=".mp4")
    assert str(err) == err.message == "upload: unsupported or corrupt audio file"
    assert err.detail and ("moov" in err.detail or "Invalid data" in err.detail), err.detail
    assert err.detail in caplog.text
    assert "0x" not in err.message and "@" not in err.message


def test_unsupported_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("this is not audio at all\n" * 100)
    with pytest.raises(AudioFileError) as info:
        load_audio(text)
    # ffmpeg reads text as a "tty" video: no audio stream either way.
    assert info.value.kind in ("undecodable", "no_audio")
    silent_video = tmp_path / "silent.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=c=black:s=64x64:r=10", "-t", "1", "-c:v", "libx264", str(silent_video))
    expect_error("no_audio", load_audio, silent_video)


def test_too_long_and_too_large(media: dict[str, Path]) -> None:
    for fmt in ("wav", "mp3", "mp4"):
        err = expect_error("too_long", load_audio, media[fmt], max_duration_s=1.0)
        assert "limit is 1 s" in str(err)
    data = media["wav"].read_bytes()
    expect_error("too_large", load_audio_bytes, data, max_bytes=len(data) - 1)
    expect_error("too_long", load_audio_bytes, data, max_duration_s=1.0)
