"""Wire events: parsing, stable error codes, and the generated docs/PROTOCOL.md."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.protocol import (
    CLIENT_EVENTS,
    SERVER_EVENTS,
    ErrorCode,
    ProtocolError,
    ResponseDone,
    SessionUpdate,
    TurnTimings,
    dump_event,
    parse_client_event,
    parse_server_event,
    render_protocol_doc,
)

ROOT = Path(__file__).resolve().parents[1]


def test_protocol_doc_is_fresh() -> None:
    on_disk = (ROOT / "docs" / "PROTOCOL.md").read_text()
    assert on_disk == render_protocol_doc(), "run: python -m core.protocol > docs/PROTOCOL.md"


def test_every_design_event_exists() -> None:
    names = {cls.model_fields["type"].default for cls in CLIENT_EVENTS + SERVER_EVENTS}
    for name in [
        "session.update", "input_audio_buffer.commit", "response.cancel", "session.pause", "session.resume",
        "session.close", "session.queued", "session.queue_update", "session.queue_done", "session.created",
        "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
        "conversation.item.input_audio_transcription.completed", "response.created",
        "response.output_text.delta", "response.output_audio.clear", "response.done", "session.paused",
        "session.resumed", "session.closed", "error",
    ]:  # fmt: skip
        assert name in names


def test_client_event_round_trip() -> None:
    ev = parse_client_event(
        '{"type": "session.update", "session": {"voice": "joe", "audio_format": "pcm16"}}'
    )
    assert isinstance(ev, SessionUpdate)
    assert ev.session.voice == "joe" and ev.session.audio_format == "pcm16"
    assert parse_client_event(dump_event(ev)) == ev


def test_server_event_round_trip() -> None:
    ev = ResponseDone(response_id="r1", status="cancelled", timings=TurnTimings(asr_ms=12.5))
    assert parse_server_event(dump_event(ev)) == ev


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{", ErrorCode.BAD_JSON),
        ("[1]", ErrorCode.BAD_JSON),
        (b"\xff\xfe", ErrorCode.BAD_JSON),
        ('{"no": "type"}', ErrorCode.INVALID_EVENT),
        ('{"type": 5}', ErrorCode.INVALID_EVENT),
        ('{"type": "response.create"}', ErrorCode.UNKNOWN_EVENT),
        ('{"type": "session.update", "session": {"sample_rate": 8000}}', ErrorCode.INVALID_EVENT),
        ('{"type": "session.update", "session": {"bogus": 1}}', ErrorCode.INVALID_EVENT),
        ('{"type": "session.close", "extra": 1}', ErrorCode.INVALID_EVENT),
        (
            '{"type": "session.update", "session": {"instructions": "' + "x" * 70000 + '"}}',
            ErrorCode.PAYLOAD_TOO_LARGE,
        ),
    ],
)
def test_bad_frames_map_to_stable_codes(frame: str | bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_client_event(frame)
    assert err.value.code == code
    event = json.loads(dump_event(err.value.to_event()))
    assert event["type"] == "error" and event["code"] == code.value
    assert "Traceback" not in event["message"]


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_any_frame_parses_or_raises_protocol_error(frame: str | bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_client_event(frame)


@given(
    st.dictionaries(
        st.text(max_size=10),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
            max_leaves=8,
        ),
        max_size=5,
    )
)
def test_any_json_object_parses_or_raises_protocol_error(obj: dict) -> None:
    for t in ("session.update", "session.close", None):
        if t:
            obj = {**obj, "type": t}
        with contextlib.suppress(ProtocolError):
            parse_client_event(json.dumps(obj))
