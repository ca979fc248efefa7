#!/usr/bin/env bash
# One command for a lent GPU (H100/H200): every GPU row docs/BENCHMARKS.md lists as not measured, and the test
# suite's GPU-relevant tests, in about 8 minutes; at the end it prints every RESULT line again.
#   bash bench/gpu.sh           on the GPU machine, after `bash install.sh --cuda` (nothing is downloaded)
#   bash bench/gpu.sh --tiny    the same steps at tiny scale on a CPU: proves the plumbing, measures nothing
# Each step has its own time limit (GPU_BENCH_<STEP>_S overrides it: TESTS, COSYVOICE, DUPLEX, DISTILL); a
# step that fails or runs out of time says so in its RESULT line and the next one still runs. Logs: tmp/gpu-bench/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
TINY=0
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
[ -x "$PY" ] || { echo "bench/gpu.sh: .venv missing: run bash install.sh --cuda first" >&2; exit 1; }
"$PY" -m core.models.embedded check >/dev/null \
  || { echo "bench/gpu.sh: the embedded models are not built: run bash install.sh --cuda" >&2; exit 1; }
if [ "$TINY" = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "bench/gpu.sh: torch sees no CUDA GPU (bash install.sh --cuda installs the CUDA build); --tiny runs on a CPU" >&2
  exit 1
fi

LOGS=tmp/gpu-bench
mkdir -p "$LOGS"
rm -f "$LOGS"/*.log "$LOGS"/*.xml
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
STEPS=()
FAILED=0

step() {  # name, limit_s, command...: run it with its output in $LOGS/name.log, show it, note how it ended
  local name=$1 limit=$2 rc status t
  shift 2
  t=$(date +%s)
  echo "== $name (limit ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  # transformers repeats one generation warning per request: keep the log, not the noise on screen
  grep -v -e '^\[transformers\]' -e '^  round ' "$LOGS/$name.log" | tail -n 40
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; elif [ "$rc" != 0 ]; then status=failed; else status=ok; fi
  [ "$status" = ok ] || FAILED=1
  STEPS+=("RESULT step=$name status=$status seconds=$(( $(date +%s) - t ))")
}

limit() {  # STEP default_s: the step's limit, or GPU_BENCH_<STEP>_S
  local var="GPU_BENCH_$1_S"
  echo "${!var:-$2}"
}

"$PY" - <<'EOF'
import os, platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, gpu: {gpu}, torch {torch.__version__}, "
      f"cuda {torch.version.cuda}")
EOF

# The tests whose behaviour depends on a GPU being there: the CUDA backends (tests/test_gpu.py skips on a
# CPU), the settings that must reach each model, the launch path, the device pins that keep the CPU tests
# valid on a GPU host, and (on a GPU) the CPU-expectation tests of the LLM and Whisper themselves.
TESTS=(tests/test_gpu.py tests/test_registry.py tests/test_gpu_launch.py tests/test_suite_device_pins.py
       tests/test_worker_warmup.py)
if [ "$TINY" = 1 ]; then
  step tests "$(limit TESTS 120)" "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$LOGS/tests.xml" "${TESTS[@]}"
  step cosyvoice "$(limit COSYVOICE 90)" "$PY" bench/bench_cosyvoice.py --runs 1
  step duplex "$(limit DUPLEX 150)" "$PY" bench/bench_duplex.py --stack random-production --scale tiny --turns 3
  step distill "$(limit DISTILL 90)" "$PY" bench/bench_distill.py --turbo-only --turbo-scale tiny --files 2 --rounds 1
else
  TESTS+=(tests/test_llm.py tests/test_whisper.py)
  step tests "$(limit TESTS 120)" "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$LOGS/tests.xml" "${TESTS[@]}"
  step cosyvoice "$(limit COSYVOICE 120)" "$PY" bench/bench_cosyvoice.py --runs 3
  step duplex "$(limit DUPLEX 180)" "$PY" bench/bench_duplex.py --stack random-production --scale full --turns 6
  step distill "$(limit DISTILL 60)" "$PY" bench/bench_distill.py --turbo-only --turbo-scale full --files 6 --rounds 1
fi

# The tests' counts as a RESULT line (from pytest's JUnit XML, whatever the console said).
"$PY" - "$LOGS/tests.xml" > "$LOGS/tests_result.log" 2>/dev/null <<'EOF'
import sys
import xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"RESULT tests_passed={passed} tests_failed={n['failures'] + n['errors']} tests_skipped={n['skipped']}")
EOF

echo
echo "== RESULT lines ($([ "$TINY" = 1 ] && echo 'tiny scale on the CPU: plumbing only, not measurements' || echo 'GPU'))"
for name in tests_result cosyvoice duplex distill; do
  [ -f "$LOGS/$name.log" ] && grep -h '^RESULT' "$LOGS/$name.log"
done
printf '%s\n' "${STEPS[@]}"
echo "RESULT gpu_sh_total_s=$(( $(date +%s) - T0 )) tiny=$TINY"
exit $FAILED
