"""Any transformers Whisper as the ``ASR``: openai/whisper-medium on a GPU, the converted Whisper base on a CPU.

One batch runs the encoder once. A single decoder step on ``<|startoftranscript|>`` then gives two things
at once: the language (when the caller names none) and the probability of the no-speech token. Greedy
``generate`` decodes the same encoder output. Guards against invented text, cheapest first:
- a clip whose RMS is below ``min_rms`` is silence and never reaches the model;
- a clip whose no-speech probability is above ``no_speech_threshold`` gives empty text (Whisper's own
  silence detector: it says "you" or "Thank you." over silence and noise, but knows it is guessing);
- decoding is capped at a few tokens per second of audio, and a transcript that compresses too well
  and holds more words than its audio could (a repetition loop, ``is_loop``) is cut back to the first copy
  of the repeated words; repeated speech at a speaking rate is kept.

Clips over 30 s: ``transcribe`` splits them at quiet points and decodes the pieces as one batch;
``transcribe_batch`` rejects them, since a batch item is one Whisper window by contract.
"""

from __future__ import annotations

import threading
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.models.base import INPUT_SAMPLE_RATE, Segment, Transcript
from core.models.device import load_placement, resolve_attention, resolve_device, resolve_dtype

#: Longest clip one Whisper window holds.
MAX_CLIP_S = 30.0


class ASRError(ValueError):
    """Audio the ASR cannot take (wrong shape, NaN, too long for a batch item), or a model it cannot load."""


@dataclass(frozen=True)
class Guards:
    """Thresholds that keep Whisper from writing text nobody said."""

    min_rms: float = 1e-3  # about -60 dBFS: quieter clips are silence
    no_speech_threshold: float = 0.6  # OpenAI's default
    # OpenAI's default: a text decoded this surely (mean log-probability per token) was heard, whatever the
    # no-speech probability says (Whisper base rates a window full of speech up to 0.76 "no speech")
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4  # OpenAI's default: above it the text is a repetition loop
    tokens_per_second: float = 10.0  # fast speech is ~5 tokens/s; the cap only ends runaway loops
    min_repeats: int = 3  # a word sequence this many times in a row is a loop


#: Faster than anyone talks (240 words a minute): more words than this per second of audio were not all said.
MAX_WORDS_PER_S = 4.0


def too_dense(text: str, seconds: float) -> bool:
    """Whether ``text`` has more words than ``seconds`` of speech can hold (at least one second is allowed)."""
    return len(text.split()) > MAX_WORDS_PER_S * max(seconds, 1.0)


def is_loop(text: str, seconds: float, guards: Guards) -> bool:
    """Whether ``text`` decoded from ``seconds`` of audio is a repetition loop rather than repeated speech.

    A loop repeats (it compresses too well) *and* runs past what the audio could hold: Whisper caught in
    one keeps writing until the token cap. A speaker who says the same sentence again and again (a chorus,
    a looped recording) compresses as well, but at a speaking rate; that text is what was said.
    """
    return compression_ratio(text) > guards.compression_ratio_threshold and too_dense(text, seconds)


def compression_ratio(text: str) -> float:
    """How well ``text`` compresses; repetition loops score high (OpenAI's hallucination measure)."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def cut_repetition(text: str, min_repeats: int = 3) -> str:
    """Keep ``text`` up to the first copy of a word sequence that then repeats ``min_repeats`` times or more."""
    words = text.split()
    for start in range(len(words)):
        for period in range(1, (len(words) - start) // min_repeats + 1):
            unit = words[start : start + period]
            count = 1
            while words[start + count * period : start + (count + 1) * period] == unit:
                count += 1
            if count >= min_repeats:
                return " ".join(words[: start + period])
    return text


def split_long(
    audio: np.ndarray, max_s: float = MAX_CLIP_S, search_s: float = 5.0
) -> list[tuple[int, np.ndarray]]:
    """Cut ``audio`` into pieces of at most ``max_s``, each cut at the quietest 100 ms of its last ``search_s``."""
    rate, frame = INPUT_SAMPLE_RATE, INPUT_SAMPLE_RATE // 10
    limit, search = int(max_s * rate), int(search_s * rate)
    pieces, start = [], 0
    while len(audio) - start > limit:
        window = audio[start + limit - search : start + limit]
        energy = np.square(window[: len(window) // frame * frame].reshape(-1, frame)).mean(axis=1)
        cut = start + limit - search + int(np.argmin(energy)) * frame + frame // 2
        pieces.append((start, audio[start:cut]))
        start = cut
    pieces.append((start, audio[start:]))
    return pieces


def _as_clip(audio: Any) -> np.ndarray:
    clip = np.asarray(audio, dtype=np.float32)
    if clip.ndim == 2 and 1 in clip.shape:
        clip = clip.reshape(-1)
    if clip.ndim != 1:
        raise ASRError(f"audio must be mono (one dimension), got shape {clip.shape}")
    if not np.isfinite(clip).all():
        raise ASRError("audio contains NaN or infinite samples")
    return clip


def batch_clips(audios: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Checked clips for a batch: each mono, finite and at most one 30 s Whisper window."""
    clips = [_as_clip(a) for a in audios]
    for i, clip in enumerate(clips):
        if len(clip) > MAX_CLIP_S * INPUT_SAMPLE_RATE:
            raise ASRError(
                f"batch item {i} is {len(clip) / INPUT_SAMPLE_RATE:.1f} s, over Whisper's 30 s window: "
                "split it first (transcribe() does)"
            )
    return clips


