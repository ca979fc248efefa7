"""The hyper-parameters of a CosyVoice2 model, read from the official ``cosyvoice2.yaml``.

That file is HyperPyYAML: plain YAML plus tags that name Python classes (``!new:pkg.Class``), functions
(``!name:pkg.fn``), calls (``!apply:fn``) and references to other keys (``!ref <key>``, also inside small
arithmetic such as ``!ref <chunk_size> * <token_mel_ratio>``). We never import or call what a tag names:
tags become inert :class:`Tagged` nodes, references are resolved against the top-level keys, and only the
numbers our modules need are taken out, each checked against the architecture we implement.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.models.cosyvoice.errors import CosyVoiceError


@dataclass(frozen=True)
class Tagged:
    """A YAML node carrying a HyperPyYAML tag: ``kind`` is new/name/apply, ``target`` the dotted name."""

    kind: str
    target: str
    args: Any


@dataclass(frozen=True)
class Ref:
    """A ``!ref`` expression, resolved after loading."""

    expr: str


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps HyperPyYAML tags as data instead of failing on them."""


def _tagged(loader: _Loader, suffix: str, node: yaml.Node, kind: str) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        args: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        args = loader.construct_sequence(node, deep=True)
    else:
        args = loader.construct_scalar(node)  # type: ignore[arg-type]
    return Tagged(kind, suffix, args)


for _kind in ("new", "name", "apply"):
    _Loader.add_multi_constructor(
        f"!{_kind}:", lambda loader, suffix, node, k=_kind: _tagged(loader, suffix, node, k)
    )
_Loader.add_constructor("!ref", lambda loader, node: Ref(str(loader.construct_scalar(node))))  # type: ignore[arg-type]
_Loader.add_constructor("!copy", lambda loader, node: Ref(str(loader.construct_scalar(node))))  # type: ignore[arg-type]

_REF = re.compile(r"<([A-Za-z0-9_.\[\]]+)>")
_OPS: dict[type, Any] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.USub: operator.neg,
}


def _arith(node: ast.AST) -> Any:
    """Evaluate a number or + - * / of numbers; anything else is refused (no eval)."""
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left), _arith(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.operand))
    raise ValueError("not simple arithmetic")


def _resolve(value: Any, top: dict[str, Any], depth: int = 0) -> Any:
    if depth > 20:
        raise CosyVoiceError("cosyvoice2.yaml: !ref chain too deep (a cycle?)")
    if isinstance(value, Ref):
        names = _REF.findall(value.expr)
        if len(names) == 1 and value.expr.strip() == f"<{names[0]}>":
            if names[0] not in top:
                raise CosyVoiceError(f"cosyvoice2.yaml: !ref to unknown key <{names[0]}>")
            return _resolve(top[names[0]], top, depth + 1)
        text = value.expr
        for name in names:
            if name not in top:
                raise CosyVoiceError(f"cosyvoice2.yaml: !ref to unknown key <{name}>")
            text = text.replace(f"<{name}>", repr(_resolve(top[name], top, depth + 1)))
        try:
            return _arith(ast.parse(text, mode="eval"))
        except (ValueError, SyntaxError) as exc:
            raise CosyVoiceError(f"cosyvoice2.yaml: cannot evaluate !ref {value.expr!r}") from exc
    if isinstance(value, Tagged):
        return Tagged(value.kind, value.target, _resolve(value.args, top, depth))
    if isinstance(value, dict):
        return {k: _resolve(v, top, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top, depth) for v in value]
    return value


