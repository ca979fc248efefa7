"""The job API against the real gateway and a fake-stack worker (processes on loopback).

Covers submit -> result -> audio -> history, failures and retry, delete, validation (format, size, ids),
the queue/health/stats views, and a gateway restart that loses no job; in process, against a scripted
worker, a job whose worker refuses it going back to ``queued``.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from websockets.asyncio.client import connect

from core.api.jobs import JobService
from core.config import Config, ServiceConfig
from core.gateway.metrics import GatewayMetrics
from core.gateway.state import GatewayState
from core.scheduling.eta import DurationModel, EtaSettings
from core.scheduling.pool import Pool
from tests.duplex_client import free_port, stop, wait_healthy
from tests.services import cluster, start_gateway, start_worker, until, wait_until_served, write_config

pytestmark = pytest.mark.slow
MAX_UPLOAD_MB = 0.25


def tone_wav(seconds: float = 1.0, rate: int = 16_000) -> bytes:
    """A 440 Hz tone (the fake ASR hears sound and answers its script, "hello there")."""
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("jobs-cluster")
    with cluster(folder, max_upload_mb=MAX_UPLOAD_MB) as (url, _):
        yield url, folder / "data"


def submit(base: str, data: bytes, name: str = "talk.wav", **fields: str) -> httpx.Response:
    return httpx.post(
        f"{base}/api/v1/asr/submit", files={"file": (name, data, "audio/wav")}, data=fields, timeout=30
    )


def finished(base: str, task_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """Poll the result (bounded) until the job is done or failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(f"{base}/api/v1/asr/result/{task_id}", timeout=10).json()
        if body["status"] in ("done", "failed"):
            return dict(body)
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} not finished in {timeout} s")


def test_a_submitted_job_is_transcribed_and_its_audio_kept(gateway: tuple[str, Path]) -> None:
    base, data_dir = gateway
    audio = tone_wav()
    r = submit(base, audio, language="en")
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "queued" and body["position"] >= 0 and body["estimated_wait"] >= 0
    task = body["task_id"]
    done = finished(base, task)
    assert done["status"] == "done"
    assert done["text"] == "hello there"
    assert done["language"] == "en"
    assert done["duration"] == pytest.approx(1.0)
    assert done["created_at"].endswith("+00:00") and done["processing_s"] >= 0
    stored = httpx.get(base + done["audio_url"], timeout=10)
    assert stored.status_code == 200 and stored.content == audio
    assert stored.headers["content-type"] == "audio/wav"
    assert (data_dir / "jobs" / f"{task}.wav").read_bytes() == audio
    history = httpx.get(f"{base}/api/v1/asr/history", params={"limit": 1}).json()
    assert [t["task_id"] for t in history["tasks"]] == [task]


async def test_jobs_wait_in_the_same_queue_as_live_sessions(gateway: tuple[str, Path]) -> None:
    base, _ = gateway
    async with connect(base.replace("http", "ws") + "/ws/duplex") as session:  # holds the only worker
        async with asyncio.timeout(10):
            while json.loads(await session.recv())["type"] != "session.created":
                pass
        async with httpx.AsyncClient(timeout=30) as client:
            files = {"file": ("talk.wav", tone_wav(0.5), "audio/wav")}
            queued = (await client.post(f"{base}/api/v1/asr/submit", files=files)).json()
            assert queued["position"] == 1
            assert 100 < queued["estimated_wait"] <= 120  # the live session's expected 120 s, minus its age
            status = (await client.get(f"{base}/api/v1/asr/queue/status")).json()
            assert status["jobs_queued"] == 1 and status["queue_length"] == 1 and status["workers_busy"] == 1
            assert status["estimated_wait"] > queued["estimated_wait"]  # a new job would wait behind this one
    done = await asyncio.to_thread(finished, base, queued["task_id"])
    assert done["status"] == "done" and done["text"] == "hello there"


