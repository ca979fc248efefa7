"""The gateway benchmark (now the package bench/gateway/): this script runs it as before.

    .venv/bin/python bench/bench_gateway.py [--quick] [--max-clients 10000] [--budget-s 240] ...

Options and measures: ``python -m bench.gateway --help`` and bench/gateway/__init__.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, sys.path[0] is bench/, where the package's folder would shadow the repository's
# gateway.py as "gateway": put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.gateway.__main__ import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
