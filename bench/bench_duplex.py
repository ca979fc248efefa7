"""Duplex benchmark: conversation latency on a spoken corpus, and what the session engine itself adds.

    .venv/bin/python bench/bench_duplex.py [--quick]          # embedded stack: today's pipeline vs the new one
    .venv/bin/python bench/bench_duplex.py --fake [--turns 50]  # engine overhead and barge-in, fake models

**Corpus** (the default, ``--stack embedded``): every utterance of ``bench/utterances.py`` (espeak and Piper
voices, 1–8 s, a third of them with a 0.4–0.8 s pause inside the sentence) is spoken in real time into two
live sessions, one per pipeline, taking turns utterance by utterance so both see the same machine state:
*baseline* is today's cascade with every new behaviour off (``server_vad`` 500 ms silence, no preemptive
reply, transformers Whisper over a 30 s window); *new* is the default config (``semantic_vad`` with Smart
Turn, preemptive replies, CTranslate2 Whisper over the clip's own length). Measured per utterance:

- voice-to-voice: the first reply packet sent minus the send time of the frame carrying the user's last
  voiced sample (both stamped in this process);
- false cut-off (sentences with a pause): any reply packet or ``response.created`` before the sentence was
  over;
- WER of every transcript the session made during the utterance, joined, against the text spoken;
- the end-of-turn decision time (``response.done.timings.endpoint_ms``) and the per-stage timings.

After the first reply packet the client waits 0.3 s and sends ``response.cancel`` (both pipelines alike), so
the run is not spent listening to replies, and the history is cleared: every utterance is a first question. Ends with ``RESULT v2v_p50_ms=... v2v_p95_ms=...
false_cutoff_rate=... wer=... baseline_v2v_p50_ms=...``.

**Engine** (``--fake``):

A client in the same process streams 20 ms Opus packets in real time into a ``DuplexSession`` (no
socket; every event and packet is timestamped when the session hands it to ``send_text`` /
``send_bytes``). With ``--fake`` the models are scripted fakes with zero latency, so what is measured
is the engine: receive, Opus decode, VAD, segmenter, the executor hops of ASR, LLM and TTS, the
chunker, Opus encode and the sender.

- *engine overhead*: first reply packet out minus the moment the endpoint could first be known: the
  send time of the input frame that carries the sample ``speech end + endpoint_silence_ms``, where
  speech end is what the session's VAD reported (``speech_stopped.audio_end_ms``). VAD windows are
  32 ms and Opus adds a few ms of codec delay, so the detected end lies up to a window after the true
  end; that granularity is the VAD's, not the engine's, and is shown separately in the "naive" row
  (first packet minus (last voiced frame sent + endpoint_silence_ms)).
- *barge-in latency*: the ``response.output_audio.clear`` event minus the send time of the first input
  frame that completes ``barge_in_min_speech_ms`` of speech.

Every turn after the first starts with a barge-in: the user speaks 0.3 s into the reply, the reply is
cleared, and that utterance's own reply is the next turn measured. Speech starts on 160 ms boundaries
(a multiple of both the 20 ms frame and the 32 ms VAD window) so the reference samples are exact.

``run_bench(stack, config, ...)`` takes any ``ModelStack``: the embedded stack plugs in there (it needs
real speech for ``speech``, e.g. ``tests.speech.espeak``). Ends with
``RESULT overhead_p95_ms=... bargein_p95_ms=...``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.audio.framing import pack_packets
from core.audio.opus import OpusEncoder
from core.config import Config
from core.models.base import ModelStack
from core.models.fake import build_fake_stack
from core.session.duplex import DuplexSession
from core.session.executor import device_executor
from tests.speech import word_edits

SR = 16_000
FRAME = 320
ALIGN = 2560  # 160 ms: whole frames and whole VAD windows
REPLY = "Sure, here is a fairly long answer that keeps on talking for a few seconds."


@dataclass
class Wire:
    """What the session sent, with monotonic times."""

    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    audio: list[float] = field(default_factory=list)

    async def send_text(self, text: str) -> None:
        self.events.append((time.monotonic(), json.loads(text)))

    async def send_bytes(self, data: bytes) -> None:
        self.audio.append(time.monotonic())

    def of(self, kind: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, e) for t, e in self.events if e["type"] == kind]


class Client:
    """Streams audio in real time, one 20 ms packet per frame, and remembers when each frame was sent."""

    def __init__(self, session: DuplexSession) -> None:
        self.session = session
        self.encoder = OpusEncoder(SR, bitrate=24_000)
        self.sent: list[float] = []  # send time of frame k (samples [320k, 320k + 320))
        self._t0 = 0.0

    @property
    def position(self) -> int:
        return len(self.sent) * FRAME

    def frame_time(self, sample: int) -> float:
        """When the frame carrying ``sample`` was sent."""
        return self.sent[sample // FRAME]

    async def play(self, audio: np.ndarray) -> None:
        if not self.sent:
            self._t0 = time.monotonic()
        for i in range(0, len(audio), FRAME):
            due = self._t0 + (len(self.sent) + 1) * FRAME / SR  # a frame leaves once it is captured
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            packets = self.encoder.encode(audio[i : i + FRAME])
            self.sent.append(time.monotonic())
            for packet in packets:
                await self.session.on_binary(pack_packets([packet]))

    async def silence_until(self, done: Callable[[], bool], limit_s: float = 30.0) -> None:
        for _ in range(int(limit_s * SR / FRAME)):
            if done():
                return
            await self.play(np.zeros(FRAME, np.float32))
        raise RuntimeError("the session did not answer in time")

    async def align(self) -> None:
        await self.play(np.zeros(-self.position % ALIGN, np.float32))


def tone(seconds: float) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)


@dataclass
class Results:
    overhead_ms: list[float] = field(default_factory=list)
    naive_ms: list[float] = field(default_factory=list)
    v2v_ms: list[float] = field(default_factory=list)
    bargein_ms: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
    #: First reply packet minus the send time of the frame with the last voiced sample of the utterance: the
    #: user's voice-to-voice whatever ended the turn (the only fair reference under semantic_vad).
    voiced_v2v_ms: list[float] = field(default_factory=list)
    #: What ended each turn (response.done ``end_of_turn``: the turn model, the words, the silence limit).
    ended_by: dict[str, int] = field(default_factory=dict)
    preemptive: int = 0
    #: Whether the session ended turns with semantic_vad (a turn model in the stack and the config asking).
    semantic: bool = False


async def _measure_turn(
    client: Client, wire: Wire, config: Config, speech_end_sample: int, res: Results, tail: int = 0
) -> None:
    """Wait for the reply to the utterance just spoken and note its overhead.

    ``tail``: samples of silence at the end of the utterance after its last voiced one.
    """
    replies = len(wire.of("response.created"))
    await client.silence_until(
        lambda: len(wire.of("response.created")) > replies and bool(_audio_after(wire))
    )
    first_packet = _audio_after(wire)[0]
    res.voiced_v2v_ms.append((first_packet - client.frame_time(speech_end_sample - 1 - tail)) * 1000)
    stopped = wire.of("input_audio_buffer.speech_stopped")[-1][1]
    endpoint = config.duplex.endpoint_silence_ms * SR // 1000
    reference = client.frame_time(stopped["audio_end_ms"] * SR // 1000 + endpoint - 1)
    res.overhead_ms.append((first_packet - reference) * 1000)
    naive = client.frame_time(speech_end_sample - 1) + config.duplex.endpoint_silence_ms / 1000
    res.naive_ms.append((first_packet - naive) * 1000)


def _audio_after(wire: Wire) -> list[float]:
    created = wire.of("response.created")
    return [t for t in wire.audio if created and t >= created[-1][0]]


async def _barge_in(client: Client, wire: Wire, config: Config, speech: np.ndarray, res: Results) -> int:
    """Speak into the reply; note the clear latency; return the end sample of the utterance."""
    clears = len(wire.of("response.output_audio.clear"))
    await client.align()
    start = client.position
    await client.play(speech)
    await client.silence_until(lambda: len(wire.of("response.output_audio.clear")) > clears, limit_s=5)
    t_clear = wire.of("response.output_audio.clear")[-1][0]
    need = config.duplex.barge_in_min_speech_ms * SR // 1000
    res.bargein_ms.append((t_clear - client.frame_time(start + need - 1)) * 1000)
    return start + len(speech)


async def run_bench(stack: ModelStack, config: Config, *, turns: int, speech: np.ndarray) -> Results:
    """Run ``turns`` measured turns (each after the first opened by a barge-in) against ``stack``."""
    wire, res = Wire(), Results()
    session = DuplexSession(
        stack, config, "bench", wire.send_text, wire.send_bytes, executor=device_executor(stack.device)
    )
    runner = asyncio.create_task(session.run())
    client = Client(session)
    res.semantic = stack.turn is not None and config.duplex.turn_detection == "semantic_vad"
    tail = len(speech) - 1 - last_voiced(speech)
    await client.play(np.zeros(ALIGN, np.float32))
    await client.play(speech)
    end = client.position
    for i in range(turns):
        await _measure_turn(client, wire, config, end, res, tail)
        if i == turns - 1:
            break
        await client.play(np.zeros(int(0.3 * SR), np.float32))  # let the reply play a little
        end = await _barge_in(client, wire, config, speech, res)
    # The last reply is not heard out: random weights (random-production) never end one, and a long reply
    # only adds time. Its response.done, cancelled, carries the same timings.
    await session.on_text(json.dumps({"type": "response.cancel"}))
    await client.silence_until(lambda: len(wire.of("response.done")) >= turns)
    await session.close("bench_done")
    await runner
    done = [e["timings"] for _, e in wire.of("response.done") if e["status"] == "completed"]
    done += [e["timings"] for _, e in wire.of("response.done") if e["status"] != "completed"]
    res.v2v_ms = [t["voice_to_voice_ms"] for t in done if t.get("voice_to_voice_ms") is not None]
    for key in STAGES:
        res.stages[key] = [t[key] for t in done if t.get(key) is not None]
    for t in done:
        ended = str(t.get("end_of_turn") or "unknown")
        res.ended_by[ended] = res.ended_by.get(ended, 0) + 1
        res.preemptive += bool(t.get("preemptive"))
    return res


#: Per-stage timings of response.done, in the order of the cascade.
STAGES = ("endpoint_ms", "asr_ms", "llm_first_token_ms", "first_sentence_ms", "tts_first_audio_ms")


def _row(name: str, values: list[float]) -> str:
    if not values:
        return f"| {name} | 0 | - | - | - |"
    q = statistics.quantiles(values, n=20, method="inclusive") if len(values) > 1 else [values[0]] * 19
    return f"| {name} | {len(values)} | {statistics.median(values):.2f} | {q[18]:.2f} | {max(values):.2f} |"


def p95(values: list[float]) -> float:
    """95th percentile (inclusive method), or NaN without values."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def report(res: Results, config: Config, stack_name: str = "fake") -> str:
    if res.semantic:
        return semantic_report(res, config, stack_name)
    d = config.duplex
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        f"duplex engine benchmark on {platform.machine()}, {os.cpu_count()} CPUs, load average {load}, "
        f"python {platform.python_version()}; endpoint {d.endpoint_silence_ms} ms, "
        f"barge-in {d.barge_in_min_speech_ms} ms, playback delay {config.audio.playback_delay_ms} ms",
        "",
        "| metric (ms) | n | p50 | p95 | max |",
        "| --- | --- | --- | --- | --- |",
        _row("engine overhead (first packet - endpoint frame sent)", res.overhead_ms),
        _row("naive overhead (incl. VAD window + codec delay)", res.naive_ms),
        _row("voice-to-voice incl. endpoint (response.done)", res.v2v_ms),
        _row("barge-in latency (clear - frame completing min speech)", res.bargein_ms),
        *[_row(f"stage: {key}", res.stages.get(key, [])) for key in STAGES],
        "",
        f"RESULT overhead_p95_ms={p95(res.overhead_ms):.2f} bargein_p95_ms={p95(res.bargein_ms):.2f} "
        f"v2v_p50_ms={statistics.median(res.v2v_ms) if res.v2v_ms else float('nan'):.1f} "
        f"v2v_p95_ms={p95(res.v2v_ms):.1f} stack={stack_name}",
    ]
    return "\n".join(lines)


