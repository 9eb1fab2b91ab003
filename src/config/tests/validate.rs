//! Each section's rules, and the path every error names.

use super::*;

#[test]
fn discovery_settings() {
    let c = ok("backends:\n  - url: http://vllm.llm.svc:8000\n    discover: dns\n    name: vllm\ndiscovery: { interval: 1s, stale_after: 10s, resolver: \"127.0.0.1:5353\" }\n");
    assert_eq!(c.backends[0].discover, Some(DiscoverKind::Dns));
    assert_eq!(c.backends[0].name.as_deref(), Some("vllm"));
    assert_eq!(c.discovery.interval, Duration::from_secs(1));
    assert_eq!(
        c.discovery.resolver,
        Some("127.0.0.1:5353".parse().unwrap())
    );
    let c = ok(&format!("{MINIMAL}discovery: {{ resolver: 10.96.0.10 }}\n"));
    assert_eq!(c.discovery.resolver, Some("10.96.0.10:53".parse().unwrap()));
    assert_error(
        &format!("{MINIMAL}discovery: {{ resolver: dns.local }}\n"),
        "discovery.resolver",
        "IP[:PORT]",
    );
    assert_error(
        &format!("{MINIMAL}discovery: {{ interval: 0s }}\n"),
        "discovery.interval",
        "greater than zero",
    );
    assert_error(
        "backends: [{ url: http://a:1, discover: srv }]\n",
        "backends[0].discover",
        "dns",
    );
    assert_error(
        "backends: [{ url: http://a:1, name: \" \" }]\n",
        "backends[0].name",
        "non-empty",
    );
    assert_error(
        "backends: [{ url: http://a:1, name: x }, { url: http://b:1, name: x }]\n",
        "backends[1].name",
        "duplicate of backends[0].name",
    );
}

#[test]
fn breaker_defaults_and_validation() {
    let c = ok(MINIMAL);
    assert!(c.breaker.enabled);
    assert_eq!(c.breaker.consecutive_failures, 5);
    assert_eq!(c.breaker.cooldown, Duration::from_secs(10));
    assert_eq!(c.breaker.max_cooldown, Duration::from_secs(300));
    let c = ok(&with_backend(
        "breaker: { enabled: false, consecutive_failures: 3, cooldown: 500ms, max_cooldown: 2s }\n",
    ));
    assert!(!c.breaker.enabled);
    assert_eq!(c.breaker.consecutive_failures, 3);
    assert_eq!(c.breaker.cooldown, Duration::from_millis(500));
    assert_eq!(c.breaker.max_cooldown, Duration::from_secs(2));
    let y = with_backend("breaker: { consecutive_failures: 0 }\n");
    assert_error(&y, "breaker.consecutive_failures", "at least 1");
    assert_error(
        &with_backend("breaker: { cooldown: 0s }\n"),
        "breaker.cooldown",
        "",
    );
    let y = with_backend("breaker: { cooldown: 1m, max_cooldown: 10s }\n");
    assert_error(&y, "breaker.max_cooldown", "shorter");
    let y = with_backend("breaker: { threshold: 3 }\n");
    assert!(errors(&y).iter().any(|e| e.contains("threshold")));
}

#[test]
fn auth_keys_are_kept_as_digests() {
    let hex = "a".repeat(64);
    let c = ok(&with_backend(&format!(
        r#"
auth:
  keys:
    - {{ name: team-a, key: "sk-team-a-0123456789", models: [m1], rpm: 60, tpm: 1000 }}
    - {{ name: team-b, key_sha256: "{hex}" }}
  keys_file: /etc/llmproxy/keys.yaml
  keys_file_poll: 1s
  forward_client_key: true
"#
    )));
    let a = &c.auth;
    assert!(a.enabled());
    assert_eq!(a.keys[0].name, "team-a");
    assert_eq!(a.keys[0].digest, digest("sk-team-a-0123456789"));
    assert_eq!(a.keys[0].models.as_deref(), Some(&["m1".to_string()][..]));
    assert_eq!((a.keys[0].rpm, a.keys[0].tpm), (60, 1000));
    assert_eq!(a.keys[1].digest, [0xaa; 32]);
    assert_eq!(a.keys[1].models, None);
    assert_eq!(a.keys_file_poll, Duration::from_secs(1));
    assert!(a.forward_client_key);
    assert!(!format!("{c:?}").contains("sk-team-a"));
    assert!(!ok(MINIMAL).auth.enabled());
}

