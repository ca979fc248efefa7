"""The suite passes unchanged on a GPU host: every torch backend a test builds names its device.

A backend built with ``device="auto"`` runs on CUDA (in bf16) wherever a GPU is visible, so a test that
compares against CPU float32 expectations would fail there, and nothing on a CPU-only machine shows it.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
#: Backends whose ``device`` defaults to ``auto`` (CTranslate2's default to the CPU).
AUTO_DEVICE_BACKENDS = {"TransformersLLM", "WhisperASR", "CosyVoice2TTS"}


def _called_name(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def test_every_torch_backend_built_by_a_test_names_its_device() -> None:
    unpinned = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and _called_name(node) in AUTO_DEVICE_BACKENDS:
                device = next((kw.value for kw in node.keywords if kw.arg == "device"), None)
                if not isinstance(device, ast.Constant) or device.value == "auto":
                    unpinned.append(f"{path.name}:{node.lineno} {_called_name(node)}")
    assert not unpinned, f"built without a fixed device (runs on CUDA on a GPU host): {unpinned}"
