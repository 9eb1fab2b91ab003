//! The startup banner: one log line with what an operator checks first (backends, strategy, auth,
//! where usage goes, the io driver, where the admin endpoints are). Built from the loaded config
//! and a few facts only startup knows (the key count after `auth.keys_file` was read, the driver
//! the kernel allowed, the bound admin address). It prints no secret: a webhook URL is shown
//! without its user info and query, keys only as a count.

use std::net::SocketAddr;

use crate::config::Config;

/// What startup learned beyond the config.
pub(crate) struct Started {
    /// Keys in force (config keys plus `auth.keys_file`).
    pub keys: usize,
    pub driver: &'static str,
    pub workers: usize,
    pub admin: Option<SocketAddr>,
}

/// `config: backends [...]; strategy ...; auth ...; usage hook ...; io_driver ...; admin ...`.
/// Deliberately free of "listening on" and "admin on ", which the listener line carries and
/// scripts look for.
pub(crate) fn banner(cfg: &Config, s: &Started) -> String {
    let backends: Vec<String> = cfg
        .backends
        .iter()
        .map(|b| {
            let name = b
                .name
                .as_deref()
                .map(|n| format!("{n}="))
                .unwrap_or_default();
            let discover = if b.discover.is_some() {
                " (dns discovery)"
            } else {
                ""
            };
            format!("{name}{}{discover}", b.url)
        })
        .collect();
    let auth = if cfg.auth.enabled() {
        let file = cfg
            .auth
            .keys_file
            .as_ref()
            .map(|f| format!(", keys_file {}", f.display()))
            .unwrap_or_default();
        format!("on ({} keys{file})", s.keys)
    } else {
        "off (no keys configured: anyone may call)".to_string()
    };
    let hook = &cfg.usage_hook;
    let usage = match (&hook.url, hook.enabled) {
        (Some(url), true) => format!(
            "usage hook {}, spool {}",
            redact_url(url),
            hook.spool_dir.as_deref().unwrap_or("none (memory only)")
        ),
        (Some(_), false) => "usage hook off (url set, enabled: false)".to_string(),
        (None, _) => "usage hook off".to_string(),
    };
    let admin = match (s.admin, cfg.auth.enabled()) {
        (Some(a), _) => format!("admin listener {a}"),
        (None, true) => "admin endpoints on the main listener (admin keys only)".to_string(),
        (None, false) => "admin endpoints on the main listener (open to anyone)".to_string(),
    };
    format!(
        "config: {} backends [{}]; strategy {}; auth {auth}; {usage}; io_driver {} ({} workers); {admin}",
        cfg.backends.len(),
        backends.join(", "),
        cfg.strategy.as_str(),
        s.driver,
        s.workers,
    )
}

/// `scheme://host[:port]/path`: the query (which may carry a token) and any user info dropped.
fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = authority.rsplit('@').next().unwrap_or(authority);
    format!("{scheme}://{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> Config {
        Config::from_yaml_str(yaml).unwrap()
    }

    #[test]
    fn the_banner_names_what_an_operator_checks_first() {
        let c = cfg("listen: 127.0.0.1:0\nbackends:\n  - url: http://10.0.0.1:8000\n    name: a\n  - url: http://pool.svc:8000\n    discover: dns\nstrategy: power_of_two\nusage_hook: { enabled: true, url: \"https://billing.example/hook?token=x\", spool_dir: /var/spool/llmproxy }\n");
        let line = banner(
            &c,
            &Started {
                keys: 0,
                driver: "epoll",
                workers: 2,
                admin: None,
            },
        );
        assert_eq!(
            line,
            "config: 2 backends [a=http://10.0.0.1:8000, http://pool.svc:8000 (dns discovery)]; \
             strategy power_of_two; auth off (no keys configured: anyone may call); usage hook \
             https://billing.example/hook, spool /var/spool/llmproxy; io_driver epoll (2 workers); \
             admin endpoints on the main listener (open to anyone)"
        );
        assert!(!line.contains("listening on") && !line.contains("admin on "));
    }

    #[test]
    fn auth_shows_the_key_count_and_an_idle_hook_says_so() {
        let c = cfg("listen: 127.0.0.1:0\nbackends: [{ url: \"http://b:1\" }]\nauth: { keys: [{ name: a, key: sk-0123456789abcdef }] }\nusage_hook: { url: \"http://h/\" }\n");
        let line = banner(
            &c,
            &Started {
                keys: 1,
                driver: "io_uring",
                workers: 1,
                admin: Some(([127, 0, 0, 1], 9901).into()),
            },
        );
        assert!(line.contains("; auth on (1 keys);"), "{line}");
        assert!(
            line.contains("usage hook off (url set, enabled: false)"),
            "{line}"
        );
        assert!(line.ends_with("admin listener 127.0.0.1:9901"), "{line}");
        assert!(!line.contains("sk-0123"), "{line}");
    }

    #[test]
    fn webhook_credentials_are_not_printed() {
        assert_eq!(redact_url("http://h:8/x"), "http://h:8/x");
        assert_eq!(redact_url("https://a:b@h/p?k=v#f"), "https://h/p");
        assert_eq!(redact_url("http://h?k=v"), "http://h");
    }
}
