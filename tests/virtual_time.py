"""An asyncio event loop on a virtual clock, aware of executor threads.

``loop.time()`` is a number that only moves when nothing can run: when the loop has no ready callback,
no I/O event and no executor job in flight, it jumps straight to its next timer. A conversation that
takes 10 s of wall time runs in milliseconds, and every timestamp in it is exact and repeatable.

Model calls run on executor threads (the fakes are blocking, as the real models are). While such a job
runs, the virtual clock stands still; a fake that "takes" 0.3 s calls :meth:`VirtualTimeLoop.sleep`
from its thread, which parks the thread until the loop's clock has advanced by 0.3 s. So the thread's
work and the loop's timers interleave exactly as they would in real time, without the waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
#: Longest real wait for an executor thread before the loop looks again (it is woken earlier).
_REAL_POLL_S = 0.05


class _Pool:
    """Accounting for one executor: jobs queued, running, and running but parked in a virtual sleep."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pending = 0
        self.running = 0
        self.parked = 0

    def busy(self) -> bool:
        # A queued job only counts when a thread is free to start it: jobs queued behind a thread
        # parked in a virtual sleep wait for the clock, so they must not stop it.
        return self.running > self.parked or (self.pending > 0 and self.running < self.workers)


class _Selector(selectors.DefaultSelector):
    """The loop's selector: where the loop would block, it advances the virtual clock instead."""

    loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[Any]:
        loop = self.loop
        if loop is None or (timeout is not None and timeout <= 0):
            return super().select(timeout)
        if timeout is None or loop.threads_busy():
            # A thread is working (its completion wakes us through the self-pipe), or nothing is
            # scheduled at all: wait in real time, without moving the virtual clock.
            return super().select(_REAL_POLL_S)
        ready = super().select(0)
        if not ready:
            loop.advance(timeout)
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose ``time()`` is virtual (starts at ``start``)."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._pools: dict[Executor, _Pool] = {}
        self._local = threading.local()
        self._parked: set[threading.Event] = set()
        self._own_executor: ThreadPoolExecutor | None = None
        selector = _Selector()
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward (the selector does this when the loop is idle)."""
        self._now += max(0.0, seconds)

    def threads_busy(self) -> bool:
        """Whether an executor thread is doing (or about to do) work that is not a virtual sleep."""
        with self._lock:
            return any(pool.busy() for pool in self._pools.values())

    def run_in_executor(  # type: ignore[override]
        self, executor: Executor | None, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        if executor is None:
            if self._own_executor is None:
                self._own_executor = ThreadPoolExecutor(thread_name_prefix="virtual-time")
            executor = self._own_executor
        with self._lock:
            pool = self._pools.setdefault(executor, _Pool(getattr(executor, "_max_workers", 1)))
            pool.pending += 1
        started = threading.Event()

        def job() -> T:
            with self._lock:
                pool.pending -= 1
                pool.running += 1
                started.set()
            self._local.pool = pool
            try:
                return func(*args)
            finally:
                self._local.pool = None

        def finished(_: Future[T]) -> None:
            # Registered after wrap_future's own callback, so the loop has been told of the result
            # before the thread stops counting as busy.
            with self._lock:
                if started.is_set():
                    pool.running -= 1
                else:  # cancelled before it ran
                    pool.pending -= 1

        cfut: Future[T] = executor.submit(job)
        afut = asyncio.wrap_future(cfut, loop=self)
        cfut.add_done_callback(finished)
        return afut

    def sleep(self, seconds: float) -> None:
        """Block the calling executor thread for ``seconds`` of virtual time (a fake model's latency)."""
        if seconds <= 0:
            return
        pool: _Pool | None = getattr(self._local, "pool", None)
        if pool is None:
            if threading.get_ident() == getattr(self, "_thread_id", None):
                self.advance(seconds)  # called on the loop itself: a blocking call holds the loop that long
                return
            raise RuntimeError("VirtualTimeLoop.sleep must run in a job started by run_in_executor")
        done = threading.Event()

        def park() -> None:
            # Runs on the loop; the clock has not moved since the thread asked (the thread was busy).
            with self._lock:
                pool.parked += 1
            self.call_at(self._now + seconds, wake)

        def wake() -> None:
            with self._lock:
                pool.parked -= 1
            self._parked.discard(done)
            done.set()

        self._parked.add(done)
        self._call_threadsafe(park)
        done.wait()

    def _call_threadsafe(self, fn: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self.call_soon_threadsafe(fn)

    def close(self) -> None:
        for event in list(self._parked):
            event.set()  # release parked threads so executor shutdowns cannot hang
        super().close()
        if self._own_executor is not None:
            self._own_executor.shutdown(wait=False, cancel_futures=True)


def run(main: Coroutine[Any, Any, T], *, start: float = 0.0) -> T:
    """Run ``main`` to completion on a fresh :class:`VirtualTimeLoop` and close it."""
    loop = VirtualTimeLoop(start)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
