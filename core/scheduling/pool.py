"""Workers, tickets and dispatch for the gateway queue (docs/ARCHITECTURE.md, "The gateway").

One FIFO of tickets, one session per worker. ``submit`` takes a ticket (or raises ``QueueFull``); the
waiter hears its queue status on every change and when one is due — pushed to a ``sink`` callback set
with ``watch`` (no task wake-up per client: thousands wait at once), or pulled with ``wait_update`` —
and ``wait_assigned`` returns once the ticket holds a ``Lease``; the lease is released exactly once,
whatever way the session ends, and the worker goes to the next ticket at once. Everything runs on one asyncio loop; nothing here does I/O. Time comes
from an injectable clock, and timeouts and periodic updates advance only through ``tick()``, so tests can
drive the whole queue with a fake clock.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from core.scheduling.eta import DispatchSimulation, DurationModel, WorkerLoad, ticket_etas

log = logging.getLogger("gateway.pool")

#: How a lease ended. Only sessions and requests that ran on the worker feed the duration averages:
#: ``completed``, or ``client_left`` once the worker had the session or request. ``abandoned`` is a client
#: that left before that (while routed, while its worker socket opened, before its request was sent): its
#: near-zero hold says nothing about how long a session takes, and would drag the queue's ETAs to zero.
Outcome = Literal["completed", "client_left", "abandoned", "worker_lost", "refused", "error"]
OBSERVED_OUTCOMES: frozenset[str] = frozenset({"completed", "client_left"})
TicketState = Literal["waiting", "assigned", "cancelled", "expired"]
#: Worker /health states in which it can serve (busy/paused only while it serves our own lease).
SERVING_STATES = frozenset({"idle", "busy", "paused"})
#: A worker reporting busy this soon after we released it is still tearing down our session.
TEARDOWN_GRACE_S = 2.0
#: Health failures in a row (timeouts, odd answers) before a worker is taken out; a refused connection
#: takes it out at once.
MAX_HEALTH_FAILURES = 3
#: An ETA counts as changed when the predicted start moves by more than this (absolute, relative).
ETA_CHANGE_S, ETA_CHANGE_FRACTION = 0.1, 0.05
#: Waiting clients told per event-loop turn. A dispatch with 5,000 waiting tells all of them (~100 ms of
#: sends); in slices, live sessions' frames on the same loop wait at most one slice.
TELL_SLICE = 64


class PoolError(Exception):
    """Base of the queue's own errors."""


