#!/usr/bin/env bash
# Builds llmproxy and its container health probe on this machine, statically linked, into
# target/docker/ for `docker build --target host .` (no Rust base image needed).
# Needs only the Rust toolchain; the target triple is this machine's own. Honours CARGO_TARGET_DIR
# (the staged copies still go to target/docker/, inside the build context).
set -euo pipefail
cd "$(dirname "$0")/../.."

run() {
  echo "+ $*"
  "$@"
}

triple=$(rustc -vV | sed -n 's/^host: //p')
# With an explicit --target, RUSTFLAGS apply to the binary only, not to build scripts or proc-macros.
echo "+ RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked --target $triple"
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked --target "$triple"
run mkdir -p target/docker
run cp "${CARGO_TARGET_DIR:-target}/$triple/release/llmproxy" target/docker/llmproxy
run strip --strip-debug target/docker/llmproxy
run rustc --edition 2021 -C opt-level=s -C strip=symbols -C target-feature=+crt-static \
  --target "$triple" -o target/docker/llmproxy-healthcheck deployments/docker/healthcheck.rs
for bin in target/docker/llmproxy target/docker/llmproxy-healthcheck; do
  # A dynamically linked ELF names its loader in a PT_INTERP header; `scratch` has no loader.
  if readelf -l "$bin" | grep INTERP >/dev/null; then
    echo "$bin is dynamically linked; the image has no libc to run it" >&2
    exit 1
  fi
  echo "$bin: statically linked, $(du -h "$bin" | cut -f1)"
done
