#!/usr/bin/env bash
# Builds llmproxy's container image and runs it for real, with podman and runc (no Docker engine).
#
# No base image can be pulled here, so the image is the Dockerfile's `host` target: both binaries
# are built on this machine, statically linked (deployments/docker/stage-binaries.sh), and
# packaged FROM scratch (`--target host --pull=never`). Then it checks:
#   - the image: non-root user 65532, STOPSIGNAL SIGTERM, EXPOSE 8080, the HEALTHCHECK command,
#     config at /etc/llmproxy/config.yaml, and nothing in it but our files;
#   - the container, on the host network against `llmproxy mock-backend` on a free loopback port,
#     once for each io_uring option of deployments/README.md:
#       default seccomp profile -> must run on epoll and log why;
#       --security-opt seccomp=deployments/seccomp/llmproxy-io_uring.json -> must run on io_uring;
#       --privileged -> must run on io_uring;
#     each time: the process runs as uid 65532 under the expected seccomp mode (a filter, or none
#     when privileged); GET /health is 200 with the backend up (configured by host name, which the
#     static binary resolves through the container's /etc/hosts); a streamed chat completion arrives
#     as SSE events token by token (stamped on arrival: the first and the last are as far apart as
#     the backend's token delays) and ends with [DONE]; the image's HEALTHCHECK probe passes; and
#     `podman stop` (SIGTERM) drains and exits 0.
# Installs podman, runc and curl with apt-get if missing (one `apt-get update` at most); works on a
# clean Debian 12 with the Rust toolchain, as root. Everything it makes (images, containers,
# processes) lives in its own podman storage and is removed at exit. Prints each command.
set -euo pipefail
cd "$(dirname "$0")/.."

run() {
  echo "+ $*"
  "$@"
}

need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  run apt-get update -qq
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

WORK=$(mktemp -d)
# A storage of our own: nothing of the machine's podman state is read or changed, and cleaning up
# is removing it.
PODMAN=(podman --root "$WORK/storage" --runroot "$WORK/run" --runtime runc)
IMAGE=localhost/llmproxy:test-image
MOCK_PID=""
CONTAINER=""
cleanup() {
  set +e
  [ -n "$CONTAINER" ] && "${PODMAN[@]}" rm -f -t 0 "$CONTAINER" >/dev/null 2>&1
  [ -n "$MOCK_PID" ] && kill "$MOCK_PID" 2>/dev/null && wait "$MOCK_PID" 2>/dev/null
  "${PODMAN[@]}" rm -a -f >/dev/null 2>&1
  "${PODMAN[@]}" rmi -a -f >/dev/null 2>&1
  # Anything podman left mounted under our storage, deepest first, so that rm can remove it.
  awk -v w="$WORK/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | xargs -r umount
  rm -rf "$WORK"
}
trap cleanup EXIT

fail() {
  echo "FAIL: $*" >&2
  exit 1
}
checked() { echo "CHECKED: $*"; }

# A loopback port nothing listens on (bash's /dev/tcp: no extra tools).
free_port() {
  local port
  for _ in $(seq 50); do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
  fail "no free loopback port found"
}

# --- build ------------------------------------------------------------------------------------
run deployments/docker/stage-binaries.sh
run "${PODMAN[@]}" build --pull=never --format docker --target host -t "$IMAGE" .

