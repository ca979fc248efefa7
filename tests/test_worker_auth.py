"""The secret a gateway and its workers share: where it comes from, a worker that refuses callers without it,
and a gateway serving through workers it did not start (one goes away and comes back)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from core.config import ServiceConfig
from core.worker_auth import ENV_VAR, FILE_NAME, HEADER, WorkerSecretError, resolve_worker_secret
from tests.duplex_client import free_port, stop, wait_healthy

ROOT = Path(__file__).resolve().parents[1]


# --- where the secret comes from ------------------------------------------------------------------------


def test_the_secret_file_is_made_once_owner_only_and_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    service = ServiceConfig(data_dir=str(tmp_path / "data"))
    found: list[str] = []
    threads = [
        threading.Thread(target=lambda: found.append(resolve_worker_secret(service))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(found)) == 1 and len(found[0]) == 64  # every caller got the one secret made
    path = tmp_path / "data" / FILE_NAME
    assert path.stat().st_mode & 0o777 == 0o600
    assert resolve_worker_secret(service) == found[0]  # and a restart reads it back
    assert [p.name for p in path.parent.iterdir()] == [FILE_NAME]  # no temporary file left


def test_environment_then_config_then_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert (
        resolve_worker_secret(ServiceConfig(data_dir=str(tmp_path), worker_secret="from-config"))
        == "from-config"
    )
    monkeypatch.setenv(ENV_VAR, "from-env")
    assert (
        resolve_worker_secret(ServiceConfig(data_dir=str(tmp_path), worker_secret="from-config"))
        == "from-env"
    )
    assert not (tmp_path / FILE_NAME).exists()  # nothing written when the secret is given


def test_a_damaged_secret_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    (tmp_path / FILE_NAME).write_text("short")
    with pytest.raises(WorkerSecretError, match="too short"):
        resolve_worker_secret(ServiceConfig(data_dir=str(tmp_path)))


# --- a worker refuses callers without it ----------------------------------------------------------------


def _start(script: str, args: list[str], folder: Path, name: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop(ENV_VAR, None)  # the secret comes from the config or the data folder here
    env.pop("DUPLEX_API_KEY", None)
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(folder / f"{name}.err").open("wb"),
    )


def _config(folder: Path, model: dict[str, object] | None = None, **service: object) -> Path:
    path = folder / "config.json"
    body = {
        "service": {
            "data_dir": str(folder / "data"),
            "log_dir": str(folder),
            "health_interval_s": 0.2,
            **service,
        },
        "model": model or {},
    }
    path.write_text(json.dumps(body))
    return path


def _worker(folder: Path, port: int, config: Path) -> subprocess.Popen[bytes]:
    args = ["--worker-index", "0", "--port", str(port), "--stack", "fake", "--config", str(config)]
    return _start("worker.py", args, folder, f"worker-{port}")


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    folder = tmp_path_factory.mktemp("secret-worker")
    port = free_port()
    proc = _worker(folder, port, _config(folder))
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, 60)  # /health needs no secret
        secret = (folder / "data" / FILE_NAME).read_text().strip()
        yield f"127.0.0.1:{port}", secret
    finally:
        stop(proc)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/chat", {"text": "hi"}),
        ("POST", "/v1/transcribe", {"audio_file_b64": ""}),
        ("POST", "/v1/audio/speech", {"input": "hi"}),
        ("GET", "/v1/voices", None),
        ("DELETE", "/v1/voices/alice", None),
    ],
)
@pytest.mark.parametrize("presented", [None, "wrong-secret-0123456789"])
def test_a_worker_refuses_every_route_without_the_secret(
    worker: tuple[str, str], method: str, path: str, body: object, presented: str | None
) -> None:
    address, _ = worker
    headers = {HEADER: presented} if presented else {}
    r = httpx.request(method, f"http://{address}{path}", json=body, headers=headers, timeout=10)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "unauthorized"
    assert httpx.get(f"http://{address}/health", timeout=10).json()["status"] == "idle"  # nothing was taken


async def test_a_worker_refuses_a_websocket_without_the_secret_and_serves_one_with_it(
    worker: tuple[str, str],
) -> None:
    address, secret = worker
    for path in ("/ws/duplex", "/v1/realtime"):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"ws://{address}{path}", open_timeout=10):
                pass
        assert refused.value.response.status_code == 401
    async with connect(
        f"ws://{address}/ws/duplex", additional_headers={HEADER: secret}, open_timeout=10
    ) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert first["type"] == "session.created"
    ok = httpx.post(f"http://{address}/v1/chat", json={"text": "hi"}, headers={HEADER: secret}, timeout=30)
    assert ok.status_code == 200, ok.text


# --- a gateway with workers it did not start --------------------------------------------------------------


def _start_all(*args: str) -> str:
    out = subprocess.run(
        ["bash", "start_all.sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_a_gateway_serves_through_workers_it_did_not_start_that_go_away_and_come_back(tmp_path: Path) -> None:
    """Another host's own ``start_all.sh --workers-only`` (here a data folder and loopback ports of its own),
    over TLS with the shared secret from its config; the gateway is pointed at what it printed."""
    shared = "cluster-secret-0123456789abcdef"
    worker_dir, gateway_dir = tmp_path / "worker-host", tmp_path / "gateway-host"
    worker_dir.mkdir()
    gateway_dir.mkdir()
    worker_cfg = _config(
        worker_dir,
        worker_secret=shared,
        worker_tls=True,
        worker_base_port=free_port(),
        model={"stack": "fake"},
    )
    printed = _start_all("--workers-only", "--config", str(worker_cfg))
    gateway: subprocess.Popen[bytes] | None = None
    try:
        (addresses,) = [
            line.split(": ", 1)[1] for line in printed.splitlines() if line.startswith("workers ready:")
        ]
        assert "gateway.pid" not in {p.name for p in worker_dir.iterdir()}  # no gateway on the workers' host
        cert = worker_dir / "data" / "tls-worker" / "cert.pem"
        gport = free_port()
        gateway_cfg = _config(gateway_dir, worker_secret=shared, worker_tls=True, worker_ca_file=str(cert))
        args = ["--http", "--host", "127.0.0.1", "--port", str(gport), "--workers", addresses]
        gateway = _start("gateway.py", [*args, "--config", str(gateway_cfg)], gateway_dir, "gateway")
        base = f"http://127.0.0.1:{gport}"
        wait_healthy(base, gateway, 60)
        _chat_until_ok(base)
        _start_all("--stop", "--config", str(worker_cfg))  # the workers' host goes away
        _until(lambda: httpx.get(f"{base}/health", timeout=5).json()["status"] != "ok")
        _start_all("--workers-only", "--config", str(worker_cfg))  # and comes back
        _chat_until_ok(base)
        assert not (gateway_dir / "data" / FILE_NAME).exists()  # the configured secret was used, no file
    finally:
        if gateway is not None:
            stop(gateway)
        _start_all("--stop", "--config", str(worker_cfg))


def _until(check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def _chat_until_ok(base: str) -> None:
    """A chat through the gateway, once its health checks have (re)admitted the worker."""
    _until(lambda: httpx.get(f"{base}/health", timeout=5).json()["status"] == "ok")
    r = httpx.post(f"{base}/v1/chat", json={"text": "hello"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json().get("reply") or r.json().get("text"), r.json()


@dataclass(frozen=True)
class TLSWorker:
    """A worker serving HTTPS/WSS with the certificate it made (a data folder of its own, as on another host)."""

    port: int
    cert: Path


TLS_SECRET = "cluster-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def tls_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSWorker]:
    folder = tmp_path_factory.mktemp("worker-host")
    port = free_port()
    proc = _worker(folder, port, _config(folder, worker_secret=TLS_SECRET, worker_tls=True))
    cert = folder / "data" / "tls-worker" / "cert.pem"
    try:
        _until(cert.is_file, 60)
        _until(
            lambda: (
                httpx.get(f"https://127.0.0.1:{port}/health", verify=str(cert), timeout=5).status_code == 200
            ),
            60,
        )
        yield TLSWorker(port, cert)
    finally:
        stop(proc)


@contextlib.contextmanager
def _gateway_to(worker: TLSWorker, folder: Path, **service: object) -> Iterator[str]:
    """A gateway (its own data folder) with ``worker`` as its only worker, over TLS; yields its base URL."""
    folder.mkdir()
    port = free_port()
    config = _config(folder, worker_secret=TLS_SECRET, worker_tls=True, **service)
    args = ["--http", "--host", "127.0.0.1", "--port", str(port), "--workers", f"127.0.0.1:{worker.port}"]
    gateway = _start("gateway.py", [*args, "--config", str(config)], folder, "gateway")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, gateway, 60)
        yield base
    finally:
        stop(gateway)


async def test_a_gateway_reaches_its_workers_over_tls(tls_worker: TLSWorker, tmp_path: Path) -> None:
    """Workers across a network: the worker serves HTTPS/WSS with its own certificate, the gateway (another
    data folder, as on another host) trusts that certificate and nothing else."""
    worker = f"127.0.0.1:{tls_worker.port}"
    with pytest.raises(httpx.HTTPError):  # no plain HTTP on a TLS worker
        httpx.get(f"http://{worker}/health", timeout=5)
    refused = httpx.post(
        f"https://{worker}/v1/chat", json={"text": "hi"}, verify=str(tls_worker.cert), timeout=10
    )
    assert refused.status_code == 401  # TLS does not replace the secret
    with _gateway_to(tls_worker, tmp_path / "gateway-host", worker_ca_file=str(tls_worker.cert)) as base:
        _chat_until_ok(base)
        async with connect(f"ws{base[4:]}/ws/duplex", open_timeout=30) as ws:
            while (event := json.loads(await asyncio.wait_for(ws.recv(), 30)))["type"] != "session.created":
                pass
            assert event["session"]["id"]


def test_a_gateway_refuses_a_worker_certificate_it_does_not_trust(
    tls_worker: TLSWorker, tmp_path: Path
) -> None:
    with _gateway_to(tls_worker, tmp_path / "gateway-host") as base:  # no worker_ca_file: system CAs only

        def refused() -> bool:
            (entry,) = httpx.get(f"{base}/health", timeout=5).json()["workers"]
            return "certificate is not trusted" in str(entry)

        _until(refused)  # the health check names why the worker is out
        health = httpx.get(f"{base}/health", timeout=5).json()
        assert health["status"] != "ok", health
