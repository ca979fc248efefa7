#!/usr/bin/env bash
# Starts one worker per visible GPU (or CPU workers with the embedded stack), each under a supervisor that
# restarts it after a crash, waits until all are healthy, starts the gateway, prints the URL and returns.
#   bash start_all.sh [--http] [--compile] [--cpu-workers N] [--port P] [--config F] [--dry-run]
#   bash start_all.sh --workers-only [--config F]  only the workers, for a gateway on another host (prints their addresses)
#   bash start_all.sh --stop                      stop exactly what start_all.sh started (tmp/*.pid)
#   bash start_all.sh --distill MANIFEST [--output OUT.jsonl] [--batch-size N]   batch transcription, one shard per GPU
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
[ -x "$PY" ] || { echo "start_all.sh: .venv missing: run bash install.sh first" >&2; exit 1; }
HTTP=0; COMPILE=0; CPU_WORKERS=""; PORT=""; CONFIG=""; STOP=0; DISTILL=""; OUTPUT=""; BATCH=""; DRY=0; WORKERS_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --http) HTTP=1 ;;
    --compile) COMPILE=1 ;;
    --cpu-workers) CPU_WORKERS="$2"; shift ;;
    --port) PORT="$2"; shift ;;
    --config) CONFIG="$2"; shift ;;
    --stop) STOP=1 ;;
    --distill) DISTILL="$2"; shift ;;
    --output) OUTPUT="$2"; shift ;;
    --batch-size) BATCH="$2"; shift ;;
    --dry-run) DRY=1 ;;
    --workers-only) WORKERS_ONLY=1 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "start_all.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
cfg() { "$PY" -c "from core.config import load_config; c = load_config(${CONFIG:+'$CONFIG'}); print($1)"; }
# pid, status and log files live in service.log_dir (tmp/ by default)
T=$(cfg c.service.log_dir)
mkdir -p "$T"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pidfile() {  # stop one process we started and wait for it (TERM, then KILL after 20 s)
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    echo "stopped $(basename "$f" .pid) (pid $pid)"
  fi
  rm -f "$f"
}

if [ "$STOP" = 1 ]; then
  stop_pidfile $T/gateway.pid
  for f in $T/worker_*.pid; do [ -e "$f" ] && stop_pidfile "$f"; done
  rm -f $T/worker_*.status
  exit 0
fi

# --- which devices -----------------------------------------------------------------------------------
# Each worker gets one entry of CUDA_VISIBLE_DEVICES (an index, GPU-<uuid> or MIG-<uuid>) in its environment.
# nvidia-smi numbers GPUs in PCI bus order and CUDA fastest-first unless told: make indices mean the same.
export CUDA_DEVICE_ORDER=${CUDA_DEVICE_ORDER:-PCI_BUS_ID}
GPUS=()
CFG_STACK=$(cfg c.model.stack)
if [ "$CFG_STACK" = embedded ] || [ "$CFG_STACK" = fake ]; then
  :  # a CPU stack asked for in the config: no GPU worker, whatever nvidia-smi says
