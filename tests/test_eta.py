"""ETA maths: baselines then EMA, and simulated dispatch over a min-heap of workers."""

from __future__ import annotations

import itertools
import math

import pytest

from core.config import ServiceConfig
from core.scheduling.eta import (
    REQUEST_TYPES,
    DurationModel,
    DurationStats,
    EtaSettings,
    EtaSettingsError,
    WorkerLoad,
    remaining_s,
    ticket_etas,
)

BASE = {"chat": 15.0, "streaming": 20.0, "audio_duplex": 120.0, "transcribe": 10.0, "speech": 5.0}


def model(alpha: float = 0.5, min_samples: int = 3) -> DurationModel:
    return DurationModel(EtaSettings(BASE, alpha=alpha, min_samples=min_samples))


def test_settings_come_from_the_service_config() -> None:
    s = EtaSettings.from_config(ServiceConfig(eta_chat_s=7, eta_ema_alpha=0.25, eta_ema_min_samples=5))
    assert s.baselines == {
        "chat": 7.0,
        "streaming": 20.0,
        "audio_duplex": 120.0,
        "transcribe": 10.0,
        "speech": 5.0,
    }
    assert (s.alpha, s.min_samples) == (0.25, 5)
    assert set(s.baselines) == set(REQUEST_TYPES)


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        ([], 15.0),  # baseline
        ([4.0], 15.0),  # still baseline: fewer than min_samples
        ([4.0, 6.0], 15.0),
        ([4.0, 6.0, 8.0], 6.0),  # min_samples reached: the mean of the first three seeds the EMA
        ([4.0, 6.0, 8.0, 10.0], 8.0),  # 0.5 * 10 + 0.5 * 6
        ([4.0, 6.0, 8.0, 10.0, 0.0], 4.0),  # 0.5 * 0 + 0.5 * 8
    ],
)
def test_baseline_until_min_samples_then_ema(samples: list[float], expected: float) -> None:
    m = model(alpha=0.5, min_samples=3)
    for s in samples:
        m.observe("chat", s)
    assert m.expected("chat") == pytest.approx(expected)
    assert m.expected("transcribe") == 10.0  # other types untouched
    assert m.samples("chat") == len(samples)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_bad_durations_are_ignored(bad: float) -> None:
    m = model(min_samples=1)
    m.observe("chat", bad)
    m.observe("nope", 3.0)
    assert m.samples("chat") == 0 and m.expected("chat") == 15.0


def test_duration_stats_is_pure() -> None:
    a = DurationStats()
    b = a.observe(2.0, 0.3, 1)
    c = b.observe(4.0, 0.3, 1)
    assert (a.count, b.count, c.count) == (0, 1, 2)
    assert (b.average_s, c.average_s) == (2.0, pytest.approx(0.3 * 4 + 0.7 * 2))


def test_reconfigure_keeps_or_resets_learned_averages() -> None:
    m = model(min_samples=1)
    m.observe("chat", 2.0)
    m.reconfigure(m.settings.updated(baselines={"chat": 30.0}))
    assert m.expected("chat") == 2.0  # learned average still wins
    m.reconfigure(m.settings, reset=True)
    assert m.expected("chat") == 30.0
    assert m.describe()["source"]["chat"] == "baseline"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"baselines": {"chat": 0.0}}, "baselines.chat"),
        ({"baselines": {"chat": math.nan}}, "baselines.chat"),
        ({"baselines": {"chat": 1e9}}, "baselines.chat"),
        ({"baselines": {"video": 3.0}}, "unknown request type 'video'"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"min_samples": 0}, "min_samples"),
    ],
)
def test_bad_settings_raise_a_clear_error(change: dict, needle: str) -> None:
    with pytest.raises(EtaSettingsError, match=needle):
        EtaSettings(BASE).updated(**change)


@pytest.mark.parametrize(
    ("expected", "elapsed", "left"),
    [
        (10.0, 0.0, 10.0),
        (10.0, 4.0, 6.0),
        (10.0, 10.0, 1.0),  # overrun: 10 % of expected
        (10.0, 50.0, 1.0),
        (120.0, 500.0, 5.0),  # overrun remainder capped
        (0.0001, 1.0, 0.001),  # never zero
    ],
)
def test_remaining_time_of_a_busy_worker(expected: float, elapsed: float, left: float) -> None:
    assert remaining_s(expected, elapsed) == pytest.approx(left)


IDLE = WorkerLoad()
DOWN = WorkerLoad(healthy=False)


def busy(expected: float, elapsed: float = 0.0, healthy: bool = True) -> WorkerLoad:
    return WorkerLoad(healthy, expected, elapsed)


@pytest.mark.parametrize(
    ("workers", "waiting", "etas"),
    [
        ([IDLE], [5.0], [0.0]),
        ([IDLE], [5.0, 5.0, 5.0], [0.0, 5.0, 10.0]),
        ([IDLE, IDLE], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 5.0, 5.0]),
        ([busy(10, 4), IDLE], [3.0, 3.0, 3.0], [0.0, 3.0, 6.0]),  # idle worker serves the first two
        ([busy(10, 4), busy(10, 8)], [1.0, 1.0, 1.0], [2.0, 3.0, 4.0]),  # earliest-free first, then re-used
        ([busy(10, 4), busy(10, 8)], [10.0, 1.0], [2.0, 6.0]),
        ([busy(10, 30), busy(20, 0)], [5.0], [1.0]),  # overrun worker counts 10 % of its expected
        ([busy(10, 0), DOWN], [2.0, 2.0], [10.0, 12.0]),  # a down worker serves nobody
        ([busy(10, 2, healthy=False)], [4.0, 4.0], [8.0, 12.0]),  # none healthy: assume they come back
        ([], [4.0, 4.0], [0.0, 4.0]),  # no workers known: as if one
        ([IDLE, IDLE], [], []),
        ([busy(4, 0), busy(6, 0), busy(8, 0)], [6.0, 6.0, 6.0, 6.0], [4.0, 6.0, 8.0, 10.0]),
    ],
)
def test_simulated_dispatch(workers: list[WorkerLoad], waiting: list[float], etas: list[float]) -> None:
    assert ticket_etas(workers, waiting) == pytest.approx(etas)


def test_etas_never_decrease_along_the_queue() -> None:
    workers = [busy(30, 7), busy(5, 1), IDLE]
    waiting = [float(1 + (i * 7) % 13) for i in range(200)]
    etas = ticket_etas(workers, waiting)
    assert all(a <= b for a, b in itertools.pairwise(etas))
