"""What the bench scripts print about the machine they ran on."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name where /proc/cpuinfo tells it, else the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def idle_note() -> str:
    """On a VM guest that idles in ``haltpoll``, its polling window ("" elsewhere).

    With the window at 0 an idle CPU halts (exits to the host) at once, so every wake-up of a process waiting
    on another CPU costs an interrupt through the host: a bench whose clients and server share the machine
    pays that on every message, and its numbers do not compare with a machine that polls first.
    """
    try:
        driver = Path("/sys/devices/system/cpu/cpuidle/current_driver").read_text().strip()
        poll_ns = int(Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns").read_text())
    except (OSError, ValueError):
        return ""
    return f", cpuidle {driver} with guest_halt_poll_ns {poll_ns}" if driver == "haltpoll" else ""
