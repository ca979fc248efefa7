"""core/models/registry.py: which backend serves a config, and that every model setting reaches it.

The backends are replaced by recorders (what would be built, with which arguments), so the production
choices are checked on this CPU without a checkpoint; the real loading paths are tested per backend.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import core.models.cosyvoice as cosyvoice_pkg
import core.models.hf_llm as hf_llm
import core.models.whisper as whisper_mod
from core.config import Config, ModelConfig
from core.models import registry
from core.models.device import load_placement
from core.models.piper import PiperTTS
from tests.cosyvoice_tiny import MICRO, tiny_folder


class Recorder:
    """Stands in for a backend class: keeps the arguments of every instance built."""

    def __init__(self, kind: str, built: list[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> None:
        self.kind, self.built = kind, built

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.built.append((self.kind, args, kwargs))
        return _Model(f"{self.kind}:recorded")


class _Model:
    def __init__(self, name: str) -> None:
        self.name = name


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    found: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    monkeypatch.setattr(whisper_mod, "WhisperASR", Recorder("asr", found))
    monkeypatch.setattr(hf_llm, "TransformersLLM", Recorder("llm", found))
    monkeypatch.setattr(cosyvoice_pkg, "CosyVoice2TTS", Recorder("tts", found))
    return found


@pytest.mark.parametrize(("dtype", "compile"), [("bfloat16", True), ("float32", False), ("float16", True)])
def test_model_dtype_and_compile_reach_every_model(built: list[Any], dtype: str, compile: bool) -> None:
    model = ModelConfig(stack="production", tts="cosyvoice2", device="cpu", dtype=dtype, compile=compile)  # type: ignore[arg-type]
    stack = registry.build_stack(Config(model=model))
    assert sorted(kind for kind, _, _ in built) == ["asr", "llm", "tts"]
    for kind, _, kwargs in built:
        assert kwargs["dtype"] == dtype, kind
        assert kwargs["compile"] is compile, kind
        assert kwargs["device"] == "cpu", kind
    assert stack.info["tts"] == "tts:recorded"


def test_tts_auto_falls_back_to_piper_when_cosyvoice2_is_not_installed(tmp_path: Path) -> None:
    model = ModelConfig(
        stack="production", tts="auto", tts_path=str(tmp_path / "no-cosyvoice-here"), device="cpu"
    )
    assert registry.cosyvoice2_missing(model) == f"no CosyVoice2 folder at {tmp_path / 'no-cosyvoice-here'}"
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "llm.pt").write_bytes(b"")
    partial = model.model_copy(update={"tts_path": str(tmp_path / "partial")})
    assert "lacks" in (registry.cosyvoice2_missing(partial) or "") and "flow.pt" in (
        registry.cosyvoice2_missing(partial) or ""
    )
    tts = registry._tts(Config(model=model), registry._production_tts_default(model), None)
    assert isinstance(tts, PiperTTS)


def test_tts_auto_picks_cosyvoice2_when_its_folder_is_complete() -> None:
    model = ModelConfig(stack="production", tts="auto", tts_path=str(tiny_folder(MICRO)), device="cpu")
    assert registry.cosyvoice2_missing(model) is None
    assert registry._production_tts_default(model) == "cosyvoice2"


def test_tts_auto_falls_back_when_the_backend_does_not_import(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ModelConfig(stack="production", tts="auto", tts_path=str(tiny_folder(MICRO)), device="cpu")
    monkeypatch.setitem(sys.modules, "core.models.cosyvoice.loader", None)  # as if PyYAML were missing
    assert (registry.cosyvoice2_missing(model) or "").startswith("its backend does not import")
    assert registry._production_tts_default(model) == "piper"


def test_tts_auto_with_a_hub_id(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ModelConfig(stack="production", tts="auto", tts_path="FunAudioLLM/CosyVoice2-0.5B", device="cpu")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert registry.cosyvoice2_missing(model) is None  # fetched at load, as the ASR and LLM hub ids are
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # An id that no hub cache holds: offline, there is nothing to load.
    uncached = model.model_copy(update={"tts_path": "duplex-tests/no-such-cosyvoice2"})
    assert "not in the local hub cache" in (registry.cosyvoice2_missing(uncached) or "")


def test_the_embedded_stack_stays_on_the_cpu_where_cuda_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "has_cuda", lambda: True)
    embedded = ModelConfig(stack="embedded")
    assert registry._device(embedded) == "cpu"
    assert registry.asr_engine(embedded, "embedded") == "ctranslate2"
    assert registry.llm_engine(embedded, "embedded") == "ctranslate2"
    assert registry._device(ModelConfig(stack="production")) == "cuda"
    assert registry._device(ModelConfig(stack="auto")) == "cuda"
    assert registry._device(ModelConfig(stack="embedded", device="cuda:1")) == "cuda:1"  # asked for: kept


class Stop(Exception):
    """Raised by a recorded from_pretrained: the arguments are all the test needs."""


def test_production_weights_load_straight_onto_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    assert importlib.util.find_spec("accelerate") is not None  # pinned in requirements/base.txt
    assert load_placement(torch.device("cuda")) == {"device_map": "cuda"}
    assert load_placement(torch.device("cuda:1")) == {"device_map": "cuda:1"}
    assert load_placement(torch.device("cpu")) == {}

    import transformers

    seen: dict[str, dict[str, Any]] = {}

    def recorder(kind: str) -> Any:
        def from_pretrained(path: str, **kwargs: Any) -> Any:
            seen[kind] = kwargs
            raise Stop

        return from_pretrained

    cuda = lambda *a, **k: torch.device("cuda")  # noqa: E731 - the resolved device, as on a GPU host
    monkeypatch.setattr(hf_llm, "resolve_device", cuda)
    monkeypatch.setattr(whisper_mod, "resolve_device", cuda)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recorder("llm"))
    monkeypatch.setattr(transformers.WhisperProcessor, "from_pretrained", lambda *a, **k: None)
    monkeypatch.setattr(transformers.WhisperForConditionalGeneration, "from_pretrained", recorder("asr"))
    with pytest.raises(Stop):
        hf_llm.TransformersLLM("Qwen/Qwen2.5-7B-Instruct", device="cuda")
    with pytest.raises(Stop):
        whisper_mod.WhisperASR("openai/whisper-large-v3-turbo", device="cuda")
    assert seen["llm"]["device_map"] == "cuda" and seen["llm"]["dtype"] == torch.bfloat16
    assert seen["asr"]["device_map"] == "cuda"
