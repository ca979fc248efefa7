"""The duplex session end to end, with scripted fake models on a virtual clock and real Opus in and out.

Each test is a script: the microphone streams 20 ms Opus packets in (virtual) real time, tones where the
user speaks and silence elsewhere, and the wire records every event and packet the session sends with
its time. A 10-second conversation runs in well under a second of wall time, and the assertions say
*when* things happened: the endpoint fires ``endpoint_silence_ms`` after the end of speech, the first
reply packet leaves after exactly the fakes' latencies, and so on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.audio.framing import pack_packets, unpack_packets
from core.audio.opus import OpusDecoder, OpusEncoder
from core.config import Config, DuplexConfig
from core.models.fake import FakeASR, FakeLLM, FakeTTS, build_fake_stack
from core.session.duplex import DuplexSession
from core.session.sender import CONTROL_BACKLOG
from tests import virtual_time

SR = 16_000
FRAME = 320  # 20 ms at 16 kHz
LEAD = 0.2  # audio.playback_delay_ms default
# Fake latencies of most scripts (seconds).
ASR_S, TTFT_S, TTS_S = 0.1, 0.2, 0.1
LONG_REPLY = " ".join(f"This is sentence number {i} of a long spoken answer." for i in range(1, 5))


def tone(seconds: float, freq: float = 300.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SR), np.float32)


@dataclass
class Wire:
    """The client's view of the socket: every event and packet, with the loop time it was sent."""

    clock: Callable[[], float]
    log: list[tuple[float, str, Any]] = field(default_factory=list)
    on_event: Callable[[dict[str, Any]], None] | None = None

    async def send_text(self, text: str) -> None:
        event = json.loads(text)
        self.log.append((self.clock(), "event", event))
        if self.on_event is not None:
            self.on_event(event)

    async def send_bytes(self, data: bytes) -> None:
        (packet,) = unpack_packets(data)  # one length-prefixed packet per frame
        self.log.append((self.clock(), "audio", packet))

    def events(self, kind: str | None = None) -> list[tuple[float, dict[str, Any]]]:
        return [(t, e) for t, k, e in self.log if k == "event" and (kind is None or e["type"] == kind)]

    def types(self) -> list[str]:
        return [e["type"] for _, e in self.events()]

    def first(self, kind: str) -> tuple[float, dict[str, Any]]:
        found = self.events(kind)
        assert found, f"no {kind} event in {self.types()}"
        return found[0]

    def audio_times(self) -> list[float]:
        return [t for t, k, _ in self.log if k == "audio"]

    def packets(self) -> list[bytes]:
        return [p for _, k, p in self.log if k == "audio"]

    def audio_after(self, kind: str) -> int:
        """Packets sent after the first ``kind`` event and before the next ``response.created``."""
        kinds = [k if k == "audio" else e["type"] for _, k, e in self.log]
        start = kinds.index(kind)
        rest = kinds[start + 1 :]
        end = rest.index("response.created") if "response.created" in rest else len(rest)
        return rest[:end].count("audio")


class Mic:
    """A live microphone: sends audio in 20 ms packets, each when its 20 ms have been captured."""

    def __init__(self, session: DuplexSession, fmt: str = "opus") -> None:
        self.session = session
        self.fmt = fmt
        self.encoder = OpusEncoder(SR, bitrate=24_000)

    async def play(self, audio: np.ndarray) -> None:
        for i in range(0, len(audio), FRAME):
            await asyncio.sleep(FRAME / SR)
            await self._send(audio[i : i + FRAME])

    async def silence(self, seconds: float) -> None:
        await self.play(silence(seconds))

    async def silence_until(self, condition: Callable[[], bool], limit_s: float = 60.0) -> None:
        for _ in range(round(limit_s * SR / FRAME)):
            if condition():
                return
            await self.play(silence(FRAME / SR))
        raise AssertionError("condition not reached")

    async def _send(self, frame: np.ndarray) -> None:
        if self.fmt == "pcm16":
            await self.session.on_binary((frame * 32767).astype("<i2").tobytes())
            return
        for packet in self.encoder.encode(frame):
            await self.session.on_binary(pack_packets([packet]))


