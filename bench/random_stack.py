"""Randomly initialised models of the production sizes, in folders our real backends load unchanged.

GPU benchmarks measure compute, and compute does not depend on the weights' values, so random weights of
the real shapes (the models' published sizes, copied in ``SHAPES`` below) give the real cost without
downloading anything. Two things differ from trained weights and are fixed here so that a turn still runs
the way a real one does:

- A random model picks "end of text" only by chance, so it would decode to its cap. The embedding rows of
  the stop tokens (and Whisper's no-speech token) are zeroed: their logit is exactly 0 while the largest of
  ~50k random logits is positive, so greedy decoding never stops early and every request decodes a fixed
  length (Whisper: ``WhisperASR``'s cap; the LLM: ``max_new_tokens``).
- Whisper's silence guards are set off (``BENCH_GUARDS``), so the transcript is never empty and the turn
  goes on to the LLM; random Whisper text is gibberish but non-empty (special tokens are ~3 % of the vocab).

``scale="tiny"`` shrinks widths and depths (keeping vocabularies and mel bins) so the same code paths run
on a CPU in seconds; ``scale="full"`` is the production size and wants a CUDA GPU.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.models.base import ModelStack  # noqa: E402
from core.models.whisper import Guards  # noqa: E402

Scale = Literal["tiny", "full"]
WHISPER_BASE = ROOT / "data" / "models" / "whisper-base"
#: Published hyper-parameters of the production models (from their model cards and configs).
SHAPES: dict[str, dict[str, Any]] = {
    "whisper-medium": {
        "vocab_size": 51865,
        "num_mel_bins": 80,
        "d_model": 1024,
        "encoder_layers": 24,
        "decoder_layers": 24,
        "encoder_attention_heads": 16,
        "decoder_attention_heads": 16,
        "encoder_ffn_dim": 4096,
        "decoder_ffn_dim": 4096,
        "max_source_positions": 1500,
        "max_target_positions": 448,
    },
    "whisper-large-v3-turbo": {
        "vocab_size": 51866,
        "num_mel_bins": 128,
        "d_model": 1280,
        "encoder_layers": 32,
        "decoder_layers": 4,
        "encoder_attention_heads": 20,
        "decoder_attention_heads": 20,
        "encoder_ffn_dim": 5120,
        "decoder_ffn_dim": 5120,
        "max_source_positions": 1500,
        "max_target_positions": 448,
    },
    "qwen2.5-7b-instruct": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
}
_TINY_WHISPER = {
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
}
_TINY_QWEN = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
#: Whisper guards for random weights: no silence / no-speech cut, and a fixed 16-token decode (the cap is
#: ``seconds * tokens_per_second + 16``), about what a short spoken question really takes.
BENCH_GUARDS = Guards(min_rms=0.0, no_speech_threshold=1.0, tokens_per_second=0.0)


def _build_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _new_model(cls: Any, config: Any, device: torch.device) -> Any:
    """A random model built straight on ``device`` (bf16 on CUDA: no full-size copy in CPU memory)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        return cls._from_config(config, dtype=dtype).eval()


