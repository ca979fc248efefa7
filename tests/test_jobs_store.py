"""The job store: SQLite rows and audio files, format sniffing, id validation, retention, restart recovery."""

from __future__ import annotations

import io
import sqlite3
import wave
from pathlib import Path

import pytest

from core.storage.jobs import (
    JobConflict,
    JobNotFound,
    JobStore,
    UnsupportedFormat,
    detect_format,
    validate_job_id,
)


def wav_bytes(seconds: float = 0.1, rate: int = 16_000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x00" * int(seconds * rate))
    return buf.getvalue()


MP3_ID3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\x00" * 32
MP3_FRAME = b"\xff\xfb\x90\x64" + b"\x00" * 32
FLAC = b"fLaC\x00\x00\x00\x22" + b"\x00" * 32
OGG = b"OggS\x00\x02" + b"\x00" * 32
WEBM = b"\x1a\x45\xdf\xa3" + b"\x00" * 32
M4A = b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 32
ADTS = b"\xff\xf1\x50\x80" + b"\x00" * 32


@pytest.mark.parametrize(
    ("data", "name", "expected"),
    [
        (wav_bytes(), "talk.wav", "wav"),
        (wav_bytes(), "TALK.WAV", "wav"),
        (wav_bytes(), None, "wav"),
        (wav_bytes(), "talk.mp3", "wav"),  # the bytes decide; a wrong extension is corrected
        (MP3_ID3, "a.mp3", "mp3"),
        (MP3_FRAME, "a.mp3", "mp3"),
        (FLAC, "a.flac", "flac"),
        (OGG, "a.opus", "opus"),
        (OGG, "a", "ogg"),
        (WEBM, "a.webm", "webm"),
        (WEBM, "a.mkv", "mkv"),
        (M4A, "a.m4a", "m4a"),
        (M4A, "a.mp4", "mp4"),
        (ADTS, "a.aac", "aac"),
    ],
)
def test_formats_are_recognised_by_their_bytes(data: bytes, name: str | None, expected: str) -> None:
    assert detect_format(data, name) == expected


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (wav_bytes(), "notes.txt"),
        (b"hello, this is text", "a.wav"),
        (b"%PDF-1.7\n" + b"\x00" * 20, None),
        (b"", "a.wav"),
        (b"MZ\x90\x00" + b"\x00" * 20, "a.exe"),
    ],
)
def test_other_files_are_refused_with_the_supported_list(data: bytes, name: str | None) -> None:
    with pytest.raises(UnsupportedFormat, match=r"supported: wav, flac, mp3"):
        detect_format(data, name)


@pytest.mark.parametrize(
    "bad",
    ["", "../../etc/passwd", "..", "0" * 31, "0" * 33, "A" * 32, "g" * 32, "0" * 30 + "/x", "0" * 32 + "\n"],
)
def test_job_ids_are_validated(bad: str) -> None:
    with pytest.raises(JobNotFound):
        validate_job_id(bad)
    assert validate_job_id("0123456789abcdef" * 2) == "0123456789abcdef" * 2


def test_a_job_lives_through_its_states(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    data = wav_bytes()
    job = store.create(data, "wav", "talk.wav", "en")
    assert store.audio_path(job) == tmp_path / "jobs" / f"{job.id}.wav"
    assert store.audio_path(job).read_bytes() == data
    assert (job.status, job.filename, job.language, job.size_bytes) == ("queued", "talk.wav", "en", len(data))
    store.start(job.id)
    assert store.get(job.id).status == "processing"
    result = {
        "text": "hello",
        "language": "en",
        "duration_s": 0.1,
        "segments": [{"start": 0, "end": 0.1, "text": "hello"}],
    }
    store.finish(job.id, result)
    done = store.get(job.id)
    assert (done.status, done.result, done.attempts) == ("done", result, 1)
    assert done.finished_at is not None and done.started_at is not None
    with pytest.raises(JobConflict):
        store.retry(job.id)
    store.close()


def test_failed_jobs_can_be_retried(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = store.create(wav_bytes(), "wav", None, None)
    store.start(job.id)
    store.fail(job.id, "bad_audio", "cannot decode")
    failed = store.get(job.id)
    assert (failed.status, failed.error_code, failed.error_message) == (
        "failed",
        "bad_audio",
        "cannot decode",
    )
    again = store.retry(job.id)
    assert (again.status, again.error_code, again.finished_at) == ("queued", None, None)
    store.close()


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ((), "queued"),  # never started: nothing to undo
        (("start",), "queued"),  # its worker refused it or was gone: it waits again
        (("start", "finish"), "done"),  # a late requeue never undoes a result
        (("start", "fail"), "failed"),  # nor a failure (only retry queues that again)
    ],
)
def test_requeue_puts_only_a_processing_job_back(tmp_path: Path, before: tuple[str, ...], after: str) -> None:
    store = JobStore(tmp_path)
    job = store.create(wav_bytes(), "wav", None, None)
    steps = {
        "start": lambda: store.start(job.id),
        "finish": lambda: store.finish(job.id, {"text": "kept", "segments": []}),
        "fail": lambda: store.fail(job.id, "bad_audio", "cannot decode"),
    }
    for step in before:
        steps[step]()
    was = store.get(job.id)
    store.requeue(job.id)
    now = store.get(job.id)
    assert now.status == after
    assert now.attempts == was.attempts  # a start is counted when it happens, not undone
    if was.status == "processing":
        assert now.started_at is None  # it has not started, as far as anyone reading it can tell
    else:
        assert now == was
    assert store.counts()[after] == 1
    store.close()


