#!/usr/bin/env bash
# User-space instructions per request of llmproxy's core thread under callgrind, for W1
# (non-streaming chat) and W2 (16-token stream), as BENCHMARKS.md reports them. Unlike wall-clock
# figures on a shared machine these repeat to within about 1%, so a before/after pair from two
# binaries is comparable. Startup and shutdown cancel out: each workload is run twice (N1 and N2
# requests) and the figure is the difference in instructions divided by N2 - N1.
#
#   benches/callgrind.sh [BINARY...]      default: target/release/llmproxy
#   CALLGRIND_N1=300 CALLGRIND_N2=1800    request counts
#   CALLGRIND_ACCESS_LOG=off,json,text    access-log modes to measure (default: off): `off` is
#                                         `access_log: false`; `json`/`text` turn it on in that
#                                         format (level info; lines go to a file)
#   CALLGRIND_WORKLOADS="W1 W2"           which workloads
#   CALLGRIND_TOKENS=16                   W2's tokens a stream; two counts (`16,256`) also split
#                                         W2 into a cost per token (the slope) and a cost per
#                                         request apart from its tokens (the rest)
#   CALLGRIND_TOKEN_DELAY_MS=0            the mock's pause between tokens (1: streams that
#                                         interleave event by event, as a real engine's do)
#   CALLGRIND_CACHE=1                     also simulate the caches (`--cache-sim=yes`, the host's
#                                         L1 sizes) and give the core's L1 instruction and data
#                                         misses per request: how much code and state a request
#                                         walks through, which instruction counts do not show
#   CALLGRIND_CODE=1                      also give the code a request runs (`--dump-instr=yes`):
#                                         the bytes of the binary's instructions whose count grows
#                                         by at least one for every second added request, and the
#                                         64-byte lines they lie on (libraries' lines included). The
#                                         bytes do not depend on where the linker put the code; the
#                                         lines do, and bytes / 64 is what the best layout would
#                                         touch. Needs objdump (binutils)
#   CALLGRIND_CONNS=8                     keep-alive connections (1: one request at a time, so
#                                         every request wakes the core alone and the figure
#                                         does not depend on how requests happened to batch)
#   CALLGRIND_REPEAT=1                    rounds (with CALLGRIND_STORES): each round measures every
#                                         binary and store once, in turn; then the median and
#                                         range per binary and store
#   CALLGRIND_STORES=local,redis          rate-limited key instead of none (issue 19): the clients
#                                         send a key with rpm/tpm limits the run never reaches, so
#                                         every request takes the limiter's whole path, with
#                                         `ratelimit.store: local`, or `redis` (sync_interval
#                                         100ms) against a redis-server this script starts on a
#                                         free loopback port and stops by PID
#
# A binary named haproxy* is run as HAProxy instead, for the same figures beside llmproxy's; it
# takes no CALLGRIND_STORES or CALLGRIND_ACCESS_LOG. Its configuration is the part of the load
# benchmark's (`start_haproxy` in benches/load/targets.rs) that shapes the work per
# request — `mode http`, one thread, keep-alive both ways, `http-reuse always`, `http-no-delay`,
# no logging — written again here because a shell script cannot call it: keep the two in step.
#
# With CALLGRIND_STORES the line also gives the whole process (every thread) per request and,
# for redis, the sync thread apart, with its instructions per sync. That thread works per
# interval, not per request, and under callgrind the core serves about 1,400 W1 requests/s
# against tens of thousands natively while the 100 ms clock runs as usual, so its share per
# request here is tens of times its real one: instructions per sync x 10 syncs/s / native
# requests/s is that. Between runs of the same binary the core figure moves by about 1-2% (how
# the epoll loop's wake-ups fall): compare medians of a few rounds, not single runs.
#
# Needs valgrind and python3. Metering is on (usage events to a local sink), access log off unless
# CALLGRIND_ACCESS_LOG asks for it,
# one worker, on epoll: valgrind does not emulate io_uring (a proxy on it never starts under
# callgrind), so these figures are the epoll driver's user space. Prints one line per binary and
# workload.
set -euo pipefail
cd "$(dirname "$0")/.."
n1=${CALLGRIND_N1:-300}
n2=${CALLGRIND_N2:-1800}
workloads=${CALLGRIND_WORKLOADS:-W1 W2}
stores=${CALLGRIND_STORES:-}
conns=${CALLGRIND_CONNS:-8}
IFS=, read -r -a token_counts <<<"${CALLGRIND_TOKENS:-16}"
# Checked before any run: a split needs two different counts, and each run takes minutes.
for t in "${token_counts[@]}"; do
  [[ $t =~ ^[1-9][0-9]*$ ]] || { echo "CALLGRIND_TOKENS: $t is not a token count" >&2; exit 1; }
