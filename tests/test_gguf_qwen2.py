"""The GGUF converter on the Qwen2 architecture (what the opt-in real Qwen checkpoint needs), with no download.

A tiny random Qwen2 is written as a float32 GGUF the way llama.cpp names Qwen2 tensors (q/k/v biases, rows not
interleaved); the converter must give back a model with the same logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.models import qwen_gguf
from core.models.convert import ConversionError
from core.models.convert.gguf_llm import llama_config, read_meta, read_state_dict
from core.models.embedded import EmbeddedModelError

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}  # fmt: skip


def tiny_qwen2() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random biases: transformers starts them at zero, which would hide a lost bias
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def write_gguf(model: torch.nn.Module, path: Path, arch: str = "qwen2") -> None:
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.block_count", cfg.num_hidden_layers)
    writer.add_uint32(f"{arch}.context_length", cfg.max_position_embeddings)
    writer.add_uint32(f"{arch}.embedding_length", cfg.hidden_size)
    writer.add_uint32(f"{arch}.feed_forward_length", cfg.intermediate_size)
    writer.add_uint32(f"{arch}.attention.head_count", cfg.num_attention_heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", cfg.num_key_value_heads)
    writer.add_float32(f"{arch}.rope.freq_base", 1_000_000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.add_uint32("tokenizer.ggml.eos_token_id", 3)
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(cfg.vocab_size)])
    for name, tensor in model.state_dict().items():
        if name in TOP_NAMES:
            gguf_name = TOP_NAMES[name]
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{layer}.{LAYER_NAMES[rest]}"
        writer.add_tensor(gguf_name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_qwen2_gguf_converts_to_the_same_model(tmp_path: Path) -> None:
    from gguf import GGUFReader
    from transformers import Qwen2ForCausalLM

    source = tiny_qwen2()
    write_gguf(source, tmp_path / "tiny.gguf")
    reader = GGUFReader(str(tmp_path / "tiny.gguf"))
    meta = read_meta(reader)
    assert meta.architecture == "qwen2" and meta.num_kv_heads == 2 and meta.rope_theta == 1_000_000.0
    state = read_state_dict(reader, meta)
    assert "model.layers.1.self_attn.k_proj.bias" in state
    config = llama_config(meta, tied=False)
    assert config.model_type == "qwen2" and config.architectures == ["Qwen2ForCausalLM"]
    converted = Qwen2ForCausalLM(config).eval()
    converted.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    ids = torch.tensor([[5, 17, 42, 8, 91, 3]])
    with torch.no_grad():
        want = source(ids).logits
        got = converted(ids).logits
    # bf16 storage of the weights is the only difference.
    assert torch.allclose(got, want, atol=0.05), float((got - want).abs().max())
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_an_unknown_architecture_is_refused(tmp_path: Path) -> None:
    from gguf import GGUFReader

    write_gguf(tiny_qwen2(), tmp_path / "odd.gguf", arch="mamba")
    with pytest.raises(ConversionError, match=r"unsupported GGUF architecture 'mamba'.*llama, qwen2"):
        read_meta(GGUFReader(str(tmp_path / "odd.gguf")))


def test_the_real_qwen_pins_match_requirements(tmp_path: Path) -> None:
    reqs = (Path(__file__).resolve().parents[1] / "requirements" / "qwen.txt").read_text()
    for src in qwen_gguf.PARTS:
        assert f"{src.package}=={src.version} --hash=sha256:" in reqs
    with pytest.raises(EmbeddedModelError, match=r"install\.sh --with-qwen"):
        qwen_gguf.path(tmp_path)  # not built: the error names the opt-in


def test_a_joined_gguf_with_another_hash_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = [tmp_path / "a.bin", tmp_path / "b.bin"]
    for part in parts:
        part.write_bytes(b"GGUF" + part.name.encode())
    monkeypatch.setattr(qwen_gguf, "_checked_parts", lambda: parts)
    with pytest.raises(EmbeddedModelError, match="joined Qwen GGUF has sha256"):
        qwen_gguf.build(tmp_path / "models", log=lambda _: None)
    assert not qwen_gguf.is_built(tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []  # no folder, no temporary file left
