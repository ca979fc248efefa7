"""Builds the model stack a worker serves from the config: ``production``, ``embedded`` or ``fake``.

``auto`` picks production when a CUDA GPU is visible and embedded otherwise. Backends are imported here
only, so the session and batch code never depend on one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from core.config import Config, ModelConfig
from core.models.base import ASR, LLM, TTS, ModelStack, TurnDetector

log = logging.getLogger("models")


def has_cuda() -> bool:
    """True when torch sees a CUDA device."""
    import torch

    return bool(torch.cuda.is_available())


def resolve_stack_name(model: ModelConfig) -> str:
    """The concrete stack for a config (resolves ``auto``)."""
    if model.stack != "auto":
        return model.stack
    return "production" if has_cuda() else "embedded"


def _device(model: ModelConfig, stack_name: str | None = None) -> str:
    """The device for a config; ``auto`` is the CPU for the embedded stack, which is built for one.

    The embedded set (CTranslate2 int8 engines, SmolLM2, Piper) is the stack for machines without a GPU;
    on a GPU host it is asked for explicitly (tests, ``--stack embedded``) and must behave as it does on
    a CPU, not turn into a transformers stack in bf16.
    """
    if model.device != "auto":
        return model.device
    if (stack_name or resolve_stack_name(model)) == "embedded":
        return "cpu"
    return "cuda" if has_cuda() else "cpu"


def _set_threads(model: ModelConfig) -> None:
    if model.cpu_threads:
        import torch

        torch.set_num_threads(model.cpu_threads)


def _tts(config: Config, default: str, piper_paths: tuple[Path, Path] | None) -> TTS:
    choice = default if config.model.tts == "auto" else config.model.tts
    if choice == "cosyvoice2":
        try:
            from core.models.cosyvoice import CosyVoice2TTS  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise RuntimeError(f"the CosyVoice2 backend is not available in this build: {exc}") from exc
        return CosyVoice2TTS(  # type: ignore[no-any-return,unused-ignore]
            config.model.tts_path,
            device=_device(config.model),
            ref_audio_path=config.audio.ref_audio_path,
            dtype=config.model.dtype,
            compile=config.model.compile,
        )
    from core.models.piper import PiperTTS

    if piper_paths is None:
        return PiperTTS()
    return PiperTTS(piper_paths[0], piper_paths[1])


def cosyvoice2_missing(model: ModelConfig) -> str | None:
    """Why CosyVoice2 cannot serve this config (None when it can): what ``tts: auto`` falls back on.

    It can when its backend imports (its own dependencies, such as PyYAML, are there) and ``tts_path`` is a
    local folder holding every file of the model, or a hub id that can still be fetched (cached, or the hub
    not switched off with ``HF_HUB_OFFLINE``).
    """
    import os

    try:
        from core.models.cosyvoice.loader import REQUIRED_FILES, is_hub_id
    except ImportError as exc:
        return f"its backend does not import ({exc})"
    path = Path(model.tts_path).expanduser()
    if path.is_dir():
        missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
        return f"{path} lacks {', '.join(missing)}" if missing else None
    text = model.tts_path
    if not is_hub_id(text) or text.startswith("~"):
        return f"no CosyVoice2 folder at {path}"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(text, local_files_only=True)
        except Exception as exc:  # not cached (or no hub client): nothing to load offline
            return f"{text} is not in the local hub cache and HF_HUB_OFFLINE is set ({type(exc).__name__})"
    return None


def _production_tts_default(model: ModelConfig) -> str:
    missing = cosyvoice2_missing(model)
    if missing is None:
        return "cosyvoice2"
    log.warning("CosyVoice2 is not installed (%s): tts auto uses Piper", missing)
    return "piper"


def _asr_path(config: Config, name: str) -> str:
    if name == "embedded":
        from core.models import embedded

        return str(embedded.paths(Path(config.model.embedded_dir)).whisper)
    return config.model.asr_path


def asr_engine(model: ModelConfig, stack_name: str) -> str:
    """The ASR engine for a config: ``auto`` is CTranslate2 for the embedded CPU stack, transformers otherwise.

    CTranslate2 encodes only the clip's own length (a 2 s question costs a fraction of a 30 s window) and
    runs int8 on a CPU; the embedded Whisper weights ship in its format. GPU hub checkpoints stay on
    transformers.
    """
    if model.asr_engine != "auto":
        return model.asr_engine
    return (
        "ctranslate2" if stack_name == "embedded" and _device(model, stack_name) == "cpu" else "transformers"
    )


def llm_engine(model: ModelConfig, stack_name: str) -> str:
    """The LLM engine for a config: ``auto`` is CTranslate2 (int8) for the embedded CPU stack, transformers otherwise.

    Decoding on a CPU is bound by the bytes of weights read per token; int8 reads a quarter of float32's.
    GPU checkpoints (Qwen2.5-7B) stay on transformers, whose bf16, compile and prefix KV reuse serve them.
    """
    if model.llm_engine != "auto":
        return model.llm_engine
    return (
        "ctranslate2" if stack_name == "embedded" and _device(model, stack_name) == "cpu" else "transformers"
    )


def _build_llm(config: Config, name: str) -> LLM:
    m = config.model
    if llm_engine(m, name) == "ctranslate2":
        from core.models.ct2_llm import CT2LLM

        if name == "embedded":
            from core.models import embedded

            path = str(embedded.paths(Path(m.embedded_dir)).llm_ct2)
        else:
            path = m.llm_path  # a CTranslate2 chat model folder
        return CT2LLM(
            path, device=_device(m), intra_threads=m.cpu_threads, temperature=m.temperature, top_p=m.top_p
        )
    from core.models.hf_llm import TransformersLLM

    if name == "embedded":
        from core.models import embedded

        path = str(embedded.paths(Path(m.embedded_dir)).llm)
    else:
        path = m.llm_path
    return TransformersLLM(
        path,
        device=_device(m),
        dtype=m.dtype,
        attn_implementation=m.attn_implementation,
        compile=m.compile,
        temperature=m.temperature,
        top_p=m.top_p,
    )


def _build_asr(config: Config, name: str) -> ASR:
    m = config.model
    if asr_engine(m, name) == "ctranslate2":
        from core.models.ct2_whisper_asr import CT2WhisperASR

        if name == "embedded":
            from core.models import embedded

            path = str(embedded.paths(Path(m.embedded_dir)).whisper_ct2)
        else:
            path = m.asr_path  # a CTranslate2 Whisper folder
        return CT2WhisperASR(path, device=_device(m), intra_threads=m.cpu_threads)
    from core.models.whisper import WhisperASR

    return WhisperASR(
        _asr_path(config, name),
        device=_device(m),
        dtype=m.dtype,
        attn_implementation=m.attn_implementation,
        compile=m.compile,
    )


def build_asr(config: Config) -> ASR:
    """Only the ASR of the configured stack (batch transcription needs nothing else)."""
    name = resolve_stack_name(config.model)
    if name == "fake":
        from core.models.fake import build_fake_stack

        return build_fake_stack().asr
    _set_threads(config.model)
    return _build_asr(config, name)


def _turn_model(config: Config) -> TurnDetector | None:
    """Smart Turn v3.2 (a small ONNX model read from its pinned package) when a session may use semantic_vad."""
    from core.models import embedded
    from core.models.smart_turn import SmartTurn

    try:
        path = embedded.source_path(embedded.SMART_TURN_ONNX)
    except embedded.EmbeddedModelError as exc:
        if config.duplex.turn_detection == "semantic_vad":
            raise
        log.warning("no turn model (%s): sessions use server_vad", exc)
        return None
    return SmartTurn(path)


def build_stack(config: Config) -> ModelStack:
    """Load every model of the configured stack (slow: call it off the event loop)."""
    name = resolve_stack_name(config.model)
    if name == "fake":
        from dataclasses import replace

        from core.models.fake import build_fake_stack

        # A scripted turn model that finds every pause complete, so semantic_vad works on the fake stack too.
        fake = build_fake_stack(turn_probability=0.9)
        if config.model.tts == "cosyvoice2":  # scripted ASR/LLM in front of a real CosyVoice2 folder
            tts = _tts(config, "cosyvoice2", None)
            return replace(fake, tts=tts, info={**fake.info, "tts": tts.name})
        return fake
    from core.audio.vad import SileroVAD, load_silero_session

    m = config.model
    _set_threads(m)
    device = _device(m)
    if name == "embedded":
        from core.models import embedded

        paths = embedded.paths(Path(m.embedded_dir))
        piper: tuple[Path, Path] | None = (paths.piper_onnx, paths.piper_json)
        vad_session = load_silero_session(paths.silero_onnx)
        tts = _tts(config, "piper", piper)
    else:
        vad_session = load_silero_session()
        tts = _tts(config, _production_tts_default(m), None)
    asr = _build_asr(config, name)
    turn = _turn_model(config)
    llm = _build_llm(config, name)
    info = {"stack": name, "asr": asr.name, "llm": llm.name, "tts": tts.name, "vad": "silero"}
    if turn is not None:
        info["turn"] = turn.name
    log.info("model stack %s on %s: %s", name, device, info)
    return ModelStack(
        asr=asr,
        llm=llm,
        tts=tts,
        vad_factory=lambda: SileroVAD(vad_session),
        turn=turn,
        kind=name,
        device=device,
        info=info,
    )
