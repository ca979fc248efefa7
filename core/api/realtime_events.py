"""OpenAI Realtime events <-> our duplex protocol: the pure half of ``/v1/realtime`` (no socket, no codec).

:class:`RealtimeTranslator` turns a Realtime client's JSON events into our session's events and raw
pcm16 audio, and our session's events and output audio into Realtime server events. The subset, and
what each event maps to, is documented in docs/REALTIME.md. Audio on the Realtime side is base64
pcm16 little-endian mono at 24 kHz both ways (OpenAI's ``audio/pcm``); resampling and Opus decoding
happen in the socket half (``core/worker/realtime.py``).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from core.protocol import ErrorCode, JSONTooDeep, SessionSettings, SessionUpdate, dump_event, parse_json

REALTIME_RATE = 24_000
PCM_FORMAT = {"type": "audio/pcm", "rate": REALTIME_RATE}
#: Our error codes a client caused; the rest are the server's.
CLIENT_CODES = {
    "bad_json",
    "unknown_event",
    "invalid_event",
    "bad_audio",
    "unsupported_format",
    "payload_too_large",
}
#: Client events we understand.
CLIENT_EVENTS = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "response.create",
    "response.cancel",
)


def realtime_error(
    code: str, message: str, event_id: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """A Realtime ``error`` event (without its own ``event_id``; the translator stamps one)."""
    kind = "invalid_request_error" if code in CLIENT_CODES else "server_error"
    return {
        "type": "error",
        "error": {"type": kind, "code": code, "message": message, "param": param, "event_id": event_id},
    }


@dataclass
class ClientActions:
    """What one client event asks for: events for our session, pcm16 24 kHz audio, replies to the client."""

    to_session: list[str] = field(default_factory=list)
    audio: list[bytes] = field(default_factory=list)
    to_client: list[dict[str, Any]] = field(default_factory=list)


class _Refusal(Exception):
    def __init__(self, code: ErrorCode, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def _format_ok(fmt: Any) -> bool:
    """Whether a Realtime audio format (GA object or beta string) is pcm16 at 24 kHz."""
    if fmt is None or fmt == "pcm16":
        return True
    return (
        isinstance(fmt, dict)
        and fmt.get("type") == "audio/pcm"
        and fmt.get("rate", REALTIME_RATE) == REALTIME_RATE
    )


def _dig(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


class RealtimeTranslator:
    """State of one Realtime connection's translation (ids of the current items and response)."""

    def __init__(self, model: str = "duplex") -> None:
        self.model = model
        self.voices: list[str] = []
        self._event_ids = itertools.count(1)
        self._item_ids = itertools.count(1)
        self._swallow_updates = 0
        self.user_item: str | None = None
        self.previous_item: str | None = None
        self.response_id: str | None = None
        self.output_item: str | None = None
        self._speech_ms = (0, 0)
        self.awaiting = False  # a turn was committed and its response has not ended

    # ------------------------------------------------------------------ helpers

    def _stamp(self, event: dict[str, Any]) -> dict[str, Any]:
        return {"event_id": f"event_{next(self._event_ids)}", **event}

    def _new_item(self) -> str:
        return f"item_{next(self._item_ids):04d}"

    def start(self) -> list[str]:
        """Our events to send the session before any client event: raw pcm16 input."""
        self._swallow_updates += 1  # its session.updated is ours, not the client's
        return [dump_event(SessionUpdate(session=SessionSettings(audio_format="pcm16")))]

    def session_view(self, info: dict[str, Any]) -> dict[str, Any]:
        """Our ``SessionInfo`` as a Realtime session object."""
        models = info.get("models") or {}
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": info.get("id"),
            "model": self.model,
            "instructions": info.get("instructions", ""),
            "output_modalities": ["audio"],
            "audio": {
                "input": {
                    "format": PCM_FORMAT,
                    "transcription": {"model": models.get("asr"), "language": info.get("language")},
                    "turn_detection": info.get("turn_detection") or {"type": "server_vad"},
                },
                "output": {"format": PCM_FORMAT, "voice": info.get("voice")},
            },
        }

    # ------------------------------------------------------------------ client -> session

    def from_client(self, text: str) -> ClientActions:
        """Translate one client text frame; problems become ``error`` replies, never exceptions."""
        actions = ClientActions()
        try:
            event = parse_json(text)
        except JSONTooDeep as exc:
            actions.to_client.append(self._stamp(realtime_error(ErrorCode.BAD_JSON.value, str(exc))))
            return actions
        except ValueError:
            actions.to_client.append(self._stamp(realtime_error(ErrorCode.BAD_JSON.value, "not valid JSON")))
            return actions
        kind = event.get("type") if isinstance(event, dict) else None
        event_id = (
            event.get("event_id")
            if isinstance(event, dict) and isinstance(event.get("event_id"), str)
            else None
        )
        try:
            if not isinstance(kind, str):
                raise _Refusal(ErrorCode.INVALID_EVENT, "an event needs a string 'type'", "type")
            self._client_event(kind, event, actions)
        except _Refusal as exc:
            actions.to_client.append(
                self._stamp(realtime_error(exc.code.value, exc.message, event_id, exc.param))
            )
        return actions

    def _client_event(self, kind: str, event: dict[str, Any], actions: ClientActions) -> None:
        if kind == "input_audio_buffer.append":
            actions.audio.append(self._audio(event.get("audio")))
        elif kind == "session.update":
            actions.to_session.append(self._session_update(event.get("session")))
        elif kind == "input_audio_buffer.commit":
            self.awaiting = True
            actions.to_session.append('{"type":"input_audio_buffer.commit"}')
        elif kind == "response.create":
            # Our session answers every committed turn by itself; an explicit create only matters
            # when nothing is committed yet: then it ends the turn on the audio sent so far.
            if not self.awaiting:
                self.awaiting = True
                actions.to_session.append('{"type":"input_audio_buffer.commit"}')
        elif kind == "response.cancel":
            self.awaiting = False  # nothing is awaited after a cancel, even one before response.created
            actions.to_session.append('{"type":"response.cancel"}')
        else:
            supported = ", ".join(CLIENT_EVENTS)
            raise _Refusal(
                ErrorCode.UNKNOWN_EVENT,
                f"unsupported event {kind[:64]!r}; this server supports {supported}",
                "type",
            )

    @staticmethod
    def _audio(data: Any) -> bytes:
        if not isinstance(data, str):
            raise _Refusal(ErrorCode.INVALID_EVENT, "input_audio_buffer.append needs base64 'audio'", "audio")
        try:
            pcm = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise _Refusal(ErrorCode.BAD_AUDIO, "'audio' is not valid base64", "audio") from None
        if len(pcm) % 2:
            raise _Refusal(
                ErrorCode.BAD_AUDIO, "pcm16 audio must be a whole number of 2-byte samples", "audio"
            )
        return pcm

    def _session_update(self, session: Any) -> str:
        if not isinstance(session, dict):
            raise _Refusal(ErrorCode.INVALID_EVENT, "session.update needs a 'session' object", "session")
        for path in (
            ("audio", "input", "format"),
            ("audio", "output", "format"),
            ("input_audio_format",),
            ("output_audio_format",),
        ):
            if not _format_ok(_dig(session, *path)):
                raise _Refusal(
                    ErrorCode.UNSUPPORTED_FORMAT,
                    "only pcm16 at 24 kHz ('audio/pcm') is supported",
                    ".".join(path),
                )
        settings: dict[str, Any] = {}
        if isinstance(session.get("instructions"), str):
            settings["instructions"] = session["instructions"]
        voice = session.get("voice") or _dig(session, "audio", "output", "voice")
        voice = voice.get("id") if isinstance(voice, dict) else voice
        if isinstance(voice, str) and (not self.voices or voice in self.voices):
            settings["voice"] = voice  # OpenAI's voice names (alloy, ...) keep the server's voice
        language = _dig(session, "audio", "input", "transcription", "language") or _dig(
            session, "input_audio_transcription", "language"
        )
        if isinstance(language, str):
            settings["language"] = language
        detection = _dig(session, "audio", "input", "turn_detection") or session.get("turn_detection")
        if detection is not None:
            if not isinstance(detection, dict):
                raise _Refusal(
                    ErrorCode.INVALID_EVENT, "turn_detection must be an object", "audio.input.turn_detection"
                )
            # The worker checks type, eagerness and silence; OpenAI's other knobs (threshold, padding,
            # create_response, ...) have no counterpart here and are left out.
            settings["turn_detection"] = {
                k: detection[k] for k in ("type", "eagerness", "silence_duration_ms") if k in detection
            }
        return json.dumps({"type": "session.update", "session": settings})

    # ------------------------------------------------------------------ session -> client

    def from_session(self, text: str) -> list[dict[str, Any]]:
        """Translate one of our session's events into zero or more Realtime events."""
        event = json.loads(text)
        kind = event.get("type")
        handler = self._SESSION_EVENTS.get(kind)
        return [self._stamp(e) for e in handler(self, event)] if handler else []

    def _created(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        self.voices = list(event["session"].get("voices") or [])
        return [{"type": "session.created", "session": self.session_view(event["session"])}]

    def _updated(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        if self._swallow_updates:
            self._swallow_updates -= 1
            return []
        return [{"type": "session.updated", "session": self.session_view(event["session"])}]

    def _speech_started(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        # A new utterance: a turn still awaited (one that found no words sends no response.*) is over.
        self.awaiting = False
        self.user_item = self._new_item()
        self._speech_ms = (int(event.get("audio_start_ms", 0)), int(event.get("audio_start_ms", 0)))
        return [
            {
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": self._speech_ms[0],
                "item_id": self.user_item,
            }
        ]

    def _speech_stopped(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        item = self.user_item or self._new_item()  # a commit without detected speech
        end = int(event.get("audio_end_ms", 0))
        self._speech_ms = (self._speech_ms[0] if self.user_item else end, end)
        self.user_item, previous, self.previous_item = item, self.previous_item, item
        self.awaiting = True
        return [
            {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": end, "item_id": item},
            {"type": "input_audio_buffer.committed", "item_id": item, "previous_item_id": previous},
        ]

    def _transcribed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        seconds = max(0.0, (self._speech_ms[1] - self._speech_ms[0]) / 1000)
        return [{
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": self.user_item or self._new_item(), "content_index": 0,
            "transcript": event.get("transcript", ""), "usage": {"type": "duration", "seconds": seconds},
        }]  # fmt: skip

    def _response_created(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        self.response_id = str(event.get("response_id"))
        self.output_item = self._new_item()
        response = {"id": self.response_id, "object": "realtime.response", "status": "in_progress",
                    "output": [], "output_modalities": ["audio"]}  # fmt: skip
        item = {"id": self.output_item, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}  # fmt: skip
        return [
            {"type": "response.created", "response": response},
            {
                "type": "response.output_item.added",
                "response_id": self.response_id,
                "output_index": 0,
                "item": item,
            },
        ]

    def _where(self) -> dict[str, Any]:
        return {
            "response_id": self.response_id,
            "item_id": self.output_item,
            "output_index": 0,
            "content_index": 0,
        }

    def _text_delta(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        if self.response_id is None:
            return []
        return [
            {
                "type": "response.output_audio_transcript.delta",
                **self._where(),
                "delta": event.get("delta", ""),
            }
        ]

    def _audio_clear(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"type": "output_audio_buffer.cleared", "response_id": event.get("response_id")}]

    def _response_done(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        self.awaiting = False
        if self.response_id is None:
            return []
        status, text = event.get("status", "completed"), event.get("text", "")
        item = {"id": self.output_item, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "completed" if status == "completed" else "incomplete",
                "content": [{"type": "output_audio", "transcript": text}]}  # fmt: skip
        where = self._where()
        response = {"id": self.response_id, "object": "realtime.response", "status": status,
                    "output": [item], "output_modalities": ["audio"], "usage": None}  # fmt: skip
        self.response_id = self.output_item = None
        return [
            {"type": "response.output_audio.done", **where},
            {"type": "response.output_audio_transcript.done", **where, "transcript": text},
            {
                "type": "response.output_item.done",
                "response_id": where["response_id"],
                "output_index": 0,
                "item": item,
            },
            {"type": "response.done", "response": response},
        ]

    def _error(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        return [realtime_error(str(event.get("code", "internal_error")), str(event.get("message", "")))]

    _SESSION_EVENTS: ClassVar[dict[str, Any]] = {
        "session.created": _created,
        "session.updated": _updated,
        "input_audio_buffer.speech_started": _speech_started,
        "input_audio_buffer.speech_stopped": _speech_stopped,
        "conversation.item.input_audio_transcription.completed": _transcribed,
        "response.created": _response_created,
        "response.output_text.delta": _text_delta,
        "response.output_audio.clear": _audio_clear,
        "response.done": _response_done,
        "error": _error,
    }

    def audio_delta(self, pcm: bytes) -> dict[str, Any] | None:
        """A ``response.output_audio.delta`` for pcm16 24 kHz reply audio (None outside a response)."""
        if self.response_id is None or not pcm:
            return None
        return self._stamp(
            {"type": "response.output_audio.delta", **self._where(), "delta": base64.b64encode(pcm).decode()}
        )
