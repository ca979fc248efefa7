"""The JSONL result file: one row per input, appended and fsynced as each file finishes; resumable.

Crash safety: a row is one ``write`` of a whole line to a file opened ``O_APPEND``, followed by
``fsync``. A run killed at any moment leaves at most one torn last line (no trailing newline, or not
JSON); :meth:`ResultWriter.open` truncates it away before appending, and every id already present counts
as done, so a re-run writes each remaining id exactly once. An exclusive ``flock`` stops two runs from
appending to the same file at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

#: The row statuses, in the order a summary lists them.
STATUSES = ("ok", "no_speech", "error")


class OutputError(Exception):
    """The output file cannot be opened, locked, repaired or written."""


@dataclass(frozen=True)
class ScanResult:
    """What an existing output file holds: its good rows' ids and what was wrong with it."""

    ids: frozenset[str]
    rows: int
    torn_bytes: int  # bytes of an unterminated or unparsable last line (cut off on open)
    bad_lines: int  # complete lines in the middle that are not rows (left alone, not counted as done)


def parse_row(line: bytes) -> dict[str, Any] | None:
    """A result row from one line, or None when the line is not a JSON object with a string id."""
    try:
        row = json.loads(line)
    except ValueError:  # also UnicodeDecodeError
        return None
    if not isinstance(row, dict) or not isinstance(row.get("id"), str):
        return None
    return row


def iter_rows(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every good row of a result file; a torn last line and malformed lines are skipped."""
    with open(path, "rb") as fh:
        for line in fh:
            if line.endswith(b"\n"):
                row = parse_row(line)
                if row is not None:
                    yield row


def scan(path: str | os.PathLike[str]) -> ScanResult:
    """Read an existing output file without changing it (an absent file is empty)."""
    ids: set[str] = set()
    rows = bad = torn = 0
    if not os.path.exists(path):
        return ScanResult(frozenset(), 0, 0, 0)
    with open(path, "rb") as fh:
        pending: bytes | None = None
        for line in fh:
            if pending is not None:  # a bad line that turned out not to be the last one
                bad += 1
                pending = None
            row = parse_row(line) if line.endswith(b"\n") else None
            if row is None:
                pending = line
                continue
            rows += 1
            ids.add(row["id"])
        if pending is not None:
            torn = len(pending)
    return ScanResult(frozenset(ids), rows, torn, bad)


def encode_row(row: dict[str, Any]) -> bytes:
    """One JSONL line; non-finite floats are refused rather than written as invalid JSON."""
    try:
        return (json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    except ValueError as exc:
        raise OutputError(f"row {row.get('id')!r} cannot be written as JSON: {exc}") from None


class ResultWriter:
    """Appends rows to a JSONL file, one fsynced line each; knows which ids the file already holds."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = Path(path)
        self._fsync = fsync
        self._fd = -1
        self.done: set[str] = set()
        self.repaired = ScanResult(frozenset(), 0, 0, 0)

    def open(self) -> ResultWriter:
        """Lock the file, cut a torn last line, load the ids already written; returns self."""
        if not self.path.parent.is_dir():
            raise OutputError(f"{self.path}: the folder {self.path.parent} does not exist")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot open for writing ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputError(f"{self.path}: another run is writing this file") from None
        self._fd = fd
        result = scan(self.path)
        if result.torn_bytes:
            size = os.fstat(fd).st_size
            os.ftruncate(fd, size - result.torn_bytes)
            os.fsync(fd)
        self.repaired = result
        self.done = set(result.ids)
        return self

    def write(self, row: dict[str, Any]) -> None:
        """Append one row and make it durable; a second row for an id already written is refused."""
        if self._fd < 0:
            raise OutputError("the writer is not open")
        item_id = row.get("id")
        if not isinstance(item_id, str):
            raise OutputError(f"a row needs a string id, got {item_id!r}")
        if item_id in self.done:
            raise OutputError(f"id {item_id!r} is already in {self.path}")
        data = memoryview(encode_row(row))
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            while data:  # a regular file rarely writes short, but a full disk can
                data = data[os.write(self._fd, data) :]
            if self._fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self._cut_back(start)
            raise OutputError(f"{self.path}: write failed ({exc.strerror})") from None
        self.done.add(item_id)

    def _cut_back(self, size: int) -> None:
        """Remove a partly written line so that the next append does not glue onto it."""
        with contextlib.suppress(OSError):  # if this fails too, the next open() cuts the torn line
            os.ftruncate(self._fd, size)

    def close(self) -> None:
        """Release the lock and close the file (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ResultWriter:
        return self.open() if self._fd < 0 else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