def test_undecodable_audio_fails_and_can_be_retried(gateway: tuple[str, Path]) -> None:
    base, _ = gateway
    broken = b"RIFF\x24\x00\x00\x00WAVEjunk" + b"\x07" * 64  # a WAV header, then nothing a decoder can read
    task = submit(base, broken).json()["task_id"]
    failed = finished(base, task)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "bad_audio" and failed["error"]["message"]
    assert failed["retry_url"] == f"/api/v1/asr/retry/{task}"
    r = httpx.post(base + failed["retry_url"], timeout=10)
    assert r.status_code == 202 and r.json()["status"] == "queued"
    assert finished(base, task)["status"] == "failed"  # the same bytes fail again, cleanly
    good = submit(base, tone_wav(0.5)).json()["task_id"]
    finished(base, good)
    conflict = httpx.post(f"{base}/api/v1/asr/retry/{good}", timeout=10)
    assert conflict.status_code == 409 and "only failed tasks" in conflict.json()["error"]["message"]


def test_delete_removes_the_job_and_its_audio(gateway: tuple[str, Path]) -> None:
    base, data_dir = gateway
    task = submit(base, tone_wav(0.3)).json()["task_id"]
    finished(base, task)
    r = httpx.delete(f"{base}/api/v1/asr/task/{task}", timeout=10)
    assert r.status_code == 200 and r.json() == {"task_id": task, "deleted": True}
    assert not (data_dir / "jobs" / f"{task}.wav").exists()
    for path in (f"/api/v1/asr/result/{task}", f"/api/v1/asr/audio/{task}"):
        gone = httpx.get(base + path, timeout=10)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    assert httpx.delete(f"{base}/api/v1/asr/task/{task}", timeout=10).status_code == 404


def test_bad_uploads_get_clear_errors(gateway: tuple[str, Path]) -> None:
    base, _ = gateway
    r = submit(base, b"just some text, not audio", name="notes.txt")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "unsupported_format" and "wav, flac, mp3" in error["message"]
    r = submit(base, b"%PDF-1.7 not audio at all", name="paper.wav")
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_format"
    r = submit(base, tone_wav(10.0))  # 320 KB over a 0.25 MB limit
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    r = httpx.post(f"{base}/api/v1/asr/submit", data={"language": "en"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] in ("invalid_event", "bad_audio")
    r = submit(base, tone_wav(0.2), language="english; drop table")
    assert r.status_code == 400 and "language" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/asr/result/0123456789abcdef0123456789abcdef",
        "/api/v1/asr/result/..%2F..%2Fjobs.db",
        "/api/v1/asr/audio/..%2Fjobs.db",
        "/api/v1/asr/audio/%2e%2e",
        "/api/v1/asr/result/ABCDEF",
    ],
)
def test_unknown_and_malformed_ids_are_404(gateway: tuple[str, Path], path: str) -> None:
    base, _ = gateway
    r = httpx.get(base + path, timeout=10)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "not_found"


def test_queue_health_and_stats_views(gateway: tuple[str, Path]) -> None:
    base, _ = gateway
    finished(base, submit(base, tone_wav(0.5)).json()["task_id"])
    queue = httpx.get(f"{base}/api/v1/asr/queue/status", timeout=10).json()
    assert queue["workers"] == 1 and queue["workers_healthy"] == 1
    assert queue["jobs_queued"] == 0 and queue["estimated_wait"] == 0
    health = httpx.get(f"{base}/api/v1/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["database"] == "ok"
    stats = httpx.get(f"{base}/api/v1/stats", timeout=10).json()
    assert stats["counts"]["done"] >= 1 and stats["audio_s_transcribed"] >= 0.5
    assert stats["retention"] == {"keep_last": 1000, "keep_days": 30.0}
    assert httpx.get(f"{base}/api/v1/asr/history", params={"limit": 0}, timeout=10).status_code == 400


def test_a_gateway_restart_loses_no_job(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.json", tmp_path / "data", tmp_path / "logs")
    nowhere = f"127.0.0.1:{free_port()}"  # no worker: the job waits in the queue
    port = free_port()
    gateway = start_gateway(port, nowhere, config, tmp_path / "gateway1.err")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, gateway, 60)
        task = submit(base, tone_wav()).json()["task_id"]
        waiting = httpx.get(f"{base}/api/v1/asr/result/{task}", timeout=10).json()
        assert waiting["status"] == "queued" and waiting["position"] == 1
    finally:
        stop(gateway)
    worker_port, port = free_port(), free_port()
    worker = start_worker(worker_port, "fake", config, tmp_path / "worker.err")
    gateway = start_gateway(port, f"127.0.0.1:{worker_port}", config, tmp_path / "gateway2.err")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, gateway, 60)
        wait_until_served(base)
        done = finished(base, task)
        assert done["status"] == "done" and done["text"] == "hello there"
    finally:
        stop(gateway)
    gateway = start_gateway(port, f"127.0.0.1:{worker_port}", config, tmp_path / "gateway3.err")
    try:
        wait_healthy(base, gateway, 60)
        again = httpx.get(f"{base}/api/v1/asr/result/{task}", timeout=10).json()
        assert again["status"] == "done" and again["text"] == "hello there"  # finished jobs stay readable
    finally:
        stop(gateway)
        stop(worker)


