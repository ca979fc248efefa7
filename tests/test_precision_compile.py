"""Every torch backend's bf16 and torch.compile paths, on tiny random models on this CPU (both work on a CPU).

The production stack runs bf16 with ``--compile`` on a GPU; these run the same code (the dtype each module
ends up in, the compiled callables and their first calls) where no GPU is lent. Compiled and eager outputs
are compared at the same precision, so a compile that changed the maths would show.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.models.base import ChatMessage
from core.models.cosyvoice import CosyVoice2TTS
from core.models.hf_llm import TransformersLLM
from core.models.whisper import WhisperASR
from tests.cosyvoice_tiny import MICRO, tiny_folder
from tests.tiny_models import build_tiny_qwen2, build_tiny_whisper

ROOT = Path(__file__).resolve().parents[1]
WHISPER_BASE = ROOT / "data" / "models" / "whisper-base"
HELLO = [ChatMessage("user", "Hello there, how are you?")]

pytestmark = pytest.mark.slow


def _compiled(fn: object) -> bool:
    """Whether ``fn`` is what torch.compile returns (a compiled module, or a compiled function)."""
    return isinstance(fn, torch._dynamo.eval_frame.OptimizedModule) or hasattr(
        fn, "_torchdynamo_orig_callable"
    )


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen") / "qwen")


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (WHISPER_BASE / "tokenizer.json").is_file():
        pytest.skip(
            "embedded models not built (the tiny Whisper borrows whisper-base's tokenizer): run bash install.sh"
        )
    return build_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper") / "whisper", WHISPER_BASE)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_llm_bf16_and_compiled_decode_match_eager(qwen_dir: Path, dtype: str) -> None:
    eager = TransformersLLM(qwen_dir, greedy=True, device="cpu", dtype=dtype, static_cache=True)
    compiled = TransformersLLM(qwen_dir, greedy=True, device="cpu", dtype=dtype, compile=True)
    want = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    assert eager.dtype == compiled.dtype == want
    assert {p.dtype for p in compiled.model.parameters()} == {want}
    assert _compiled(compiled._decode_forward) and not _compiled(eager._decode_forward)
    got = list(compiled.token_stream(HELLO, max_new_tokens=12))
    ref = list(eager.token_stream(HELLO, max_new_tokens=12))
    assert len(got) == 12
    if dtype == "float32":
        assert got == ref  # same maths: the same greedy tokens
    else:  # bf16 rounding may flip a near tie of random logits; the first tokens agree
        assert got[:3] == ref[:3]
    compiled.warmup()  # warm-up goes through the same compiled step


@pytest.mark.parametrize("compile", [False, True])
def test_whisper_bf16_and_compiled_encoder(whisper_dir: Path, compile: bool) -> None:
    asr = WhisperASR(whisper_dir, device="cpu", dtype="bfloat16", compile=compile)
    assert asr.dtype == torch.bfloat16 and {p.dtype for p in asr.model.parameters()} == {torch.bfloat16}
    assert _compiled(asr._encoder) is compile
    rng = np.random.default_rng(0)
    clip = (0.1 * rng.standard_normal(16_000)).astype(np.float32)
    features, _ = asr._features([clip])
    assert features.dtype == torch.bfloat16
    with torch.inference_mode():
        got = asr._encoder(features).last_hidden_state
        want = asr.model.model.encoder(features).last_hidden_state
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want.float(), atol=0.1), float((got - want).abs().max())
    result = asr.transcribe(clip)  # the whole path: features, (compiled) encoder, generate
    assert isinstance(result.text, str)


def test_cosyvoice2_bf16_and_compiled_flow_and_vocoder() -> None:
    folder = tiny_folder(MICRO)
    eager = CosyVoice2TTS(folder, device="cpu", dtype="bfloat16", seed=7)
    compiled = CosyVoice2TTS(folder, device="cpu", dtype="bfloat16", compile=True, seed=7)
    m = compiled.modules
    assert m.dtype == torch.bfloat16
    assert {p.dtype for p in m.lm.parameters()} == {p.dtype for p in m.flow.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in m.hift.parameters()} == {torch.float32}  # the vocoder stays float32
    assert _compiled(m.flow.decoder.estimator) and _compiled(m.hift.decode)
    assert not _compiled(eager.modules.flow.decoder.estimator)
    got = np.concatenate(list(compiled.synthesize("Hi.", voice="stored")))
    want = np.concatenate(list(eager.synthesize("Hi.", voice="stored")))
    assert got.dtype == np.float32 and np.isfinite(got).all() and np.abs(got).max() > 1e-3
    assert got.shape == want.shape  # the same speech tokens (same seed), so the same length
    assert np.corrcoef(got, want)[0, 1] > 0.9  # and nearly the same audio
