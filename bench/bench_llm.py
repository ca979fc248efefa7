"""Embedded LLM latency: time to the first token and to the first 12 tokens of a spoken conversation.

A 3-turn voice conversation (the default system prompt of ``DuplexConfig``, the model's own greedy replies
kept as history, as the session does) is answered by ``TransformersLLM`` (SmolLM2-135M-Instruct from
data/models by default) in three modes, interleaved run by run so each sees the same machine state:

- *fresh*: ``prefix_cache=False``, every turn prefills its whole prompt (the behaviour before prefix reuse);
- *reuse*: ``prefix_cache=True``, a turn prefills only what its prompt does not share with the cache the
  previous call left (the user's new message, the turn markers, and whatever of the last reply's text did
  not tokenize back to the same ids); the first turn of a conversation reuses the system prompt;
- *reuse+prefill*: as *reuse*, and before each turn ``prefill(system + history)`` runs untimed, as the
  session can while the user is still speaking;
- *ctranslate2*: ``CT2LLM``, the same model converted to CTranslate2 int8 (what the embedded CPU stack
  serves with), every turn prefilled whole (it keeps no cache between calls).

Measured per turn from the ``token_stream`` call: the first token, the 12th token, and the mean time per
token after the first (over the whole reply, at most ``--reply-tokens``). Medians over ``--runs`` runs of
the conversation after one warm-up run (each conversation's first question names another caller).
``--threads`` sets torch's CPU threads (1 by default: on a 2-core machine shared with TTS and VAD, 2 threads
stall each other; see ``core.models.hf_llm``); ``--load`` runs a busy one-thread process beside the bench,
the way ONNX TTS and VAD share the CPU with the LLM in a live session.

The CTranslate2 decoder runs ``--threads`` threads too. The replies of the two engines differ (int8 weights
against bf16), so their prompt lengths after the first turn differ a little; the table prints both.

Usage: ``.venv/bin/python bench/bench_llm.py [--runs N] [--threads N] [--dtype auto] [--load]``.
Prints a table, then one ``RESULT`` line.
"""

# ruff: noqa: E402  (thread limits must be set before torch is imported)
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_model, idle_note

from core.config import DuplexConfig
from core.models.base import ChatMessage
from core.models.ct2_llm import CT2LLM
from core.models.hf_llm import TransformersLLM

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "data" / "models" / "smollm2-135m-instruct"
CT2_MODEL = ROOT / "data" / "models" / "smollm2-135m-ct2"
QUESTIONS = (
    "Hi! What's the weather usually like in Lisbon in the spring?",
    "Nice. And what should I see there if I only have two days?",
    "How do I get from the airport to the city centre?",
)
FIRST_N = 12
MODES = ("fresh", "reuse", "reuse+prefill", "ctranslate2")


@dataclass
class Timings:
    """Per-turn samples of one mode, in milliseconds."""

    first: list[list[float]] = field(default_factory=lambda: [[] for _ in QUESTIONS])
    first_n: list[float] = field(default_factory=list)
    per_token: list[float] = field(default_factory=list)

    def first_all(self) -> list[float]:
        return [t for turn in self.first for t in turn]


def converse(
    llm: TransformersLLM | CT2LLM, mode: str, caller: int, reply_tokens: int, out: Timings | None
) -> list[int]:
    """Answer the three questions in ``mode``; returns the prompt length of each turn.

    ``caller`` makes the first question of each conversation its own, so a conversation shares only the
    system prompt with the one before, as a new session does.
    """
    if isinstance(llm, TransformersLLM):
        llm.prefix_cache = mode != "fresh"
    history = [ChatMessage("system", DuplexConfig().instructions)]
    lengths = []
    questions = (f"This is caller {caller}. {QUESTIONS[0]}", *QUESTIONS[1:])
    for turn, question in enumerate(questions):
        if mode == "reuse+prefill" and isinstance(llm, TransformersLLM):
            llm.prefill(history)
        messages = [*history, ChatMessage("user", question)]
        lengths.append(len(llm.tokenizer(llm.render_prompt(messages), add_special_tokens=False)["input_ids"]))
        start = time.perf_counter()
        stamps, tokens = [], []
        for token in llm.token_stream(messages, max_new_tokens=reply_tokens):
            stamps.append(time.perf_counter() - start)
            tokens.append(token)
        if out is not None and len(stamps) >= FIRST_N:
            out.first[turn].append(1000 * stamps[0])
            out.first_n.append(1000 * stamps[FIRST_N - 1])
            out.per_token.append(1000 * (stamps[-1] - stamps[0]) / (len(stamps) - 1))
        reply = str(llm.tokenizer.decode(tokens, skip_special_tokens=True))
        history += [ChatMessage("user", question), ChatMessage("assistant", reply)]
    return lengths


