"""Session recordings: safe ids, crash-tolerant WAV and timeline files, and a recorded conversation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from core.storage.recordings import (
    RecordingError,
    SessionRecorder,
    WavAppender,
    session_dir,
    validate_session_id,
)
from tests.test_session import live, run, speaking_turn


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "../etc", "a/b", "a\\b", "-rf", "_x", "x" * 129, "a b", "é", "a\x00"]
)
def test_unsafe_session_ids_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(RecordingError):
        validate_session_id(bad)
    with pytest.raises(RecordingError):
        session_dir(tmp_path, bad)


def test_safe_session_ids_stay_inside_the_root(tmp_path: Path) -> None:
    for good in ["abc", "A-1_b", "0" * 128, "3f2a9c0d"]:
        assert session_dir(tmp_path, good) == (tmp_path / good).resolve()


def test_a_flushed_wav_is_readable_before_close(tmp_path: Path) -> None:
    wav = WavAppender(tmp_path / "a.wav", 16_000)
    tone = (0.5 * np.sin(np.arange(16_000) / 5)).astype(np.float32)
    wav.append(tone)
    wav.flush()
    wav.append(tone)  # not flushed: a crash now loses only this
    audio, rate = sf.read(tmp_path / "a.wav", dtype="float32")  # as a reader after a crash would
    assert rate == 16_000 and len(audio) == 16_000
    assert np.allclose(audio, tone, atol=1 / 16_000)
    wav.close()
    assert len(sf.read(tmp_path / "a.wav")[0]) == 32_000


def test_recorder_flushes_every_second_and_keeps_events(tmp_path: Path) -> None:
    now = [0.0]
    rec = SessionRecorder(tmp_path, "s1", {"voice": "x"}, lambda: now[0])
    for _ in range(60):  # 1.2 s of 20 ms frames
        now[0] += 0.02
        rec.user_audio(np.full(320, 0.1, np.float32))
    rec.event({"t": 1.0, "kind": "state", "state": "thinking"})
    on_disk = sf.info(tmp_path / "s1" / "user.wav").frames
    assert 16_000 <= on_disk <= 60 * 320  # at least the first second is safe without a close
    lines = (tmp_path / "s1" / "timeline.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"t": 1.0, "kind": "state", "state": "thinking"}
    rec.update_meta(turns=3)
    meta = json.loads((tmp_path / "s1" / "meta.json").read_text())
    assert meta == {"voice": "x", "session_id": "s1", "turns": 3}
    rec.close()
    assert sf.info(tmp_path / "s1" / "user.wav").frames == 60 * 320


def test_a_failing_disk_stops_the_recording_not_the_caller(tmp_path: Path) -> None:
    rec = SessionRecorder(tmp_path, "s2", {}, lambda: 0.0)
    rec._user._file.close()  # the file goes away under the recorder
    rec.user_audio(np.zeros(320, np.float32))
    rec.flush()
    assert rec.failed
    rec.event({"t": 0, "kind": "x"})
    rec.close()


def test_a_recorded_conversation(tmp_path: Path) -> None:
    async def body() -> None:
        async with live(duplex={"record": True}, recordings_dir=tmp_path) as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            await h.mic.silence(1.0)
            heard = h.session.input.position
            audio_s = h.wire.first("response.done")[1]["timings"]["audio_s"]
        folder = tmp_path / "test-session"
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["session_id"] == "test-session" and meta["models"]["llm"] == "fake-llm"
        user, rate = sf.read(folder / "user.wav", dtype="float32")
        assert rate == 16_000 and len(user) == heard
        assert np.abs(user[8000:23000]).max() > 0.2  # the spoken part is in it
        reply, rate = sf.read(folder / "assistant_1.wav", dtype="float32")
        assert rate == 24_000
        assert len(reply) / rate == pytest.approx(audio_s, abs=0.03)  # Opus pads the last frame
        entries = [json.loads(line) for line in (folder / "timeline.jsonl").read_text().splitlines()]
        states = [e["state"] for e in entries if e["kind"] == "state"]
        assert states[:4] == ["user_speaking", "thinking", "speaking", "listening"]
        assert any(e["kind"] == "timings" and e["status"] == "completed" for e in entries)

    run(body)


@pytest.mark.parametrize(
    ("server_record", "client_may", "asked", "recorded", "refused"),
    [
        (False, False, True, False, True),  # a client cannot turn recording on
        (True, False, False, True, True),  # nor off: the server's config decides
        (True, False, True, True, False),  # asking for what is already so is fine
        (False, True, True, True, False),  # unless the config lets clients choose
        (True, True, False, False, False),
    ],
)
def test_recording_is_the_servers_choice_unless_its_config_allows_clients(
    tmp_path: Path, server_record: bool, client_may: bool, asked: bool, recorded: bool, refused: bool
) -> None:
    async def body() -> None:
        duplex = {"record": server_record, "client_recording": client_may}
        async with live(duplex=duplex, recordings_dir=tmp_path) as h:
            await h.text({"type": "session.update", "session": {"record": asked}})
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            errors = [e for _, e in h.wire.events("error")]
            assert bool(errors) == refused, errors
            if refused:
                assert errors[0]["code"] == "invalid_event" and "server's config" in errors[0]["message"]
            else:
                assert h.wire.first("session.updated")[1]["session"]["record"] == recorded
        folder = tmp_path / "test-session"
        if recorded:
            assert sf.info(folder / "user.wav").frames > 16_000  # the whole turn, not only its start
        elif not server_record:
            assert not folder.exists()  # nothing of this session was written

    run(body)


def test_recordings_are_readable_by_the_service_user_only(tmp_path: Path) -> None:
    rec = SessionRecorder(tmp_path / "sessions", "s3", {"voice": "x"}, lambda: 0.0)
    rec.user_audio(np.zeros(320, np.float32))
    rec.assistant_audio(1, np.zeros(480, np.float32))
    rec.event({"t": 0, "kind": "x"})
    rec.close()
    folder = tmp_path / "sessions" / "s3"
    assert _mode(tmp_path / "sessions") == _mode(folder) == 0o700
    files = sorted(folder.iterdir())
    assert {p.name for p in files} >= {"meta.json", "user.wav", "timeline.jsonl", "assistant_1.wav"}
    assert all(_mode(p) == 0o600 for p in files), {p.name: oct(_mode(p)) for p in files}


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777
