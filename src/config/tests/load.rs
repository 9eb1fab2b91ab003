//! Whole documents: defaults, the example file, YAML errors, `${VAR}`, merge keys.

use super::*;

#[test]
fn defaults() {
    let c = ok(MINIMAL);
    assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(c.admin_listen, None);
    assert_eq!(c.workers, 0);
    assert_eq!(c.cpus, None);
    assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    assert_eq!(c.strategy, Strategy::LeastConnections);
    assert_eq!(c.health_check, HealthCheck::default());
    assert_eq!(c.health_check.interval, Duration::from_secs(10));
    assert_eq!(c.health_check.path, "/health");
    assert_eq!(c.health_check.timeout, Duration::from_secs(2));
    assert_eq!(c.health_check.unhealthy_threshold, 2);
    assert_eq!(c.health_check.healthy_threshold, 1);
    let t = &c.timeouts;
    assert_eq!(t.connect, Duration::from_secs(2));
    assert_eq!(t.header, Duration::from_secs(10));
    assert_eq!(t.first_byte, Duration::from_secs(60));
    assert_eq!(t.idle, Duration::from_secs(60));
    assert_eq!(t.request, Duration::from_secs(1800));
    assert_eq!(t.keepalive, Duration::from_secs(75));
    assert_eq!(t.write, Duration::from_secs(30));
    assert_eq!(c.limits.max_body_bytes, 10 * 1024 * 1024);
    assert_eq!(c.limits.max_header_bytes, 64 * 1024);
    assert_eq!(c.limits.max_connections, 100_000);
    assert_eq!(c.retry.attempts, 2);
    assert_eq!(c.pool.max_idle_per_backend, 64);
    assert_eq!(c.pool.idle_timeout, Duration::from_secs(60));
    assert!(!c.usage_hook.enabled);
    assert_eq!(c.usage_hook.url, None);
    assert_eq!(c.usage_hook.timeout, Duration::from_secs(1));
    assert_eq!(c.usage_hook.retry, 2);
    assert_eq!(c.logging.level, log::LevelFilter::Info);
    assert_eq!(c.logging.format, LogFormat::Json);
    assert!(c.logging.access_log);
    let b = &c.backends[0];
    assert_eq!(b.weight, 1);
    assert_eq!(b.models, None);
    assert_eq!(b.discover, None);
    assert_eq!(c.discovery, Discovery::default());
    assert_eq!(c.discovery.interval, Duration::from_secs(5));
    assert_eq!(c.discovery.stale_after, Duration::from_secs(300));
}

