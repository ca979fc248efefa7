"""Blocking model calls off the event loop: one worker thread per device, and async helpers to use it.

A device runs one model call at a time (a GPU stream, or the CPU threads torch already uses), so every
model of a device shares one thread, and the LLM's tokens and the TTS's audio chunks of the same reply
interleave on it.

:func:`iterate_in_executor` runs a blocking generator as a *pump*: an executor job that advances it and
posts each item to the loop as soon as it exists, without waiting for the loop to ask for the next one
(a round trip per item costs two thread wake-ups, which on a busy machine is milliseconds per token).
The job hands the thread back after each item when another job waits for the device (so a TTS chunk
gets in between two LLM tokens) or when the consumer is ``prefetch`` items behind, and is resubmitted
when the consumer catches up. Cancelling the consumer stops the pump between two items and closes the
generator on the executor, never concurrently with a ``next()`` in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

_executors: dict[str, ThreadPoolExecutor] = {}
_lock = threading.Lock()
_END = object()


def device_executor(device: str) -> ThreadPoolExecutor:
    """The process-wide single-thread executor of ``device`` (created on first use)."""
    with _lock:
        executor = _executors.get(device)
        if executor is None:
            name = "model-" + "".join(c if c.isalnum() else "-" for c in device)
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
            _executors[device] = executor
        return executor


def shutdown_executors() -> None:
    """Stop every device thread (process exit); calls already queued still run."""
    with _lock:
        executors = list(_executors.values())
        _executors.clear()
    for executor in executors:
        executor.shutdown(wait=True)


async def run_blocking(executor: Executor | None, fn: Callable[..., T], *args: object) -> T:
    """Run ``fn(*args)`` on ``executor`` and await its result."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, fn, *args)


def _others_waiting(executor: Executor | None) -> bool:
    """Whether another job waits for this executor's thread (unknown executors: assume so)."""
    queue = getattr(executor, "_work_queue", None)
    return queue is None or not queue.empty()


def _close_quietly(iterator: Iterator[object]) -> None:
    close = getattr(iterator, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception:  # a model's cleanup failing must not hide the reason we stopped
        log.exception("closing a model stream failed")


class _Pump(Generic[T]):
    """One generator driven on an executor; messages to the loop are ("item" | "paused" | "end" | "error", value)."""

    def __init__(
        self,
        factory: Callable[[], Iterable[T]],
        executor: Executor | None,
        loop: asyncio.AbstractEventLoop,
        prefetch: int,
    ) -> None:
        self._factory, self._executor, self._loop = factory, executor, loop
        self._prefetch = max(1, prefetch)
        self.messages: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._iterator: Iterator[T] | None = None
        self._lock = threading.Lock()  # guards the three flags below
        self._active = False  # a job is running the generator
        self._stopped = False
        self._closed = False
        self.produced = 0
        self.consumed = 0  # written by the loop, read by the thread (an int: atomic)

    def submit(self) -> None:
        """Start (or resume) the pump job."""
        self._loop.run_in_executor(self._executor, self._run)

    def stop(self) -> None:
        """The consumer is gone: stop between two items and close the generator on the executor."""
        with self._lock:
            self._stopped = True
            running = self._active
        if not running:  # a running job closes it itself when it sees the flag
            with contextlib.suppress(RuntimeError):  # executor or loop already shut down
                self._loop.run_in_executor(self._executor, self._close_if_idle)

    def _run(self) -> None:
        with self._lock:
            if self._stopped:
                self._close_locked()
                return
            self._active = True
        try:
            outcome: tuple[str, Any] = self._produce()
        except Exception as exc:  # the model's error goes to the consumer, where it is handled
            outcome = ("error", exc)
        finally:
            with self._lock:
                self._active = False
                if self._stopped:
                    self._close_locked()
        self._post(outcome)

    def _produce(self) -> tuple[str, Any]:
        if self._iterator is None:
            self._iterator = iter(self._factory())
        while not self._stopped:
            item = next(self._iterator, _END)
            if item is _END:
                return ("end", None)
            self.produced += 1
            self._post(("item", item))
            if self.produced - self.consumed >= self._prefetch or _others_waiting(self._executor):
                return ("paused", None)
        return ("stopped", None)

    def _post(self, message: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(self.messages.put_nowait, message)

    def _close_if_idle(self) -> None:
        with self._lock:
            if not self._active:
                self._close_locked()

    def _close_locked(self) -> None:
        if not self._closed:
            self._closed = True
            if self._iterator is not None:
                _close_quietly(self._iterator)


async def iterate_in_executor(
    factory: Callable[[], Iterable[T]], executor: Executor | None, *, prefetch: int = 16
) -> AsyncGenerator[T, None]:
    """Iterate a blocking generator on ``executor`` without blocking the loop (see the module doc).

    ``factory`` runs on the executor too (model calls often do work before their first ``yield``).
    Use with ``contextlib.aclosing`` when breaking out of the loop, so the generator is closed at once.
    """
    pump = _Pump(factory, executor, asyncio.get_running_loop(), prefetch)
    pump.submit()
    finished = False
    try:
        while True:
            kind, value = await pump.messages.get()
            if kind == "item":
                pump.consumed += 1
                yield value
            elif kind == "paused":
                pump.submit()
            else:
                finished = True
                if kind == "error":
                    raise value
                return
    finally:
        if not finished:
            pump.stop()
