"""Runs the official CosyVoice2 modules on a model folder and writes their outputs as .npy files.

This script runs in the reference environment (tmp/cosyvoice-ref-venv, made by setup_env.sh), never in the
project's .venv. tests/test_cosyvoice_parity.py writes the inputs (.npy and one params.json), runs this
script in a subprocess, and compares what it writes with our implementation's outputs.

The modules are built the official way: HyperPyYAML instantiates ``llm``, ``flow`` and ``hift`` from the
folder's cosyvoice2.yaml (with ``qwen_pretrain_path`` pointed at CosyVoice-BlankEN), and the checkpoints
are loaded with ``strict=True`` as the official CosyVoice2 class does.

Import shims: the official package imports training- and I/O-only modules at import time (torchaudio for
loading wav files, Matcha's lightning/hydra logging helpers, openai-whisper's tokenizer, librosa for the
training feature extractor). None of them is on the path of the computations compared here, so they are
replaced by stubs that raise if ever called.

    python run_reference.py MODEL_DIR IO_DIR
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import types
from pathlib import Path
from typing import Any


def _not_here(*_args: Any, **_kwargs: Any) -> Any:
    raise RuntimeError("not available in the CosyVoice2 parity environment")


def _stub(name: str, **attrs: Any) -> None:
    module = types.ModuleType(name)
    module.__path__ = []  # type: ignore[attr-defined]
    for key, value in attrs.items():
        setattr(module, key, value)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:  # make ``parent.child`` resolve the way an import would
        setattr(importlib.import_module(parent), child, module)


def install_shims() -> None:
    """Stand-ins for the import-time-only dependencies (see the module docstring)."""
    _stub(
        "cosyvoice.utils.file_utils",
        logging=logging,
        load_wav=_not_here,
        convert_onnx_to_trt=_not_here,
        export_cosyvoice2_vllm=_not_here,
    )
    _stub("cosyvoice.tokenizer.tokenizer", get_qwen_tokenizer=_not_here)
    _stub("matcha.utils", get_pylogger=logging.getLogger)
    _stub("matcha.utils.pylogger", get_pylogger=logging.getLogger)
    _stub("matcha.utils.audio", mel_spectrogram=_not_here)


install_shims()

import cosyvoice.transformer.upsample_encoder  # noqa: E402, F401  (import order the package needs)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from cosyvoice.cli.model import CosyVoice2Model  # noqa: E402
from hyperpyyaml import load_hyperpyyaml  # noqa: E402


def build(model_dir: Path) -> dict[str, Any]:
    """The official llm, flow and hift modules with the folder's weights, in eval mode on the CPU."""
    with open(model_dir / "cosyvoice2.yaml") as f:
        configs = load_hyperpyyaml(f, overrides={"qwen_pretrain_path": str(model_dir / "CosyVoice-BlankEN")})
    llm, flow, hift = configs["llm"], configs["flow"], configs["hift"]
    llm.load_state_dict(torch.load(model_dir / "llm.pt", map_location="cpu", weights_only=True), strict=True)
    flow.load_state_dict(
        torch.load(model_dir / "flow.pt", map_location="cpu", weights_only=True), strict=True
    )
    hift_state = torch.load(model_dir / "hift.pt", map_location="cpu", weights_only=True)
    hift.load_state_dict({k.replace("generator.", ""): v for k, v in hift_state.items()}, strict=True)
    return {"llm": llm.eval(), "flow": flow.eval(), "hift": hift.eval()}


def ids(array: np.ndarray) -> torch.Tensor:
    """A (1, N) int32 id tensor."""
    return torch.from_numpy(array.astype(np.int32)).reshape(1, -1)


def run_lm(llm: Any, io: Path) -> None:
    """Greedy decoding (never the end token) through the official inference loop, recording log-probs."""
    speech_size = llm.speech_token_size
    recorded: list[np.ndarray] = []

    def greedy(weighted_scores: torch.Tensor, decoded_tokens: list[int], sampling: int) -> torch.Tensor:
        recorded.append(weighted_scores.float().numpy().copy())
        return weighted_scores[:speech_size].argmax().reshape(1)

    llm.sampling = greedy
    text, prompt_text = ids(np.load(io / "lm_text.npy")), ids(np.load(io / "lm_prompt_text.npy"))
    prompt_speech = ids(np.load(io / "lm_prompt_speech.npy"))
    tokens = list(
        llm.inference(
            text=text,
            text_len=torch.tensor([text.shape[1]], dtype=torch.int32),
            prompt_text=prompt_text,
            prompt_text_len=torch.tensor([prompt_text.shape[1]], dtype=torch.int32),
            prompt_speech_token=prompt_speech,
            prompt_speech_token_len=torch.tensor([prompt_speech.shape[1]], dtype=torch.int32),
            embedding=torch.zeros(0, 192),
        )
    )
    np.save(io / "ref_lm_logp.npy", np.stack(recorded))
    np.save(io / "ref_lm_tokens.npy", np.array(tokens, dtype=np.int64))


def _flow_inputs(io: Path) -> dict[str, torch.Tensor]:
    prompt_tokens = ids(np.load(io / "flow_prompt_tokens.npy"))
    feat = torch.from_numpy(np.load(io / "flow_prompt_feat.npy")).float()
    return {
        "prompt_token": prompt_tokens,
        "prompt_token_len": torch.tensor([prompt_tokens.shape[1]], dtype=torch.int32),
        "prompt_feat": feat,
        "prompt_feat_len": torch.tensor([feat.shape[1]], dtype=torch.int32),
        "embedding": torch.from_numpy(np.load(io / "flow_embedding.npy")).float(),
    }