@dataclass
class Live:
    session: DuplexSession
    wire: Wire
    mic: Mic
    asr: FakeASR
    llm: FakeLLM
    tts: FakeTTS
    runner: asyncio.Task[str]

    def states(self) -> list[str]:
        return [s for _, s in self.session.timeline.states()]

    def state_times(self) -> list[tuple[float, str]]:
        return self.session.timeline.states()

    async def text(self, event: dict[str, Any]) -> None:
        await self.session.on_text(json.dumps(event))


@contextlib.asynccontextmanager
async def live(
    duplex: dict[str, Any] | None = None,
    mic_format: str = "opus",
    recordings_dir: Path | None = None,
    **fakes: Any,
) -> AsyncIterator[Live]:
    """A running session on fake models whose latencies run on the virtual clock."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, virtual_time.VirtualTimeLoop)
    options: dict[str, Any] = dict(
        transcript="what is the weather like", reply="Hello there, this is a short answer.",
        asr_latency=ASR_S, ttft=TTFT_S, tts_first_chunk_latency=TTS_S,
    )  # fmt: skip
    options.update(fakes)
    stack = build_fake_stack(sleep=loop.sleep, **options)
    # The scripts here time today's cascade (silence endpoint, no preemptive reply) unless they ask for more.
    config = Config(duplex=DuplexConfig(**{"preemptive_reply": False, **(duplex or {})}))
    wire = Wire(loop.time)
    executor = ThreadPoolExecutor(1, thread_name_prefix="test-model")
    session = DuplexSession(
        stack, config, "test-session", wire.send_text, wire.send_bytes,
        executor=executor, recordings_dir=recordings_dir,
    )  # fmt: skip
    runner = asyncio.create_task(session.run())
    h = Live(session, wire, Mic(session, mic_format), stack.asr, stack.llm, stack.tts, runner)  # type: ignore[arg-type]
    try:
        yield h
    finally:
        await session.close("test_done")
        await asyncio.wait_for(runner, 5)
        # No waiting here: a fake parked in a virtual sleep needs this very loop to wake it.
        executor.shutdown(wait=False, cancel_futures=True)


def run(body: Callable[[], Any]) -> None:
    virtual_time.run(body())


def speaking_turn() -> np.ndarray:
    """0.48 s of silence, then 0.96 s of "speech" (VAD windows and mic frames both align at 0.16 s)."""
    return np.concatenate([silence(0.48), tone(0.96)])


def decode_reply(packets: list[bytes]) -> np.ndarray:
    decoder = OpusDecoder(24_000)
    return np.concatenate([decoder.decode(p) for p in packets])


def dominant_hz(audio: np.ndarray, rate: int = 24_000) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.argmax(spectrum) * rate / len(audio))


# ----------------------------------------------------------------------------------------------- a turn


def test_a_turn_moves_through_the_states_at_the_scripted_times() -> None:
    async def body() -> None:
        async with live() as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            await h.mic.silence(0.5)
            times = dict((s, t) for t, s in reversed(h.state_times()))
            assert h.states() == ["user_speaking", "thinking", "speaking", "listening"]

            # VAD confirms speech after min_speech_ms (200) of voiced audio from the onset at 0.48 s.
            assert 0.68 <= times["user_speaking"] <= 0.48 + 0.2 + 0.032 + 0.02 + 0.01
            # The endpoint fires endpoint_silence_ms after the last voiced VAD window, at frame granularity.
            speech_end = h.session.timeline.of_kind("voice")[-1]["end"] / SR
            assert 1.44 <= speech_end <= 1.44 + 0.032 + 0.01
            assert speech_end + 0.5 <= times["thinking"] <= speech_end + 0.5 + 0.02
            # First audio leaves after exactly ASR + first token + first TTS chunk.
            assert times["speaking"] == pytest.approx(times["thinking"] + ASR_S + TTFT_S + TTS_S, abs=1e-6)
            first_packet = h.wire.audio_times()[0]
            assert first_packet == pytest.approx(times["speaking"], abs=1e-9)
            # The reply is paced: the last packet goes out lead seconds before the client finishes playing it.
            audio_s = len(h.wire.packets()) * 0.02
            assert times["listening"] == pytest.approx(first_packet + audio_s - LEAD, abs=1e-6)

    run(body)


def test_response_events_come_in_order_with_real_timings_and_real_audio() -> None:
    async def body() -> None:
        async with live() as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            types = h.wire.types()
            order = [
                "session.created",
                "input_audio_buffer.speech_started",
                "input_audio_buffer.speech_stopped",
                "conversation.item.input_audio_transcription.completed",
                "response.created",
            ]
            assert [t for t in types if t in order] == order
            assert types[-1] == "response.done"
            t_created, created = h.wire.first("response.created")
            t_done, done = h.wire.first("response.done")
            assert h.wire.first("conversation.item.input_audio_transcription.completed")[1]["transcript"] == (
                "what is the weather like"
            )
            deltas = "".join(e["delta"] for _, e in h.wire.events("response.output_text.delta"))
            assert deltas.strip() == done["text"] == "Hello there, this is a short answer."
            kinds = [k if k == "audio" else e["type"] for _, k, e in h.wire.log]
            first, last = kinds.index("audio"), len(kinds) - 1 - kinds[::-1].index("audio")
            assert kinds.index("response.created") < first and last < kinds.index("response.done")
            assert all(t_created < t <= t_done for t in h.wire.audio_times())
            assert done["status"] == "completed" and done["response_id"] == created["response_id"]
            timings = done["timings"]
            assert 500 <= timings["endpoint_ms"] <= 520
            assert timings["asr_ms"] == pytest.approx(ASR_S * 1000)
            assert timings["llm_first_token_ms"] == pytest.approx(TTFT_S * 1000)
            assert timings["tts_first_audio_ms"] == pytest.approx(TTS_S * 1000)
            assert timings["voice_to_voice_ms"] == pytest.approx(timings["endpoint_ms"] + 400, abs=1e-3)
            # Real Opus out: it decodes to the fake TTS's 440 Hz tone, as long as the timings say.
            audio = decode_reply(h.wire.packets())
            assert len(audio) / 24_000 == pytest.approx(timings["audio_s"], abs=1e-6)
            assert dominant_hz(audio[2400:-2400]) == pytest.approx(440, abs=5)
            # The TTS was fed clauses, first one as soon as it existed, cleaned for speech.
            assert h.tts.calls == ["Hello there,", "this is a short answer."]

    run(body)


def test_output_is_never_more_than_the_playback_delay_ahead_of_the_clock() -> None:
    async def body() -> None:
        async with live(reply=LONG_REPLY, seconds_per_char=0.05) as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            times = h.wire.audio_times()
            assert len(times) * 0.02 > 9.0  # a ~10 s reply
            playhead, worst = 0.0, 0.0
            for t in times:
                playhead = max(playhead, t) + 0.02
                worst = max(worst, playhead - t)
            assert worst <= LEAD + 1e-9
            # and it is not slower than real time: the lead is used from the first packet on
            assert sum(1 for t in times if t == times[0]) == round(LEAD / 0.02)
            assert times[-1] - times[0] == pytest.approx(len(times) * 0.02 - LEAD, abs=1e-6)

    run(body)


def test_history_carries_into_the_next_turn() -> None:
    async def body() -> None:
        async with live(
            transcript=["first question", "second question"], reply=["First answer.", "Second."]
        ) as h:
            for _ in range(2):
                count = len(h.wire.events("response.done"))
                await h.mic.play(speaking_turn())
                await h.mic.silence_until(lambda c=count: len(h.wire.events("response.done")) > c)
            roles = [(m.role, m.content) for m in h.llm.calls[1]]
            assert roles[0][0] == "system"
            assert roles[1:] == [
                ("user", "first question"),
                ("assistant", "First answer."),
                ("user", "second question"),
            ]
            assert h.states() == ["user_speaking", "thinking", "speaking", "listening"] * 2

    run(body)


# --------------------------------------------------------------------------------------------- barge-in


def test_barge_in_clears_the_reply_and_nothing_of_it_follows_the_clear() -> None:
    async def body() -> None:
        pending_at_clear: list[tuple[int, int]] = []
        tts_calls: dict[str, int] = {}
        async with live(reply=LONG_REPLY, seconds_per_char=0.05, realtime_factor=0.8) as h:

            def watch(event: dict[str, Any]) -> None:
                if event["type"] == "response.output_audio.clear":
                    pending_at_clear.append(h.session.outbox.pending())
                    tts_calls["clear"] = len(h.tts.calls)
                if event["type"] == "response.created":
                    tts_calls["created"] = len(h.tts.calls)

            h.wire.on_event = watch
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: bool(h.wire.audio_times()))
            t_first = h.wire.audio_times()[0]
            await h.mic.silence(5.0 - (h.session._clock() - t_first))  # the user speaks 5 s into the reply
            t_barge = h.session._clock()
            await h.mic.play(tone(0.64))
            await h.mic.silence_until(lambda: len(h.wire.events("response.done")) >= 2)

            t_clear, clear = h.wire.first("response.output_audio.clear")
            first_id = h.wire.events("response.created")[0][1]["response_id"]
            assert clear["response_id"] == first_id
            # barge_in_min_speech_ms (250) of voiced audio, give or take a VAD window and a frame
            assert 0.25 - 0.032 <= t_clear - t_barge <= 0.25 + 0.032 + 0.02 + 0.01
            t_cancel, cancelled = h.wire.events("response.done")[0]
            assert cancelled["status"] == "cancelled" and cancelled["response_id"] == first_id
            assert t_cancel == t_clear
            assert 5.0 <= cancelled["timings"]["audio_s"] <= 5.0 + 0.3 + LEAD + 0.02
            # Not one packet of the cancelled reply after the clear: the next audio belongs to reply 2.
            assert h.wire.audio_after("response.output_audio.clear") == 0
            # the reply lane was drained; the control lane holds response.done(cancelled) and speech_started
            assert pending_at_clear == [(2, 0)]
            assert h.states() == [
                "user_speaking", "thinking", "speaking",
                "user_speaking", "thinking", "speaking", "listening",
            ]  # fmt: skip
            # The models stopped: the TTS (slower than playback here) never got to the 4th sentence, and
            # nothing of the old reply was synthesised after the clear.
            assert tts_calls["clear"] < 4 and tts_calls["created"] == tts_calls["clear"]
            assert h.wire.events("response.done")[1][1]["status"] == "completed"

    run(body)


def test_silence_while_the_assistant_speaks_never_barges_in() -> None:
    async def body() -> None:
        async with live(reply=LONG_REPLY, seconds_per_char=0.05) as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: bool(h.wire.audio_times()))
            # loopback of silence and faint room noise for the whole reply
            noise = (np.random.default_rng(0).standard_normal(SR * 3) * 0.003).astype(np.float32)
            await h.mic.play(noise)
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            assert "response.output_audio.clear" not in h.wire.types()
            assert h.wire.types().count("input_audio_buffer.speech_started") == 1
            assert h.wire.first("response.done")[1]["status"] == "completed"
            assert h.states() == ["user_speaking", "thinking", "speaking", "listening"]

    run(body)


def test_short_sounds_while_speaking_do_not_barge_in() -> None:
    async def body() -> None:
        async with live(reply=LONG_REPLY, seconds_per_char=0.05) as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: bool(h.wire.audio_times()))
            await h.mic.play(np.concatenate([tone(0.16), silence(0.6), tone(0.16)]))  # two clicks
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            assert "response.output_audio.clear" not in h.wire.types()
            assert h.wire.first("response.done")[1]["status"] == "completed"

    run(body)


@pytest.mark.parametrize("murmur_s", [0.2, 0.21])  # at least min_speech (200 ms), under barge-in (250 ms)
def test_speech_that_begins_during_the_reply_and_goes_on_after_it_is_a_turn(murmur_s: float) -> None:
    # A murmur as the reply ends, and the user goes on talking: the utterance began while the assistant spoke
    # (its start was spent there), so reaching the barge-in length after the reply ended starts the turn.
    async def body() -> None:
        replies = {"transcript": ["first question", "second question"], "reply": ["Short answer.", "Second."]}
        async with live({"min_speech_ms": 200, "barge_in_min_speech_ms": 250}, **replies) as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: bool(h.wire.audio_times()))
            await h.mic.play(tone(murmur_s))
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            await h.mic.play(tone(1.0))  # within the murmur's endpoint silence
            await h.mic.silence_until(lambda: len(h.wire.events("response.done")) == 2)
            heard = [
                e["transcript"]
                for _, e in h.wire.events("conversation.item.input_audio_transcription.completed")
            ]
            assert heard == ["first question", "second question"]
            assert [e["status"] for _, e in h.wire.events("response.done")] == ["completed", "completed"]
            assert h.wire.types().count("input_audio_buffer.speech_started") == 2

    run(body)


def test_a_barge_in_while_response_done_is_written_does_not_cancel_the_finished_reply() -> None:
    async def body() -> None:
        async with live() as h:
            wire_text = h.wire.send_text

            async def slow_socket(text: str) -> None:  # the write of response.done takes 0.6 s
                await wire_text(text)
                if '"response.done"' in text:
                    await asyncio.sleep(0.6)

            h.session.sender._send_text = slow_socket
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            await h.mic.play(tone(0.64))  # the user talks while that write is under way
            await h.mic.silence(3.0)
            done = [(e["response_id"], e["status"]) for _, e in h.wire.events("response.done")]
            assert done == [("resp_1", "completed"), ("resp_2", "completed")]
            assert "response.output_audio.clear" not in h.wire.types()

    run(body)


def test_response_cancel_stops_the_reply() -> None:
    async def body() -> None:
        async with live(reply=LONG_REPLY, seconds_per_char=0.05) as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: bool(h.wire.audio_times()))
            await h.mic.silence(1.0)
            await h.text({"type": "response.cancel"})
            t_cancel = h.session._clock()
            await h.mic.silence(1.0)
            t_clear, _ = h.wire.first("response.output_audio.clear")
            assert t_clear == pytest.approx(t_cancel, abs=0.021)
            assert h.wire.first("response.done")[1]["status"] == "cancelled"
            assert h.wire.audio_after("response.output_audio.clear") == 0
            assert h.states()[-1] == "listening"

    run(body)


def test_after_a_barge_in_the_history_holds_only_what_was_heard() -> None:
    async def body() -> None:
        async with live(
            transcript=["tell me a long story", "wait, stop"],
            reply=[LONG_REPLY, "Sure."],
            seconds_per_char=0.05,
        ) as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: bool(h.wire.audio_times()))
            t_first = h.wire.audio_times()[0]
            # The first sentence is 2.55 s of audio, the second ends at 5.1 s: barge in between the two.
            await h.mic.silence(3.5 - (h.session._clock() - t_first))
            await h.mic.play(tone(0.64))
            await h.mic.silence_until(lambda: len(h.wire.events("response.done")) >= 2)

            first_sentence = "This is sentence number 1 of a long spoken answer."
            cancelled = h.wire.events("response.done")[0][1]
            assert cancelled["status"] == "cancelled"
            assert cancelled["text"] == first_sentence + "…"
            # what was sent covers the heard clause but not the next one
            assert 2.55 <= cancelled["timings"]["audio_s"] < 5.1
            # The next turn's LLM call saw the truncated reply, a strict prefix of the generated one.
            roles = [(m.role, m.content) for m in h.llm.calls[1]]
            assert roles[1:] == [
                ("user", "tell me a long story"),
                ("assistant", first_sentence + "…"),
                ("user", "wait, stop"),
            ]
            heard = roles[2][1]
            assert (
                heard.endswith("…") and LONG_REPLY.startswith(heard[:-1]) and len(heard) - 1 < len(LONG_REPLY)
            )
            # A completed reply keeps its whole text.
            assert h.wire.events("response.done")[1][1]["text"] == "Sure."
            assert [(m.role, m.content) for m in h.session.conversation.history][-1] == ("assistant", "Sure.")

    run(body)


def test_a_reply_cancelled_before_any_audio_is_recorded_as_cut_off() -> None:
    async def body() -> None:
        async with live(reply=LONG_REPLY, ttft=1.0) as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.created" in h.wire.types())
            await h.text({"type": "response.cancel"})
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            assert not h.wire.audio_times()
            done = h.wire.first("response.done")[1]
            assert done["status"] == "cancelled" and done["text"] == "…"
            history = [(m.role, m.content) for m in h.session.conversation.history]
            assert history == [("user", "what is the weather like"), ("assistant", "…")]

    run(body)


# ---------------------------------------------------------------------------------- commit, pause, close


def test_commit_ends_the_turn_without_waiting_for_silence() -> None:
    async def body() -> None:
        async with live() as h:
            await h.mic.play(speaking_turn())
            await h.text({"type": "input_audio_buffer.commit"})
            t_commit = h.session._clock()
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            times = dict((s, t) for t, s in h.state_times())
            assert times["thinking"] == pytest.approx(t_commit, abs=0.021)  # not 0.5 s later
            assert h.wire.first("conversation.item.input_audio_transcription.completed")[1]["transcript"]
            # the silence after the commit does not end a second turn
            await h.mic.silence(1.0)
            assert h.wire.types().count("input_audio_buffer.speech_stopped") == 1

    run(body)


def test_commit_of_silence_gives_no_response() -> None:
    async def body() -> None:
        async with live() as h:
            await h.mic.silence(1.0)
            await h.text({"type": "input_audio_buffer.commit"})
            await h.mic.silence(1.0)
            assert h.states() == ["thinking", "listening"]
            assert "response.created" not in h.wire.types()
            assert len(h.asr.calls) == 1  # it did listen, and heard nothing

    run(body)


def test_pause_stops_output_ignores_input_and_resume_listens_again() -> None:
    async def body() -> None:
        async with live(reply=LONG_REPLY, seconds_per_char=0.05) as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: bool(h.wire.audio_times()))
            await h.mic.silence(1.0)
            await h.text({"type": "session.pause"})
            await h.mic.silence(0.04)
            h.wire.first("session.paused")
            assert h.wire.first("response.done")[1]["status"] == "cancelled"
            await h.mic.play(tone(1.0))  # ignored while paused
            await h.mic.silence(1.0)
            assert h.wire.audio_after("session.paused") == 0
            assert h.wire.types().count("input_audio_buffer.speech_started") == 1
            await h.text({"type": "session.resume"})
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: h.wire.types().count("response.created") == 2)
            assert "session.resumed" in h.wire.types()
            assert h.states()[3:6] == ["paused", "listening", "user_speaking"]

    run(body)


def test_a_long_pause_closes_the_session() -> None:
    async def body() -> None:
        async with live(duplex={"pause_timeout": 5.0}) as h:
            await h.mic.silence(0.5)
            await h.text({"type": "session.pause"})
            await h.mic.silence(0.02)
            t_pause = h.session._clock()
            reason = await h.runner
            t_closed, closed = h.wire.first("session.closed")
            assert reason == "pause_timeout" == closed["reason"]
            assert t_closed == pytest.approx(t_pause + 5.0, abs=0.021)
            assert h.wire.types()[-1] == "session.closed"

    run(body)


def test_an_idle_session_closes() -> None:
    async def body() -> None:
        async with live(duplex={"idle_timeout": 20.0}) as h:
            await h.mic.play(speaking_turn())
            closed = asyncio.create_task(h.mic.silence(40.0))
            reason = await h.runner
            closed.cancel()
            t_done = h.wire.first("response.done")[0]
            t_closed, _ = h.wire.first("session.closed")
            assert reason == "idle_timeout"
            assert t_closed == pytest.approx(t_done + 20.0, abs=0.05)

    run(body)


def test_close_while_thinking_stops_everything() -> None:
    async def body() -> None:
        async with live(ttft=5.0) as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence(0.7)  # endpoint + ASR: now waiting for the slow first token
            assert h.session.state.value == "thinking"
            await h.text({"type": "session.close"})
            reason = await asyncio.wait_for(h.runner, 10)
            assert reason == "client_closed"
            assert h.wire.types()[-1] == "session.closed"
            assert h.wire.audio_times() == []
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            assert others == []

    run(body)


@pytest.mark.parametrize(
    ("silence_duration_ms", "endpoint_s"),
    [(None, 0.5), (300, 0.3), (2500, 2.5)],  # the config's default, then the session's own setting
)
def test_a_client_that_stops_streaming_mid_utterance_still_gets_an_answer(
    silence_duration_ms: int | None, endpoint_s: float
) -> None:
    async def body() -> None:
        async with live() as h:
            if silence_duration_ms is not None:
                detection = {"type": "server_vad", "silence_duration_ms": silence_duration_ms}
                await h.text({"type": "session.update", "session": {"turn_detection": detection}})
            await h.mic.play(speaking_turn())  # and then nothing: no silence frames follow
            t_last = h.session._clock()
            await asyncio.sleep(6.0)
            times = dict((s, t) for t, s in h.state_times())
            # A stalled stream ends the turn after this session's endpoint plus the grace, as silence would.
            assert times["thinking"] == pytest.approx(t_last + endpoint_s + 1.0, abs=1e-6)
            assert h.wire.first("response.done")[1]["status"] == "completed"

    run(body)


def test_a_broken_socket_ends_the_session() -> None:
    async def body() -> None:
        async with live(reply=LONG_REPLY, seconds_per_char=0.05) as h:
            sent = 0

            async def flaky(data: bytes) -> None:
                nonlocal sent
                sent += 1
                if sent > 20:
                    raise ConnectionResetError("client went away")

            h.session.sender._send_bytes = flaky
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(h.runner.done, limit_s=30)
            assert h.runner.result() == "disconnected"
            assert sent == 21

    run(body)


# ---------------------------------------------------------------------------------------- settings


def test_session_update_applies_settings() -> None:
    async def body() -> None:
        async with live() as h:
            await h.text({"type": "session.update", "session": {"voice": "low", "instructions": "Be brief."}})
            await h.text({"type": "session.update", "session": {"voice": "nobody"}})
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            updated = h.wire.first("session.updated")[1]["session"]
            assert updated["voice"] == "low" and updated["instructions"] == "Be brief."
            error = h.wire.first("error")[1]
            assert error["code"] == "invalid_event" and "nobody" in error["message"]
            assert h.llm.calls[0][0].content == "Be brief."
            audio = decode_reply(h.wire.packets())
            assert dominant_hz(audio[2400:-2400]) == pytest.approx(220, abs=5)

    run(body)


@pytest.mark.parametrize("declared", [True, False])
def test_pcm16_input_declared_or_detected(declared: bool) -> None:
    async def body() -> None:
        async with live(mic_format="pcm16") as h:
            if declared:
                await h.text({"type": "session.update", "session": {"audio_format": "pcm16"}})
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            assert h.states() == ["user_speaking", "thinking", "speaking", "listening"]
            assert "error" not in h.wire.types()

    run(body)


# ---------------------------------------------------------------------------------------- bad input


def test_bad_client_events_get_error_events_and_the_session_survives() -> None:
    async def body() -> None:
        async with live() as h:
            await h.session.on_text("{not json")
            await h.text({"type": "response.explode"})
            await h.text({"type": "session.update", "session": {"sample_rate": 8000}})
            await h.session.on_text("[1, 2]")
            await h.session.on_text("x" * 70_000)
            await h.mic.silence(0.1)
            codes = [e["code"] for _, e in h.wire.events("error")]
            assert codes == ["bad_json", "unknown_event", "invalid_event", "bad_json", "payload_too_large"]
            assert all("Traceback" not in e["message"] for _, e in h.wire.events("error"))
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            assert h.wire.first("response.done")[1]["status"] == "completed"

    run(body)


def test_a_client_that_floods_bad_frames_without_reading_is_stopped_being_read() -> None:
    """Each bad frame earns an error event; a client that never reads them must not grow the worker's memory."""

    async def body() -> None:
        async with live(duplex={"receive_timeout_s": 30.0}) as h:
            reading = asyncio.Event()  # never set: from now on the client reads nothing

            async def stuck(text: str) -> None:
                await reading.wait()

            h.session.sender._send_text = stuck
            sent = 0

            async def flood() -> None:
                nonlocal sent
                for _ in range(5 * CONTROL_BACKLOG):
                    await h.session.on_text("{not json")
                    sent += 1

            flooder = asyncio.create_task(flood())
            await asyncio.sleep(5.0)
            control, _ = h.session.outbox.pending()
            assert control <= CONTROL_BACKLOG
            assert (
                not flooder.done()
            )  # the session stopped reading: the client's socket fills, not our memory
            assert sent < 3 * CONTROL_BACKLOG
            # Nothing more is read, so the receive timeout ends it, and the socket reader is let go.
            assert await asyncio.wait_for(h.runner, 60) == "receive_timeout"
            await asyncio.wait_for(flooder, 5)

    run(body)


