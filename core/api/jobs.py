"""Transcription job API on the gateway: submit audio, poll for the transcript; every job goes through the ETA queue.

Routes (errors are ``{"error": {"code", "message"}}``):

- ``POST /api/v1/asr/submit`` (multipart: ``file``, optional ``language``) -> 202
  ``{task_id, status: "queued", position, estimated_wait}`` (position 1 is next; 0: a worker is taking
  it now; null: waiting for room in a full queue); 400 for an unsupported format (the message
  lists the supported ones), 413 over ``audio.max_upload_mb``, 503 + ``Retry-After`` when the queue is full.
- ``GET /api/v1/asr/result/{task_id}``: ``queued`` (position, estimated_wait), ``processing`` (progress,
  an estimate from the expected duration), ``done`` (text, language, segments, duration, created_at,
  audio_url) or ``failed`` (error, retry_url).
- ``GET /api/v1/asr/history?limit=N[&status=S]``, ``GET /api/v1/asr/audio/{task_id}``,
  ``POST /api/v1/asr/retry/{task_id}`` (failed jobs only; 409 otherwise),
  ``DELETE /api/v1/asr/task/{task_id}`` (the job and its audio; a running one is cancelled),
  ``GET /api/v1/asr/queue/status``, ``GET /api/v1/health``, ``GET /api/v1/stats``.

Each queued job holds one ``transcribe`` ticket in the pool, so jobs and live sessions share one FIFO
and one ETA. A job whose ticket outwaits ``service.request_timeout`` takes a fresh ticket instead of
failing (a batch of jobs is expected to wait). One whose worker refuses it (busy, loading) or cannot be
reached goes back to the head of the queue and reads ``queued`` again until a worker starts it (at most
``MAX_ATTEMPTS`` tries, core/gateway/worker_calls.py). One that a worker rejects (bad audio) or that loses
its worker mid-call fails, and can be retried. Jobs survive a restart: :meth:`JobService.start` re-queues
every unfinished job in submission order.

Retention: ``service.jobs_keep_last`` (1000; 0 keeps all), ``service.jobs_keep_days`` (30.0; 0 keeps forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from core.gateway.worker_calls import CallFailed, take_ticket, worker_response
from core.protocol import ErrorCode
from core.scheduling.pool import Lease, Ticket
from core.storage.jobs import Job, JobConflict, JobNotFound, JobStore, UnsupportedFormat, detect_format
from core.web import UploadError, read_upload

if TYPE_CHECKING:
    from core.gateway.state import GatewayState

log = logging.getLogger("gateway.jobs")

PREFIX = "/api/v1"
KIND = "transcribe"
MAX_HISTORY = 1000
#: A processing job's progress estimate never reaches 1 before it is done.
MAX_PROGRESS = 0.95
CONFLICT = "conflict"  # not (yet) an ErrorCode: a request the job's state does not allow
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})?")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def parse_language(value: str | None) -> str | None:
    """A language code (``en``, ``pt-BR``), or None for auto-detection; ValueError when malformed."""
    if value is None or value.strip().lower() in ("", "auto"):
        return None
    if not _LANGUAGE.fullmatch(value.strip()):
        raise ValueError(f"language {value[:20]!r} is not a language code like 'en'")
    return value.strip()


class JobService:
    """Jobs of one gateway: the store, one runner task per unfinished job, and the routes."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        service = state.config.service
        self.data_dir = Path(service.data_dir)
        self.keep_last = service.jobs_keep_last
        self.keep_days = service.jobs_keep_days
        self.store: JobStore | None = None
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._tickets: dict[str, Ticket] = {}
        self._started: dict[str, float] = {}  # job id -> loop time its worker call began

    # ------------------------------------------------------------------ life

    async def start(self) -> None:
        """Open the database and re-queue unfinished jobs (run once the gateway's HTTP client exists)."""
        self.store = await asyncio.to_thread(
            JobStore, self.data_dir, keep_last=self.keep_last, keep_days=self.keep_days
        )
        pending = await self.store.call(self.store.recover)
        await self.store.call(self.store.prune)
        for job in pending:
            self._spawn(job, None)
        if pending:
            log.info("re-queued %d unfinished job(s)", len(pending))

    async def stop(self) -> None:
        """Cancel the runners (their jobs stay unfinished and resume at the next start) and close the store."""
        runners = list(self._runners.values())
        for task in runners:
            task.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
            self.store = None

    def _db(self) -> JobStore:
        if self.store is None:
            raise RuntimeError("the job service has not started")
        return self.store

    # ------------------------------------------------------------------ running

    def _spawn(self, job: Job, ticket: Ticket | None) -> None:
        if ticket is not None:
            self._tickets[job.id] = ticket
        task = asyncio.create_task(self._run(job, ticket), name=f"job-{job.id}")
        self._runners[job.id] = task
        task.add_done_callback(lambda _: self._forget(job.id, task))

    def _forget(self, job_id: str, task: asyncio.Task[None]) -> None:
        if self._runners.get(job_id) is task:  # not when a retry already started a new runner
            del self._runners[job_id]
            self._tickets.pop(job_id, None)
            self._started.pop(job_id, None)

    async def _run(self, job: Job, ticket: Ticket | None) -> None:
        """Serve one job until it is done or failed; queue-full and queue-timeout only make it wait again."""
        pool = self.state.pool
        while True:
            try:
                if ticket is None:
                    ticket = take_ticket(pool, KIND)
                self._tickets[job.id] = ticket
                await self._transcribe(job, ticket)
                return
            except CallFailed as exc:
                if exc.code in (ErrorCode.QUEUE_FULL.value, ErrorCode.QUEUE_TIMEOUT.value):
                    ticket = None
                    if exc.code == ErrorCode.QUEUE_FULL.value:
                        await asyncio.sleep(exc.retry_after_s or 1.0)
                    continue
                await self._fail(job, exc.code, exc.message)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must fail the job, not leave it processing forever
                log.exception("job %s failed", job.id)
                await self._fail(
                    job, ErrorCode.INTERNAL_ERROR.value, f"gateway error: {exc.__class__.__name__}"
                )
                return

    async def _transcribe(self, job: Job, ticket: Ticket) -> None:
        store = self._db()

        async def on_lease(_: Lease) -> None:
            self._started[job.id] = asyncio.get_running_loop().time()
            await store.call(store.start, job.id)

        async def on_requeue() -> None:
            # Its worker refused it or was gone: the ticket waits again at the head of the queue, so the
            # job reads queued (with its place) until the next worker starts it afresh.
            self._started.pop(job.id, None)
            await store.call(store.requeue, job.id)

        async def prepare() -> dict[str, Any]:
            data = await asyncio.to_thread(store.audio_path(job).read_bytes)
            fields = {"language": job.language} if job.language else {}
            return {"files": {"file": (f"audio.{job.ext}", data, job.media_type)}, "data": fields}

        async with worker_response(
            self.state, ticket, "/v1/transcribe", prepare, on_lease=on_lease, on_requeue=on_requeue
        ) as response:
            body = _json(response)
        if response.status_code != 200:
            error: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else {}
            code = str(error.get("code") or ErrorCode.INTERNAL_ERROR.value)
            await self._fail(
                job, code, str(error.get("message") or f"worker answered HTTP {response.status_code}")
            )
            return
        result = {
            "text": str(body.get("text", "")),
            "language": body.get("language"),
            "duration_s": body.get("duration_s"),
            "segments": body.get("segments") or [],
        }
        await store.call(store.finish, job.id, result)
        await store.call(store.prune)

    async def _fail(self, job: Job, code: str, message: str) -> None:
        log.info("job %s failed: %s: %s", job.id, code, message)
        store = self._db()
        with contextlib.suppress(JobNotFound):
            await store.call(store.fail, job.id, code, message)

    # ------------------------------------------------------------------ views

    def view(self, job: Job) -> dict[str, Any]:
        """The JSON a client sees for ``job`` (result and history entries)."""
        out: dict[str, Any] = {
            "task_id": job.id,
            "status": job.status,
            "filename": job.filename,
            "language": job.language,
            "created_at": _iso(job.created_at),
            "audio_url": f"{PREFIX}/asr/audio/{job.id}",
        }
        if job.status == "queued":
            out.update(self._queue_view(job.id))
        elif job.status == "processing":
            out["started_at"] = _iso(job.started_at)
            out.update(self._progress(job.id))
        elif job.status == "done":
            result = job.result or {}
            out.update(
                text=result.get("text", ""),
                language=result.get("language") or job.language,
                duration=result.get("duration_s"),
                segments=result.get("segments", []),
                finished_at=_iso(job.finished_at),
                processing_s=_span(job.started_at, job.finished_at),
            )
        else:
            out.update(
                error={"code": job.error_code, "message": job.error_message},
                retry_url=f"{PREFIX}/asr/retry/{job.id}",
                finished_at=_iso(job.finished_at),
            )
        return out

    def _queue_view(self, job_id: str) -> dict[str, Any]:
        ticket = self._tickets.get(job_id)
        if ticket is not None and ticket.state == "assigned":  # being handed to its worker
            return {"position": 0, "estimated_wait": 0.0}
        if ticket is None or ticket.state != "waiting":  # between tickets (the queue was full): no place yet
            return {"position": None, "estimated_wait": round(self.state.pool.eta_for_new(KIND), 2)}
        if ticket.position == 0:  # submitted this instant: the pool refreshes positions on its next turn
            self.state.pool.refresh()
        return {"position": ticket.position, "estimated_wait": round(ticket.eta_s, 2)}

    def _progress(self, job_id: str) -> dict[str, Any]:
        started = self._started.get(job_id)
        if started is None:
            return {"progress": 0.0}
        elapsed = asyncio.get_running_loop().time() - started
        expected = max(1e-3, self.state.pool.durations.expected(KIND))
        return {"progress": round(min(MAX_PROGRESS, elapsed / expected), 3), "elapsed_s": round(elapsed, 2)}

    # ------------------------------------------------------------------ handlers

    async def submit(self, request: Request) -> Response:
        pool = self.state.pool
        if pool.is_full():  # answer before reading a body we could not queue
            return _error(503, ErrorCode.QUEUE_FULL.value, "the queue is full", _retry(pool.retry_after_s()))
        max_bytes = int(self.state.config.audio.max_upload_mb * 1024 * 1024)
        try:
            upload = await read_upload(request, max_bytes, ("file", "audio"))
            ext = detect_format(upload.data, upload.filename)
            language = parse_language(upload.get("language"))
        except UploadError as exc:
            return _error(exc.status, exc.code, exc.message)
        except UnsupportedFormat as exc:
            return _error(400, ErrorCode.UNSUPPORTED_FORMAT.value, str(exc))
        except ValueError as exc:
            return _error(400, ErrorCode.INVALID_EVENT.value, str(exc))
        store = self._db()
        job = await store.call(store.create, upload.data, ext, upload.filename, language)
        try:
            ticket = take_ticket(pool, KIND)
        except CallFailed as exc:
            await store.call(store.delete, job.id)
            return _error(exc.status, exc.code, exc.message, exc.headers())
        self._spawn(job, ticket)
        body = {"task_id": job.id, "status": "queued", **self._queue_view(job.id)}
        return JSONResponse(body, status_code=202, headers={"Location": f"{PREFIX}/asr/result/{job.id}"})

    async def result(self, request: Request) -> Response:
        store = self._db()
        job = await store.call(store.get, request.path_params["task_id"])
        return JSONResponse(self.view(job))

    async def history(self, request: Request) -> Response:
        try:
            limit = int(request.query_params.get("limit", "20"))
        except ValueError:
            return _error(400, ErrorCode.INVALID_EVENT.value, "limit must be an integer")
        if not 1 <= limit <= MAX_HISTORY:
            return _error(400, ErrorCode.INVALID_EVENT.value, f"limit must be 1..{MAX_HISTORY}")
        status = request.query_params.get("status")
        if status is not None and status not in ("queued", "processing", "done", "failed"):
            return _error(
                400, ErrorCode.INVALID_EVENT.value, "status must be queued, processing, done or failed"
            )
        store = self._db()
        jobs = await store.call(store.recent, limit, status)
        return JSONResponse({"tasks": [self.view(j) for j in jobs], "count": len(jobs)})

    async def audio(self, request: Request) -> Response:
        store = self._db()
        job = await store.call(store.get, request.path_params["task_id"])
        path = store.audio_path(job)
        if not await asyncio.to_thread(path.is_file):
            return _error(404, ErrorCode.NOT_FOUND.value, f"the audio of task {job.id} is gone")
        return FileResponse(path, media_type=job.media_type, filename=job.filename or path.name)

    async def retry(self, request: Request) -> Response:
        pool = self.state.pool
        store = self._db()
        job = await store.call(store.get, request.path_params["task_id"])
        if job.status == "failed" and pool.is_full():
            return _error(503, ErrorCode.QUEUE_FULL.value, "the queue is full", _retry(pool.retry_after_s()))
        job = await store.call(store.retry, job.id)
        self._spawn(job, None)
        await asyncio.sleep(0)  # let the runner take its ticket, so the answer carries a position
        return JSONResponse(
            {"task_id": job.id, "status": "queued", **self._queue_view(job.id)}, status_code=202
        )

    async def delete(self, request: Request) -> Response:
        store = self._db()
        job = await store.call(store.get, request.path_params["task_id"])
        runner = self._runners.get(job.id)
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        await store.call(store.delete, job.id)
        return JSONResponse({"task_id": job.id, "deleted": True})

    async def queue_status(self, _: Request) -> Response:
        store = self._db()
        counts = await store.call(store.counts)
        pool = self.state.pool
        return JSONResponse(
            {
                "jobs_queued": counts["queued"],
                "jobs_processing": counts["processing"],
                "queue_length": pool.queue_length,
                "max_queue_size": pool.max_queue_size,
                "workers": len(pool.workers),
                "workers_healthy": sum(w.healthy for w in pool.workers),
                "workers_busy": sum(w.lease is not None for w in pool.workers),
                "estimated_wait": round(pool.eta_for_new(KIND), 2),
                "expected_duration_s": round(pool.durations.expected(KIND), 2),
            }
        )

    async def health(self, _: Request) -> Response:
        pool = self.state.pool
        healthy = sum(w.healthy for w in pool.workers)
        try:
            store = self._db()
            counts = await store.call(store.counts)
            database = "ok"
        except Exception as exc:  # a broken database shows here rather than as a 500
            counts, database = {}, f"error: {exc.__class__.__name__}"
        ok = healthy > 0 and database == "ok"
        return JSONResponse(
            {
                "status": "ok" if ok else "degraded",
                "uptime_s": round(time.monotonic() - self.state.started_at, 1),
                "workers": len(pool.workers),
                "workers_healthy": healthy,
                "queue_length": pool.queue_length,
                "database": database,
                "jobs": counts,
            },
            status_code=200 if ok else 503,
        )

    async def stats(self, _: Request) -> Response:
        store = self._db()
        stats = await store.call(store.stats, time.time() - 86400)
        stats["last_24h"] = stats.pop("since")
        stats["retention"] = {"keep_last": self.keep_last, "keep_days": self.keep_days}
        stats["expected_duration_s"] = round(self.state.pool.durations.expected(KIND), 3)
        return JSONResponse(stats)

    def routes(self) -> list[BaseRoute]:
        """The job API's routes (mount them before the gateway's catch-all static route)."""

        def guarded(handler: Any) -> Any:
            async def endpoint(request: Request) -> Response:
                try:
                    return await handler(request)
                except JobNotFound as exc:
                    return _error(404, ErrorCode.NOT_FOUND.value, str(exc))
                except JobConflict as exc:
                    return _error(409, CONFLICT, str(exc))

            return endpoint

        return [
            Route(f"{PREFIX}/asr/submit", guarded(self.submit), methods=["POST"]),
            Route(f"{PREFIX}/asr/result/{{task_id}}", guarded(self.result), methods=["GET"]),
            Route(f"{PREFIX}/asr/history", guarded(self.history), methods=["GET"]),
            Route(f"{PREFIX}/asr/audio/{{task_id}}", guarded(self.audio), methods=["GET"]),
            Route(f"{PREFIX}/asr/retry/{{task_id}}", guarded(self.retry), methods=["POST"]),
            Route(f"{PREFIX}/asr/task/{{task_id}}", guarded(self.delete), methods=["DELETE"]),
            Route(f"{PREFIX}/asr/queue/status", guarded(self.queue_status), methods=["GET"]),
            Route(f"{PREFIX}/health", guarded(self.health), methods=["GET"]),
            Route(f"{PREFIX}/stats", guarded(self.stats), methods=["GET"]),
        ]


def _retry(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(int(max(1, seconds)))}


def _span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 3)


def _json(response: Any) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
