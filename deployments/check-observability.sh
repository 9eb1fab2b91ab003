#!/usr/bin/env bash
# Checks llmproxy's observability files on a clean Debian 12 machine (root), installing what it needs
# (promtool from Debian's `prometheus` package, python3 with PyYAML):
#   - deployments/prometheus/alerts.yml: `promtool check rules` and its unit tests (alerts_test.yml);
#   - deployments/grafana: the dashboard is valid JSON, every panel and variable has a Prometheus
#     datasource, every query parses as PromQL (through `promtool check rules`) and names only
#     metrics from llmproxy's metrics contract (METRICS below, DESIGN.md §5), with labels that exist;
#     the provisioning files point at http://prometheus:9090 and /var/lib/grafana/dashboards;
#   - the alert rules name only contract metrics too;
#   - deployments/prometheus/prometheus.yml, when it exists: `promtool check config --syntax-only`.
# With `--metrics FILE` (a scrape of a running llmproxy's /metrics) it also runs `promtool check
# metrics` on it and checks that every metric the dashboard and the rules name is in it.
# Prints every command it runs; stops at the first failure.
set -euo pipefail

METRICS_FILE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --metrics) METRICS_FILE=$(realpath "${2:?--metrics needs a file}"); shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."

run() {
  echo "+ $*"
  "$@"
}

APT_UPDATED=0
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "missing $*: install it (apt-get install $*) or run as root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Package lists may be missing (fresh image) or stale: update once when needed.
  if [ "$APT_UPDATED" = 0 ] && ! apt-cache show "$@" >/dev/null 2>&1; then
    run apt-get -o DPkg::Lock::Timeout=300 update -qq
    APT_UPDATED=1
  fi
  if ! run apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "$@"; then
    [ "$APT_UPDATED" = 0 ] || exit 1
    run apt-get -o DPkg::Lock::Timeout=300 update -qq
    APT_UPDATED=1
    run apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "$@"
  fi
}

if ! command -v promtool >/dev/null 2>&1; then
  apt_install prometheus
fi
run promtool --version

# A python3 that has PyYAML: the one on PATH, else Debian's (installed if needed).
PY=""
for p in python3 /usr/bin/python3; do
  if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import yaml' 2>/dev/null; then PY="$p"; break; fi
done
if [ -z "$PY" ]; then
  apt_install python3 python3-yaml
  PY=/usr/bin/python3
fi

PROM=deployments/prometheus
GRAFANA=deployments/grafana
DASHBOARD=$GRAFANA/dashboards/llmproxy.json

# --- alert rules -----------------------------------------------------------------------------------
run promtool check rules "$PROM/alerts.yml"
run promtool test rules "$PROM/alerts_test.yml"

# --- dashboard and provisioning ---------------------------------------------------------------------
run "$PY" -m json.tool "$DASHBOARD" /dev/null

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "+ $PY - (metric names, labels and datasources of $DASHBOARD and $PROM/alerts.yml${METRICS_FILE:+, against $METRICS_FILE})"
"$PY" - "$DASHBOARD" "$PROM/alerts.yml" "$GRAFANA/provisioning" "$TMP/dashboard-queries.rules.yml" \
  "$METRICS_FILE" <<'PY'
import json
import re
import sys

import yaml

dashboard_path, rules_path, provisioning, queries_out, metrics_file = sys.argv[1:6]

