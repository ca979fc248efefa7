"""ETA maths for the gateway queue. Pure: no clock, no I/O, no asyncio.

Two pieces:

- ``DurationModel``: the expected duration of one request per type — the configured baseline until
  ``min_samples`` real durations are seen, then an exponential moving average seeded with their mean.
- ``ticket_etas`` / ``DispatchSimulation``: each waiting ticket's wait by simulated dispatch. Every healthy
  worker frees at its remaining time (``remaining_s``); each ticket in queue order takes the earliest-free
  worker (a min-heap), which then frees at that moment plus the ticket's expected duration.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from core.config import ServiceConfig

#: Request types the gateway queues; each has an ``eta_<type>_s`` baseline in ``ServiceConfig``.
REQUEST_TYPES: tuple[str, ...] = ("chat", "streaming", "audio_duplex", "transcribe", "speech")

#: A worker past its expected duration still counts this fraction of it as left (capped below),
#: so that it sorts after workers that are truly about to free but is never "free already".
OVERRUN_FRACTION = 0.1
OVERRUN_CAP_S = 5.0
OVERRUN_FLOOR_S = 0.001

#: Upper bound of a baseline accepted at run time (a day); anything longer is a typo.
MAX_BASELINE_S = 86_400.0


class EtaSettingsError(ValueError):
    """A baseline, alpha or sample count out of range (the message names the field)."""


@dataclass(frozen=True)
class EtaSettings:
    """Baselines per request type and the EMA parameters."""

    baselines: Mapping[str, float]
    alpha: float = 0.3
    min_samples: int = 3

    def __post_init__(self) -> None:
        unknown = sorted(set(self.baselines) - set(REQUEST_TYPES))
        if unknown:
            raise EtaSettingsError(
                f"baselines: unknown request type {unknown[0]!r} (known: {', '.join(REQUEST_TYPES)})"
            )
        missing = sorted(set(REQUEST_TYPES) - set(self.baselines))
        if missing:
            raise EtaSettingsError(f"baselines: missing request type {missing[0]!r}")
        for kind, value in self.baselines.items():
            if not _finite(value) or not 0 < value <= MAX_BASELINE_S:
                raise EtaSettingsError(
                    f"baselines.{kind}: must be a number in (0, {MAX_BASELINE_S:g}] s, got {value!r}"
                )
        if not _finite(self.alpha) or not 0 < self.alpha <= 1:
            raise EtaSettingsError(f"alpha: must be in (0, 1], got {self.alpha!r}")
        if (
            isinstance(self.min_samples, bool)
            or not isinstance(self.min_samples, int)
            or self.min_samples < 1
        ):
            raise EtaSettingsError(f"min_samples: must be an integer >= 1, got {self.min_samples!r}")

    @classmethod
    def from_config(cls, service: ServiceConfig) -> EtaSettings:
        """The settings of ``service.eta_*``."""
        return cls(
            baselines={kind: float(getattr(service, f"eta_{kind}_s")) for kind in REQUEST_TYPES},
            alpha=service.eta_ema_alpha,
            min_samples=service.eta_ema_min_samples,
        )

    def updated(
        self,
        baselines: Mapping[str, float] | None = None,
        alpha: float | None = None,
        min_samples: int | None = None,
    ) -> EtaSettings:
        """A copy with the given fields changed (validated like the original)."""
        merged = {**self.baselines, **(baselines or {})}
        return replace(
            self,
            baselines=merged,
            alpha=self.alpha if alpha is None else alpha,
            min_samples=self.min_samples if min_samples is None else min_samples,
        )


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class DurationStats:
    """Observed durations of one request type: a running mean of the first samples, then an EMA."""

    count: int = 0
    average_s: float = 0.0

    def observe(self, seconds: float, alpha: float, min_samples: int) -> DurationStats:
        """The stats after one more duration."""
        count = self.count + 1
        if count <= min_samples:
            # Seeding with the plain mean keeps one odd early sample from dominating the EMA.
            return DurationStats(count, self.average_s + (seconds - self.average_s) / count)
        return DurationStats(count, alpha * seconds + (1 - alpha) * self.average_s)


@dataclass
class DurationModel:
    """Expected duration per request type: baseline until ``min_samples`` durations, then the EMA."""

    settings: EtaSettings
    stats: dict[str, DurationStats] = field(default_factory=dict)

    def expected(self, kind: str) -> float:
        """Expected seconds one request of ``kind`` occupies a worker."""
        stats = self.stats.get(kind)
        if stats is None or stats.count < self.settings.min_samples:
            return self.settings.baselines[kind]
        return stats.average_s

    def observe(self, kind: str, seconds: float) -> None:
        """Record a real duration; non-finite or negative values and unknown types are ignored."""
        if kind not in self.settings.baselines or not _finite(seconds) or seconds < 0:
            return
        old = self.stats.get(kind, DurationStats())
        self.stats[kind] = old.observe(seconds, self.settings.alpha, self.settings.min_samples)

    def samples(self, kind: str) -> int:
        """How many durations of ``kind`` were observed."""
        stats = self.stats.get(kind)
        return stats.count if stats else 0

    def reconfigure(self, settings: EtaSettings, *, reset: bool = False) -> None:
        """New baselines/EMA parameters at run time; ``reset`` forgets the learned averages."""
        self.settings = settings
        if reset:
            self.stats.clear()

    def describe(self) -> dict[str, Any]:
        """JSON view for ``/api/config/eta`` and ``/api/queue``."""
        return {
            "baselines_s": dict(self.settings.baselines),
            "ema_alpha": self.settings.alpha,
            "ema_min_samples": self.settings.min_samples,
            "expected_s": {kind: round(self.expected(kind), 3) for kind in REQUEST_TYPES},
            "samples": {kind: self.samples(kind) for kind in REQUEST_TYPES},
            "source": {
                kind: "ema" if self.samples(kind) >= self.settings.min_samples else "baseline"
                for kind in REQUEST_TYPES
            },
        }


@dataclass(frozen=True)
class WorkerLoad:
    """One worker as the simulation sees it: healthy or not, and its current job if any."""

    healthy: bool = True
    expected_s: float | None = None  # None: idle
    elapsed_s: float = 0.0


def remaining_s(expected_s: float, elapsed_s: float) -> float:
    """Seconds until a busy worker frees: ``expected - elapsed``, or a small positive remainder once overrun."""
    left = expected_s - elapsed_s
    if left > 0:
        return left
    return max(OVERRUN_FLOOR_S, min(OVERRUN_FRACTION * expected_s, OVERRUN_CAP_S))


class DispatchSimulation:
    """The dispatch simulation as running state: ``add`` one waiting ticket at a time, in queue order.

    Each healthy worker frees at its remaining time; a ticket takes the earliest-free worker, which then
    frees that much later. Kept after a full pass so a ticket joining the tail costs one step, not a
    replay of the whole queue. Only healthy workers serve; with none healthy the estimate assumes the
    known ones come back now (optimistic; there is nothing better to say), and with no worker at all, one.
    """

    __slots__ = ("_heap",)

    def __init__(self, workers: Sequence[WorkerLoad]) -> None:
        pool = (
            [w for w in workers if w.healthy] or [replace(w, healthy=True) for w in workers] or [WorkerLoad()]
        )
        self._heap = [0.0 if w.expected_s is None else remaining_s(w.expected_s, w.elapsed_s) for w in pool]
        heapq.heapify(self._heap)

    def add(self, duration_s: float) -> float:
        """Seconds until the next ticket in queue order gets a worker; it then holds it ``duration_s``."""
        start = self._heap[0]
        heapq.heapreplace(self._heap, start + duration_s)
        return start


def ticket_etas(workers: Sequence[WorkerLoad], waiting: Sequence[float]) -> list[float]:
    """Seconds until each waiting ticket gets a worker, in queue order (see ``DispatchSimulation``).

    ``waiting`` holds the expected duration of each waiting ticket.
    """
    sim = DispatchSimulation(workers)
    return [sim.add(duration) for duration in waiting]
