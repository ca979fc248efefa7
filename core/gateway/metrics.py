"""Gateway metrics in the Prometheus text format (0.0.4), written by hand: no client library needed.

Counters and summaries are fed by the pool (``PoolListener``) and by the ``response.done`` timings the
gateway sees pass through; gauges (queue length, worker states) are read from the pool when scraped.
Summaries keep the last ``WINDOW`` observations for their quantiles, plus an all-time sum and count.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from core.gateway.queue_updates import UPDATE_PATHS
from core.scheduling.eta import REQUEST_TYPES
from core.scheduling.pool import OBSERVED_OUTCOMES, Lease, Outcome, Pool, PoolListener, Ticket

WINDOW = 1024
QUANTILES = (0.5, 0.9, 0.99)
#: Worker states exported as a one-hot gauge.
WORKER_STATES = ("unknown", "loading", "idle", "busy", "paused", "error", "down", "busy_external")


class Summary:
    """Quantiles over a sliding window, and an all-time sum and count."""

    def __init__(self, window: int = WINDOW) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Add one observation (non-finite values are ignored)."""
        if not math.isfinite(value):
            return
        self.values.append(value)
        self.count += 1
        self.total += value

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of the window (nearest rank); NaN when empty."""
        if not self.values:
            return math.nan
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, object]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(round(value, 6)) if isinstance(value, float) else str(value)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, labels: Mapping[str, object] | None = None) -> None:
        self.lines.append(f"{name}{_labels(labels or {})} {_number(value)}")

    def summary(self, name: str, summaries: Iterable[tuple[Mapping[str, object], Summary]]) -> None:
        for labels, s in summaries:
            for q in QUANTILES:
                self.sample(name, s.quantile(q), {**labels, "quantile": q})
            self.sample(f"{name}_sum", s.total, labels)
            self.sample(f"{name}_count", s.count, labels)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class GatewayMetrics(PoolListener):
    """Everything ``/metrics`` reports that is not read from the pool at scrape time."""

    def __init__(self) -> None:
        self.sessions: Counter[str] = Counter()
        self.releases: Counter[tuple[str, str]] = Counter()
        self.rejects: Counter[str] = Counter()
        self.responses: Counter[str] = Counter()
        self.waits: dict[str, Summary] = {kind: Summary() for kind in REQUEST_TYPES}
        self.durations: dict[str, Summary] = {kind: Summary() for kind in REQUEST_TYPES}
        self.stages: dict[str, Summary] = {}
        #: Per worker index: the session counters of its last /health (core.session.counters).
        self.worker_counters: dict[int, dict[str, int]] = {}
        #: Waiting WebSocket clients by the path their queue updates take (core.gateway.queue_updates).
        self.queue_update_paths: Counter[str] = Counter()
        #: Connections the server dropped, by reason (the serving layer's counter, set by the gateway's run).
        self.connection_drops: Callable[[], Mapping[str, int]] = dict
        #: Request bodies refused while read, by reason (the body limit's counter, set by the app).
        self.body_refusals: Mapping[str, int] = {}

    def on_dispatch(self, ticket: Ticket) -> None:
        """Count the session and its wait."""
        self.sessions[ticket.kind] += 1
        self.waits.setdefault(ticket.kind, Summary()).observe(ticket.waited_s)

    def on_release(self, lease: Lease, outcome: Outcome, duration_s: float) -> None:
        """Count how the session ended and how long it held the worker."""
        kind = lease.ticket.kind
        self.releases[(kind, outcome)] += 1
        if outcome in OBSERVED_OUTCOMES:  # as the ETAs: a lease abandoned before it ran is no duration
            self.durations.setdefault(kind, Summary()).observe(duration_s)

    def on_reject(self, reason: str) -> None:
        """Count tickets that never got a worker."""
        self.rejects[reason] += 1

    def observe_response(self, event: Mapping[str, Any]) -> None:
        """Record a worker's ``response.done``: its status and every ``*_ms`` stage timing."""
        status = event.get("status")
        self.responses[status if isinstance(status, str) else "unknown"] += 1
        timings = event.get("timings")
        if not isinstance(timings, Mapping):
            return
        for key, value in timings.items():
            if (
                isinstance(key, str)
                and key.endswith("_ms")
                and isinstance(value, int | float)
                and len(self.stages) < 64
            ):
                self.stages.setdefault(key[:-3], Summary()).observe(float(value) / 1000.0)

    def observe_queue_update_path(self, path: str) -> None:
        """Count one WebSocket client whose queue updates take ``path`` (``transport`` or ``asgi``)."""
        self.queue_update_paths[path] += 1

    def observe_worker_counters(self, worker: int, counters: object) -> None:
        """Keep a worker's session counters from its ``/health`` (totals since it started)."""
        if isinstance(counters, Mapping):
            self.worker_counters[worker] = {
                k: v
                for k, v in counters.items()
                if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            }

    def _render_turns(self, w: _Writer) -> None:
        w.family(
            "gateway_worker_preemptive_replies_total",
            "counter",
            "Replies started at a pause before the turn was confirmed, by outcome: started, used (sent), "
            "discarded (nothing sent). Totals since each worker started.",
        )
        for index, counts in sorted(self.worker_counters.items()):
            for outcome in ("started", "used", "discarded"):
                value = counts.get(f"preemptive_{outcome}", 0)
                w.sample(
                    "gateway_worker_preemptive_replies_total", value, {"worker": index, "outcome": outcome}
                )
        w.family("gateway_worker_turns_total", "counter", "Ended user turns, by what ended them.")
        for index, counts in sorted(self.worker_counters.items()):
            for how in ("semantic", "silence"):
                w.sample(
                    "gateway_worker_turns_total", counts.get(f"turns_{how}", 0), {"worker": index, "by": how}
                )

    def render(self, pool: Pool) -> str:
        """The whole ``/metrics`` page."""
        w = _Writer()
        w.family("gateway_sessions_total", "counter", "Requests dispatched to a worker, by type.")
        for kind in sorted(set(REQUEST_TYPES) | set(self.sessions)):
            w.sample("gateway_sessions_total", self.sessions[kind], {"type": kind})
        w.family("gateway_sessions_ended_total", "counter", "Worker leases released, by type and outcome.")
        for (kind, outcome), n in sorted(self.releases.items()):
            w.sample("gateway_sessions_ended_total", n, {"type": kind, "outcome": outcome})
        w.family("gateway_sessions_active", "gauge", "Workers serving a request now.")
        w.sample("gateway_sessions_active", sum(wk.lease is not None for wk in pool.workers))
        w.family("gateway_queue_length", "gauge", "Tickets waiting for a worker.")
        w.sample("gateway_queue_length", pool.queue_length)
        w.family("gateway_queue_capacity", "gauge", "max_queue_size.")
        w.sample("gateway_queue_capacity", pool.max_queue_size)
        w.family("gateway_rejected_total", "counter", "Tickets that never got a worker, by reason.")
        for reason in sorted({"queue_full", "queue_timeout", "cancelled"} | set(self.rejects)):
            w.sample("gateway_rejected_total", self.rejects[reason], {"reason": reason})
        w.family(
            "gateway_queue_update_clients_total",
            "counter",
            "WebSocket sessions, by the path their queue updates take: transport (handed to the "
            "connection's websockets protocol, written to its transport) or asgi (the app's own send).",
        )
        for path in sorted(set(UPDATE_PATHS) | set(self.queue_update_paths)):
            w.sample("gateway_queue_update_clients_total", self.queue_update_paths[path], {"path": path})
        w.family("gateway_queue_wait_seconds", "summary", "Seconds from submit to a worker, by type.")
        w.summary("gateway_queue_wait_seconds", (({"type": k}, s) for k, s in sorted(self.waits.items())))
        w.family("gateway_session_duration_seconds", "summary", "Seconds a request held its worker, by type.")
        w.summary(
            "gateway_session_duration_seconds", (({"type": k}, s) for k, s in sorted(self.durations.items()))
        )
        w.family("gateway_expected_duration_seconds", "gauge", "Expected duration used for ETAs, by type.")
        for kind in REQUEST_TYPES:
            w.sample("gateway_expected_duration_seconds", pool.durations.expected(kind), {"type": kind})
        self._render_workers(w, pool)
        w.family("gateway_responses_total", "counter", "response.done events seen, by status.")
        for status, n in sorted(self.responses.items()):
            w.sample("gateway_responses_total", n, {"status": status})
        w.family("gateway_turn_stage_seconds", "summary", "Per-stage turn latencies reported by workers.")
        w.summary("gateway_turn_stage_seconds", (({"stage": k}, s) for k, s in sorted(self.stages.items())))
        self._render_turns(w)
        self._render_clients(w)
        return w.text()

    def _render_clients(self, w: _Writer) -> None:
        drops = self.connection_drops()
        w.family(
            "gateway_connections_dropped_total",
            "counter",
            "Client connections dropped by the serving layer, by reason: per_address_limit (the address held "
            "max_connections_per_address), header_timeout (no complete request head within header_timeout_s), "
            "tls_handshake (failed or not done within tls_handshake_timeout_s), unread_body (answered without "
            "reading its request body, the rest of which did not all come within body_read_timeout_s).",
        )
        reasons = {"per_address_limit", "header_timeout", "tls_handshake", "unread_body"}
        for reason in sorted(reasons | set(drops)):
            w.sample("gateway_connections_dropped_total", drops.get(reason, 0), {"reason": reason})
        w.family(
            "gateway_request_bodies_refused_total",
            "counter",
            "Request bodies refused while read, by reason: too_large (past the upload limit) or "
            "read_timeout (no part for body_read_timeout_s).",
        )
        for reason in sorted({"too_large", "read_timeout"} | set(self.body_refusals)):
            w.sample(
                "gateway_request_bodies_refused_total", self.body_refusals.get(reason, 0), {"reason": reason}
            )

    @staticmethod
    def _render_workers(w: _Writer, pool: Pool) -> None:
        w.family("gateway_worker_up", "gauge", "1 when the worker is in the pool.")
        for wk in pool.workers:
            w.sample("gateway_worker_up", int(wk.healthy), {"worker": wk.index, "address": wk.address})
        w.family("gateway_worker_state", "gauge", "The worker's state (one-hot).")
        for wk in pool.workers:
            state = ("paused" if wk.lease.paused else "busy") if wk.lease and wk.healthy else wk.status
            for name in WORKER_STATES:
                w.sample("gateway_worker_state", int(state == name), {"worker": wk.index, "state": name})
        w.family("gateway_worker_restarts", "gauge", "Restarts reported by the worker or its supervisor.")
        for wk in pool.workers:
            w.sample("gateway_worker_restarts", wk.restarts, {"worker": wk.index})
        w.family("gateway_worker_sessions_total", "counter", "Requests dispatched to each worker.")
        for wk in pool.workers:
            w.sample("gateway_worker_sessions_total", wk.sessions, {"worker": wk.index})
