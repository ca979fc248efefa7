"""bench/gpu.sh's plumbing at tiny scale on this CPU: every step runs and prints its RESULT line.

On a lent GPU the same script measures the production sizes; here it proves that a bare run would get that
far (the models build, the benches parse their arguments, the RESULT lines come out).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from core.models import embedded

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_sh_tiny_runs_every_step_and_prints_each_result() -> None:
    if not embedded.is_built(ROOT / "data" / "models"):
        pytest.skip("embedded models not built: run bash install.sh")
    out = subprocess.run(
        ["bash", "bench/gpu.sh", "--tiny"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    summary = out.stdout.split("== RESULT lines", 1)[1]
    results = [line for line in summary.splitlines() if line.startswith("RESULT ")]
    for step in ("tests", "cosyvoice", "duplex", "distill"):
        assert f"RESULT step={step} status=ok" in summary, step
    assert any(r.startswith("RESULT tests_passed=") and "tests_failed=0" in r for r in results)
    assert any("tiny_cpu_first_chunk_ms=" in r and "prod_gpu_rtf=na" in r for r in results)
    assert any("turn_detection=semantic_vad" in r and "stack=random-production-tiny" in r for r in results)
    assert any(r.startswith("RESULT turbo_random_aps=") and "turbo_scale=tiny" in r for r in results)


def test_gpu_sh_without_a_gpu_asks_for_tiny_or_a_cuda_install() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the full run is bench/gpu.sh's job, not this test's")
    if not embedded.is_built(ROOT / "data" / "models"):
        pytest.skip("embedded models not built: run bash install.sh")
    out = subprocess.run(
        ["bash", "bench/gpu.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 1 and "--tiny" in out.stderr and "install.sh --cuda" in out.stderr