class QueueFull(PoolError):
    """The queue holds ``max_queue_size`` tickets; ``retry_after_s`` is when a place should free."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"the queue is full; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class QueueTimeout(PoolError):
    """The ticket waited longer than ``request_timeout``."""


class TicketCancelled(PoolError):
    """The ticket was withdrawn (its client left)."""


class QueueStatus(NamedTuple):
    """What a waiting client is told: ``first`` selects ``session.queued`` over ``session.queue_update``.

    ``wait_update`` returns one. A ``QueueSink`` gets the same four values as arguments instead: a sink is
    called for every waiting client on every dispatch, and building a named tuple for each would cost about
    as much as formatting its message.
    """

    position: int
    eta_s: float
    queue_length: int
    first: bool


#: Where a watched ticket's statuses go: ``sink(position, eta_s, queue_length, first)``, the fields of a
#: ``QueueStatus``.
QueueSink = Callable[[int, float, int, bool], None]


@dataclass(eq=False)
class Worker:
    """One worker process as the gateway sees it."""

    index: int
    address: str
    healthy: bool = False
    status: str = "unknown"  # the last /health status, or "down" / "busy_external"
    lease: Lease | None = None
    restarts: int = 0
    failures: int = 0
    last_error: str | None = None
    sessions: int = 0
    last_used: float = -math.inf
    # The last session's close, still under way when its lease was released: the next lease waits for it.
    settling: asyncio.Future[Any] | None = None

    @property
    def available(self) -> bool:
        """Healthy and not serving a ticket."""
        return self.healthy and self.lease is None


@dataclass(eq=False, slots=True)
class Ticket:
    """One request waiting for (or holding) a worker.

    Slotted: every waiting ticket is read on every dispatch, and one compact object per ticket (no separate
    attribute dict) is less memory to walk with thousands waiting.
    """

    id: str
    kind: str
    enqueued_at: float
    state: TicketState = "waiting"
    lease: Lease | None = None
    position: int = 0
    eta_s: float = 0.0
    eta_at: float = 0.0  # when position and eta_s were computed
    attempts: int = 0  # times it was handed back by a worker that refused it
    assigned_at: float | None = None
    dispatch_seq: int = 0  # gateway-wide dispatch order, 1-based
    sent: tuple[int, float, float] | None = None  # (position, eta_s, at) last delivered to the client
    due: bool = False
    telling: bool = False  # in the pool's queue of clients to tell
    sink: QueueSink | None = None  # pushes statuses; set with ``Pool.watch``
    event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def waited_s(self) -> float:
        """Seconds between submit and assignment (0 until assigned)."""
        return 0.0 if self.assigned_at is None else max(0.0, self.assigned_at - self.enqueued_at)


class Lease:
    """A ticket's hold on a worker; ``release`` frees the worker exactly once."""

    def __init__(self, pool: Pool, ticket: Ticket, worker: Worker, started_at: float) -> None:
        self.pool, self.ticket, self.worker, self.started_at = pool, ticket, worker, started_at
        self.lost = asyncio.Event()  # set when the worker is taken out of the pool mid-session
        self.outcome: Outcome | None = None
        self.paused = False
        self.after = worker.settling  # the previous session's close, if it was still running
        # A request whose client left while the worker ran it: the lease is released when it ends.
        self.finishing: asyncio.Future[Outcome] | None = None

    async def settled(self) -> None:
        """Return once the worker's previous session has finished closing (at once if it had)."""
        if self.after is not None and not self.after.done():
            await asyncio.wait({self.after})  # its outcome is the previous session's business

    @property
    def released(self) -> bool:
        """Whether ``release`` already ran."""
        return self.outcome is not None

    def release(self, outcome: Outcome) -> bool:
        """Free the worker; True the first time, False (and nothing happens) after that."""
        return self.pool._release(self, outcome)

    async def release_while_closing(self, outcome: Outcome, close: Awaitable[Any]) -> None:
        """Release now and run ``close`` (the session's close handshake with the worker): the queue moves
        at once, without waiting for the worker, and the next lease on the worker waits for the close."""
        closing = asyncio.ensure_future(close)
        self.pool._release(self, outcome, closing)
        await closing

    def release_when_done(self, finish: Awaitable[Outcome]) -> None:
        """Hold the worker until ``finish`` ends, then release with the outcome it returns (``error`` if it
        fails); returns at once.

        For a request whose client left while the worker ran it: the worker cannot drop a request half
        done, so until it answers it stays busy to the queue, and the next ticket waits for it (or takes
        another worker) instead of being sent to a worker that refuses it. ``Pool.cancel`` leaves such a
        lease alone.
        """
        task = asyncio.ensure_future(finish)
        self.finishing = task  # kept alive by the lease, which its worker holds until the release
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[Outcome]) -> None:
        outcome: Outcome = "error"
        if not task.cancelled() and task.exception() is None:
            outcome = task.result()
        self.pool._release(self, outcome)


class PoolListener:
    """Hooks for metrics; the default does nothing."""

    def on_dispatch(self, ticket: Ticket) -> None:
        """A ticket got a worker."""

    def on_release(self, lease: Lease, outcome: Outcome, duration_s: float) -> None:
        """A lease ended."""

    def on_reject(self, reason: str) -> None:
        """A ticket was refused (``queue_full``) or ended without a worker (``queue_timeout``, ``cancelled``)."""


