"""What happened in a session and when: state changes, speech decisions, turn timings.

Tests read it to assert *when* things happened; the recorder (when ``record`` is on) persists every
entry as it is made. Times are seconds on the session's clock since the session started.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

#: Entries kept in memory (a long session keeps the newest; the recorder has them all).
MAX_ENTRIES = 10_000

Entry = dict[str, Any]


class Timeline:
    """An append-only log of session happenings with times."""

    def __init__(self, clock: Callable[[], float], sink: Callable[[Entry], None] | None = None) -> None:
        self._clock = clock
        self.t0 = clock()
        self.entries: collections.deque[Entry] = collections.deque(maxlen=MAX_ENTRIES)
        self.sink = sink

    def now(self) -> float:
        """Seconds since the session started."""
        return self._clock() - self.t0

    def mark(self, kind: str, **data: Any) -> Entry:
        """Append an entry ``{"t": ..., "kind": kind, **data}`` and pass it to the sink."""
        entry: Entry = {"t": round(self.now(), 6), "kind": kind, **data}
        self.entries.append(entry)
        if self.sink is not None:
            self.sink(entry)
        return entry

    def of_kind(self, kind: str) -> list[Entry]:
        """Every kept entry of ``kind``, in order."""
        return [e for e in self.entries if e["kind"] == kind]

    def states(self) -> list[tuple[float, str]]:
        """(time, state) of every state change, in order."""
        return [(e["t"], e["state"]) for e in self.of_kind("state")]
