"""``WS /v1/realtime`` on the gateway: the OpenAI Realtime API as a :class:`Dialect` of the one gateway
session (core/gateway/session.py). Frames are bridged unchanged to the worker's ``/v1/realtime``
(core/worker/realtime.py), where the Realtime events are translated onto a duplex session.

The translation needs numpy and libopus, which the gateway must never import, so it lives on the worker;
the gateway only queues and moves frames, exactly as for ``/ws/duplex``. What is particular to this API:

- Errors are Realtime ``error`` events (``{"type": "error", "error": {...}}``), stamped ``gw_event_N``.
- Audio is text (``input_audio_buffer.append``). Realtime clients stream audio right after connecting,
  while the gateway still connects to the worker, so appends are held like any event until the client
  has been told it waits in the queue; from then on they are dropped, as audio is on ``/ws/duplex``.
- ``session.queue_done`` goes only to a client that was told ``session.queued``: a stock Realtime client
  expects ``session.created`` as the first event of a session that did not wait.
- The gateway reads no client or worker event (there is no pause in this API).

No audio or model library here: this runs in the gateway.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from core.api.realtime_events import realtime_error
from core.gateway.session import Dialect
from core.protocol import ErrorCode, parse_json

HELD_FRAMES = 256
HELD_BYTES = 1 << 20  # about 8 s of base64 pcm16 at 24 kHz
WORKER_MAX_SIZE = 16 * 1024 * 1024  # base64 audio events are large
_event_ids = itertools.count(1)


def error_text(code: ErrorCode, message: str, fatal: bool = True) -> str:
    """A Realtime ``error`` event from the gateway (the API has no fatal flag: a close follows a fatal one)."""
    return json.dumps({"event_id": f"gw_event_{next(_event_ids)}", **realtime_error(code.value, message)})


def is_audio(text: str) -> bool:
    """Whether a client event carries audio."""
    return '"input_audio_buffer.append"' in text


def worker_error_code(frame: str | bytes) -> str | None:
    """The code of a Realtime ``error`` event the worker sent, or None for any other frame."""
    if not isinstance(frame, str) or '"error"' not in frame:
        return None
    try:
        event: Any = parse_json(frame)
    except ValueError:
        return None
    if (
        not isinstance(event, dict)
        or event.get("type") != "error"
        or not isinstance(event.get("error"), dict)
    ):
        return None
    return event["error"].get("code")


REALTIME = Dialect(
    worker_path="/v1/realtime",
    worker_max_size=WORKER_MAX_SIZE,
    held_frames=HELD_FRAMES,
    held_bytes=HELD_BYTES,
    held_note="no session yet: audio sent while queued is dropped; stream after session.queue_done",
    error=error_text,
    worker_error_code=worker_error_code,
    is_audio=is_audio,
    queue_done_always=False,
)