#[test]
fn seed_style_config() {
    let c = ok(r#"
listen: ":8080"
backends:
  - url: "http://vllm-0:8000"
    weight: 5
strategy: least_connections
health_check: { interval: 10s, path: /health, timeout: 2s }
usage_hook: { enabled: true, url: "https://billing.example.com/llm-usage", timeout: 1s, retry: 2 }
"#);
    assert_eq!(c.listen.port(), 8080);
    assert_eq!(
        c.backends,
        vec![Backend {
            url: "http://vllm-0:8000".into(),
            host: "vllm-0".into(),
            port: 8000,
            authority: "vllm-0:8000".into(),
            base_path: String::new(),
            weight: 5,
            models: None,
            discover: None,
            name: None,
            max_inflight: 0,
            slots: 0,
            api_key: None,
            metrics_path: "/metrics".into(),
            tls: None,
        }]
    );
    assert_eq!(c.strategy, Strategy::LeastConnections);
    assert!(c.usage_hook.enabled);
    assert_eq!(
        c.usage_hook.url.as_deref(),
        Some("https://billing.example.com/llm-usage")
    );
    assert_eq!(c.usage_hook.retry, 2);
}

#[test]
fn example_file_parses_and_matches_defaults() {
    let c = match Config::from_yaml_str(include_str!("../../../config/llmproxy.example.yaml")) {
        Ok(c) => c,
        Err(e) => panic!("example config is invalid:\n{e}"),
    };
    let defaults = ok(MINIMAL);
    // The example documents the defaults, so apart from its backend it must equal them.
    assert_eq!(c.listen, defaults.listen);
    assert_eq!(c.admin_listen, defaults.admin_listen);
    assert_eq!(c.workers, defaults.workers);
    assert_eq!(c.cpus, defaults.cpus);
    assert_eq!(c.shutdown_grace, defaults.shutdown_grace);
    assert_eq!(c.strategy, defaults.strategy);
    assert_eq!(c.health_check, defaults.health_check);
    assert_eq!(c.timeouts, defaults.timeouts);
    assert_eq!(c.limits, defaults.limits);
    assert_eq!(c.retry, defaults.retry);
    assert_eq!(c.breaker, defaults.breaker);
    assert_eq!(c.pool, defaults.pool);
    assert_eq!(c.usage_hook, defaults.usage_hook);
    assert_eq!(c.logging, defaults.logging);
    assert_eq!(c.auth, defaults.auth);
    assert_eq!(c.backends.len(), 1);
    assert_eq!(c.backends[0].weight, 1);
}

#[test]
fn full_config() {
    let c = ok(r#"
listen: "127.0.0.1:0"
admin_listen: "127.0.0.1:9901"
workers: 2
cpus: "0,1"
shutdown_grace: 0s
backends:
  - url: "HTTP://VLLM-0:8000/v1/"
    weight: 3
    models: ["llama-3-8b", "mistral"]
  - url: "http://[::1]/"
strategy: weighted_round_robin
health_check: { interval: 250ms, path: /ready, timeout: 100ms, unhealthy_threshold: 3, healthy_threshold: 2 }
timeouts: { connect: 1s, header: 2s, first_byte: 3s, idle: 4s, request: 1h, keepalive: 5s, write: 6s }
limits: { max_body_bytes: 1MB, max_header_bytes: 8K, max_connections: 10 }
retry: { attempts: 0 }
pool: { max_idle_per_backend: 0, idle_timeout: 1m }
usage_hook: { enabled: false, url: "http://sink:9000/hook?token=abc", timeout: 500ms, retry: 0 }
logging: { level: DEBUG, format: text, access_log: false }
"#);
    assert_eq!(c.listen, "127.0.0.1:0".parse().unwrap());
    assert_eq!(c.admin_listen, Some("127.0.0.1:9901".parse().unwrap()));
    assert_eq!(c.workers, 2);
    assert_eq!(c.cpus, Some(vec![0, 1]));
    assert_eq!(c.shutdown_grace, Duration::ZERO);
    let b = &c.backends[0];
    assert_eq!(b.url, "http://vllm-0:8000/v1");
    assert_eq!(b.host, "vllm-0");
    assert_eq!(b.authority, "vllm-0:8000");
    assert_eq!(b.base_path, "/v1");
    assert_eq!(
        b.models.as_deref(),
        Some(&["llama-3-8b".to_string(), "mistral".to_string()][..])
    );
    let b = &c.backends[1];
    assert_eq!(b.url, "http://[::1]:80");
    assert_eq!(b.host, "::1");
    assert_eq!(b.port, 80);
    assert_eq!(b.authority, "[::1]:80");
    assert_eq!(b.base_path, "");
    assert_eq!(c.strategy, Strategy::WeightedRoundRobin);
    assert_eq!(c.health_check.interval, Duration::from_millis(250));
    assert_eq!(c.health_check.path, "/ready");
    assert_eq!(c.timeouts.request, Duration::from_secs(3600));
    assert_eq!(c.limits.max_body_bytes, 1_000_000);
    assert_eq!(c.limits.max_header_bytes, 8192);
    assert_eq!(c.retry.attempts, 0);
    assert_eq!(c.pool.idle_timeout, Duration::from_secs(60));
    assert_eq!(
        c.usage_hook.url.as_deref(),
        Some("http://sink:9000/hook?token=abc")
    );
    assert_eq!(c.logging.level, log::LevelFilter::Debug);
    assert_eq!(c.logging.format, LogFormat::Text);
    assert!(!c.logging.access_log);
}

#[test]
fn empty_document_reports_missing_backends() {
    for yaml in ["", "{}", "# only a comment\n"] {
        assert_eq!(
            errors(yaml),
            vec!["backends: at least one backend is required"]
        );
    }
}

#[test]
fn yaml_syntax_error() {
    let errs = errors("backends: [\n");
    assert!(errs[0].starts_with("invalid YAML: "), "{errs:?}");
    assert!(errors("a: 1\na: 2\n")[0].contains("duplicate entry"));
    assert_eq!(
        errors("- a\n"),
        vec!["config: invalid type: sequence, expected a mapping of config keys"]
    );
}

#[test]
fn unknown_keys_name_their_path() {
    assert_error(
        "backends:\n  - url: http://a:1\n  - url: http://b:1\n    wieght: 2\n",
        "backends[1].wieght",
        "unknown field `wieght`, expected one of",
    );
    assert_error(
        &with_backend("routng: {}\n"),
        "routng",
        "unknown field `routng`",
    );
    assert_error(
        &with_backend("timeouts: { conect: 1s }\n"),
        "timeouts.conect",
        "unknown field",
    );
}

#[test]
fn type_errors_name_their_path() {
    assert_error(&with_backend("workers: many\n"), "workers", "invalid type");
    assert_error(
        &with_backend("retry: { attempts: -1 }\n"),
        "retry.attempts",
        "invalid value",
    );
    assert_error(
        &with_backend("health_check: 5\n"),
        "health_check",
        "invalid type: integer `5`, expected a mapping",
    );
    assert_error(
        "backends: [{ url: http://a:1, weight: x }]\n",
        "backends[0].weight",
        "invalid type",
    );
}

#[test]
fn unknown_strategy_lists_allowed_values() {
    assert_error(
            &with_backend("strategy: random\n"),
            "strategy",
            "unknown variant `random`, expected one of `round_robin`, `weighted_round_robin`, `least_connections`",
        );
    for (name, s) in [
        ("round_robin", Strategy::RoundRobin),
        ("weighted_round_robin", Strategy::WeightedRoundRobin),
        ("least_connections", Strategy::LeastConnections),
        ("power_of_two", Strategy::PowerOfTwo),
        ("least_load", Strategy::LeastLoad),
        ("consistent_hash", Strategy::ConsistentHash),
    ] {
        assert_eq!(s.as_str(), name);
        assert_eq!(
            ok(&with_backend(&format!("strategy: {name}\n"))).strategy,
            s
        );
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let errs = errors(
        r#"
listen: "nope"
backends:
  - url: ftp://a
    weight: 0
health_check: { path: health, unhealthy_threshold: 0, healthy_threshold: 0 }
timeouts: { connect: 0s }
usage_hook: { enabled: true }
cpus: "3-1"
"#,
    );
    for path in [
        "listen",
        "backends[0].url",
        "backends[0].weight",
        "health_check.path",
        "health_check.unhealthy_threshold",
        "health_check.healthy_threshold",
        "timeouts.connect",
        "usage_hook.url",
        "cpus",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(&format!("{path}: "))),
            "missing {path} in {errs:#?}"
        );
    }
    assert_eq!(errs.len(), 9, "{errs:#?}");
    let display = ConfigError::Invalid(errs.clone()).to_string();
    assert_eq!(display.lines().count(), errs.len());
}

#[test]
fn env_substitution() {
    let c = ok(r#"
backends:
  - url: "http://${BACKEND_HOST}:8000"
usage_hook: { enabled: true, url: "${BILLING_URL}${EMPTY}" }
health_check: { path: "/h$x{" }
"#);
    assert_eq!(c.backends[0].url, "http://vllm-7:8000");
    assert_eq!(
        c.usage_hook.url.as_deref(),
        Some("https://billing.example.com/usage")
    );
    // A lone `$` or `{` is literal text.
    assert_eq!(c.health_check.path, "/h$x{");

    let errs = errors(
            "backends:\n  - url: \"http://${NOPE_A}:1\"\nusage_hook:\n  url: \"${NOPE_B}\"\n  enabled: true\n",
        );
    assert_eq!(
        errs,
        vec![
            "backends[0].url: environment variable NOPE_A is not set",
            "usage_hook.url: environment variable NOPE_B is not set",
        ]
    );
    assert_error(
        &with_backend("usage_hook: { url: \"${BILLING_URL\" }\n"),
        "usage_hook.url",
        "unterminated",
    );
    assert_error(
        &with_backend("usage_hook: { url: \"${1X}\" }\n"),
        "usage_hook.url",
        "invalid environment variable name",
    );
    assert_error(
        &with_backend("usage_hook: { url: \"${}\" }\n"),
        "usage_hook.url",
        "invalid environment variable name",
    );
}

#[test]
fn env_substitution_uses_the_process_environment() {
    let e =
        Config::from_yaml_str("backends: [{ url: \"${LLMPROXY_TEST_SURELY_UNSET_VARIABLE}\" }]\n")
            .unwrap_err();
    assert_eq!(
        e.to_string(),
        "backends[0].url: environment variable LLMPROXY_TEST_SURELY_UNSET_VARIABLE is not set"
    );
}

#[test]
fn with_backends_builds_a_default_config() {
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let urls = vec![
        "http://127.0.0.1:9001".to_string(),
        "http://127.0.0.1:9002/".to_string(),
    ];
    let c = Config::with_backends(listen, &urls).unwrap();
    assert_eq!(c.listen, listen);
    assert_eq!(c.backends.len(), 2);
    assert_eq!(c.backends[1].url, "http://127.0.0.1:9002");
    assert_eq!(c.timeouts, Timeouts::default());

    let bad = vec!["ftp://x".to_string()];
    match Config::with_backends(listen, &bad) {
        Err(ConfigError::Invalid(e)) => {
            assert!(e[0].starts_with("backends[0].url: unsupported"), "{e:?}")
        }
        other => panic!("{other:?}"),
    }
    assert!(Config::with_backends(listen, &[]).is_err());
}

#[test]
fn load_reports_io_errors_with_the_path() {
    let e = Config::load(Path::new("/nonexistent/llmproxy.yaml")).unwrap_err();
    assert!(matches!(e, ConfigError::Io { .. }));
    assert!(
        e.to_string().starts_with("/nonexistent/llmproxy.yaml: "),
        "{e}"
    );
}

#[test]
fn yaml_merge_keys() {
    let c = ok("backends:\n  - &b { url: \"http://a:1\", weight: 4 }\n  - { <<: *b, url: \"http://b:1\" }\n");
    assert_eq!(c.backends[1].weight, 4);
    assert_eq!(c.backends[1].url, "http://b:1");
}

/// Issue 21 item 11: a type error no longer hides the other problems of the file, and the
/// reasons say what to write, not Rust's type names.
#[test]
fn every_problem_is_reported_when_type_errors_sit_among_others() {
    let errs = errors(
        "listen: \":8080\"\nworkers: many\nbackends:\n  - url: \"http://a:8000\"\n    weight: x\n  - url: \"ftp://b\"\n    wieght: 2\nretry: { attempts: -1 }\ntimeouts: { connect: abc }\nusage_hook: { enabled: yes please }\n",
    );
    assert_eq!(
        errs,
        [
            "workers: invalid type: string \"many\", expected a whole number (0 or more)",
            "usage_hook.enabled: invalid type: string \"yes please\", expected true or false",
            "backends[0].weight: invalid type: string \"x\", expected a whole number (0 or more)",
            "backends[1].wieght: unknown field `wieght`, expected one of `url`, `weight`, `models`, `discover`, `name`, `max_inflight`, `slots`, `api_key`, `metrics_path`, `tls`",
            "retry.attempts: invalid value: integer `-1`, expected a whole number (0 or more)",
            "timeouts.connect: invalid duration \"abc\": expected a number with a unit (e.g. \"250ms\", \"10s\", \"30m\", \"1h\")",
            "backends[1].url: unsupported scheme \"ftp\"; only http:// and https:// are supported",
        ]
    );
}

#[test]
fn a_list_item_of_the_wrong_shape_is_reported_once() {
    let errs = errors("backends: [5, { url: \"http://a:1\", weight: 0 }]\n");
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].starts_with("backends[0]: invalid type: integer `5`"),
        "{errs:#?}"
    );
    assert!(errs[1].starts_with("backends[1].weight: "), "{errs:#?}");
    let errs = errors("backends: [{ url: \"http://a:1\", models: [a, { b: 1 }] }]\n");
    assert_eq!(
        errs,
        ["backends[0].models[1]: invalid type: map, expected text (a string)"]
    );
}
