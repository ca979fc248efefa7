"""The wire protocol: every JSON event of the duplex WebSocket, shared by client, gateway and worker.

Text frames carry one JSON event ``{"type": ..., ...}``; binary frames carry audio packets
(``core.audio.framing``). Names follow the OpenAI Realtime API where one fits; queue events are ours.
docs/PROTOCOL.md is generated from this module (``python -m core.protocol``) and a test keeps it fresh.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

#: Largest text frame a peer may send; longer ones are refused without parsing.
MAX_TEXT_FRAME_BYTES = 64 * 1024


class ErrorCode(StrEnum):
    """Stable error codes carried by ``error`` events and HTTP error bodies."""

    BAD_JSON = "bad_json"
    UNKNOWN_EVENT = "unknown_event"
    INVALID_EVENT = "invalid_event"
    BAD_AUDIO = "bad_audio"
    UNSUPPORTED_FORMAT = "unsupported_format"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    BUSY = "busy"
    WORKER_LOST = "worker_lost"
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    SESSION_CLOSED = "session_closed"
    RECEIVE_TIMEOUT = "receive_timeout"
    NOT_READY = "not_ready"
    INTERNAL_ERROR = "internal_error"


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    event_id: str | None = Field(None, max_length=128, description="Optional id chosen by the sender.")


# --------------------------------------------------------------------------- client -> server


class TurnDetection(BaseModel):
    """How the server decides that the user has finished (as in the OpenAI Realtime API).

    ``server_vad``: a fixed silence after speech ends the turn. ``semantic_vad``: a turn model judges from
    the audio whether the user has finished, and ``eagerness`` sets how readily it ends the turn.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["server_vad", "semantic_vad"] = Field(description="server_vad or semantic_vad.")
    eagerness: Literal["low", "medium", "high", "auto"] | None = Field(
        None, description="semantic_vad only: low waits longest, high answers soonest; auto is medium."
    )
    silence_duration_ms: int | None = Field(
        None, ge=100, le=5000, description="server_vad only: the silence that ends a turn."
    )


class SessionSettings(BaseModel):
    """Settings a client may change with ``session.update``; unset fields keep their value."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    audio_format: Literal["opus", "pcm16"] | None = Field(
        None, description="Input audio: length-prefixed Opus packets or raw pcm16 LE 16 kHz; unset: detected."
    )
    sample_rate: Literal[16000] | None = Field(None, description="Input sample rate (only 16000).")
    voice: str | None = Field(None, max_length=128, description="TTS voice name.")
    instructions: str | None = Field(None, max_length=8000, description="System prompt for the assistant.")
    language: str | None = Field(None, max_length=16, description="ASR language code; unset: detect.")
    record: bool | None = Field(
        None,
        description="Record this session under data/sessions/ (only where the server's config sets "
        "duplex.client_recording; otherwise the server's duplex.record decides).",
    )
    turn_detection: TurnDetection | None = Field(None, description="How the end of the user's turn is found.")


class SessionUpdate(_Event):
    """Change session settings."""

    type: Literal["session.update"] = "session.update"
    session: SessionSettings = SessionSettings()


class InputAudioBufferCommit(_Event):
    """End the user's turn now, without waiting for the silence window."""

    type: Literal["input_audio_buffer.commit"] = "input_audio_buffer.commit"


class ResponseCancel(_Event):
    """Stop the current response (as a barge-in does)."""

    type: Literal["response.cancel"] = "response.cancel"


class SessionPause(_Event):
    """Stop listening and speaking until ``session.resume``."""

    type: Literal["session.pause"] = "session.pause"


class SessionResume(_Event):
    """Resume a paused session."""

    type: Literal["session.resume"] = "session.resume"


class SessionClose(_Event):
    """End the session."""

    type: Literal["session.close"] = "session.close"


ClientEvent = Annotated[
    SessionUpdate | InputAudioBufferCommit | ResponseCancel | SessionPause | SessionResume | SessionClose,
    Field(discriminator="type"),
]

# --------------------------------------------------------------------------- server -> client


class SessionQueued(_Event):
    """The client waits in the gateway queue."""

    type: Literal["session.queued"] = "session.queued"
    position: int = Field(description="1 = next to be served.")
    eta_s: float = Field(description="Expected seconds until a worker is free.")
    queue_length: int = 0


