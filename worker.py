"""Worker entry point: one process per GPU serving duplex sessions, or ``--distill`` batch transcription.

python worker.py --worker-index 0 --gpu-id 0 [--port P] [--stack embedded|production|fake] [--compile]
python worker.py --distill MANIFEST --output OUT.jsonl [--batch-size N] [--shard I/N] [--language L]
"""

import sys

if __name__ == "__main__":
    if "--distill" in sys.argv[1:]:
        from core.distill.cli import main as distill_main

        raise SystemExit(distill_main(sys.argv[1:]))
    from core.worker.cli import main

    raise SystemExit(main(sys.argv[1:]))
