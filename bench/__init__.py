"""Benchmarks: scripts run as ``python bench/<name>.py``; ``bench.gateway`` is a package (``python -m bench.gateway``)."""