#[test]
fn auth_key_errors() {
    let y = |k: &str| with_backend(&format!("auth: {{ keys: [{k}] }}\n"));
    assert_error(
        &y("{ name: a, key: short }"),
        "auth.keys[0].key",
        "at least 16",
    );
    assert_error(&y("{ name: a }"), "auth.keys[0]", "key or key_sha256");
    assert_error(
        &y("{ name: a, key_sha256: \"+f\" }"),
        "auth.keys[0].key_sha256",
        "64 hex",
    );
    assert_error(
        &y("{ name: \"a b\", key: \"0123456789abcdef\" }"),
        "auth.keys[0].name",
        "characters",
    );
    assert_error(
        &y("{ name: a, key: \"0123456789abcdef\" }, { name: a, key: \"0123456789abcdeX\" }"),
        "auth.keys[1].name",
        "duplicate",
    );
    assert_error(
        &y("{ name: a, key: \"0123456789abcdef\" }, { name: b, key: \"0123456789abcdef\" }"),
        "auth.keys[1]",
        "same key as \"a\"",
    );
    assert_error(
        &y("{ name: a, key: \"0123456789abcdef\", rpn: 1 }"),
        "auth.keys[0].rpn",
        "unknown field",
    );
}

#[test]
fn keys_file_text() {
    let keys = parse_keys_file("keys:\n  - { name: x, key: \"0123456789abcdef\" }\n").unwrap();
    assert_eq!(keys[0].name, "x");
    let json = parse_keys_file(r#"{"keys": [{"name": "y", "key": "0123456789abcdef"}]}"#).unwrap();
    assert_eq!(json[0].name, "y");
    assert!(parse_keys_file("keys: [{ name: x }]").is_err());
    assert!(parse_keys_file("nope").is_err());
}

#[test]
fn backend_capacity_and_credentials() {
    let c = ok(r#"
backends:
  - { url: "http://a:1", max_inflight: 4, api_key: "upstream-secret" }
  - { url: "http://b:1", api_key: "" }
limits: { queue_size: 0, queue_timeout: 250ms }
"#);
    assert_eq!(c.backends[0].max_inflight, 4);
    assert_eq!(c.backends[0].slots, 0, "not declared");
    assert_eq!(
        c.backends[0].api_key.as_ref().map(Secret::expose),
        Some("upstream-secret")
    );
    assert_eq!(c.backends[1].api_key, None);
    assert!(!format!("{c:?}").contains("upstream-secret"));
    assert_eq!(c.limits.queue_size, 0);
    assert_eq!(c.limits.queue_timeout, Duration::from_millis(250));
}

#[test]
fn routing_section() {
    let c = ok(MINIMAL);
    assert_eq!(c.routing, Routing::default());
    assert_eq!(c.backends[0].metrics_path, "/metrics");
    let c = ok(&with_backend(
        "routing:\n  hash_key: \"header:X-User-Id, body:user, prefix:3, prefix\"\n  \
             max_imbalance: 3\n  metrics_interval: 100ms\n  kv_threshold: 0.8\n  queue_weight: 2\n",
    ));
    assert_eq!(
        c.routing.hash_key,
        vec![
            HashKey::Header("x-user-id".into()),
            HashKey::BodyUser,
            HashKey::Prefix(3),
            HashKey::Prefix(2)
        ]
    );
    assert_eq!(c.routing.max_imbalance, 3);
    assert_eq!(c.routing.metrics_interval, Duration::from_millis(100));
    assert_eq!(c.routing.kv_threshold, Real(0.8));
    assert_eq!(c.routing.queue_weight, Real(2.0));
    let c = ok(&with_backend(
        "strategy: prefix_cache\nrouting:\n  prefix_cache: { block_bytes: 128, max_blocks: 64, \
             capacity_blocks: 32, miss_cost: 2.5 }\n",
    ));
    assert_eq!(c.strategy, Strategy::PrefixCache);
    let pc = c.routing.prefix_cache;
    assert_eq!(
        (
            pc.block_bytes,
            pc.max_blocks,
            pc.capacity_blocks,
            pc.miss_cost
        ),
        (128, 64, 32, Real(2.5))
    );
    for (yaml, path) in [
        ("block_bytes: 4", "routing.prefix_cache.block_bytes"),
        ("max_blocks: 0", "routing.prefix_cache.max_blocks"),
        ("capacity_blocks: 0", "routing.prefix_cache.capacity_blocks"),
        ("miss_cost: -1", "routing.prefix_cache.miss_cost"),
    ] {
        assert_error(
            &with_backend(&format!("routing: {{ prefix_cache: {{ {yaml} }} }}\n")),
            path,
            "",
        );
    }
    assert_error(
        &with_backend("routing: { prefix_cache: { blocks: 3 } }\n"),
        "routing.prefix_cache.blocks",
        "unknown field",
    );
    assert_error(
        &with_backend("routing: { hash_key: \"cookie:x\" }\n"),
        "routing.hash_key",
        "unknown key source",
    );
    assert_error(
        &with_backend("routing: { hash_key: \"prefix:9\" }\n"),
        "routing.hash_key",
        "1 to 4",
    );
    assert_error(
        &with_backend("routing: { kv_weight: -1 }\n"),
        "routing.kv_weight",
        "non-negative",
    );
    assert_error(
        &with_backend("routing: { metrics_interval: 3s }\n"),
        "routing.metrics_stale_after",
        "longer than routing.metrics_interval",
    );
    assert_error(
        &with_backend("routing: { metrics_interval: 0s }\n"),
        "routing.metrics_interval",
        "greater than zero",
    );
    assert_error(
        "backends: [{ url: \"http://a:1\", metrics_path: metrics }]\n",
        "backends[0].metrics_path",
        "must start with '/'",
    );
}

#[test]
fn model_pools() {
    let c = ok(r#"
backends:
  - { url: "http://a:1", models: [small] }
  - { url: "http://b:1/", models: [big] }
strategy: round_robin
models:
  small: { aliases: [fast, gpt-3.5], rewrite: true, fallbacks: [big] }
  big: { strategy: least_load, backends: ["http://B:1"] }
"#);
    assert_eq!(c.models.len(), 2);
    let (big, small) = (&c.models[0], &c.models[1]);
    assert_eq!(big.name, "big");
    assert_eq!(big.strategy, Strategy::LeastLoad);
    assert_eq!(
        big.backends.as_deref(),
        Some(&["http://b:1".to_string()][..])
    );
    assert_eq!(small.strategy, Strategy::RoundRobin);
    assert_eq!(small.aliases, ["fast", "gpt-3.5"]);
    assert!(small.rewrite && small.backends.is_none());
    assert_eq!(small.fallbacks, ["big"]);
    assert!(c.uses_engine_load() && !c.uses_affinity());

    let base = "backends: [{ url: \"http://a:1\", models: [m] }]\n";
    for (models, path, needle) in [
        (
            "models: { m: { aliases: [m2] }, n: { aliases: [m2] } }",
            "models.n.aliases[0]",
            "already an alias",
        ),
        (
            "models: { m: { aliases: [n] }, n: { } }",
            "models.m.aliases[0]",
            "also a model",
        ),
        (
            "models: { m: { fallbacks: [zz] } }",
            "models.m.fallbacks[0]",
            "not a model under models",
        ),
        (
            "models: { m: { fallbacks: [m] } }",
            "models.m.fallbacks[0]",
            "itself",
        ),
        ("models: { z: { } }", "models.z", "no backend serves"),
        (
            "models: { m: { backends: [\"http://c:1\"] } }",
            "models.m.backends[0]",
            "not one of the backends",
        ),
        (
            "models: { m: { backends: [] } }",
            "models.m.backends",
            "at least one",
        ),
        (
            "models: { m: { strategy: fastest } }",
            "models.m.strategy",
            "unknown variant",
        ),
        (
            "models: { m: { alias: [x] } }",
            "models.m.alias",
            "unknown field",
        ),
    ] {
        assert_error(&format!("{base}{models}\n"), path, needle);
    }
}

#[test]
fn backend_url_errors() {
    let cases = [
        ("ftp://a:8000", "unsupported scheme \"ftp\""),
        ("a:8000", "has no scheme"),
        ("http://", "missing host"),
        ("http://:8000", "missing host"),
        ("http:///v1", "missing host"),
        ("http://a:0", "invalid port \"0\""),
        ("http://a:65536", "invalid port"),
        ("http://a:", "invalid port \"\""),
        ("http://a:80x", "invalid port"),
        ("http://a:8000/v1?x=1", "query strings"),
        ("http://a:8000/#frag", "fragments"),
        ("http://user:pw@a:8000", "credentials"),
        ("http://::1:8000", "must be in brackets"),
        ("http://[::1:8000", "unclosed"),
        ("http://[zz]:8000", "invalid IPv6 address"),
        ("http://a b:8000", "invalid host"),
        ("", "is required"),
    ];
    for (url, needle) in cases {
        assert_error(
            &format!("backends: [{{ url: \"{url}\" }}]\n"),
            "backends[0].url",
            needle,
        );
    }
}

#[test]
fn backend_url_normalisation() {
    let c = ok("backends:\n  - url: http://Host.Example:8000//\n  - url: \" http://b \"\n");
    assert_eq!(c.backends[0].url, "http://host.example:8000");
    assert_eq!(c.backends[0].base_path, "");
    assert_eq!(c.backends[1].url, "http://b:80");
    assert_eq!(c.backends[1].authority, "b:80");
}

#[test]
fn backend_field_errors() {
    assert_error(
        "backends: [{ url: http://a:1, weight: 0 }]\n",
        "backends[0].weight",
        "at least 1",
    );
    assert_error(
        "backends: [{ url: http://a:1, models: [] }]\n",
        "backends[0].models",
        "at least one model",
    );
    assert_error(
        "backends: [{ url: http://a:1, models: [x, \" \"] }]\n",
        "backends[0].models[1]",
        "must not be empty",
    );
    assert_error(
        "backends: [{ url: http://a:1, models: [x, x] }]\n",
        "backends[0].models[1]",
        "duplicate model",
    );
    assert_error(
        "backends:\n  - url: http://a:1\n  - url: http://b:1\n  - url: http://A:1/\n",
        "backends[2].url",
        "duplicate of backends[0] (http://a:1)",
    );
    assert_error(
        "backends: []\n",
        "backends",
        "at least one backend is required",
    );
}

#[test]
fn health_check_errors() {
    assert_error(
        &with_backend("health_check: { path: health }\n"),
        "health_check.path",
        "must start with '/'",
    );
    assert_error(
        &with_backend("health_check: { unhealthy_threshold: 0 }\n"),
        "health_check.unhealthy_threshold",
        "at least 1",
    );
    assert_error(
        &with_backend("health_check: { healthy_threshold: 0 }\n"),
        "health_check.healthy_threshold",
        "at least 1",
    );
    assert_error(
        &with_backend("health_check: { interval: 0s }\n"),
        "health_check.interval",
        "greater than zero",
    );
    assert_error(
        &with_backend("health_check: { timeout: 0ms }\n"),
        "health_check.timeout",
        "greater than zero",
    );
}

#[test]
fn zero_durations_and_limits_are_rejected() {
    for key in [
        "connect",
        "header",
        "first_byte",
        "idle",
        "request",
        "keepalive",
        "write",
    ] {
        assert_error(
            &with_backend(&format!("timeouts: {{ {key}: 0s }}\n")),
            &format!("timeouts.{key}"),
            "must be greater than zero",
        );
    }
    assert_error(
        &with_backend("pool: { idle_timeout: 0s }\n"),
        "pool.idle_timeout",
        "greater than zero",
    );
    assert_error(
        &with_backend("usage_hook: { timeout: 0s }\n"),
        "usage_hook.timeout",
        "greater than zero",
    );
    for key in ["max_body_bytes", "max_header_bytes", "max_connections"] {
        assert_error(
            &with_backend(&format!("limits: {{ {key}: 0 }}\n")),
            &format!("limits.{key}"),
            "must be greater than zero",
        );
    }
}

#[test]
fn usage_hook_errors() {
    assert_error(
        &with_backend("usage_hook: { enabled: true }\n"),
        "usage_hook.url",
        "is required",
    );
    assert_error(
        &with_backend("usage_hook: { enabled: true, url: \"\" }\n"),
        "usage_hook.url",
        "is required",
    );
    assert_error(
        &with_backend("usage_hook: { enabled: true, url: \"ftp://x/y\" }\n"),
        "usage_hook.url",
        "only http:// and https://",
    );
    assert_error(
        &with_backend("usage_hook: { enabled: true, url: \"billing\" }\n"),
        "usage_hook.url",
        "no scheme",
    );
    assert_error(
        &with_backend("usage_hook: { url: \"http:///x\" }\n"),
        "usage_hook.url",
        "missing host",
    );
    let c = ok(&with_backend("usage_hook: { url: \"\" }\n"));
    assert_eq!(c.usage_hook.url, None);
}

#[test]
fn logging_level() {
    for (s, level) in [
        ("off", log::LevelFilter::Off),
        ("error", log::LevelFilter::Error),
        ("warn", log::LevelFilter::Warn),
        ("info", log::LevelFilter::Info),
        ("debug", log::LevelFilter::Debug),
        ("trace", log::LevelFilter::Trace),
    ] {
        assert_eq!(
            ok(&with_backend(&format!("logging: {{ level: {s} }}\n")))
                .logging
                .level,
            level
        );
    }
    assert_error(
        &with_backend("logging: { level: verbose }\n"),
        "logging.level",
        "expected one of off, error, warn, info, debug, trace",
    );
    assert_error(
        &with_backend("logging: { format: xml }\n"),
        "logging.format",
        "unknown variant `xml`, expected `json` or `text`",
    );
}

#[test]
fn listen_addresses() {
    let listen = |s: &str| ok(&with_backend(&format!("listen: \"{s}\"\n"))).listen;
    assert_eq!(listen(":9000"), "0.0.0.0:9000".parse().unwrap());
    assert_eq!(listen("127.0.0.1:0"), "127.0.0.1:0".parse().unwrap());
    assert_eq!(listen("[::1]:8080"), "[::1]:8080".parse().unwrap());
    let local = listen("localhost:8080");
    assert!(local.ip().is_loopback() && local.port() == 8080, "{local}");

    for (s, needle) in [
        ("8080", "has no port"),
        ("", "must not be empty"),
        (":http", "invalid port"),
        (":70000", "invalid port"),
        ("::1:8080", "must be in brackets"),
        ("[::zz]:8080", "invalid IPv6"),
        ("no-such-host.invalid:80", "cannot resolve"),
    ] {
        assert_error(
            &with_backend(&format!("listen: \"{s}\"\n")),
            "listen",
            needle,
        );
    }
}

#[test]
fn admin_listen() {
    let c = ok(&with_backend("admin_listen: \"127.0.0.1:9901\"\n"));
    assert_eq!(c.admin_listen, Some("127.0.0.1:9901".parse().unwrap()));
    assert_eq!(ok(&with_backend("admin_listen: \"\"\n")).admin_listen, None);
    assert_eq!(ok(&with_backend("admin_listen:\n")).admin_listen, None);
    assert_error(
        &with_backend("admin_listen: \"9901\"\n"),
        "admin_listen",
        "has no port",
    );
    assert_error(
        &with_backend("admin_listen: \":8080\"\n"),
        "admin_listen",
        "must differ from listen",
    );
}

#[test]
fn cpus_and_workers() {
    assert_eq!(
        ok(&with_backend("cpus: \"0-2,5\"\n")).cpus,
        Some(vec![0, 1, 2, 5])
    );
    assert_eq!(ok(&with_backend("cpus: 3\n")).cpus, Some(vec![3]));
    assert_eq!(ok(&with_backend("cpus: \"\"\n")).cpus, None);
    assert_eq!(
        ok(&with_backend("workers: 2\ncpus: \"4-5\"\n")).cpus,
        Some(vec![4, 5])
    );
    assert_error(&with_backend("cpus: \"0,,1\"\n"), "cpus", "empty item");
    assert_error(
        &with_backend("workers: 3\ncpus: \"0-1\"\n"),
        "workers",
        "3 workers but cpus lists 2 CPUs",
    );
}

#[test]
fn a_hook_url_without_enabled_is_a_warning() {
    let idle = ok(&with_backend(
        "usage_hook: { url: \"http://billing/usage\" }\n",
    ));
    let w = idle.warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("usage_hook.enabled is false"), "{w:?}");
    let on = ok(&with_backend(
        "usage_hook: { enabled: true, url: \"http://billing/usage\" }\n",
    ));
    assert!(on.warnings().is_empty());
    assert!(ok(MINIMAL).warnings().is_empty());
}

#[test]
fn https_backends_are_accepted_and_tls_needs_https() {
    let c =
        Config::from_yaml_str("listen: \"127.0.0.1:0\"\nbackends: [{ url: \"https://a:8443\" }]\n")
            .unwrap();
    assert_eq!(c.backends[0].url, "https://a:8443");
    assert!(c.backends[0].tls.is_some());
    let e = Config::from_yaml_str(
        "listen: \"127.0.0.1:0\"\nbackends: [{ url: \"http://a:8000\", tls: { server_name: a } }]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("backends[0].tls: only for an https:// url"),
        "{e}"
    );
    let e = Config::from_yaml_str(
        "listen: \"127.0.0.1:0\"\nbackends: [{ url: \"https://a:8443\", tls: { ca_file: /nonexistent/ca.pem } }]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("backends[0].tls: /nonexistent/ca.pem"), "{e}");
}

#[test]
fn backend_slots_are_declared_within_bounds() {
    let c = ok(r#"
backends:
  - { url: "http://a:1", slots: 2 }
  - { url: "http://b:1", slots: 256 }
  - { url: "http://c:1" }
strategy: prefix_cache
"#);
    assert_eq!(
        c.backends.iter().map(|b| b.slots).collect::<Vec<_>>(),
        [2, 256, 0]
    );
    let y = "backends:\n  - { url: \"http://a:1\", slots: 0 }\n  - { url: \"http://b:1\", slots: 257 }\n";
    assert_error(
        y,
        "backends[0].slots",
        "must be 1 to 256 (the engine's parallel sequences), got 0",
    );
    assert_error(y, "backends[1].slots", "must be 1 to 256");
    let e = parse("backends:\n  - { url: \"http://a:1\", slots: -1 }\n").unwrap_err();
    assert!(e.to_string().contains("slots"), "{e}");
}
