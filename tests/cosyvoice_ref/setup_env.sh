#!/usr/bin/env bash
# Builds the reference CosyVoice2 environment that the parity tests (tests/test_cosyvoice_parity.py) run the
# official implementation in: tmp/cosyvoice-ref-venv with torch==2.13.0 (CPU), the pinned packages of
# requirements.txt, and the cosyvoice-minicpmo wheel (the official CosyVoice source, installed --no-deps).
# Safe to run again: a stamp file makes a second run a no-op. Usage: bash tests/cosyvoice_ref/setup_env.sh
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${COSYVOICE_REF_VENV:-$ROOT/tmp/cosyvoice-ref-venv}"
STAMP="$VENV/.ref-stamp"
want=$(cat "$HERE/requirements.txt" "$HERE/reference.txt" "$0" | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  echo "[cosyvoice-ref] up to date: $VENV"
  exit 0
fi
PY=""
for cand in python3.11 python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    PY=$(command -v "$cand"); break
  fi
done
[ -n "$PY" ] || { echo "[cosyvoice-ref] ERROR: Python 3.11 is required" >&2; exit 1; }
rm -rf "$VENV"
"$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The exact pin takes the CPU wheel on a machine without a GPU; never install torch unpinned here.
"$VPY" -m pip install -q torch==2.13.0
"$VPY" -m pip install -q -r "$HERE/requirements.txt"
"$VPY" -m pip install -q --no-deps --require-hashes -r "$HERE/reference.txt"
"$VPY" -c 'import torch, transformers, diffusers, cosyvoice; print("[cosyvoice-ref] torch", torch.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)'
echo "$want" > "$STAMP"
echo "[cosyvoice-ref] ready: $VENV"