class Pool:
    """The gateway's workers and FIFO queue."""

    def __init__(
        self,
        addresses: Sequence[str],
        durations: DurationModel,
        *,
        max_queue_size: int = 1000,
        request_timeout: float = 300.0,
        update_interval_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
        listener: PoolListener | None = None,
    ) -> None:
        self.workers = [Worker(index=i, address=a) for i, a in enumerate(addresses)]
        self.durations = durations
        self.max_queue_size = max_queue_size
        self.request_timeout = request_timeout
        self.update_interval_s = update_interval_s
        self.clock = clock
        self.listener = listener or PoolListener()
        self._waiting: OrderedDict[str, Ticket] = OrderedDict()
        self._ids = itertools.count(1)
        self._dispatched = 0
        self._refresh_pending = False
        # The simulation after the last full refresh and when it ran: a ticket joining the tail continues
        # it. Any other change (changed()) drops it.
        self._tail: tuple[float, DispatchSimulation] | None = None
        self._to_tell: deque[Ticket] = deque()  # told TELL_SLICE per loop turn, oldest first
        self._flush_scheduled = False
        self._told_floor = -math.inf  # see _due

    # ------------------------------------------------------------------ tickets

    @property
    def queue_length(self) -> int:
        """Tickets waiting for a worker."""
        return len(self._waiting)

    def waiting(self) -> list[Ticket]:
        """The waiting tickets in queue order."""
        return list(self._waiting.values())

    def is_full(self) -> bool:
        """Whether ``submit`` would raise ``QueueFull``."""
        return len(self._waiting) >= self.max_queue_size

    def submit(self, kind: str) -> Ticket:
        """Queue a request of ``kind``; it is assigned at once when a worker is free and nobody waits."""
        if self.is_full():
            self.listener.on_reject("queue_full")
            raise QueueFull(self.retry_after_s())
        now = self.clock()
        ticket = Ticket(id=f"t{next(self._ids)}", kind=kind, enqueued_at=now)
        self._waiting[ticket.id] = ticket
        dispatched = self._dispatched
        self._dispatch()
        if self._dispatched == dispatched and self._tail is not None and not self._refresh_pending:
            # Joining the tail moves nobody else: one simulation step instead of a pass over the queue
            # (with thousands waiting, a full pass per arrival would be the gateway's main cost).
            at, sim = self._tail
            ticket.position, ticket.eta_at = len(self._waiting), now
            ticket.eta_s = max(0.0, sim.add(self.durations.expected(kind)) - (now - at))
            self._deliver(ticket)
        else:
            self.changed()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client left: drop a waiting ticket at once, or release its lease. Idempotent.

        A lease still held here never reached its worker (whoever bridges a session or sends a request
        releases the lease itself when it ends): it is ``abandoned``, not a session that ran. A lease
        whose request the worker is still finishing (``Lease.release_when_done``) is left to that.
        """
        if ticket.state == "waiting":
            self._waiting.pop(ticket.id, None)
            ticket.state = "cancelled"
            ticket.event.set()
            self.listener.on_reject("cancelled")
            self.changed()
        elif ticket.state == "assigned" and ticket.lease is not None and ticket.lease.finishing is None:
            ticket.lease.release("abandoned")

    def requeue(self, ticket: Ticket) -> None:
        """Put an assigned ticket whose worker refused it back at the head of the queue (its lease released)."""
        if ticket.lease is not None and not ticket.lease.released:
            ticket.lease.release("refused")
        ticket.state, ticket.lease, ticket.assigned_at = "waiting", None, None
        ticket.attempts += 1
        ticket.event.clear()
        # Its old status is back in the queue (what was told carries an eta_at, and eta_at only grows).
        self._told_floor = min(self._told_floor, ticket.eta_at if ticket.sent is None else ticket.sent[2])
        self._waiting[ticket.id] = ticket
        self._waiting.move_to_end(ticket.id, last=False)
        self._dispatch()
        self.changed()

    def watch(self, ticket: Ticket, sink: QueueSink) -> None:
        """Push this ticket's statuses to ``sink`` from now on (called synchronously; must not block)."""
        ticket.sink = sink
        if ticket.due:
            ticket.due = False
            self._deliver(ticket)

    def _deliver(self, ticket: Ticket) -> None:
        """Hand a due status (the latest computed) to the ticket's sink, or wake its ``wait_update``."""
        if ticket.sink is None:
            ticket.due = True
            ticket.event.set()
            return
        first = ticket.sent is None
        ticket.sent = (ticket.position, ticket.eta_s, ticket.eta_at)
        try:
            ticket.sink(ticket.position, ticket.eta_s, len(self._waiting), first)
        except Exception:  # one broken client must not stop the others' updates
            log.exception("queue status sink failed for %s", ticket.id)

    async def wait_assigned(self, ticket: Ticket) -> Lease:
        """Wait until the ticket holds a lease whose worker is done with its previous session; raise
        ``QueueTimeout`` or ``TicketCancelled`` if it never will."""
        while True:
            if ticket.state == "assigned" and ticket.lease is not None:
                await ticket.lease.settled()
                return ticket.lease
            if ticket.state == "expired":
                raise QueueTimeout(f"no worker within {self.request_timeout:g} s")
            if ticket.state == "cancelled":
                raise TicketCancelled("the ticket was cancelled")
            ticket.event.clear()
            await ticket.event.wait()

    async def wait_update(self, ticket: Ticket) -> QueueStatus | None:
        """The next status to tell the client, or None once the ticket holds a lease.

        Raises ``QueueTimeout`` or ``TicketCancelled`` when the ticket ends without a worker.
        """
        while True:
            if ticket.state == "assigned":
                return None
            if ticket.state == "expired":
                raise QueueTimeout(f"no worker within {self.request_timeout:g} s")
            if ticket.state == "cancelled":
                raise TicketCancelled("the ticket was cancelled")
            if ticket.due:
                ticket.due = False
                first = ticket.sent is None
                ticket.sent = (ticket.position, ticket.eta_s, ticket.eta_at)
                return QueueStatus(ticket.position, ticket.eta_s, len(self._waiting), first)
            ticket.event.clear()
            await ticket.event.wait()

    def tick(self, slack_s: float = 0.0) -> None:
        """Expire tickets past ``request_timeout`` and mark updates due (every ``update_interval_s``).

        ``slack_s`` is the caller's tick period: an update is marked due that much early, so that the gap
        between two updates never exceeds the interval. A tick walks only the expired tickets, and the
        queue when an update may be due: with thousands waiting it runs four times a second.
        """
        now = self.clock()
        expired = self._expired(now)
        for ticket in expired:
            del self._waiting[ticket.id]
            ticket.state = "expired"
            ticket.event.set()
            self.listener.on_reject("queue_timeout")
        limit = self.update_interval_s - slack_s
        due = self._due(now, limit) if now - self._told_floor >= limit else []
        if expired or due:
            self.refresh()  # the due updates must carry fresh ETAs
        for ticket in due:
            # refresh() may have just sent it (or marked it due) on a change
            if ticket.state == "waiting" and not ticket.due and ticket.sent and now - ticket.sent[2] >= limit:
                self._tell(ticket)
        self._flush_tells()

    def _expired(self, now: float) -> list[Ticket]:
        """The waiting tickets past ``request_timeout``, from the head until the first that is not.

        Tickets handed back by a refusing worker sit at the head in any order; behind them the others
        wait in the order they came (and were stamped), so the first young one ends the search.
        """
        expired = []
        for ticket in self._waiting.values():
            if now - ticket.enqueued_at >= self.request_timeout:
                expired.append(ticket)
            elif not ticket.attempts:
                break
        return expired

    def _due(self, now: float, limit: float) -> list[Ticket]:
        """The watched tickets last told ``limit`` or more ago; resets ``_told_floor``.

        The floor is a time no waiting ticket's next due check can be earlier than: what a ticket is told
        carries its ``eta_at``, which only grows, and a due ticket is about to be told at ``now``. Until
        ``limit`` after it, ``tick`` need not walk the queue.
        """
        due, floor = [], now
        for ticket in self._waiting.values():
            sent = ticket.sent
            if sent is None or ticket.due:  # the next one told carries eta_at or later
                floor = min(floor, ticket.eta_at)
            elif now - sent[2] >= limit:
                due.append(ticket)
            else:
                floor = min(floor, sent[2])
        self._told_floor = floor
        return due

    # ------------------------------------------------------------------ ETA

    def _loads(self, now: float) -> list[WorkerLoad]:
        loads = []
        for w in self.workers:
            if w.lease is None:
                loads.append(WorkerLoad(w.healthy))
            else:
                expected = self.durations.expected(w.lease.ticket.kind)
                loads.append(WorkerLoad(w.healthy, expected, now - w.lease.started_at))
        return loads

    def refresh(self) -> None:
        """Recompute every waiting ticket's position and ETA; wake the ones whose client must hear of it."""
        self._refresh_pending = False
        now = self.clock()
        sim = DispatchSimulation(self._loads(now))
        expected: dict[str, float] = {}
        # One pass, simulating and telling as it goes: the head of the queue hears first, and nobody waits
        # for the ETAs of those behind them. This loop runs for every waiting client on every dispatch.
        told = 0
        for position, ticket in enumerate(list(self._waiting.values()), start=1):
            duration = expected.get(ticket.kind)
            if duration is None:
                duration = expected[ticket.kind] = self.durations.expected(ticket.kind)
            eta = sim.add(duration)
            ticket.position, ticket.eta_s, ticket.eta_at = position, eta, now
            if ticket.due or ticket.telling:
                continue
            sent = ticket.sent
            if (
                sent is None
                or position != sent[0]
                or abs((now + eta) - (sent[2] + sent[1])) > max(ETA_CHANGE_S, ETA_CHANGE_FRACTION * eta)
            ):
                if told < TELL_SLICE and not self._to_tell:
                    self._deliver(ticket)
                    told += 1
                else:
                    self._tell(ticket)
        self._tail = (now, sim)
        # The rest (and those queued before this pass) on later turns once this one has told its slice;
        # without a loop, now.
        if told < TELL_SLICE or not self._schedule_flush():
            self._flush_tells()

    def _tell(self, ticket: Ticket) -> None:
        """Queue the ticket to hear its latest status on a later slice (once, however often asked)."""
        if not ticket.telling:
            ticket.telling = True
            self._to_tell.append(ticket)

    def _flush_tells(self) -> None:
        """Tell up to ``TELL_SLICE`` queued tickets their latest status; the rest on later loop turns.

        Oldest first, so nobody starves however often the queue changes. A status told here may be one
        change old (a dispatch whose refresh has not run yet): the refresh then tells the newer, lower one.
        """
        while self._to_tell:
            for _ in range(min(TELL_SLICE, len(self._to_tell))):
                ticket = self._to_tell.popleft()
                ticket.telling = False
                if ticket.state == "waiting" and not ticket.due:
                    self._deliver(ticket)
            if not self._to_tell:
                return
            if self._schedule_flush():
                return

    def _schedule_flush(self) -> bool:
        """Flush the rest on the next loop turn; False when no loop runs (then the caller goes on now)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False  # no loop (tests, tools): nothing else to let through
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._scheduled_flush)
        return True

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush_tells()

    def eta_for_new(self, kind: str) -> float:
        """Seconds a request of ``kind`` submitted now would wait for a worker."""
        sim = DispatchSimulation(self._loads(self.clock()))
        for ticket in self._waiting.values():
            sim.add(self.durations.expected(ticket.kind))
        return sim.add(self.durations.expected(kind))

    def retry_after_s(self) -> float:
        """When a full queue should have room: the head ticket's ETA, in whole seconds, at least 1."""
        head = next(iter(self._waiting.values()), None)
        if head is None:
            return 1.0
        eta = ticket_etas(self._loads(self.clock()), [self.durations.expected(head.kind)])[0]
        return float(min(3600, max(1, math.ceil(eta))))

    def changed(self) -> None:
        """Something moved (a worker, a ticket, the expected durations): refresh the ETAs soon, once."""
        self._tail = None
        # Coalesce bursts (a release dispatches and changes every position at once) into one refresh.
        if self._refresh_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.refresh()
            return
        self._refresh_pending = True
        loop.call_soon(self.refresh)

    # ------------------------------------------------------------------ dispatch

    def _pick_worker(self) -> Worker | None:
        free = [w for w in self.workers if w.available]
        # Least recently used first spreads sessions (and wear) over the workers.
        return min(free, key=lambda w: (w.last_used, w.index)) if free else None

    def _dispatch(self) -> None:
        while self._waiting:
            worker = self._pick_worker()
            if worker is None:
                return
            _, ticket = self._waiting.popitem(last=False)
            now = self.clock()
            lease = Lease(self, ticket, worker, now)
            worker.lease = lease
            worker.sessions += 1
            self._dispatched += 1
            ticket.state, ticket.lease, ticket.assigned_at = "assigned", lease, now
            ticket.dispatch_seq = self._dispatched
            ticket.event.set()
            self.listener.on_dispatch(ticket)

    def _release(self, lease: Lease, outcome: Outcome, settling: asyncio.Future[Any] | None = None) -> bool:
        if lease.outcome is not None:
            return False
        lease.outcome = outcome
        now = self.clock()
        worker = lease.worker
        if worker.lease is lease:
            worker.lease = None
            worker.settling = settling
        worker.last_used = now
        if worker.status in ("busy", "paused"):
            worker.status = "idle"  # we ended its session; do not wait for the next health check to say so
        duration = now - lease.started_at
        if outcome in OBSERVED_OUTCOMES:
            self.durations.observe(lease.ticket.kind, duration)
        self.listener.on_release(lease, outcome, duration)
        if outcome == "worker_lost":
            self.mark_down(worker, "its session socket dropped")
        self._dispatch()
        self.changed()
        return True

    # ------------------------------------------------------------------ worker health

    def mark_down(self, worker: Worker, reason: str) -> None:
        """Take a worker out at once (connection refused, socket dropped); its session's lease is lost."""
        if worker.healthy:
            log.warning("worker %d (%s) out of the pool: %s", worker.index, worker.address, reason)
        worker.healthy, worker.status, worker.last_error = False, "down", reason
        if worker.lease is not None:
            worker.lease.lost.set()
        self.changed()

    def note_health_failure(self, worker: Worker, reason: str) -> None:
        """A health check failed without a refused connection; several in a row take the worker out."""
        worker.failures += 1
        worker.last_error = reason
        if worker.failures >= MAX_HEALTH_FAILURES:
            self.mark_down(worker, f"{worker.failures} failed health checks: {reason}")

    def mark_health(self, worker: Worker, status: str, restarts: int | None = None) -> None:
        """Apply a /health answer; a worker that can serve again rejoins the pool."""
        worker.failures = 0
        if restarts is not None:
            worker.restarts = restarts
        now = self.clock()
        if (
            status in ("busy", "paused")
            and worker.lease is None
            and now - worker.last_used > TEARDOWN_GRACE_S
        ):
            status = "busy_external"  # serving someone who bypassed the gateway: not ours to hand out
        was = worker.healthy
        worker.status = status
        worker.healthy = status in SERVING_STATES
        if worker.healthy and not was:
            log.info("worker %d (%s) in the pool (%s)", worker.index, worker.address, status)
            worker.last_error = None
            self._dispatch()
            self.changed()
        elif was and not worker.healthy:
            log.warning("worker %d (%s) cannot serve: %s", worker.index, worker.address, status)
            self.changed()

    def mark_refusing(self, worker: Worker, status: str) -> None:
        """A worker refused a session we assigned (busy or not ready): out until /health says it can serve."""
        worker.healthy, worker.status = False, status
        self.changed()

    # ------------------------------------------------------------------ views

    def describe(self, *, max_tickets: int = 100) -> dict[str, Any]:
        """JSON view for ``/api/queue`` and ``/health``."""
        now = self.clock()
        workers = []
        for w in self.workers:
            entry: dict[str, Any] = {
                "index": w.index,
                "address": w.address,
                "state": ("paused" if w.lease.paused else "busy") if w.lease and w.healthy else w.status,
                "healthy": w.healthy,
                "busy": w.lease is not None,
                "restarts": w.restarts,
                "sessions": w.sessions,
            }
            if w.lease is not None:
                entry.update(
                    type=w.lease.ticket.kind,
                    elapsed_s=round(now - w.lease.started_at, 3),
                    expected_s=round(self.durations.expected(w.lease.ticket.kind), 3),
                )
            if w.last_error:
                entry["last_error"] = w.last_error
            workers.append(entry)
        tickets = [
            {
                "position": t.position,
                "type": t.kind,
                "eta_s": round(t.eta_s, 3),
                "waited_s": round(now - t.enqueued_at, 3),
            }
            for t in itertools.islice(self._waiting.values(), max_tickets)
        ]
        return {
            "workers": workers,
            "healthy": sum(w.healthy for w in self.workers),
            "busy": sum(w.lease is not None for w in self.workers),
            "queued": len(self._waiting),
            "max_queue_size": self.max_queue_size,
            "dispatched": self._dispatched,
            "queue": tickets,
        }
