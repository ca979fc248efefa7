"""Recordings longer than Whisper's 30 s window, on every path: the OpenAI endpoint, the one-shot route, the job
API (the embedded cluster, CTranslate2 Whisper) and both Whisper backends directly (the production one is
transformers); distill has its own long-file test in test_distill_whisper.py.

A looped recording says the same words again and again: each copy was said and must be in the transcript,
with timestamps running across the whole file (the repetition guard once took such text for a loop and kept
one copy). A recording with no pause at all must still be split and read whole.
"""

from __future__ import annotations

import io
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from core.models import embedded
from core.models.base import Transcript
from tests.services import cluster
from tests.speech import espeak, word_error_rate

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "data" / "models"
SR = 16_000
SENTENCES = (
    "The weather is lovely today, so we will walk to the park.",
    "Please open the window before the meeting starts.",
    "My favorite color is green.",
)


def _trimmed(audio: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """``audio`` without its leading and trailing silence."""
    loud = np.flatnonzero(np.abs(audio) > floor)
    return audio[loud[0] : loud[-1] + 1]


def recording() -> tuple[np.ndarray, str]:
    """About 9 s: the three sentences with short pauses between them, and what they say."""
    gap = np.zeros(int(0.4 * SR), np.float32)
    parts = [np.concatenate([espeak(s), gap]) for s in SENTENCES]
    return np.concatenate(parts).astype(np.float32), " ".join(SENTENCES)


def looped(seconds: float) -> tuple[np.ndarray, str]:
    """The recording looped to ``seconds``, and the words of its whole copies (the last copy is cut short)."""
    once, text = recording()
    copies = int(seconds * SR // len(once))
    audio = np.tile(once, copies + 1)[: int(seconds * SR)]
    return audio, " ".join([text] * copies)


def no_pause(seconds: float) -> tuple[np.ndarray, str]:
    """Sentences butted together with no silence between them, for at least ``seconds``."""
    pieces, words = [], []
    while sum(len(p) for p in pieces) < seconds * SR:
        for s in SENTENCES:
            pieces.append(_trimmed(espeak(s)))
            words.append(s)
    return np.concatenate(pieces).astype(np.float32), " ".join(words)


def encoded(audio: np.ndarray, fmt: str) -> bytes:
    """``audio`` as a FLAC or MP3 file."""
    if fmt == "flac":
        buf = io.BytesIO()
        sf.write(buf, audio, SR, format="FLAC")
        return buf.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        wav, mp3 = Path(tmp) / "a.wav", Path(tmp) / "a.mp3"
        sf.write(wav, audio, SR, subtype="PCM_16")
        subprocess.run(
            ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(wav), "-b:a", "48k", str(mp3)],
            check=True,
            timeout=120,
        )
        return mp3.read_bytes()


def check_whole(text: str, said: str, segments: list[tuple[float, float]], seconds: float) -> None:
    """Every copy's words are there (the cut-short last copy may add some) and the times span the file."""
    heard = text.split()
    assert len(heard) >= 0.9 * len(said.split()), text
    assert word_error_rate(said, " ".join(heard[: len(said.split())])) <= 0.25, text
    assert segments, "no timed segments"
    assert all(0 <= a <= b <= seconds + 0.01 for a, b in segments), segments
    assert segments[-1][1] > seconds - 6, segments[-1]  # the times run to the end, not one window's 30 s
    assert [a for a, _ in segments] == sorted(a for a, _ in segments)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not embedded.is_built(MODELS):
        pytest.skip("embedded models not built: run bash install.sh")
    with cluster(tmp_path_factory.mktemp("long-audio"), stack="embedded") as (url, _):
        yield url


def test_a_looped_recording_past_30_s_through_the_openai_endpoint(base: str) -> None:
    audio, said = looped(35)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
    out = client.audio.transcriptions.create(
        model="whisper-1", file=("loop.flac", encoded(audio, "flac")), response_format="verbose_json"
    )
    segments = [(s.start, s.end) for s in out.segments or []]
    check_whole(out.text, said, segments, 35)
    assert out.duration == pytest.approx(35, abs=0.05)


def test_speech_with_no_pause_through_the_one_shot_route(base: str) -> None:
    audio, said = no_pause(45)
    seconds = len(audio) / SR
    r = httpx.post(
        f"{base}/v1/transcribe", files={"file": ("run-on.flac", encoded(audio, "flac"))}, timeout=300
    )
    assert r.status_code == 200, r.text
    body = r.json()
    check_whole(body["text"], said, [(s["start"], s["end"]) for s in body["segments"]], seconds)


def test_a_several_minute_mp3_through_the_job_api(base: str) -> None:
    from tests.test_jobs_api import finished, submit

    audio, said = looped(150)
    task = submit(base, encoded(audio, "mp3"), name="podcast.mp3", language="en").json()["task_id"]
    done = finished(base, task, timeout=600)
    assert done["status"] == "done", done
    assert done["duration"] == pytest.approx(150, abs=0.2)
    segments = [(s["start"], s["end"]) for s in done["segments"]]
    check_whole(done["text"], said, segments, 150)


@pytest.mark.parametrize("backend", ["transformers", "ctranslate2"])
@pytest.mark.parametrize("shape", ["looped", "no pause"])
@pytest.mark.parametrize("timestamps", [False, True])
def test_both_whisper_backends_read_long_audio_whole(backend: str, shape: str, timestamps: bool) -> None:
    asr = _asr(backend)
    audio, said = looped(31) if shape == "looped" else no_pause(40)
    seconds = len(audio) / SR
    out: Transcript = asr.transcribe(audio, "en", timestamps=timestamps)
    check_whole(out.text, said, [(s.start, s.end) for s in out.segments], seconds)


_ASRS: dict[str, object] = {}


def _asr(backend: str):  # type: ignore[no-untyped-def]
    if not embedded.is_built(MODELS):
        pytest.skip("embedded models not built: run bash install.sh")
    if backend not in _ASRS:
        paths = embedded.paths(MODELS)
        if backend == "transformers":
            from core.models.whisper import WhisperASR

            _ASRS[backend] = WhisperASR(paths.whisper, device="cpu", dtype="float32")
        else:
            from core.models.ct2_whisper_asr import CT2WhisperASR

            _ASRS[backend] = CT2WhisperASR(str(paths.whisper_ct2))
    return _ASRS[backend]
