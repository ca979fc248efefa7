"""``python -m bench.gateway``: parse the options, run the measures for each API and scheme, print the table."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from bench.gateway import __doc__ as PACKAGE_DOC
from bench.gateway.client import PROTOCOLS
from bench.gateway.cluster import ROOT, Cluster, free_port, spawn, wait_port
from bench.gateway.eta import bench_eta
from bench.gateway.hop import bench_hop
from bench.gateway.host import header, heap_for_reads, raise_fd_limit
from bench.gateway.report import Result, print_report
from bench.gateway.waiting import bench_peer, bench_waiting

LEVELS = (250, 500, 1000, 2000, 3000, 4000, 5000, 6000, 8000, 10_000, 15_000)
BASE_SERVICE = {"health_interval_s": 0.5, "queue_update_interval_s": 3.0}
ETA_SERVICE = {**BASE_SERVICE, "eta_audio_duplex_s": 0.2, "eta_chat_s": 0.065, "eta_transcribe_s": 0.065}
# The default (1000) would refuse the clients above it with queue_full; see the package docstring.
WAITING_SERVICE = {**BASE_SERVICE, "max_queue_size": 20_000}


def _names(text: str, allowed: tuple[str, ...]) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The bench's options."""
    p = argparse.ArgumentParser(prog="bench.gateway", description=(PACKAGE_DOC or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--max-clients", type=int, default=10_000)
    p.add_argument(
        "--levels", default=None, help="part 3's steps, comma-separated (default: up to --max-clients)"
    )
    p.add_argument("--budget-s", type=float, default=240.0, help="time cap for part 3, per API and scheme")
    p.add_argument("--parts", default="1,2,3", help="which parts to run (comma-separated)")
    p.add_argument(
        "--protocols",
        type=lambda t: _names(t, tuple(PROTOCOLS)),
        default=list(PROTOCOLS),
        help="the WebSocket APIs to measure, comma-separated (default duplex,realtime)",
    )
    p.add_argument(
        "--schemes",
        type=lambda t: _names(t, ("http", "https")),
        default=["http", "https"],
        help="how the gateway serves, comma-separated: http (--http), https (its default; self-signed certificate); default http,https",
    )
    p.add_argument("--tls", action="store_const", const=["https"], dest="schemes", help="= --schemes https")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="part 3: skip the bare fan-out peer")
    p.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="part 3: do not pin the gateway to the first CPU and the rest to the others (a shared machine)",
    )
    p.add_argument(
        "--client-wait",
        choices=("nap", "epoll", "spin"),
        default="nap",
        help="part 3: how the clients wait for a burst's frames (see waiting.wait_for_frames; default %(default)s)",
    )
    return p.parse_args(argv)


def _levels(args: argparse.Namespace, fds: int) -> list[int]:
    # The clients' process holds a socket per client and the gateway one more per worker link; below a
    # generous limit keep to half of it, so that neither runs out mid-step.
    max_clients = min(args.max_clients, (fds - 200) // 2 if fds < 40_000 else args.max_clients)
    levels = [int(x) for x in args.levels.split(",")] if args.levels else list(LEVELS)
    levels = [lvl for lvl in levels if lvl <= max_clients]
    return [lvl for lvl in levels if lvl <= 500] if args.quick else levels


def main(argv: list[str]) -> int:
    """Run the bench; returns the exit status."""
    args = parse_args(argv)
    fds = raise_fd_limit()
    heap_reads = heap_for_reads()
    cpus = sorted(os.sched_getaffinity(0))
    gateway_cpu = cpus[0] if args.pin and len(cpus) > 1 else None
    pinned = f"pinned to CPU {gateway_cpu} in part 3" if gateway_cpu is not None else "not pinned"
    print(header(pinned, fds, args.client_wait, heap_reads), flush=True)
    levels = _levels(args, fds)
    parts = {int(x) for x in args.parts.split(",") if x.strip()}
    # /ws/duplex over HTTP first: the baseline of earlier runs, measured first at each part.
    combos = [(s, PROTOCOLS[p]) for s in args.schemes for p in args.protocols]
    results = [Result(p.name, p.path, s) for s, p in combos]
    with tempfile.TemporaryDirectory(prefix="bench_gw_") as tmp_name:
        tmp = Path(tmp_name)
        if 1 in parts:
            for result, (scheme, protocol) in zip(results, combos, strict=True):
                print(f"1. hop latency, {result.label} (probe round trip)", flush=True)
                cluster = Cluster(tmp, 1, BASE_SERVICE, None, tls=scheme == "https")
                try:
                    rounds, per_round = (2, 200) if args.quick else (5, 600)
                    result.hop = asyncio.run(bench_hop(cluster, protocol, rounds, per_round))
                finally:
                    cluster.stop()
        if 2 in parts:
            for result, (scheme, protocol) in zip(results, combos, strict=True):
                print(f"2. ETA accuracy (mixed workload), {result.label}", flush=True)
                cluster = Cluster(tmp, 2, ETA_SERVICE, None, tls=scheme == "https")
                try:
                    result.eta = asyncio.run(bench_eta(cluster, protocol, 40 if args.quick else 150))
                finally:
                    cluster.stop()
        if 3 in parts:
            if gateway_cpu is not None:  # the clients and the mock workers (spawned from here) off its core
                os.sched_setaffinity(0, set(cpus[1:]))
            for result, (scheme, protocol) in zip(results, combos, strict=True):
                print(
                    f"3. waiting clients kept updated, {result.label} (lag from a dispatch to each new position)"
                )
                cluster = Cluster(tmp, 2, WAITING_SERVICE, gateway_cpu, tls=scheme == "https")
                try:
                    result.rows = asyncio.run(
                        bench_waiting(cluster, protocol, levels, args.budget_s, args.client_wait)
                    )
                finally:
                    cluster.stop()
            baseline = next(
                (r for r in results if r.rows and r.protocol == "duplex" and r.scheme == "http"), None
            )
            if args.peer and baseline is not None:
                baseline.peer_rows = _run_peer(
                    tmp, gateway_cpu, levels[: len(baseline.rows)][-2:], args.client_wait
                )
    print_report(results)
    return 0


def _run_peer(tmp: Path, cpu: int | None, levels: list[int], client_wait: str) -> list[dict[str, object]]:
    """The peer at the steps where the baseline's result was decided (its last two)."""
    port = free_port()
    floor = spawn([str(ROOT / "bench" / "fanout_floor.py"), "--port", str(port)], tmp, cpu)
    try:
        wait_port(port)
        print(
            "   the same against a bare fan-out server on the same core (bench/fanout_floor.py)", flush=True
        )
        return asyncio.run(bench_peer(port, floor.pid, levels, client_wait))
    finally:
        floor.kill()
        floor.wait(5)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
