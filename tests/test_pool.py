"""The gateway queue with a fake clock: FIFO dispatch, one session per worker, release exactly once,
cancel/timeout/full, health transitions, and queue updates on change and when due."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.scheduling.eta import DurationModel, EtaSettings
from core.scheduling.pool import (
    MAX_HEALTH_FAILURES,
    TEARDOWN_GRACE_S,
    TELL_SLICE,
    Lease,
    Pool,
    PoolListener,
    QueueFull,
    QueueSink,
    QueueStatus,
    QueueTimeout,
    Ticket,
    TicketCancelled,
)


def statuses(hear: Callable[[QueueStatus], object]) -> QueueSink:
    """A sink that hands ``hear`` each status as one QueueStatus."""
    return lambda *status: hear(QueueStatus(*status)) and None


BASE = {"chat": 10.0, "streaming": 20.0, "audio_duplex": 60.0, "transcribe": 5.0, "speech": 5.0}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder(PoolListener):
    def __init__(self) -> None:
        self.releases: list[tuple[str, str]] = []
        self.leases: list[Lease] = []  # kept alive so that id() stays unique
        self.rejects: list[str] = []

    def on_release(self, lease: Lease, outcome: str, duration_s: float) -> None:  # type: ignore[override]
        self.releases.append((lease.ticket.id, outcome))
        self.leases.append(lease)

    def on_reject(self, reason: str) -> None:
        self.rejects.append(reason)


def make_pool(
    n_workers: int = 2,
    *,
    healthy: bool = True,
    max_queue: int = 100,
    timeout: float = 300.0,
    min_samples: int = 3,
) -> tuple[Pool, FakeClock, Recorder]:
    clock, rec = FakeClock(), Recorder()
    durations = DurationModel(EtaSettings(BASE, alpha=0.5, min_samples=min_samples))
    pool = Pool(
        [f"127.0.0.1:{22400 + i}" for i in range(n_workers)],
        durations,
        max_queue_size=max_queue,
        request_timeout=timeout,
        update_interval_s=3.0,
        clock=clock,
        listener=rec,
    )
    if healthy:
        for w in pool.workers:
            pool.mark_health(w, "idle")
    return pool, clock, rec


def check_invariants(pool: Pool) -> None:
    leases = [w.lease for w in pool.workers if w.lease is not None]
    for w in pool.workers:
        if w.lease is not None:
            assert w.lease.worker is w and not w.lease.released and w.lease.ticket.state == "assigned"
    assert len({id(lease.ticket) for lease in leases}) == len(leases), "a ticket holds two workers"
    assert all(t.state == "waiting" for t in pool.waiting())
    if pool.queue_length:
        assert not any(w.available for w in pool.workers), "a worker idles while tickets wait"


def test_fifo_one_session_per_worker_and_next_ticket_on_release() -> None:
    pool, clock, _ = make_pool(2)
    tickets = [pool.submit("chat") for _ in range(5)]
    assert [t.state for t in tickets] == ["assigned", "assigned", "waiting", "waiting", "waiting"]
    first, second = tickets[0].lease, tickets[1].lease
    assert first is not None and second is not None and first.worker is not second.worker
    clock.advance(4)
    assert second.release("completed")
    third = tickets[2].lease
    assert tickets[2].state == "assigned" and third is not None and third.worker is second.worker
    assert tickets[2].waited_s == pytest.approx(4.0)
    first.release("client_left")
    third.release("completed")
    assert [t.dispatch_seq for t in tickets] == [1, 2, 3, 4, 5]
    check_invariants(pool)


def test_release_happens_exactly_once() -> None:
    pool, clock, rec = make_pool(1, min_samples=1)
    a, b, c = pool.submit("chat"), pool.submit("chat"), pool.submit("chat")
    assert a.lease is not None
    clock.advance(2)
    assert a.lease.release("completed") is True
    assert a.lease.release("worker_lost") is False  # a late second report changes nothing
    pool.cancel(a)  # and neither does the client leaving afterwards
    assert rec.releases == [(a.id, "completed")]
    assert pool.durations.samples("chat") == 1 and pool.durations.expected("chat") == 2.0
    assert b.state == "assigned" and c.state == "waiting"  # exactly one next ticket got the worker
    assert pool.workers[0].healthy
    check_invariants(pool)


def test_durations_feed_only_from_sessions_that_ran_their_course() -> None:
    pool, clock, _ = make_pool(1, min_samples=1)
    for outcome in ("worker_lost", "refused", "error"):
        pool.mark_health(pool.workers[0], "idle")
        t = pool.submit("transcribe")
        clock.advance(1)
        assert t.lease is not None
        t.lease.release(outcome)  # type: ignore[arg-type]
    assert pool.durations.samples("transcribe") == 0


async def test_queue_status_positions_and_etas() -> None:
    pool, clock, _ = make_pool(2)
    pool.submit("chat")
    clock.advance(4)
    pool.submit("audio_duplex")
    waiting = [pool.submit("chat") for _ in range(3)]
    pool.refresh()
    statuses = [await pool.wait_update(t) for t in waiting]
    assert [(s.position, s.eta_s, s.queue_length, s.first) for s in statuses if s] == [
        (1, pytest.approx(6.0), 3, True),  # chat worker frees at 10 - 4
        (2, pytest.approx(16.0), 3, True),  # then the same worker again
        (3, pytest.approx(26.0), 3, True),
    ]
    assert not any(t.due for t in waiting)  # nothing new to say


async def test_update_on_change_and_at_least_every_interval() -> None:
    pool, clock, _ = make_pool(1)
    first = pool.submit("chat")
    t = pool.submit("chat")
    pool.refresh()
    assert (await pool.wait_update(t)).position == 1  # type: ignore[union-attr]
    clock.advance(1.0)
    pool.refresh()
    pool.tick(slack_s=0.25)
    assert not t.due  # same position, ETA consistent with the clock: nothing to say yet
    clock.advance(1.8)
    pool.tick(slack_s=0.25)  # 2.8 s since the last update >= 3 - 0.25: due
    status = await pool.wait_update(t)
    assert status is not None and not status.first and status.eta_s == pytest.approx(10 - 2.8)
    clock.advance(20)  # the running session overruns its expected 10 s: ETA jumps -> change
    pool.refresh()
    assert t.due
    await pool.wait_update(t)
    assert first.lease is not None
    first.lease.release("completed")
    assert await pool.wait_update(t) is None  # assigned


async def test_cancel_while_waiting_frees_the_ticket_at_once_and_moves_the_others_up() -> None:
    pool, _, rec = make_pool(1)
    pool.submit("chat")
    a, b = pool.submit("chat"), pool.submit("chat")
    pool.refresh()
    assert (await pool.wait_update(b)).position == 2  # type: ignore[union-attr]
    pool.cancel(a)
    assert pool.queue_length == 1 and "cancelled" in rec.rejects
    with pytest.raises(TicketCancelled):
        await pool.wait_update(a)
    pool.refresh()
    assert (await pool.wait_update(b)).position == 1  # type: ignore[union-attr]
    pool.cancel(a)  # idempotent
    assert pool.queue_length == 1


def test_cancel_after_assignment_releases_the_worker() -> None:
    pool, _, rec = make_pool(1)
    a, b = pool.submit("chat"), pool.submit("chat")
    pool.cancel(a)  # the client left before its session started: the lease is abandoned
    assert rec.releases == [(a.id, "abandoned")] and b.state == "assigned"


@pytest.mark.parametrize(
    ("end", "outcome", "moves_eta"),
    [
        # ran on the worker: its duration is what the next one can expect
        ("completed", "completed", True),
        ("client_left", "client_left", True),  # left mid-session, or while the worker ran its request
        # never ran: a client gone while routed, while its worker socket opened, before its request was sent
        ("cancel", "abandoned", False),  # Pool.cancel of an assigned ticket (the gateway session's way)
        ("abandoned", "abandoned", False),  # released by the caller itself (worker_calls' way)
        ("worker_lost", "worker_lost", False),
        ("refused", "refused", False),
        ("error", "error", False),
    ],
)
def test_only_leases_that_ran_move_the_eta(end: str, outcome: str, moves_eta: bool) -> None:
    # Clients that connect and leave at once hold a lease for next to nothing: six of them, were they
    # observed, would take the expected duration from the 60 s baseline to 0.2 s.
    pool, clock, rec = make_pool(1, min_samples=3)
    for _ in range(6):
        t = pool.submit("audio_duplex")
        clock.advance(0.2)
        assert t.lease is not None
        if end == "cancel":
            pool.cancel(t)
        else:
            t.lease.release(end)  # type: ignore[arg-type]
        pool.mark_health(pool.workers[0], "idle")  # back after worker_lost
    assert {o for _, o in rec.releases} == {outcome}
    busy = pool.submit("audio_duplex")  # starts now; the next one waits for it
    assert busy.lease is not None
    expected = 0.2 if moves_eta else BASE["audio_duplex"]
    assert pool.durations.samples("audio_duplex") == (6 if moves_eta else 0)
    assert pool.durations.expected("audio_duplex") == pytest.approx(expected)
    assert pool.eta_for_new("audio_duplex") == pytest.approx(expected)


def test_full_queue_raises_with_retry_after_from_the_head_eta() -> None:
    pool, clock, rec = make_pool(1, max_queue=2)
    pool.submit("chat")  # on the worker
    clock.advance(2.5)
    pool.submit("chat")
    pool.submit("chat")
    with pytest.raises(QueueFull) as err:
        pool.submit("chat")
    assert err.value.retry_after_s == 8.0  # ceil(10 - 2.5)
    assert rec.rejects == ["queue_full"] and pool.queue_length == 2


async def test_wait_past_request_timeout_ends_with_queue_timeout() -> None:
    pool, clock, rec = make_pool(1, timeout=30)
    pool.submit("chat")
    early, late = pool.submit("chat"), None
    clock.advance(10)
    late = pool.submit("chat")
    clock.advance(20)
    pool.tick()
    assert early.state == "expired" and late.state == "waiting"
    with pytest.raises(QueueTimeout):
        await pool.wait_update(early)
    assert rec.rejects == ["queue_timeout"] and pool.queue_length == 1


def test_refused_tickets_at_the_head_expire_whatever_their_order() -> None:
    # Refused tickets go back to the head in refusal order, not arrival order: the older one behind a
    # younger one must still expire (the search for expired tickets may stop only behind them).
    pool, clock, rec = make_pool(2, timeout=30)
    old = pool.submit("chat")
    clock.advance(20)
    young = pool.submit("chat")
    behind = pool.submit("chat")
    for ticket in (old, young):
        assert ticket.lease is not None
        pool.mark_refusing(ticket.lease.worker, "not_ready")
        pool.requeue(ticket)
    assert [t.id for t in pool.waiting()] == [young.id, old.id, behind.id]
    clock.advance(15)
    pool.tick()
    assert (old.state, young.state, behind.state) == ("expired", "waiting", "waiting")
    assert rec.rejects == ["queue_timeout"]


def test_a_refused_ticket_hears_its_periodic_update_on_time() -> None:
    # A refused ticket comes back with the status it was told before its dispatch, older than what the
    # others in the queue were told: the tick must not skip it.
    pool, clock, _ = make_pool(2)
    _, b = pool.submit("chat"), pool.submit("chat")  # both workers busy until 1010
    clock.advance(1.0)
    told: list[float] = []
    ticket = pool.submit("chat")
    pool.watch(ticket, statuses(lambda status: told.append(clock.now)))  # position 1, starts at 1010
    assert told == [1001.0]
    clock.advance(0.5)
    assert b.lease is not None
    b.lease.release("completed")
    assert ticket.lease is not None
    clock.advance(0.5)
    other = pool.submit("chat")
    pool.watch(other, statuses(lambda status: None))  # told at 1002
    clock.advance(0.5)
    pool.tick()  # nothing due yet
    clock.advance(0.5)
    pool.mark_refusing(ticket.lease.worker, "not_ready")
    pool.requeue(ticket)  # back at the head, to start at 1010 as it was told at 1001: nothing new to tell
    assert told == [1001.0] and ticket.position == 1
    clock.advance(1.2)  # 3.2 s since it was told, 2.2 s since the other was
    pool.tick()
    assert told == [1001.0, 1004.2]


@pytest.mark.parametrize("close_ends", ["done", "failed", "cancelled"])
async def test_the_queue_moves_at_once_while_the_last_session_closes(close_ends: str) -> None:
    pool, _, _ = make_pool(1)
    first, nxt, behind = pool.submit("chat"), pool.submit("chat"), pool.submit("chat")
    told: list[int] = []
    pool.watch(behind, statuses(lambda status: told.append(status.position)))
    closing: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    await asyncio.sleep(0)
    assert first.lease is not None and told == [2]
    releasing = asyncio.create_task(first.lease.release_while_closing("client_left", closing))
    await asyncio.sleep(0)  # (the release runs in that task's first step)
    assert nxt.state == "assigned" and pool.queue_length == 1  # the queue moved at once...
    await asyncio.sleep(0)  # (the refresh runs on the next loop turn)
    assert told == [2, 1]  # ...and the waiting client heard it
    waiter = asyncio.create_task(pool.wait_assigned(nxt))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()  # but the next session uses the worker only once the last one has closed
    if close_ends == "done":
        closing.set_result(None)
    elif close_ends == "failed":
        closing.set_exception(ConnectionError("the worker dropped the connection while closing"))
    else:
        closing.cancel()
    assert await asyncio.wait_for(waiter, 1) is nxt.lease
    (ended,) = await asyncio.gather(releasing, return_exceptions=True)  # the close's own outcome, passed on
    expected = {"done": type(None), "failed": ConnectionError, "cancelled": asyncio.CancelledError}
    assert isinstance(ended, expected[close_ends])
    assert nxt.lease is not None
    nxt.lease.release("completed")  # without a close under way, the next is ready at once
    assert await asyncio.wait_for(pool.wait_assigned(behind), 1) is behind.lease


async def test_dead_worker_loses_its_lease_and_rejoins_when_healthy() -> None:
    pool, _, rec = make_pool(2)
    a, b = pool.submit("audio_duplex"), pool.submit("audio_duplex")
    c = pool.submit("audio_duplex")
    assert a.lease and b.lease
    w0 = a.lease.worker
    pool.mark_down(w0, "connection refused")
    assert a.lease.lost.is_set() and not b.lease.lost.is_set()
    a.lease.release("worker_lost")  # the bridge reports the loss
    assert c.state == "waiting", "a down worker must not take the next ticket"
    assert not w0.available and w0.status == "down"
    pool.mark_health(w0, "loading")
    assert c.state == "waiting"
    pool.mark_health(w0, "idle", restarts=1)
    assert c.state == "assigned" and c.lease is not None and c.lease.worker is w0 and w0.restarts == 1
    assert rec.releases == [(a.id, "worker_lost")]
    check_invariants(pool)


def test_health_failures_take_a_worker_out_only_after_several() -> None:
    pool, _, _ = make_pool(1)
    w = pool.workers[0]
    for _ in range(MAX_HEALTH_FAILURES - 1):
        pool.note_health_failure(w, "timeout")
    assert w.healthy
    pool.note_health_failure(w, "timeout")
    assert not w.healthy
    pool.mark_health(w, "idle")
    assert w.healthy and w.failures == 0


def test_a_worker_busy_outside_the_gateway_is_not_handed_out() -> None:
    pool, clock, _ = make_pool(1)
    w = pool.workers[0]
    t = pool.submit("chat")
    assert t.lease is not None
    t.lease.release("completed")
    pool.mark_health(w, "busy")  # right after our release: still tearing down our session
    assert w.available
    clock.advance(TEARDOWN_GRACE_S + 1)
    pool.mark_health(w, "busy")  # nobody of ours on it: someone bypassed the gateway
    assert not w.available and w.status == "busy_external"
    waiting = pool.submit("chat")
    assert waiting.state == "waiting"
    pool.mark_health(w, "idle")
    assert waiting.state == "assigned"


def test_refused_ticket_goes_back_to_the_head_of_the_queue() -> None:
    pool, _, rec = make_pool(2)
    a, b = pool.submit("chat"), pool.submit("chat")
    c, d = pool.submit("chat"), pool.submit("chat")
    assert a.lease is not None
    w = a.lease.worker
    pool.mark_refusing(w, "not_ready")
    pool.requeue(a)
    assert rec.releases == [(a.id, "refused")]
    assert [t.id for t in pool.waiting()] == [a.id, c.id, d.id] and a.attempts == 1
    assert b.lease is not None
    b.lease.release("completed")
    assert a.state == "assigned"  # head of the queue first
    check_invariants(pool)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["submit", "cancel", "release", "lost", "down", "up", "refuse", "tick"]),
        st.integers(0, 50),
        st.floats(0, 5),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_random_operations_never_leak_tickets_or_workers(ops: list[tuple[str, int, float]]) -> None:
    pool, clock, rec = make_pool(3, max_queue=20, timeout=15)
    tickets: list[Ticket] = []
    for op, n, dt in ops:
        clock.advance(dt)
        assigned = [t for t in tickets if t.state == "assigned" and t.lease and not t.lease.released]
        if op == "submit":
            try:
                tickets.append(pool.submit("chat"))
            except QueueFull:
                assert pool.queue_length == 20
            else:
                if n % 2:  # half the clients take pushed statuses
                    pool.watch(tickets[-1], statuses(lambda status: None))
        elif op == "cancel" and tickets:
            pool.cancel(tickets[n % len(tickets)])
        elif op == "release" and assigned:
            assigned[n % len(assigned)].lease.release("completed")  # type: ignore[union-attr]
        elif op == "lost" and assigned:
            lease = assigned[n % len(assigned)].lease
            assert lease is not None
            pool.mark_down(lease.worker, "gone")
            lease.release("worker_lost")
        elif op == "down":
            pool.mark_down(pool.workers[n % 3], "refused")
        elif op == "up":
            pool.mark_health(pool.workers[n % 3], "idle")
        elif op == "refuse" and assigned:
            t = assigned[n % len(assigned)]
            assert t.lease is not None
            pool.mark_refusing(t.lease.worker, "busy_external")
            pool.requeue(t)
        elif op == "tick":
            pool.tick()
            # Whatever the tick skipped walking: nobody waits past the timeout or unheard past the interval.
            for t in pool.waiting():
                assert clock.now - t.enqueued_at < 15
                if t.sink is not None and t.sent is not None:
                    assert clock.now - t.sent[2] < pool.update_interval_s
        check_invariants(pool)
    # Every lease ever handed out is released at most once; dispatch followed arrival order.
    assert len(rec.leases) == len({id(lease) for lease in rec.leases})
    if not any(t.attempts for t in tickets):
        seqs = [t.dispatch_seq for t in sorted(tickets, key=lambda t: int(t.id[1:])) if t.dispatch_seq]
        assert seqs == sorted(seqs)
    # Cancelling every waiting ticket, then releasing every lease, frees every worker.
    for t in list(pool.waiting()):
        pool.cancel(t)
    for t in tickets:
        if t.state == "assigned" and t.lease:
            t.lease.release("completed")
    assert pool.queue_length == 0 and all(w.lease is None for w in pool.workers)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(BASE)), st.floats(0, 0.3)), min_size=1, max_size=30))
def test_a_ticket_joining_the_tail_costs_one_step_and_gets_the_eta_of_a_full_pass(
    arrivals: list[tuple[str, float]],
) -> None:
    pool, clock, _ = make_pool(2)
    pool.submit("audio_duplex")
    pool.submit("chat")  # both workers busy; no session overruns within these 9 s
    full_passes = 0
    full_refresh = pool.refresh

    def counting_refresh() -> None:
        nonlocal full_passes
        full_passes += 1
        full_refresh()

    pool.refresh = counting_refresh  # type: ignore[method-assign]
    heard: list[str] = []
    for i, (kind, dt) in enumerate(arrivals, start=1):
        clock.advance(dt)
        before = full_passes
        predicted = pool.eta_for_new(kind)
        t = pool.submit(kind)
        assert t.eta_s == pytest.approx(predicted, abs=1e-9)  # the wait the job API quotes before a submit
        pool.watch(t, statuses(lambda s, t=t: heard.append(f"{t.id}@{s.position}")))
        assert heard[-1] == f"{t.id}@{pool.queue_length}"  # told at once, at the tail
        position, eta = t.position, t.eta_s
        if i > 1:  # the first arrival builds the simulation; later ones only extend it
            assert full_passes == before
        full_refresh()  # a full pass agrees, and has nothing new to tell anyone
        assert (t.position, t.eta_s) == (position, pytest.approx(eta, abs=1e-9))
        assert len(heard) == i


async def _settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


async def test_a_long_queue_is_told_in_slices_that_let_other_work_through() -> None:
    pool, _, _ = make_pool(1, max_queue=5000)
    running = pool.submit("chat")
    n = 3 * TELL_SLICE + 10
    heard: list[tuple[int, int]] = []
    tickets = [pool.submit("chat") for _ in range(n)]
    for i, t in enumerate(tickets):
        pool.watch(t, statuses(lambda s, i=i: heard.append((i, s.position))))
    await _settle()
    assert sorted(heard) == [(i, i + 1) for i in range(n)]
    heard.clear()
    assert running.lease is not None
    running.lease.release("completed")  # everyone moves up; ticket 0 is served
    loop = asyncio.get_running_loop()
    seen_by_other_work: list[int] = []
    loop.call_soon(lambda: seen_by_other_work.append(len(heard)))  # a live frame, queued behind the refresh
    await _settle()
    assert seen_by_other_work == [TELL_SLICE]  # it ran after the first slice, not after everyone
    assert heard == [(i, i) for i in range(1, n)]  # head first, each told once, its new place


async def test_nobody_starves_and_nobody_moves_back_when_the_queue_changes_every_turn() -> None:
    pool, _, _ = make_pool(1, max_queue=5000)
    pool.submit("chat")
    n = 4 * TELL_SLICE
    heard: dict[int, list[int]] = {i: [] for i in range(n)}
    tickets = [pool.submit("chat") for _ in range(n)]
    for i, t in enumerate(tickets):
        pool.watch(t, statuses(lambda s, i=i: heard[i].append(s.position)))
    await _settle()
    for _ in range(
        2 * TELL_SLICE // 16
    ):  # a dispatch on every loop turn, for longer than a full telling takes
        lease = next(w.lease for w in pool.workers if w.lease is not None)
        lease.release("completed")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    await _settle()
    for i, t in enumerate(tickets):
        assert heard[i] == sorted(heard[i], reverse=True), f"ticket {i} moved back: {heard[i]}"
        if t.state == "waiting":
            assert heard[i][-1] == t.position  # the last word is the truth
            assert len(heard[i]) > 2  # the tail heard of the moves too, not only at the end


def test_without_an_event_loop_everyone_is_told_at_once() -> None:
    pool, _, _ = make_pool(1, max_queue=5000)
    running = pool.submit("chat")
    tickets = [pool.submit("chat") for _ in range(2 * TELL_SLICE + 3)]
    heard: list[int] = []
    for t in tickets:
        pool.watch(t, statuses(lambda s: heard.append(s.position)))
    heard.clear()
    assert running.lease is not None
    running.lease.release("completed")
    assert heard == list(range(1, len(tickets)))


async def test_watched_tickets_get_statuses_pushed_without_waking_anyone() -> None:
    pool, clock, _ = make_pool(1)
    running = pool.submit("chat")
    t = pool.submit("chat")
    pushed: list[tuple[int, float, bool]] = []
    pool.refresh()  # the first status is due before anyone watches: delivered on watch
    pool.watch(t, statuses(lambda s: pushed.append((s.position, round(s.eta_s, 3), s.first))))
    assert pushed == [(1, 10.0, True)]
    behind = pool.submit("chat")
    pool.watch(behind, statuses(lambda s: pushed.append((s.position + 100, round(s.eta_s, 3), s.first))))
    pool.refresh()
    assert pushed[-1] == (102, 20.0, True)  # a newcomer; t's status did not change: nothing for it
    clock.advance(2.0)
    pool.tick(slack_s=0.5)
    assert len(pushed) == 2  # 2 s since the last push < 3 - 0.5
    clock.advance(0.6)
    pool.tick(slack_s=0.5)
    assert pushed[2:] == [(1, 7.4, False), (102, 17.4, False)]
    pool.cancel(t)
    pool.refresh()
    assert pushed[-1] == (101, 7.4, False)  # moved up at once
    assert running.lease is not None
    running.lease.release("completed")
    assert await pool.wait_assigned(behind) is behind.lease
    pool.refresh()
    assert pushed[-1] == (101, 7.4, False)  # nothing pushed once assigned


async def test_wait_assigned_raises_when_the_ticket_ends_without_a_worker() -> None:
    pool, clock, _ = make_pool(1, timeout=5)
    pool.submit("chat")
    gone, late = pool.submit("chat"), pool.submit("chat")
    pool.cancel(gone)
    with pytest.raises(TicketCancelled):
        await pool.wait_assigned(gone)
    clock.advance(6)
    pool.tick()
    with pytest.raises(QueueTimeout):
        await pool.wait_assigned(late)


async def test_a_failing_sink_does_not_stop_the_others() -> None:
    pool, _, _ = make_pool(1)
    pool.submit("chat")
    a, b = pool.submit("chat"), pool.submit("chat")
    got: list[int] = []

    def broken(_: object) -> None:
        raise ConnectionError("client gone")

    pool.watch(a, statuses(broken))
    pool.watch(b, statuses(lambda s: got.append(s.position)))
    pool.refresh()
    assert got == [2]


async def test_a_failing_sink_in_a_later_slice_does_not_stop_the_others() -> None:
    pool, _, _ = make_pool(1, max_queue=1000)
    pool.submit("chat")
    tickets = [pool.submit("chat") for _ in range(TELL_SLICE + 40)]
    heard: list[int] = []

    def broken(_: object) -> None:
        raise ConnectionError("client gone")

    for i, t in enumerate(tickets):
        pool.watch(t, statuses(broken if i == TELL_SLICE + 10 else lambda s: heard.append(s.position)))
    pool.refresh()
    await asyncio.sleep(0)  # the tells past the first slice
    assert len(heard) == len(tickets) - 1
    heard.clear()
    lease = pool.workers[0].lease
    assert lease is not None
    lease.release("completed")  # everyone moves up: all but the first slice are told on later loop turns
    for _ in range(4):  # the refresh, then the rest of the tells a slice per turn
        await asyncio.sleep(0)
    assert heard == [p for p in range(1, len(tickets)) if p != TELL_SLICE + 10]
