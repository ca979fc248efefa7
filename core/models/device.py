"""Where and in what precision a model runs: the ``auto`` choices every torch backend shares.

Each backend raises its own error type, so the functions take the exception class to raise; without
one they raise ``DeviceError``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DeviceError(ValueError):
    """A device, dtype or attention setting that names nothing usable on this machine."""


def resolve_device(device: str, *, error: type[Exception] = DeviceError) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU.

    An unknown name, or a CUDA device on a machine without CUDA, raises ``error``.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise error(f"unknown device '{device}'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device '{device}' asked for, but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device, *, error: type[Exception] = DeviceError) -> torch.dtype:
    """``auto`` -> bf16 on CUDA (fp16 on a GPU without bf16), fp32 on the CPU (where half matmuls are slow).

    A name other than ``auto`` or one of ``DTYPES`` raises ``error``.
    """
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        # With no GPU to ask (a cuda device named on a CPU-only machine), assume a current one: bf16.
        bf16 = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float16
    if dtype not in DTYPES:
        raise error(f"unknown dtype '{dtype}' (expected auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def resolve_attention(attn_implementation: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto`` -> flash_attention_2 when installed and usable (CUDA, half precision), else sdpa.

    Any other value is passed through for transformers to check.
    """
    if attn_implementation != "auto":
        return attn_implementation
    from transformers.utils import is_flash_attn_2_available

    half = dtype in (torch.float16, torch.bfloat16)
    return "flash_attention_2" if device.type == "cuda" and half and is_flash_attn_2_available() else "sdpa"


def load_placement(device: torch.device) -> dict[str, Any]:
    """The ``from_pretrained`` arguments that put a checkpoint's weights straight onto ``device``.

    On a GPU, accelerate's ``device_map`` writes each tensor into GPU memory as it is read, so a 7B
    checkpoint never sits whole in host memory (nor pays a second copy). On the CPU the default load is
    already in place. accelerate is a pinned dependency; without it the weights pass through the CPU.
    """
    if device.type != "cuda":
        return {}
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        logging.getLogger("models").warning(
            "accelerate is not installed: weights load through host memory (bash install.sh installs it)"
        )
        return {}
    return {"device_map": str(device)}
