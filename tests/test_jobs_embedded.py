"""A real transcription through the job API and the OpenAI endpoint: the embedded stack (Whisper base) behind the gateway."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import soundfile as sf

from core.models import embedded
from tests.services import cluster
from tests.speech import espeak, with_silence, word_error_rate
from tests.test_jobs_api import finished, submit

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SENTENCE = "The weather is lovely today, so we will walk to the park."


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not embedded.is_built(ROOT / "data" / "models"):
        pytest.skip("embedded models not built: run bash install.sh")
    with cluster(tmp_path_factory.mktemp("embedded-cluster"), stack="embedded") as (url, _):
        yield url


def spoken_flac() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, with_silence(espeak(SENTENCE), 0.3, 0.5), 16_000, format="FLAC")
    return buf.getvalue()


def test_a_job_gets_the_real_transcript(base: str) -> None:
    task = submit(base, spoken_flac(), name="weather.flac", language="en").json()["task_id"]
    done = finished(base, task, timeout=120)
    assert done["status"] == "done", done
    assert word_error_rate(SENTENCE, done["text"]) <= 0.2, done["text"]
    assert done["duration"] == pytest.approx(len(espeak(SENTENCE)) / 16_000 + 0.8, abs=0.05)
    # The Whisper backend returns no segment times yet, so the subtitles span the whole clip.
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    srt = client.audio.transcriptions.create(
        model="whisper-1", file=("w.flac", spoken_flac()), response_format="srt"
    )
    assert srt.startswith("1\n00:00:0") and "park" in srt.lower()