def read_hyperpyyaml(text: str) -> dict[str, Any]:
    """Parse HyperPyYAML text into plain data with :class:`Tagged` nodes and every ``!ref`` resolved."""
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise CosyVoiceError(f"cosyvoice2.yaml is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise CosyVoiceError("cosyvoice2.yaml: the top level is not a mapping")
    return {k: _resolve(v, raw) for k, v in raw.items()}


# ------------------------------------------------------------------------------------------ configs


@dataclass(frozen=True)
class SamplingConfig:
    """Repetition-aware sampling (VALL-E 2) of speech tokens."""

    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1


@dataclass(frozen=True)
class LMConfig:
    """The speech-token language model around the Qwen2 backbone."""

    hidden_size: int
    speech_token_size: int
    sampling: SamplingConfig = SamplingConfig()
    #: Speech tokens per text token: the decode stops after at most ``max_ratio`` x text tokens.
    max_token_text_ratio: float = 20.0
    min_token_text_ratio: float = 2.0


@dataclass(frozen=True)
class EncoderConfig:
    """The upsampling conformer encoder of the flow (tokens at 25 Hz -> features at 50 Hz)."""

    input_size: int
    output_size: int
    attention_heads: int
    linear_units: int
    num_blocks: int
    num_up_blocks: int = 4
    static_chunk_size: int = 25
    pre_lookahead_len: int = 3
    up_stride: int = 2


@dataclass(frozen=True)
class EstimatorConfig:
    """The causal 1-D U-Net that predicts the flow-matching velocity."""

    in_channels: int
    out_channels: int
    channels: tuple[int, ...]
    attention_head_dim: int
    n_blocks: int
    num_mid_blocks: int
    num_heads: int
    static_chunk_size: int
    act_fn: str = "gelu"


@dataclass(frozen=True)
class CFMConfig:
    """The flow-matching ODE solve."""

    n_timesteps: int = 10
    inference_cfg_rate: float = 0.7
    t_scheduler: str = "cosine"


@dataclass(frozen=True)
class FlowConfig:
    """Speech tokens (+ prompt) -> 80-band mel at 50 Hz."""

    vocab_size: int
    input_size: int
    output_size: int
    spk_embed_dim: int
    token_mel_ratio: int
    pre_lookahead_len: int
    encoder: EncoderConfig
    estimator: EstimatorConfig
    cfm: CFMConfig = CFMConfig()


@dataclass(frozen=True)
class F0Config:
    """The convolutional F0 predictor of the vocoder."""

    in_channels: int = 80
    cond_channels: int = 512
    num_class: int = 1


@dataclass(frozen=True)
class HiFTConfig:
    """The HiFT vocoder: neural source filter + iSTFTNet, mel at 50 Hz -> waveform."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0: F0Config = F0Config()

    @property
    def hop_size(self) -> int:
        """Waveform samples per mel frame."""
        total = self.hop_len
        for rate in self.upsample_rates:
            total *= rate
        return total


@dataclass(frozen=True)
class MelConfig:
    """The 80-band log-mel of the prompt recording, as the flow was trained on."""

    n_fft: int = 1920
    num_mels: int = 80
    sampling_rate: int = 24000
    hop_size: int = 480
    win_size: int = 1920
    fmin: float = 0.0
    fmax: float | None = 8000.0


@dataclass(frozen=True)
class CosyVoice2Config:
    """Everything our modules need from ``cosyvoice2.yaml``."""

    sample_rate: int
    token_frame_rate: int
    lm: LMConfig
    flow: FlowConfig
    hift: HiFTConfig
    mel: MelConfig = MelConfig()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


# ------------------------------------------------------------------------------------ extraction


def _node(data: dict[str, Any], key: str, suffix: str, where: str) -> dict[str, Any]:
    node = data.get(key)
    if not isinstance(node, Tagged) or not isinstance(node.args, dict):
        raise CosyVoiceError(f"cosyvoice2.yaml: {where}{key} is missing or not a !new: block")
    if not node.target.endswith(suffix):
        raise CosyVoiceError(
            f"cosyvoice2.yaml: {where}{key} is {node.target}; this backend implements {suffix} (CosyVoice2)"
        )
    return dict(node.args)


def _int(args: dict[str, Any], key: str, default: int | None = None) -> int:
    value = args.get(key, default)
    if value is None or isinstance(value, bool):
        raise CosyVoiceError(f"cosyvoice2.yaml: {key} is missing")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise CosyVoiceError(f"cosyvoice2.yaml: {key} is not an integer: {value!r}") from exc


def _float(args: dict[str, Any], key: str, default: float) -> float:
    value = args.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise CosyVoiceError(f"cosyvoice2.yaml: {key} is not a number: {value!r}") from exc


def _ints(args: dict[str, Any], key: str, default: tuple[int, ...]) -> tuple[int, ...]:
    value = args.get(key, default)
    if not isinstance(value, list | tuple):
        raise CosyVoiceError(f"cosyvoice2.yaml: {key} is not a list: {value!r}")
    return tuple(int(v) for v in value)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise CosyVoiceError(
            f"cosyvoice2.yaml: {message} (not the CosyVoice2 architecture this backend implements)"
        )


def _lm_config(data: dict[str, Any]) -> LMConfig:
    args = _node(data, "llm", "Qwen2LM", "")
    _require(
        _int(args, "llm_input_size") == _int(args, "llm_output_size"), "llm_input_size != llm_output_size"
    )
    sampling = args.get("sampling")
    s = SamplingConfig()
    if isinstance(sampling, Tagged) and isinstance(sampling.args, dict):
        sa = sampling.args
        s = SamplingConfig(
            top_p=_float(sa, "top_p", s.top_p),
            top_k=_int(sa, "top_k", s.top_k),
            win_size=_int(sa, "win_size", s.win_size),
            tau_r=_float(sa, "tau_r", s.tau_r),
        )
    return LMConfig(
        hidden_size=_int(args, "llm_input_size"),
        speech_token_size=_int(args, "speech_token_size"),
        sampling=s,
    )


def _encoder_config(flow: dict[str, Any], pre_lookahead_len: int) -> EncoderConfig:
    enc = _node(flow, "encoder", "UpsampleConformerEncoder", "flow.")
    _require(enc.get("input_layer", "linear") == "linear", "flow.encoder.input_layer must be linear")
    _require(
        enc.get("pos_enc_layer_type") == "rel_pos_espnet",
        "flow.encoder.pos_enc_layer_type must be rel_pos_espnet",
    )
    _require(
        enc.get("selfattention_layer_type", "rel_selfattn") == "rel_selfattn",
        "flow.encoder needs rel_selfattn",
    )
    _require(enc.get("normalize_before", True) is True, "flow.encoder.normalize_before must be True")
    _require(not enc.get("use_cnn_module", False), "flow.encoder.use_cnn_module must be False")
    _require(not enc.get("macaron_style", False), "flow.encoder.macaron_style must be False")
    _require(enc.get("activation_type", "swish") == "swish", "flow.encoder.activation_type must be swish")
    return EncoderConfig(
        input_size=_int(enc, "input_size"),
        output_size=_int(enc, "output_size", 256),
        attention_heads=_int(enc, "attention_heads", 4),
        linear_units=_int(enc, "linear_units", 2048),
        num_blocks=_int(enc, "num_blocks", 6),
        static_chunk_size=_int(enc, "static_chunk_size", 0),
        pre_lookahead_len=pre_lookahead_len,
    )


def _estimator_config(decoder: dict[str, Any]) -> EstimatorConfig:
    est_node = decoder.get("estimator")
    if not isinstance(est_node, Tagged) or not isinstance(est_node.args, dict):
        raise CosyVoiceError("cosyvoice2.yaml: flow.decoder.estimator is missing")
    est = dict(est_node.args)
    # The first CosyVoice2 release named the causal U-Net ConditionalDecoder(causal=True); same weights.
    causal = est_node.target.endswith("CausalConditionalDecoder") or (
        est_node.target.endswith("ConditionalDecoder") and bool(est.get("causal", False))
    )
    _require(causal, f"flow.decoder.estimator {est_node.target} is not the causal decoder")
    _require(est.get("act_fn", "gelu") == "gelu", "flow.decoder.estimator.act_fn must be gelu")
    return EstimatorConfig(
        in_channels=_int(est, "in_channels"),
        out_channels=_int(est, "out_channels"),
        channels=_ints(est, "channels", (256, 256)),
        attention_head_dim=_int(est, "attention_head_dim", 64),
        n_blocks=_int(est, "n_blocks", 1),
        num_mid_blocks=_int(est, "num_mid_blocks", 2),
        num_heads=_int(est, "num_heads", 4),
        static_chunk_size=_int(est, "static_chunk_size", 50),
    )


def _flow_config(data: dict[str, Any]) -> FlowConfig:
    flow = _node(data, "flow", "CausalMaskedDiffWithXvec", "")
    pre = _int(flow, "pre_lookahead_len", 3)
    decoder = _node(flow, "decoder", "CausalConditionalCFM", "flow.")
    cfm_args: dict[str, Any] = {}
    cfm_node = decoder.get("cfm_params")
    if isinstance(cfm_node, Tagged) and isinstance(cfm_node.args, dict):
        cfm_args = dict(cfm_node.args.get("content", cfm_node.args))
    elif isinstance(cfm_node, dict):
        cfm_args = dict(cfm_node)
    _require(cfm_args.get("solver", "euler") == "euler", "flow.decoder.cfm_params.solver must be euler")
    t_scheduler = str(cfm_args.get("t_scheduler", "cosine"))
    _require(
        t_scheduler in ("cosine", "linear"), "flow.decoder.cfm_params.t_scheduler must be cosine or linear"
    )
    output_size = _int(flow, "output_size", 80)
    _require(output_size == 80, "flow.output_size must be 80 (the mel bands)")
    estimator = _estimator_config(decoder)
    _require(estimator.in_channels == 4 * output_size, "flow.decoder.estimator.in_channels must be 4 x 80")
    _require(
        _int(decoder, "n_spks", 1) == 1 and _int(decoder, "spk_emb_dim", 80) == output_size, "bad n_spks"
    )
    return FlowConfig(
        vocab_size=_int(flow, "vocab_size"),
        input_size=_int(flow, "input_size", 512),
        output_size=output_size,
        spk_embed_dim=_int(flow, "spk_embed_dim", 192),
        token_mel_ratio=_int(flow, "token_mel_ratio", 2),
        pre_lookahead_len=pre,
        encoder=_encoder_config(flow, pre),
        estimator=estimator,
        cfm=CFMConfig(
            inference_cfg_rate=_float(cfm_args, "inference_cfg_rate", 0.7), t_scheduler=t_scheduler
        ),
    )


def _nested_ints(
    args: dict[str, Any], key: str, default: tuple[tuple[int, ...], ...]
) -> tuple[tuple[int, ...], ...]:
    value = args.get(key, default)
    if not isinstance(value, list | tuple) or not all(isinstance(v, list | tuple) for v in value):
        raise CosyVoiceError(f"cosyvoice2.yaml: {key} is not a list of lists: {value!r}")
    return tuple(tuple(int(x) for x in v) for v in value)


def _hift_config(data: dict[str, Any]) -> HiFTConfig:
    h = _node(data, "hift", "HiFTGenerator", "")
    d = HiFTConfig()
    istft = h.get("istft_params", {"n_fft": d.n_fft, "hop_len": d.hop_len})
    f0_node = h.get("f0_predictor")
    f0 = F0Config()
    if isinstance(f0_node, Tagged) and isinstance(f0_node.args, dict):
        _require(
            f0_node.target.endswith("ConvRNNF0Predictor"), "hift.f0_predictor must be ConvRNNF0Predictor"
        )
        f0 = F0Config(
            in_channels=_int(f0_node.args, "in_channels", 80),
            cond_channels=_int(f0_node.args, "cond_channels", 512),
            num_class=_int(f0_node.args, "num_class", 1),
        )
    config = HiFTConfig(
        in_channels=_int(h, "in_channels", d.in_channels),
        base_channels=_int(h, "base_channels", d.base_channels),
        nb_harmonics=_int(h, "nb_harmonics", d.nb_harmonics),
        sampling_rate=_int(h, "sampling_rate", d.sampling_rate),
        nsf_alpha=_float(h, "nsf_alpha", d.nsf_alpha),
        nsf_sigma=_float(h, "nsf_sigma", d.nsf_sigma),
        nsf_voiced_threshold=_float(h, "nsf_voiced_threshold", d.nsf_voiced_threshold),
        upsample_rates=_ints(h, "upsample_rates", d.upsample_rates),
        upsample_kernel_sizes=_ints(h, "upsample_kernel_sizes", d.upsample_kernel_sizes),
        n_fft=_int(istft, "n_fft", d.n_fft),
        hop_len=_int(istft, "hop_len", d.hop_len),
        resblock_kernel_sizes=_ints(h, "resblock_kernel_sizes", d.resblock_kernel_sizes),
        resblock_dilation_sizes=_nested_ints(h, "resblock_dilation_sizes", d.resblock_dilation_sizes),
        source_resblock_kernel_sizes=_ints(h, "source_resblock_kernel_sizes", d.source_resblock_kernel_sizes),
        source_resblock_dilation_sizes=_nested_ints(
            h, "source_resblock_dilation_sizes", d.source_resblock_dilation_sizes
        ),
        lrelu_slope=_float(h, "lrelu_slope", d.lrelu_slope),
        audio_limit=_float(h, "audio_limit", d.audio_limit),
        f0=f0,
    )
    # The 22.05 kHz CosyVoice1 vocoder uses another source module; CosyVoice2 speaks at 24 kHz.
    _require(config.sampling_rate != 22050, "hift.sampling_rate 22050 is the CosyVoice1 vocoder")
    _require(len(config.upsample_rates) == len(config.upsample_kernel_sizes), "hift upsample lists differ")
    return config


def _mel_config(data: dict[str, Any]) -> MelConfig:
    node = data.get("feat_extractor")
    if not isinstance(node, Tagged) or not isinstance(node.args, dict):
        return MelConfig()
    a = node.args
    d = MelConfig()
    fmax = a.get("fmax", d.fmax)
    return MelConfig(
        n_fft=_int(a, "n_fft", d.n_fft),
        num_mels=_int(a, "num_mels", d.num_mels),
        sampling_rate=_int(a, "sampling_rate", d.sampling_rate),
        hop_size=_int(a, "hop_size", d.hop_size),
        win_size=_int(a, "win_size", d.win_size),
        fmin=_float(a, "fmin", d.fmin),
        fmax=None if fmax is None else float(fmax),
    )


def parse_config(text: str) -> CosyVoice2Config:
    """The :class:`CosyVoice2Config` of a ``cosyvoice2.yaml`` text; :class:`CosyVoiceError` if unusable."""
    data = read_hyperpyyaml(text)
    config = CosyVoice2Config(
        sample_rate=_int(data, "sample_rate", 24000),
        token_frame_rate=_int(data, "token_frame_rate", 25),
        lm=_lm_config(data),
        flow=_flow_config(data),
        hift=_hift_config(data),
        mel=_mel_config(data),
    )
    _require(config.hift.sampling_rate == config.sample_rate, "hift.sampling_rate != sample_rate")
    _require(config.mel.hop_size == config.hift.hop_size, "feat_extractor.hop_size != the vocoder's hop")
    _require(
        config.flow.vocab_size == config.lm.speech_token_size, "flow.vocab_size != llm.speech_token_size"
    )
    return config


def load_config(path: str | Path) -> CosyVoice2Config:
    """Read and parse a ``cosyvoice2.yaml`` file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise CosyVoiceError(f"cannot read {p}: {exc}") from exc
    return parse_config(text)
