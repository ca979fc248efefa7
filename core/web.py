"""HTTP helpers both processes use, with no knowledge of either: request bodies read with a limit,
multipart uploads, a client that leaves mid-request, and a streaming response that always cleans up.

Starlette only: no audio or model library, so the gateway may import it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from core.protocol import ErrorCode

log = logging.getLogger("web")

#: Multipart overhead allowed on top of the file size limit.
FORM_OVERHEAD_BYTES = 64 * 1024


def body_limit(max_upload_mb: float) -> int:
    """The largest request body either process reads: an upload in base64 JSON (4/3 the bytes) and a margin."""
    return int(max_upload_mb * 1024 * 1024 * 1.4) + FORM_OVERHEAD_BYTES


class BodyLimit:
    """Pure ASGI middleware: no HTTP request body is read past ``max_bytes``, chunked or not, nor slowly.

    A declared ``Content-Length`` over the limit is refused before a byte is read. A body that runs past it
    while being read (chunked, or a lying header) is refused at that moment: the client gets 413, the app
    sees the client leave (``http.disconnect``) and whatever it answers after that is dropped. Handlers'
    own limits stay (they give the precise message); this one holds for every route, present and future.

    With ``read_timeout_s``, a body whose next part does not come within that long of asking for it is
    refused the same way with 408 (nginx's ``client_body_timeout``): a client that trickles or stalls an
    upload cannot hold a request, and the bound on connections per address bounds how many it can try.
    Once the body is complete nothing is timed (a streaming response waits for the client to leave).
    """

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        max_bytes: int,
        read_timeout_s: float | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s
        #: Requests refused since start, by reason: ``too_large`` or ``read_timeout`` (for ``/metrics``).
        self.refusals: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            self.refusals["too_large"] += 1
            await self._refuse(send, 413, ErrorCode.PAYLOAD_TOO_LARGE, self._too_large())
            return
        seen, started, refused, complete = 0, False, False, False

        async def limited() -> Any:
            nonlocal seen, refused, complete
            if refused:
                return {"type": "http.disconnect"}
            try:
                async with asyncio.timeout(None if complete else self.read_timeout_s):
                    message = await receive()
            except TimeoutError:
                refused = True
                self.refusals["read_timeout"] += 1
                if not started:
                    why = f"no part of the request body came for {self.read_timeout_s:g} s"
                    await self._refuse(send, 408, ErrorCode.RECEIVE_TIMEOUT, why)
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    refused = True
                    self.refusals["too_large"] += 1
                    if not started:
                        await self._refuse(send, 413, ErrorCode.PAYLOAD_TOO_LARGE, self._too_large())
                    return {"type": "http.disconnect"}
            return message

        async def tracked(message: Any) -> None:
            nonlocal started
            if refused:
                return  # the 413 is the answer
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except Exception:
            if not refused:
                raise  # the app's own failure; ours (the client "left") needs no log

    def _too_large(self) -> str:
        return f"the request body is over {self.max_bytes} bytes"

    async def _refuse(self, send: Send, status: int, code: ErrorCode, message: str) -> None:
        body = json.dumps({"error": {"code": code.value, "message": message}}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; cancel it when the client disconnects first (then return None: nobody reads it)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task.done() else None
    finally:
        for t in (task, watch):
            t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)


async def wait_disconnect(request: Request) -> None:
    """Return when the client of ``request`` disconnects."""
    # Once the body is read, the next ASGI message is http.disconnect when the client leaves.
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --------------------------------------------------------------------------- uploads


class UploadError(Exception):
    """An upload that cannot be accepted: ``status`` 400 or 413."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


@dataclass
class Upload:
    """A parsed multipart upload: the file's bytes and name, and the text fields (repeatable)."""

    data: bytes
    filename: str | None
    fields: dict[str, list[str]] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        """The last value of a text field, or None."""
        values = self.fields.get(name)
        return values[-1] if values else None


async def read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it runs past ``limit`` bytes (the rest is not read)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload(request: Request, max_bytes: int, file_fields: tuple[str, ...] = ("file",)) -> Upload:
    """Read a multipart body (at most ``max_bytes`` of file plus form overhead) and parse it.

    Raises :class:`UploadError`: 413 past the limit (checked on ``Content-Length`` first, then while
    reading, and on the file itself), 400 for a body that is not multipart or has no file.
    """
    limit_mb = max_bytes / (1024 * 1024)
    too_large = UploadError(
        413, ErrorCode.PAYLOAD_TOO_LARGE.value, f"the upload is over {limit_mb:g} MB", "file"
    )
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UploadError(
            400, ErrorCode.INVALID_EVENT.value, "send multipart/form-data with a 'file' part", "file"
        )
    declared = request.headers.get("content-length", "")
    limit = max_bytes + FORM_OVERHEAD_BYTES
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = await read_body(request, limit)
    if body is None:
        raise too_large
    try:
        form = await Request(request.scope, _replay(body)).form(max_files=len(file_fields), max_fields=64)
    except Exception as exc:  # starlette raises its own HTTPException/MultiPartException on a bad body
        log.info("malformed multipart body: %r", exc)  # the parser's words stay in the log
        raise UploadError(400, ErrorCode.INVALID_EVENT.value, "malformed multipart body", None) from None
    try:
        upload: UploadFile | None = None
        fields: dict[str, list[str]] = {}
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields.setdefault(key, []).append(value)
            elif key in file_fields and upload is None:
                upload = value
        if upload is None:
            raise UploadError(
                400, ErrorCode.BAD_AUDIO.value, "no audio: send the file in a 'file' part", "file"
            )
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise too_large
        if not data:
            raise UploadError(400, ErrorCode.BAD_AUDIO.value, "the uploaded file is empty", "file")
        return Upload(data, upload.filename, fields)
    finally:
        await form.close()


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


# --------------------------------------------------------------------------- streaming


class ClosingStream(StreamingResponse):
    """A streaming response whose ``on_close`` runs once the response ends, also when it never started."""

    def __init__(
        self, content: AsyncIterator[Any], on_close: Callable[[], Awaitable[None]], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
