"""Barge-in as a generation counter: everything tagged with an older generation is stale.

The session bumps the generation when it starts a reply and when it cancels one. Work started for a
generation carries a :class:`GenerationToken`; model calls on the executor thread poll its ``is_set()``
(it satisfies ``core.models.base.CancelToken``) and the sender drops queued packets whose generation is
no longer current. Reading an int is atomic in CPython, so the token is safe to poll from any thread.
"""

from __future__ import annotations


class CancelScope:
    """The current generation of one session's output."""

    def __init__(self) -> None:
        self._generation = 0
        self._closed = False

    @property
    def generation(self) -> int:
        """The current generation."""
        return self._generation

    def bump(self) -> int:
        """Make everything of the current generation stale; return the new generation."""
        self._generation += 1
        return self._generation

    def is_current(self, generation: int) -> bool:
        """Whether work tagged ``generation`` is still wanted."""
        return generation == self._generation and not self._closed

    def token(self) -> GenerationToken:
        """A cancel token for the current generation."""
        return GenerationToken(self, self._generation)

    def close(self) -> None:
        """Cancel everything for good (the session ends)."""
        self._closed = True


class GenerationToken:
    """Set once its scope has moved past its generation (or closed)."""

    __slots__ = ("_scope", "generation")

    def __init__(self, scope: CancelScope, generation: int) -> None:
        self._scope = scope
        self.generation = generation

    def is_set(self) -> bool:
        """True when the work this token belongs to should stop."""
        return not self._scope.is_current(self.generation)
