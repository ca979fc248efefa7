"""Silero voice activity detection: streaming for live sessions, offline for files (onnxruntime)."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class StreamingVAD(Protocol):
    """Per-stream VAD: feed 16 kHz float32 audio of any length, get one speech probability per window."""

    #: Samples per analysis window (512 at 16 kHz = 32 ms).
    window_samples: int

    def process(self, audio: np.ndarray) -> list[float]:
        """Feed audio; return the speech probability of every window completed by it, in order."""
        ...

    def reset(self) -> None:
        """Forget all state (carried audio and the model's recurrent state)."""
        ...
