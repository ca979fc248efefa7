"""Text and voice front end: text -> Qwen token ids, reference recording -> :class:`VoicePrompt`.

Text uses the CosyVoice-BlankEN tokenizer (Qwen2's byte-level BPE) with the special tokens CosyVoice2 adds
for its paralinguistic tags (``[breath]``, ``<laughter>``…); long text is cut at sentence ends into pieces
of at most ``MAX_PIECE_TOKENS`` tokens, each synthesized in one LM pass.

A reference recording gives the speaker embedding (``campplus.onnx`` on a Kaldi filterbank), its speech
tokens (``speech_tokenizer_v2.onnx`` on Whisper's log-mel) and its mel; tokens and mel are trimmed to the
same duration (2 mel frames per token). With its transcript the prompt is zero-shot (the LM continues the
transcript's speech); without one it is "cross-lingual": only the flow hears the prompt.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.models.cosyvoice.config import MelConfig
from core.models.cosyvoice.errors import CosyVoiceError
from core.models.cosyvoice.features import kaldi_fbank, prompt_mel, whisper_log_mel
from core.models.cosyvoice.streaming import VoicePrompt

#: The special tokens CosyVoice2 adds to the Qwen tokenizer, in its order (their ids follow from it).
SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endofprompt|>",
    "[breath]",
    "<strong>",
    "</strong>",
    "[noise]",
    "[laughter]",
    "[cough]",
    "[clucking]",
    "[accent]",
    "[quick_breath]",
    "<laughter>",
    "</laughter>",
    "[hissing]",
    "[sigh]",
    "[vocalized-noise]",
    "[lipsmack]",
    "[mn]",
)
MAX_PIECE_TOKENS = 80
#: The speech tokenizer reads at most 30 s.
MAX_PROMPT_S = 30.0
_SENTENCE_END = re.compile(r"(?<=[.!?;。！？；])\s+")


class TextTokenizer:
    """The Qwen tokenizer of ``CosyVoice-BlankEN`` with CosyVoice2's special tokens."""

    def __init__(self, blank_dir: Path) -> None:
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(blank_dir))
        except Exception as exc:
            raise CosyVoiceError(f"cannot load the tokenizer in {blank_dir}: {exc}") from exc
        self.tokenizer.add_special_tokens(
            {
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "additional_special_tokens": list(SPECIAL_TOKENS),
            }
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return [int(i) for i in self.tokenizer(text)["input_ids"]]


def normalize_text(text: str) -> str:
    """Whitespace collapsed and trimmed; what the model reads."""
    return re.sub(r"\s+", " ", text).strip()


def split_text(text: str, tokenizer: TextTokenizer, max_tokens: int = MAX_PIECE_TOKENS) -> list[str]:
    """``text`` packed into pieces of at most ``max_tokens`` tokens, cut after sentence ends where possible
    (between words inside a sentence that alone is too long)."""
    pieces: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(normalize_text(text)):
        for unit in _words_within(sentence, tokenizer, max_tokens):
            candidate = f"{current} {unit}".strip()
            if current and len(tokenizer.encode(candidate)) > max_tokens:
                pieces.append(current)
                current = unit
            else:
                current = candidate
    if current:
        pieces.append(current)
    return pieces


def _words_within(sentence: str, tokenizer: TextTokenizer, max_tokens: int) -> list[str]:
    """A sentence as one unit, or word by word when it alone is longer than ``max_tokens``."""
    if len(tokenizer.encode(sentence)) <= max_tokens:
        return [sentence]
    return sentence.split(" ")


class PromptEncoder:
    """The two ONNX prompt encoders and the mel of a recording."""

    def __init__(
        self, campplus: Path, speech_tokenizer: Path, mel: MelConfig, *, use_cuda: bool = False
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 1
        available = ort.get_available_providers()
        providers = ["CUDAExecutionProvider"] if use_cuda and "CUDAExecutionProvider" in available else []
        try:
            self.campplus = ort.InferenceSession(str(campplus), options, providers=["CPUExecutionProvider"])
            self.tokenizer = ort.InferenceSession(
                str(speech_tokenizer), options, providers=[*providers, "CPUExecutionProvider"]
            )
        except Exception as exc:
            raise CosyVoiceError(f"cannot load the prompt encoders: {exc}") from exc
        self.mel = mel
        self._lock = threading.Lock()

    def speaker_embedding(self, audio_16k: np.ndarray) -> torch.Tensor:
        """(1, 192) speaker embedding of 16 kHz audio."""
        feats = kaldi_fbank(audio_16k)
        if feats.size(0) == 0:
            raise CosyVoiceError("the reference recording is too short", kind="tts_voice")
        feats = feats - feats.mean(dim=0, keepdim=True)
        name = self.campplus.get_inputs()[0].name
        with self._lock:
            out = self.campplus.run(None, {name: feats.unsqueeze(0).numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(1, -1))

    def speech_tokens(self, audio_16k: np.ndarray) -> torch.Tensor:
        """(N,) speech token ids (25 Hz) of 16 kHz audio."""
        if len(audio_16k) > MAX_PROMPT_S * 16000:
            raise CosyVoiceError("a reference recording may be at most 30 s long", kind="tts_voice")
        feats = whisper_log_mel(audio_16k).numpy()
        inputs = self.tokenizer.get_inputs()
        feed = {inputs[0].name: feats, inputs[1].name: np.array([feats.shape[2]], dtype=np.int32)}
        with self._lock:
            out = self.tokenizer.run(None, feed)[0]
        return torch.from_numpy(np.asarray(out).astype(np.int64).reshape(-1))

    def prompt(self, audio_16k: np.ndarray, audio_24k: np.ndarray, text_ids: list[int] | None) -> VoicePrompt:
        """The prompt of a recording, zero-shot when ``text_ids`` (its transcript) is given."""
        tokens = self.speech_tokens(audio_16k)
        feat = prompt_mel(audio_24k, self.mel)
        n = min(feat.size(0) // 2, tokens.numel())
        if n == 0:
            raise CosyVoiceError("the reference recording gave no speech tokens", kind="tts_voice")
        tokens, feat = tokens[:n], feat[: 2 * n]
        text = torch.tensor(text_ids or [], dtype=torch.long)
        return VoicePrompt(
            text_ids=text,
            lm_speech_ids=tokens if text.numel() else torch.zeros(0, dtype=torch.long),
            flow_speech_ids=tokens.reshape(1, -1),
            feat=feat.unsqueeze(0),
            embedding=self.speaker_embedding(audio_16k),
        )


def _flat_ids(value: Any) -> torch.Tensor:
    return torch.as_tensor(value).reshape(-1).long()


def prompt_from_spk2info(entry: Mapping[str, Any]) -> VoicePrompt:
    """A stored speaker of ``spk2info.pt``: a full zero-shot entry, or an embedding-only (SFT) one."""
    if "flow_prompt_speech_token" in entry:
        flow_ids = _flat_ids(entry["flow_prompt_speech_token"])
        return VoicePrompt(
            text_ids=_flat_ids(entry.get("prompt_text", [])),
            lm_speech_ids=_flat_ids(entry.get("llm_prompt_speech_token", [])),
            flow_speech_ids=flow_ids.reshape(1, -1),
            feat=torch.as_tensor(entry["prompt_speech_feat"]).float().reshape(1, -1, 80),
            embedding=torch.as_tensor(entry["flow_embedding"]).float().reshape(1, -1),
        )
    if "embedding" in entry:
        return VoicePrompt.empty(embedding=torch.as_tensor(entry["embedding"]))
    raise CosyVoiceError("a spk2info.pt entry has neither a prompt nor an embedding")


def load_spk2info(path: Path) -> dict[str, VoicePrompt]:
    """The stored speakers of a model folder (none when the file is absent)."""
    if not path.is_file():
        return {}
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CosyVoiceError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, Mapping):
        raise CosyVoiceError(f"{path} is not a mapping of speakers")
    return {
        str(name): prompt_from_spk2info(entry) for name, entry in data.items() if isinstance(entry, Mapping)
    }
