"""CUDA device ids as ``CUDA_VISIBLE_DEVICES`` takes them: an index, a GPU UUID or a MIG instance UUID.

Pure text (no torch): the worker checks ``--gpu-id`` with it before torch is imported, so a bad id is one
clear line and exit 2, while every id CUDA accepts passes through unchanged.
"""

from __future__ import annotations

import argparse
import re

# 0, 1 ...; GPU-<uuid>; MIG-<uuid> or the older MIG-GPU-<uuid>/<gi>/<ci>. Short UUID prefixes are allowed,
# as CUDA allows them.
_GPU_ID = re.compile(r"\d+|GPU-[0-9A-Fa-f-]+|MIG-(GPU-[0-9A-Fa-f-]+/\d+/\d+|[0-9A-Fa-f-]+)")


def parse_gpu_id(text: str) -> str:
    """``text`` stripped, when it names one CUDA device; else argparse's type error."""
    value = text.strip()
    if not _GPU_ID.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a CUDA device id (an index, GPU-<uuid> or MIG-<uuid>)"
        )
    return value
