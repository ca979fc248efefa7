"""CosyVoice2TTS over a small random folder: the TTS protocol, streaming schedule, cancellation, voices.

The folder is tests/cosyvoice_tiny.py's MICRO size (flow encoder width 64) so that these run in seconds;
the same code at the TINY size is compared with the official implementation in test_cosyvoice_parity.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from core.models.base import OUTPUT_SAMPLE_RATE, TTS
from core.models.cosyvoice import DEFAULT_VOICE, CosyVoice2TTS, CosyVoiceError
from core.models.cosyvoice.llm import Sampler, decode_lengths
from core.models.cosyvoice.streaming import TokenToWave
from tests.cosyvoice_tiny import MICRO, tiny_folder
from tests.speech import espeak

SAMPLES_PER_TOKEN = 960  # 25 Hz tokens at 24 kHz


@pytest.fixture(scope="module")
def ref_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cosyvoice-ref") / "reference.wav"
    sf.write(path, espeak("This is the voice I would like you to use."), 16000)
    path.with_suffix(".txt").write_text("This is the voice I would like you to use.")
    return path


@pytest.fixture(scope="module")
def tts(ref_wav: Path) -> CosyVoice2TTS:
    return CosyVoice2TTS(tiny_folder(MICRO), device="cpu", ref_audio_path=ref_wav, seed=1234)


class Scripted:
    """Replaces the LM with a fixed token sequence and counts how many tokens were taken."""

    def __init__(self, n: int) -> None:
        self.tokens = [(i * 37) % 6561 for i in range(n)]
        self.taken = 0
        self.taken_at_chunk: list[int] = []

    def __call__(
        self, prefix: torch.Tensor, min_len: int, max_len: int, sampler: Sampler, cancel: object
    ) -> Iterator[int]:
        for token in self.tokens:
            if cancel is not None and cancel.is_set():  # type: ignore[attr-defined]
                return
            self.taken += 1
            yield token


def _chunks(tts: CosyVoice2TTS, script: Scripted, **kwargs: object) -> list[np.ndarray]:
    out = []
    for chunk in tts.synthesize("One two three.", **kwargs):  # type: ignore[arg-type]
        script.taken_at_chunk.append(script.taken)
        out.append(chunk)
    return out


def test_cosyvoice_implements_the_tts_protocol(tts: CosyVoice2TTS) -> None:
    assert isinstance(tts, TTS)
    assert tts.name.startswith("cosyvoice2")
    assert tts.voices == (DEFAULT_VOICE, "stored")  # the configured reference first, then spk2info.pt
    assert tts.default_voice == DEFAULT_VOICE


def test_cosyvoice_synthesizes_24khz_float32_chunks(tts: CosyVoice2TTS) -> None:
    chunks = list(tts.synthesize("Hi there."))
    assert chunks, "no audio"
    for chunk in chunks:
        assert chunk.dtype == np.float32 and chunk.ndim == 1 and len(chunk) > 0
        assert np.isfinite(chunk).all() and np.abs(chunk).max() <= 0.99
    audio = np.concatenate(chunks)
    assert np.sqrt(np.mean(audio**2)) > 1e-3  # random weights, but not silence
    assert len(audio) % SAMPLES_PER_TOKEN == 0  # 40 ms per speech token at OUTPUT_SAMPLE_RATE
    assert OUTPUT_SAMPLE_RATE == 24_000


def test_cosyvoice_streams_first_chunk_after_25_tokens_then_grows(
    tts: CosyVoice2TTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Scripted(230)
    monkeypatch.setattr(tts, "_token_stream", script)
    chunks = _chunks(tts, script)
    # The default voice's prompt has P tokens; the first chunk is padded so P + chunk is a multiple of 25.
    p = tts._prompt_for(None).flow_speech_ids.shape[1]
    first = 25 + (-p) % 25
    hops = [first, 50, 100]
    ends = [first, first + 50, first + 150]
    assert script.taken_at_chunk[:3] == [end + 3 for end in ends]  # each waits for 3 lookahead tokens only
    assert len(chunks) == 4 and script.taken_at_chunk[3] == 230  # the 4th would need 100 more tokens
    assert len(chunks[0]) == hops[0] * SAMPLES_PER_TOKEN - 3840  # 8 frames held back for the cross-fade
    assert [len(c) for c in chunks[1:3]] == [h * SAMPLES_PER_TOKEN for h in hops[1:]]
    assert len(chunks[3]) == (230 - ends[2]) * SAMPLES_PER_TOKEN + 3840  # the rest, and the held-back tail
    assert sum(len(c) for c in chunks) == 230 * SAMPLES_PER_TOKEN


def test_cosyvoice_cancel_stops_between_chunks(tts: CosyVoice2TTS, monkeypatch: pytest.MonkeyPatch) -> None:
    script = Scripted(400)
    monkeypatch.setattr(tts, "_token_stream", script)
    cancel = threading.Event()
    got = []
    for chunk in tts.synthesize("One two three.", cancel=cancel):
        got.append(chunk)
        cancel.set()
    assert len(got) == 1
    assert script.taken < 60  # the token stream stopped right after the first chunk, not at 400


LONG_TEXT = "This sentence has enough words to keep the speech token model busy for a while."


def _counting_lm_steps(tts: CosyVoice2TTS, monkeypatch: pytest.MonkeyPatch, on_step=None) -> list[int]:
    """Count the speech-token LM's decode steps (``on_step(n)`` after the n-th, before it runs)."""
    steps: list[int] = []
    real_step = tts.modules.lm.step

    def step(embeds: torch.Tensor, cache: object) -> object:
        steps.append(len(steps) + 1)
        if on_step is not None:
            on_step(len(steps))
        return real_step(embeds, cache)

    monkeypatch.setattr(tts.modules.lm, "step", step)
    return steps