def test_a_requeued_job_starts_afresh_and_finishes_once(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = store.create(wav_bytes(), "wav", None, None)
    store.start(job.id)
    store.requeue(job.id)
    store.start(job.id)
    restarted = store.get(job.id)
    assert (restarted.status, restarted.attempts) == ("processing", 2) and restarted.started_at is not None
    store.finish(job.id, {"text": "hello", "segments": []})
    store.requeue(job.id)  # a stray requeue after the result changes nothing
    done = store.get(job.id)
    assert (done.status, done.result, done.attempts) == ("done", {"text": "hello", "segments": []}, 2)
    store.close()


def test_delete_removes_the_row_and_the_audio(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = store.create(wav_bytes(), "wav", None, None)
    path = store.audio_path(job)
    store.delete(job.id)
    assert not path.exists()
    with pytest.raises(JobNotFound):
        store.get(job.id)
    with pytest.raises(JobNotFound):
        store.delete(job.id)
    assert list((tmp_path / "jobs").iterdir()) == []
    store.close()


def test_a_restart_requeues_unfinished_jobs_and_keeps_finished_ones(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    first, second, third = (store.create(wav_bytes(), "wav", f"{i}.wav", None) for i in range(3))
    store.start(first.id)
    store.start(second.id)
    store.finish(second.id, {"text": "kept", "segments": []})
    store.close()

    reopened = JobStore(tmp_path)
    pending = reopened.recover()
    assert [j.id for j in pending] == [first.id, third.id]  # submission order
    assert all(j.status == "queued" for j in pending)
    assert reopened.get(second.id).result == {"text": "kept", "segments": []}
    assert reopened.counts() == {"queued": 2, "processing": 0, "done": 1, "failed": 0}
    reopened.close()


def test_the_database_uses_wal(tmp_path: Path) -> None:
    JobStore(tmp_path).close()
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_retention_keeps_the_newest_finished_jobs_and_never_touches_unfinished(tmp_path: Path) -> None:
    store = JobStore(tmp_path, keep_last=2, keep_days=0)
    jobs = [store.create(wav_bytes(), "wav", None, None) for _ in range(5)]
    for job in jobs[:4]:
        store.finish(job.id, {"text": "", "segments": []})
    removed = store.prune()
    assert removed == sorted([jobs[0].id, jobs[1].id])
    assert [j.id for j in store.recent(10)] == [jobs[4].id, jobs[3].id, jobs[2].id]
    assert not store.audio_path(jobs[0]).exists() and store.audio_path(jobs[2]).exists()
    store.close()


def test_retention_by_age(tmp_path: Path) -> None:
    store = JobStore(tmp_path, keep_last=0, keep_days=1)
    old, queued = store.create(wav_bytes(), "wav", None, None), store.create(wav_bytes(), "wav", None, None)
    store.fail(old.id, "x", "y")
    assert store.prune(now=old.created_at + 0.5 * 86400) == []
    assert store.prune(now=old.created_at + 2 * 86400) == [old.id]
    assert [j.id for j in store.recent(10)] == [queued.id]
    store.close()


async def test_calls_run_off_the_event_loop(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = await store.call(store.create, wav_bytes(), "wav", "a.wav", None)
    assert (await store.call(store.get, job.id)).filename == "a.wav"
    assert [j.id for j in await store.call(store.recent, 5, "queued")] == [job.id]
    stats = await store.call(store.stats, 0.0)
    assert stats["counts"]["queued"] == 1 and stats["since"] == {"queued": 1}
    store.close()


def test_job_audio_and_transcripts_are_readable_by_the_service_user_only(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir(mode=0o755)  # a folder from an older version, made world-readable
    store = JobStore(tmp_path)
    job = store.create(wav_bytes(), "wav", "talk.wav", None)
    store.start(job.id)
    store.finish(job.id, {"text": "private words", "language": "en", "duration_s": 0.1, "segments": []})
    assert _mode(tmp_path / "jobs") == 0o700
    assert _mode(store.audio_path(job)) == 0o600
    for name in ("jobs.db", "jobs.db-wal", "jobs.db-shm"):  # the transcripts, and SQLite's side files
        if (tmp_path / name).exists():
            assert _mode(tmp_path / name) == 0o600, name
    assert not list((tmp_path / "jobs").glob("*.part*"))  # no temporary file left
    store.close()


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777