class SessionQueueUpdate(_Event):
    """Position or ETA changed (sent on every change and at least every few seconds)."""

    type: Literal["session.queue_update"] = "session.queue_update"
    position: int
    eta_s: float
    queue_length: int = 0


class SessionQueueDone(_Event):
    """The wait is over; a worker is assigned."""

    type: Literal["session.queue_done"] = "session.queue_done"
    waited_s: float = 0.0


class SessionInfo(BaseModel):
    """The effective session settings."""

    model_config = ConfigDict(frozen=True)
    id: str
    input_audio_format: str = "opus"
    input_sample_rate: int = 16000
    output_audio_format: str = "opus"
    output_sample_rate: int = 24000
    frame_ms: int = 20
    playback_delay_ms: int = 200
    voice: str | None = None
    voices: list[str] = []
    language: str | None = None
    instructions: str = ""
    record: bool = False
    turn_detection: dict[str, Any] = {}
    models: dict[str, str] = {}


class SessionCreated(_Event):
    """The session is live on a worker."""

    type: Literal["session.created"] = "session.created"
    session: SessionInfo


class SessionUpdated(_Event):
    """Acknowledges ``session.update`` with the effective settings."""

    type: Literal["session.updated"] = "session.updated"
    session: SessionInfo


class SpeechStarted(_Event):
    """VAD heard the user start speaking."""

    type: Literal["input_audio_buffer.speech_started"] = "input_audio_buffer.speech_started"
    audio_start_ms: int


class SpeechStopped(_Event):
    """The user's turn ended (silence window or commit)."""

    type: Literal["input_audio_buffer.speech_stopped"] = "input_audio_buffer.speech_stopped"
    audio_end_ms: int


class TranscriptionCompleted(_Event):
    """The user's utterance as text."""

    type: Literal["conversation.item.input_audio_transcription.completed"] = (
        "conversation.item.input_audio_transcription.completed"
    )
    item_id: str
    transcript: str
    language: str | None = None


class ResponseCreated(_Event):
    """A reply starts; audio packets until its ``response.done`` belong to it."""

    type: Literal["response.created"] = "response.created"
    response_id: str


class ResponseOutputTextDelta(_Event):
    """A piece of the reply text."""

    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    response_id: str
    delta: str


class ResponseOutputAudioClear(_Event):
    """Barge-in: drop every buffered packet of this response now; none of it follows."""

    type: Literal["response.output_audio.clear"] = "response.output_audio.clear"
    response_id: str


class TurnTimings(BaseModel):
    """Per-stage latencies of one turn in milliseconds (None where a stage did not run)."""

    model_config = ConfigDict(frozen=True)
    endpoint_ms: float | None = Field(None, description="End of speech to end-of-turn decision.")
    end_of_turn: Literal["turn_model", "words", "silence", "commit"] | None = Field(
        None,
        description="What ended the turn: both judges at the pause, the words (after a shorter silence), "
        "the silence limit, or the client's commit.",
    )
    turn_probability: float | None = Field(
        None, description="semantic_vad: the turn model's P(complete) from the audio at the pause."
    )
    text_probability: float | None = Field(
        None, description="semantic_vad: the LLM's P(the user's message ends here) from the transcript."
    )
    preemptive: bool | None = Field(
        None, description="Whether this reply was started at the pause, before the turn was confirmed."
    )
    asr_ms: float | None = Field(None, description="Transcription time.")
    llm_first_token_ms: float | None = Field(None, description="ASR done to first LLM token.")
    first_sentence_ms: float | None = Field(None, description="ASR done to first clause ready for TTS.")
    tts_first_audio_ms: float | None = Field(None, description="First clause to first TTS audio.")
    voice_to_voice_ms: float | None = Field(
        None, description="End of user speech to first audio packet sent."
    )
    total_ms: float | None = Field(None, description="End of turn to response done.")
    audio_s: float | None = Field(None, description="Seconds of reply audio sent.")


class ResponseDone(_Event):
    """A reply finished, was cancelled, or failed."""

    type: Literal["response.done"] = "response.done"
    response_id: str
    status: Literal["completed", "cancelled", "failed"]
    text: str = ""
    timings: TurnTimings = TurnTimings()