elif [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
  # Set, even empty: it decides (empty or -1 hides every GPU). Entries may be indices or UUIDs.
  IFS=',' read -r -a listed <<< "${CUDA_VISIBLE_DEVICES// /}"
  for id in "${listed[@]}"; do [[ "$id" =~ ^-[0-9]+$ ]] && break; GPUS+=("$id"); done
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  mapfile -t GPUS < <(nvidia-smi --query-gpu=uuid --format=csv,noheader | tr -d ' ')
fi
if [ ${#GPUS[@]} -gt 0 ]; then
  N=${#GPUS[@]}; STACK=""
  echo "found ${N} GPU(s): ${GPUS[*]}"
elif [ "$CFG_STACK" = embedded ] || [ "$CFG_STACK" = fake ]; then
  N=${CPU_WORKERS:-1}; STACK="--stack $CFG_STACK"
  echo "model.stack is $CFG_STACK: ${N} CPU worker(s)"
else
  N=${CPU_WORKERS:-1}; STACK="--stack embedded"
  echo "no GPU found: ${N} CPU worker(s) with the embedded stack"
fi

# --- batch transcription -----------------------------------------------------------------------------
if [ -n "$DISTILL" ]; then
  OUTPUT=${OUTPUT:-$T/distill.jsonl}
  pids=(); shards=()
  for i in $(seq 0 $((N - 1))); do
    shard="${OUTPUT%.jsonl}.shard${i}of${N}.jsonl"; shards+=("$shard")
    gpu=()
    [ ${#GPUS[@]} -gt 0 ] && gpu=(env CUDA_VISIBLE_DEVICES="${GPUS[$i]}")
    "${gpu[@]}" "$PY" worker.py --distill "$DISTILL" --output "$shard" --shard "$i/$N" \
      ${BATCH:+--batch-size "$BATCH"} ${CONFIG:+--config "$CONFIG"} > "$T/distill_${i}.log" 2>&1 &
    pids+=($!)
    echo "shard $i/$N -> $shard (log $T/distill_${i}.log)"
  done
  rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  "$PY" -m core.distill.merge "$OUTPUT" "${shards[@]}"
  echo "merged ${N} shard(s) into $OUTPUT"
  exit $rc
fi

# --- workers -----------------------------------------------------------------------------------------
if [ "$DRY" = 0 ] && alive $T/gateway.pid; then
  echo "already running (gateway pid $(cat $T/gateway.pid)); stop it with: bash start_all.sh --stop"; exit 1
fi
read -r BASE GW_PORT_CFG WHOST WTLS < <(cfg "c.service.worker_base_port, c.service.gateway_port, c.service.worker_host, c.service.worker_tls")
GW_PORT=${PORT:-$GW_PORT_CFG}
# Where the workers are reached: their bind address, or loopback for a wildcard bind; https with worker_tls.
case "$WHOST" in 0.0.0.0|::|"") WHOST=127.0.0.1 ;; esac
case "$WHOST" in *:*) WHOST="[$WHOST]" ;; esac
WSCHEME=http; [ "$WTLS" = True ] && WSCHEME=https
ADDRS=()
for i in $(seq 0 $((N - 1))); do
  port=$((BASE + i)); ADDRS+=("$WHOST:$port")
  [ "$DRY" = 0 ] && alive "$T/worker_$i.pid" && { echo "worker $i already running"; continue; }
  args=(worker.py --worker-index "$i" --port "$port" $STACK)
  envs=()  # the worker's GPU goes in its environment, so an id of any form reaches CUDA unchanged
  [ ${#GPUS[@]} -gt 0 ] && envs=("CUDA_VISIBLE_DEVICES=${GPUS[$i]}")
  [ "$COMPILE" = 1 ] && args+=(--compile)
  [ -n "$CONFIG" ] && args+=(--config "$CONFIG")
  if [ "$DRY" = 1 ]; then
    echo "worker $i: ${envs[*]:+${envs[*]} }CUDA_DEVICE_ORDER=$CUDA_DEVICE_ORDER $PY ${args[*]}"; continue
  fi
  env "${envs[@]}" nohup "$PY" -m core.launch.supervisor --name "worker_$i" --status "$T/worker_$i.status" -- \
    "$PY" "${args[@]}" > "$T/worker_$i.out" 2>&1 &
  echo $! > "$T/worker_$i.pid"
  echo "worker $i starting on 127.0.0.1:$port (log $T/worker_$i.log)"
done

[ "$DRY" = 1 ] && exit 0  # --dry-run: the worker command lines above are all it prints

wait_health() {  # url, name, pidfile, timeout_s
  local deadline=$(( $(date +%s) + $4 ))
  until curl -fsk -o /dev/null "$1"; do
    if ! alive "$3"; then echo "$2 exited; last lines of its log:"; tail -n 20 "$T/$2.out" "$T/$2.log" 2>/dev/null; return 1; fi
    [ "$(date +%s)" -lt "$deadline" ] || { echo "$2 not healthy after $4 s (see $T/$2.log)"; return 1; }
    sleep 0.5
  done
}
for i in $(seq 0 $((N - 1))); do
  wait_health "$WSCHEME://${ADDRS[$i]}/health" "worker_$i" "$T/worker_$i.pid" 900 || { bash "$0" --stop ${CONFIG:+--config "$CONFIG"}; exit 1; }
  echo "worker $i healthy"
done
WORKERS=$(IFS=,; echo "${ADDRS[*]}")

if [ "$WORKERS_ONLY" = 1 ]; then  # the gateway runs on another host (docs/ARCHITECTURE.md, security model)
  echo
  echo "workers ready: $WORKERS"
  echo "on the gateway host: python gateway.py --workers $WORKERS, with this host's service.worker_secret"
  [ "$WTLS" = True ] && echo "       and service.worker_tls true, service.worker_ca_file a copy of $(cfg c.service.data_dir)/tls-worker/cert.pem (unless worker_tls_cert is set)"
  echo "logs:  $T/worker_N.log   stop: bash start_all.sh --stop${CONFIG:+ --config $CONFIG}"
  exit 0
fi

# --- gateway -----------------------------------------------------------------------------------------
gw=(gateway.py --port "$GW_PORT" --workers "$WORKERS")
[ "$HTTP" = 1 ] && gw+=(--http)
[ -n "$CONFIG" ] && gw+=(--config "$CONFIG")
nohup "$PY" "${gw[@]}" > $T/gateway.out 2>&1 &
echo $! > $T/gateway.pid
SCHEME=https; [ "$HTTP" = 1 ] && SCHEME=http
wait_health "$SCHEME://127.0.0.1:$GW_PORT/health" gateway $T/gateway.pid 60 || { bash "$0" --stop ${CONFIG:+--config "$CONFIG"}; exit 1; }

echo
echo "ready: open $SCHEME://localhost:$GW_PORT/ in a browser"
for ip in $(hostname -I 2>/dev/null); do case "$ip" in *:*) ;; *) echo "       or $SCHEME://$ip:$GW_PORT/ from another device on this network";; esac; done
[ "$SCHEME" = https ] && echo "       (self-signed certificate: accept the browser's warning once)"
echo "logs:  $T/gateway.log, $T/worker_N.log   stop: bash start_all.sh --stop"
