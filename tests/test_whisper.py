"""Whisper: the CTranslate2 -> transformers converter and the WhisperASR backend on the real Whisper base."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from core.models.base import ASR
from core.models.convert import ConversionError
from core.models.convert.ct2_whisper import (
    build_from_parts,
    convert_ct2_whisper,
    dequantize,
    installed_parts,
    is_complete,
    join_parts,
    read_ct2_model,
)
from core.models.whisper import ASRError, WhisperASR, compression_ratio, cut_repetition, split_long
from tests.speech import espeak, with_silence, word_error_rate

BUILT = Path(__file__).resolve().parents[1] / "data" / "models" / "whisper-base"
SENTENCES = (
    "What is the capital of France?",
    "Please turn off the lights in the kitchen and lock the front door.",
    "Good morning, how are you today?",
)
RATE = 16_000

# ------------------------------------------------------------------ a tiny CTranslate2 Whisper, written here


def _ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_bytes(
    variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None, version: int = 6
) -> bytes:
    """A model.bin in CTranslate2's layout (our own writer, so the reader is tested against the format)."""
    type_ids = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}
    out = [struct.pack("<I", version), _ct2_string("WhisperSpec"), struct.pack("<II", 3, len(variables))]
    for name, value in sorted(variables.items()):
        value = np.array(value, order="C")  # not ascontiguousarray: it turns scalars into 1-D arrays
        out += [
            _ct2_string(name),
            struct.pack("<B", value.ndim),
            struct.pack(f"<{value.ndim}I", *value.shape),
        ]
        out += [struct.pack("<BI", type_ids[value.dtype.name], value.nbytes), value.tobytes()]
    out.append(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        out += [_ct2_string(alias), _ct2_string(target)]
    return b"".join(out)


def tiny_whisper(d: int = 4, ffn: int = 8, vocab: int = 51865) -> dict[str, np.ndarray]:
    """Every variable of a one-layer Whisper spec, random float16, fused biases with zero key slices."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float16)

    def linear(name: str, rows: int, cols: int, zero: slice | None = None) -> dict[str, np.ndarray]:
        bias = w(rows)
        if zero is not None:
            bias[zero] = 0
        return {f"{name}/weight": w(rows, cols), f"{name}/bias": bias}

    def norm(name: str) -> dict[str, np.ndarray]:
        return {f"{name}/gamma": w(d), f"{name}/beta": w(d)}

    v: dict[str, np.ndarray] = {
        "encoder/num_heads": np.array(2, np.int16),
        "decoder/num_heads": np.array(2, np.int16),
        "decoder/activation": np.array(3, np.int8),
        "decoder/alibi": np.array(0, np.int8),
        "decoder/pre_norm": np.array(1, np.int8),
        "decoder/scale_embeddings": np.array(0, np.int8),
        "decoder/start_from_zero_embedding": np.array(0, np.int8),
        "encoder/conv1/weight": w(d, 80, 3),
        "encoder/conv1/bias": w(d),
        "encoder/conv2/weight": w(d, d, 3),
        "encoder/conv2/bias": w(d),
        "encoder/position_encodings/encodings": w(1500, d),
        "decoder/position_encodings/encodings": w(448, d),
        "decoder/embeddings/weight": w(vocab, d),
        **norm("encoder/layer_norm"),
        **norm("decoder/layer_norm"),
    }
    for stack in ("encoder", "decoder"):
        layer = f"{stack}/layer_0"
        v |= linear(f"{layer}/self_attention/linear_0", 3 * d, d, zero=slice(d, 2 * d))
        v |= linear(f"{layer}/self_attention/linear_1", d, d) | norm(f"{layer}/self_attention/layer_norm")
        v |= linear(f"{layer}/ffn/linear_0", ffn, d) | linear(f"{layer}/ffn/linear_1", d, ffn)
        v |= norm(f"{layer}/ffn/layer_norm")
    v |= linear("decoder/layer_0/attention/linear_0", d, d)
    v |= linear("decoder/layer_0/attention/linear_1", 2 * d, d, zero=slice(0, d))
    v |= linear("decoder/layer_0/attention/linear_2", d, d) | norm("decoder/layer_0/attention/layer_norm")
    return v


TIED = {"decoder/projection/weight": "decoder/embeddings/weight"}


def ct2_folder(root: Path, variables: dict[str, np.ndarray], aliases: dict[str, str] | None = TIED) -> Path:
    """A CTranslate2 Whisper folder: the given weights plus the real package's config and tokenizer."""
    _, src = installed_parts()
    folder = root / "ct2"
    folder.mkdir(exist_ok=True)
    (folder / "model.bin").write_bytes(ct2_bytes(variables, aliases))
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(src / name, folder / name)
    return folder


def test_reader_dequantizes_int8_and_resolves_aliases(tmp_path: Path) -> None:
    weight = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
    scale = 127.0 / np.abs(weight).max(axis=1)  # CTranslate2's int8 scheme: one scale per row
    quantized = np.rint(weight * scale[:, None]).astype(np.int8)
    path = tmp_path / "model.bin"
    path.write_bytes(
        ct2_bytes({"a/weight": quantized, "a/weight_scale": scale.astype(np.float32)}, {"b": "a/weight"})
    )
    model = read_ct2_model(path)
    values = dequantize(model.variables, model.aliases)
    assert set(values) == {"a/weight", "b"} and model.aliases == {"b": "a/weight"}
    np.testing.assert_allclose(values["a/weight"], weight, atol=0.01)


def test_tiny_conversion_splits_fused_projections_and_is_deterministic(tmp_path: Path) -> None:
    from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast  # type: ignore[attr-defined]

    variables = tiny_whisper()
    src = ct2_folder(tmp_path, variables)
    convert_ct2_whisper(src, tmp_path / "a")
    convert_ct2_whisper(src, tmp_path / "b")
    assert is_complete(tmp_path / "a")
    for name in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    model = WhisperForConditionalGeneration.from_pretrained(tmp_path / "a", dtype=torch.float32)
    state = model.state_dict()
    fused = torch.from_numpy(variables["decoder/layer_0/self_attention/linear_0/weight"].astype(np.float32))
    assert torch.equal(state["model.decoder.layers.0.self_attn.k_proj.weight"], fused[4:8])
    cross_bias = torch.from_numpy(variables["decoder/layer_0/attention/linear_1/bias"].astype(np.float32))
    assert torch.equal(state["model.decoder.layers.0.encoder_attn.v_proj.bias"], cross_bias[4:])
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    tokenizer = WhisperTokenizerFast.from_pretrained(tmp_path / "a")
    assert len(tokenizer) == 51865
    assert tokenizer.decode([50364, 2425, 50414], decode_with_timestamps=True) == "<|0.00|> Hello<|1.00|>"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: v.pop("decoder/layer_0/ffn/linear_1/bias"), "missing"),
        (lambda v: v.update({"encoder/extra/weight": np.zeros(4, np.float16)}), "unused"),
        (
            lambda v: v["encoder/layer_0/self_attention/linear_0/bias"].__setitem__(5, 1.0),
            "non-zero key bias",
        ),
        (lambda v: v.update({"decoder/alibi": np.array(1, np.int8)}), "decoder/alibi=1"),
        (
            lambda v: v.update({"encoder/layer_0/ffn/linear_1/weight": np.zeros((4, 9), np.float16)}),
            "do not fit",
        ),
    ],
)
def test_tiny_conversion_fails_loudly_and_keeps_the_old_folder(tmp_path: Path, change, message: str) -> None:
    variables = tiny_whisper()
    change(variables)
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("old build")
    with pytest.raises(ConversionError, match=message):
        convert_ct2_whisper(ct2_folder(tmp_path, variables), out)
    assert (out / "marker").read_text() == "old build"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2", "out"]  # no temporary folder left behind


