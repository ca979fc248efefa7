"""The distillation CLI end to end on real files (espeak speech as wav/flac/mp3/mp4, silence, a corrupt file,
a missing path) with real decoding and real Silero VAD; the ASR is the fake from test_distill (the real
Whisper runs in test_distill_whisper). Includes a SIGKILL in the middle of a run and its resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from core.distill import cli
from core.distill.shard import merge_outputs
from core.distill.writer import iter_rows
from tests.speech import espeak, with_silence

ROOT = Path(__file__).resolve().parents[1]
FAKE = ["--asr-factory", "tests.test_distill:make_fake_asr", "--no-progress"]
SENTENCES = {
    "wav": "The quick brown fox jumps over the lazy dog.",
    "flac": "Please open the window before the meeting starts.",
    "mp3": "My favorite color is green.",
    "mp4": "The train leaves the station at seven.",
}


def _ffmpeg(*args: str) -> None:
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args], check=True, timeout=60
    )


def make_media(folder: Path) -> dict[str, Path]:
    """Speech in four containers, a silent file, a corrupt file and a path that does not exist."""
    folder.mkdir(parents=True, exist_ok=True)
    rate = 16_000
    speech = {kind: with_silence(espeak(text), 0.6, 0.8) for kind, text in SENTENCES.items()}
    files = {kind: folder / f"speech.{kind}" for kind in SENTENCES}
    sf.write(files["wav"], speech["wav"], rate, subtype="PCM_16")
    sf.write(files["flac"], speech["flac"], rate, format="FLAC")
    tmp = folder / "tmp-mp3.wav"
    sf.write(tmp, speech["mp3"], rate, subtype="PCM_16")
    _ffmpeg("-i", str(tmp), "-c:a", "libmp3lame", "-b:a", "64k", str(files["mp3"]))
    sf.write(tmp, speech["mp4"], rate, subtype="PCM_16")
    _ffmpeg(
        "-f", "lavfi", "-i", "color=c=blue:s=64x64:r=5", "-i", str(tmp), "-shortest",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", str(files["mp4"]),
    )  # fmt: skip
    tmp.unlink()
    files["silent"] = folder / "silent.wav"
    sf.write(files["silent"], np.zeros(int(2.5 * rate), np.float32), rate, subtype="PCM_16")
    files["corrupt"] = folder / "corrupt.mp3"
    files["corrupt"].write_bytes(b"ID3\x03\x00" + bytes(range(256)) * 40)
    files["missing"] = folder / "missing.wav"
    return files


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_media(tmp_path_factory.mktemp("media"))


def manifest_of(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_by_id(out: Path) -> dict[str, dict]:
    rows = list(iter_rows(out))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"repeated ids: {ids}"
    assert out.read_bytes().endswith(b"\n")
    return {r["id"]: r for r in rows}


EXPECTED = {
    "wav": "ok", "flac": "ok", "mp3": "ok", "mp4": "ok",
    "silent": "no_speech", "corrupt": "error", "missing": "error",
}  # fmt: skip


def test_cli_transcribes_every_kind_of_file_and_resumes(
    media: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [{"id": k, "path": str(p)} for k, p in media.items()] + [{"id": "wav", "path": "again.wav"}]
    man = manifest_of(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert cli.main([str(man), "--output", str(out), "--batch-size", "3", *FAKE]) == 0
    got = rows_by_id(out)
    assert {k: r["status"] for k, r in got.items()} == EXPECTED
    captured = capsys.readouterr()
    assert "duplicate id 'wav'" in captured.err
    assert "7 files this run (ok 4, no_speech 1, error 2)" in captured.out
    assert got["missing"]["error"] == "missing: missing.wav: no such file"
    assert got["corrupt"]["error"].startswith("undecodable: corrupt.mp3: unsupported or corrupt audio file (")
    for kind in SENTENCES:  # the VAD found the sentence between the silences
        r = got[kind]
        assert 3.0 < r["duration_s"] < 6.0
        assert r["segments"] and 0.3 < r["segments"][0]["start"] < 0.8, r
        assert r["segments"][-1]["end"] < r["duration_s"]
        assert r["text"] == " ".join(s["text"] for s in r["segments"])
        assert set(r) == {"id", "path", "status", "duration_s", "language", "text", "segments"}
    assert got["silent"] == {
        "id": "silent", "path": str(media["silent"]), "status": "no_speech", "duration_s": 2.5,
        "language": None, "text": "", "segments": [],
    }  # fmt: skip
    before = out.read_bytes()
    assert cli.main([str(man), "--output", str(out), *FAKE]) == 0
    assert out.read_bytes() == before
    assert "7 ids already in" in capsys.readouterr().out


def test_cli_folder_manifest_shards_and_merge(media: dict[str, Path], tmp_path: Path) -> None:
    folder = media["wav"].parent
    outs = [tmp_path / f"shard{i}.jsonl" for i in range(2)]
    for i, out in enumerate(outs):
        assert cli.main(["--distill", str(folder), "--output", str(out), "--shard", f"{i}/2", *FAKE]) == 0
    shard_ids = [set(rows_by_id(o)) for o in outs]
    assert not shard_ids[0] & shard_ids[1]
    merged = tmp_path / "all.jsonl"
    merge_outputs(merged, outs)
    got = rows_by_id(merged)
    assert {k: r["status"] for k, r in got.items()} == {
        "speech.wav": "ok", "speech.flac": "ok", "speech.mp3": "ok", "speech.mp4": "ok",
        "silent.wav": "no_speech", "corrupt.mp3": "error",
    }  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["m.jsonl", "--output", "o.jsonl", "--shard", "2/2"],
        ["m.jsonl", "--output", "o.jsonl", "--batch-size", "0"],
        ["m.jsonl", "--output", "o.jsonl", "--asr-factory", "no-colon"],
        ["m.jsonl", "--distill", "n.jsonl", "--output", "o.jsonl"],
        ["m.jsonl"],
    ],
)
def test_cli_rejects_bad_arguments(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(tmp_path / a) if a.endswith(".jsonl") else a for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    assert code == 2
    assert capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_builds_the_configured_stack_asr(media: dict[str, Path], tmp_path: Path) -> None:
    man = manifest_of(tmp_path / "m.jsonl", [{"id": "a", "path": str(media["wav"])}])
    out = tmp_path / "out.jsonl"
    assert cli.main([str(man), "--output", str(out), "--stack", "fake", "--no-progress"]) == 0
    assert [(r["status"], r["text"]) for r in iter_rows(out)] == [("ok", "hello there")]


def test_cli_stops_at_once_when_the_asr_refuses_the_settings(
    media: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    man = manifest_of(tmp_path / "m.jsonl", [{"id": k, "path": str(media[k])} for k in ("wav", "flac")])
    out = tmp_path / "out.jsonl"
    assert cli.main([str(man), "--output", str(out), "--language", "zz", *FAKE]) == 1
    assert "unknown language 'zz'" in capsys.readouterr().err
    assert out.read_bytes() == b""  # no file was marked done with an error it did not have


def test_cli_reports_an_unreadable_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([str(tmp_path / "absent.jsonl"), "--output", str(tmp_path / "o.jsonl"), *FAKE]) == 1
    assert "no such manifest" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def _wait_for_rows(out: Path, proc: subprocess.Popen[bytes], n: int, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended before writing {n} rows: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        time.sleep(0.05)
    pytest.fail(f"no {n} rows after {limit_s} s")


def _start_and_kill(man: Path, out: Path, after_rows: int) -> int:
    """Run ``worker.py --distill`` in a subprocess, SIGKILL it once ``after_rows`` rows exist; rows left."""
    env = {**os.environ, "FAKE_ASR_DELAY_S": "0.15", "PYTHONPATH": str(ROOT)}
    argv = [
        sys.executable,
        "worker.py",
        "--distill",
        str(man),
        "--output",
        str(out),
        "--batch-size",
        "1",
        *FAKE,
    ]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_rows(out, proc, after_rows)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return len(list(iter_rows(out)))


def test_sigkill_mid_run_then_resume_writes_every_id_exactly_once(
    media: dict[str, Path], tmp_path: Path
) -> None:
    rows = [{"id": f"take-{i:02d}", "path": str(media["wav" if i % 2 else "flac"])} for i in range(14)]
    rows.append({"id": "gone", "path": str(media["missing"])})
    man = manifest_of(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out.jsonl"
    first = _start_and_kill(man, out, 1)
    assert 1 <= first < len(rows), "the kill came after the run had finished: nothing was tested"
    with out.open("ab") as fh:
        fh.write(b'{"id": "take-99", "path": "/torn')  # as if the kill had landed inside a write
    second = _start_and_kill(man, out, first + 2)  # the resumed run is killed too
    assert first + 2 <= second < len(rows), "the second kill came too late: nothing was tested"
    assert cli.main([str(man), "--output", str(out), *FAKE]) == 0
    got = rows_by_id(out)
    assert sorted(got) == sorted(r["id"] for r in rows)
    assert all(line and json.loads(line) for line in out.read_text().splitlines())
    assert got["gone"]["status"] == "error"
    assert {r["status"] for k, r in got.items() if k != "gone"} == {"ok"}


def test_sigterm_stops_a_run_cleanly_with_a_summary(media: dict[str, Path], tmp_path: Path) -> None:
    rows = [{"id": f"t{i}", "path": str(media["wav"])} for i in range(12)]
    man = manifest_of(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "FAKE_ASR_DELAY_S": "0.15", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "core.distill.cli", str(man), "-o", str(out), "--batch-size", "1", *FAKE]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_rows(out, proc, 1)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "distill interrupted" in stdout.decode()
    written = rows_by_id(out)  # whole rows only, each id once
    assert 1 <= len(written) < len(rows)
