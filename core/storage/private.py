"""User data on disk, readable by the service user only: folders 0700, files 0600, whatever the umask.

Job audio, the job store (transcripts), session recordings and uploaded voices are what users said; the
service user alone needs to read them. Files are created with their mode (never created wider and narrowed
later, which leaves a window) and written under a temporary name, then renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, TextIO

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str | Path) -> Path:
    """``path`` made (with parents) and set to owner-only; an existing folder is narrowed too."""
    folder = Path(path)
    folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    folder.chmod(DIR_MODE)
    return folder


def _open_fd(path: Path, flags: int) -> int:
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # an existing file keeps its old mode through os.open: narrow it
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private_binary(path: str | Path, *, append: bool = False) -> BinaryIO:
    """``path`` opened for writing bytes (truncated, or appended to), owner-only."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    return os.fdopen(_open_fd(Path(path), flags), "ab" if append else "wb")


def open_private_text(path: str | Path, *, append: bool = False) -> TextIO:
    """``path`` opened for writing UTF-8 text (truncated, or appended to), owner-only."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    return os.fdopen(_open_fd(Path(path), flags), "a" if append else "w", encoding="utf-8")


def write_private(path: str | Path, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (a temporary sibling renamed into place), owner-only.

    With ``fsync`` the bytes are on disk before the rename, so a power cut leaves the old file or the new.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
    try:
        with open_private_binary(tmp) as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def touch_private(path: str | Path) -> Path:
    """Create ``path`` empty if it is missing, and make it owner-only (for files another library writes)."""
    target = Path(path)
    os.close(_open_fd(target, os.O_WRONLY | os.O_CREAT))
    return target
