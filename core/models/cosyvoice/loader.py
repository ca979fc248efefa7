"""Loading an official CosyVoice2-0.5B folder into our modules.

The folder holds ``cosyvoice2.yaml`` (hyper-parameters), ``llm.pt`` / ``flow.pt`` / ``hift.pt`` (state
dicts), ``campplus.onnx`` and ``speech_tokenizer_v2.onnx`` (the prompt encoders), ``spk2info.pt``
(optional stored speakers) and ``CosyVoice-BlankEN/`` (the Qwen2 config and tokenizer). A path that is not
a local directory but looks like a hub id (``FunAudioLLM/CosyVoice2-0.5B``) is fetched with
``huggingface_hub.snapshot_download`` when that package is installed.

Checkpoint keys are matched strictly after three normalisations the official files need: a ``generator.``
prefix some vocoder checkpoints carry is dropped, weight-normalised convolutions (either the old
``weight_g``/``weight_v`` or the ``parametrizations.weight.original0/1`` form) are folded into plain
weights, and the Qwen ``lm_head`` (tied to the embedding, never used: the speech head replaces it) is
ignored.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.models import device as device_mod
from core.models.cosyvoice.config import CosyVoice2Config, load_config
from core.models.cosyvoice.errors import CosyVoiceError
from core.models.cosyvoice.flow import CausalFlow
from core.models.cosyvoice.hift import HiFTGenerator
from core.models.cosyvoice.llm import SpeechTokenLM

log = logging.getLogger("models.cosyvoice")

REQUIRED_FILES = (
    "cosyvoice2.yaml",
    "llm.pt",
    "flow.pt",
    "hift.pt",
    "campplus.onnx",
    "speech_tokenizer_v2.onnx",
    "CosyVoice-BlankEN/config.json",
)
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a hub id (``owner/name``) rather than a local path."""
    return bool(_HUB_ID.fullmatch(text)) and not text.startswith((".", "/"))


def resolve_model_dir(path: str | Path) -> Path:
    """A local CosyVoice2 folder for ``path``: the directory itself, or a hub snapshot of an id."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    text = str(path)
    if is_hub_id(text):
        try:
            from huggingface_hub import snapshot_download
        except ImportError as exc:
            raise CosyVoiceError(
                f"{text} is not a local folder and huggingface_hub is not installed to download it"
            ) from exc
        try:
            return Path(snapshot_download(text))
        except Exception as exc:  # network, auth, missing repo: all one clear error
            raise CosyVoiceError(f"cannot download {text}: {exc}") from exc
    raise CosyVoiceError(f"CosyVoice2 model folder not found: {p}")


def check_folder(model_dir: Path) -> None:
    """Raise one error listing every required file the folder lacks."""
    missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise CosyVoiceError(f"{model_dir} is not a CosyVoice2 folder: missing {', '.join(missing)}")


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU; a bad name is a CosyVoiceError."""
    return device_mod.resolve_device(device, error=CosyVoiceError)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on CUDA (fp16 on a GPU without it), fp32 on the CPU; a bad name is a CosyVoiceError."""
    return device_mod.resolve_dtype(dtype, device, error=CosyVoiceError)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (weights-only unpickling, memory-mapped)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise CosyVoiceError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CosyVoiceError(f"{path} is not a state dict of tensors")
    return dict(data)


def fold_weight_norm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace (magnitude, direction) pairs of weight-normalised layers by the weight they stand for."""
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for g_suffix, v_suffix in (
            (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
            (".weight_g", ".weight_v"),
        ):
            if key.endswith(g_suffix):
                pairs.setdefault(key[: -len(g_suffix)], {})["g"] = value
                break
            if key.endswith(v_suffix):
                pairs.setdefault(key[: -len(v_suffix)], {})["v"] = value
                break
        else:
            out[key] = value
    for prefix, pair in pairs.items():
        if set(pair) != {"g", "v"}:
            raise CosyVoiceError(
                f"weight-normalised layer {prefix} lacks its {'g' if 'g' not in pair else 'v'} half"
            )
        # The same function the parametrisation calls at every forward: g * v / ||v|| over dims but 0.
        out[prefix + ".weight"] = torch._weight_norm(pair["v"].float(), pair["g"].float(), 0)
    return out


def hift_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Vocoder checkpoint keys in our layout."""
    plain = {k.removeprefix("generator."): v for k, v in state.items()}
    return fold_weight_norm(plain)


def llm_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LM checkpoint keys in our layout (the unused tied Qwen head dropped)."""
    return {k: v for k, v in state.items() if k != "llm.model.lm_head.weight"}


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load every parameter; a missing, extra or mis-shaped tensor is one clear error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''} ({len(keys)})")
        raise CosyVoiceError(f"{what} does not match the model in cosyvoice2.yaml: " + "; ".join(parts))
    module.load_state_dict(dict(state), strict=True)


