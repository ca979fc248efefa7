"""Random CosyVoice2 models of any size, and a tiny CosyVoice2 folder in the official layout.

``build_tiny_cosyvoice2(out_dir)`` writes what the official ``CosyVoice2-0.5B`` folder holds, with random
weights: ``cosyvoice2.yaml`` (the official HyperPyYAML format, tiny dimensions), ``llm.pt`` / ``flow.pt`` /
``hift.pt`` (state dicts under the official key names, the vocoder's convolutions weight-normalised as
the official file stores them), ``campplus.onnx`` and ``speech_tokenizer_v2.onnx`` (small random ONNX graphs
with the official inputs and outputs), ``spk2info.pt`` (one stored speaker) and ``CosyVoice-BlankEN/`` (a
tiny Qwen2 with the real Qwen vocabulary, from tests/tiny_models.py). The reference implementation loads
the same folder (tests/cosyvoice_ref/run_reference.py), which is how the parity tests share weights.

``random_modules(dims)`` builds our three networks with random weights without touching the disk; the
benchmark uses it with ``PRODUCTION`` (the published CosyVoice2-0.5B sizes).

    python -m tests.cosyvoice_tiny OUT_DIR
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.models.cosyvoice.config import CosyVoice2Config, parse_config
from core.models.cosyvoice.flow import CausalFlow
from core.models.cosyvoice.hift import HiFTGenerator
from core.models.cosyvoice.llm import SpeechTokenLM
from core.models.cosyvoice.loader import CosyVoice2Modules

SPEECH_TOKENS = 6561


@dataclass(frozen=True)
class Dims:
    """The sizes that differ between the tiny test model and the real one."""

    lm_hidden: int
    lm_layers: int
    lm_heads: int
    lm_kv_heads: int
    lm_intermediate: int
    enc_size: int
    enc_heads: int
    enc_units: int
    enc_blocks: int
    est_channels: int
    est_head_dim: int
    est_blocks: int
    est_mid_blocks: int
    est_heads: int
    hift_channels: int
    f0_channels: int


#: Small, but the flow encoder keeps width 512, which the reference implementation hard-codes: the
#: parity tests use this one.
TINY = Dims(64, 2, 4, 2, 128, 512, 4, 64, 1, 32, 16, 1, 1, 2, 32, 16)
#: Smaller still (encoder width 64), for fast tests of our backend alone; the reference cannot load it.
MICRO = Dims(64, 2, 4, 2, 128, 64, 2, 64, 1, 32, 16, 1, 1, 2, 32, 16)
#: CosyVoice2-0.5B (Qwen2.5-0.5B backbone; flow and vocoder from the released cosyvoice2.yaml).
PRODUCTION = Dims(896, 24, 14, 2, 4864, 512, 8, 2048, 6, 256, 64, 4, 12, 8, 512, 512)

_YAML = """\
# A {name} CosyVoice2 configuration in the official HyperPyYAML layout (random weights, for tests).
__set_seed1: !apply:random.seed [1986]
sample_rate: 24000
llm_input_size: {lm_hidden}
llm_output_size: {lm_hidden}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 25
num_decoding_left_chunks: -1

llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: {speech_tokens}
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: {enc_size}
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {speech_tokens}
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: {enc_size}
        attention_heads: {enc_heads}
        linear_units: {enc_units}
        num_blocks: {enc_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: {enc_size}
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{est_channels}]
            dropout: 0.0
            attention_head_dim: {est_head_dim}
            n_blocks: {est_blocks}
            num_mid_blocks: {est_mid_blocks}
            num_heads: {est_heads}
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {hift_channels}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {f0_channels}

get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
allowed_special: 'all'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: 8000
    center: False
"""


def yaml_text(dims: Dims, name: str = "tiny") -> str:
    """The cosyvoice2.yaml for ``dims``."""
    return _YAML.format(name=name, speech_tokens=SPEECH_TOKENS, **dims.__dict__)


def qwen_config(dims: Dims) -> object:
    """The Qwen2 backbone config (Qwen2.5's rope base and tied embeddings)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=151936,
        hidden_size=dims.lm_hidden,
        intermediate_size=dims.lm_intermediate,
        num_hidden_layers=dims.lm_layers,
        num_attention_heads=dims.lm_heads,
        num_key_value_heads=dims.lm_kv_heads,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )


