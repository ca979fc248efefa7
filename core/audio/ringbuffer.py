"""A bounded float32 PCM ring buffer: the recent audio of one stream, oldest dropped (and counted) first."""

from __future__ import annotations

import numpy as np

from core.audio.errors import AudioError


class PCMRingBuffer:
    """Mono float32 audio with a fixed capacity (the high-water mark).

    Appending past the capacity drops the oldest samples and adds them to :attr:`dropped_samples`.
    Samples also have absolute indices (0 = the first sample ever appended) so a caller can remember
    "speech started at sample N" and later :meth:`read_since` it, even after older audio was dropped.
    Every read returns a fresh contiguous array. Not thread-safe.
    """

    def __init__(self, capacity_s: float = 30.0, sample_rate: int = 16_000) -> None:
        capacity = round(capacity_s * sample_rate)
        if sample_rate <= 0 or capacity <= 0:
            raise ValueError("capacity_s and sample_rate must be positive")
        self.sample_rate = sample_rate
        #: Most samples held at once.
        self.capacity = capacity
        self._data = np.zeros(capacity, np.float32)
        self._head = 0  # index in _data of the oldest sample
        self._len = 0
        #: Samples dropped because the buffer was full (oldest first), since creation.
        self.dropped_samples = 0
        #: Samples ever appended (the absolute index of the next sample).
        self.total_samples = 0

    def __len__(self) -> int:
        return self._len

    @property
    def duration_s(self) -> float:
        """Seconds of audio held."""
        return self._len / self.sample_rate

    @property
    def start_sample(self) -> int:
        """Absolute index of the oldest sample held."""
        return self.total_samples - self._len

    def append(self, audio: np.ndarray) -> int:
        """Append mono float (or int16, scaled to [-1, 1)) audio; return how many old samples it dropped."""
        x = self._as_float32(audio)
        n = x.size
        if n == 0:
            return 0
        self.total_samples += n
        cap = self.capacity
        if n >= cap:
            dropped = self._len + n - cap
            self._data[:] = x[n - cap :]
            self._head, self._len = 0, cap
        else:
            dropped = max(0, self._len + n - cap)
            if dropped:
                self._head = (self._head + dropped) % cap
                self._len -= dropped
            tail = (self._head + self._len) % cap
            first = min(n, cap - tail)
            self._data[tail : tail + first] = x[:first]
            self._data[: n - first] = x[first:]
            self._len += n
        self.dropped_samples += dropped
        return dropped

    def read_all(self) -> np.ndarray:
        """All audio held, oldest first (a copy; the buffer is unchanged)."""
        return self._slice(0, self._len)

    def read_last(self, n_samples: int) -> np.ndarray:
        """The newest ``n_samples`` (fewer if fewer are held)."""
        k = min(max(0, n_samples), self._len)
        return self._slice(self._len - k, k)

    def read_last_s(self, seconds: float) -> np.ndarray:
        """The newest ``seconds`` of audio (less if less is held)."""
        return self.read_last(round(seconds * self.sample_rate))

    def read_since(self, sample_index: int) -> np.ndarray:
        """Audio from absolute index ``sample_index`` to the newest sample (clamped to what is held)."""
        offset = min(max(0, sample_index - self.start_sample), self._len)
        return self._slice(offset, self._len - offset)

    def peek(self, n_samples: int) -> np.ndarray:
        """The oldest ``n_samples`` (fewer if fewer are held), without removing them."""
        return self._slice(0, min(max(0, n_samples), self._len))

    def consume(self, n_samples: int) -> np.ndarray:
        """Remove and return the oldest ``n_samples`` (fewer if fewer are held); not counted as dropped."""
        out = self.peek(n_samples)
        self._head = (self._head + out.size) % self.capacity
        self._len -= out.size
        return out

    def clear(self) -> None:
        """Forget all held audio (counters and absolute indices carry on)."""
        self._head = (self._head + self._len) % self.capacity
        self._len = 0

    def _slice(self, offset: int, count: int) -> np.ndarray:
        start = (self._head + offset) % self.capacity
        end = start + count
        if end <= self.capacity:
            return self._data[start:end].copy()
        return np.concatenate([self._data[start:], self._data[: end - self.capacity]])

    @staticmethod
    def _as_float32(audio: np.ndarray) -> np.ndarray:
        a = np.asarray(audio)
        if a.ndim != 1:
            raise AudioError(f"expected mono audio (1-D), got shape {a.shape}", kind="bad_audio")
        if a.dtype == np.int16:
            return a.astype(np.float32) * np.float32(1.0 / 32768.0)
        if a.dtype.kind != "f":
            raise AudioError(f"expected float or int16 audio, got {a.dtype}", kind="bad_audio")
        return a.astype(np.float32, copy=False)
