"""Smart Turn v3.2, semantic end of turn: on espeak speech, finished sentences score high, cut ones low."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.models import embedded
from core.models.base import ModelStack, TurnDetector
from core.models.smart_turn import WINDOW_SAMPLES, LogMel, SmartTurn, SmartTurnError, prepare
from tests.speech import espeak, with_silence

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
RATE = 16_000
#: What a VAD hands over after the last word (its stop delay), as the model hears it in service.
TRAILING_SILENCE_S = 0.2

# A finished sentence and its first words, each spoken alone. The model judges espeak's flat voice unevenly
# ("What is the weather like in London today?" scores 0.11, "I would like to order" 0.86), so these are pairs
# it judges robustly: each full sentence >= 0.86 and each cut one <= 0.03 over espeak at 140, 150 and 165
# words a minute with 0.15, 0.2 and 0.3 s of trailing silence.
PAIRS = (
    ("What is the weather like in Paris?", "What is the weather like in"),
    ("I went to the store and the bakery.", "I went to the store and the"),
    ("Remind me to call my mother tonight.", "Remind me to call my"),
)


@pytest.fixture(scope="module")
def model() -> SmartTurn:
    if not embedded.is_built(MODELS):
        pytest.skip(
            "embedded models not built: run `bash install.sh` (or python -m core.models.embedded build)"
        )
    try:
        onnx = embedded.paths(MODELS).smart_turn
    except embedded.EmbeddedModelError as exc:
        pytest.skip(f"Smart Turn model unavailable: {exc}")
    return SmartTurn(onnx)


def spoken(text: str) -> np.ndarray:
    return with_silence(espeak(text), 0.0, TRAILING_SILENCE_S)


# ------------------------------------------------------------------------------ real model, real speech


@pytest.mark.parametrize(("full", "cut"), PAIRS, ids=[cut for _, cut in PAIRS])
def test_finished_sentence_scores_high_and_cut_one_low(model: SmartTurn, full: str, cut: str) -> None:
    p_full = model.complete_probability(spoken(full))
    p_cut = model.complete_probability(spoken(cut))
    print(f"P(complete) {p_full:.3f} for {full!r}, {p_cut:.3f} for {cut!r}")
    assert p_full >= 0.5, (full, p_full)
    assert p_cut < 0.5, (cut, p_cut)


def test_long_input_uses_the_last_8_seconds(model: SmartTurn) -> None:
    rng = np.random.default_rng(1)
    before = rng.normal(0.0, 0.05, 20 * RATE).astype(np.float32)
    sentence = spoken(PAIRS[0][0])
    long = np.concatenate([before, sentence])[-20 * RATE :]
    assert long.size == 20 * RATE
    p = model.complete_probability(long)
    assert 0.0 <= p <= 1.0
    assert p == model.complete_probability(long[-WINDOW_SAMPLES:])
    assert p >= 0.5  # the finished sentence is what it hears; the noise before it is cut off


def test_short_input_is_padded_with_silence_at_the_start(model: SmartTurn) -> None:
    audio = spoken(PAIRS[1][1])
    padded = np.concatenate([np.zeros(WINDOW_SAMPLES - audio.size, np.float32), audio])
    assert model.complete_probability(audio) == model.complete_probability(padded)
    np.testing.assert_array_equal(prepare(audio), padded)


def test_column_and_row_vectors_are_mono(model: SmartTurn) -> None:
    audio = spoken(PAIRS[2][0])
    p = model.complete_probability(audio)
    assert model.complete_probability(audio[:, None]) == p
    assert model.complete_probability(audio[None, :]) == p
    assert model.complete_probability(audio.astype(np.float64)) == p


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        (np.array([0.1, np.nan, 0.2], np.float32), "NaN or infinite"),
        (np.array([0.1, np.inf], np.float32), "NaN or infinite"),
        (np.zeros(0, np.float32), "empty"),
        (np.zeros((2, RATE), np.float32), "mono"),
        (np.zeros((RATE, 2), np.float32), "mono"),
        (np.zeros((1, 1, RATE), np.float32), "mono"),
        (np.zeros(RATE, np.int16), "float"),
        ([0.0] * RATE, "numpy array"),
    ],
    ids=["nan", "inf", "empty", "stereo-rows", "stereo-columns", "3-d", "int16", "list"],
)
def test_bad_input_is_a_clear_error(model: SmartTurn, audio, message: str) -> None:
    with pytest.raises(SmartTurnError, match=message):
        model.complete_probability(audio)


def test_is_a_turn_detector_and_warms_up(model: SmartTurn) -> None:
    assert isinstance(model, TurnDetector)
    assert model.name == "smart-turn-v3.2"
    model.warmup()


def test_a_missing_or_wrong_model_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SmartTurnError, match="not found"):
        SmartTurn(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx file")
    with pytest.raises(SmartTurnError, match="cannot load"):
        SmartTurn(junk)


# ------------------------------------------------------------------------------ features


def test_features_equal_transformers_whisper_features() -> None:
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(chunk_length=8)
    window = prepare(spoken(PAIRS[0][1]))
    ours = LogMel()(window)
    assert ours.shape == (80, 800) and ours.dtype == np.float32
    # transformers' default (torch, float32) path: equal to float32 rounding.
    theirs = extractor(window, sampling_rate=RATE, return_tensors="np", do_normalize=True).input_features[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    # Its numpy (float64) path, the one the model's reference inference follows: bit for bit.
    normalised = (window - window.mean()) / np.sqrt(window.var() + 1e-7)
    np.testing.assert_array_equal(ours, extractor._np_extract_fbank_features(normalised[None], "cpu")[0])


# ------------------------------------------------------------------------------ the stack


class _Warm:
    name = "stub"

    def __init__(self, log: list[str], tag: str) -> None:
        self.log, self.tag = log, tag

    def warmup(self) -> None:
        self.log.append(self.tag)

    def reset(self) -> None:
        self.log.append(self.tag)

    def complete_probability(self, audio: np.ndarray) -> float:
        return 1.0


def test_model_stack_warms_its_turn_detector() -> None:
    log: list[str] = []
    parts = {k: _Warm(log, k) for k in ("asr", "llm", "tts")}
    stack = ModelStack(**parts, vad_factory=lambda: _Warm(log, "vad"))  # type: ignore[arg-type]
    assert stack.turn is None
    stack.warmup()
    assert log == ["asr", "llm", "tts", "vad"]
    log.clear()
    turn = _Warm(log, "turn")
    ModelStack(**parts, vad_factory=lambda: _Warm(log, "vad"), turn=turn).warmup()  # type: ignore[arg-type]
    assert log == ["asr", "llm", "tts", "vad", "turn"]
