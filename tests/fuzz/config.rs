//! The config loader (`config::Config::from_yaml_str`): YAML text, anchors and merge keys,
//! `${VAR}` expansion, validation. Properties: no panic and no hang on any text (deep nesting,
//! alias bombs); errors are `path: reason` lines; an accepted config keeps the invariants the rest
//! of the proxy relies on (at least one backend, unique URLs, weights >= 1), and loading is deterministic.

use llmproxy::config::{Config, ConfigError};

use crate::engine::{feature, Target};

pub const TARGET: Target = Target {
    name: "config",
    dict: &[
        b"\n",
        b"  ",
        b": ",
        b"- ",
        b"listen: \"127.0.0.1:0\"\n",
        b"backends:\n  - url: \"http://127.0.0.1:9\"\n",
        b"  - url: \"http://[::1]:80/base/\"\n",
        b"    weight: ",
        b"    models: [\"a\", \"b\"]\n",
        b"strategy: ",
        b"round_robin",
        b"timeouts: { connect: 1s, header: 0s }\n",
        b"limits: { max_body_bytes: 10MiB, max_header_bytes: 1 }\n",
        b"usage_hook: { enabled: true, url: \"http://h/u\", spool_dir: /tmp/x }\n",
        b"health_check: { interval: 1ms }\n",
        b"cpus: \"0-3,8\"\n",
        b"workers: ",
        b"${HOME}",
        b"${NOT_SET_ANYWHERE_42}",
        b"${",
        b"&a ",
        b"*a",
        b"<<: *a\n",
        b"!!binary ",
        b"!tag ",
        b"[",
        b"]",
        b"{",
        b"}",
        b"~",
        b"1h",
        b"250ms",
        b"GiB",
        b"\t",
        b"'",
        b"\"",
    ],
    max_len: 8 * 1024,
    check,
};

const SECTIONS: &[&str] = &[
    "config",
    "invalid YAML",
    "listen",
    "admin_listen",
    "workers",
    "cpus",
    "shutdown_grace",
    "backends",
    "strategy",
    "health_check",
    "timeouts",
    "limits",
    "retry",
    "pool",
    "usage",
    "usage_hook",
    "logging",
];

fn check(input: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(input);
    match Config::from_yaml_str(&text) {
        Ok(cfg) => {
            assert!(!cfg.backends.is_empty(), "a config without backends");
            for (i, b) in cfg.backends.iter().enumerate() {
                assert!(b.weight >= 1, "backends[{i}].weight");
                assert!(
                    cfg.backends[..i].iter().all(|o| o.url != b.url),
                    "duplicate backend URL accepted: {}",
                    b.url
                );
            }
            // The TLS settings a load builds (an https backend's client, the listener's server)
            // are equal only to themselves: a reload builds them anew so that rotated files are
            // read again. Everything else must load the same twice; Debug shows all of it but
            // the built TLS and the secrets, which full equality checks when there is no TLS.
            let again = Config::from_yaml_str(&text).ok();
            assert_eq!(
                again.as_ref().map(|c| format!("{c:?}")),
                Some(format!("{cfg:?}")),
                "loading is not deterministic"
            );
            if cfg.tls.is_none() && cfg.backends.iter().all(|b| b.tls.is_none()) {
                assert_eq!(again.as_ref(), Some(&cfg), "loading is not deterministic");
            }
            feature(("ok", cfg.backends.len().min(3), cfg.strategy))
        }
        Err(ConfigError::Invalid(lines)) => {
            assert!(!lines.is_empty());
            for line in &lines {
                assert!(line.contains(": "), "error without a path: {line:?}");
            }
            // The first error's path is the behaviour worth keeping apart.
            // The section of the first error is the behaviour worth keeping apart (not the
            // text of arbitrary keys, which would flood the pool).
            let first = lines[0].split([':', '.', '[']).next().unwrap_or("");
            let section = SECTIONS.iter().find(|s| **s == first).unwrap_or(&"?");
            feature(("invalid", section, lines.len().min(4)))
        }
        Err(other) => feature(("other", other.to_string())),
    }
}