def _randomize(module: nn.Module, generator: torch.Generator) -> None:
    """Give the parameters that default to constants (norms, biases, attention biases) random values too,
    so a parity test would notice one that is ignored or misplaced."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("pos_bias_u", "pos_bias_v"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            elif leaf == "bias":
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            elif leaf == "alpha" or (
                p.dim() == 1 and ("norm" in name or ".out.1." in name or ".block.2." in name)
            ):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))


def random_modules(
    dims: Dims = TINY, *, seed: int = 0, config: CosyVoice2Config | None = None
) -> CosyVoice2Modules:
    """Our LM, flow and vocoder with random weights (float32, CPU, eval mode)."""
    from transformers import Qwen2Model

    config = config or parse_config(yaml_text(dims))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    backbone = Qwen2Model._from_config(qwen_config(dims), attn_implementation="sdpa")
    lm = SpeechTokenLM(backbone, config.lm)
    flow = CausalFlow(config.flow)
    hift = HiFTGenerator(config.hift)
    for module in (lm, flow, hift):
        _randomize(module, generator)
    # Random init gives a near-zero F0 (all unvoiced: only the noise source) and very quiet audio; put F0
    # around 150 Hz so the harmonic source is exercised, and scale the output to an audible level.
    with torch.no_grad():
        hift.f0_predictor.classifier.weight.mul_(30.0)
        hift.f0_predictor.classifier.bias.fill_(150.0)
        hift.conv_post.weight.mul_(3.0)
    return CosyVoice2Modules(
        config=config,
        lm=lm.eval(),
        flow=flow.eval(),
        hift=hift.eval(),
        device=torch.device("cpu"),
        dtype=torch.float32,
        model_dir=Path("."),
    )


def _weight_normed(name: str) -> bool:
    """The vocoder layers the official checkpoint stores weight-normalised."""
    prefixes = ("conv_pre.", "ups.", "resblocks.", "source_resblocks.", "conv_post.", "f0_predictor.condnet.")
    return name.endswith(".weight") and name.startswith(prefixes) and ".activations" not in name


def official_hift_state(hift: HiFTGenerator) -> dict[str, torch.Tensor]:
    """Our vocoder weights as the official ``hift.pt`` stores them (``parametrizations.weight.original0/1``)."""
    out: dict[str, torch.Tensor] = {}
    for name, value in hift.state_dict().items():
        if _weight_normed(name):
            prefix = name[: -len(".weight")]
            norm = value.norm(p=2, dim=list(range(1, value.dim())), keepdim=True)
            out[f"{prefix}.parametrizations.weight.original0"] = norm.clone()
            out[f"{prefix}.parametrizations.weight.original1"] = value.clone()
        else:
            out[name] = value.clone()
    return out


def save_checkpoints(modules: CosyVoice2Modules, out_dir: Path) -> None:
    """Write llm.pt, flow.pt and hift.pt under the official key names."""
    llm = {k: v.clone() for k, v in modules.lm.state_dict().items()}
    llm["llm.model.lm_head.weight"] = llm[
        "llm.model.model.embed_tokens.weight"
    ]  # tied, as the release has it
    torch.save(llm, out_dir / "llm.pt")
    torch.save({k: v.clone() for k, v in modules.flow.state_dict().items()}, out_dir / "flow.pt")
    torch.save(official_hift_state(modules.hift), out_dir / "hift.pt")


class _Campplus(nn.Module):
    """Stand-in speaker encoder: (1, T, 80) fbank -> (1, 192) embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(80, 192)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(feats)).mean(dim=1)


