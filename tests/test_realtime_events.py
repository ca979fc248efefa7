"""The OpenAI Realtime <-> duplex protocol translation, event by event (no sockets)."""

from __future__ import annotations

import base64
import json

from core.api.realtime_events import RealtimeTranslator
from core.protocol import (
    ErrorCode,
    ErrorEvent,
    ResponseCreated,
    ResponseDone,
    ResponseOutputAudioClear,
    ResponseOutputTextDelta,
    SessionCreated,
    SessionInfo,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TranscriptionCompleted,
    dump_event,
    parse_client_event,
)

INFO = SessionInfo(
    id="s1", voice="tone", voices=["tone", "low"], instructions="Be brief.", models={"asr": "whisper-base"}
)


def started() -> RealtimeTranslator:
    t = RealtimeTranslator("gpt-realtime")
    assert [json.loads(e)["session"] for e in t.start()] == [{"audio_format": "pcm16"}]
    [created] = t.from_session(dump_event(SessionCreated(session=INFO)))
    assert created["type"] == "session.created"
    assert (
        t.from_session(dump_event(SessionUpdated(session=INFO))) == []
    )  # the answer to our own pcm16 update
    return t


def test_session_created_describes_the_session_in_realtime_terms() -> None:
    t = RealtimeTranslator("gpt-realtime")
    [created] = t.from_session(dump_event(SessionCreated(session=INFO)))
    session = created["session"]
    assert created["event_id"].startswith("event_")
    assert session["model"] == "gpt-realtime" and session["instructions"] == "Be brief."
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["output"] == {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "tone"}
    assert session["audio"]["input"]["transcription"]["model"] == "whisper-base"


def test_session_update_maps_onto_ours_and_is_answered() -> None:
    t = started()
    actions = t.from_client(json.dumps({
        "type": "session.update",
        "session": {"type": "realtime", "instructions": "Speak French.",
                    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                        "transcription": {"language": "fr"}},
                              "output": {"voice": "low"}}},
    }))  # fmt: skip
    [ours] = actions.to_session
    assert parse_client_event(ours).session.model_dump(exclude_none=True) == {
        "instructions": "Speak French.", "voice": "low", "language": "fr"
    }  # fmt: skip
    [updated] = t.from_session(dump_event(SessionUpdated(session=INFO)))
    assert updated["type"] == "session.updated"


def test_openai_voice_names_keep_the_server_voice_and_beta_fields_are_read() -> None:
    t = started()
    [ours] = t.from_client(json.dumps({
        "type": "session.update",
        "session": {"voice": "alloy", "input_audio_format": "pcm16", "input_audio_transcription": {"language": "de"}},
    })).to_session  # fmt: skip
    assert json.loads(ours)["session"] == {"language": "de"}


def test_other_audio_formats_are_refused() -> None:
    t = started()
    actions = t.from_client(json.dumps({
        "type": "session.update", "event_id": "c1",
        "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}},
    }))  # fmt: skip
    assert actions.to_session == []
    [error] = actions.to_client
    assert error["type"] == "error"
    assert (
        error["error"]["code"] == "unsupported_format" and error["error"]["type"] == "invalid_request_error"
    )
    assert error["error"]["event_id"] == "c1" and error["error"]["param"] == "audio.input.format"