def test_cosyvoice_cancel_stops_the_real_lm(tts: CosyVoice2TTS, monkeypatch: pytest.MonkeyPatch) -> None:
    cancel = threading.Event()
    # The user barges in while the LM decodes its 5th token, long before the first chunk (25 tokens).
    steps = _counting_lm_steps(tts, monkeypatch, lambda n: cancel.set() if n == 5 else None)
    assert list(tts.synthesize(LONG_TEXT, cancel=cancel)) == []
    assert len(steps) == 5  # not one step after the cancel
    min_len, _ = decode_lengths(len(tts.tokenizer.encode(LONG_TEXT)), tts.modules.config.lm)
    steps.clear()
    assert list(tts.synthesize(LONG_TEXT))  # uncancelled, the same text runs on and is spoken
    assert len(steps) >= min_len > 25


def test_cosyvoice_requests_do_not_share_state(tts: CosyVoice2TTS) -> None:
    text_a, text_b = "Hi there.", "Bye now."
    alone_a = list(tts.synthesize(text_a))
    alone_b = list(tts.synthesize(text_b, voice="stored"))
    # Interleave: start A, run B to the end, finish A; then B again after a cancelled A.
    stream_a = tts.synthesize(text_a)
    first_a = next(stream_a)
    inter_b = list(tts.synthesize(text_b, voice="stored"))
    rest_a = list(stream_a)
    np.testing.assert_array_equal(np.concatenate([first_a, *rest_a]), np.concatenate(alone_a))
    np.testing.assert_array_equal(np.concatenate(inter_b), np.concatenate(alone_b))
    cancel = threading.Event()
    for _ in tts.synthesize(text_a, cancel=cancel):
        cancel.set()
    np.testing.assert_array_equal(
        np.concatenate(list(tts.synthesize(text_b, voice="stored"))), np.concatenate(alone_b)
    )