def run_flow(flow: Any, io: Path) -> None:
    """The mel of the whole text (finalize) and of a streaming chunk (lookahead as context)."""
    tokens = ids(np.load(io / "flow_tokens.npy"))
    common = _flow_inputs(io)
    cases = {"final": (False, True), "stream": (True, False)}
    for name, (streaming, finalize) in cases.items():
        mel, _ = flow.inference(
            token=tokens,
            token_len=torch.tensor([tokens.shape[1]], dtype=torch.int32),
            streaming=streaming,
            finalize=finalize,
            **common,
        )
        np.save(io / f"ref_flow_{name}.npy", mel.numpy())


def run_hift(hift: Any, io: Path, params: dict[str, Any]) -> None:
    """Waveform and excitation of a mel, with fresh excitation and with a cached excitation start."""
    mel = torch.from_numpy(np.load(io / "hift_mel.npy")).float()
    torch.manual_seed(params["hift_seed"])
    speech, source = hift.inference(speech_feat=mel)
    np.save(io / "ref_hift_speech.npy", speech.numpy())
    np.save(io / "ref_hift_source.npy", source.numpy())
    cache = torch.from_numpy(np.load(io / "hift_cache_source.npy")).float()
    torch.manual_seed(params["hift_seed"] + 1)
    speech, _ = hift.inference(speech_feat=mel, cache_source=cache)
    np.save(io / "ref_hift_cached_speech.npy", speech.numpy())


def run_stream(modules: dict[str, Any], io: Path, params: dict[str, Any]) -> None:
    """The official streaming token2wav loop on a finished token list: growing hops, hift cache, cross-fade.

    The hop schedule is the official one (first hop padded to align the prompt, then doubling up to 4x);
    each token2wav call is seeded with ``stream_seed + chunk index``.
    """
    model = CosyVoice2Model(modules["llm"], modules["flow"], modules["hift"], False)
    tokens = np.load(io / "flow_tokens.npy").astype(np.int64).tolist()
    common = _flow_inputs(io)
    prompt_token, prompt_feat, embedding = common["prompt_token"], common["prompt_feat"], common["embedding"]
    uuid = "parity"
    model.hift_cache_dict[uuid] = None
    hop, max_hop, pre = 25, 100, model.flow.pre_lookahead_len
    pad = int(np.ceil(prompt_token.shape[1] / hop) * hop - prompt_token.shape[1])
    offset, index, chunks, plan = 0, 0, [], []
    while True:
        this_hop = hop + pad if offset == 0 else hop
        if len(tokens) - offset < this_hop + pre:
            break
        torch.manual_seed(params["stream_seed"] + index)
        chunk = model.token2wav(
            token=torch.tensor(tokens[: offset + this_hop + pre]).unsqueeze(0),
            prompt_token=prompt_token,
            prompt_feat=prompt_feat,
            embedding=embedding,
            token_offset=offset,
            uuid=uuid,
            stream=True,
            finalize=False,
        )
        chunks.append(chunk.numpy()[0])
        plan.append([offset, offset + this_hop + pre])
        offset += this_hop
        hop = min(max_hop, hop * 2)
        index += 1
    torch.manual_seed(params["stream_seed"] + index)
    chunk = model.token2wav(
        token=torch.tensor(tokens).unsqueeze(0),
        prompt_token=prompt_token,
        prompt_feat=prompt_feat,
        embedding=embedding,
        token_offset=offset,
        uuid=uuid,
        finalize=True,
    )
    chunks.append(chunk.numpy()[0])
    plan.append([offset, len(tokens)])
    for i, c in enumerate(chunks):
        np.save(io / f"ref_stream_{i}.npy", c)
    (io / "ref_stream_plan.json").write_text(json.dumps(plan))


def official_special_tokens() -> dict[str, Any]:
    """The special-token dict the official QwenTokenizer adds, read from its source (the module itself
    imports openai-whisper, which this environment does not install)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("cosyvoice")
    assert spec is not None and spec.submodule_search_locations
    source = Path(next(iter(spec.submodule_search_locations))) / "tokenizer" / "tokenizer.py"
    for cls in ast.walk(ast.parse(source.read_text())):
        if isinstance(cls, ast.ClassDef) and cls.name == "QwenTokenizer":
            for node in ast.walk(cls):
                targets = getattr(node, "targets", [])
                if isinstance(node, ast.Assign) and any(
                    getattr(t, "id", None) == "special_tokens" for t in targets
                ):
                    return ast.literal_eval(node.value)
    raise RuntimeError("QwenTokenizer.special_tokens not found in the official tokenizer")


def run_tokenizer(model_dir: Path, io: Path) -> None:
    """Token ids of sample texts through the official tokenizer setup (AutoTokenizer + special tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "CosyVoice-BlankEN"))
    tokenizer.add_special_tokens(official_special_tokens())
    texts = json.loads((io / "tokenizer_texts.json").read_text())
    ids = [tokenizer([text], return_tensors="pt")["input_ids"][0].tolist() for text in texts]
    (io / "ref_tokenizer_ids.json").write_text(json.dumps(ids))


def main() -> None:
    """Entry point: ``run_reference.py MODEL_DIR IO_DIR``."""
    model_dir, io = Path(sys.argv[1]), Path(sys.argv[2])
    params = json.loads((io / "params.json").read_text())
    torch.set_num_threads(1)
    modules = build(model_dir)
    run_lm(modules["llm"], io)
    run_flow(modules["flow"], io)
    run_hift(modules["hift"], io, params)
    run_stream(modules, io, params)
    run_tokenizer(model_dir, io)
    print("reference outputs written to", io)


if __name__ == "__main__":
    main()