def test_truncated_model_bin_is_a_clear_error(tmp_path: Path) -> None:
    parts, src = installed_parts()
    # Forgetting part 2 is the realistic truncation: the first half of every byte is there, the rest is not.
    with pytest.raises(ConversionError, match="truncated"):
        build_from_parts(parts[:1], src, tmp_path / "whisper")
    assert not (tmp_path / "whisper").exists()
    join_parts(parts, tmp_path / "model.bin")
    assert (tmp_path / "model.bin").stat().st_size == sum(p.stat().st_size for p in parts)
    (tmp_path / "bad.bin").write_bytes(b"\x07\x00\x00\x00garbage")
    with pytest.raises(ConversionError, match="binary version 7"):
        read_ct2_model(tmp_path / "bad.bin")


# ------------------------------------------------------------------------------- the real Whisper base


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/models/whisper-base when it is built, else a fresh conversion of the installed packages."""
    if is_complete(BUILT):
        return BUILT
    parts, src = installed_parts()
    out = tmp_path_factory.mktemp("models") / "whisper-base"
    build_from_parts(parts, src, out)
    return out


@pytest.fixture(scope="module")
def asr(whisper_dir: Path) -> WhisperASR:
    return WhisperASR(whisper_dir, device="cpu", dtype="float32")  # CPU expectations, GPU host or not


@pytest.fixture(scope="module")
def english(asr: WhisperASR) -> dict[str, object]:
    """Each test sentence transcribed alone, language left to detection."""
    return {s: asr.transcribe(espeak(s)) for s in SENTENCES}


def test_converted_folder_has_whisper_base_sizes_and_ids(whisper_dir: Path) -> None:
    config = json.loads((whisper_dir / "config.json").read_text())
    # Whisper base as published (shared/model_shapes.json), read back from the converted config.
    base = {
        "d_model": 512,
        "encoder_layers": 6,
        "decoder_layers": 6,
        "encoder_attention_heads": 8,
        "decoder_attention_heads": 8,
        "encoder_ffn_dim": 2048,
        "decoder_ffn_dim": 2048,
        "vocab_size": 51865,
        "num_mel_bins": 80,
        "max_source_positions": 1500,
        "max_target_positions": 448,
    }
    assert {k: config[k] for k in base} == base
    gen = json.loads((whisper_dir / "generation_config.json").read_text())
    assert gen["lang_to_id"]["<|en|>"] == 50259 and len(gen["lang_to_id"]) == 99
    assert gen["task_to_id"] == {"transcribe": 50359, "translate": 50358}
    assert (gen["decoder_start_token_id"], gen["no_timestamps_token_id"]) == (50258, 50363)
    assert gen["begin_suppress_tokens"] == [220, 50257] and gen.get("forced_decoder_ids") is None
    assert [3, 1] in gen["alignment_heads"]


@pytest.mark.slow
def test_transcribes_english_speech(asr: WhisperASR, english: dict) -> None:
    assert isinstance(asr, ASR)
    for sentence in SENTENCES[:2]:
        text = english[sentence].text
        assert word_error_rate(sentence, text) <= 0.25, text


@pytest.mark.slow
def test_language_is_detected(english: dict) -> None:
    assert {t.language for t in english.values()} == {"en"}


@pytest.mark.slow
def test_silence_and_noise_give_no_text(asr: WhisperASR) -> None:
    rng = np.random.default_rng(0)
    assert asr.transcribe(np.zeros(3 * RATE, np.float32)).text == ""
    below_gate = rng.normal(0, 1e-4, 3 * RATE).astype(np.float32)
    assert asr.transcribe(below_gate).text == ""
    assert asr.transcribe(np.zeros(0, np.float32)).text == ""
    # White noise well above the gate reaches the model: Whisper's no-speech probability must stop it.
    noise = asr.transcribe_batch([rng.normal(0, 0.1, 3 * RATE).astype(np.float32)], "en")[0]
    assert noise.text == ""


@pytest.mark.slow
def test_batch_equals_individual_transcripts(asr: WhisperASR, english: dict) -> None:
    clips = [espeak(s) for s in SENTENCES]
    batch = asr.transcribe_batch(clips)
    assert [t.text for t in batch] == [english[s].text for s in SENTENCES]
    assert all(t.text for t in batch)


@pytest.mark.slow
def test_timestamps_and_long_clips(asr: WhisperASR) -> None:
    first, second = SENTENCES[0], SENTENCES[2]
    padded = with_silence(espeak(first), 1.0, 1.0)
    timed = asr.transcribe(padded, "en", timestamps=True)
    assert word_error_rate(first, timed.text) <= 0.25, timed.text
    assert timed.segments and all(0 <= s.start < s.end <= len(padded) / RATE + 0.5 for s in timed.segments)
    # 34 s: more than one Whisper window; transcribe splits it in the long silence between the sentences.
    long = np.concatenate([espeak(first), np.zeros(28 * RATE, np.float32), espeak(second)])
    long = with_silence(long, 0.0, 34 - len(long) / RATE)
    result = asr.transcribe(long, "en")
    assert word_error_rate(f"{first} {second}", result.text) <= 0.25, result.text
    assert len(result.segments) == 2 and result.segments[1].start > 20
    with pytest.raises(ASRError, match="30 s"):
        asr.transcribe_batch([long])


def test_bad_input_is_a_clear_error(asr: WhisperASR) -> None:
    with pytest.raises(ASRError, match="mono"):
        asr.transcribe(np.zeros((2, RATE), np.float32))
    with pytest.raises(ASRError, match="NaN"):
        asr.transcribe(np.full(RATE, np.nan, np.float32))
    with pytest.raises(ASRError, match="unknown language"):
        asr.transcribe(np.zeros(RATE, np.float32), language="klingon")
    with pytest.raises(ASRError, match="cannot load"):
        WhisperASR(BUILT.parent / "no-such-model", device="cpu")


def test_repetition_guards() -> None:
    loop = "I think so. " + "Thank you. " * 40
    assert compression_ratio(loop) > 2.4 and compression_ratio("What is the capital of France?") < 2.4
    assert cut_repetition(loop) == "I think so. Thank you."
    assert cut_repetition("no no, not that one") == "no no, not that one"


def test_split_long_cuts_in_the_quietest_place() -> None:
    loud = np.ones(28 * RATE, np.float32) * 0.5
    audio = np.concatenate([loud, np.zeros(RATE // 2, np.float32), loud])
    pieces = split_long(audio)
    assert len(pieces) == 2 and all(len(p) <= 30 * RATE for _, p in pieces)
    assert 28 * RATE <= pieces[1][0] <= 28 * RATE + RATE // 2  # inside the half second of silence
    assert sum(len(p) for _, p in pieces) == len(audio)
