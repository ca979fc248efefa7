"""The gateway process: queue, routing, health checks, TLS, metrics and the browser demo (no torch)."""