def random_whisper_dir(size: str, out: Path, scale: Scale = "full", device: str = "auto") -> Path:
    """Write a random Whisper of ``size`` ("whisper-medium", "whisper-large-v3-turbo") to ``out``; returns it.

    Tokenizer and generation config are Whisper base's (multilingual, same token ids); a 51866-token
    vocabulary (large-v3) keeps its extra row, which no tokenizer id reaches and which is zeroed.
    """
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    if size not in SHAPES or not size.startswith("whisper"):
        raise ValueError(f"unknown Whisper size '{size}'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    values = json.loads((WHISPER_BASE / "config.json").read_text())
    values.update(SHAPES[size])
    if scale == "tiny":
        values.update(_TINY_WHISPER)
    config = WhisperConfig(**{k: v for k, v in values.items() if k not in ("architectures", "dtype")})
    model = _new_model(WhisperForConditionalGeneration, config, _build_device(device))
    tokenizer = AutoTokenizer.from_pretrained(WHISPER_BASE)
    silent = ["<|endoftext|>", "<|nocaptions|>", "<|nospeech|>"]
    found = [tokenizer.convert_tokens_to_ids(token) for token in silent]
    ids = [int(i) for i in found if isinstance(i, int) and i != tokenizer.unk_token_id]
    ids += list(range(len(tokenizer), config.vocab_size))
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight[ids] = 0.0
        model.proj_out.weight[ids] = 0.0
    generation = GenerationConfig.from_pretrained(WHISPER_BASE)
    generation.alignment_heads = None  # type: ignore[attr-defined]  # base's heads name base's layers; word timestamps are not benched
    model.generation_config = generation
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    features = WhisperFeatureExtractor.from_pretrained(WHISPER_BASE)
    if config.num_mel_bins != features.feature_size:
        features = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    features.save_pretrained(out)
    del model
    return out


def random_qwen_dir(out: Path, scale: Scale = "full", device: str = "auto") -> Path:
    """Write a random Qwen2.5-7B-Instruct-shaped chat model (Qwen2.5 tokenizer and template) to ``out``."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from tests.tiny_models import QWEN_SPECIAL_START, QWEN_SPECIAL_TOKENS, build_qwen_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    values = dict(SHAPES["qwen2.5-7b-instruct"])
    if scale == "tiny":
        values.update(_TINY_QWEN)
    theta = values.pop("rope_theta")
    eos, pad = QWEN_SPECIAL_START + 2, QWEN_SPECIAL_START
    config = Qwen2Config(
        **values,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    model = _new_model(Qwen2ForCausalLM, config, _build_device(device))
    special = range(QWEN_SPECIAL_START, QWEN_SPECIAL_START + len(QWEN_SPECIAL_TOKENS))
    with torch.no_grad():
        model.lm_head.weight[list(special)] = 0.0  # never a stop token: replies run to max_new_tokens
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(out)
    build_qwen_tokenizer().save_pretrained(out)  # type: ignore[attr-defined]
    del model
    return out


def random_cosyvoice(scale: Scale = "full", device: str = "auto") -> Any:
    """A ``CosyVoice2TTS`` over random modules of the CosyVoice2-0.5B size (or the tiny test size)."""
    from core.models.cosyvoice import DEFAULT_VOICE, CosyVoice2TTS
    from core.models.cosyvoice.frontend import TextTokenizer
    from core.models.cosyvoice.loader import place
    from core.models.cosyvoice.streaming import VoicePrompt
    from tests.cosyvoice_tiny import PRODUCTION, TINY, random_modules, tiny_folder

    where = _build_device(device)
    dtype = torch.bfloat16 if where.type == "cuda" else torch.float32
    modules = place(random_modules(PRODUCTION if scale == "full" else TINY), where, dtype)
    tokenizer = TextTokenizer(tiny_folder(TINY) / "CosyVoice-BlankEN")  # the real CosyVoice2 text vocabulary
    g = torch.Generator().manual_seed(0)
    prompt_tokens = 75  # a 3 s voice prompt at 25 Hz
    none = torch.zeros(0, dtype=torch.long)
    prompt = VoicePrompt(
        none,
        none,
        torch.randint(0, 6561, (1, prompt_tokens), generator=g),
        torch.randn(1, 2 * prompt_tokens, 80, generator=g) - 5.0,
        torch.randn(1, 192, generator=g),
    )
    return CosyVoice2TTS.from_parts(modules, tokenizer, voices={DEFAULT_VOICE: prompt}, seed=0)


def random_production_stack(
    scale: Scale = "full", device: str = "auto", workdir: Path | None = None
) -> ModelStack:
    """Whisper medium + Qwen2.5-7B + CosyVoice2-0.5B with random weights, Silero VAD and Smart Turn, on ``device``.

    The model folders go to ``workdir`` (a fresh temp folder by default; the full Qwen takes ~15 GB) and
    are removed once loaded.
    """
    from core.audio.vad import SileroVAD, load_silero_session
    from core.models import embedded
    from core.models.hf_llm import TransformersLLM
    from core.models.smart_turn import SmartTurn
    from core.models.whisper import WhisperASR

    where = str(_build_device(device))
    tmp = Path(tempfile.mkdtemp(prefix="random-stack-", dir=workdir))
    try:
        asr = WhisperASR(
            random_whisper_dir("whisper-medium", tmp / "whisper-medium", scale, where),
            device=where,
            guards=BENCH_GUARDS,
        )
        llm = TransformersLLM(random_qwen_dir(tmp / "qwen2.5-7b", scale, where), device=where, greedy=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tts = random_cosyvoice(scale, where)
    vad_session = load_silero_session()
    # The real Smart Turn v3.2 (an 8 MB ONNX from its pinned package, as the production stack loads it), so
    # sessions end turns with semantic_vad: the end-of-turn path the product runs by default.
    turn = SmartTurn(embedded.source_path(embedded.SMART_TURN_ONNX))
    info = {"stack": f"random-production-{scale}", "asr": asr.name, "llm": llm.name, "tts": tts.name}
    return ModelStack(
        asr=asr,
        llm=llm,
        tts=tts,
        vad_factory=lambda: SileroVAD(vad_session),
        turn=turn,
        kind="random-production",
        device=where,
        info={**info, "vad": "silero", "turn": turn.name},
    )