echo "+ ${PODMAN[*]} image inspect $IMAGE"
# A Go template over Config: one field a line, to compare with what the Dockerfile promises.
# shellcheck disable=SC2016 # $p is the template's variable, not the shell's
inspect=$("${PODMAN[@]}" image inspect "$IMAGE" --format \
  'user={{.Config.User}}
stopsignal={{.Config.StopSignal}}
ports={{range $p, $_ := .Config.ExposedPorts}}{{$p}} {{end}}
healthcheck={{json .Config.Healthcheck.Test}}
entrypoint={{json .Config.Entrypoint}}
cmd={{json .Config.Cmd}}')
echo "$inspect"
expect_line() {
  grep -qxF "$1" <<<"$inspect" || fail "image config: expected '$1'"
}
expect_line "user=65532:65532"
expect_line "stopsignal=SIGTERM"
expect_line "ports=8080/tcp "
expect_line 'healthcheck=["CMD","/usr/local/bin/llmproxy-healthcheck","http://127.0.0.1:8080/ready"]'
expect_line 'entrypoint=["/usr/local/bin/llmproxy"]'
expect_line 'cmd=["--config","/etc/llmproxy/config.yaml"]'
checked "image config: user 65532:65532, STOPSIGNAL SIGTERM, EXPOSE 8080, HEALTHCHECK, entrypoint and cmd"

echo "+ list the image's files"
files=$("${PODMAN[@]}" image mount "$IMAGE")
listing=$(cd "$files" && find . -type f | sort)
"${PODMAN[@]}" image unmount "$IMAGE" >/dev/null
echo "$listing"
expected_files="./etc/group
./etc/llmproxy/config.yaml
./etc/nsswitch.conf
./etc/passwd
./usr/local/bin/llmproxy
./usr/local/bin/llmproxy-healthcheck
./var/lib/llmproxy/README"
[ "$listing" = "$expected_files" ] || fail "the image holds other files than expected"
checked "image contents: the two static binaries, the default config and user files, nothing else"
size=$("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Size}}')
echo "image size: $((size / 1024 / 1024)) MiB"

# --- run --------------------------------------------------------------------------------------
MOCK_PORT=$(free_port)
echo "+ target/docker/llmproxy mock-backend --port $MOCK_PORT --ttft-ms 100 --token-delay-ms 50 &"
target/docker/llmproxy mock-backend --port "$MOCK_PORT" --ttft-ms 100 --token-delay-ms 50 \
  >"$WORK/mock.log" 2>&1 &
MOCK_PID=$!

# $1 name, $2 expected driver (io_uring|epoll), $3 expected seccomp mode of the process (2: a
# filter, 0: none), rest: extra `podman run` options.
check_container() {
  local name=$1 driver=$2 seccomp=$3
  shift 3
  local port
  port=$(free_port)
  # The backend by name: the static glibc in a `scratch` image must resolve it (/etc/hosts here).
  cat >"$WORK/config.yaml" <<EOF
listen: "127.0.0.1:$port"
backends:
  - url: "http://mock-backend.test:$MOCK_PORT"
health_check:
  interval: 1s
EOF
  chmod 0644 "$WORK/config.yaml"
  echo "=== $name: expect the $driver driver"
  CONTAINER=llmproxy-test-$name
  # --health-cmd: the image's probe, aimed at this test's port (the image's default is 8080);
  # --health-interval disable: no systemd timer, the check below runs it by hand.
  run "${PODMAN[@]}" run -d --name "$CONTAINER" --network host \
    --ulimit nofile=20000:20000 --ulimit nproc=4096:4096 \
    -v "$WORK/config.yaml:/etc/llmproxy/config.yaml:ro" --add-host mock-backend.test:127.0.0.1 \
    --health-cmd "[\"/usr/local/bin/llmproxy-healthcheck\",\"http://127.0.0.1:$port/ready\"]" \
    --health-interval disable \
    "$@" "$IMAGE"

  # Until the proxy answers 200 with the backend up (its first probe may still be on the way).
  local health=""
  for _ in $(seq 50); do
    if health=$(curl -fsS "http://127.0.0.1:$port/health" 2>/dev/null) &&
      grep -q '"status":"ok"' <<<"$health" && grep -q '"up":true' <<<"$health"; then
      break
    fi
    health=""
    sleep 0.2
  done
  [ -n "$health" ] || {
    "${PODMAN[@]}" logs "$CONTAINER" >&2
    fail "$name: /health never answered 200 with the backend up"
  }
  echo "GET /health -> $health"
  checked "$name: GET /health is 200 with the mock backend up (resolved by name in the container)"

  local pid uid
  pid=$("${PODMAN[@]}" inspect "$CONTAINER" --format '{{.State.Pid}}')
  uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
  [ "$uid" = 65532 ] || fail "$name: the proxy runs as uid $uid"
  checked "$name: the proxy process runs as uid 65532"
  local mode
  mode=$(awk '/^Seccomp:/ {print $2}' "/proc/$pid/status")
  [ "$mode" = "$seccomp" ] || fail "$name: seccomp mode $mode, expected $seccomp"
  checked "$name: seccomp mode $mode ($([ "$mode" = 2 ] && echo "a filter is active" || echo "no filter"))"

  local logs
  logs=$("${PODMAN[@]}" logs "$CONTAINER" 2>&1)
  grep -q "listening on 127.0.0.1:$port (.*$driver driver)" <<<"$logs" || {
    echo "$logs" >&2
    fail "$name: not running on $driver"
  }
  if [ "$driver" = epoll ]; then
    grep -q "io_uring is unavailable" <<<"$logs" || fail "$name: the epoll fallback is not logged"
  fi
  checked "$name: runs on the $driver driver ($(grep -o 'listening on [^"]*' <<<"$logs"))"

  # 8 tokens, 50 ms apart: each SSE line is stamped when it arrives, so a buffered stream (all
  # lines at once) fails even if the response head came early.
  echo "+ curl -N POST /v1/chat/completions (stream, 8 tokens), each line stamped on arrival"
  curl -sS -N -w '\nHTTP_STATUS %{http_code}\n' "http://127.0.0.1:$port/v1/chat/completions" \
    -H 'content-type: application/json' \
    -d '{"model":"mock-model","stream":true,"max_tokens":8,"messages":[{"role":"user","content":"Hello"}]}' |
    while IFS= read -r line; do
      [ -n "$line" ] && printf '%s %s\n' "$(date +%s.%N)" "$line"
    done >"$WORK/stream.txt"
  head -n 2 "$WORK/stream.txt"
  echo "..."
  tail -n 2 "$WORK/stream.txt"
  grep -q ' HTTP_STATUS 200$' "$WORK/stream.txt" || fail "$name: chat completion status is not 200"
  local events first done_at
  events=$(grep -c ' data: {' "$WORK/stream.txt" || true)
  [ "$events" -ge 8 ] || fail "$name: $events SSE events, expected at least 8"
  first=$(awk '$2 == "data:" && $3 ~ /^\{/ {print $1; exit}' "$WORK/stream.txt")
  done_at=$(awk '$2 == "data:" && $3 == "[DONE]" {print $1; exit}' "$WORK/stream.txt")
  [ -n "$done_at" ] || fail "$name: the stream did not end with data: [DONE]"
  awk -v f="$first" -v d="$done_at" 'BEGIN { exit !(d - f >= 0.25) }' ||
    fail "$name: first event and [DONE] arrived together: the stream was buffered"
  checked "$name: streamed chat completion through the proxy: $events SSE events then [DONE], $(awk -v f="$first" -v d="$done_at" 'BEGIN { printf "%.0f", (d - f) * 1000 }') ms apart (tokens 50 ms apart)"

  run "${PODMAN[@]}" healthcheck run "$CONTAINER"
  checked "$name: the image's HEALTHCHECK probe passes"

  run "${PODMAN[@]}" stop -t 35 "$CONTAINER"
  local code
  code=$("${PODMAN[@]}" inspect "$CONTAINER" --format '{{.State.ExitCode}}')
  logs=$("${PODMAN[@]}" logs "$CONTAINER" 2>&1)
  [ "$code" = 0 ] || fail "$name: exit code $code after SIGTERM"
  grep -q "received SIGTERM; draining" <<<"$logs" || fail "$name: SIGTERM did not start a drain"
  checked "$name: podman stop (SIGTERM) drains and exits 0"
  run "${PODMAN[@]}" rm "$CONTAINER"
  CONTAINER=""
}

check_container default-seccomp epoll 2
check_container io_uring-seccomp io_uring 2 \
  --security-opt seccomp=deployments/seccomp/llmproxy-io_uring.json
check_container privileged io_uring 0 --privileged

echo "deployments/test-image.sh: all checks passed"
