"""Transcription jobs: an embedded SQLite table (WAL) plus one audio file per job under ``<data_dir>/jobs/``.

Pure standard library, so the gateway can use it. Every method of :class:`JobStore` is blocking; the
gateway calls them through :meth:`JobStore.call`, which runs them on the store's own single thread, so
the event loop never waits on the disk and writes are serialised.

Job ids are ``uuid4().hex`` (32 lowercase hex digits) and every id that comes from outside passes
:func:`validate_job_id` before it names a row or a file, so no id can reach outside the jobs folder.
Uploads are recognised by their magic bytes (:func:`detect_format`), never by decoding: the gateway
must not load an audio library.

Life of a job: ``queued`` -> ``processing`` -> ``done`` | ``failed``; ``processing`` -> ``queued`` when its
worker refuses it or cannot be reached (:meth:`JobStore.requeue`); ``failed`` -> ``queued`` on retry.
After a restart :meth:`JobStore.recover` puts every ``processing`` job back to ``queued`` (its worker
call died with the old process). Retention (:meth:`JobStore.prune`) only ever removes finished jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from core.storage.private import private_dir, touch_private, write_private

T = TypeVar("T")
JobStatus = Literal["queued", "processing", "done", "failed"]
FINISHED: Final = ("done", "failed")
_ID = re.compile(r"[0-9a-f]{32}")

#: Accepted file extensions and the container family each must contain (checked by magic bytes).
FORMATS: Final[dict[str, str]] = {
    "wav": "wav",
    "flac": "flac",
    "mp3": "mp3",
    "ogg": "ogg",
    "oga": "ogg",
    "opus": "ogg",
    "webm": "matroska",
    "mka": "matroska",
    "mkv": "matroska",
    "m4a": "mp4",
    "mp4": "mp4",
    "mov": "mp4",
    "aac": "aac",
    "aiff": "aiff",
    "aif": "aiff",
}
#: Extension used when a file has no (or an unknown) name, per family.
_CANONICAL: Final = {"wav": "wav", "flac": "flac", "mp3": "mp3", "ogg": "ogg", "matroska": "webm",
                     "mp4": "m4a", "aac": "aac", "aiff": "aiff"}  # fmt: skip
MEDIA_TYPES: Final = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "ogg": "audio/ogg",
                      "matroska": "audio/webm", "mp4": "audio/mp4", "aac": "audio/aac", "aiff": "audio/aiff"}  # fmt: skip

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    ext TEXT NOT NULL,
    filename TEXT,
    size_bytes INTEGER NOT NULL,
    language TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error_code TEXT,
    error_message TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
"""


class JobError(Exception):
    """Base of the job store's errors."""


class JobNotFound(JobError):
    """No job has this id (or the id is not a job id at all)."""


class JobConflict(JobError):
    """The job is not in a state that allows the operation (e.g. retrying a job that is not failed)."""


class UnsupportedFormat(JobError):
    """The upload is not one of :data:`FORMATS`."""