def test_appended_audio_is_decoded_and_bad_audio_refused() -> None:
    t = started()
    pcm = b"\x01\x00\xff\x7f" * 10
    actions = t.from_client(
        json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})
    )
    assert actions.audio == [pcm] and actions.to_client == []
    for audio, code in (
        ("!!not base64!!", "bad_audio"),
        (base64.b64encode(b"\x01").decode(), "bad_audio"),
        (None, "invalid_event"),
    ):
        actions = t.from_client(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        assert actions.audio == [] and actions.to_client[0]["error"]["code"] == code


def test_garbage_and_unknown_events_get_errors() -> None:
    t = started()
    assert t.from_client("{not json").to_client[0]["error"]["code"] == "bad_json"
    assert t.from_client("[1, 2]").to_client[0]["error"]["code"] == "invalid_event"
    unknown = t.from_client(json.dumps({"type": "conversation.item.create", "item": {}})).to_client[0][
        "error"
    ]
    assert unknown["code"] == "unknown_event" and "input_audio_buffer.append" in unknown["message"]


def test_response_create_commits_only_when_nothing_is_committed() -> None:
    t = started()
    assert t.from_client('{"type": "response.create"}').to_session == ['{"type":"input_audio_buffer.commit"}']
    assert t.from_client('{"type": "response.create"}').to_session == []  # already answering
    t.from_session(dump_event(ResponseDone(response_id="resp_1", status="completed")))
    assert t.from_client('{"type": "input_audio_buffer.commit"}').to_session == [
        '{"type":"input_audio_buffer.commit"}'
    ]
    assert t.from_client('{"type": "response.create"}').to_session == []  # the commit already asked for one
    assert t.from_client('{"type": "response.cancel"}').to_session == ['{"type":"response.cancel"}']
    # a cancel before any response.* came: nothing is awaited any more, the next create commits again
    assert t.from_client('{"type": "response.create"}').to_session == ['{"type":"input_audio_buffer.commit"}']


def test_a_turn_without_words_does_not_swallow_the_next_response_create() -> None:
    # A committed turn that heard no words sends no response.*; new speech starts a new turn all the same.
    t = started()
    assert t.from_client('{"type": "input_audio_buffer.commit"}').to_session
    t.from_session(dump_event(SpeechStarted(audio_start_ms=1000)))
    assert t.from_client('{"type": "response.create"}').to_session == ['{"type":"input_audio_buffer.commit"}']


def test_one_spoken_turn_becomes_the_realtime_event_sequence() -> None:
    t = started()
    out = []
    for event in (SpeechStarted(audio_start_ms=100), SpeechStopped(audio_end_ms=1600),
                  TranscriptionCompleted(item_id="item_1", transcript="hello there"),
                  ResponseCreated(response_id="resp_1"), ResponseOutputTextDelta(response_id="resp_1", delta="Hi")):  # fmt: skip
        out += t.from_session(dump_event(event))
    audio = t.audio_delta(b"\x00\x01" * 480)
    out += [audio] if audio else []
    out += t.from_session(dump_event(ResponseDone(response_id="resp_1", status="completed", text="Hi")))
    assert [e["type"] for e in out] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.completed",
        "response.created",
        "response.output_item.added",
        "response.output_audio_transcript.delta",
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.output_item.done",
        "response.done",
    ]
    user_item = out[0]["item_id"]
    assert out[1]["item_id"] == out[2]["item_id"] == out[3]["item_id"] == user_item
    assert out[3]["transcript"] == "hello there" and out[3]["usage"] == {"type": "duration", "seconds": 1.5}
    reply_item = out[5]["item"]["id"]
    assert reply_item != user_item
    assert {e.get("item_id") for e in out[6:10]} == {reply_item}
    assert base64.b64decode(out[7]["delta"]) == b"\x00\x01" * 480
    done = out[-1]["response"]
    assert done["id"] == "resp_1" and done["status"] == "completed"
    assert done["output"][0]["content"] == [{"type": "output_audio", "transcript": "Hi"}]
    assert len({e["event_id"] for e in out}) == len(out)
    assert t.audio_delta(b"\x00\x01") is None  # no audio outside a response


def test_barge_in_and_errors_are_forwarded() -> None:
    t = started()
    t.from_session(dump_event(ResponseCreated(response_id="resp_2")))
    [cleared] = t.from_session(dump_event(ResponseOutputAudioClear(response_id="resp_2")))
    assert cleared == {**cleared, "type": "output_audio_buffer.cleared", "response_id": "resp_2"}
    done = t.from_session(dump_event(ResponseDone(response_id="resp_2", status="cancelled")))
    assert done[-1]["response"]["status"] == "cancelled"
    [error] = t.from_session(dump_event(ErrorEvent(code=ErrorCode.INTERNAL_ERROR, message="asr failed")))
    assert error["error"] == {"type": "server_error", "code": "internal_error", "message": "asr failed",
                              "param": None, "event_id": None}  # fmt: skip
    assert t.from_session('{"type": "session.paused"}') == []  # no Realtime counterpart
