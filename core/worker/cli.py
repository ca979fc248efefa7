"""Command line of ``worker.py``: flags -> config -> build the stack -> serve on 127.0.0.1:base_port+N."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from core.config import Config, ConfigError, load_config
from core.gpu_ids import parse_gpu_id


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The worker's flags; unset flags stay None so config.json still applies."""
    p = argparse.ArgumentParser(prog="worker.py", description="Duplex voice worker (one per GPU).")
    p.add_argument(
        "--worker-index",
        type=int,
        default=0,
        help="N: listens on worker_base_port+N, logs to tmp/worker_N.log",
    )
    p.add_argument(
        "--gpu-id",
        type=parse_gpu_id,
        default=None,
        help="GPU to use: an index, GPU-<uuid> or MIG-<uuid> (sets CUDA_VISIBLE_DEVICES)",
    )
    p.add_argument("--port", type=int, default=None, help="override the port")
    p.add_argument("--host", default=None, help="bind address (default service.worker_host, 127.0.0.1)")
    p.add_argument("--stack", choices=["auto", "embedded", "production", "fake"], default=None)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the models")
    p.add_argument("--config", default=None, help="config JSON (default ./config.json when present)")
    return p.parse_args(argv)


def _logging(log_dir: str, index: int) -> Path:
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    path = Path(log_dir) / f"worker_{index}.log"
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(
        level=logging.INFO, format=fmt, handlers=[logging.FileHandler(path), logging.StreamHandler()]
    )
    return path


def main(argv: list[str]) -> int:
    """Run one worker until it is stopped."""
    args = parse_args(argv)
    if args.gpu_id is not None:
        # One GPU per process: hide the others before torch is imported.
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu_id
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # indices as nvidia-smi numbers them
    try:
        config: Config = load_config(
            args.config,
            {"model": {"stack": args.stack, "compile": args.compile}, "service": {"worker_host": args.host}},
        )
    except ConfigError as exc:
        print(f"worker.py: {exc}", file=sys.stderr)
        return 2
    log_path = _logging(config.service.log_dir, args.worker_index)
    port = args.port or config.service.worker_base_port + args.worker_index

    from core.models.registry import build_stack
    from core.serving import limits_from, serve
    from core.worker.app import create_app
    from core.worker_auth import worker_tls_files

    app = create_app(config, lambda: build_stack(config), index=args.worker_index)
    logging.getLogger("worker").info(
        "worker %d on http://%s:%d (log %s)", args.worker_index, config.service.worker_host, port, log_path
    )
    tls = worker_tls_files(config.service)  # HTTPS/WSS towards the gateway with service.worker_tls
    serve(
        app,
        limits=limits_from(config.service, per_address=False),  # the gateway is its only client
        host=config.service.worker_host,
        port=port,
        log_level="warning",
        ws_max_size=1 << 20,
        ssl_certfile=str(tls[0]) if tls else None,
        ssl_keyfile=str(tls[1]) if tls else None,
    )
    return 0