def test_garbage_audio_is_reported_rate_limited_and_the_session_survives() -> None:
    async def body() -> None:
        async with live() as h:
            await h.text({"type": "session.update", "session": {"audio_format": "opus"}})
            rng = np.random.default_rng(1)
            for _ in range(100):  # 2 s of garbage frames
                await asyncio.sleep(0.02)
                await h.session.on_binary(rng.integers(0, 256, 200, dtype=np.uint8).tobytes())
            await h.session.on_binary(pack_packets([b"\xff\x00\x01"]))  # a malformed Opus packet
            await h.mic.silence(0.1)
            errors = [e for _, e in h.wire.events("error")]
            assert errors and all(e["code"] == "bad_audio" for e in errors)
            assert 2 <= len(errors) <= 4  # about one per second, not one per frame
            assert any("problems" in e["message"] for e in errors)
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            assert h.wire.first("response.done")[1]["status"] == "completed"

    run(body)


def test_a_model_failure_is_an_error_event_and_the_session_keeps_listening() -> None:
    async def body() -> None:
        async with live() as h:
            h.llm.error = RuntimeError("the GPU caught fire")
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            error = h.wire.first("error")[1]
            assert error["code"] == "internal_error"
            assert error["message"] == "llm failed: RuntimeError: the GPU caught fire"
            assert h.wire.first("response.done")[1]["status"] == "failed"
            assert h.states()[-1] == "listening"
            h.llm.error = None
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: len(h.wire.events("response.done")) == 2)
            assert h.wire.events("response.done")[1][1]["status"] == "completed"

    run(body)


