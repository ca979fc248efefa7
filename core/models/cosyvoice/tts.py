"""``CosyVoice2TTS``: the :class:`~core.models.base.TTS` protocol over a CosyVoice2-0.5B folder.

One request: text -> pieces of at most 80 tokens; per piece, the speech-token LM decodes token by token,
and whenever the streaming schedule allows (25 tokens + 3 of lookahead first, then 50, then 100 at a
time) the flow and the vocoder turn the tokens so far into the next chunk, which is yielded at once.
``cancel`` is checked before every LM step and every chunk. Everything a request changes (token list,
schedule, vocoder cache, random generator) is local to it; the networks are only read.

Voices: ``default`` is the config's reference recording (``audio.ref_audio_path``; a ``.txt`` file next to
it, if any, is its transcript), the speakers stored in the folder's ``spk2info.pt`` keep their names, and
:meth:`CosyVoice2TTS.add_voice` adds more (the reference-voice upload route calls it). A name the model
does not know is looked up through ``voice_resolver`` when one is set (the voice registry), then cached.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from core.audio.errors import AudioError
from core.audio.files import load_audio
from core.models.base import OUTPUT_SAMPLE_RATE, CancelToken
from core.models.cosyvoice.errors import CosyVoiceError
from core.models.cosyvoice.frontend import (
    MAX_PROMPT_S,
    PromptEncoder,
    TextTokenizer,
    load_spk2info,
    split_text,
)
from core.models.cosyvoice.llm import RasSampler, Sampler, decode_lengths, generate
from core.models.cosyvoice.loader import CosyVoice2Modules, load_modules
from core.models.cosyvoice.streaming import ChunkSchedule, TokenToWave, VoicePrompt

log = logging.getLogger("models.cosyvoice")

DEFAULT_VOICE = "default"
#: Longest text one ``synthesize`` call accepts (a spoken reply is far shorter).
MAX_TEXT_CHARS = 10_000
#: Resolves a voice name to (recording, transcript or None), or None when it does not know the name.
VoiceResolver = Callable[[str], "tuple[Path, str | None] | None"]


def _cancelled(cancel: CancelToken | None) -> bool:
    return cancel is not None and cancel.is_set()


class CosyVoice2TTS:
    """CosyVoice2 text to speech, streamed as float32 24 kHz chunks."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "auto",
        ref_audio_path: str | Path | None = None,
        dtype: str = "auto",
        compile: bool = False,
        seed: int | None = None,
    ) -> None:
        modules = load_modules(path, device=device, dtype=dtype, compile=compile)
        model_dir = modules.model_dir
        encoder = PromptEncoder(
            model_dir / "campplus.onnx",
            model_dir / "speech_tokenizer_v2.onnx",
            modules.config.mel,
            use_cuda=modules.device.type == "cuda",
        )
        tokenizer = TextTokenizer(model_dir / "CosyVoice-BlankEN")
        self._setup(modules, tokenizer, encoder, load_spk2info(model_dir / "spk2info.pt"), seed)
        if ref_audio_path:
            ref = Path(ref_audio_path)
            sidecar = ref.with_suffix(".txt")
            transcript = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None
            self._voices[DEFAULT_VOICE] = self.prompt_from_file(ref, transcript)
            self._refresh_voices()

    @classmethod
    def from_parts(
        cls,
        modules: CosyVoice2Modules,
        tokenizer: TextTokenizer,
        encoder: PromptEncoder | None = None,
        voices: dict[str, VoicePrompt] | None = None,
        seed: int | None = None,
    ) -> CosyVoice2TTS:
        """A TTS over modules already built (the benchmark: random weights of the real size)."""
        tts = cls.__new__(cls)
        tts._setup(modules, tokenizer, encoder, dict(voices or {}), seed)
        return tts

    def _setup(
        self,
        modules: CosyVoice2Modules,
        tokenizer: TextTokenizer,
        encoder: PromptEncoder | None,
        voices: dict[str, VoicePrompt],
        seed: int | None,
    ) -> None:
        self.modules = modules
        self.name = f"cosyvoice2:{modules.model_dir.name}"
        self.tokenizer = tokenizer
        self.encoder = encoder
        #: Seed of every request's random generator; None draws a fresh one per request.
        self.seed = seed
        self.voice_resolver: VoiceResolver | None = None
        self._lock = threading.Lock()
        self._voices = voices
        self.voices: tuple[str, ...] = ()
        self._refresh_voices()

    # ------------------------------------------------------------------------------------- voices

    def _refresh_voices(self) -> None:
        names = sorted(self._voices, key=lambda n: (n != DEFAULT_VOICE, n))
        self.voices = tuple(names)

    @property
    def default_voice(self) -> str | None:
        """The voice used when a request names none: ``default`` if configured, else the first stored one."""
        return self.voices[0] if self.voices else None

    def prompt_from_audio(
        self, audio_16k: np.ndarray, audio_24k: np.ndarray, text: str | None = None
    ) -> VoicePrompt:
        """A voice prompt from a recording at 16 and 24 kHz, zero-shot when its transcript is given."""
        if self.encoder is None:
            raise CosyVoiceError("this TTS was built without the prompt encoders", kind="tts_voice")
        text_ids = self.tokenizer.encode(text) if text and text.strip() else None
        return self.encoder.prompt(audio_16k, audio_24k, text_ids)

    def prompt_from_file(self, path: str | Path, text: str | None = None) -> VoicePrompt:
        """A voice prompt from an audio file (any format core.audio.files reads, at most 30 s)."""
        try:
            audio_16k = load_audio(path, 16_000, max_duration_s=MAX_PROMPT_S)
            audio_24k = load_audio(path, 24_000, max_duration_s=MAX_PROMPT_S)
        except AudioError as exc:
            raise CosyVoiceError(f"cannot use reference recording {path}: {exc}", kind="tts_voice") from exc
        return self.prompt_from_audio(audio_16k, audio_24k, text)

    def add_voice(self, name: str, path: str | Path, text: str | None = None) -> None:
        """Make ``name`` speak like the recording at ``path`` (replacing a voice of that name)."""
        prompt = self.prompt_from_file(path, text)
        with self._lock:
            self._voices[name] = prompt
            self._refresh_voices()
        mode = "zero-shot" if prompt.text_ids.numel() else "flow-only (no transcript)"
        log.info("voice %r ready: %d prompt tokens, %s", name, prompt.flow_speech_ids.size(1), mode)

    def remove_voice(self, name: str) -> bool:
        """Forget a voice; False when there was none of that name."""
        with self._lock:
            found = self._voices.pop(name, None) is not None
            self._refresh_voices()
        return found

    def _prompt_for(self, voice: str | None) -> VoicePrompt:
        name = voice if voice is not None else self.default_voice
        if name is None:
            return VoicePrompt.empty()
        with self._lock:
            prompt = self._voices.get(name)
        if prompt is None and self.voice_resolver is not None:
            found = self.voice_resolver(name)
            if found is not None:
                self.add_voice(name, found[0], found[1])
                with self._lock:
                    prompt = self._voices.get(name)
        if prompt is None:
            raise CosyVoiceError(
                f"unknown voice {name!r}; this model has {list(self.voices)}", kind="tts_voice"
            )
        return prompt

    # ------------------------------------------------------------------------------------ synthesis

    def synthesize(
        self, text: str, *, voice: str | None = None, cancel: CancelToken | None = None
    ) -> Iterator[np.ndarray]:
        """Yield float32 24 kHz chunks of ``text`` spoken in ``voice``; stops within a step of ``cancel``."""
        if not isinstance(text, str):
            raise CosyVoiceError("text must be a string", kind="tts_text")
        if len(text) > MAX_TEXT_CHARS:
            raise CosyVoiceError(f"text longer than {MAX_TEXT_CHARS} characters", kind="tts_text")
        prompt = self._prompt_for(voice)
        seed = self.seed if self.seed is not None else secrets.randbits(62)
        generator = torch.Generator().manual_seed(seed)
        for piece in split_text(text, self.tokenizer):
            if _cancelled(cancel):
                return
            yield from self._speak(piece, prompt, generator, cancel)

    def _token_stream(
        self, prefix: torch.Tensor, min_len: int, max_len: int, sampler: Sampler, cancel: CancelToken | None
    ) -> Iterator[int]:
        """The LM's speech tokens (a seam tests replace with a scripted sequence)."""
        return generate(
            self.modules.lm, prefix, min_len=min_len, max_len=max_len, sampler=sampler, cancel=cancel
        )

    @torch.inference_mode()
    def _speak(
        self, piece: str, prompt: VoicePrompt, generator: torch.Generator, cancel: CancelToken | None
    ) -> Iterator[np.ndarray]:
        ids = self.tokenizer.encode(piece)
        if not ids:
            return
        m = self.modules
        text_ids = torch.cat([prompt.text_ids, torch.tensor(ids, dtype=torch.long)])
        prefix = m.lm.prefix(text_ids, prompt.lm_speech_ids)
        min_len, max_len = decode_lengths(len(ids), m.config.lm)
        sampler = RasSampler(m.config.lm.sampling, m.lm.eos, generator)
        vocoder = TokenToWave(m.flow, m.hift, prompt, generator, m.config.flow.token_mel_ratio)
        schedule = ChunkSchedule(prompt.flow_speech_ids.size(1), lookahead=m.config.flow.pre_lookahead_len)
        tokens: list[int] = []
        for token in self._token_stream(prefix, min_len, max_len, sampler, cancel):
            tokens.append(token)
            if schedule.ready(len(tokens)):
                start, end = schedule.advance()
                if _cancelled(cancel):
                    return
                yield self._to_output(vocoder.chunk(torch.tensor([tokens[:end]]), start, finalize=False))
        if _cancelled(cancel) or not tokens:
            return
        yield self._to_output(
            vocoder.chunk(torch.tensor([tokens]), schedule.offset, finalize=True, streaming=False)
        )

    def _to_output(self, speech: torch.Tensor) -> np.ndarray:
        audio = speech.reshape(-1).float().cpu().numpy()
        rate = self.modules.config.sample_rate
        if rate != OUTPUT_SAMPLE_RATE:
            import soxr

            audio = soxr.resample(audio, rate, OUTPUT_SAMPLE_RATE)
        return np.ascontiguousarray(audio, dtype=np.float32)

    def warmup(self) -> None:
        """Synthesize a short phrase once (kernels, caches, the first flow chunk)."""
        for _ in self.synthesize("Hello, this is a warm-up."):
            pass