def busy(stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    """One thread of steady float work (an ONNX vocoder's share of the CPU), until ``stop``."""
    torch.set_num_threads(1)
    a, b = torch.randn(256, 1024), torch.randn(1024, 1024)
    while not stop.is_set():
        for _ in range(20):
            a = torch.tanh(a @ b * 0.03)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL), help="a transformers chat model folder")
    parser.add_argument("--ct2-model", default=str(CT2_MODEL), help="the same model as a CTranslate2 folder")
    parser.add_argument("--runs", type=int, default=5, help="timed conversations per mode (median kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
    parser.add_argument("--reply-tokens", type=int, default=32, help="longest reply per turn")
    parser.add_argument("--load", action="store_true", help="run a busy 1-thread process beside the bench")
    args = parser.parse_args()
    if args.reply_tokens < FIRST_N:
        parser.error(f"--reply-tokens must be at least {FIRST_N}")
    torch.set_num_threads(args.threads)
    llm = TransformersLLM(args.model, device="cpu", dtype=args.dtype, greedy=True)
    ct2 = CT2LLM(args.ct2_model, greedy=True, intra_threads=args.threads)
    engines = {mode: ct2 if mode == "ctranslate2" else llm for mode in MODES}
    stop = multiprocessing.Event()
    loader = multiprocessing.Process(target=busy, args=(stop,), daemon=True) if args.load else None
    if loader is not None:
        loader.start()
    try:
        llm.warmup()
        ct2.warmup()
        lengths = converse(llm, "fresh", 0, args.reply_tokens, None)
        ct2_lengths = converse(ct2, "ctranslate2", 0, args.reply_tokens, None)
        results = {mode: Timings() for mode in MODES}
        caller = 0
        for _ in range(args.runs):
            for mode in MODES:
                caller += 1
                converse(engines[mode], mode, caller, args.reply_tokens, results[mode])
    finally:
        stop.set()
        if loader is not None:
            loader.join(10)

    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cpus{idle_note()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s), {'a busy 1-thread process beside' if args.load else 'no other load'}"
    )
    print(
        f"model: {Path(args.model).name}, {llm.dtype} (ctranslate2: {Path(args.ct2_model).name}, int8); prompts of "
        f"{', '.join(map(str, lengths))} tokens (ctranslate2: {', '.join(map(str, ct2_lengths))}); "
        f"{args.runs} runs per mode after a warm-up, medians"
    )
    print()
    turns = " ".join(f"{f'turn {i + 1} ms':>10}" for i in range(len(QUESTIONS)))
    print(f"{'mode':15} {turns} {'first tok ms':>13} {f'first {FIRST_N} ms':>12} {'per tok ms':>11}")

    def med(xs: list[float]) -> float:
        return statistics.median(xs) if xs else float("nan")

    for mode in MODES:
        r = results[mode]
        per_turn = " ".join(f"{med(t):10.0f}" for t in r.first)
        print(
            f"{mode:15} {per_turn} {med(r.first_all()):13.0f} {med(r.first_n):12.0f} {med(r.per_token):11.1f}"
        )
    fresh, reuse, warm, fast = (results[m] for m in MODES)
    print()
    print(
        f"RESULT first_token_ms_fresh={med(fresh.first_all()):.0f} first_token_ms_reuse={med(reuse.first_all()):.0f} "
        f"first_token_ms_prefill={med(warm.first_all()):.0f} first{FIRST_N}_ms_fresh={med(fresh.first_n):.0f} "
        f"first{FIRST_N}_ms_reuse={med(reuse.first_n):.0f} first{FIRST_N}_ms_prefill={med(warm.first_n):.0f} "
        f"per_token_ms={med(reuse.per_token):.1f} first_token_ms_ct2={med(fast.first_all()):.0f} "
        f"first{FIRST_N}_ms_ct2={med(fast.first_n):.0f} per_token_ms_ct2={med(fast.per_token):.1f} "
        f"threads={torch.get_num_threads()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
