#!/usr/bin/env python3
"""Checks on rendered Kubernetes manifests that kubernetes-validate cannot make, for validate.sh.

  manifests.py split RENDERED CORE CUSTOM   write built-in kinds to CORE, custom resources to CUSTOM
  manifests.py custom FILE                  check custom resources: ServiceMonitor and
                                            PrometheusRule, against the fields of the Prometheus
                                            Operator's CRDs that we use
  manifests.py config LLMPROXY FILE...      run `LLMPROXY check` on every ConfigMap's config.yaml,
                                            with every Secret's data of the same file as environment
                                            (the chart hands a Secret to the proxy as env variables);
                                            a `tls:` block's files (a mounted Secret, absent here)
                                            are replaced by a throwaway pair made with openssl

Needs PyYAML and jsonschema (both come with checkov). Prints one line per object it checked.
"""

import os
import subprocess
import sys
import tempfile

import jsonschema
import yaml

CUSTOM_GROUPS = ("monitoring.coreos.com/",)

# Prometheus Operator's Duration type.
DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
}
# The Operator's RelabelConfig.
RELABEL = {
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "sourceLabels": {"type": "array", "items": {"type": "string"}},
            "separator": {"type": "string"},
            "targetLabel": {"type": "string"},
            "regex": {"type": "string"},
            "modulus": {"type": "integer"},
            "replacement": {"type": "string"},
            "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod",
                                "HashMod", "labelmap", "LabelMap", "labeldrop", "LabelDrop",
                                "labelkeep", "LabelKeep", "lowercase", "Lowercase", "uppercase",
                                "Uppercase", "keepequal", "KeepEqual", "dropequal", "DropEqual"]},
        },
    },
}
PROMETHEUS_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": DURATION,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": DURATION,
                                        "keep_firing_for": DURATION,
                                        "labels": STRING_MAP,
                                        "annotations": STRING_MAP,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": STRING_MAP, "matchExpressions": {"type": "array"}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                            "relabelings": RELABEL,
                            "metricRelabelings": RELABEL,
                        },
                    },
                },
            },
        },
    },
}


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def split(rendered, core, custom):
    docs = load(rendered)
    is_custom = lambda d: str(d.get("apiVersion", "")).startswith(CUSTOM_GROUPS)
    with open(core, "w") as f:
        yaml.safe_dump_all([d for d in docs if not is_custom(d)], f, sort_keys=False)
    with open(custom, "w") as f:
        yaml.safe_dump_all([d for d in docs if is_custom(d)], f, sort_keys=False)
    return 0


SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR, "PrometheusRule": PROMETHEUS_RULE}


def custom(path):
    failed = 0
    for doc in load(path):
        schema = SCHEMAS.get(doc.get("kind"))
        if schema is None:
            print(f"FAIL {path}: {name_of(doc)}: no schema for this custom resource")
            failed += 1
            continue
        errors = list(jsonschema.Draft7Validator(schema).iter_errors(doc))
        for e in errors:
            print(f"FAIL {path}: {name_of(doc)}: {'.'.join(map(str, e.path)) or '.'}: {e.message}")
        failed += len(errors)
        if not errors:
            print(f"OK   {path}: {name_of(doc)} matches the {doc['kind']} fields we use")
    return 1 if failed else 0


def with_test_tls(text, tmp):
    """The config text with its `tls:` files (if any) pointing at a fresh self-signed pair in
    `tmp` (also the client CA): the rest of the config is what gets checked."""
    cfg = yaml.safe_load(text)
    tls = cfg.get("tls") if isinstance(cfg, dict) else None
    if not isinstance(tls, dict):
        return text
    crt, key = os.path.join(tmp, "tls.crt"), os.path.join(tmp, "tls.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=llmproxy",
                    "-days", "2", "-keyout", key, "-out", crt], check=True, capture_output=True)
    for k in ("cert_file", "client_ca_file"):
        if k in tls:
            tls[k] = crt
    if "key_file" in tls:
        tls["key_file"] = key
    return yaml.safe_dump(cfg)


def config(llmproxy, paths):
    failed = 0
    for path in paths:
        docs = load(path)
        env = dict(os.environ)
        for d in docs:
            if d.get("kind") == "Secret":
                env.update({k: str(v) for k, v in (d.get("stringData") or {}).items()})
        for d in docs:
            if d.get("kind") != "ConfigMap" or "config.yaml" not in (d.get("data") or {}):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                cfg_path = os.path.join(tmp, "config.yaml")
                with open(cfg_path, "w") as f:
                    f.write(with_test_tls(d["data"]["config.yaml"], tmp))
                r = subprocess.run([llmproxy, "check", "--config", cfg_path], env=env,
                                   capture_output=True, text=True)
            out = (r.stdout + r.stderr).strip().replace(cfg_path, "config.yaml")
            print(f"{'OK  ' if r.returncode == 0 else 'FAIL'} {path}: {name_of(d)}: llmproxy check: {out}")
            failed += r.returncode != 0
    return 1 if failed else 0


def main(argv):
    if len(argv) == 5 and argv[1] == "split":
        return split(*argv[2:])
    if len(argv) == 3 and argv[1] == "custom":
        return custom(argv[2])
    if len(argv) >= 4 and argv[1] == "config":
        return config(argv[2], argv[3:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
