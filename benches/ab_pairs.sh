#!/usr/bin/env bash
# Interleaved before/after pairs of the load benchmark, for differences smaller than the noise
# of one run on a shared machine: A then B, then B then A, ... (ABBA order, so a drift of the
# machine hits both alike), each run printing its rows with the 1-minute load average before it.
# Report the medians, not single pairs (BENCHMARKS.md "How noisy this is").
#
#   benches/ab_pairs.sh PAIRS 'VAR=value ...' 'VAR=value ...'
#
# Each side is a list of environment assignments for `cargo bench --bench load`, e.g.
#   io_uring set-up flags (same binary):
#     benches/ab_pairs.sh 3 'LLMPROXY_URING_FLAGS=default' 'LLMPROXY_URING_FLAGS=none'
#     (with LOAD_WORKLOADS=w1,w2 LOAD_TARGETS=llmproxy,llmproxy-epoll in the environment)
#   shared limits:
#     benches/ab_pairs.sh 5 'LOAD_TARGETS=llmproxy-keys' 'LOAD_TARGETS=llmproxy-redis'
#     (with LOAD_WORKLOADS=w1)
# Defaults: LOAD_SECS=8, no startup runs, no nginx/HAProxy unless the environment says so.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 3 ] || { sed -n '2,17p' "$0" >&2; exit 2; }
pairs=$1
sides=("$2" "$3")
export LOAD_SECS=${LOAD_SECS:-8} LOAD_STARTUP_RUNS=${LOAD_STARTUP_RUNS:-0}
export LOAD_NGINX=${LOAD_NGINX:-off} LOAD_HAPROXY=${LOAD_HAPROXY:-off}
for i in $(seq 1 "$pairs"); do
  order=(0 1)
  [ $((i % 2)) = 0 ] && order=(1 0)
  for s in "${order[@]}"; do
    echo "=== pair $i: ${sides[$s]} (load $(cut -d' ' -f1 /proc/loadavg))"
    # shellcheck disable=SC2086
    env ${sides[$s]} cargo bench --locked --bench load 2>/dev/null | grep -E '^\| [a-z]|^### W'
  done
done
