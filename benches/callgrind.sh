#!/usr/bin/env bash
# User-space instructions per request of llmproxy's core thread under callgrind, for W1
# (non-streaming chat) and W2 (16-token stream), as BENCHMARKS.md reports them. Unlike wall-clock
# figures on a shared machine these repeat to within about 1%, so a before/after pair from two
# binaries is comparable. Startup and shutdown cancel out: each workload is run twice (N1 and N2
# requests) and the figure is the difference in instructions divided by N2 - N1.
#
#   benches/callgrind.sh [BINARY...]      default: target/release/llmproxy
#   CALLGRIND_N1=300 CALLGRIND_N2=1800    request counts (8 keep-alive connections)
#   CALLGRIND_ACCESS_LOG=off,json,text    access-log modes to measure (default: off): `off` is
#                                         `access_log: false`; `json`/`text` turn it on in that
#                                         format (level info; lines go to a file)
#
# Needs valgrind and python3. Metering is on (usage events to a local sink), access log off
# unless asked for, one worker, on epoll: valgrind does not emulate io_uring (a proxy on it never
# starts under callgrind), so these figures are the epoll driver's user space. Prints one line
# per binary, access-log mode and workload: the core thread's instructions per request, and the
# sum over all of the process's threads (the log writer and usage threads work per request too).
set -euo pipefail
cd "$(dirname "$0")/.."
n1=${CALLGRIND_N1:-300}
n2=${CALLGRIND_N2:-1800}
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(target/release/llmproxy)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
  for _ in $(seq 1 100); do
    python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1).read()" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "no answer from $1" >&2
  return 1
}

mock_port=$(free_port)
"${bins[0]}" mock-backend --port "$mock_port" >"$work/mock.log" 2>&1 &
pids+=($!)
sink_port=$(free_port)
python3 - "$sink_port" >"$work/sink.log" 2>&1 <<'PY' &
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
pids+=($!)
wait_http "http://127.0.0.1:$mock_port/health"

# Drives N requests over 8 keep-alive connections; fails on any non-200.
drive() {
  python3 - "$1" "$2" "$3" <<'PY'
import http.client, json, sys, threading
port, n, stream = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
body = json.dumps({"model": "mock-model", "max_tokens": 16, "stream": stream,
                   "messages": [{"role": "user", "content": "hello there"}]})
errors = []
def run(k):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(k):
        c.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        r = c.getresponse(); r.read()
        if r.status != 200: errors.append(r.status)
threads = [threading.Thread(target=run, args=(n // 8,)) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
if errors: sys.exit(f"{len(errors)} errors: {errors[:5]}")
PY
}

# Instructions of the busiest thread (the one core) and of all threads, for N requests of a
# workload: "core total".
measure() {
  local bin=$1 n=$2 stream=$3 access=$4 port cfg out pid logging
  port=$(free_port)
  cfg="$work/proxy.yaml"
  case $access in
    off) logging="{ level: warn, access_log: false }" ;;
    *) logging="{ level: info, access_log: true, format: $access }" ;;
  esac
  cat >"$cfg" <<YAML
listen: "127.0.0.1:$port"
workers: 1
io_driver: epoll
backends: [{ url: "http://127.0.0.1:$mock_port" }]
health_check: { interval: 1h }
logging: $logging
usage_hook: { enabled: true, url: "http://127.0.0.1:$sink_port/usage" }
YAML
  out=$(mktemp -d "$work/cg.XXXXXX")
  MONOIO_FORCE_LEGACY_DRIVER=1 valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$out/cg.%p" \
    "$bin" --config "$cfg" >"$out/log" 2>&1 &
  pid=$!
  wait_http "http://127.0.0.1:$port/health"
  drive "$port" "$n" "$stream"
  kill -TERM "$pid"
  wait "$pid" || true
  echo "$(grep -h '^summary:' "$out"/cg.* | awk '{print $2}' | sort -n | tail -1) $(grep -h '^summary:' "$out"/cg.* | awk '{s += $2} END {print s}')"
}

IFS=, read -r -a modes <<<"${CALLGRIND_ACCESS_LOG:-off}"
for bin in "${bins[@]}"; do
  for mode in "${modes[@]}"; do
    for w in "W1 0" "W2 1"; do
      set -- $w
      read -r a at < <(measure "$bin" "$n1" "$2" "$mode")
      read -r b bt < <(measure "$bin" "$n2" "$2" "$mode")
      echo "$bin access_log=$mode $1: $(( (b - a) / (n2 - n1) )) instructions/request core thread, $(( (bt - at) / (n2 - n1) )) all threads ($a / $at @ $n1, $b / $bt @ $n2)"
    done
  done
done