class SessionPaused(_Event):
    """The session is paused."""

    type: Literal["session.paused"] = "session.paused"


class SessionResumed(_Event):
    """The session listens again."""

    type: Literal["session.resumed"] = "session.resumed"


class SessionClosed(_Event):
    """The session ended; the socket closes after this."""

    type: Literal["session.closed"] = "session.closed"
    reason: str


class ErrorEvent(_Event):
    """Something went wrong; ``code`` is stable, ``message`` is for people. Never a traceback."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    fatal: bool = False


ServerEvent = Annotated[
    SessionQueued
    | SessionQueueUpdate
    | SessionQueueDone
    | SessionCreated
    | SessionUpdated
    | SpeechStarted
    | SpeechStopped
    | TranscriptionCompleted
    | ResponseCreated
    | ResponseOutputTextDelta
    | ResponseOutputAudioClear
    | ResponseDone
    | SessionPaused
    | SessionResumed
    | SessionClosed
    | ErrorEvent,
    Field(discriminator="type"),
]

CLIENT_EVENTS: tuple[type[_Event], ...] = (
    SessionUpdate,
    InputAudioBufferCommit,
    ResponseCancel,
    SessionPause,
    SessionResume,
    SessionClose,
)
SERVER_EVENTS: tuple[type[_Event], ...] = (
    SessionQueued,
    SessionQueueUpdate,
    SessionQueueDone,
    SessionCreated,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TranscriptionCompleted,
    ResponseCreated,
    ResponseOutputTextDelta,
    ResponseOutputAudioClear,
    ResponseDone,
    SessionPaused,
    SessionResumed,
    SessionClosed,
    ErrorEvent,
)
_CLIENT_TYPES = {cls.model_fields["type"].default for cls in CLIENT_EVENTS}
_client_adapter: TypeAdapter[Any] = TypeAdapter(ClientEvent)
_server_adapter: TypeAdapter[Any] = TypeAdapter(ServerEvent)


class ProtocolError(ValueError):
    """A frame that is not a valid event; carries the ``error`` event to answer with."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_event(self) -> ErrorEvent:
        """The ``error`` event that reports this problem to the peer."""
        return ErrorEvent(code=self.code, message=self.message)


#: Deepest nesting any JSON input may have. Our events and API bodies need 5; a client's chat message content
#: or tool schema a little more. Deeper input is refused before the parser recurses into it.
MAX_JSON_DEPTH = 64
_JSON_SPECIAL = re.compile(r'[\[\]{}"]')


class JSONTooDeep(ValueError):
    """JSON nested deeper than ``MAX_JSON_DEPTH``."""


def json_depth(text: str) -> int:
    """How deeply ``text``'s arrays and objects nest (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = False
    for match in _JSON_SPECIAL.finditer(text):
        c = match.group()
        if c == '"':
            if not _escaped(text, match.start()):
                in_string = not in_string
        elif in_string:
            continue
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _escaped(text: str, i: int) -> bool:
    """Whether the character at ``i`` is escaped (an odd run of backslashes before it)."""
    n = 0
    while i - n - 1 >= 0 and text[i - n - 1] == "\\":
        n += 1
    return n % 2 == 1


def parse_json(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with a nesting bound: raises ``JSONTooDeep`` (a ``ValueError``) past ``max_depth``.

    Every JSON input from a client or a peer goes through here: the standard parser recurses once per level
    and a few thousand levels end in ``RecursionError``, which no handler expects. Counting brackets first
    costs nothing when there are few of them (most bodies, even megabytes of base64 audio).
    """
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8")
    if text.count("[") + text.count("{") > max_depth and json_depth(text) > max_depth:
        raise JSONTooDeep(f"JSON nested deeper than {max_depth} levels")
    return json.loads(text)


def _loads(text: str | bytes) -> dict[str, Any]:
    if len(text) > MAX_TEXT_FRAME_BYTES:
        raise ProtocolError(ErrorCode.PAYLOAD_TOO_LARGE, f"text frame over {MAX_TEXT_FRAME_BYTES} bytes")
    try:
        data = parse_json(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(
            ErrorCode.BAD_JSON, f"not valid JSON: {exc.msg if hasattr(exc, 'msg') else exc}"
        ) from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, "an event must be a JSON object")
    if not isinstance(data.get("type"), str):
        raise ProtocolError(ErrorCode.INVALID_EVENT, "an event needs a string 'type'")
    return data