def repeated_segment(last: Segment, text: str, start: float, end: float) -> bool:
    """Whether a segment saying ``text`` from ``start`` to ``end`` is a loop's copy of ``last``.

    A loop across segments repeats a whole segment, often with no time of its own; a sentence said twice
    has the time it takes to say.
    """
    return text == last.text and too_dense(text, end - start)


def transcribe_long(
    audio: np.ndarray,
    batch: Callable[..., list[Transcript]],
    language: str | None,
    timestamps: bool,
) -> Transcript:
    """Any length through a 30 s ``batch`` call: split at quiet points, decode the pieces together, join them."""
    clip = _as_clip(audio)
    if len(clip) <= MAX_CLIP_S * INPUT_SAMPLE_RATE:
        return batch([clip], language, timestamps=timestamps)[0]
    pieces = split_long(clip)
    parts = batch([p for _, p in pieces], language, timestamps=timestamps)
    segments: list[Segment] = []
    for (start, piece), part in zip(pieces, parts, strict=True):
        offset = start / INPUT_SAMPLE_RATE
        if timestamps:
            segments += [Segment(s.start + offset, s.end + offset, s.text) for s in part.segments]
        elif part.text:
            segments.append(Segment(offset, offset + len(piece) / INPUT_SAMPLE_RATE, part.text))
    found = Counter(p.language for p in parts if p.text and p.language)
    detected = found.most_common(1)[0][0] if found else language
    return Transcript(" ".join(p.text for p in parts if p.text), detected, tuple(segments))


