"""End of turn and preemptive replies, on the virtual clock with scripted fakes (see tests/test_session.py).

The microphone plays tones for speech and silence for pauses; the fake turn model answers scripted
probabilities after a scripted latency. Every assertion says *when*: the turn ends at the pause plus the
turn model's latency when it is confident, at the silence limit when it is not; a preemptive reply's
first packet leaves at the pause plus the cascade's latencies; and a discarded reply sends nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.test_session import ASR_S, SR, TTFT_S, TTS_S, live, run, silence, speaking_turn, tone

CASCADE_S = ASR_S + TTFT_S + TTS_S
FRAME_S = 0.02
VAD_S = 0.032
SEMANTIC = {"turn_detection": "semantic_vad", "preemptive_reply": False}
PREEMPTIVE = {"turn_detection": "semantic_vad", "preemptive_reply": True}


def speech_end(h: Any) -> float:
    """End of the last voiced VAD window the session saw, in seconds of input."""
    ends = [v["end"] for v in h.session.timeline.of_kind("voice") if v["event"] == "speech_end"]
    return float(ends[-1]) / SR


def paused_sentence() -> np.ndarray:
    """0.48 s of silence, 0.8 s of speech, a 0.6 s pause inside the sentence, 0.8 s more speech."""
    return np.concatenate([silence(0.48), tone(0.8), silence(0.6), tone(0.8)])


def thinking_at(h: Any) -> float:
    return next(t for t, s in h.state_times() if s == "thinking")


# ----------------------------------------------------------------------------------------- semantic_vad


def test_a_confident_turn_model_ends_the_turn_at_the_pause() -> None:
    async def body() -> None:
        async with live(SEMANTIC, turn_probability=0.9, turn_latency=0.04) as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            end = speech_end(h)
            # The pause is reported 200 ms after the last voiced window (at frame granularity). Both judges
            # answer: the turn model after 40 ms, the words after the transcript (ASR 100 ms, no preemptive
            # reply here to make it); the turn ends then, and the turn reuses that transcript.
            assert end + 0.2 + ASR_S <= thinking_at(h) <= end + 0.2 + ASR_S + FRAME_S + 1e-6
            assert len(h.asr.calls) == 1 and h.llm.judged == ["what is the weather like"]
            ((_, done),) = h.wire.events("response.done")
            t = done["timings"]
            assert (t["end_of_turn"], t["turn_probability"], t["text_probability"]) == (
                "turn_model",
                0.9,
                1.0,
            )
            assert t["preemptive"] is False
            assert 300 <= t["endpoint_ms"] <= 300 + FRAME_S * 1000 + 1e-6
            assert h.session.counters.turns_semantic == 1 and h.session.counters.turns_silence == 0
            # The model heard the utterance up to the pause, with the pre-roll before the onset.
            (heard,) = h.session.stack.turn.calls
            assert heard == pytest.approx(0.96 + 0.2 + 0.2, abs=0.06)

    run(body)


@pytest.mark.parametrize(
    ("eagerness", "limit_s"), [("auto", 1.2), ("low", 2.0), ("medium", 1.2), ("high", 0.8)]
)
def test_unfinished_words_wait_for_the_eagerness_silence_limit(eagerness: str, limit_s: float) -> None:
    async def body() -> None:
        # The audio sounds finished, but the words are not ("I would like to order"): no early end.
        async with live({**PREEMPTIVE, "eagerness": eagerness}, turn_probability=0.99) as h:
            h.llm.end_of_turn = 0.0
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            end = speech_end(h)
            assert end + limit_s <= thinking_at(h) <= end + limit_s + FRAME_S + 1e-6
            assert h.session.counters.turns_silence == 1
            ((_, done),) = h.wire.events("response.done")
            t = done["timings"]
            assert (t["end_of_turn"], t["turn_probability"], t["text_probability"]) == ("silence", 0.99, 0.0)

    run(body)


@pytest.mark.parametrize(("eagerness", "after_s"), [("low", 1.0), ("medium", 0.6), ("high", 0.4)])
def test_finished_words_with_unsure_audio_end_the_turn_after_a_shorter_silence(
    eagerness: str, after_s: float
) -> None:
    async def body() -> None:
        async with live({**PREEMPTIVE, "eagerness": eagerness}, turn_probability=0.1) as h:
            h.llm.end_of_turn = 0.5
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            end = speech_end(h)
            assert end + after_s <= thinking_at(h) <= end + after_s + FRAME_S + 1e-6
            ((_, done),) = h.wire.events("response.done")
            assert done["timings"]["end_of_turn"] == "words"
            assert h.session.counters.turns_semantic == 1

    run(body)


def test_without_a_words_judge_the_turn_model_alone_decides() -> None:
    async def body() -> None:
        async with live(PREEMPTIVE, turn_probability=0.1) as h:
            # an LLM that cannot judge words: nothing shortens the silence, the limit ends the turn
            object.__setattr__(h.session.stack, "llm", _NoJudge(h.llm))
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            assert thinking_at(h) >= speech_end(h) + 1.2
            assert h.llm.judged == []

    run(body)


class _NoJudge:
    """A fake LLM without ``end_of_turn_probability``."""

    name = "no-judge"

    def __init__(self, llm: Any) -> None:
        self.stream, self.warmup = llm.stream, llm.warmup


def test_eagerness_sets_how_sure_the_model_must_be() -> None:
    async def body() -> None:
        # 0.6 is sure at medium (threshold 0.5): the turn ends at the pause; at low (0.8) the finished
        # words end it after low's longer silence.
        for eagerness, how in (("medium", "turn_model"), ("low", "words")):
            async with live({**PREEMPTIVE, "eagerness": eagerness}, turn_probability=0.6) as h:
                await h.mic.play(speaking_turn())
                await h.mic.silence_until(lambda h=h: "response.done" in h.wire.types())
                ((_, done),) = h.wire.events("response.done")
                assert done["timings"]["end_of_turn"] == how

    run(body)


def test_a_paused_sentence_gets_one_reply() -> None:
    async def body() -> None:
        async with live(
            PREEMPTIVE, turn_probability=[0.1, 0.9], transcript=["I would like", "I would like a pizza"]
        ) as h:
            h.llm.end_of_turn = 0.02  # finished words, but not at the first pause: the audio is unsure there
            await h.mic.play(paused_sentence())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            await h.mic.silence(1.0)
            assert h.states() == ["user_speaking", "thinking", "speaking", "listening"]
            transcripts = [
                e["transcript"]
                for _, e in h.wire.events("conversation.item.input_audio_transcription.completed")
            ]
            assert transcripts == ["I would like a pizza"]
            assert len(h.wire.events("response.created")) == 1
            # Nothing at all was sent before the whole sentence was over.
            end = speech_end(h)
            assert end == pytest.approx(0.48 + 0.8 + 0.6 + 0.8, abs=VAD_S)
            first_reply_event = h.wire.first("response.created")[0]
            assert min(h.wire.audio_times()) > end and first_reply_event > end
            c = h.session.counters
            assert (c.preemptive_started, c.preemptive_discarded, c.preemptive_used) == (2, 1, 1)

    run(body)


# ----------------------------------------------------------------------------------------- preemptive replies


def test_a_preemptive_reply_cancelled_by_resumed_speech_sends_no_packet() -> None:
    async def body() -> None:
        # The model never ends the turn: the user's own silence does, after the second half.
        async with live(PREEMPTIVE, turn_probability=0.1, transcript=["first half", "whole thing"]) as h:
            h.llm.end_of_turn = 0.0  # nor do the words ("first half")
            await h.mic.play(np.concatenate([silence(0.48), tone(0.8), silence(0.9)]))
            # The draft started at the pause and has had time to make its audio: all of it is held.
            assert h.session.counters.preemptive_started == 1
            assert h.wire.audio_times() == [] and "response.created" not in h.wire.types()
            assert h.tts.calls, "the draft reached the TTS while the user paused"
            await h.mic.play(tone(0.8))  # the user goes on
            assert h.session.counters.preemptive_discarded == 1
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            await h.mic.silence(0.5)
            transcripts = [
                e["transcript"]
                for _, e in h.wire.events("conversation.item.input_audio_transcription.completed")
            ]
            assert transcripts == ["whole thing"]
            ((_, done),) = h.wire.events("response.done")
            assert done["status"] == "completed" and done["response_id"] == "resp_2"
            assert [e["response_id"] for _, e in h.wire.events("response.created")] == ["resp_2"]

    run(body)


def test_a_confirmed_preemptive_reply_is_the_reply_the_user_hears() -> None:
    async def body() -> None:
        async with live({"turn_detection": "server_vad", "preemptive_reply": True}) as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            end = speech_end(h)
            # The silence endpoint confirms at 500 ms, but the reply started at the 200 ms pause, so its first
            # packet leaves a cascade after the pause (600 ms) instead of a cascade after the endpoint (900 ms).
            first_packet = min(h.wire.audio_times())
            assert end + 0.5 <= thinking_at(h) <= end + 0.5 + FRAME_S + 1e-6
            assert end + 0.2 + CASCADE_S <= first_packet <= end + 0.2 + CASCADE_S + FRAME_S + 1e-6
            ((_, done),) = h.wire.events("response.done")
            t = done["timings"]
            assert t["preemptive"] is True and done["status"] == "completed"
            assert t["voice_to_voice_ms"] == pytest.approx((first_packet - end) * 1000, abs=VAD_S * 1000)
            assert done["text"] == "Hello there, this is a short answer."
            c = h.session.counters
            assert (c.preemptive_started, c.preemptive_used, c.preemptive_discarded) == (1, 1, 0)
            # It went into the history like any reply.
            assert [m.role for m in h.session.conversation.history] == ["user", "assistant"]

    run(body)


def test_with_a_confident_model_the_preemptive_reply_arrives_a_cascade_after_the_pause() -> None:
    async def body() -> None:
        async with live(PREEMPTIVE, turn_probability=0.9, turn_latency=0.04) as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            ((_, done),) = h.wire.events("response.done")
            t = done["timings"]
            # pause (200 ms) + ASR + first token + first audio, not pause + model + cascade
            assert (
                200 + CASCADE_S * 1000
                <= t["voice_to_voice_ms"]
                <= 200 + CASCADE_S * 1000 + FRAME_S * 1000 + 1e-3
            )
            assert t["preemptive"] is True and t["turn_probability"] == 0.9

    run(body)


@pytest.mark.parametrize(
    ("second", "adopted"), [("what is the weather like?", True), ("something else", False)]
)
def test_a_commit_after_the_pause_keeps_the_draft_only_if_the_words_match(second: str, adopted: bool) -> None:
    async def body() -> None:
        async with live(
            {"turn_detection": "server_vad", "preemptive_reply": True, "endpoint_silence_ms": 2000},
            transcript=["What is the weather like", second],
        ) as h:
            await h.mic.play(np.concatenate([silence(0.48), tone(0.8), silence(0.5)]))
            assert h.session.counters.preemptive_started == 1
            await h.text({"type": "input_audio_buffer.commit"})
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            await h.mic.silence(0.3)
            transcripts = [
                e["transcript"]
                for _, e in h.wire.events("conversation.item.input_audio_transcription.completed")
            ]
            assert transcripts == (["What is the weather like"] if adopted else ["something else"])
            c = h.session.counters
            assert (c.preemptive_used, c.preemptive_discarded) == ((1, 0) if adopted else (0, 1))
            assert len(h.wire.events("response.created")) == 1
            assert h.wire.events("response.done")[0][1]["status"] == "completed"

    run(body)


def test_barge_in_still_stops_a_preemptive_reply() -> None:
    async def body() -> None:
        reply = " ".join(f"Sentence {i} of a long answer." for i in range(8))
        async with live(PREEMPTIVE, turn_probability=0.9, reply=reply) as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: len(h.wire.audio_times()) > 20)
            await h.mic.play(tone(0.4))
            await h.mic.silence_until(lambda: "response.output_audio.clear" in h.wire.types())
            assert h.wire.audio_after("response.output_audio.clear") == 0
            ((_, done),) = h.wire.events("response.done")
            assert done["status"] == "cancelled"

    run(body)


def test_pause_of_the_session_drops_a_held_draft() -> None:
    async def body() -> None:
        async with live(PREEMPTIVE, turn_probability=0.1) as h:
            h.llm.end_of_turn = 0.0
            await h.mic.play(np.concatenate([silence(0.48), tone(0.8), silence(0.5)]))
            assert h.session.counters.preemptive_started == 1
            await h.text({"type": "session.pause"})
            await h.mic.silence(1.0)
            assert h.session.counters.preemptive_discarded == 1
            assert h.wire.audio_times() == [] and "response.created" not in h.wire.types()

    run(body)


# ----------------------------------------------------------------------------------------- session.update


def test_session_update_switches_turn_detection() -> None:
    async def body() -> None:
        async with live({"preemptive_reply": False}, turn_probability=0.1) as h:
            await h.mic.silence(0.04)
            created = h.wire.first("session.created")[1]["session"]
            assert created["turn_detection"] == {"type": "semantic_vad", "eagerness": "auto"}
            for eagerness in ("low", "medium", "high", "auto"):
                await h.text(
                    {
                        "type": "session.update",
                        "session": {"turn_detection": {"type": "semantic_vad", "eagerness": eagerness}},
                    }
                )
                await h.mic.silence(0.04)
                updated = h.wire.events("session.updated")[-1][1]["session"]
                assert updated["turn_detection"] == {"type": "semantic_vad", "eagerness": eagerness}
            await h.text(
                {
                    "type": "session.update",
                    "session": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 800}},
                }
            )
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            end = speech_end(h)
            assert end + 0.8 <= thinking_at(h) <= end + 0.8 + FRAME_S + 1e-6
            assert h.session.stack.turn.calls == []  # server_vad never asks the model
            assert h.wire.events("session.updated")[-1][1]["session"]["turn_detection"] == {
                "type": "server_vad",
                "silence_duration_ms": 800,
            }

    run(body)


@pytest.mark.parametrize(
    "detection",
    [
        {"type": "semantic_vad", "eagerness": "sometimes"},
        {"type": "neural_vad"},
        {"type": "server_vad", "eagerness": "high"},
        {"type": "semantic_vad", "silence_duration_ms": 300},
        {"type": "server_vad", "silence_duration_ms": 5},
        {"eagerness": "low"},
        "semantic_vad",
    ],
)
def test_a_bad_turn_detection_gets_an_error_event_and_changes_nothing(detection: Any) -> None:
    async def body() -> None:
        async with live({"preemptive_reply": False}, turn_probability=0.9) as h:
            await h.text({"type": "session.update", "session": {"turn_detection": detection}})
            await h.mic.silence(0.04)
            ((_, error),) = h.wire.events("error")
            assert error["code"] == "invalid_event" and not error["fatal"]
            assert "turn_detection" in error["message"]
            assert "session.updated" not in h.wire.types()
            assert h.session.settings.detection() == {"type": "semantic_vad", "eagerness": "auto"}

    run(body)


def test_semantic_vad_without_a_turn_model_is_refused() -> None:
    async def body() -> None:
        async with live({"preemptive_reply": False}) as h:  # a stack without a turn model
            await h.mic.silence(0.04)
            created = h.wire.first("session.created")[1]["session"]
            assert created["turn_detection"]["type"] == "server_vad"
            await h.text({"type": "session.update", "session": {"turn_detection": {"type": "semantic_vad"}}})
            await h.mic.silence(0.04)
            ((_, error),) = h.wire.events("error")
            assert error["code"] == "invalid_event" and "turn model" in error["message"]

    run(body)


# ----------------------------------------------------------------------------------------- partial transcripts


def test_partials_while_speaking_prefix_the_final_pass() -> None:
    async def body() -> None:
        script = ["I would", "I would like to", "I would like to order", "I would like to order a pizza"]
        async with live(
            {"turn_detection": "server_vad", "preemptive_reply": True, "asr_partial_interval_ms": 400},
            transcript=script,
            asr_latency=0.05,
        ) as h:
            await h.mic.play(np.concatenate([silence(0.48), tone(1.5)]))
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            partials = h.session.timeline.of_kind("partial")
            # Every 400 ms of speech while it runs (and none once the user paused).
            assert [p["text"] for p in partials] == script[:3]
            assert [round((p["end"] - p["onset"]) / SR, 2) for p in partials] == pytest.approx(
                [0.4, 0.8, 1.2], abs=0.03
            )
            # Each pass is prefixed with what the earlier ones agreed on; the final pass gets the most.
            assert h.asr.prefixes == ["", "", "I", "I would like"]
            ((_, done),) = h.wire.events("response.done")
            transcripts = [
                e["transcript"]
                for _, e in h.wire.events("conversation.item.input_audio_transcription.completed")
            ]
            assert transcripts == ["I would like to order a pizza"] and done["status"] == "completed"

    run(body)


def test_without_partials_the_final_pass_has_no_prefix() -> None:
    async def body() -> None:
        async with live({"preemptive_reply": True}) as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            assert h.session.timeline.of_kind("partial") == [] and h.asr.prefixes == []

    run(body)


# ------------------------------------------------------------------------------- drafts at the edges


def test_a_failed_draft_that_is_discarded_sends_no_error() -> None:
    async def body() -> None:
        server_vad = {"turn_detection": "server_vad", "preemptive_reply": True, "endpoint_silence_ms": 2000}
        async with live(server_vad, transcript=["first half", "whole thing"]) as h:
            h.llm.error = RuntimeError("boom")  # the draft's LLM fails
            await h.mic.play(np.concatenate([silence(0.48), tone(0.8), silence(0.9)]))
            assert h.session.counters.preemptive_started == 1
            h.llm.error = None
            await h.mic.play(tone(0.8))  # the user goes on: the failed draft is discarded
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            await h.mic.silence(0.5)
            assert h.wire.events("error") == []  # nothing of a discarded draft reaches the client
            assert [(e["response_id"], e["status"]) for _, e in h.wire.events("response.done")] == [
                ("resp_2", "completed")
            ]

    run(body)


def test_a_failed_draft_that_is_adopted_reports_its_error_with_its_response() -> None:
    async def body() -> None:
        async with live({"turn_detection": "server_vad", "preemptive_reply": True}) as h:
            h.llm.error = RuntimeError("boom")
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            types = h.wire.types()
            assert "llm failed" in h.wire.first("error")[1]["message"]
            assert types.index("response.created") < types.index("error") < types.index("response.done")
            assert h.wire.first("response.done")[1]["status"] == "failed"

    run(body)


def test_speech_during_the_final_transcript_check_does_not_wedge_the_session() -> None:
    # The draft heard less than the confirmed utterance, so its words are checked; meanwhile the user says
    # "uh ... um" (each too short to barge in). The turn must still be answered and the session listen again.
    async def body() -> None:
        duplex = {"turn_detection": "server_vad", "preemptive_reply": True, "endpoint_silence_ms": 2000,
                  "barge_in_min_speech_ms": 700}  # fmt: skip
        async with live(duplex, transcript=["what is the weather like"] * 2, asr_latency=0.8) as h:
            await h.mic.play(np.concatenate([silence(0.48), tone(0.8), silence(0.5)]))
            await h.text({"type": "input_audio_buffer.commit"})
            await h.mic.play(np.concatenate([tone(0.25), silence(0.25), tone(0.25)]))
            await h.mic.silence(6.0)
            assert h.session.state.value == "listening"
            assert [e["status"] for _, e in h.wire.events("response.done")] == ["completed"]
            c = h.session.counters
            assert (c.preemptive_started, c.preemptive_used, c.preemptive_discarded) == (1, 1, 0)

    run(body)


def test_a_session_update_after_the_pause_is_what_the_reply_uses() -> None:
    from tests.test_session import decode_reply, dominant_hz

    async def body() -> None:
        async with live(
            {"turn_detection": "server_vad", "preemptive_reply": True, "endpoint_silence_ms": 1000}
        ) as h:
            await h.mic.play(np.concatenate([silence(0.48), tone(0.8), silence(0.4)]))  # the draft starts
            assert h.session.counters.preemptive_started == 1
            await h.text({"type": "session.update", "session": {"voice": "low", "instructions": "Be terse."}})
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            assert h.llm.calls[-1][0].content == "Be terse."  # the reply heard was made with the new settings
            assert dominant_hz(decode_reply(h.wire.packets())[2400:-2400]) < 300  # "low", not "tone" (440 Hz)
            c = h.session.counters
            assert (c.preemptive_used, c.preemptive_discarded) == (0, 1)
            assert h.wire.first("response.done")[1]["status"] == "completed"

    run(body)


def test_a_draft_held_when_the_session_closes_is_counted_discarded() -> None:
    async def body() -> None:
        server_vad = {"turn_detection": "server_vad", "preemptive_reply": True, "endpoint_silence_ms": 2000}
        async with live(server_vad) as h:
            await h.mic.play(np.concatenate([silence(0.48), tone(0.8), silence(0.5)]))
            await h.text({"type": "session.close"})
            await h.runner
            c = h.session.counters
            assert (c.preemptive_started, c.preemptive_used, c.preemptive_discarded) == (1, 0, 1)

    run(body)
