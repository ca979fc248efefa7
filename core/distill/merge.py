"""``python -m core.distill.merge OUT.jsonl shard0.jsonl shard1.jsonl ...``: shard outputs -> one file.

Every id ends up once in OUT.jsonl (rows OUT.jsonl already holds are kept); see
:func:`core.distill.shard.merge_outputs` for which row wins. Exit status 0 when every input was read,
1 when an input was missing (the others are still merged), 2 for a usage or write error.
"""

from __future__ import annotations

import argparse
import sys

from core.distill.shard import merge_outputs
from core.distill.writer import OutputError


def main(argv: list[str] | None = None) -> int:
    """Merge the named shard outputs into the first argument."""
    parser = argparse.ArgumentParser(
        prog="python -m core.distill.merge", description="Merge distillation shard outputs (every id once)."
    )
    parser.add_argument("output", help="the merged JSONL file (created, or extended when it exists)")
    parser.add_argument("inputs", nargs="+", help="shard JSONL files")
    args = parser.parse_args(argv)
    try:
        report = merge_outputs(args.output, args.inputs)
    except OutputError as exc:
        print(f"merge: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report.statuses.items())) or "no rows"
    print(
        f"merged {report.rows} ids into {args.output} ({counts}); {report.duplicates} duplicate rows dropped"
    )
    if report.torn_or_bad:
        print(f"merge: skipped {report.torn_or_bad} torn or malformed lines", file=sys.stderr)
    for path in report.missing_inputs:
        print(f"merge: input not found: {path}", file=sys.stderr)
    return 1 if report.missing_inputs else 0


if __name__ == "__main__":
    raise SystemExit(main())
