"""Runs the browser page's JavaScript unit tests (``node --test tests/js/``) as part of pytest."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (install.sh installs nodejs)")
def test_js_unit_tests_pass() -> None:
    """Packet framing, queue countdown, resampling and timing display of static/ pass under node's runner."""
    proc = subprocess.run(
        ["node", "--test", "tests/js/"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, "node --test failed:\n" + proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = [int(line.split()[2]) for line in proc.stdout.splitlines() if line.startswith("# pass ")]
    assert passed and passed[-1] > 0, "node ran no test:\n" + proc.stdout[-2000:]
