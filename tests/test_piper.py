"""Piper TTS on piper-tts: real speech from the embedded voice, our sentences, streaming, cancel, errors."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import soxr

from core.models.base import OUTPUT_SAMPLE_RATE, TTS
from core.models.piper import PiperTTS, default_voice_paths
from core.models.piper_text import (
    Clause,
    TTSError,
    chunk_sentences,
    chunk_texts,
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


# ------------------------------------------------------------------------------------- phonemes


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


def test_dashes_and_ellipses_are_pauses(tts) -> None:
    assert tts.phonemize("Well... maybe — or not.") == ["wˈɛl, mˈeɪbiː, ɔːɹ nˈɑːt."]


def test_an_abbreviation_does_not_end_the_sentence(tts) -> None:
    # espeak-ng alone ends a sentence after "Dr."; the voice would then speak a full stop there.
    (phonemes,) = tts.phonemize("Dr. Smith paid $5.20 at 3:30.")
    assert phonemes.startswith("dˈɑːktɚ smˈɪθ ") and phonemes.count(".") == 1, phonemes
    assert "fˈaɪv pɔɪnt tˈuː" in phonemes and phonemes.endswith("θɹˈiː θˈɜːɾi.")
    assert len(list(tts.synthesize("Dr. Smith paid $5.20 at 3:30."))) == 1


def test_text_is_read_never_obeyed(tts) -> None:
    (version,) = tts.phonemize("--version")
    assert version == "vˈɜːʒən."  # a word, not an option
    # "[[ ... ]]" would be raw phonemes to the library; sanitize turns the brackets into parentheses.
    (said,) = tts.phonemize("Say [[ʃʃʃʃ]] now.")
    assert "ʃʃ" not in said and said.startswith("sˈeɪ ") and said.endswith("nˈaʊ.")
    (wait,) = tts.phonemize("wait...what")
    assert "wˈeɪt" in wait and "wˌʌt" in wait  # both halves of a line espeak-ng breaks in two


def test_a_long_text_is_phonemized_and_spoken_one_sentence_at_a_time(tts, monkeypatch) -> None:
    calls: list[str] = []
    runs: list[int] = []
    phonemize, to_audio = tts.voice.phonemize, tts.voice.phoneme_ids_to_audio
    monkeypatch.setattr(tts.voice, "phonemize", lambda text: calls.append(text) or phonemize(text))
    monkeypatch.setattr(
        tts.voice, "phoneme_ids_to_audio", lambda ids, cfg: runs.append(len(ids)) or to_audio(ids, cfg)
    )
    stream = tts.synthesize("Hi. " + "This sentence is here only to be long enough. " * 5)
    first = next(stream)
    assert calls == ["Hi."] and len(runs) == 1  # the first audio waits for nothing else
    assert rms(first) > 0.02
    assert len(list(stream)) == 5 and len(calls) == 6 and len(runs) == 6


def test_the_voice_runs_on_the_threads_asked_and_at_its_own_level(tts) -> None:
    assert tts.voice.session.get_session_options().intra_op_num_threads == 1
    (audio,) = tts.synthesize(SENTENCE)
    # The library's default would scale every sentence to a peak of 1.0; the voice's own level is lower.
    assert 0.1 < np.abs(audio).max() < 0.95


def test_length_scale_slows_the_voice(tts) -> None:
    slow = PiperTTS(length_scale=1.6)
    normal = sum(len(c) for c in tts.synthesize(SENTENCE))
    slower = sum(len(c) for c in slow.synthesize(SENTENCE))
    assert slower > 1.3 * normal, (slower, normal)


def test_a_missing_or_unsupported_voice_is_a_clear_error(tmp_path) -> None:
    model, config = default_voice_paths()
    with pytest.raises(TTSError) as err:
        PiperTTS(tmp_path / "absent.onnx")
    assert err.value.kind == "tts_model" and "not found" in str(err.value)
    raw = json.loads(config.read_text(encoding="utf-8"))
    for change, words in (
        ({"num_speakers": 3}, "multi-speaker"),
        ({"phoneme_type": "pinyin"}, "'pinyin' is not supported"),
        ({"audio": {}}, "cannot read Piper voice config"),
    ):
        bad = tmp_path / "bad.onnx.json"
        bad.write_text(json.dumps({**raw, **change}), encoding="utf-8")
        with pytest.raises(TTSError) as err:
            PiperTTS(model, bad)
        assert err.value.kind == "tts_model" and words in str(err.value), err.value
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx model")
    with pytest.raises(TTSError) as err:
        PiperTTS(junk, config)
    assert err.value.kind == "tts_model" and "cannot load Piper voice" in str(err.value)


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


def test_each_chunk_is_plain_text_with_its_clause_marks() -> None:
    text = sanitize("Well... maybe — or not. Dr. Smith\nleft")
    assert chunk_texts(text) == ["Well, maybe, or not.", "Dr. Smith.", "left."]
    assert chunk_texts(sanitize(" ... !!! ")) == []


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


@pytest.mark.slow
@pytest.mark.skipif(not WHISPER_DIR.is_dir(), reason=f"{WHISPER_DIR} is absent")
def test_whisper_reads_back_a_reply_of_several_sentences(tts) -> None:
    from core.models.whisper import WhisperASR

    asr = WhisperASR(WHISPER_DIR, device="cpu")
    text = "Dr. Smith will see you tomorrow morning. Please bring your card, your keys, and a pen."
    chunks = list(tts.synthesize(text))
    assert len(chunks) == 2
    audio16 = soxr.resample(np.concatenate(chunks), OUTPUT_SAMPLE_RATE, 16_000).astype(np.float32)
    heard = asr.transcribe(audio16, language="en").text
    assert word_error_rate(text, heard) <= 0.1, heard