# llmproxy's metrics contract (DESIGN.md §5 and issue 4): name -> (type, labels).
METRICS = {
    "llmproxy_requests_total": ("counter", {"status", "backend", "model"}),
    "llmproxy_latency_ms": ("histogram", {"backend", "model"}),
    "llmproxy_request_duration_seconds": ("histogram", {"backend", "model"}),
    "llmproxy_time_to_first_token_seconds": ("histogram", {"backend", "model"}),
    "llmproxy_inter_token_latency_seconds": ("histogram", {"backend", "model"}),
    "llmproxy_tokens_total": ("counter", {"type", "model"}),
    "llmproxy_backend_up": ("gauge", {"backend"}),
    "llmproxy_backend_inflight": ("gauge", {"backend"}),
    "llmproxy_upstream_retries_total": ("counter", {"backend"}),
    "llmproxy_upstream_errors_total": ("counter", {"backend", "kind"}),
    "llmproxy_connections_active": ("gauge", set()),
    "llmproxy_requests_inflight": ("gauge", set()),
    "llmproxy_workers": ("gauge", set()),
    "llmproxy_usage_events_total": ("counter", {"outcome"}),
    "llmproxy_usage_spool_bytes": ("gauge", set()),
    "llmproxy_usage_delivery_seconds": ("histogram", set()),
    "llmproxy_build_info": ("gauge", {"version", "driver"}),
    "llmproxy_discovery_updates_total": ("counter", {"result"}),
    "llmproxy_backend_breaker_state": ("gauge", {"backend"}),
    "llmproxy_breaker_transitions_total": ("counter", {"backend", "to"}),
    "llmproxy_routing_decisions_total": ("counter", {"strategy", "reason"}),
    "llmproxy_prefix_cache_matched_share": ("histogram", set()),
    "llmproxy_backend_engine_metrics_up": ("gauge", {"backend"}),
    "llmproxy_backend_engine_waiting": ("gauge", {"backend"}),
    "llmproxy_backend_engine_running": ("gauge", {"backend"}),
    "llmproxy_backend_engine_kv_cache_usage_ratio": ("gauge", {"backend"}),
    "llmproxy_tls_handshakes_total": ("counter", {"side", "result"}),
    "llmproxy_tls_certificate_expiry_timestamp_seconds": ("gauge", {"certificate"}),
    "llmproxy_ratelimit_store_up": ("gauge", set()),
    "llmproxy_ratelimit_sync_seconds": ("histogram", set()),
    "llmproxy_ratelimit_sync_errors_total": ("counter", set()),
    # Not exported by llmproxy: Prometheus records it for every scrape target.
    "up": ("gauge", set()),
}
# Series that exist only with some configuration, so a scrape of the demo (plaintext, no client
# certificates) cannot show them; the contract above still checks their names and labels.
CONDITIONAL = {
    "llmproxy_tls_certificate_expiry_timestamp_seconds",  # with tls: on listen or backends[].tls
    # with ratelimit.store: redis
    "llmproxy_ratelimit_store_up",
    "llmproxy_ratelimit_sync_seconds",
    "llmproxy_ratelimit_sync_errors_total",
}
TARGET_LABELS = {"job", "instance", "__name__"}  # added by Prometheus at scrape time

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "offset", "bool", "inf", "nan", "atan2"}
IDENT = r"[A-Za-z_:][A-Za-z0-9_:]*"
STRING = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`'

errors = []


def resolve(name):
    """Contract metric a series name belongs to (histogram series carry a suffix), or None."""
    if name in METRICS:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and METRICS.get(base, ("",))[0] == "histogram":
            return base
    return None


def check_expr(expr, where):
    """Returns the series names `expr` selects; records unknown metrics and labels."""
    names = set()
    # Selectors with matchers: check the label names against the metric's labels.
    for m in re.finditer(r"(?<![\w.:])(" + IDENT + r")\s*\{([^}]*)\}", re.sub(r"\$\{?\w+\}?", "X", expr)):
        name, body = m.group(1), m.group(2)
        if name in PROMQL_WORDS:
            continue
        base = resolve(name)
        if base is None:
            continue  # reported below
        allowed = METRICS[base][1] | TARGET_LABELS
        if name.endswith("_bucket"):
            allowed = allowed | {"le"}
        for lm in re.finditer(r"(" + IDENT + r")\s*(?:=~|!~|!=|=)\s*(?:" + STRING + ")", body):
            if lm.group(1) not in allowed:
                errors.append(f"{where}: label {lm.group(1)!r} is not a label of {name}: {expr}")
    stripped = re.sub(STRING, '""', expr)
    stripped = re.sub(r"\{[^}]*\}", " ", stripped)
    stripped = re.sub(r"\[[^\]]*\]", " ", stripped)
    stripped = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", stripped)
    stripped = re.sub(r"\$\{?\w+\}?", " ", stripped)
    for m in re.finditer(r"(?<![\w.:$])(" + IDENT + r")(?![\w:]|\s*\()", stripped):
        word = m.group(1)
        if word.lower() in PROMQL_WORDS:
            continue
        if resolve(word) is None:
            errors.append(f"{where}: {word!r} is not in llmproxy's metrics contract: {expr}")
        names.add(word)
    if not names:
        errors.append(f"{where}: no metric found in {expr!r}")
    return names


def to_promql(expr):
    """Grafana variables replaced so that promtool can parse the query."""
    expr = re.sub(r"\$\{?(__rate_interval|__interval|__range)\}?", "5m", expr)
    return re.sub(r"\$\{?\w+(?::\w+)?\}?", ".*", expr)


def is_prometheus_ds(ds):
    return isinstance(ds, dict) and ds.get("type") == "prometheus" and bool(ds.get("uid"))


used = set()

# --- the dashboard
with open(dashboard_path) as f:
    dash = json.load(f)
for key in ("title", "uid", "panels", "templating"):
    if key not in dash:
        errors.append(f"dashboard: missing {key!r}")
variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
ds_var = variables.get("DS_PROMETHEUS")
if not ds_var or ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
    errors.append("dashboard: needs a datasource variable DS_PROMETHEUS of type prometheus")

queries = []  # (where, promql)
for name, var in variables.items():
    if var.get("type") != "query":
        continue
    where = f"variable {name}"
    if not is_prometheus_ds(var.get("datasource")):
        errors.append(f"{where}: no Prometheus datasource")
    q = var.get("query")
    q = q.get("query", "") if isinstance(q, dict) else (q or "")
    m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", q)
    if not m:
        errors.append(f"{where}: expected label_values(<selector>, <label>), got {q!r}")
        continue
    used |= check_expr(m.group(1), where)
    queries.append((f"var_{name}", f"count by ({m.group(2)}) ({m.group(1)})"))


def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))


ids = set()
query_panels = 0
for p in walk(dash.get("panels", [])):
    where = f"panel {p.get('id')} {p.get('title')!r}"
    if p.get("id") in ids:
        errors.append(f"{where}: duplicate panel id")
    ids.add(p.get("id"))
    if "gridPos" not in p:
        errors.append(f"{where}: no gridPos")
    if p.get("type") == "row":
        continue
    query_panels += 1
    if not is_prometheus_ds(p.get("datasource")):
        errors.append(f"{where}: no Prometheus datasource")
    targets = p.get("targets") or []
    if not targets:
        errors.append(f"{where}: no queries")
    for t in targets:
        twhere = f"{where} query {t.get('refId')}"
        if "datasource" in t and not is_prometheus_ds(t["datasource"]):
            errors.append(f"{twhere}: not a Prometheus datasource")
        expr = t.get("expr", "")
        if not expr.strip():
            errors.append(f"{twhere}: empty expr")
            continue
        used |= check_expr(expr, twhere)
        queries.append((f"panel_{p.get('id')}_{t.get('refId')}", expr))

# Every query as a recording rule named after its panel (dashboard:panel_<id>_<refId>) or variable
# (dashboard:var_<name>), so that `promtool check rules` parses it.
rules = [{"record": f"dashboard:{re.sub(r'[^A-Za-z0-9_]', '_', k)}", "expr": to_promql(q)}
         for k, q in queries]
with open(queries_out, "w") as f:
    yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, f, sort_keys=False)

# --- the alert rules
with open(rules_path) as f:
    groups = yaml.safe_load(f)["groups"]
alerts = 0
for g in groups:
    for r in g["rules"]:
        where = f"rule {r.get('alert') or r.get('record')}"
        used |= check_expr(r["expr"], where)
        if "alert" in r:
            alerts += 1
            if "for" not in r:
                errors.append(f"{where}: no for:")
            if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                errors.append(f"{where}: severity label must be critical, warning or info")
            for a in ("summary", "description", "runbook"):
                if not r.get("annotations", {}).get(a):
                    errors.append(f"{where}: no {a} annotation")

# --- provisioning
with open(f"{provisioning}/datasources/prometheus.yml") as f:
    ds = yaml.safe_load(f)["datasources"]
if not any(d.get("type") == "prometheus" and d.get("url") == "http://prometheus:9090" for d in ds):
    errors.append("provisioning/datasources: no prometheus datasource at http://prometheus:9090")
with open(f"{provisioning}/dashboards/llmproxy.yml") as f:
    providers = yaml.safe_load(f)["providers"]
if not any(p.get("type") == "file" and p.get("options", {}).get("path") == "/var/lib/grafana/dashboards"
           for p in providers):
    errors.append("provisioning/dashboards: no file provider at /var/lib/grafana/dashboards")

# --- optionally, a real scrape
if metrics_file:
    exported = set()
    with open(metrics_file) as f:
        for line in f:
            m = re.match(r"#\s*TYPE\s+(" + IDENT + r")\s", line)
            if m:
                exported.add(m.group(1))
    for base in sorted({resolve(n) for n in used} - {"up"} - CONDITIONAL - exported):
        errors.append(f"{base} is used by the dashboard or the rules but is not in {metrics_file}")

for e in errors:
    print("ERROR:", e, file=sys.stderr)
if errors:
    sys.exit(1)
print(f"OK: {query_panels} panels and {len(queries)} queries, {alerts} alerts; "
      f"{len(used)} series names used, all in the contract")
PY

run promtool check rules "$TMP/dashboard-queries.rules.yml"

if [ -n "$METRICS_FILE" ]; then
  # Lint warnings (exit 3) are allowed for the seed-compatible llmproxy_latency_ms only.
  echo "+ promtool check metrics < $METRICS_FILE"
  set +e
  lint=$(promtool check metrics <"$METRICS_FILE" 2>&1)
  rc=$?
  set -e
  [ -z "$lint" ] || echo "$lint"
  if [ "$rc" != 0 ] && [ "$rc" != 3 ]; then exit "$rc"; fi
  if echo "$lint" | grep -v '^llmproxy_latency_ms ' | grep -q .; then
    echo "promtool check metrics: problems beyond llmproxy_latency_ms" >&2
    exit 1
  fi
fi

# --- Prometheus config (owned by the deployment work; it may not exist yet) -------------------------
if [ -f "$PROM/prometheus.yml" ]; then
  # Syntax only: the files it references are container paths; the rules are checked above.
  run promtool check config --syntax-only "$PROM/prometheus.yml"
else
  echo "skip: $PROM/prometheus.yml does not exist yet"
fi

echo "observability checks passed"
