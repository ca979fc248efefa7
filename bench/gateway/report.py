"""The gateway benchmark's summary: one markdown table, a column per API and scheme, and RESULT lines."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from bench.gateway.waiting import LAG_TARGET_S

NAN = float("nan")
HOP_KEYS = ("direct_p50", "direct_p95", "gateway_p50", "gateway_p95", "added_p50", "added_p95", "n")
ETA_KEYS = ("clients", "queued", "mae", "bias", "mean_wait", "p95_error")


@dataclass
class Result:
    """What one API over one scheme measured (NaN / empty for the parts not run)."""

    protocol: str
    path: str
    scheme: str
    hop: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(HOP_KEYS, NAN))
    eta: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(ETA_KEYS, NAN))
    rows: list[dict[str, Any]] = field(default_factory=list)
    peer_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        """``/ws/duplex over HTTP`` and the like."""
        return f"{self.path} {self.scheme.upper()}"

    def max_waiting(self) -> int:
        """The largest step whose median burst p95 met the target (0 for none)."""
        good = [r["waiting"] for r in self.rows if r["burst_p95_ms"] < LAG_TARGET_S * 1000]
        return max(good) if good else 0

    def lag_at_max(self) -> float:
        """The median burst p95 (ms) at :meth:`max_waiting`."""
        best = self.max_waiting()
        return next((r["burst_p95_ms"] for r in self.rows if r["waiting"] == best), NAN)


def _cells(results: list[Result], cell: Any) -> str:
    return " | ".join(cell(r) for r in results)


def _by_level(r: Result) -> dict[int, dict[str, Any]]:
    # Keyed by the step's nominal level: the fewest waiting at a burst can differ between columns.
    return {row["level"]: row for row in r.rows}


def table(results: list[Result]) -> list[str]:
    """The markdown table's lines."""
    lines = [f"| measure | {_cells(results, lambda r: r.label)} |", "| --- |" + " --- |" * len(results)]

    def add(name: str, cell: Any) -> None:
        lines.append(f"| {name} | {_cells(results, cell)} |")

    add(
        "probe round trip direct to worker, p50 / p95",
        lambda r: "{direct_p50:.3f} / {direct_p95:.3f} ms".format(**r.hop),
    )
    add(
        "probe round trip through gateway, p50 / p95",
        lambda r: "{gateway_p50:.3f} / {gateway_p95:.3f} ms".format(**r.hop),
    )
    add(
        "added by the gateway hop, p50 / p95",
        lambda r: "{added_p50:.3f} / {added_p95:.3f} ms ({n} frames)".format(**r.hop),
    )
    add(
        "ETA mean absolute error",
        lambda r: (
            "{mae:.3f} s (p95 {p95_error:.3f}, bias {bias:+.3f}, mean wait {mean_wait:.2f} s, {queued} queued)".format(
                **r.eta
            )
        ),
    )
    levels = sorted({level for r in results for level in _by_level(r)})
    for level in levels:

        def lag(r: Result, level: int = level) -> str:
            row = _by_level(r).get(level)
            if row is None:
                return "not run"
            return (
                f"{row['waiting']}: {row['lag_p50_ms']:.1f} / {row['lag_p95_ms']:.1f} ({row['burst_p95_ms']:.1f}) ms,"
                f" live p95 {row.get('live_p95_ms', NAN):.2f} ms, RSS {row['rss_mb']:.0f} MB"
            )

        add(f"{level:,} waiting: update lag p50 / p95 (median burst p95)", lag)
    if any(r.peer_rows for r in results):
        add(
            "bare fan-out peer (plain WebSocket), median burst p95",
            lambda r: ", ".join(f"{p['waiting']}: {p['burst_p95_ms']:.1f} ms" for p in r.peer_rows) or "—",
        )

    def cpu(r: Result) -> str:
        big = [row["cpu_us"] for row in r.rows if row["waiting"] >= 900]
        return f"{statistics.median(big):.0f} µs" if big else "—"

    add("gateway CPU per update (median over ≥ 900 waiting)", cpu)
    add(
        "waiting clients with update lag p95 < 100 ms (median of 5 bursts)",
        lambda r: str(r.max_waiting()) if r.rows else "not run",
    )
    return lines


def result_line(r: Result) -> str:
    """``RESULT path=... scheme=... hop_p95_ms=... eta_mae_s=... max_waiting_clients=... lag_p95_ms=...``."""
    lag = r.lag_at_max()
    return (
        f"RESULT path={r.path} scheme={r.scheme} hop_p95_ms={r.hop['added_p95']:.3f}"
        f" eta_mae_s={r.eta['mae']:.3f} max_waiting_clients={r.max_waiting()}"
        f" lag_p95_ms={'nan' if math.isnan(lag) else f'{lag:.1f}'}"
    )


def print_report(results: list[Result]) -> None:
    """The table, then one RESULT line per API and scheme."""
    print()
    for line in table(results):
        print(line)
    for r in results:
        print(result_line(r))
