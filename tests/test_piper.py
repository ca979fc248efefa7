"""Piper TTS: real speech from the embedded voice, Piper's phoneme encoding, sentence streaming, cancel."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import soxr

from core.models.base import OUTPUT_SAMPLE_RATE, TTS
from core.models.piper import (
    Clause,
    EspeakPhonemizer,
    PiperTTS,
    TTSError,
    _split_output,
    chunk_sentences,
    phonemes_to_ids,
    sanitize,
    split_sentences,
)
from tests.speech import word_error_rate

SENTENCE = "The weather is lovely today."
WHISPER_DIR = Path(__file__).resolve().parents[1] / "data" / "models" / "whisper-base"


@pytest.fixture(scope="module")
def tts() -> PiperTTS:
    return PiperTTS()


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))


# ------------------------------------------------------------------------------ speech, for real


def test_says_a_sentence_as_24k_float32(tts) -> None:
    assert isinstance(tts, TTS)
    chunks = list(tts.synthesize(SENTENCE))
    assert len(chunks) == 1
    audio = chunks[0]
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
    assert rms(audio) > 0.02  # speech, not silence
    seconds = len(audio) / OUTPUT_SAMPLE_RATE
    assert 1.0 < seconds < 4.0, seconds  # five words at a normal pace


def test_one_chunk_per_sentence_in_order(tts) -> None:
    short, long = "Yes.", "I would be very happy to help you with that request tomorrow."
    chunks = list(tts.synthesize(f"{short} {long}", voice="joe"))
    assert len(chunks) == 2
    assert len(chunks[0]) < len(chunks[1]) / 2  # one word, then twelve


def test_cancel_stops_after_the_current_sentence(tts) -> None:
    cancel = threading.Event()
    stream = tts.synthesize("First sentence here. Second sentence here. Third one.", cancel=cancel)
    first = next(stream)
    assert rms(first) > 0.02
    cancel.set()
    assert list(stream) == []
    assert list(tts.synthesize("Never spoken.", cancel=cancel)) == []


def test_nothing_to_say_yields_nothing(tts) -> None:
    assert list(tts.synthesize("")) == []
    assert list(tts.synthesize(" ... !!! ")) == []


def test_bad_input_is_a_clear_error(tts) -> None:
    with pytest.raises(TTSError) as err:
        tts.synthesize(SENTENCE, voice="nobody")
    assert err.value.kind == "tts_voice"
    with pytest.raises(TTSError):
        tts.synthesize("word " * 5000)
    with pytest.raises(TTSError):
        tts.synthesize(b"bytes")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- phoneme ids


def test_phoneme_ids_follow_pipers_layout(tts) -> None:
    id_map = tts.config.phoneme_id_map
    (phonemes,) = tts.phonemize(SENTENCE)
    assert "lˈʌvli" in phonemes and phonemes.endswith(".")
    (ids,) = tts.phoneme_ids(SENTENCE)
    bos, eos, pad = id_map["^"][0], id_map["$"][0], id_map["_"][0]
    assert ids[0] == bos and ids[-1] == eos
    assert all(i == pad for i in ids[1:-1:2])  # a pad after BOS and after every symbol
    assert ids[2] == id_map["ð"][0] and ids[-3] == id_map["."][0]
    assert len(ids) == 2 * len(phonemes) + 3  # every symbol of this sentence is in the voice's map


def test_clause_punctuation_is_kept_like_piper(tts) -> None:
    assert tts.phonemize("Isn't it, my friend? Yes!") == ["ˈɪzənt ɪt, maɪ fɹˈɛnd?", "jˈɛs!"]


def test_phonemes_to_ids_decomposes_and_skips_unknown_symbols() -> None:
    id_map = {"^": (1,), "$": (2,), "_": (0,), "a": (5,), "\u0303": (7,)}
    # "ã" is one code point in NFC; Piper maps its NFD parts; "☃" is not in the map.
    assert phonemes_to_ids("\u00e3☃a", id_map) == [1, 0, 5, 0, 7, 0, 5, 0, 2]


def test_espeak_is_run_safely_and_lines_up_odd_clauses() -> None:
    espeak = EspeakPhonemizer("en-us")
    wait, version, ok = espeak.phonemize(["wait...what", "--version", "ok"])
    assert "wˈeɪt" in wait and "wˈʌt" in wait  # espeak-ng breaks this line in two; both halves stay
    assert "eSpeak" not in version and "vˈɜːʒən" in version  # text on stdin is never an option
    assert ok == "ˌoʊkˈeɪ"
    with pytest.raises(TTSError):
        EspeakPhonemizer("en-us; rm -rf /")


@pytest.mark.parametrize(
    ("out", "count", "want"),
    [
        ("a\n\nb\n", 2, ["a", "b"]),
        ("a\nb\n\nc\n", 2, ["a b", "c"]),  # espeak-ng split the first clause
        ("\n\nc\n", 2, ["", "c"]),  # the first clause had nothing to say
        ("a\n", 2, None),
        ("a\n\nb\n\nc\n", 2, None),
    ],
)
def test_espeak_output_is_lined_up_or_refused(out, count, want) -> None:
    assert _split_output(out, count) == want


# ----------------------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Hello world", [[("Hello world", ".")]]),
        ("Hi. Bye!", [[("Hi", ".")], [("Bye", "!")]]),
        ("Really?! Yes", [[("Really", "?")], [("Yes", ".")]]),
        ("One, two; three: four.", [[("One", ","), ("two", ";"), ("three", ":"), ("four", ".")]]),
        ("Dr. Smith paid $5.20 at 3:30.", [[("Dr. Smith paid $5.20 at 3:30", ".")]]),
        ("Well... maybe — or not.", [[("Well", ","), ("maybe", ","), ("or not", ".")]]),
        ('He said "stop." Then left', [[('He said "stop', ".")], [("Then left", ".")]]),
        ("Item one\nItem two", [[("Item one", ".")], [("Item two", ".")]]),
        ("Wait , what ?", [[("Wait", ","), ("what", "?")]]),
        ("  ... !!!  ", []),
    ],
)
def test_split_sentences(text, want) -> None:
    got = [[(c.text, c.end) for c in sentence] for sentence in split_sentences(text)]
    assert got == want


def test_sanitize_strips_control_characters_and_phoneme_brackets() -> None:
    assert sanitize("a\x00b\x07c\u200bd\te\r\nf") == "abcd e\nf"
    assert "[" not in sanitize("say [[h@l'oU]]")


def test_run_on_sentences_are_cut_at_clauses() -> None:
    sentence = [Clause("word " * 30, ",") for _ in range(10)]  # about 1500 characters, no full stop
    chunks = chunk_sentences([sentence])
    assert len(chunks) > 2 and sum(len(c) for c in chunks) == 10
    assert all(sum(len(c.text) for c in chunk) <= 400 for chunk in chunks)


# ------------------------------------------------------------------------------- ear proxy: ASR


@pytest.mark.slow
@pytest.mark.skipif(
    not WHISPER_DIR.is_dir(),
    reason=f"{WHISPER_DIR} is absent; build it with `python -m core.models.convert.ct2_whisper data/models/whisper-base`",
)
def test_whisper_understands_piper(tts) -> None:
    from core.models.whisper import WhisperASR

    asr = WhisperASR(WHISPER_DIR, device="cpu", dtype="float32")
    audio = np.concatenate(list(tts.synthesize(SENTENCE)))
    audio16 = soxr.resample(audio, OUTPUT_SAMPLE_RATE, 16_000).astype(np.float32)
    text = asr.transcribe(audio16, language="en").text
    assert word_error_rate(SENTENCE, text) <= 0.25, text