class _SpeechTokenizer(nn.Module):
    """Stand-in speech tokenizer: (1, 128, T) Whisper log-mel at 100 Hz -> (1, T // 4) ids at 25 Hz."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(128, SPEECH_TOKENS)

    def forward(self, feats: torch.Tensor, feats_length: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.avg_pool1d(feats, 4, 4).transpose(1, 2)
        logits = self.proj(pooled) + feats_length.to(pooled.dtype).reshape(1, 1, 1) * 0.0
        return logits.argmax(dim=-1)


def write_onnx_models(out_dir: Path, seed: int = 0) -> None:
    """campplus.onnx and speech_tokenizer_v2.onnx: random graphs with the official inputs and outputs."""
    torch.manual_seed(seed)
    campplus, tokenizer = _Campplus().eval(), _SpeechTokenizer().eval()
    torch.onnx.export(
        campplus,
        (torch.randn(1, 50, 80),),
        str(out_dir / "campplus.onnx"),
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {1: "frames"}},
        dynamo=False,
    )
    torch.onnx.export(
        tokenizer,
        (torch.randn(1, 128, 200), torch.tensor([200], dtype=torch.int32)),
        str(out_dir / "speech_tokenizer_v2.onnx"),
        input_names=["feats", "feats_length"],
        output_names=["indices"],
        dynamic_axes={"feats": {2: "frames"}, "indices": {1: "tokens"}},
        dynamo=False,
    )


def write_blank_en(out_dir: Path, seed: int = 0) -> None:
    """CosyVoice-BlankEN/: a tiny Qwen2 and the real Qwen tokenizer, with ``rope_theta`` spelled out too
    so older transformers (the reference environment's) read the same rope base."""
    from tests.tiny_models import build_tiny_qwen2

    blank = build_tiny_qwen2(out_dir / "CosyVoice-BlankEN", seed=seed)
    config_path = blank / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", 1_000_000.0)
    config_path.write_text(json.dumps(config, indent=2))


def write_spk2info(modules: CosyVoice2Modules, out_dir: Path, seed: int = 0) -> None:
    """spk2info.pt with one stored zero-shot speaker in the official format (as add_zero_shot_spk saves)."""
    g = torch.Generator().manual_seed(seed)
    n = 30
    tokens = torch.randint(0, SPEECH_TOKENS, (1, n), generator=g, dtype=torch.int32)
    entry = {
        "prompt_text": torch.tensor([[9707, 11, 1879, 13]], dtype=torch.int32),
        "prompt_text_len": torch.tensor([4], dtype=torch.int32),
        "llm_prompt_speech_token": tokens,
        "llm_prompt_speech_token_len": torch.tensor([n], dtype=torch.int32),
        "flow_prompt_speech_token": tokens.clone(),
        "flow_prompt_speech_token_len": torch.tensor([n], dtype=torch.int32),
        "prompt_speech_feat": torch.randn(1, 2 * n, 80, generator=g) - 5.0,
        "prompt_speech_feat_len": torch.tensor([2 * n], dtype=torch.int32),
        "llm_embedding": torch.randn(1, 192, generator=g),
        "flow_embedding": torch.randn(1, 192, generator=g),
    }
    torch.save({"stored": entry}, out_dir / "spk2info.pt")


def build_tiny_cosyvoice2(out_dir: Path, *, dims: Dims = TINY, seed: int = 0) -> Path:
    """Write a complete small CosyVoice2 folder with random weights to ``out_dir``; returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cosyvoice2.yaml").write_text(yaml_text(dims))
    modules = random_modules(dims, seed=seed)
    write_blank_en(out_dir, seed)
    save_checkpoints(modules, out_dir)
    write_onnx_models(out_dir, seed)
    write_spk2info(modules, out_dir, seed)
    (out_dir / "dims.txt").write_text(repr(dims))
    return out_dir


ROOT = Path(__file__).resolve().parents[1]
_SOURCES = (
    ROOT / "tests" / "cosyvoice_tiny.py",
    ROOT / "tests" / "tiny_models.py",
    *sorted((ROOT / "core" / "models" / "cosyvoice").glob("*.py")),
)


def tiny_folder(dims: Dims = TINY) -> Path:
    """A small folder, built once and cached under tmp/ (rebuilt when this builder or the model code changes)."""
    sources = b"".join(p.read_bytes() for p in _SOURCES if p.is_file())
    digest = hashlib.sha256(sources + repr(dims).encode()).hexdigest()[:12]
    target = ROOT / "tmp" / f"cosyvoice-tiny-{digest}"
    if (target / "spk2info.pt").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="cosyvoice-tiny-", dir=target.parent))
    try:
        build_tiny_cosyvoice2(staging, dims=dims)
        try:
            os.rename(staging, target)  # atomic: a concurrent builder's copy wins, ours is dropped
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
        for old in target.parent.glob("cosyvoice-tiny-" + "?" * 12):
            stamp = old / "dims.txt"
            if old != target and stamp.is_file() and stamp.read_text() == repr(dims):  # earlier code versions
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.cosyvoice_tiny OUT_DIR")
    print(build_tiny_cosyvoice2(Path(sys.argv[1])))
