"""Gateway benchmark: hop latency, ETA accuracy, and how many waiting clients one core keeps updated.

    .venv/bin/python -m bench.gateway [--quick] [--max-clients 10000] [--budget-s 240]
        [--protocols duplex,realtime] [--schemes http,https | --tls] [--parts 1,2,3] [--levels 1000,5000]
    .venv/bin/python bench/bench_gateway.py ...   # the same (a shim)

Every measure runs for each WebSocket API (``/ws/duplex``, ``/v1/realtime``) and each way the gateway
serves (``http``: ``gateway.py --http``; ``https``: its default, a self-signed certificate made on first
start under the bench's temporary data_dir/tls). The bench's clients verify that certificate (it names
127.0.0.1), so a TLS handshake and every record cost what they cost a real client. Everything runs on
loopback against mock workers (tests/mock_worker.py); the gateway is a real ``gateway.py`` process: one
single-threaded event loop, so it uses at most one core. For part 3, where the machine has two or more CPUs,
the gateway is pinned to the first and this process (the clients) and the mock workers to the others, so that
the gateway has one core of its own; on a shared machine, where a pinned process cannot move off a core
someone else is busy on, ``--no-pin`` leaves it to the scheduler. Parts 1 and 2 are never pinned, as
start_all.sh does not pin: pinned, a frame through the gateway wakes a process on the other CPU at every
step, and on a VM guest that halts at once when idle each such wake-up is an exit to the host.

1. Hop latency (hop.py): a probe frame through the gateway vs. straight to the worker.
2. ETA accuracy (eta.py): the ETA each WebSocket client was first given vs. the wait it had.
3. Waiting clients (waiting.py): the largest step of waiting clients whose update lag (from a dispatch to
   each client's new position) has a median burst p95 under 100 ms, with a live session's round trips
   meanwhile; and, for ``/ws/duplex`` over HTTP, the bare fan-out peer (bench/fanout_floor.py).

Ends with a table (report.py) and one ``RESULT path=... scheme=... hop_p95_ms=... eta_mae_s=...
max_waiting_clients=... lag_p95_ms=...`` line per API and scheme.

Letting thousands wait, outside this bench (which sets all of it for its own gateways):

- ``service.max_queue_size`` (config.json; default 1000): a client beyond it is refused with
  ``queue_full``. The bench sets 20,000.
- The open-file limit: every waiting client is a socket. The gateway raises its soft limit to the hard one
  at start, so the hard limit is what counts (``ulimit -Hn``; systemd ``LimitNOFILE=``; a container's
  ``--ulimit nofile=``). Above about 500,000 waiting clients ``fs.file-max`` and ``fs.nr_open`` too.
- The listen backlog: uvicorn's is 2048 (the kernel caps it at ``net.core.somaxconn``): clients arriving
  faster than the event loop accepts them beyond that wait in SYN retries.
- Memory: over HTTPS each connection holds asyncio's 256 KiB TLS read buffer (Python 3.11+): about
  300 KiB of gateway RSS per waiting client against about 32 KiB over HTTP (the table prints RSS per step).
- uvicorn's ``limit_concurrency`` is not set by the gateway (no cap); a deployment that sets one caps the
  queue at it.
"""
