"""Gateway entry point: the queue, routing, health checks, TLS, metrics and the browser demo (no torch).

python gateway.py [--port 8006] [--workers localhost:22400,localhost:22401] [--http] [--config F] [--host H]
"""

import argparse
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The gateway's flags; unset flags stay None so config.json still applies."""
    p = argparse.ArgumentParser(prog="gateway.py", description="Duplex voice gateway (queue, routing, TLS).")
    p.add_argument("--port", type=int, default=None, help="listen port (default service.gateway_port, 8006)")
    p.add_argument("--host", default=None, help="bind address (default service.gateway_host, 0.0.0.0)")
    p.add_argument(
        "--workers", default=None, help="HOST:PORT,... (default service.worker_host:worker_base_port)"
    )
    p.add_argument("--http", action="store_true", default=None, help="plain HTTP instead of HTTPS")
    p.add_argument("--config", default=None, help="config JSON (default ./config.json when present)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    """Parse flags, load the config, run the gateway."""
    from core.config import ConfigError, load_config

    args = parse_args(argv)
    overrides = {"service": {"gateway_port": args.port, "gateway_host": args.host, "http": args.http}}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"gateway.py: {exc}", file=sys.stderr)
        return 2
    from core.gateway.app import run

    return run(config, args.workers)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
