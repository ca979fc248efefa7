"""Imports point down only, each process keeps to its own package, and the gateway never reaches torch or a
model. The layout and its layers are described in docs/ARCHITECTURE.md."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Who may import whom inside the project. A module follows the rule of the longest key that is its name or a
# package above it, and may import modules under that key and under the names listed; anything else from the
# project is an upward import or one into another process. Every project module falls under a key.
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "core":                     (),
    "core.config":              (),
    "core.protocol":            ("core.config",),
    "core.web":                 ("core.protocol",),
    "core.gpu_ids":             (),
    "core.tls":                 (),
    "core.worker_auth":         ("core.config", "core.protocol", "core.storage", "core.tls"),
    "core.serving":             ("core.config",),  # the server both processes run on (uvicorn, bounded)
    "core.audio":               ("core.config", "core.protocol"),
    "core.storage":             ("core.config", "core.protocol", "core.audio"),
    "core.models":              ("core.config", "core.protocol", "core.audio"),
    "core.scheduling":          ("core.config", "core.protocol"),
    "core.session":             ("core.config", "core.protocol", "core.audio", "core.storage", "core.models.base",
                                 "core.models.chat"),
    "core.distill":             ("core.config", "core.protocol", "core.audio", "core.storage", "core.models.base",
                                 "core.models.registry"),
    "core.launch":              (),
    # the gateway process: its machinery, then the public APIs built on it, then the app that wires both
    "core.gateway":             ("core.config", "core.protocol", "core.web", "core.storage", "core.scheduling",
                                 "core.worker_auth"),
    "core.api":                 ("core.config", "core.protocol", "core.web", "core.storage", "core.scheduling",
                                 "core.gateway"),
    "core.api.realtime_events": ("core.protocol",),  # pure event mapping, shared with the workers
    "core.gateway.app":         ("core.config", "core.protocol", "core.web", "core.scheduling", "core.gateway",
                                 "core.api", "core.worker_auth", "core.tls", "core.serving"),
    # a worker process
    "core.worker":              ("core.config", "core.protocol", "core.web", "core.audio", "core.storage",
                                 "core.models", "core.session", "core.api.realtime_events", "core.gpu_ids",
                                 "core.worker_auth", "core.serving"),
    "gateway":                  ("core.config", "core.gateway.app"),
    "worker":                   ("core.distill.cli", "core.worker.cli"),
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


def rule_for(mod: str) -> str:
    return max((k for k in MAY_IMPORT if mod == k or mod.startswith(k + ".")), key=len)


def test_imports_point_down_only() -> None:
    bad = []
    for path in project_files():
        mod = module_name(path)
        key = rule_for(mod)
        allowed = tuple(f"{name}." for name in (key, *MAY_IMPORT[key]))
        for imp in imports_of(path):
            if (imp.startswith("core.") or imp in ("core", "gateway", "worker")) and not (
                f"{imp}.".startswith(allowed) or mod.startswith(f"{imp}.")
            ):
                bad.append(f"{mod} imports {imp} (rule {key!r})")
    assert not bad, "upward or cross-process imports:\n" + "\n".join(sorted(bad))


def test_every_rule_names_existing_modules() -> None:
    modules = {module_name(p) for p in project_files()}
    for key, allowed in MAY_IMPORT.items():
        for name in (key, *allowed):
            assert any(m == name or m.startswith(name + ".") for m in modules), (
                f"{name} in the table names nothing"
            )


def test_session_never_imports_a_model_framework() -> None:
    for path in sorted((ROOT / "core" / "session").rglob("*.py")):
        for imp in imports_of(path):
            assert not imp.startswith(("torch", "transformers", "onnxruntime")), (
                f"{module_name(path)} imports {imp}"
            )


def _closure(start: str) -> set[str]:
    files = {module_name(p): p for p in project_files()}
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
    heavy = []
    files = {module_name(p): p for p in project_files()}
    for mod in _closure("gateway"):
        for imp in imports_of(files[mod]):
            if imp.startswith(HEAVY):
                heavy.append(f"{mod} imports {imp}")
    assert not heavy, "the gateway must not import torch or a model:\n" + "\n".join(heavy)


def test_gateway_import_does_not_load_torch() -> None:
    code = "import sys, core.gateway.app; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
