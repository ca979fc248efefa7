"""Imports point down only (DESIGN §2), and the gateway side never reaches torch or a model."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What each package may import from the project (prefix match). Anything else from core.* is upward.
ALLOWED: dict[str, tuple[str, ...]] = {
    "core.config": (),
    "core.protocol": ("core.config",),
    "core.audio": ("core.config", "core.protocol", "core.audio"),
    "core.storage": ("core.config", "core.protocol", "core.audio", "core.storage"),
    "core.models": ("core.config", "core.protocol", "core.audio", "core.models"),
    "core.session": (
        "core.config", "core.protocol", "core.audio", "core.storage", "core.session",
        "core.models.base", "core.models.chat",
    ),
    "core.distill": (
        "core.config", "core.protocol", "core.audio", "core.storage", "core.distill",
        "core.models.base", "core.models.registry",
    ),
    "core.scheduling": ("core.config", "core.protocol", "core.scheduling"),
    "core.server": ("core.",),  # the top of core; which side a server module is on is checked below
    "core": ("core.",),
}  # fmt: skip
HEAVY = (
    "torch",
    "transformers",
    "onnxruntime",
    "numpy",
    "opuslib",
    "soundfile",
    "soxr",
    "core.models",
    "core.session",
)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every absolute module an import statement in ``path`` names (including lazy ones in functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def project_files() -> list[Path]:
    return [*sorted((ROOT / "core").rglob("*.py")), ROOT / "gateway.py", ROOT / "worker.py"]


def rule_for(mod: str) -> tuple[str, ...] | None:
    best = max((k for k in ALLOWED if mod == k or mod.startswith(k + ".")), key=len, default=None)
    return ALLOWED[best] if best else None


def test_imports_point_down_only() -> None:
    bad = []
    for path in project_files():
        if not path.exists():
            continue
        mod = module_name(path)
        allowed = rule_for(mod)
        if allowed is None:
            continue
        for imp in imports_of(path):
            if imp.startswith("core.") and imp != mod and not imp.startswith(allowed):
                bad.append(f"{mod} imports {imp}")
    assert not bad, "upward or forbidden imports:\n" + "\n".join(sorted(bad))


def test_session_never_imports_a_model_framework() -> None:
    for path in sorted((ROOT / "core" / "session").rglob("*.py")):
        for imp in imports_of(path):
            assert not imp.startswith(("torch", "transformers", "onnxruntime")), (
                f"{module_name(path)} imports {imp}"
            )


def _closure(start: str) -> set[str]:
    files = {module_name(p): p for p in project_files() if p.exists()}
    seen, todo = set(), [start]
    while todo:
        mod = todo.pop()
        if mod in seen or mod not in files:
            continue
        seen.add(mod)
        for imp in imports_of(files[mod]):
            for cand in (imp, imp.rsplit(".", 1)[0]):
                if cand in files:
                    todo.append(cand)
            # a package import runs its __init__ too
            parts = imp.split(".")
            todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
    return seen


def test_gateway_side_never_imports_models_statically() -> None:
    if not (ROOT / "gateway.py").exists():
        return
    heavy = []
    files = {module_name(p): p for p in project_files() if p.exists()}
    for mod in _closure("gateway"):
        for imp in imports_of(files[mod]):
            if imp.startswith(HEAVY):
                heavy.append(f"{mod} imports {imp}")
    assert not heavy, "the gateway must not import torch or a model:\n" + "\n".join(heavy)


def test_gateway_import_does_not_load_torch() -> None:
    if not (ROOT / "core" / "server" / "gateway_app.py").exists():
        return
    code = "import sys, core.server.gateway_app; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