class WhisperASR:
    """Speech to text with a transformers Whisper (hub id or local folder); one instance, one model."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        attn_implementation: str = "auto",
        compile: bool = False,
        guards: Guards | None = None,
    ) -> None:
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.device = resolve_device(device, error=ASRError)
        self.dtype = resolve_dtype(dtype, self.device, error=ASRError)
        self.attn_implementation = resolve_attention(attn_implementation, self.device, self.dtype)
        self.guards = guards or Guards()
        self.name = f"whisper:{Path(str(path)).name}"
        local = Path(str(path)).expanduser()
        if (local.is_absolute() or str(path).startswith(".")) and not local.is_dir():
            raise ASRError(f"cannot load Whisper from '{path}': no such folder")  # not a hub id: fail fast
        placement = load_placement(self.device)  # straight onto the GPU, not through host memory
        try:
            self.processor = WhisperProcessor.from_pretrained(str(path))
            model: Any = WhisperForConditionalGeneration.from_pretrained(
                str(path), dtype=self.dtype, attn_implementation=self.attn_implementation, **placement
            )
        except (OSError, ValueError, ImportError) as exc:
            raise ASRError(f"cannot load Whisper from '{path}': {exc}") from exc
        self.model = (model if placement else model.to(self.device)).eval()
        # The encoder sees one fixed shape (batch, mels, 3000), which suits torch.compile; generate's
        # decoder loop keeps eager mode.
        self._encoder = torch.compile(self.model.model.encoder) if compile else self.model.model.encoder
        gen = self.model.generation_config
        self._lang_to_id: dict[str, int] = dict(getattr(gen, "lang_to_id", None) or {})
        self._lang_ids = torch.tensor(sorted(self._lang_to_id.values()), device=self.device, dtype=torch.long)
        self._sot = int(gen.decoder_start_token_id)
        tokenizer = self.processor.tokenizer
        no_speech = [tokenizer.convert_tokens_to_ids(t) for t in ("<|nospeech|>", "<|nocaptions|>")]
        self._no_speech_id = next(
            (i for i in no_speech if i is not None and i != tokenizer.unk_token_id), None
        )
        self._max_new_tokens = self.model.config.max_target_positions // 2  # OpenAI's sample length
        self._lock = threading.Lock()  # the caller serializes calls; this makes a mistake slow, not wrong

    @property
    def multilingual(self) -> bool:
        """Whether the model knows several languages (and so can detect which one it hears)."""
        return bool(self._lang_to_id)

    def _check_language(self, language: str | None) -> str | None:
        if language is None or not self.multilingual:
            return language
        code = language.strip().lower()
        if f"<|{code}|>" not in self._lang_to_id:
            known = ", ".join(sorted(t[2:-2] for t in self._lang_to_id))
            raise ASRError(f"unknown language '{language}' (Whisper knows: {known})")
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
        results = [Transcript("", language) for _ in clips]
        loud = [
            i for i, c in enumerate(clips) if c.size and np.sqrt(np.mean(np.square(c))) >= self.guards.min_rms
        ]
        if loud:
            with self._lock, torch.inference_mode():
                decoded = self._run([clips[i] for i in loud], language, timestamps)
            for i, transcript in zip(loud, decoded, strict=True):
                results[i] = transcript
        return results

    def _run(self, clips: list[np.ndarray], language: str | None, timestamps: bool) -> list[Transcript]:
        features, mask = self._features(clips)
        encoded = self._encoder(features).last_hidden_state
        no_speech, detected = self._probe(encoded)
        languages = [language or code for code in detected]
        results = [Transcript("", language) for _ in clips]  # no speech: no language either
        keep = [i for i, p in enumerate(no_speech) if p <= self.guards.no_speech_threshold]
        if not keep:
            return results
        seconds = max(len(clips[i]) for i in keep) / INPUT_SAMPLE_RATE
        cap = min(self._max_new_tokens, int(seconds * self.guards.tokens_per_second) + 16)
        out = self._generate(encoded[keep], mask[keep], [languages[i] for i in keep], timestamps, cap)
        for i, segments in zip(keep, out, strict=True):
            duration = len(clips[i]) / INPUT_SAMPLE_RATE
            results[i] = self._transcript(segments, languages[i], timestamps, duration)
        return results

    def _features(self, clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.processor.feature_extractor(
            clips, sampling_rate=INPUT_SAMPLE_RATE, return_tensors="pt", return_attention_mask=True
        )
        return batch.input_features.to(self.device, self.dtype), batch.attention_mask.to(self.device)

    def _probe(self, encoded: torch.Tensor) -> tuple[list[float], list[str | None]]:
        """One decoder step on <|startoftranscript|>: no-speech probability and most likely language."""
        sot = torch.full((encoded.shape[0], 1), self._sot, device=self.device, dtype=torch.long)
        hidden = self.model.model.decoder(input_ids=sot, encoder_hidden_states=encoded, use_cache=False)
        logits = self.model.proj_out(hidden.last_hidden_state[:, -1]).float()
        if self._no_speech_id is None:
            no_speech = [0.0] * len(logits)
        else:
            no_speech = logits.softmax(dim=-1)[:, self._no_speech_id].tolist()
        if not self.multilingual:
            return no_speech, [None] * len(logits)
        best = self._lang_ids[logits[:, self._lang_ids].argmax(dim=-1)].tolist()
        tokens = self.processor.tokenizer.convert_ids_to_tokens(best)
        return no_speech, [str(t)[2:-2] for t in tokens]

    def _generate(
        self,
        encoded: torch.Tensor,
        mask: torch.Tensor,
        languages: list[Any],
        timestamps: bool,
        max_new_tokens: int,
    ) -> list[list[dict[str, Any]]]:
        """Greedy decoding of the encoder output; per clip, transformers' list of segments."""
        from transformers.modeling_outputs import BaseModelOutput

        extra: dict[str, Any] = {"language": languages, "task": "transcribe"} if self.multilingual else {}
        out = self.model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoded),
            attention_mask=mask,
            return_timestamps=timestamps,
            return_segments=True,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **extra,
        )
        return list(out["segments"])

    def _transcript(
        self, raw: list[dict[str, Any]], language: str | None, timestamps: bool, duration: float
    ) -> Transcript:
        segments: list[Segment] = []
        for seg in raw:
            text = self.processor.tokenizer.decode(seg["tokens"], skip_special_tokens=True).strip()
            # An unclosed last segment ends at the window's end (30 s); the clip ends sooner.
            start, end = min(float(seg["start"]), duration), min(float(seg["end"]), duration)
            if is_loop(text, end - start, self.guards):
                text = cut_repetition(text, self.guards.min_repeats)
            if text and not (segments and repeated_segment(segments[-1], text, start, end)):
                segments.append(Segment(start, end, text))
        text = " ".join(s.text for s in segments)
        return Transcript(text, language, tuple(segments) if timestamps else ())

    def warmup(self) -> None:
        """Encode one second of noise and decode a few tokens, so the first request pays no set-up cost."""
        noise = np.random.default_rng(0).normal(0.0, 0.1, INPUT_SAMPLE_RATE).astype(np.float32)
        with self._lock, torch.inference_mode():
            features, mask = self._features([noise])
            encoded = self._encoder(features).last_hidden_state
            _, detected = self._probe(encoded)
            self._generate(encoded, mask, [detected[0] or "en"], False, 4)
