"""Our CosyVoice2 against the official implementation, on the same random weights.

The tiny folder (tests/cosyvoice_tiny.py) is written by our code in the official layout; the reference
(tests/cosyvoice_ref/run_reference.py) builds the official modules from its cosyvoice2.yaml, loads its
llm.pt / flow.pt / hift.pt with ``strict=True``, runs them in its own environment (made by
tests/cosyvoice_ref/setup_env.sh) and writes .npy files; we run ours on the same inputs and compare.

Tolerances (float32, CPU, fixed seeds): LM log-probs 1e-4 absolute and the same greedy tokens; flow mel
1e-4 absolute (values ~±5); vocoder waveform 1e-5 absolute on the same mel and seed; the streamed
waveform 2e-3 absolute (values ~±0.15: the flow's ~1e-6 differences reach the vocoder, whose F0 is
integrated into a phase over each chunk).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from core.models.cosyvoice.frontend import TextTokenizer
from core.models.cosyvoice.llm import generate
from core.models.cosyvoice.loader import CosyVoice2Modules, load_modules
from core.models.cosyvoice.streaming import ChunkSchedule, TokenToWave, VoicePrompt
from tests.cosyvoice_tiny import ROOT, tiny_folder

REF_PYTHON = (
    Path(os.environ.get("COSYVOICE_REF_VENV", ROOT / "tmp" / "cosyvoice-ref-venv")) / "bin" / "python"
)
HIFT_SEED, STREAM_SEED = 7, 100
TEXTS = ["Hello, world.", "It costs $12.50 [breath] <laughter>ha</laughter>!", "你好，世界。<|endofprompt|>"]

pytestmark = pytest.mark.skipif(
    not REF_PYTHON.is_file(),
    reason=f"reference environment not built ({REF_PYTHON} missing): run bash tests/cosyvoice_ref/setup_env.sh",
)


def _write_inputs(io: Path) -> None:
    g = np.random.default_rng(0)
    arrays = {
        "lm_text": np.array([9707, 11, 1879, 0, 13]),
        "lm_prompt_text": np.array([40, 1079, 3553]),
        "lm_prompt_speech": g.integers(0, 6561, 12),
        "flow_tokens": g.integers(0, 6561, 140),
        "flow_prompt_tokens": g.integers(0, 6561, 20),
        "flow_prompt_feat": (g.standard_normal((1, 40, 80)) - 5).astype(np.float32),
        "flow_embedding": g.standard_normal((1, 192)).astype(np.float32),
        "hift_mel": (g.standard_normal((1, 80, 60)) * 2 - 4).astype(np.float32),
        "hift_cache_source": (g.standard_normal((1, 1, 3840)) * 0.1).astype(np.float32),
    }
    for name, value in arrays.items():
        np.save(io / f"{name}.npy", value)
    (io / "params.json").write_text(json.dumps({"hift_seed": HIFT_SEED, "stream_seed": STREAM_SEED}))
    (io / "tokenizer_texts.json").write_text(json.dumps(TEXTS))


@pytest.fixture(scope="module")
def folder() -> Path:
    return tiny_folder()


@pytest.fixture(scope="module")
def io(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Inputs written, the reference run once on them; its outputs are in the same folder."""
    out = tmp_path_factory.mktemp("cosyvoice-parity")
    _write_inputs(out)
    script = ROOT / "tests" / "cosyvoice_ref" / "run_reference.py"
    run = subprocess.run(
        [str(REF_PYTHON), str(script), str(folder), str(out)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, f"reference run failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    return out


@pytest.fixture(scope="module")
def ours(folder: Path) -> CosyVoice2Modules:
    return load_modules(folder, device="cpu", dtype="float32")


def _load(io: Path, name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(io / f"{name}.npy"))


def _flow_prompt(io: Path) -> VoicePrompt:
    none = torch.zeros(0, dtype=torch.long)
    return VoicePrompt(
        text_ids=none,
        lm_speech_ids=none,
        flow_speech_ids=_load(io, "flow_prompt_tokens").reshape(1, -1),
        feat=_load(io, "flow_prompt_feat"),
        embedding=_load(io, "flow_embedding"),
    )


def test_cosyvoice_lm_log_probs_match_reference(io: Path, ours: CosyVoice2Modules) -> None:
    text, prompt_text = _load(io, "lm_text"), _load(io, "lm_prompt_text")
    prefix = ours.lm.prefix(torch.cat([prompt_text, text]), _load(io, "lm_prompt_speech"))
    eos = ours.lm.eos
    recorded: list[torch.Tensor] = []
    tokens = list(
        generate(
            ours.lm,
            prefix,
            min_len=2 * len(text),
            max_len=20 * len(text),
            sampler=lambda logp, _history, _allow: int(logp[:eos].argmax()),
            on_logp=recorded.append,
        )
    )
    ref_logp = np.load(io / "ref_lm_logp.npy")
    assert ref_logp.shape == (20 * len(text), eos + 3)
    np.testing.assert_allclose(torch.stack(recorded).numpy(), ref_logp, atol=1e-4, rtol=0)
    assert tokens == np.load(io / "ref_lm_tokens.npy").tolist()


@pytest.mark.parametrize(("case", "streaming", "finalize"), [("final", False, True), ("stream", True, False)])
def test_cosyvoice_flow_mel_matches_reference(
    io: Path, ours: CosyVoice2Modules, case: str, streaming: bool, finalize: bool
) -> None:
    p = _flow_prompt(io)
    tokens = _load(io, "flow_tokens").reshape(1, -1)
    mel = ours.flow(tokens, p.flow_speech_ids, p.feat, p.embedding, streaming=streaming, finalize=finalize)
    ref = np.load(io / f"ref_flow_{case}.npy")
    lookahead = 0 if finalize else 3
    assert ref.shape == (1, 80, 2 * (tokens.shape[1] - lookahead))
    np.testing.assert_allclose(mel.numpy(), ref, atol=1e-4, rtol=0)


def test_cosyvoice_streaming_flow_differs_from_full_attention(io: Path) -> None:
    # Guards the test above: the chunked attention mask must matter, or that comparison proves little.
    final, stream = np.load(io / "ref_flow_final.npy"), np.load(io / "ref_flow_stream.npy")
    assert np.abs(final[:, :, : stream.shape[2]] - stream).max() > 1e-2


def test_cosyvoice_hift_waveform_matches_reference(io: Path, ours: CosyVoice2Modules) -> None:
    mel = _load(io, "hift_mel")
    speech, source = ours.hift(mel, torch.Generator().manual_seed(HIFT_SEED))
    assert speech.shape == (1, mel.shape[2] * 480)
    np.testing.assert_allclose(source.numpy(), np.load(io / "ref_hift_source.npy"), atol=1e-6, rtol=0)
    np.testing.assert_allclose(speech.numpy(), np.load(io / "ref_hift_speech.npy"), atol=1e-5, rtol=0)
    assert np.abs(speech.numpy()).max() > 0.02  # audible, so the comparison is not between near-zeros
    cached, _ = ours.hift(mel, torch.Generator().manual_seed(HIFT_SEED + 1), _load(io, "hift_cache_source"))
    np.testing.assert_allclose(cached.numpy(), np.load(io / "ref_hift_cached_speech.npy"), atol=1e-5, rtol=0)


def test_cosyvoice_streaming_chunks_match_reference(io: Path, ours: CosyVoice2Modules) -> None:
    prompt = _flow_prompt(io)
    tokens = _load(io, "flow_tokens").reshape(1, -1)
    vocoder = TokenToWave(ours.flow, ours.hift, prompt, torch.Generator())
    schedule = ChunkSchedule(prompt_tokens=prompt.flow_speech_ids.shape[1])
    chunks: list[torch.Tensor] = []
    plan: list[list[int]] = []
    while schedule.ready(tokens.shape[1]):
        start, end = schedule.advance()
        vocoder.generator = torch.Generator().manual_seed(STREAM_SEED + len(chunks))
        chunks.append(vocoder.chunk(tokens[:, :end], start, finalize=False))
        plan.append([start, end])
    vocoder.generator = torch.Generator().manual_seed(STREAM_SEED + len(chunks))
    chunks.append(vocoder.chunk(tokens, schedule.offset, finalize=True, streaming=False))
    plan.append([schedule.offset, tokens.shape[1]])
    assert plan == json.loads((io / "ref_stream_plan.json").read_text())
    assert plan == [
        [0, 33],
        [30, 83],
        [80, 140],
    ]  # 25 + 5 to align the 20-token prompt, then 50, then the rest
    for i, chunk in enumerate(chunks):
        np.testing.assert_allclose(chunk.numpy()[0], np.load(io / f"ref_stream_{i}.npy"), atol=2e-3, rtol=0)
    assert sum(c.shape[1] for c in chunks) == tokens.shape[1] * 960


def test_cosyvoice_tokenizer_matches_reference(io: Path, folder: Path) -> None:
    ours = TextTokenizer(folder / "CosyVoice-BlankEN")
    expected = json.loads((io / "ref_tokenizer_ids.json").read_text())
    assert [ours.encode(text) for text in TEXTS] == expected
    assert any(i >= 151665 for ids in expected for i in ids)  # CosyVoice's own special tokens were used
