"""The per-device executor helpers: blocking generators iterated off the loop, closed when abandoned."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import pytest

from core.session.executor import device_executor, iterate_in_executor, run_blocking


class Probe:
    """A blocking generator that notes which thread runs it and whether it was closed."""

    def __init__(self, n: int, gate: threading.Event | None = None) -> None:
        self.n, self.gate = n, gate
        self.threads: set[str] = set()
        self.closed_on: str | None = None

    def __call__(self) -> Iterator[int]:
        try:
            for i in range(self.n):
                self.threads.add(threading.current_thread().name)
                if self.gate is not None and i == 1:
                    self.gate.wait(5)
                yield i
        finally:
            self.closed_on = threading.current_thread().name


def test_one_thread_per_device() -> None:
    assert device_executor("cuda:0") is device_executor("cuda:0")
    assert device_executor("cuda:0") is not device_executor("cuda:1")


async def test_items_come_from_the_device_thread_and_the_loop_stays_free() -> None:
    executor = device_executor("test-a")
    probe = Probe(5)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    items = [i async for i in iterate_in_executor(probe, executor)]
    task.cancel()
    assert items == [0, 1, 2, 3, 4]
    assert len(probe.threads) == 1 and next(iter(probe.threads)).startswith("model-test-a")
    assert probe.closed_on is not None and probe.closed_on.startswith("model-test-a")
    assert ticks > 0
    assert await run_blocking(executor, threading.current_thread) is not threading.current_thread()


async def test_a_cancelled_consumer_closes_the_generator_on_its_thread() -> None:
    executor = device_executor("test-b")
    gate = threading.Event()
    probe = Probe(100, gate)

    async def consume() -> None:
        async for _ in iterate_in_executor(probe, executor):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)  # the thread is now blocked inside item 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert probe.closed_on is None  # never concurrently with the next() in flight
    gate.set()
    await run_blocking(executor, lambda: None)  # the close was queued behind it
    assert probe.closed_on is not None and probe.closed_on.startswith("model-test-b")


async def test_breaking_out_closes_at_once_with_aclosing() -> None:
    probe = Probe(100)
    async with contextlib.aclosing(iterate_in_executor(probe, device_executor("test-c"))) as items:
        async for i in items:
            if i == 2:
                break
    await run_blocking(device_executor("test-c"), lambda: None)
    assert probe.closed_on is not None


async def test_errors_of_the_generator_reach_the_consumer() -> None:
    def broken() -> Iterator[int]:
        yield 1
        raise ValueError("model exploded")

    got = []
    with pytest.raises(ValueError, match="model exploded"):
        async for i in iterate_in_executor(broken, device_executor("test-d")):
            got.append(i)
    assert got == [1]


async def test_two_streams_on_one_device_take_turns() -> None:
    executor = device_executor("test-e")
    order: list[str] = []

    def stream(name: str) -> Iterator[int]:
        for i in range(5):
            time.sleep(0.005)  # a little model work per item
            order.append(name)
            yield i

    async def consume(name: str) -> list[int]:
        return [i async for i in iterate_in_executor(lambda: stream(name), executor)]

    assert await asyncio.gather(consume("llm"), consume("tts")) == [[0, 1, 2, 3, 4]] * 2
    assert order.index("tts") < len(order) - 1 - order[::-1].index("llm")  # not one after the other


async def test_a_slow_consumer_bounds_how_far_the_model_runs_ahead() -> None:
    consumed = 0
    ahead: list[int] = []

    def fast() -> Iterator[int]:
        for i in range(100):
            ahead.append(i - consumed)
            yield i

    async for _ in iterate_in_executor(fast, device_executor("test-f"), prefetch=4):
        consumed += 1
        await asyncio.sleep(0.001)
    assert max(ahead) <= 4
