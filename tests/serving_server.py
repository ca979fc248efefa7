"""Test support: a tiny ASGI app served by ``core.serving.serve`` on loopback, the connection bound counting
loopback too (no exempt networks). With ``SERVING_PLAIN=1`` it is served by plain ``uvicorn.run`` instead,
to show the tests in tests/test_serving.py fail without the serving layer.

Usage: serving_server.py PORT HEADER_TIMEOUT_S HANDSHAKE_TIMEOUT_S BODY_READ_TIMEOUT_S MAX_PER_ADDRESS [CERT KEY]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.serving import AddressCounter, Limits, serve

#: The serving layer's connection counter (what it dropped), shown at ``GET /dropped``.
COUNTER: AddressCounter | None = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """HTTP: 200 with ``scheme method path`` (``/dropped``: the counter's JSON; ``/unread``: 401 without
    reading the request body, as an app refusing a request does); WebSocket: accepted and held until the
    client leaves."""
    if scope["type"] == "http" and scope["path"] == "/unread":
        body = b'{"error": "unauthorized"}'
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif scope["type"] == "http":
        while (await receive()).get("more_body"):
            pass
        body = f"{scope['scheme']} {scope['method']} {scope['path']}".encode()
        if scope["path"] == "/dropped":
            body = json.dumps(COUNTER.dropped() if COUNTER is not None else {}).encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass


def main(argv: list[str]) -> None:
    port, header_s, handshake_s, body_s = int(argv[0]), float(argv[1]), float(argv[2]), float(argv[3])
    per_address = int(argv[4])
    tls = {"ssl_certfile": argv[5], "ssl_keyfile": argv[6]} if len(argv) > 5 else {}
    # "Uvicorn running on ..." (logged once it listens) tells the test it may connect
    options: dict[str, Any] = {"log_level": "info", "access_log": False, "ws": "websockets-sansio"}
    if os.environ.get("SERVING_PLAIN") == "1":
        import uvicorn

        uvicorn.run(app, host="127.0.0.1", port=port, **options, **tls)
        return
    limits = Limits(
        header_timeout_s=header_s,
        tls_handshake_timeout_s=handshake_s,
        body_read_timeout_s=body_s,
        max_connections_per_address=per_address,
        exempt=(),
    )
    global COUNTER
    COUNTER = AddressCounter(limits)
    serve(app, host="127.0.0.1", port=port, limits=limits, counter=COUNTER, **options, **tls)


if __name__ == "__main__":
    main(sys.argv[1:])
