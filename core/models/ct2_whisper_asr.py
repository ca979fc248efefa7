"""Whisper on CTranslate2 as the ``ASR``: the CPU path, with a cost that grows with the utterance.

The transformers backend always encodes a padded 30 s window, so a 2 s question pays for 30 s of encoder.
CTranslate2's encoder takes shorter mel inputs: ``window="fit"`` encodes the clip plus ``pad_s`` of silence
(``window="full"`` keeps the 30 s window, for comparison). The padding matters: with none Whisper stops
early or reads the clip twice, and with little it is less sure of silence (see ``FIT_PAD_S``).

Guards against invented text are WhisperASR's (core/models/whisper.py): the RMS silence gate, the
no-speech probability (with OpenAI's log-probability condition), a token cap per second of audio and the
repetition cut, plus ``cut_restart`` for the one failure a short window adds. ``transcribe_with_prefix`` forces words already agreed on, so an
incremental caller decodes only the tail of a growing utterance.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.models.base import INPUT_SAMPLE_RATE, Segment, Transcript
from core.models.whisper import (
    MAX_CLIP_S,
    ASRError,
    Guards,
    _as_clip,
    batch_clips,
    cut_repetition,
    is_loop,
    repeated_segment,
    too_dense,
    transcribe_long,
)

#: Silence after a clip in ``window="fit"`` (seconds). On 100 bench clips, 0 s had 2.7x the full window's
#: WER; from 0.25 s WER matched it; below 3 s, noise clips got no-speech probabilities under the 0.6 gate
#: (0.57 at 1.5 s) and so text; at 3 s speech stays under 0.3 and noise over 0.62, for ~15 ms more encoder.
FIT_PAD_S = 3.0
_FRAMES_PER_S = 100  # one mel frame per 10 ms hop
_FULL_FRAMES = int(MAX_CLIP_S * _FRAMES_PER_S)
_TIME_STEP = 0.02  # seconds per timestamp token
_CONTEXT = 448  # decoder positions
#: A language guess less sure than this on a short window is made again on ``_DETECT_FRAMES`` (10 s): on a
#: 2 s clip the fit window's guess is often unsure, sometimes wrong ("Tell me a joke." -> Hebrew at p 0.28).
DETECT_SURE = 0.5
_DETECT_FRAMES = 1000


def _load_tokenizer(path: Path) -> Any:
    """The model's BPE tokenizer, with any two-symbol merge it lacks put back.

    The packaged Whisper base tokenizer.json misses the first merge ("Ġ t"), so " the" encodes as "Ġ", "the":
    decoding is unaffected, but a prefix forced in such tokens can derail the decoder (one of five bench
    prefixes: "the lights in the kitchen" became "the light's invocation").
    """
    from tokenizers import Tokenizer
    from tokenizers.pre_tokenizers import ByteLevel

    data = json.loads(path.read_text(encoding="utf-8"))
    model, alphabet = data["model"], set(ByteLevel.alphabet())
    made = {"".join(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]}
    missing = [t for t in model["vocab"] if len(t) == 2 and set(t) <= alphabet and t not in made]
    as_str = bool(model["merges"]) and isinstance(model["merges"][0], str)
    model["merges"] = [f"{t[0]} {t[1]}" if as_str else [t[0], t[1]] for t in missing] + model["merges"]
    return Tokenizer.from_str(json.dumps(data))


def cut_restart(text: str, min_words: int = 3) -> str:
    """Keep the first copy of a transcript that starts over ("Open the door. Open the door. Open the").

    A window cut close to the speech's end sometimes makes Whisper read the utterance again; two copies
    escape ``cut_repetition`` (it wants three, and a short text does not compress enough to be checked).
    Only a restart from the very first word, of ``min_words`` or more, counts; the caller also checks that
    the text is too long for its audio, so a speaker who does repeat a sentence keeps both copies.
    """
    words = text.split()
    norm = [w.strip(".,!?;:'\"").lower() for w in words]
    for period in range(min_words, len(words) - min_words + 1):
        if norm[period:] == norm[: len(words) - period]:
            return " ".join(words[:period])
    return text


class CT2WhisperASR:
    """Speech to text with a CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json)."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "cpu",
        compute_type: str | None = None,
        intra_threads: int = 0,
        window: str = "fit",
        pad_s: float = FIT_PAD_S,
        guards: Guards | None = None,
    ) -> None:
        """Load the model; ``compute_type`` None is int8 on a CPU, the device's default elsewhere."""
        import ctranslate2
        from transformers import WhisperFeatureExtractor

        folder = Path(path)
        if window not in ("fit", "full"):
            raise ASRError(f"window must be 'fit' or 'full', got {window!r}")
        if not (folder / "model.bin").is_file() or not (folder / "tokenizer.json").is_file():
            raise ASRError(f"cannot load CTranslate2 Whisper from '{path}': no model.bin or tokenizer.json")
        try:
            kind = compute_type or ("int8" if device == "cpu" else "default")
            self.model = ctranslate2.models.Whisper(
                str(folder), device=device, compute_type=kind, intra_threads=intra_threads
            )
        except (RuntimeError, ValueError) as exc:
            raise ASRError(f"cannot load CTranslate2 Whisper from '{path}': {exc}") from exc
        self.name = f"ct2-whisper:{folder.name}"
        self.window, self.pad_s, self.guards = window, pad_s, guards or Guards()
        self.tokenizer = _load_tokenizer(folder / "tokenizer.json")
        if (folder / "preprocessor_config.json").is_file():
            fe = WhisperFeatureExtractor.from_pretrained(str(folder))
        else:
            fe = WhisperFeatureExtractor(feature_size=self.model.n_mels)
        self._mel = np.asarray(fe.mel_filters, np.float32)  # (n_fft // 2 + 1, n_mels)
        self._n_fft, self._hop = int(fe.n_fft), int(fe.hop_length)
        self._hann = np.hanning(self._n_fft + 1)[:-1].astype(np.float32)  # periodic, like torch's
        config = json.loads((folder / "config.json").read_text())
        self._lang_ids = {str(self.tokenizer.id_to_token(i))[2:-2]: i for i in config.get("lang_ids", [])}
        special = ("startoftranscript", "transcribe", "notimestamps")
        self._sot, self._transcribe, self._no_ts = (self.tokenizer.token_to_id(f"<|{t}|>") for t in special)
        self._ts_begin = self._no_ts + 1  # timestamp tokens follow <|notimestamps|>
        self._lock = threading.Lock()

    @property
    def multilingual(self) -> bool:
        """Whether the model knows several languages (and so can detect which one it hears)."""
        return bool(self._lang_ids)

    def _check_language(self, language: str | None) -> str | None:
        if language is None or not self.multilingual:
            return language
        code = language.strip().lower()
        if code not in self._lang_ids:
            raise ASRError(
                f"unknown language '{language}' (Whisper knows: {', '.join(sorted(self._lang_ids))})"
            )
        return code

    def transcribe(
        self, audio: np.ndarray, language: str | None = None, *, timestamps: bool = False
    ) -> Transcript:
        """Transcribe one utterance of any length; clips over 30 s are split at quiet points."""
        return transcribe_long(audio, self.transcribe_batch, language, timestamps)

    def transcribe_batch(
        self, audios: Sequence[np.ndarray], language: str | None = None, *, timestamps: bool = False
    ) -> list[Transcript]:
        """Transcribe clips of at most 30 s each in one batched pass; ``timestamps`` adds timed segments."""
        clips = batch_clips(audios)
        language = self._check_language(language)
        return self._run(clips, language, timestamps, [])

    def transcribe_with_prefix(
        self, audio: np.ndarray, prefix: str, language: str | None = None
    ) -> Transcript:
        """Transcribe a clip of at most 30 s whose text must start with ``prefix`` (returned text included).

        The prefix's tokens follow the start tokens, so only the rest is chosen: an incremental caller passes
        the words already agreed on for the utterance so far, and they cannot change in the final text. It
        pins words rather than saving time: CTranslate2 runs one decoder step per forced token. Silence
        still gives "".
        """
        clip = _as_clip(audio)
        if not prefix.strip():
            return self.transcribe(clip, language)
        if len(clip) > MAX_CLIP_S * INPUT_SAMPLE_RATE:
            raise ASRError("transcribe_with_prefix takes at most 30 s of audio")
        forced = self.tokenizer.encode(" " + prefix.strip(), add_special_tokens=False).ids
        if len(forced) >= _CONTEXT // 2 - 8:
            raise ASRError(f"prefix of {len(forced)} tokens is too long for one Whisper window")
        return self._run([clip], self._check_language(language), False, forced)[0]

    def _run(
        self, clips: list[np.ndarray], language: str | None, timestamps: bool, forced: list[int]
    ) -> list[Transcript]:
        import ctranslate2

        results = [Transcript("", language) for _ in clips]
        rms = self.guards.min_rms
        loud = [i for i, c in enumerate(clips) if c.size and np.sqrt(np.mean(np.square(c))) >= rms]
        if not loud:
            return results
        longest = max(len(clips[i]) for i in loud) / INPUT_SAMPLE_RATE
        frames = _FULL_FRAMES
        if self.window == "fit":  # an even frame count: the encoder's stride-2 convolution halves it
            frames = min(_FULL_FRAMES, 2 * math.ceil((longest + self.pad_s) * _FRAMES_PER_S / 2))
        features = np.stack([self._log_mel(clips[i], frames) for i in loud])
        # The cap only ends runaway loops; CTranslate2 lets the result (forced prefix included) hold at
        # most max_length // 2 tokens, the other half of the context being reserved for a prompt.
        cap = min(_CONTEXT // 2, len(forced) + int(longest * self.guards.tokens_per_second) + 16)
        with self._lock:
            encoded = self.model.encode(ctranslate2.StorageView.from_array(features))
            if language is None and self.multilingual:
                found = [r[0] for r in self.model.detect_language(encoded)]
                unsure = [j for j, (_, p) in enumerate(found) if p < DETECT_SURE and frames < _DETECT_FRAMES]
                if unsure:
                    longer = np.stack([self._log_mel(clips[loud[j]], _DETECT_FRAMES) for j in unsure])
                    again = self.model.detect_language(ctranslate2.StorageView.from_array(longer))
                    for j, r in zip(unsure, again, strict=True):
                        found[j] = r[0]
                languages = [str(token)[2:-2] for token, _ in found]
            else:
                languages = [language or ""] * len(loud)
            prompts = [
                # An English-only model's start sequence is <|startoftranscript|> alone.
                [self._sot, *([self._lang_ids[lang], self._transcribe] if lang else [])]
                + ([] if timestamps else [self._no_ts])
                + forced
                for lang in languages
            ]
            out = self.model.generate(
                encoded,
                prompts,
                beam_size=1,
                max_length=2 * cap,
                return_no_speech_prob=True,
                return_scores=True,  # the mean log-probability per token (greedy, length penalty 1)
            )
        for i, lang, res in zip(loud, languages, out, strict=True):
            # OpenAI's silence rule: "no speech" *and* an unsure text. Speech decodes at a mean log-prob
            # near -0.2, noise's invented words under -1.5 (bench clips of 2-25 s), while the no-speech
            # probability of a long window full of speech can pass 0.6.
            silent = res.no_speech_prob > self.guards.no_speech_threshold
            if not (silent and res.scores[0] < self.guards.logprob_threshold):
                results[i] = self._transcript(res.sequences_ids[0], lang or None, timestamps, len(clips[i]))
        return results

    def _log_mel(self, clip: np.ndarray, frames: int) -> np.ndarray:
        """Whisper's log-mel of ``clip`` zero-padded to ``frames`` hops: (n_mels, frames).

        WhisperFeatureExtractor's numbers (same filters, within 2e-6) in single-threaded numpy: 2-3.5 ms for a
        5-9 s window where the extractor takes 1-2 ms on idle cores but 60-90 ms on busy ones (torch's pool).
        """
        x = np.zeros(frames * self._hop, np.float32)
        x[: min(len(clip), len(x))] = clip[: len(x)]
        x = np.pad(x, self._n_fft // 2, mode="reflect")  # a centred STFT, as torch.stft(center=True)
        windows = np.lib.stride_tricks.sliding_window_view(x, self._n_fft)[:: self._hop][:frames]
        spectrum = np.fft.rfft(windows * self._hann, axis=-1)
        power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
        # einsum, not @: a BLAS matmul leaves OpenBLAS threads spinning, which steal the cores CTranslate2
        # is about to use (a 4.6 s clip: 160 ms per call instead of 115).
        log = np.log10(np.maximum(np.einsum("tf,fm->tm", power, self._mel), 1e-10))
        log = np.maximum(log, log.max() - 8.0)
        return np.ascontiguousarray(((log + 4.0) / 4.0).T)

    def _transcript(self, ids: list[int], language: str | None, timestamps: bool, samples: int) -> Transcript:
        duration = samples / INPUT_SAMPLE_RATE
        pieces: list[tuple[float, float, list[int]]] = []  # (start, end, text tokens)
        start, tokens = 0.0, []
        for token in ids:  # "<|t0|> words <|t1|><|t1|> words <|t2|>": a timestamp closes and opens
            if token < self._ts_begin:
                tokens.append(token)
                continue
            at = (token - self._ts_begin) * _TIME_STEP
            if tokens:
                pieces.append((start, at, tokens))
                tokens = []
            start = at
        if tokens:
            pieces.append((start, duration, tokens))
        segments: list[Segment] = []
        for begin, end, toks in pieces:
            text = self.tokenizer.decode(toks, skip_special_tokens=True).strip()
            begin, end = min(begin, duration), min(end, duration)
            if is_loop(text, end - begin, self.guards):
                text = cut_repetition(text, self.guards.min_repeats)
            if too_dense(text, duration):
                text = cut_restart(text)
            if text and not (segments and repeated_segment(segments[-1], text, begin, end)):
                segments.append(Segment(begin, end, text))
        text = " ".join(s.text for s in segments)
        return Transcript(text, language, tuple(segments) if timestamps else ())

    def warmup(self) -> None:
        """Encode one second of noise and decode a few tokens, so the first request pays no set-up cost."""
        noise = np.random.default_rng(0).normal(0.0, 0.1, INPUT_SAMPLE_RATE).astype(np.float32)
        self._run([noise], None, False, [])
