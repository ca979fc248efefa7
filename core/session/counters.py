"""Counts a worker keeps across its sessions: preemptive replies and turn-model decisions.

One :class:`SessionCounters` per worker process, shared by its sessions (all on the event loop, so plain
ints suffice). The worker reports them in ``/health``; the gateway turns them into ``/metrics``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class SessionCounters:
    """Running totals since the worker started."""

    #: Replies started at a pause, before the user's turn was confirmed.
    preemptive_started: int = 0
    #: Preemptive replies whose turn was confirmed: they became the reply the user hears.
    preemptive_used: int = 0
    #: Preemptive replies dropped (the user went on speaking, or the final transcript differed): not one
    #: of their packets was sent.
    preemptive_discarded: int = 0
    #: Turns ended by the turn model's confident judgement, and by the silence limit.
    turns_semantic: int = 0
    turns_silence: int = 0

    def snapshot(self) -> dict[str, int]:
        """The counts as a plain dict (for JSON)."""
        return asdict(self)
