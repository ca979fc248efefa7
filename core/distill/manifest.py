"""What to transcribe: a manifest read into validated ``(id, path)`` items.

Three forms are understood:

- a JSONL file: one ``{"id": ..., "path": ...}`` object per line (``id`` defaults to the path as written);
  a line that is not an object is a bare path (a JSON string is unquoted first); blank lines and lines
  starting with ``#`` are skipped;
- a directory: searched recursively for audio and video files; an id is the file's path relative to it;
- a Parquet file (found by its ``PAR1`` magic, whatever its name) with a ``path`` column and an optional
  ``id`` column.

A relative path is relative to the manifest's own folder, so a manifest can travel with its data.

Ids are strings (an integer id is taken as its decimal string) of 1 to 1024 characters without control
characters; they are only ever written into JSONL, never used as file names. A row without a usable id is
a :class:`ManifestProblem` and produces no output; so is the second and later row of a duplicated id. A row
with a good id but no usable path becomes an item with ``error`` set, so that it still gets an output row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: File suffixes (lower case) that a directory manifest picks up: audio first, then video containers.
MEDIA_SUFFIXES = frozenset(
    {
        ".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".aif", ".aiff",
        ".aifc", ".au", ".caf", ".amr", ".mka", ".webm",
        ".mp4", ".m4v", ".mkv", ".mov", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".3gp", ".wmv",
    }
)  # fmt: skip
MAX_ID_CHARS = 1024
_PARQUET_MAGIC = b"PAR1"


class ManifestError(Exception):
    """The manifest as a whole cannot be read (missing, unreadable, wrong columns)."""


@dataclass(frozen=True)
class ManifestItem:
    """One file to transcribe; ``error`` is set when the manifest row itself was unusable."""

    id: str
    path: str
    error: str | None = None


@dataclass(frozen=True)
class ManifestProblem:
    """A manifest row that produced no item: where it was (1-based line or row) and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass(frozen=True)
class Manifest:
    """The items to process, in manifest order, and the rows that were rejected."""

    source: str
    items: tuple[ManifestItem, ...]
    problems: tuple[ManifestProblem, ...] = ()


def read_manifest(source: str | os.PathLike[str]) -> Manifest:
    """Read a JSONL file, a directory or a Parquet file into a :class:`Manifest`."""
    path = Path(source)
    if path.is_dir():
        rows: Iterable[tuple[str, object, object]] = _directory_rows(path)
    elif path.is_file():
        rows = _parquet_rows(path) if _is_parquet(path) else _jsonl_rows(path)
    elif path.exists():
        raise ManifestError(f"{path}: not a file or a directory")
    else:
        raise ManifestError(f"{path}: no such manifest")
    base = path if path.is_dir() else path.parent
    return _validate(str(path), rows, base)


def _is_parquet(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(4) == _PARQUET_MAGIC
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc.strerror})") from None


# --- the three sources: each yields (where, raw id, raw path or _Unparsable) ---------------------------


@dataclass(frozen=True)
class _Unparsable:
    """A line that is not even a row (bad JSON, a number): its reason replaces the path."""

    reason: str


def _directory_rows(root: Path) -> Iterator[tuple[str, object, object]]:
    found: list[str] = []
    for folder, dirs, files in os.walk(root, onerror=None):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # hidden folders are tool state
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in MEDIA_SUFFIXES:
                found.append((Path(folder) / name).relative_to(root).as_posix())
    for rel in sorted(found):
        yield rel, rel, rel


def _jsonl_rows(path: Path) -> Iterator[tuple[str, object, object]]:
    try:
        fh = path.open("r", encoding="utf-8", errors="strict", newline="")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    with fh:
        try:
            for number, raw in enumerate(fh, 1):
                yield from _jsonl_line(f"line {number}", raw.strip())
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _jsonl_line(where: str, line: str) -> Iterator[tuple[str, object, object]]:
    if not line or line.startswith("#"):
        return
    if line[0] in '{["':
        try:
            value: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            yield where, None, _Unparsable(f"not valid JSON ({exc.msg})")
            return
        if isinstance(value, str):
            yield where, value, value
        elif isinstance(value, dict):
            path = value.get("path")
            yield where, value.get("id", path), path
        else:
            yield where, None, _Unparsable(f"a row must be an object or a path, got {type(value).__name__}")
        return
    yield where, line, line


def _parquet_rows(path: Path) -> Iterator[tuple[str, object, object]]:
    import pyarrow.parquet as pq  # only Parquet manifests pay for pyarrow's import

    try:
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError subclasses for a bad file
        raise ManifestError(f"{path}: not a readable Parquet file ({exc})") from None
    if "path" not in names:
        raise ManifestError(f"{path}: a Parquet manifest needs a 'path' column (has {sorted(names)})")
    columns = ["path", "id"] if "id" in names else ["path"]
    row = 0
    try:
        for batch in pf.iter_batches(columns=columns, batch_size=65_536):
            data = batch.to_pydict()
            ids = data.get("id", data["path"])
            for item_id, item_path in zip(ids, data["path"], strict=True):
                row += 1
                yield f"row {row}", item_id, item_path
    except Exception as exc:
        raise ManifestError(f"{path}: cannot read Parquet row {row + 1} ({exc})") from None


# --- validation ------------------------------------------------------------------------------------


def _check_id(value: object) -> tuple[str | None, str]:
    """(the id as a string, "") or (None, why it is unusable)."""
    if isinstance(value, bool):  # a bool is an int to Python, never an id to a person
        return None, "the id must be a string"
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        return (
            None,
            "the row has no id" if value is None else f"the id must be a string, got {type(value).__name__}",
        )
    if not value:
        return None, "the id is empty"
    if len(value) > MAX_ID_CHARS:
        return None, f"the id has {len(value)} characters; the limit is {MAX_ID_CHARS}"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return None, "the id contains control characters"
    return value, ""


def _check_path(value: object) -> str | None:
    """Why ``value`` is not a usable path, or None."""
    if value is None:
        return "the row has no 'path'"
    if not isinstance(value, str):
        return f"the path must be a string, got {type(value).__name__}"
    if not value.strip():
        return "the path is empty"
    if "\x00" in value:
        return "the path contains a NUL character"
    return None


def _validate(source: str, rows: Iterable[tuple[str, object, object]], base: Path) -> Manifest:
    items: list[ManifestItem] = []
    problems: list[ManifestProblem] = []
    first_seen: dict[str, str] = {}
    for where, raw_id, raw_path in rows:
        if isinstance(raw_path, _Unparsable):
            problems.append(ManifestProblem(where, raw_path.reason))
            continue
        item_id, why = _check_id(raw_id)
        if item_id is None:
            problems.append(ManifestProblem(where, why))
            continue
        if item_id in first_seen:
            problems.append(
                ManifestProblem(where, f"duplicate id {item_id!r} (first at {first_seen[item_id]})")
            )
            continue
        first_seen[item_id] = where
        bad_path = _check_path(raw_path)
        if bad_path is not None:
            items.append(ManifestItem(item_id, "" if not isinstance(raw_path, str) else raw_path, bad_path))
            continue
        assert isinstance(raw_path, str)
        items.append(ManifestItem(item_id, raw_path if os.path.isabs(raw_path) else str(base / raw_path)))
    return Manifest(source, tuple(items), tuple(problems))