def semantic_report(res: Results, config: Config, stack_name: str) -> str:
    """The table of a semantic_vad run: voice-to-voice from the last voiced sample, and where the time went.

    The engine-overhead rows of ``report`` measure from a fixed silence endpoint, which semantic_vad does
    not have (a turn ends at a pause when the judges agree, sooner or later than any fixed silence).
    """
    d = config.duplex
    level = d.level()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    ended = ", ".join(f"{k} {v}" for k, v in sorted(res.ended_by.items())) or "none"
    v2v = res.voiced_v2v_ms
    stage = {key: res.stages.get(key, []) for key in STAGES}

    def p50(values: list[float]) -> str:
        return f"{statistics.median(values):.0f}" if values else "na"

    lines = [
        f"duplex benchmark ({stack_name}) on {platform.machine()}, {os.cpu_count()} CPUs, load average {load}, "
        f"python {platform.python_version()}; semantic_vad (eagerness {d.eagerness}: turn model threshold "
        f"{level.threshold}, words threshold {level.text_threshold}, pause check {d.pause_check_ms} ms, "
        f"silence limit {level.max_silence_ms} ms), preemptive reply {d.preemptive_reply}, "
        f"barge-in {d.barge_in_min_speech_ms} ms, playback delay {config.audio.playback_delay_ms} ms",
        "",
        "| metric (ms) | n | p50 | p95 | max |",
        "| --- | --- | --- | --- | --- |",
        _row("voice-to-voice (first packet - frame with the last voiced sample)", v2v),
        _row("voice-to-voice from the VAD's speech end (response.done)", res.v2v_ms),
        _row("barge-in latency (clear - frame completing min speech)", res.bargein_ms),
        *[_row(f"stage: {key}", stage[key]) for key in STAGES],
        "",
        f"turns ended by: {ended}; replies started preemptively: {res.preemptive} of {len(res.v2v_ms)}",
        "",
        f"RESULT v2v_p50_ms={p50(v2v)} v2v_p95_ms={p95(v2v):.0f} bargein_p95_ms={p95(res.bargein_ms):.1f} "
        f"endpoint_p50_ms={p50(stage['endpoint_ms'])} asr_p50_ms={p50(stage['asr_ms'])} "
        f"llm_first_token_p50_ms={p50(stage['llm_first_token_ms'])} "
        f"first_sentence_p50_ms={p50(stage['first_sentence_ms'])} "
        f"tts_first_audio_p50_ms={p50(stage['tts_first_audio_ms'])} preemptive={res.preemptive}/{len(res.v2v_ms)} "
        f"turn_detection=semantic_vad stack={stack_name}",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ corpus

TRANSCRIPT = "conversation.item.input_audio_transcription.completed"
#: Seconds after the end of speech without a reply packet before an utterance counts as unanswered.
NO_REPLY_S = 12.0
#: Per-stage timings of the corpus table, in the order of the cascade.
CORPUS_STAGES = ("endpoint_ms", *STAGES[1:])


@dataclass
class CorpusResults:
    """One pipeline's measures over the corpus."""

    name: str
    v2v_ms: list[float] = field(default_factory=list)
    paused: int = 0
    cutoffs: int = 0
    edits: int = 0
    ref_words: int = 0
    preemptive: int = 0
    stages: dict[str, list[float]] = field(default_factory=dict)
    misheard: list[tuple[str, str]] = field(default_factory=list)
    no_reply: list[str] = field(default_factory=list)

    @property
    def wer(self) -> float:
        return self.edits / max(1, self.ref_words)

    @property
    def cutoff_rate(self) -> float:
        return self.cutoffs / max(1, self.paused)


def last_voiced(audio: np.ndarray, floor: float = 1e-3) -> int:
    """Index of the utterance's last sample above ``floor`` (the corpus trims its voices at that level)."""
    loud = np.flatnonzero(np.abs(audio) > floor)
    return int(loud[-1]) if loud.size else len(audio) - 1


class _Live:
    """A session, its wire and its client, for one pipeline."""

    def __init__(self, name: str, stack: ModelStack, config: Config) -> None:
        self.wire = Wire()
        self.session = DuplexSession(
            stack,
            config,
            name,
            self.wire.send_text,
            self.wire.send_bytes,
            executor=device_executor(stack.device),
        )
        self.client = Client(self.session)
        self.res = CorpusResults(name)
        self.runner: asyncio.Task[str] | None = None

    async def utterance(self, text: str, audio: np.ndarray, paused: bool) -> None:
        wire, client, res = self.wire, self.client, self.res
        marks = {k: len(wire.of(k)) for k in ("response.created", "response.done", TRANSCRIPT)}
        packets, t_start, start = len(wire.audio), time.monotonic(), client.position
        await client.play(audio)
        t_last = client.frame_time(start + last_voiced(audio))
        try:
            await client.silence_until(
                lambda: any(t > t_last for t in wire.audio[packets:]), limit_s=NO_REPLY_S
            )
        except RuntimeError:  # nothing to answer (an empty transcript) or stuck: counted, not measured
            res.no_reply.append(text)
            return
        first = next(t for t in wire.audio[packets:] if t > t_last)
        res.v2v_ms.append((first - t_last) * 1000)
        if paused:
            res.paused += 1
            early_audio = any(t_start <= t <= t_last for t in wire.audio[packets:])
            early_reply = any(
                t <= t_last for t, _ in wire.of("response.created")[marks["response.created"] :]
            )
            res.cutoffs += early_audio or early_reply
        await client.play(np.zeros(int(0.3 * SR), np.float32))
        await self.session.on_text(json.dumps({"type": "response.cancel"}))
        await client.silence_until(
            lambda: any(t >= first for t, _ in wire.of("response.done")[marks["response.done"] :])
        )
        heard = " ".join(e["transcript"] for _, e in wire.of(TRANSCRIPT)[marks[TRANSCRIPT] :])
        edits, words = word_edits(text, heard)
        res.edits += edits
        res.ref_words += words
        if edits:
            res.misheard.append((text, heard))
        done = next(e for t, e in wire.of("response.done")[marks["response.done"] :] if t >= first)
        timings = done.get("timings", {})
        res.preemptive += bool(timings.get("preemptive"))
        for key in CORPUS_STAGES:
            if timings.get(key) is not None:
                res.stages.setdefault(key, []).append(timings[key])
        # Every utterance is a first question: the cancelled replies would otherwise fill the history with
        # "…" (the cut-off marker), which the small LLM soon starts answering with.
        self.session.conversation.history.clear()
        await client.play(np.zeros(int(0.3 * SR), np.float32))


async def run_corpus(
    pipelines: dict[str, tuple[ModelStack, Config]], corpus: list[Any]
) -> list[CorpusResults]:
    """Speak every utterance into one live session per pipeline, taking turns; return each one's measures."""
    lives = [_Live(name, stack, config) for name, (stack, config) in pipelines.items()]
    for live in lives:
        live.runner = asyncio.create_task(live.session.run())
        await live.client.play(np.zeros(ALIGN, np.float32))
    for i, utt in enumerate(corpus):
        for live in lives:
            await live.utterance(utt.text, utt.audio, bool(utt.pauses))
        print(
            f"  {i + 1}/{len(corpus)} "
            + "  ".join(f"{lv.res.name} {lv.res.v2v_ms[-1]:.0f} ms" for lv in lives),
            flush=True,
        )
    for live in lives:
        await live.session.close("bench_done")
        if live.runner is not None:
            await live.runner
    return [live.res for live in lives]


def _q(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _stage_cell(key: str) -> Callable[[CorpusResults], str]:
    def cell(r: CorpusResults) -> str:
        values = r.stages.get(key, [])
        return f"{_q(values, 0.5):.0f} / {_q(values, 0.95):.0f}"

    return cell


def corpus_report(results: list[CorpusResults], corpus: list[Any], header: str) -> str:
    """The table: one column per pipeline; then the RESULT line of the new pipeline against the baseline."""
    names = [r.name for r in results]
    rows = [
        header,
        "",
        f"{len(corpus)} utterances ({sum(1 for u in corpus if u.pauses)} with a pause inside the sentence), "
        f"{sum(u.duration for u in corpus):.0f} s of speech; voices: {', '.join(sorted({u.voice for u in corpus}))}",
        "",
        "| measure | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---" for _ in names) + " |",
    ]

    def row(label: str, cell: Callable[[CorpusResults], str]) -> None:
        rows.append(f"| {label} | " + " | ".join(cell(r) for r in results) + " |")

    row(
        "voice-to-voice p50 / p95 / max (ms)",
        lambda r: (
            f"{_q(r.v2v_ms, 0.5):.0f} / {_q(r.v2v_ms, 0.95):.0f} / {max(r.v2v_ms, default=float('nan')):.0f}"
        ),
    )
    row("false cut-offs (paused sentences)", lambda r: f"{r.cutoffs} / {r.paused} ({r.cutoff_rate:.1%})")
    row("WER of the final transcripts", lambda r: f"{r.wer:.1%} ({r.edits} / {r.ref_words} words)")
    row("replies started preemptively", lambda r: f"{r.preemptive} / {len(r.v2v_ms)}")
    for key in CORPUS_STAGES:
        label = "end-of-turn decision (endpoint_ms)" if key == "endpoint_ms" else f"stage: {key}"
        row(f"{label} p50 / p95", _stage_cell(key))
    row("utterances without a reply", lambda r: str(len(r.no_reply)))
    for r in results:
        for said in r.no_reply:
            rows.append(f"- {r.name} gave no reply to: {said!r}")
        for said, heard in r.misheard:
            rows.append(f"- {r.name} misheard: {said!r} -> {heard!r}")
    new, base = results[-1], results[0]
    rows += [
        "",
        f"RESULT v2v_p50_ms={_q(new.v2v_ms, 0.5):.0f} v2v_p95_ms={_q(new.v2v_ms, 0.95):.0f} "
        f"false_cutoff_rate={new.cutoff_rate:.3f} wer={new.wer:.3f} baseline_v2v_p50_ms={_q(base.v2v_ms, 0.5):.0f} "
        f"baseline_v2v_p95_ms={_q(base.v2v_ms, 0.95):.0f} baseline_false_cutoff_rate={base.cutoff_rate:.3f} "
        f"baseline_wer={base.wer:.3f}",
    ]
    return "\n".join(rows)


def corpus_configs(max_new_tokens: int = 60) -> dict[str, Config]:
    """Today's pipeline (every new behaviour off) and the default one, on the embedded stack."""
    model = {"stack": "embedded", "temperature": 0.0, "max_new_tokens": max_new_tokens}
    baseline = {
        # today's ASR and LLM: transformers, the LLM in float32
        "model": {**model, "asr_engine": "transformers", "llm_engine": "transformers", "dtype": "float32"},
        "duplex": {"turn_detection": "server_vad", "preemptive_reply": False, "asr_partial_interval_ms": 0},
    }
    return {"baseline": Config.model_validate(baseline), "new": Config.model_validate({"model": model})}


def _machine_header() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    try:
        from machine import cpu_model  # type: ignore[import-not-found,unused-ignore]

        cpu = cpu_model()
    except Exception:
        cpu = platform.processor() or platform.machine()
    return (
        f"duplex corpus benchmark on {cpu} ({platform.machine()}), {os.cpu_count()} CPUs, load average {load}, "
        f"python {platform.python_version()}"
    )


def main_corpus(quick: bool) -> int:
    """Baseline and new pipelines over the corpus, in the same run."""
    import torch
    import transformers
    from utterances import utterances

    transformers.logging.set_verbosity_error()

    from core.models.registry import build_stack

    corpus = utterances()
    if quick:
        corpus = [u for u in corpus if u.pauses][:3] + [u for u in corpus if not u.pauses][:3]
    pipelines = {}
    for name, config in corpus_configs().items():
        stack = build_stack(config)
        warm_up(stack)
        pipelines[name] = (stack, config)
        print(f"{name}: {dict(stack.info)}", flush=True)
    header = _machine_header() + f", torch threads {torch.get_num_threads()}"
    results = asyncio.run(run_corpus(pipelines, corpus))
    print(corpus_report(results, corpus, header))
    return 0


def fake_stack() -> ModelStack:
    """Zero-latency scripted models (real time)."""
    return build_fake_stack(transcript="tell me something", reply=REPLY)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fake", action="store_true", help="zero-latency fake models (engine overhead)")
    parser.add_argument(
        "--stack", choices=["fake", "embedded", "production", "random-production"], default="embedded"
    )
    parser.add_argument(
        "--scale",
        choices=["tiny", "full"],
        default="full",
        help="random-production only: production sizes (GPU) or a tiny CPU smoke size",
    )
    parser.add_argument("--turns", type=int, default=None, help="default 50 with --fake, 10 otherwise")
    parser.add_argument("--quick", action="store_true", help="corpus: six utterances only (a smoke run)")
    args = parser.parse_args(argv)
    name = "fake" if args.fake else args.stack
    if name == "embedded":
        return main_corpus(args.quick)
    if name == "fake":
        config = Config()
        res = asyncio.run(run_bench(fake_stack(), config, turns=args.turns or 50, speech=tone(0.48)))
    elif name == "random-production":
        res, config = _random_production(args.scale, args.turns or 10)
        name = f"random-production-{args.scale}"
    else:
        from core.models.registry import build_stack

        config = Config.model_validate({"model": {"stack": name, "temperature": 0.0, "max_new_tokens": 60}})
        stack = build_stack(config)
        warm_up(stack)
        res = asyncio.run(run_bench(stack, config, turns=args.turns or 10, speech=spoken_question()))
    print(report(res, config, name))
    return 0


def _random_production(scale: str, turns: int) -> tuple[Results, Config]:
    """Whisper medium + Qwen2.5-7B + CosyVoice2-0.5B with random weights (``bench/random_stack.py``).

    Random weights never stop on their own: the reply is ``max_new_tokens`` long and Whisper decodes a
    fixed 16 tokens, so the stage timings are those of a fixed-size turn.
    """
    import torch
    from random_stack import random_production_stack

    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    else:
        print(f"device: cpu (no CUDA), torch {torch.__version__}", flush=True)
    config = random_production_config()
    stack = random_production_stack("tiny" if scale == "tiny" else "full")
    warm_up(stack)
    return asyncio.run(run_bench(stack, config, turns=turns, speech=spoken_question())), config


def random_production_config() -> Config:
    """The default session (semantic_vad, eagerness auto, preemptive replies) for random weights.

    The stack's turn model is the real Smart Turn, so it hears the spoken question as a trained model does;
    the words judge is the random 7B, whose P(message ends here) means nothing. Its threshold is set to 0:
    the judge still runs (its forward pass is paid at every pause, as in production), but its verdict is
    "finished", as a trained model's is for a whole question, so the turn model decides.
    """
    medium = Config().duplex.eagerness_medium.model_dump()
    return Config.model_validate(
        {
            "model": {"temperature": 0.0, "max_new_tokens": 60},
            "duplex": {
                "turn_detection": "semantic_vad",
                "eagerness_medium": {**medium, "text_threshold": 0.0},
            },
        }
    )


def warm_up(stack: ModelStack) -> None:
    """Warm the models up on the thread that will serve them (CUDA graphs are recorded per thread)."""
    device_executor(stack.device).submit(stack.warmup).result()


def spoken_question(text: str = "What is the capital of France?") -> np.ndarray:
    """A spoken question (espeak-ng, British voice) at 16 kHz."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "q.wav"
        subprocess.run(["espeak-ng", "-v", "en-gb", "-s", "150", "-w", str(wav), text], check=True)
        audio, rate = sf.read(wav, dtype="float32")
    return np.asarray(soxr.resample(audio, rate, SR), dtype=np.float32)


if __name__ == "__main__":
    sys.exit(main())
