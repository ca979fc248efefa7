"""CosyVoice2 pieces on their own: config parsing, checkpoint loading, the chunk schedule, the front ends."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.models.cosyvoice.config import load_config, parse_config, read_hyperpyyaml
from core.models.cosyvoice.errors import CosyVoiceError
from core.models.cosyvoice.features import kaldi_fbank, prompt_mel, whisper_log_mel
from core.models.cosyvoice.loader import (
    fold_weight_norm,
    load_modules,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
)
from core.models.cosyvoice.streaming import ChunkSchedule
from tests.cosyvoice_tiny import MICRO, PRODUCTION, tiny_folder, yaml_text


def test_cosyvoice_config_reads_the_official_layout() -> None:
    config = parse_config(yaml_text(PRODUCTION, "production"))
    assert config.sample_rate == 24000 and config.token_frame_rate == 25
    assert config.lm.hidden_size == 896 and config.lm.speech_token_size == 6561
    assert (config.lm.sampling.top_p, config.lm.sampling.top_k, config.lm.sampling.win_size) == (0.8, 25, 10)
    enc = config.flow.encoder
    assert (enc.output_size, enc.attention_heads, enc.linear_units, enc.num_blocks) == (512, 8, 2048, 6)
    assert enc.static_chunk_size == 25 and config.flow.pre_lookahead_len == 3
    est = config.flow.estimator
    assert est.channels == (256,) and (est.n_blocks, est.num_mid_blocks, est.num_heads) == (4, 12, 8)
    assert est.static_chunk_size == 50  # `!ref <chunk_size> * <token_mel_ratio>`
    assert config.flow.cfm.inference_cfg_rate == 0.7 and config.flow.cfm.t_scheduler == "cosine"
    assert config.hift.upsample_rates == (8, 5, 3) and config.hift.hop_size == 480
    assert config.mel.fmax == 8000 and config.mel.hop_size == 480


def test_cosyvoice_hyperpyyaml_refs_resolve_without_running_anything() -> None:
    data = read_hyperpyyaml("a: 4\nb: !ref <a>\nc: !ref <a> * <b> - 1\nd: !new:os.system {command: rm}\n")
    assert (data["b"], data["c"]) == (4, 15)
    assert data["d"].target == "os.system" and data["d"].args == {"command": "rm"}  # inert data, never called
    for bad in ("b: !ref <missing>\n", "a: 1\nb: !ref <a>.__class__\n", "[unclosed"):
        with pytest.raises(CosyVoiceError):
            read_hyperpyyaml(bad)


def test_cosyvoice_config_refuses_other_architectures() -> None:
    text = yaml_text(MICRO)
    for old, new in [
        ("CausalMaskedDiffWithXvec", "MaskedDiffWithXvec2"),  # CosyVoice 1 flow
        ("cosyvoice.llm.llm.Qwen2LM", "cosyvoice.llm.llm.TransformerLM"),
        ("CausalConditionalDecoder", "DiT"),  # CosyVoice 3 estimator
        ("sampling_rate: !ref <sample_rate>", "sampling_rate: 22050"),
    ]:
        assert old in text
        with pytest.raises(CosyVoiceError):
            parse_config(text.replace(old, new, 1))


@pytest.mark.parametrize("layer", [nn.Conv1d(6, 4, 3), nn.ConvTranspose1d(6, 4, 5, 2)])
def test_cosyvoice_weight_norm_folds_both_checkpoint_styles(layer: nn.Module) -> None:
    normed = nn.utils.parametrizations.weight_norm(layer)
    with torch.no_grad():
        normed.parametrizations.weight.original0.mul_(
            torch.rand_like(normed.parametrizations.weight.original0) + 0.5
        )
    new_style = {f"conv.{k}": v for k, v in normed.state_dict().items()}
    old_style = {
        "conv.weight_g": new_style["conv.parametrizations.weight.original0"],
        "conv.weight_v": new_style["conv.parametrizations.weight.original1"],
        "conv.bias": new_style["conv.bias"],
    }
    for state in (new_style, old_style):
        folded = fold_weight_norm(state)
        assert set(folded) == {"conv.weight", "conv.bias"}
        torch.testing.assert_close(folded["conv.weight"], normed.weight, rtol=0, atol=0)
    with pytest.raises(CosyVoiceError, match="lacks"):
        fold_weight_norm({"conv.weight_g": old_style["conv.weight_g"]})


@pytest.fixture(scope="module")
def micro() -> Path:
    return tiny_folder(MICRO)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    return dst


def test_cosyvoice_loader_names_what_is_wrong(micro: Path, tmp_path: Path) -> None:
    folder = _copy(micro, tmp_path / "m")
    (folder / "campplus.onnx").unlink()
    (folder / "hift.pt").unlink()
    with pytest.raises(CosyVoiceError, match=r"missing hift\.pt, campplus\.onnx"):
        load_modules(folder, device="cpu")
    shutil.copy(micro / "campplus.onnx", folder)
    (folder / "hift.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CosyVoiceError, match=r"cannot read checkpoint .*hift\.pt"):
        load_modules(folder, device="cpu")
    state = torch.load(micro / "hift.pt", weights_only=True)
    state["extra.weight"] = torch.zeros(1)
    state["conv_post.bias"] = torch.zeros(3)
    del state["m_source.l_linear.bias"]
    torch.save(state, folder / "hift.pt")
    with pytest.raises(CosyVoiceError) as err:
        load_modules(folder, device="cpu")
    message = str(err.value)
    assert "hift.pt" in message and "missing: m_source.l_linear.bias" in message
    assert "unexpected: extra.weight" in message and "wrong shape: conv_post.bias" in message


def test_cosyvoice_loader_paths(tmp_path: Path) -> None:
    with pytest.raises(CosyVoiceError, match="not found"):
        resolve_model_dir(tmp_path / "absent")
    with pytest.raises(CosyVoiceError, match="not a CosyVoice2 folder"):
        load_modules(tmp_path, device="cpu")
    with pytest.raises(CosyVoiceError, match="unknown device"):
        resolve_device("gpu please")
    with pytest.raises(CosyVoiceError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(CosyVoiceError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_cosyvoice_loader_reads_the_tiny_folder(micro: Path) -> None:
    modules = load_modules(micro, device="cpu", dtype="float32")
    assert load_config(micro / "cosyvoice2.yaml") == modules.config
    assert modules.lm.backbone.config.rope_parameters["rope_theta"] == 1_000_000.0
    assert not modules.lm.training and modules.hift.conv_pre.weight.dtype == torch.float32


def test_cosyvoice_chunk_schedule() -> None:
    s = ChunkSchedule(prompt_tokens=0)
    taken = []
    for n in range(1, 400):
        if s.ready(n):
            taken.append((n, *s.advance()))
    assert taken == [(28, 0, 28), (78, 25, 78), (178, 75, 178), (278, 175, 278), (378, 275, 378)]
    s = ChunkSchedule(prompt_tokens=61)  # 14 more tokens reach the 75-token chunk boundary
    assert not s.ready(41) and s.ready(42) and s.advance() == (0, 42)


def _tone(freq: float, rate: int, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_cosyvoice_front_end_features() -> None:
    audio = _tone(1000.0, 16000)
    log_mel = whisper_log_mel(audio)
    assert log_mel.shape == (1, 128, len(audio) // 160)
    assert float(log_mel.max()) <= 2.0 and float(log_mel.max() - log_mel.min()) <= 2.0 + 1e-6  # 8 decades / 4
    fbank = kaldi_fbank(audio)
    assert fbank.shape == (1 + (len(audio) - 400) // 160, 80)
    assert 20 < int(fbank.mean(0).argmax()) < 40  # 1 kHz lies in the lower-middle of 20 Hz-8 kHz Kaldi mels
    assert kaldi_fbank(audio[:300]).shape == (0, 80)
    mel = prompt_mel(_tone(1000.0, 24000))
    assert mel.shape == (2 * 24000 // 480, 80)
    low, high = prompt_mel(_tone(300.0, 24000)).mean(0).argmax(), mel.mean(0).argmax()
    assert low < high  # a higher tone peaks in a higher band
