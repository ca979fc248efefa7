"""Distillation with the real embedded Whisper base: espeak sentences in wav, flac, mp3 and an mp4 video come
back as the words spoken; a silent file is ``no_speech``; a corrupt file and a missing path are ``error``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.distill import cli
from core.distill.writer import iter_rows
from tests.speech import word_error_rate
from tests.test_distill_cli import SENTENCES, make_media

ROOT = Path(__file__).resolve().parents[1]
WHISPER_DIR = ROOT / "data" / "models" / "whisper-base"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (WHISPER_DIR / "model.safetensors").is_file(),
        reason="the embedded Whisper is not built: run `bash install.sh` (or python -m core.models.embedded build)",
    ),
]


def make_whisper(config: object) -> object:
    """``--asr-factory tests.test_distill_whisper:make_whisper``: the embedded Whisper base on the CPU."""
    from core.models.whisper import WhisperASR

    return WhisperASR(WHISPER_DIR, device="cpu")


#: Words each sentence must come back with (espeak's "seven" is sometimes heard as "heaven").
MUST_HAVE = {
    "wav": ["quick", "brown", "fox", "lazy", "dog"],
    "flac": ["open", "window", "before", "meeting"],
    "mp3": ["favorite", "color", "green"],
    "mp4": ["train", "leaves", "station"],
}


def test_real_whisper_transcribes_audio_and_video_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    media = make_media(tmp_path / "media")
    manifest = tmp_path / "m.txt"
    manifest.write_text("".join(f"{p}\n" for p in media.values()))  # bare paths: the path is the id
    out = tmp_path / "out.jsonl"
    factory = ["--asr-factory", "tests.test_distill_whisper:make_whisper", "--no-progress"]
    assert cli.main([str(manifest), "--output", str(out), "--batch-size", "4", *factory]) == 0
    by_id = {r["id"]: r for r in iter_rows(out)}
    assert len(by_id) == len(media)
    rows = {kind: by_id[str(path)] for kind, path in media.items()}
    assert {k: r["status"] for k, r in rows.items()} == {
        "wav": "ok", "flac": "ok", "mp3": "ok", "mp4": "ok",
        "silent": "no_speech", "corrupt": "error", "missing": "error",
    }  # fmt: skip
    for kind, words in MUST_HAVE.items():
        r = rows[kind]
        text = r["text"].lower()
        assert all(w in text for w in words), (kind, r["text"])
        assert word_error_rate(SENTENCES[kind], r["text"]) <= 0.35, (kind, r["text"])
        assert r["language"] == "en"
        seg = r["segments"][0]
        assert 0.3 < seg["start"] < 0.8 and seg["end"] < r["duration_s"], r["segments"]
    assert rows["silent"]["text"] == "" and rows["silent"]["segments"] == []
    assert rows["missing"]["error"].startswith("missing:")
    assert rows["corrupt"]["error"].startswith("undecodable:")
    assert "ok 4, no_speech 1, error 2" in capsys.readouterr().out


@pytest.mark.parametrize("shape", ["looped", "no pause"])
def test_real_whisper_distills_files_longer_than_a_window(tmp_path: Path, shape: str) -> None:
    """A 35 s looped recording and 40 s of speech with no pause come back whole, timed across the file."""
    import soundfile as sf

    from tests.test_long_audio import SR, check_whole, looped, no_pause

    audio, said = looped(35) if shape == "looped" else no_pause(40)
    path = tmp_path / "long.flac"
    sf.write(path, audio, SR)
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"{path}\n")
    out = tmp_path / "out.jsonl"
    factory = ["--asr-factory", "tests.test_distill_whisper:make_whisper", "--no-progress"]
    assert cli.main([str(manifest), "--output", str(out), *factory]) == 0
    (row,) = list(iter_rows(out))
    assert row["status"] == "ok", row
    assert row["duration_s"] == pytest.approx(len(audio) / SR, abs=0.05)
    check_whole(row["text"], said, [(s["start"], s["end"]) for s in row["segments"]], len(audio) / SR)