# --------------------------------------------------------------------------- in process, a scripted worker

TRANSCRIPT = {"text": "hello there", "language": "en", "duration_s": 0.2, "segments": []}


@pytest.mark.parametrize("refusal", ["unreachable", "loading"])
async def test_a_job_whose_worker_refuses_it_reads_queued_until_it_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    answers, calls = [refusal, "transcript"], []

    async def worker(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        answer = answers.pop(0)
        if answer == "unreachable":  # the worker died since its last health check
            raise httpx.ConnectError("connection refused", request=request)
        if answer == "loading":
            return httpx.Response(503, json={"error": {"code": "not_ready", "message": "loading"}})
        return httpx.Response(200, json=TRANSCRIPT)

    config = Config(service=ServiceConfig(data_dir=str(tmp_path / "data"), log_dir=str(tmp_path)))
    pool = Pool(["127.0.0.1:1"], DurationModel(EtaSettings.from_config(config.service)))
    state = GatewayState(config, pool, GatewayMetrics(), api_key=None, static_dir=tmp_path)
    state.http = httpx.AsyncClient(transport=httpx.MockTransport(worker))
    jobs = JobService(state)
    await jobs.start()
    assert jobs.store is not None
    finishes: list[str] = []
    real_finish = jobs.store.finish

    def finish(job_id: str, result: dict[str, Any]) -> None:
        finishes.append(job_id)
        real_finish(job_id, result)

    monkeypatch.setattr(jobs.store, "finish", finish)
    pool.mark_health(pool.workers[0], "idle")
    api = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=Starlette(routes=jobs.routes())), base_url="http://gw"
    )
    try:
        files = {"file": ("talk.wav", tone_wav(0.2), "audio/wav")}
        task = (await api.post("/api/v1/asr/submit", files=files)).json()["task_id"]
        # The worker took it, refused it (or was gone), and the ticket is back at the head of the queue.
        await until(lambda: calls and pool.queue_length == 1, "the ticket handed back")
        waiting = (await api.get(f"/api/v1/asr/result/{task}")).json()
        assert waiting["status"] == "queued", waiting
        assert waiting["position"] == 1
        assert "progress" not in waiting and "started_at" not in waiting
        assert task not in jobs._started  # its next start counts its progress from then
        counts = (await api.get("/api/v1/asr/queue/status")).json()
        assert (counts["jobs_queued"], counts["jobs_processing"]) == (1, 0)
        assert [
            t["task_id"] for t in (await api.get("/api/v1/asr/history?status=queued")).json()["tasks"]
        ] == [task]

        pool.mark_health(pool.workers[0], "idle")  # back: the job starts again and is served
        await until(lambda: finishes, "the transcript stored")
        done = (await api.get(f"/api/v1/asr/result/{task}")).json()
        assert (done["status"], done["text"]) == ("done", "hello there")
        assert calls == ["/v1/transcribe", "/v1/transcribe"] and finishes == [task]
        assert (await jobs.store.call(jobs.store.get, task)).attempts == 2
    finally:
        await api.aclose()
        await jobs.stop()
        await state.http.aclose()
