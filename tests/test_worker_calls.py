"""HTTP requests to a worker through the queue (core/gateway/worker_calls.py), on the test's loop: the pool
on a fake clock, the worker an httpx mock transport whose requests end when the test says.

Covers a client that leaves mid-request: the worker still runs the request, so its lease is held until the
worker answers and the next client waits in the queue (instead of being sent to a worker that refuses it);
the duration of a request that ran feeds the ETAs, one that never reached the worker does not.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.config import Config
from core.gateway.metrics import GatewayMetrics
from core.gateway.state import GatewayState
from core.gateway.worker_calls import worker_response
from core.scheduling.pool import Lease, Outcome, Pool, Ticket
from tests.test_pool import BASE, Recorder, make_pool


class FakeWorker:
    """One worker's HTTP side: one request at a time (409 ``busy`` meanwhile), as a real worker.

    A request runs in a task of its own, so that the gateway hanging up does not stop it (a real worker
    finishes a request whose client left); a request with ``?hold=1`` runs until ``finish()``, then
    answers ``status``.
    """

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.running = 0
        self.served = 0
        self.refused = 0
        self.started = asyncio.Event()
        self._finish = asyncio.Event()

    def finish(self) -> None:
        """Let the held request answer."""
        self._finish.set()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.running:
            self.refused += 1
            return httpx.Response(409, json={"error": {"code": "busy", "message": "busy"}})
        self.running += 1
        return await asyncio.shield(asyncio.ensure_future(self._run(request)))

    async def _run(self, request: httpx.Request) -> httpx.Response:
        try:
            self.started.set()
            if request.url.params.get("hold"):
                await self._finish.wait()
            self.served += 1
            status = self.status if request.url.params.get("hold") else 200
            return httpx.Response(status, json={"text": "done"})
        finally:
            self.running -= 1


class Both(Recorder):
    """The test's record of releases, and the gateway's metrics, fed alike."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def on_release(self, lease: Lease, outcome: Outcome, duration_s: float) -> None:  # type: ignore[override]
        super().on_release(lease, outcome, duration_s)
        self.metrics.on_release(lease, outcome, duration_s)


def gateway_state(pool: Pool, worker: FakeWorker) -> tuple[GatewayState, Recorder]:
    """The gateway's state around ``pool`` (its listener now records and feeds the metrics), and the record."""
    state = GatewayState(Config(), pool, GatewayMetrics(), api_key=None, static_dir=Path("."))
    state.http = httpx.AsyncClient(transport=httpx.MockTransport(worker))
    rec = pool.listener = Both(state.metrics)
    return state, rec


async def call(state: GatewayState, ticket: Ticket, path: str, prepared: asyncio.Event | None = None) -> Any:
    """One client's request: what the worker answered (``prepared``, when given, holds it before sending)."""

    async def prepare() -> dict[str, Any]:
        if prepared is not None:
            await prepared.wait()
        return {"json": {"text": "hi"}}

    async with worker_response(state, ticket, path, prepare) as response:
        return response.status_code, response.json()


async def settle() -> None:
    """Let every task that can run, run (nothing here waits on time)."""
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "client_left"),  # the worker ran it: a real duration
        (500, "client_left"),  # ran and failed: as long as a request takes, all the same
        (409, "abandoned"),  # refused in the end: it ran nothing
    ],
)
async def test_a_request_whose_client_left_holds_the_worker_until_the_worker_answers(
    status: int, outcome: str
) -> None:
    pool, clock, _ = make_pool(1, min_samples=1)
    worker = FakeWorker(status)
    state, rec = gateway_state(pool, worker)
    first = pool.submit("transcribe")
    client = asyncio.create_task(call(state, first, "/v1/transcribe?hold=1"))
    await asyncio.wait_for(worker.started.wait(), 5)  # the worker has the request
    clock.advance(4)
    client.cancel()  # the client hangs up (unless_disconnected cancels the call)
    with pytest.raises(asyncio.CancelledError):
        await client
    await settle()
    # The worker is still busy with it, and the queue knows: nobody is sent to it meanwhile.
    assert rec.releases == [] and pool.describe()["busy"] == 1 and first.lease is not None
    assert pool.workers[0].lease is first.lease
    nxt = pool.submit("transcribe")
    assert nxt.state == "waiting"
    second = asyncio.create_task(call(state, nxt, "/v1/transcribe"))
    await settle()
    assert not second.done() and worker.refused == 0
    clock.advance(3)
    worker.finish()  # the worker answers (nobody reads it)
    assert await asyncio.wait_for(second, 5) == (200, {"text": "done"})  # the next client is served
    assert rec.releases == [(first.id, outcome), (nxt.id, "completed")]
    assert (worker.served, worker.refused) == (2, 0)
    ran = outcome == "client_left"
    assert pool.durations.samples("transcribe") == (2 if ran else 1)
    assert pool.durations.expected("transcribe") == pytest.approx(3.5 if ran else 0.0)  # 7 s and 0 s
    assert state.metrics.releases[("transcribe", outcome)] == 1
    assert state.metrics.durations["transcribe"].count == (2 if ran else 1)
    await state.http.aclose()  # type: ignore[union-attr]


async def test_a_client_gone_before_its_request_was_sent_abandons_the_lease() -> None:
    pool, clock, _ = make_pool(1, min_samples=1)
    worker = FakeWorker()
    state, rec = gateway_state(pool, worker)
    ticket = pool.submit("transcribe")
    prepared = asyncio.Event()  # the request body is still being read
    client = asyncio.create_task(call(state, ticket, "/v1/transcribe", prepared))
    await settle()
    assert ticket.state == "assigned"
    clock.advance(0.1)
    client.cancel()
    with pytest.raises(asyncio.CancelledError):
        await client
    # Released at once, and its near-zero hold is no duration: the expected one stays the baseline.
    assert rec.releases == [(ticket.id, "abandoned")] and pool.describe()["busy"] == 0
    assert pool.durations.samples("transcribe") == 0
    assert pool.durations.expected("transcribe") == BASE["transcribe"]
    assert worker.served == 0 and state.metrics.durations["transcribe"].count == 0
    await state.http.aclose()  # type: ignore[union-attr]