def build_backbone(blank_dir: Path, hidden_size: int, attn_implementation: str = "sdpa") -> nn.Module:
    """An (untrained) Qwen2 model from ``CosyVoice-BlankEN/config.json``; llm.pt supplies the weights."""
    from transformers import Qwen2Config, Qwen2Model

    try:
        config = Qwen2Config.from_pretrained(blank_dir)
    except Exception as exc:
        raise CosyVoiceError(f"cannot read the Qwen2 config in {blank_dir}: {exc}") from exc
    if config.hidden_size != hidden_size:
        raise CosyVoiceError(
            f"{blank_dir}/config.json has hidden_size {config.hidden_size}, cosyvoice2.yaml says {hidden_size}"
        )
    config.use_cache = True
    return Qwen2Model._from_config(config, attn_implementation=attn_implementation)


@dataclass(frozen=True)
class CosyVoice2Modules:
    """The three networks of a loaded model, in eval mode on one device."""

    config: CosyVoice2Config
    lm: SpeechTokenLM
    flow: CausalFlow
    hift: HiFTGenerator
    device: torch.device
    dtype: torch.dtype
    model_dir: Path


def load_modules(
    path: str | Path, *, device: str = "auto", dtype: str = "auto", compile: bool = False
) -> CosyVoice2Modules:
    """Build our LM, flow and vocoder from a CosyVoice2 folder and load its checkpoints.

    The LM and the flow run in ``dtype``; the vocoder always runs in float32 (its iSTFT head is sensitive
    and cheap). ``compile`` wraps the flow estimator and the vocoder in ``torch.compile``.
    """
    model_dir = resolve_model_dir(path)
    check_folder(model_dir)
    config = load_config(model_dir / "cosyvoice2.yaml")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    lm = SpeechTokenLM(build_backbone(model_dir / "CosyVoice-BlankEN", config.lm.hidden_size), config.lm)
    load_strict(lm, llm_state(read_state_dict(model_dir / "llm.pt")), "llm.pt")
    flow = CausalFlow(config.flow)
    load_strict(flow, read_state_dict(model_dir / "flow.pt"), "flow.pt")
    hift = HiFTGenerator(config.hift)
    load_strict(hift, hift_state(read_state_dict(model_dir / "hift.pt")), "hift.pt")
    modules = place(
        CosyVoice2Modules(config, lm, flow, hift, torch.device("cpu"), torch.float32, model_dir), dev, dt
    )
    if compile:
        compile_modules(modules)
    log.info("CosyVoice2 loaded from %s on %s (%s)", model_dir, dev, dt)
    return modules


def place(modules: CosyVoice2Modules, device: torch.device, dtype: torch.dtype) -> CosyVoice2Modules:
    """The modules moved to ``device``: LM and flow in ``dtype``, the vocoder in float32, all in eval mode."""
    return CosyVoice2Modules(
        config=modules.config,
        lm=modules.lm.to(device, dtype).eval(),
        flow=modules.flow.to(device, dtype).eval(),
        hift=modules.hift.to(device, torch.float32).eval(),
        device=device,
        dtype=dtype,
        model_dir=modules.model_dir,
    )


def compile_modules(modules: CosyVoice2Modules) -> None:
    """Wrap the flow estimator (10 passes per chunk: the hot spot) and the vocoder in ``torch.compile``.

    Shapes grow with every chunk, so both are compiled with dynamic shapes. The LM decode step stays
    eager: its KV cache grows by one token per step.
    """
    estimator = modules.flow.decoder.estimator
    modules.flow.decoder.estimator = torch.compile(estimator, dynamic=True)  # type: ignore[assignment]
    modules.hift.decode = torch.compile(modules.hift.decode, dynamic=True)  # type: ignore[method-assign]


def describe(modules: CosyVoice2Modules) -> dict[str, Any]:
    """Parameter counts, for logs and the benchmark."""
    return {
        name: sum(p.numel() for p in getattr(modules, name).parameters()) for name in ("lm", "flow", "hift")
    }
