"""``WS /ws/duplex`` on the gateway: our own protocol (docs/PROTOCOL.md) as a :class:`Dialect` of the one
gateway session (core/gateway/session.py).

What is particular to it: errors are our ``error`` events; the gateway reads ``session.pause``,
``session.resume`` and ``session.close`` from the client (``session.close`` while queued ends the wait with
``session.closed``) and ``response.done`` (stage timings for /metrics) and ``session.paused`` /
``session.resumed`` from the worker; binary frames are the audio, so everything a waiting client sends as
text is held.

No audio or model library here: this runs in the gateway.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from core.gateway.session import CLOSE, PAUSE, RESUME, Control, Dialect
from core.protocol import ErrorCode, error_event, parse_json
from core.scheduling.pool import Lease

if TYPE_CHECKING:
    from core.gateway.state import GatewayState

HELD_TEXT_FRAMES = 32
HELD_TEXT_BYTES = 256 * 1024
WORKER_WS_MAX_SIZE = 4 * 1024 * 1024


def client_control(text: str) -> Control:
    """The control event a client text frame is (pause, resume, close), or None."""
    # Parse only the few events the gateway acts on; everything else passes through unread.
    if PAUSE not in text and RESUME not in text and CLOSE not in text:
        return None
    try:
        data = parse_json(text)
    except ValueError:
        return None
    kind = data.get("type") if isinstance(data, dict) else None
    return kind if kind in (PAUSE, RESUME, CLOSE) else None


def worker_error_code(frame: str | bytes) -> str | None:
    """The code of an ``error`` event the worker sent, or None for any other frame."""
    if not isinstance(frame, str) or '"error"' not in frame:
        return None
    try:
        data = json.loads(frame)
    except ValueError:
        return None
    return data.get("code") if isinstance(data, dict) and data.get("type") == "error" else None


def inspect_worker_text(state: GatewayState, lease: Lease, text: str) -> None:
    """Read the timings of ``response.done`` for /metrics, and the worker's pause state."""
    if "response.done" in text or "session.paused" in text or "session.resumed" in text:
        try:
            event = json.loads(text)
        except ValueError:
            return
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "response.done":
            state.metrics.observe_response(event)
        elif kind in ("session.paused", "session.resumed"):
            lease.paused = kind == "session.paused"


def _error(code: ErrorCode, message: str, fatal: bool) -> str:
    return error_event(code, message, fatal=fatal)


DUPLEX = Dialect(
    worker_path="/ws/duplex",
    worker_max_size=WORKER_WS_MAX_SIZE,
    held_frames=HELD_TEXT_FRAMES,
    held_bytes=HELD_TEXT_BYTES,
    held_note="no session yet: audio sent while queued is dropped, and text events beyond "
    f"{HELD_TEXT_FRAMES} frames; start streaming after session.queue_done",
    error=_error,
    worker_error_code=worker_error_code,
    control=client_control,
    on_worker_text=inspect_worker_text,
    queue_done_always=True,
)
