"""End to end: start_all.sh on this CPU (embedded stack, HTTPS gateway), a spoken turn through the gateway,
a worker killed mid-session and brought back by its supervisor, then ``--stop`` leaves nothing running."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect

from core.models import embedded
from tests.duplex_client import Received, encode_16k, free_port, reader, stream, wait_for
from tests.speech import espeak, with_silence

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@dataclass
class Deployment:
    base: str
    logs: Path
    config: Path
    output: str


def _start_all(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "start_all.sh", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    if not embedded.is_built(ROOT / "data" / "models"):
        pytest.skip("embedded models not built: run bash install.sh")
    tmp = tmp_path_factory.mktemp("start-all")
    gw_port = free_port()
    cfg = tmp / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "service": {
                    "gateway_host": "127.0.0.1",
                    "gateway_port": gw_port,
                    "worker_base_port": free_port(),
                    "log_dir": str(tmp / "logs"),
                    "data_dir": str(tmp / "data"),
                    "health_interval_s": 0.5,
                },
                # The embedded CPU stack even where nvidia-smi answers: a GPU host must not start the
                # production stack (and download its checkpoints) inside this test.
                "model": {"stack": "embedded"},
            }
        )
    )
    env_cuda = os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    try:
        out = _start_all("--config", str(cfg))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "model.stack is embedded: 1 CPU worker(s)" in out.stdout
        yield Deployment(f"127.0.0.1:{gw_port}", tmp / "logs", cfg, out.stdout)
    finally:
        _start_all("--stop", "--config", str(cfg), timeout=120)
        if env_cuda is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = env_cuda


def _ssl() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the gateway's own self-signed certificate
    return ctx


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_all_prints_the_url_and_log_paths(deployment: Deployment) -> None:
    port = deployment.base.split(":")[1]
    assert f"https://localhost:{port}/" in deployment.output
    assert "worker_N.log" in deployment.output
    for name in ("gateway.pid", "worker_0.pid", "worker_0.log", "gateway.log"):
        assert (deployment.logs / name).is_file(), name
    health = httpx.get(f"https://{deployment.base}/health", verify=False).json()
    assert health["tls"] is True and health["workers"][0]["healthy"]


async def test_spoken_reply_through_the_gateway(deployment: Deployment) -> None:
    async with connect(f"wss://{deployment.base}/ws/duplex", ssl=_ssl(), max_size=None) as ws:
        got = Received()
        task = asyncio.create_task(reader(ws, got))
        await wait_for(got, "session.created", 30)
        await stream(
            ws, encode_16k(with_silence(espeak("What is the capital of France?", voice="en-gb"), 0.3, 1.2))
        )
        feeder = asyncio.create_task(stream(ws, encode_16k(np.zeros(16_000 * 30, np.float32))))
        done = await wait_for(got, "response.done", 180)
        feeder.cancel()
        task.cancel()
    transcript = got.of("conversation.item.input_audio_transcription.completed")[0]["transcript"].lower()
    assert "capital" in transcript
    assert done["status"] == "completed" and done["text"]
    assert got.decoded_seconds() > 0.5


async def test_killed_worker_is_reported_and_restarted(deployment: Deployment) -> None:
    status_file = deployment.logs / "worker_0.status"
    child = json.loads(status_file.read_text())["pid"]
    async with connect(f"wss://{deployment.base}/ws/duplex", ssl=_ssl(), max_size=None) as ws:
        got = Received()
        task = asyncio.create_task(reader(ws, got))
        await wait_for(got, "session.created", 30)
        os.kill(child, signal.SIGKILL)
        killed_at = time.monotonic()
        lost = await wait_for(got, "error", 5)
        heard_after = time.monotonic() - killed_at
        task.cancel()
    assert lost["code"] == "worker_lost"
    assert heard_after < 1.0, heard_after
    assert httpx.get(f"https://{deployment.base}/health", verify=False).status_code == 200
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        health = httpx.get(f"https://{deployment.base}/health", verify=False).json()
        worker = health["workers"][0]
        if worker["healthy"] and worker.get("restarts", 0) >= 1:
            break
        await asyncio.sleep(0.5)
    else:
        raise AssertionError(f"worker did not come back: {health}")
    async with connect(f"wss://{deployment.base}/ws/duplex", ssl=_ssl(), max_size=None) as ws:
        got = Received()
        task = asyncio.create_task(reader(ws, got))
        await wait_for(got, "session.created", 60)
        task.cancel()


def test_stop_leaves_nothing_running(deployment: Deployment) -> None:
    pids = [int((deployment.logs / f).read_text()) for f in ("gateway.pid", "worker_0.pid")]
    pids.append(json.loads((deployment.logs / "worker_0.status").read_text())["pid"])
    out = _start_all("--stop", "--config", str(deployment.config), timeout=120)
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)]
    assert not list(deployment.logs.glob("*.pid"))
