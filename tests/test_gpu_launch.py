"""How start_all.sh and worker.py pick GPUs, checked with a fake nvidia-smi on PATH (no GPU needed).

``start_all.sh --dry-run`` prints each worker's command line and environment without starting anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.worker.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]
UUIDS = ("GPU-5d1e2c3a-0f4b-11ee-9a41-0242ac120002", "GPU-7a9b8c7d-0f4b-11ee-9a41-0242ac120003")

FAKE_SMI = """#!/bin/sh
# A host with two GPUs, as far as start_all.sh can tell.
case "$*" in
  -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: {a})"; echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: {b})" ;;
  *--query-gpu=uuid*) echo "{a}"; echo "{b}" ;;
  *--query-gpu=index*) echo 0; echo 1 ;;
  *) exit 9 ;;
esac
"""


def dry_run(tmp_path: Path, model: dict[str, str] | None = None, **env: str) -> list[str]:
    """start_all.sh --dry-run with the fake nvidia-smi first on PATH; its worker lines."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_SMI.format(a=UUIDS[0], b=UUIDS[1]))
    smi.chmod(0o755)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"service": {"log_dir": str(tmp_path / "logs")}, "model": model or {}}))
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
    out = subprocess.run(
        ["bash", "start_all.sh", "--dry-run", "--config", str(cfg)],
        cwd=ROOT,
        env={**base, "PATH": f"{bin_dir}:{base['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert not list((tmp_path / "logs").glob("*.pid"))  # nothing was started
    return [line for line in out.stdout.splitlines() if line.startswith("worker ")]


def test_each_gpu_worker_gets_its_gpu_uuid_in_its_environment(tmp_path: Path) -> None:
    lines = dry_run(tmp_path)
    assert len(lines) == 2
    for i, (line, uuid) in enumerate(zip(lines, UUIDS, strict=True)):
        assert line.startswith(f"worker {i}: CUDA_VISIBLE_DEVICES={uuid} CUDA_DEVICE_ORDER=PCI_BUS_ID ")
        assert "--gpu-id" not in line and "--stack" not in line  # the config's stack (auto: production)


def test_cuda_visible_devices_with_mig_ids_gives_one_worker_each(tmp_path: Path) -> None:
    mig = "MIG-0d2bd6e5-7e1c-5b0e-8a3e-6f1b2c3d4e5f"
    lines = dry_run(tmp_path, CUDA_VISIBLE_DEVICES=f"{mig}, {UUIDS[1]}")
    assert [line.split()[2] for line in lines] == [
        f"CUDA_VISIBLE_DEVICES={mig}",
        f"CUDA_VISIBLE_DEVICES={UUIDS[1]}",
    ]


def test_an_empty_cuda_visible_devices_hides_every_gpu(tmp_path: Path) -> None:
    lines = dry_run(tmp_path, CUDA_VISIBLE_DEVICES="")
    assert len(lines) == 1 and "CUDA_VISIBLE_DEVICES" not in lines[0] and "--stack embedded" in lines[0]


def test_an_embedded_stack_in_the_config_starts_a_cpu_worker_even_where_nvidia_smi_answers(
    tmp_path: Path,
) -> None:
    # What tests/test_start_all.py relies on: on a GPU host it must not start the production stack.
    lines = dry_run(tmp_path, {"stack": "embedded"})
    assert len(lines) == 1
    assert "CUDA_VISIBLE_DEVICES" not in lines[0] and "--stack embedded" in lines[0]


def test_a_user_cuda_device_order_is_kept(tmp_path: Path) -> None:
    lines = dry_run(tmp_path, CUDA_DEVICE_ORDER="FASTEST_FIRST")
    assert all("CUDA_DEVICE_ORDER=FASTEST_FIRST" in line for line in lines)


@pytest.mark.parametrize(
    "gpu",
    ["0", "3", UUIDS[0], "GPU-5d1e", "MIG-0d2bd6e5-7e1c-5b0e-8a3e-6f1b2c3d4e5f", "MIG-GPU-5d1e2c3a/1/0"],
)
def test_worker_gpu_id_accepts_every_form_cuda_takes(gpu: str) -> None:
    assert parse_args(["--gpu-id", gpu]).gpu_id == gpu


@pytest.mark.parametrize("gpu", ["", "gpu0", "0,1", "GPU-xyz", "1; rm -rf /"])
def test_worker_gpu_id_refuses_anything_else(gpu: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--gpu-id", gpu])
    assert exc.value.code == 2 and "not a CUDA device id" in capsys.readouterr().err


def test_worker_sets_the_gpu_and_bus_order_before_torch(tmp_path: Path) -> None:
    code = (
        "import os, sys; from core.worker import cli as w; "
        "w.load_config = lambda *a, **k: (_ for _ in ()).throw(w.ConfigError('stop here')); "
        f"rc = w.main(['--gpu-id', '{UUIDS[1]}']); "
        "print(rc, os.environ['CUDA_VISIBLE_DEVICES'], os.environ['CUDA_DEVICE_ORDER'], 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["2", UUIDS[1], "PCI_BUS_ID", "False"]
