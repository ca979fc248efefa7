"""Splitting one manifest across processes, and merging their outputs back into one file.

Shard selection is by a stable hash of the id, not by row index: ``shard_of(id, n)`` is the first 8
bytes of the id's BLAKE2b digest, big-endian, modulo ``n``. An id therefore stays in the same shard when
the manifest is reordered, filtered or appended to, so a resumed sharded run finds each id's earlier row
in the same shard file. Python's own ``hash`` is salted per process and would not do. The shards of a
large manifest come out within a fraction of a percent of equal size.

:func:`merge_outputs` unions shard files (and whatever the output file already holds) into one file
with every id once: a finished row (``ok`` or ``no_speech``) wins over an ``error`` row for the same id,
otherwise the first row seen wins. The merged file is written beside the output and renamed over it,
so a crash mid-merge leaves the old output intact.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from core.distill.writer import OutputError, encode_row, iter_rows, scan

T = TypeVar("T")


class ShardError(ValueError):
    """A malformed shard specification (``I/N`` with ``0 <= I < N``)."""


def parse_shard(spec: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``; a :class:`ShardError` for anything else."""
    index, sep, count = spec.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ShardError(f"--shard must be I/N (like 0/4), got {spec!r}") from None
    if not sep or n < 1 or not 0 <= i < n:
        raise ShardError(f"--shard must be I/N with 0 <= I < N, got {spec!r}")
    return i, n


def shard_of(item_id: str, count: int) -> int:
    """The shard (0..count-1) an id belongs to; the same on every machine and Python version."""
    if count < 1:
        raise ShardError(f"the shard count must be at least 1, got {count}")
    digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def select_shard(items: Iterable[T], index: int, count: int, *, key: Any = lambda item: item.id) -> list[T]:
    """The items of shard ``index`` of ``count``, in their original order."""
    if not 0 <= index < count:
        raise ShardError(f"shard {index} does not exist among {count}")
    return [item for item in items if shard_of(key(item), count) == index]


@dataclass(frozen=True)
class MergeReport:
    """What a merge wrote and dropped."""

    rows: int
    statuses: dict[str, int]
    duplicates: int  # rows dropped because their id was already taken
    torn_or_bad: int  # lines skipped as torn or malformed, over all inputs
    missing_inputs: tuple[str, ...] = field(default=())


def _better(new: dict[str, Any], old: dict[str, Any]) -> bool:
    return old.get("status") == "error" and new.get("status") != "error"


def merge_outputs(output: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]]) -> MergeReport:
    """Merge result files into ``output`` with every id once (the existing output is an input too)."""
    out = Path(output)
    sources = [out, *(Path(p) for p in inputs)] if out.exists() else [Path(p) for p in inputs]
    if any(Path(p).resolve() == out.resolve() for p in inputs):
        raise OutputError(f"{out} is both the output and an input of the merge")
    chosen: dict[str, dict[str, Any]] = {}
    duplicates = torn_or_bad = 0
    missing: list[str] = []
    for src in sources:
        if not src.is_file():
            missing.append(str(src))
            continue
        state = scan(src)
        torn_or_bad += state.bad_lines + (1 if state.torn_bytes else 0)
        for row in iter_rows(src):
            old = chosen.get(row["id"])
            if old is None:
                chosen[row["id"]] = row
                continue
            duplicates += 1
            if _better(row, old):
                chosen[row["id"]] = row
    tmp = out.with_name(f".{out.name}.merge-{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            for row in chosen.values():
                fh.write(encode_row(row))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{out}: cannot write the merged file ({exc.strerror})") from None
    statuses = Counter(str(row.get("status")) for row in chosen.values())
    return MergeReport(len(chosen), dict(statuses), duplicates, torn_or_bad, tuple(missing))