def _first_problem(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"][1:]) or "event"
    return f"{where}: {first['msg']}"


def parse_client_event(text: str | bytes) -> Any:
    """Parse one client text frame; raise ``ProtocolError`` with a stable code on anything invalid."""
    data = _loads(text)
    if data["type"] not in _CLIENT_TYPES:
        raise ProtocolError(ErrorCode.UNKNOWN_EVENT, f"unknown event type {data['type'][:64]!r}")
    try:
        return _client_adapter.validate_python(data)
    except ValidationError as exc:
        raise ProtocolError(ErrorCode.INVALID_EVENT, f"{data['type']}: {_first_problem(exc)}") from None


def parse_server_event(text: str | bytes) -> Any:
    """Parse one server text frame (used by clients, the gateway and tests)."""
    data = _loads(text)
    try:
        return _server_adapter.validate_python(data)
    except ValidationError as exc:
        raise ProtocolError(ErrorCode.INVALID_EVENT, f"{data['type']}: {_first_problem(exc)}") from None


def dump_event(event: BaseModel) -> str:
    """Serialise an event for a text frame (unset optional ids left out)."""
    return event.model_dump_json(exclude_none=True)


def error_event(code: ErrorCode, message: str, *, fatal: bool = False) -> str:
    """A serialised ``error`` event."""
    return dump_event(ErrorEvent(code=code, message=message, fatal=fatal))


# --------------------------------------------------------------------------- docs


def _fields_table(cls: type[BaseModel]) -> list[str]:
    rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in cls.model_fields.items():
        if name == "type" and not field.is_required():  # an event's own name, shown in its heading
            continue
        ann = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
        value = None if field.is_required() else field.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_none=True)
        default = "required" if field.is_required() else json.dumps(value, default=str)
        # Nested models by their own name, however this module was loaded (python -m runs it as __main__).
        ann = ann.replace("__main__.", "").replace(f"{__name__}.", "").replace("|", "\\|")
        rows.append(f"| `{name}` | `{ann}` | `{default}` | {field.description or ''} |")
    return rows


def render_protocol_doc() -> str:
    """The text of docs/PROTOCOL.md."""
    out = [
        "# Wire protocol",
        "",
        "Generated from `core/protocol.py` by `python -m core.protocol > docs/PROTOCOL.md`; a test fails when stale.",
        "",
        "Endpoint: `wss://HOST:8006/ws/duplex` (gateway) or `ws://127.0.0.1:22400+N/ws/duplex` (worker).",
        'Text frames carry one JSON event `{"type": ...}`; binary frames carry audio.',
        "",
        "## Audio frames",
        "",
        "A binary frame holds zero or more whole or partial packets `[uint16 little-endian length][Opus packet]`;",
        "a packet may be split across frames and several may share one. A length of 0 or over 1275 is an error.",
        "Input: Opus 16 kHz mono, 20 ms frames (or raw pcm16 LE 16 kHz when `session.update` declares `pcm16`;",
        "undeclared streams are detected from their first bytes). Output: Opus 24 kHz mono, 20 ms frames.",
        "Every output packet belongs to the response between its `response.created` and `response.done`;",
        "after `response.output_audio.clear` no packet of that response is sent.",
        "",
        "## Error codes",
        "",
        *[f"- `{code.value}`" for code in ErrorCode],
        "",
        "## Client → server events",
        "",
    ]
    for group in (CLIENT_EVENTS, SERVER_EVENTS):
        if group is SERVER_EVENTS:
            out += ["## Server → client events", ""]
        for cls in group:
            out += [f"### `{cls.model_fields['type'].default}`", "", (cls.__doc__ or "").strip(), ""]
            out += [*_fields_table(cls), ""]
    for obj in (SessionSettings, TurnDetection, SessionInfo, TurnTimings):
        out += [f"### `{obj.__name__}` object", "", (obj.__doc__ or "").strip(), "", *_fields_table(obj), ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(render_protocol_doc(), end="")
