"""A small duplex test client: streams real Opus packets in real time and collects what comes back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from core.audio.framing import PacketFramer, pack_packets
from core.audio.opus import OpusDecoder, OpusEncoder

ROOT = Path(__file__).resolve().parents[1]
FRAME = 320  # 20 ms at 16 kHz


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def encode_16k(audio: np.ndarray) -> list[bytes]:
    """16 kHz float32 audio as 20 ms Opus packets (padded to whole frames)."""
    enc = OpusEncoder(16_000)
    return [*enc.encode(audio), *enc.flush()]


@dataclass
class Received:
    """Everything a session sent back, in order: events as dicts, audio packets tagged with their position."""

    events: list[dict[str, Any]] = field(default_factory=list)
    packets: list[tuple[int, bytes]] = field(
        default_factory=list
    )  # (index of the last event before it, packet)
    framer: PacketFramer = field(default_factory=PacketFramer)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def decoded_seconds(self, after_event: int = -1) -> float:
        dec = OpusDecoder(24_000)
        return sum(len(dec.decode(p)) for i, p in self.packets if i >= after_event) / 24_000


async def reader(ws: ClientConnection, got: Received) -> None:
    """Collect frames until the socket closes."""
    with contextlib.suppress(Exception):
        async for msg in ws:
            if isinstance(msg, bytes):
                for p in got.framer.feed(msg):
                    got.packets.append((len(got.events) - 1, p))
            else:
                got.events.append(json.loads(msg))


async def stream(ws: ClientConnection, packets: list[bytes], realtime: bool = True) -> None:
    """Send packets one per binary frame, paced at 20 ms when ``realtime``."""
    t0 = time.monotonic()
    for i, p in enumerate(packets):
        await ws.send(pack_packets([p]))
        if realtime:
            await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.monotonic()))


async def wait_for(got: Received, kind: str, timeout: float, count: int = 1) -> dict[str, Any]:
    """Wait (polling the collected events) until ``count`` events of ``kind`` arrived."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = got.of(kind)
        if len(found) >= count:
            return found[count - 1]
        fatal = [e for e in got.of("error") if e.get("fatal")]
        if fatal and kind != "error":  # the session is over: nothing more will come
            raise AssertionError(f"no {kind}: the session ended with {fatal[0]}")
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {kind} within {timeout} s; got {got.types()}")


def start_worker(
    port: int, stack: str, log_dir: Path, *extra: str, extra_config: dict[str, Any] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``worker.py`` on loopback with its logs and data under ``log_dir``."""
    cfg = log_dir / "config.json"
    config: dict[str, Any] = {"service": {"log_dir": str(log_dir), "data_dir": str(log_dir / "data")}}
    config.update(extra_config or {})
    cfg.write_text(json.dumps(config))
    from tests.services import WORKER_SECRET

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DUPLEX_WORKER_SECRET": WORKER_SECRET}
    return subprocess.Popen(
        [sys.executable, "worker.py", "--worker-index", "0", "--port", str(port), "--stack", stack,
         "--config", str(cfg), *extra],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=(log_dir / "worker.err").open("wb"),
    )  # fmt: skip


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> dict[str, Any]:
    """Poll ``url``/health until 200; fail early when the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(url + "/health", timeout=2, verify=False)
            if r.status_code == 200:
                return dict(r.json())
        time.sleep(0.3)
    raise AssertionError(f"{url} not healthy in {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a process and wait for it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def open_session(url: str) -> tuple[ClientConnection, Received, asyncio.Task[None]]:
    """Connect, start collecting, and wait for ``session.created`` (the worker secret goes along: a gateway
    ignores it, a worker needs it)."""
    from tests.services import WORKER_HEADERS

    ws = await connect(url, max_size=None, open_timeout=30, additional_headers=WORKER_HEADERS)
    got = Received()
    task = asyncio.create_task(reader(ws, got))
    await wait_for(got, "session.created", 30)
    return ws, got, task
