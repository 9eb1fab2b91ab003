# syntax=docker/dockerfile:1
# llmproxy container image.
#
#   docker build -t llmproxy .                  # from source, in the `build` stage
#   deployments/docker/stage-binaries.sh        # or: build both binaries on this machine, then
#   docker build --target host -t llmproxy .    #     package them (no Rust image needed)
#
# Either way the binaries are statically linked (glibc's crt-static), and the image is `scratch` plus
# those binaries, a default config and a non-root user: no shell, libc or package manager to patch or
# exploit. io_uring inside containers: see deployments/README.md (seccomp profile, privileged, epoll).
# BuildKit and buildah build only the stages the chosen target needs: `--target host` never pulls
# the Rust image, and the default target never reads target/docker/.

ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
SHELL ["/bin/bash", "-eu", "-o", "pipefail", "-c"]
WORKDIR /src
COPY . .
# The target triple is explicit so RUSTFLAGS reach only the binary, not build scripts or proc-macros;
# it is the builder's own, so the same file builds amd64 and arm64 images.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    triple="$(rustc -vV | sed -n 's/^host: //p')"; \
    RUSTFLAGS='-C target-feature=+crt-static' \
      cargo build --release --locked --target "$triple"; \
    mkdir -p /out; \
    cp "target/$triple/release/llmproxy" /out/llmproxy; \
    strip --strip-debug /out/llmproxy; \
    rustc --edition 2021 -C opt-level=s -C strip=symbols -C target-feature=+crt-static \
      --target "$triple" -o /out/llmproxy-healthcheck deployments/docker/healthcheck.rs; \
    for bin in /out/*; do \
      if readelf -l "$bin" | grep INTERP >/dev/null; then echo "$bin is not static" >&2; exit 1; fi; \
    done

# What both variants share: everything but the binaries.
FROM scratch AS runtime
LABEL org.opencontainers.image.title="llmproxy" \
      org.opencontainers.image.description="Thread-per-core io_uring reverse proxy for self-hosted LLM inference servers" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY deployments/docker/rootfs/etc/ /etc/
COPY --chown=65532:65532 deployments/docker/rootfs/var/lib/llmproxy/ /var/lib/llmproxy/
COPY config/llmproxy.example.yaml /etc/llmproxy/config.yaml
USER 65532:65532
EXPOSE 8080
# SIGTERM starts the graceful drain (/health answers 503, in-flight streams finish within
# shutdown_grace): give the container at least that long (`docker stop -t 35`, compose
# stop_grace_period, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
# Exec form, no shell: the probe is a 1 MiB static binary (deployments/docker/healthcheck.rs) that
# exits 0 only on a 2xx from /health.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/llmproxy-healthcheck", "http://127.0.0.1:8080/ready"]
ENTRYPOINT ["/usr/local/bin/llmproxy"]
CMD ["--config", "/etc/llmproxy/config.yaml"]

# `--target host`: the binaries deployments/docker/stage-binaries.sh built on this machine.
FROM runtime AS host
COPY target/docker/llmproxy target/docker/llmproxy-healthcheck /usr/local/bin/

# The default target: the binaries built in the first stage.
FROM runtime
COPY --from=build /out/llmproxy /out/llmproxy-healthcheck /usr/local/bin/