def test_cosyvoice_voices_change_the_audio(tts: CosyVoice2TTS, ref_wav: Path) -> None:
    a = np.concatenate(list(tts.synthesize("Same words.", voice=DEFAULT_VOICE)))
    b = np.concatenate(list(tts.synthesize("Same words.", voice="stored")))
    assert a.shape != b.shape or not np.array_equal(a, b)
    tts.add_voice("uploaded", ref_wav, text=None)  # no transcript: the flow-only ("cross-lingual") prompt
    try:
        assert "uploaded" in tts.voices
        assert tts._prompt_for("uploaded").lm_speech_ids.numel() == 0
        assert tts._prompt_for(DEFAULT_VOICE).lm_speech_ids.numel() > 0  # the default has its transcript
        assert list(tts.synthesize("Hello.", voice="uploaded"))
    finally:
        assert tts.remove_voice("uploaded")
    assert "uploaded" not in tts.voices


def test_cosyvoice_voice_resolver_loads_registry_voices_on_demand(tts: CosyVoice2TTS, ref_wav: Path) -> None:
    asked: list[str] = []

    def resolve(name: str) -> tuple[Path, str | None] | None:
        asked.append(name)
        return (ref_wav, None) if name == "from-registry" else None

    tts.voice_resolver = resolve
    try:
        assert list(tts.synthesize("Hi.", voice="from-registry"))
        assert "from-registry" in tts.voices
        with pytest.raises(CosyVoiceError) as err:
            list(tts.synthesize("Hi.", voice="nobody"))
        assert err.value.kind == "tts_voice"
        assert asked == ["from-registry", "nobody"]
    finally:
        tts.voice_resolver = None
        tts.remove_voice("from-registry")


def test_cosyvoice_bad_requests_raise_clear_errors(tts: CosyVoice2TTS, tmp_path: Path) -> None:
    with pytest.raises(CosyVoiceError) as err:
        list(tts.synthesize("Hi.", voice="no-such-voice"))
    assert err.value.kind == "tts_voice" and "no-such-voice" in str(err.value)
    with pytest.raises(CosyVoiceError) as err:
        list(tts.synthesize("x" * 20_000))
    assert err.value.kind == "tts_text"
    assert list(tts.synthesize("   ")) == []
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio at all")
    with pytest.raises(CosyVoiceError) as err:
        tts.add_voice("junk", junk)
    assert err.value.kind == "tts_voice"
    assert "junk" not in tts.voices


def test_cosyvoice_long_text_is_spoken_in_pieces(tts: CosyVoice2TTS, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.models.cosyvoice.frontend import split_text

    text = " ".join(f"Sentence number {i} is here." for i in range(40))
    pieces = split_text(text, tts.tokenizer)
    assert len(pieces) > 1 and " ".join(pieces) == text
    assert all(len(tts.tokenizer.encode(p)) <= 80 for p in pieces)
    seen: list[int] = []

    def short(
        prefix: torch.Tensor, min_len: int, max_len: int, sampler: Sampler, cancel: object
    ) -> Iterator[int]:
        seen.append(min_len)
        yield from range(5)

    monkeypatch.setattr(tts, "_token_stream", short)
    audio = list(tts.synthesize(text))
    assert len(seen) == len(pieces) and len(audio) == len(pieces)
    assert all(len(a) == 5 * SAMPLES_PER_TOKEN for a in audio)


def test_cosyvoice_warmup_runs_the_lm_the_flow_and_the_vocoder(
    tts: CosyVoice2TTS, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = _counting_lm_steps(tts, monkeypatch)
    samples: list[int] = []
    real_chunk = TokenToWave.chunk

    def chunk(self: TokenToWave, *args: object, **kwargs: object) -> torch.Tensor:
        out = real_chunk(self, *args, **kwargs)  # type: ignore[arg-type]
        samples.append(out.numel())
        return out

    monkeypatch.setattr(TokenToWave, "chunk", chunk)
    tts.warmup()
    min_len, _ = decode_lengths(len(tts.tokenizer.encode("Hello, this is a warm-up.")), tts.modules.config.lm)
    assert len(steps) >= min_len > 0  # the LM decoded the phrase
    assert samples and sum(samples) > 0  # and the flow and the vocoder turned it into audio