def validate_job_id(value: str) -> str:
    """``value`` if it is a job id (32 lowercase hex digits); :class:`JobNotFound` otherwise."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise JobNotFound(f"no task {value[:40]!r}" if isinstance(value, str) else "no such task")
    return value


def supported_formats() -> str:
    """The accepted extensions, for error messages."""
    return ", ".join(FORMATS)


def sniff_family(head: bytes) -> str | None:
    """The container family of a file from its first bytes, or None when it is no audio we accept."""
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:  # ADTS: sync + layer 00
        return "aac"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06:  # MPEG audio frame
        return "mp3"
    return None


def detect_format(data: bytes, filename: str | None) -> str:
    """The extension to store an upload under; :class:`UnsupportedFormat` when it is not accepted audio.

    A name with an extension we do not accept is refused outright; otherwise the bytes decide, and the
    name's extension is kept when it belongs to the family the bytes show.
    """
    ext = Path(filename or "").suffix.lower().lstrip(".")
    if ext and ext not in FORMATS:
        raise UnsupportedFormat(f"unsupported format '.{ext[:16]}'; supported: {supported_formats()}")
    family = sniff_family(data[:16])
    if family is None:
        raise UnsupportedFormat(
            f"the upload is not a recognised audio file; supported: {supported_formats()}"
        )
    return ext if ext and FORMATS[ext] == family else _CANONICAL[family]


@dataclass(frozen=True)
class Job:
    """One transcription job as stored."""

    id: str
    status: JobStatus
    ext: str
    filename: str | None
    size_bytes: int
    language: str | None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    result: dict[str, Any] | None = None  # {text, language, duration_s, segments} once done
    error_code: str | None = None
    error_message: str | None = None

    @property
    def media_type(self) -> str:
        """Content type of the stored audio."""
        return MEDIA_TYPES.get(FORMATS.get(self.ext, ""), "application/octet-stream")


def _job(row: sqlite3.Row) -> Job:
    data = dict(row)
    data["result"] = json.loads(data["result"]) if data["result"] else None
    return Job(**data)


class JobStore:
    """The jobs table and audio folder. Blocking; use :meth:`call` from async code."""

    def __init__(self, data_dir: str | Path, *, keep_last: int = 1000, keep_days: float = 30.0) -> None:
        self.root = Path(data_dir)
        self.audio_dir = self.root / "jobs"
        self.db_path = self.root / "jobs.db"
        self.keep_last, self.keep_days = keep_last, keep_days
        # Job audio and transcripts are users' data: owner-only (SQLite gives its -wal and -shm files the
        # database file's mode, so creating that file 0600 first covers them).
        private_dir(self.audio_dir)
        touch_private(self.db_path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # With WAL this stays consistent after a crash; a power cut may only lose the last commit.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="jobs-db")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one of this store's methods on its thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def close(self) -> None:
        """Close the database (pending calls finish first)."""
        self._executor.shutdown(wait=True)
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _update(self, sql: str, args: tuple[Any, ...]) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    # ------------------------------------------------------------------ paths

    def audio_path(self, job: Job) -> Path:
        """Where ``job``'s audio lives (its id and extension are validated when stored)."""
        return self.audio_dir / f"{validate_job_id(job.id)}.{job.ext}"

    # ------------------------------------------------------------------ writes

    def create(self, data: bytes, ext: str, filename: str | None, language: str | None) -> Job:
        """Store the audio and a ``queued`` row; the file is complete before the row exists."""
        if ext not in FORMATS:
            raise UnsupportedFormat(f"unsupported format '.{ext}'; supported: {supported_formats()}")
        job = Job(uuid.uuid4().hex, "queued", ext, (filename or None) and filename[:255], len(data),
                  language, time.time())  # fmt: skip
        write_private(self.audio_path(job), data)
        try:
            self._update(
                "INSERT INTO jobs (id, status, ext, filename, size_bytes, language, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.status, job.ext, job.filename, job.size_bytes, job.language, job.created_at),
            )
        except BaseException:
            self.audio_path(job).unlink(missing_ok=True)
            raise
        return job

    def start(self, job_id: str) -> None:
        """A worker took the job."""
        self._update(
            "UPDATE jobs SET status='processing', started_at=?, attempts=attempts+1 WHERE id=?",
            (time.time(), validate_job_id(job_id)),
        )

    def finish(self, job_id: str, result: dict[str, Any]) -> None:
        """The job's transcript arrived."""
        self._update(
            "UPDATE jobs SET status='done', finished_at=?, result=?, error_code=NULL, error_message=NULL"
            " WHERE id=?",
            (time.time(), json.dumps(result), validate_job_id(job_id)),
        )

    def fail(self, job_id: str, code: str, message: str) -> None:
        """The job failed for good (until retried)."""
        self._update(
            "UPDATE jobs SET status='failed', finished_at=?, error_code=?, error_message=? WHERE id=?",
            (time.time(), code, message[:2000], validate_job_id(job_id)),
        )

    def requeue(self, job_id: str) -> None:
        """Put a ``processing`` job back to ``queued`` (its worker refused it or the gateway restarted)."""
        self._update(
            "UPDATE jobs SET status='queued', started_at=NULL WHERE id=? AND status='processing'",
            (validate_job_id(job_id),),
        )

    def retry(self, job_id: str) -> Job:
        """Queue a failed job again; :class:`JobConflict` when it is not failed."""
        job = self.get(job_id)
        if job.status != "failed":
            raise JobConflict(f"task {job.id} is {job.status}; only failed tasks can be retried")
        self._update(
            "UPDATE jobs SET status='queued', started_at=NULL, finished_at=NULL, error_code=NULL,"
            " error_message=NULL WHERE id=? AND status='failed'",
            (job.id,),
        )
        return self.get(job.id)

    def delete(self, job_id: str) -> Job:
        """Remove the job and its audio; returns what was removed."""
        job = self.get(job_id)
        self._update("DELETE FROM jobs WHERE id=?", (job.id,))
        self.audio_path(job).unlink(missing_ok=True)
        return job

    def recover(self) -> list[Job]:
        """After a restart: ``processing`` jobs back to ``queued``; returns every queued job, oldest first."""
        self._update("UPDATE jobs SET status='queued', started_at=NULL WHERE status='processing'", ())
        return [
            _job(r)
            for r in self._query("SELECT * FROM jobs WHERE status='queued' ORDER BY created_at, rowid")
        ]

    def prune(self, now: float | None = None) -> list[str]:
        """Apply retention to finished jobs: beyond the newest ``keep_last``, or older than ``keep_days``.

        0 disables either rule. Queued and processing jobs are never removed. Returns the removed ids.
        """
        now = time.time() if now is None else now
        doomed: set[str] = set()
        if self.keep_days > 0:
            cutoff = now - self.keep_days * 86400
            rows = self._query(
                "SELECT id FROM jobs WHERE status IN ('done','failed') AND created_at < ?", (cutoff,)
            )
            doomed.update(r["id"] for r in rows)
        if self.keep_last > 0:
            rows = self._query(
                "SELECT id FROM jobs WHERE status IN ('done','failed') ORDER BY created_at DESC, rowid DESC"
                " LIMIT -1 OFFSET ?",
                (self.keep_last,),
            )
            doomed.update(r["id"] for r in rows)
        for job_id in doomed:
            with contextlib.suppress(JobNotFound):
                self.delete(job_id)
        return sorted(doomed)

    # ------------------------------------------------------------------ reads

    def get(self, job_id: str) -> Job:
        """One job; :class:`JobNotFound` for an unknown or malformed id."""
        rows = self._query("SELECT * FROM jobs WHERE id=?", (validate_job_id(job_id),))
        if not rows:
            raise JobNotFound(f"no task {job_id}")
        return _job(rows[0])

    def recent(self, limit: int = 20, status: str | None = None) -> list[Job]:
        """The newest jobs first, optionally only those with ``status``."""
        if status is None:
            rows = self._query("SELECT * FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,))
        else:
            rows = self._query(
                "SELECT * FROM jobs WHERE status=? ORDER BY created_at DESC, rowid DESC LIMIT ?",
                (status, limit),
            )
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Jobs per status (every status present, 0 where none)."""
        out = dict.fromkeys(("queued", "processing", "done", "failed"), 0)
        for row in self._query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status"):
            out[row["status"]] = row["n"]
        return out

    def stats(self, since: float) -> dict[str, Any]:
        """Totals for ``/api/v1/stats``: counts, audio seconds, mean processing time, jobs since ``since``."""
        row = self._query(
            "SELECT COUNT(*) AS n, SUM(json_extract(result, '$.duration_s')) AS audio_s,"
            " AVG(finished_at - started_at) AS processing_s,"
            " AVG(started_at - created_at) AS wait_s FROM jobs WHERE status='done'"
        )[0]
        recent = self._query(
            "SELECT status, COUNT(*) AS n FROM jobs WHERE created_at >= ? GROUP BY status", (since,)
        )
        return {
            "counts": self.counts(),
            "audio_s_transcribed": round(row["audio_s"] or 0.0, 3),
            "mean_processing_s": None if row["processing_s"] is None else round(row["processing_s"], 3),
            "mean_wait_s": None if row["wait_s"] is None else round(row["wait_s"], 3),
            "since": {r["status"]: r["n"] for r in recent},
        }
