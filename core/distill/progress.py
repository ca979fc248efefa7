"""Progress of a distillation run: a tqdm bar (files, audio hours, audio-seconds per second) and a summary."""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TextIO

from core.distill.pipeline import FileResult
from core.distill.writer import STATUSES


@dataclass
class Tally:
    """Counts and audio time of the files finished in this run."""

    started: float = field(default_factory=time.monotonic)
    statuses: Counter[str] = field(default_factory=Counter)
    audio_s: float = 0.0

    def add(self, result: FileResult) -> None:
        """Count one finished file."""
        self.statuses[result.status] += 1
        self.audio_s += result.duration_s or 0.0

    @property
    def files(self) -> int:
        """Files finished so far."""
        return sum(self.statuses.values())

    @property
    def elapsed_s(self) -> float:
        """Wall time since the run started."""
        return time.monotonic() - self.started

    @property
    def audio_per_s(self) -> float:
        """Seconds of audio transcribed per second of wall time."""
        return self.audio_s / max(self.elapsed_s, 1e-9)


class Progress:
    """A tqdm bar over the files of a run (disabled: counts only) that keeps a :class:`Tally`."""

    def __init__(self, total: int, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        from tqdm import tqdm

        self.tally = Tally()
        self._bar = tqdm(
            total=total,
            unit="file",
            desc="distill",
            disable=not enabled,
            file=stream or sys.stderr,
            smoothing=0.1,
        )

    def update(self, result: FileResult) -> None:
        """Count one finished file and refresh the bar's audio-hours and throughput."""
        self.tally.add(result)
        errors = self.tally.statuses["error"]
        self._bar.set_postfix_str(
            f"{self.tally.audio_s / 3600:.3f} h audio, {self.tally.audio_per_s:.1f} audio-s/s, {errors} errors",
            refresh=False,
        )
        self._bar.update(1)

    def close(self) -> None:
        """Close the bar."""
        self._bar.close()


def summary_lines(
    tally: Tally, *, skipped: int, problems: int, output: str, interrupted: bool = False
) -> list[str]:
    """The end-of-run summary: counts per status, audio and throughput, resume and manifest notes."""
    counts = ", ".join(f"{s} {tally.statuses.get(s, 0)}" for s in STATUSES)
    head = "distill interrupted" if interrupted else "distill done"
    lines = [f"{head}: {tally.files} files this run ({counts})"]
    if skipped:
        lines.append(f"  {skipped} ids already in {output} were skipped")
    if problems:
        lines.append(f"  {problems} manifest rows rejected (see above)")
    lines.append(
        f"  audio {tally.audio_s / 3600:.3f} h ({tally.audio_s:.1f} s) in {tally.elapsed_s:.1f} s wall: "
        f"{tally.audio_per_s:.1f} audio-s/s"
    )
    lines.append(f"  output: {output}")
    return lines
