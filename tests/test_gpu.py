"""The production backends on a CUDA GPU: bf16, weights loaded straight onto the device, torch.compile (CUDA
graphs for the LLM's decode step), warm-up and turns on one serving thread. Tiny random models of the real
architectures, so these take seconds; ``bash bench/gpu.sh`` runs them on a lent GPU. Without CUDA they skip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import Config
from core.models.base import ChatMessage
from core.models.cosyvoice import CosyVoice2TTS
from core.models.hf_llm import TransformersLLM
from core.models.registry import build_stack
from core.models.whisper import WhisperASR
from core.session.executor import device_executor
from tests.cosyvoice_tiny import MICRO, tiny_folder
from tests.tiny_models import build_tiny_qwen2, build_tiny_whisper

ROOT = Path(__file__).resolve().parents[1]
WHISPER_BASE = ROOT / "data" / "models" / "whisper-base"
HELLO = [ChatMessage("user", "Hello there, how are you?")]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (bash bench/gpu.sh on a lent one)"
    ),
]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("gpu-qwen") / "qwen")


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (WHISPER_BASE / "tokenizer.json").is_file():
        pytest.skip("embedded models not built: run bash install.sh --cuda")
    return build_tiny_whisper(tmp_path_factory.mktemp("gpu-whisper") / "whisper", WHISPER_BASE)


def _on_gpu(model: torch.nn.Module) -> bool:
    return {p.device.type for p in model.parameters()} == {"cuda"}


def test_llm_on_cuda_bf16_compiled_and_served_on_its_warm_up_thread(qwen_dir: Path) -> None:
    llm = TransformersLLM(qwen_dir, device="cuda", greedy=True, compile=True)
    assert llm.dtype == torch.bfloat16 and _on_gpu(llm.model)
    serving = device_executor("cuda-llm-test")
    serving.submit(llm.warmup).result()  # the CUDA graphs are captured here ...
    first = serving.submit(lambda: list(llm.token_stream(HELLO, max_new_tokens=16))).result()
    again = serving.submit(lambda: list(llm.token_stream(HELLO, max_new_tokens=16))).result()
    assert len(first) == 16 and first == again  # ... and replayed for every turn on the same thread
    eager = TransformersLLM(qwen_dir, device="cuda", greedy=True, static_cache=True)
    # bf16: compiled and eager round differently, so only the first tokens must agree
    assert list(eager.token_stream(HELLO, max_new_tokens=16))[:2] == first[:2]


def test_whisper_on_cuda_bf16_compiled(whisper_dir: Path) -> None:
    asr = WhisperASR(whisper_dir, device="cuda", compile=True)
    assert asr.dtype == torch.bfloat16 and _on_gpu(asr.model)
    clip = (0.1 * np.random.default_rng(0).standard_normal(16_000)).astype(np.float32)
    assert isinstance(asr.transcribe(clip).text, str)
    assert len(asr.transcribe_batch([clip, clip[:8000]])) == 2


def test_cosyvoice2_on_cuda_bf16_compiled() -> None:
    tts = CosyVoice2TTS(tiny_folder(MICRO), device="cuda", compile=True, seed=3)
    m = tts.modules
    assert m.device.type == "cuda" and m.dtype == torch.bfloat16
    assert _on_gpu(m.lm) and _on_gpu(m.flow) and _on_gpu(m.hift)
    tts.warmup()
    audio = np.concatenate(list(tts.synthesize("Hello there.", voice="stored")))
    assert audio.dtype == np.float32 and np.isfinite(audio).all() and np.abs(audio).max() > 1e-3


def test_the_production_stack_puts_every_model_on_the_gpu_in_the_config_dtype(
    qwen_dir: Path, whisper_dir: Path
) -> None:
    model = {
        "stack": "auto",  # auto: production, because CUDA is here
        "asr_path": str(whisper_dir),
        "llm_path": str(qwen_dir),
        "tts": "auto",  # auto: CosyVoice2, because its folder is complete
        "tts_path": str(tiny_folder(MICRO)),
        "dtype": "float16",  # not the CUDA default (bf16): it must come from the config
    }
    stack = build_stack(Config.model_validate({"model": model}))
    assert stack.kind == "production" and stack.device == "cuda"
    assert stack.info["tts"].startswith("cosyvoice2")
    asr, llm, tts = stack.asr, stack.llm, stack.tts
    assert isinstance(asr, WhisperASR) and isinstance(llm, TransformersLLM) and isinstance(tts, CosyVoice2TTS)
    assert asr.dtype == llm.dtype == tts.modules.dtype == torch.float16
    assert _on_gpu(asr.model) and _on_gpu(llm.model) and _on_gpu(tts.modules.lm)
    device_executor(stack.device).submit(stack.warmup).result()