done
case ${#token_counts[@]} in
  1) ;;
  2) [ "${token_counts[0]}" != "${token_counts[1]}" ] || { echo "CALLGRIND_TOKENS: two different token counts" >&2; exit 1; } ;;
  *) echo "CALLGRIND_TOKENS: one or two token counts" >&2; exit 1 ;;
esac
delay=${CALLGRIND_TOKEN_DELAY_MS:-0}
cache=${CALLGRIND_CACHE:-0}
cg_opts=()
[ "$cache" = 1 ] && cg_opts=(--cache-sim=yes)
code=${CALLGRIND_CODE:-0}
if [ "$code" = 1 ]; then
  command -v objdump >/dev/null || { echo "CALLGRIND_CODE=1 needs objdump (apt-get install binutils)" >&2; exit 1; }
  [ -z "$stores" ] || { echo "CALLGRIND_CODE does not apply with CALLGRIND_STORES" >&2; exit 1; }
  cg_opts+=(--dump-instr=yes)
fi
repeat=${CALLGRIND_REPEAT:-1}
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

# The mock backend is llmproxy's own: the first llmproxy binary given, else the default one.
mock_bin=""
for bin in "${bins[@]}"; do
  if [[ $(basename "$bin") == haproxy* ]]; then
    [ -z "$stores" ] || { echo "CALLGRIND_STORES does not apply to HAProxy ($bin)" >&2; exit 1; }
  elif [ -z "$mock_bin" ]; then
    mock_bin=$bin
  fi
done
[ -n "$mock_bin" ] || mock_bin=target/release/llmproxy
[ -x "$mock_bin" ] || { echo "the mock backend needs an llmproxy binary: build target/release/llmproxy or name one" >&2; exit 1; }
mock_port=$(free_port)
"$mock_bin" mock-backend --port "$mock_port" >"$work/mock.log" 2>&1 &
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
redis_port=""
if [[ ",$stores," == *,redis,* ]]; then
  command -v redis-server >/dev/null || { echo "CALLGRIND_STORES=redis needs redis-server (apt-get install redis-server)" >&2; exit 1; }
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).close()" "$redis_port" 2>/dev/null && break
    sleep 0.1
  done
fi

# Drives N requests of TOKENS tokens over $conns keep-alive connections; fails on any non-200.
# With a fifth argument, sends it as the bearer key.
drive() {
  python3 - "$1" "$2" "$3" "$4" "${5:-}" "$conns" "$delay" <<'PY'
import http.client, json, sys, threading
port, n, stream, tokens, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5]
conns, delay = int(sys.argv[6]), int(sys.argv[7])
body = json.dumps({"model": "mock-model", "max_tokens": tokens, "stream": stream,
                   "messages": [{"role": "user", "content": "hello there"}]})
headers = {"content-type": "application/json"}
if delay:
    headers["x-mock-token-delay-ms"] = str(delay)
if key:
    headers["authorization"] = "Bearer " + key
errors = []
def run(k):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(k):
        c.request("POST", "/v1/chat/completions", body, headers)
        r = c.getresponse(); r.read()
        if r.status != 200: errors.append(r.status)