def test_an_asr_failure_is_reported_too() -> None:
    async def body() -> None:
        async with live() as h:
            h.asr.error = OSError("model file vanished")
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            assert h.wire.first("error")[1]["message"].startswith("asr failed: OSError")
            assert h.wire.first("response.done")[1]["status"] == "failed"
            assert h.states()[-1] == "listening"

    run(body)


def test_a_client_that_sends_nothing_is_closed_with_a_reason() -> None:
    async def body() -> None:
        async with live(duplex={"receive_timeout_s": 30.0}) as h:
            await h.mic.play(speaking_turn())
            await h.mic.silence_until(lambda: "response.done" in h.wire.types())
            t_last = asyncio.get_running_loop().time()  # the last frame the client sent
            reason = await asyncio.wait_for(h.runner, 120)  # the client now sends nothing at all
            assert reason == "receive_timeout"
            error = h.wire.first("error")
            assert error[1]["code"] == "receive_timeout" and error[1]["fatal"] is True
            assert "30 s" in error[1]["message"]
            t_closed, closed = h.wire.first("session.closed")
            assert closed["reason"] == "receive_timeout"
            assert t_closed == pytest.approx(t_last + 30.0, abs=0.05)

    run(body)


def test_silence_frames_keep_a_session_open() -> None:
    async def body() -> None:
        async with live(duplex={"receive_timeout_s": 5.0}) as h:
            await h.mic.silence(60.0)  # frames of silence: the client is there, only quiet
            assert h.session.state.value == "listening"
            assert "error" not in h.wire.types()
            await h.text({"type": "session.close"})
            assert await asyncio.wait_for(h.runner, 10) == "client_closed"

    run(body)
