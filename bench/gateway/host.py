"""This process's set-up for thousands of sockets, and the header line that says what machine ran the bench."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

from bench.machine import cpu_model, idle_note

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def heap_for_reads() -> bool:
    """Serve this process's socket reads from the heap rather than a fresh mapping each (glibc only).

    asyncio reads with ``recv(256 KiB)``; the buffer is over glibc's initial mmap threshold (128 KiB), so
    each read maps, shrinks and later unmaps its own pages until something happens to raise the threshold.
    With thousands of clients in this process that costs more kernel time per burst than the server spends
    sending it: the clients, not the server, were the bottleneck in some runs (a fresh process) and not in
    others (one whose threshold an earlier large free had raised). At 1 MiB every run reads the same way.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 20))
    except (OSError, AttributeError):
        return False


def raise_fd_limit() -> int:
    """Raise the open-file limit to the hard one; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):
        return soft


def header(pinned: str, fds: int, client_wait: str, heap_reads: bool) -> str:
    """The bench's first line: CPU, load average, pinning, fd limit, how the clients wait, idle driver."""
    load = os.getloadavg()[0]
    return (
        f"bench_gateway: {cpu_model()}, {os.cpu_count()} CPUs, load {load:.1f}, gateway {pinned}, fd limit {fds}"
        f", part 3 clients wait by {client_wait}"
        f"{idle_note()}{'' if heap_reads else ', clients read through mmap (not glibc)'}"
    )