threads = [threading.Thread(target=run, args=(n // conns,)) for _ in range(conns)]
for t in threads: t.start()
for t in threads: t.join()
if errors: sys.exit(f"{len(errors)} errors: {errors[:5]}")
PY
}

KEY=sk-bench-0123456789abcdef
# Prints "CORE TOTAL SYNC_THREAD SYNCS" for N requests of a workload with store STORE (empty: no
# key at all): the busiest thread (the one core), every thread, the rate-limit sync thread (0
# without one) and the syncs it made (from /metrics, read after the last request; the read costs
# the same in every run, so it cancels in the difference).
measure() {
  local bin=$1 n=$2 stream=$3 store=$4 access=${5:-off} tokens=${6:-16} port cfg out pid syncs=0 logging
  port=$(free_port)
  out=$(mktemp -d "$work/cg.XXXXXX")
  if [[ $(basename "$bin") == haproxy* ]]; then
    cfg="$work/haproxy.cfg"
    cat >"$cfg" <<CFG
global
    nbthread 1
    maxconn 2000
defaults
    mode http
    option http-keep-alive
    option http-no-delay
    http-reuse always
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend bench
    bind 127.0.0.1:$port
    default_backend mock
backend mock
    server mock 127.0.0.1:$mock_port
CFG
    valgrind --tool=callgrind "${cg_opts[@]}" --separate-threads=yes --callgrind-out-file="$out/cg.%p" \
      "$bin" -db -f "$cfg" >"$out/log" 2>&1 &
    pid=$!
  else
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
  if [ -n "$store" ]; then
    cat >>"$cfg" <<YAML
auth:
  keys:
    - { name: bench, key: "$KEY", rpm: 1000000000, tpm: 1000000000000 }
YAML
  fi
  if [ "$store" = redis ]; then
    cat >>"$cfg" <<YAML
ratelimit: { store: redis, redis_url: "redis://127.0.0.1:$redis_port/0", sync_interval: 100ms }
YAML
  fi
  MONOIO_FORCE_LEGACY_DRIVER=1 valgrind --tool=callgrind "${cg_opts[@]}" --separate-threads=yes --callgrind-out-file="$out/cg.%p" \
    "$bin" --config "$cfg" >"$out/log" 2>&1 &
  pid=$!
  fi
  # Through the proxy to the mock's /health (HAProxy has no endpoint of its own).
  wait_http "http://127.0.0.1:$port/health"
  drive "$port" "$n" "$stream" "$tokens" "${store:+$KEY}"
  if [ "$store" = redis ]; then
    syncs=$(python3 - "$port" <<'PY'
import re, sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=30).read().decode()
total = 0.0
for name in ("llmproxy_ratelimit_sync_seconds_count", "llmproxy_ratelimit_sync_errors_total"):
    m = re.search(r"^" + name + r" (\S+)$", text, re.M)
    total += float(m.group(1)) if m else 0.0
print(int(total))
PY
)
  fi
  kill -TERM "$pid"
  wait "$pid" || true
  local core total sync_thread misses core_file
  # The core thread is the busiest one: its file, its instructions and, with the cache
  # simulation, its I1 misses and D1 read+write misses (fields 5-7).
  core_file=$(grep -H '^summary:' "$out"/cg.* | sort -t' ' -k2 -n | tail -1 | cut -d: -f1)
  read -r core misses < <(grep -h '^summary:' "$core_file" | awk '{print $2, ($5 == "" ? 0 : $5), $6 + $7}')
  total=$(grep -h '^summary:' "$out"/cg.* | awk '{s += $2} END {print s}')
  sync_thread=0
  local f
  f=$(grep -l 'ratelimit_sync::spawn::{{closure}}' "$out"/cg.* 2>/dev/null | head -1 || true)
  [ -z "$f" ] || sync_thread=$(grep -h '^summary:' "$f" | awk '{print $2}')
  echo "$core $total $sync_thread $syncs $misses $core_file"
}

# The code a request runs (CALLGRIND_CODE=1), from the core thread's files of the two runs:
# every instruction whose count grew by at least half the added requests.
code_per_request() {
  python3 - "$@" <<'PY'
import bisect, collections, re, subprocess, sys
f1, f2, n, binary = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def self_cost(path):
    # Self cost by instruction address; the cost line after `calls=` is the call's, skipped.
    cost, addr, skip = collections.Counter(), 0, False
    for line in open(path):
        if line.startswith("calls="):
            skip = True
            continue
        if not line[:1].isdigit() and line[:1] not in "+-*":
            continue
        p = line.split()
        if p[0] != "*":
            addr = int(p[0], 16) if p[0].startswith("0x") else addr + int(p[0], 0)
        if skip:
            skip = False
        elif len(p) >= 3:
            cost[addr] += int(p[2])
    return cost
c1, c2 = self_cost(f1), self_cost(f2)
hot = [a for a, c in c2.items() if c - c1.get(a, 0) >= n / 2]
dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", binary], capture_output=True, text=True, check=True).stdout
starts = sorted(int(m.group(1), 16) for m in re.finditer(r"^\s+([0-9a-f]+):\t", dump, re.M))
def length(a):
    i = bisect.bisect_left(starts, a)
    return starts[i + 1] - a if i + 1 < len(starts) and starts[i] == a else 0
# Where valgrind put the binary: 0 unless it is position-independent (then 0x108000 on amd64).
base = max((0, 0x108000), key=lambda b: sum(1 for a in hot if length(a - b)))
size = sum(length(a - base) for a in hot)
inside = [a for a in hot if length(a - base)]
lines = {a // 64 for a in hot} | {(a + length(a - base) - 1) // 64 for a in inside}
print(f"{size / 1024:.1f} KB of the binary's code in {len(inside)} instructions (at best {size / 64:.0f} lines), "
      f"{len(lines)} cache lines touched with the libraries'")
PY
}

if [ -z "$stores" ]; then
  IFS=, read -r -a modes <<<"${CALLGRIND_ACCESS_LOG:-off}"
  for bin in "${bins[@]}"; do
    for mode in "${modes[@]}"; do
      for w in $workloads; do
        stream=0; counts=(16)
        [ "$w" = W2 ] && stream=1 && counts=("${token_counts[@]}")
        split=()
        base="$bin $w"
        [ "$delay" = 0 ] || base+=" at ${delay} ms/token"
        [ "$mode" = off ] || base+=" access_log=$mode"
        for tokens in "${counts[@]}"; do
          read -r a at _ _ ai ad af < <(measure "$bin" "$n1" "$stream" "" "$mode" "$tokens")
          read -r b bt _ _ bi bd bf < <(measure "$bin" "$n2" "$stream" "" "$mode" "$tokens")
          label="$base"
          [ "$stream" = 1 ] && label+=", $tokens tokens"
          extra=""
          [ "$cache" = 1 ] && extra="; core L1 misses/request: instructions $(( (bi - ai) / (n2 - n1) )), data $(( (bd - ad) / (n2 - n1) ))"
          [ "$code" = 1 ] && extra+="; code a request runs: $(code_per_request "$af" "$bf" "$(( n2 - n1 ))" "$bin")"
          echo "$label: $(( (b - a) / (n2 - n1) )) instructions/request (core thread; $a @ $n1, $b @ $n2), $(( (bt - at) / (n2 - n1) )) all threads$extra"
          split+=("$tokens $(( b - a )) $(( (bi - ai) ))")
        done
        if [ ${#split[@]} = 2 ]; then
          # Per token: the slope between the two counts; per request: what is left at the first.
          python3 - "$base" "$(( n2 - n1 ))" "$cache" "${split[@]}" <<'PY'
import sys
label, n, cache = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
(t1, i1, m1), (t2, i2, m2) = (map(int, a.split()) for a in sys.argv[4:6])
def split(x1, x2):
    per_token = (x2 - x1) / n / (t2 - t1)
    return per_token, x1 / n - t1 * per_token
it, ir = split(i1, i2)
line = f"{label}, split: {it:.0f} instructions per token, {ir:.0f} per request apart from its tokens"
if cache:
    mt, mr = split(m1, m2)
    line += f"; L1 instruction misses {mt:.1f} per token, {mr:.0f} per request apart from its tokens"
print(line)
PY
        fi
      done
    done
  done
  exit 0
fi

IFS=, read -r -a store_list <<<"$stores"
results="$work/results"
for w in $workloads; do
  stream=0; [ "$w" = W2 ] && stream=1
  # Interleaved: every binary and store once per round, so a drift hits all of them alike.
  for round in $(seq 1 "$repeat"); do
    for bin in "${bins[@]}"; do
      for store in "${store_list[@]}"; do
        read -r ca ta sa ya _ < <(measure "$bin" "$n1" "$stream" "$store")
        read -r cb tb sb yb _ < <(measure "$bin" "$n2" "$stream" "$store")
        core=$(( (cb - ca) / (n2 - n1) ))
        whole=$(( (tb - ta) / (n2 - n1) ))
        line="$bin $w store=$store round $round: $core instructions/request (core thread; $ca @ $n1, $cb @ $n2)"
        line+=", $whole whole process"
        if [ "$store" = redis ]; then
          line+=", of which sync thread $(( (sb - sa) / (n2 - n1) )) ($sa in $ya syncs @ $n1, $sb in $yb syncs @ $n2"
          [ "$yb" -gt "$ya" ] && line+="; $(( (sb - sa) / (yb - ya) )) per sync"
          line+=")"
        fi
        echo "$line"
        echo "$bin $w $store $core $whole" >>"$results"
      done
    done
  done
done
if [ "$repeat" -gt 1 ]; then
  python3 - "$results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    bin, w, store, core, whole = line.split()
    rows.setdefault((bin, w, store), []).append((int(core), int(whole)))
for (bin, w, store), v in rows.items():
    core = [c for c, _ in v]
    whole = [t for _, t in v]
    print(f"{bin} {w} store={store}: median {statistics.median(core):.0f} instructions/request "
          f"(core thread; {min(core)}..{max(core)} over {len(v)} rounds), "
          f"{statistics.median(whole):.0f} whole process ({min(whole)}..{max(whole)})")
PY
fi
