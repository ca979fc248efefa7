"""The processes a gateway benchmark runs against: mock workers (tests/mock_worker.py) and one real gateway."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.gateway.client import Protocol

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str, check: Callable[[httpx.Response], bool], timeout: float = 20.0, verify: Any = True
) -> None:
    """Poll ``url`` until ``check`` accepts its answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check(httpx.get(url, timeout=1, verify=verify)):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready in {timeout} s")


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def spawn(args: list[str], tmp: Path, cpu: int | None) -> subprocess.Popen[bytes]:
    """Start ``python *args`` in ``tmp`` (output to procs.log), pinned to ``cpu`` when one is given."""

    def pin() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    env = {k: v for k, v in os.environ.items() if k != "DUPLEX_API_KEY"}
    log = open(tmp / "procs.log", "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [PY, *args], stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin, env=env, cwd=tmp
    )


def cpu_s(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return float("nan")
    return float(times.user + times.system)


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB."""
    try:
        return float(psutil.Process(pid).memory_info().rss) / (1 << 20)
    except psutil.Error:
        return float("nan")


class Cluster:
    """Mock workers and one gateway (HTTPS with its own self-signed certificate where ``tls``), stopped on exit."""

    def __init__(
        self, tmp: Path, n_workers: int, service: dict[str, Any], gateway_cpu: int | None, tls: bool = False
    ) -> None:
        self.tls = tls
        self.procs: list[subprocess.Popen[bytes]] = []
        self.worker_ports = [free_port() for _ in range(n_workers)]
        try:
            for i, port in enumerate(self.worker_ports):
                self._spawn(
                    [str(ROOT / "tests" / "mock_worker.py"), "--port", str(port), "--index", str(i)],
                    tmp,
                    None,
                )
            for port in self.worker_ports:
                wait_http(f"http://127.0.0.1:{port}/health", lambda r: r.status_code == 200)
            self.port = free_port()
            config = tmp / f"gw_{self.port}.json"
            # data_dir is the bench's temporary folder: the gateway makes its certificate under data_dir/tls.
            service = {"log_dir": str(tmp), "data_dir": str(tmp), **service}
            config.write_text(json.dumps({"service": service}))
            self.cert = tmp / "tls" / "cert.pem"
            workers = ",".join(f"127.0.0.1:{p}" for p in self.worker_ports)
            args = [str(ROOT / "gateway.py"), *([] if tls else ["--http"]), "--host", "127.0.0.1"]
            args += ["--port", str(self.port), "--workers", workers, "--config", str(config)]
            self.gateway = self._spawn(args, tmp, gateway_cpu)
            # The certificate exists only once the gateway has started: the context is made after the wait.
            wait_http(self.http + "/health", lambda r: r.json()["status"] == "ok", verify=False)
            self.ssl = self._client_context() if tls else None
            wait_http(self.http + "/health", lambda r: r.json()["status"] == "ok", verify=self.ssl or True)
        except BaseException:
            self.stop()
            raise

    def _client_context(self) -> ssl.SSLContext:
        # The bench's clients verify the gateway's own certificate (its SANs name 127.0.0.1), as a browser
        # does once the user has accepted it: the handshake costs what it costs a real client.
        return ssl.create_default_context(cafile=str(self.cert))

    def _spawn(self, args: list[str], tmp: Path, cpu: int | None) -> subprocess.Popen[bytes]:
        proc = spawn(args, tmp, cpu)
        self.procs.append(proc)
        return proc

    @property
    def scheme(self) -> str:
        """``https`` or ``http``: how the gateway serves."""
        return "https" if self.tls else "http"

    @property
    def http(self) -> str:
        """The gateway's base URL."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def worker_ws(self, protocol: Protocol, i: int = 0) -> str:
        """Worker ``i``'s URL for ``protocol`` (workers serve plain WebSocket on loopback)."""
        return f"ws://127.0.0.1:{self.worker_ports[i]}{protocol.path}"

    def gateway_ws(self, protocol: Protocol, query: str = "") -> str:
        """The gateway's URL for ``protocol``."""
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}{protocol.path}{query}"

    def gateway_rss_mb(self) -> float:
        """The gateway's resident memory in MiB."""
        return rss_mb(self.gateway.pid)

    def stop(self) -> None:
        """Terminate every process (kill what does not stop within 5 s)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
