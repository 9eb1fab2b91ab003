//! Validation: the `raw` shapes → the `schema` types, with every problem of a file collected as
//! one `path: reason` line, so an operator fixes a config in one pass.
//!
//! Checks that span sections (listen vs admin_listen, workers vs cpus, pools vs backends) live
//! here; single values are parsed by `parse`. It must not stop at the first problem, so checks
//! record an error and carry on with a placeholder instead of returning early.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use super::keys::validate_auth;
use super::parse::{
    parse_cpu_list, parse_hash_key, parse_http_url, parse_listen, valid_header_name, UrlUse,
};
use super::ratelimit::validate_ratelimit;
use super::raw::{RawConfig, RawDiscovery, RawPool, RawRouting};
use super::schema::{
    Backend, BackendTls, Config, Discovery, ListenTls, ModelPool, Routing, Saturation, Secret,
    Strategy,
};
use super::ConfigError;
use crate::tls::ServerTls;

/// Most `backends[].slots`: each slot is a candidate `prefix_cache` scores on every pick, and
/// llama.cpp splits its context between them (256 slots of a 128k context are 512 tokens each).
pub(crate) const MAX_SLOTS: usize = 256;

pub(super) fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut errors: Vec<String> = Vec::new();
    let mut err = |path: &str, reason: String| errors.push(format!("{path}: {reason}"));

    let listen = parse_listen(&raw.listen).map_err(|e| err("listen", e)).ok();
    let admin_listen = match raw.admin_listen.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(s) => parse_listen(s).map_err(|e| err("admin_listen", e)).ok(),
    };
    if let (Some(l), Some(a)) = (listen, admin_listen) {
        if l == a && l.port() != 0 {
            err("admin_listen", format!("must differ from listen ({l})"));
        }
    }

    let cpus = match raw.cpus.as_ref().map(|c| c.0.trim()) {
        None | Some("") => None,
        Some(s) => parse_cpu_list(s).map_err(|e| err("cpus", e)).ok(),
    };
    if let Some(cpus) = &cpus {
        if raw.workers != 0 && raw.workers != cpus.len() {
            err(
                "workers",
                format!(
                    "{} workers but cpus lists {} CPUs (one worker per CPU); set workers: 0 or make them agree",
                    raw.workers,
                    cpus.len()
                ),
            );
        }
    }

    if raw.backends.is_empty() {
        err("backends", "at least one backend is required".to_string());
    }
    let mut backends = Vec::with_capacity(raw.backends.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, b) in raw.backends.into_iter().enumerate() {
        let at = format!("backends[{i}]");
        if b.weight == 0 {
            err(&format!("{at}.weight"), "must be at least 1".to_string());
        }
        if let Some(name) = &b.name {
            if name.trim().is_empty() || name.chars().any(|c| c.is_control()) {
                err(
                    &format!("{at}.name"),
                    "must be a non-empty label without control characters".to_string(),
                );
            } else if let Some(first) = names.insert(name.clone(), i) {
                // Two backends under one label would share (and clobber) their metrics series.
                err(
                    &format!("{at}.name"),
                    format!("duplicate of backends[{first}].name (\"{name}\")"),
                );
            }
        }
        if let Some(models) = &b.models {
            if models.is_empty() {
                err(
                    &format!("{at}.models"),
                    "must list at least one model (omit the key to serve any model)".to_string(),
                );
            }
            for (j, m) in models.iter().enumerate() {
                if m.trim().is_empty() {
                    err(
                        &format!("{at}.models[{j}]"),
                        "model name must not be empty".to_string(),
                    );
                } else if models[..j].contains(m) {
                    err(
                        &format!("{at}.models[{j}]"),
                        format!("duplicate model \"{m}\""),
                    );
                }
            }
        }
        if let Some(n) = b.slots {
            if !(1..=MAX_SLOTS).contains(&n) {
                err(
                    &format!("{at}.slots"),
                    format!("must be 1 to {MAX_SLOTS} (the engine's parallel sequences), got {n}"),
                );
            }
        }
        if !b.metrics_path.starts_with('/')
            || b.metrics_path
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            err(
                &format!("{at}.metrics_path"),
                format!(
                    "must start with '/' and contain no whitespace, got \"{}\"",
                    b.metrics_path
                ),
            );
        }
        let url = match parse_http_url(&b.url, UrlUse::Backend) {
            Ok(u) => u,
            Err(e) => {
                err(&format!("{at}.url"), e);
                continue;
            }
        };
        let tls = match (url.https, b.tls) {
            (true, t) => {
                let t = t.unwrap_or_default();
                match crate::tls::ClientTls::load(
                    &url.host,
                    t.ca_file.as_deref(),
                    t.cert_file.as_deref(),
                    t.key_file.as_deref(),
                    t.server_name.as_deref(),
                    t.insecure_skip_verify,
                ) {
                    Ok(client) => Some(BackendTls {
                        insecure_skip_verify: t.insecure_skip_verify,
                        client,
                    }),
                    Err(e) => {
                        err(&format!("{at}.tls"), e);
                        continue;
                    }
                }
            }
            (false, Some(_)) => {
                err(&format!("{at}.tls"), "only for an https:// url".to_string());
                continue;
            }
            (false, None) => None,
        };
        let scheme = if url.https { "https" } else { "http" };
        let normalised = format!("{scheme}://{}{}", url.authority, url.base_path);
        if let Some(first) = seen.get(&normalised) {
            err(
                &format!("{at}.url"),
                format!("duplicate of backends[{first}] ({normalised})"),
            );
            continue;
        }
        seen.insert(normalised.clone(), i);
        backends.push(Backend {
            url: normalised,
            host: url.host,
            port: url.port,
            authority: url.authority,
            base_path: url.base_path,
            weight: b.weight,
            models: b.models,
            discover: b.discover,
            name: b.name,
            max_inflight: b.max_inflight,
            slots: b.slots.unwrap_or(0),
            api_key: b.api_key.filter(|k| !k.is_empty()).map(Secret),
            metrics_path: b.metrics_path,
            tls,
        });
    }
    let discovery = validate_discovery(&raw.discovery, &mut err);

    let routing = validate_routing(raw.routing, &mut err);
    let models = validate_models(raw.models, raw.strategy, &backends, &mut err);

    let hc = &raw.health_check;
    if !hc.path.starts_with('/') {
        err(
            "health_check.path",
            format!("must start with '/', got \"{}\"", hc.path),
        );
    }
    if hc.path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        err(
            "health_check.path",
            "must not contain whitespace".to_string(),
        );
    }
    if hc.unhealthy_threshold == 0 {
        err(
            "health_check.unhealthy_threshold",
            "must be at least 1".to_string(),
        );
    }
    if hc.healthy_threshold == 0 {
        err(
            "health_check.healthy_threshold",
            "must be at least 1".to_string(),
        );
    }

    let br = &raw.breaker;
    if br.consecutive_failures == 0 {
        err(
            "breaker.consecutive_failures",
            "must be at least 1".to_string(),
        );
    }
    if br.max_cooldown < br.cooldown {
        err(
            "breaker.max_cooldown",
            "must not be shorter than breaker.cooldown".to_string(),
        );
    }

    let t = &raw.timeouts;
    // shutdown_grace may be zero: it means "stop at once", which is a legitimate choice.
    for (path, d) in [
        ("health_check.interval", hc.interval),
        ("health_check.timeout", hc.timeout),
        ("breaker.cooldown", br.cooldown),
        ("timeouts.connect", t.connect),
        ("timeouts.header", t.header),
        ("timeouts.first_byte", t.first_byte),
        ("timeouts.idle", t.idle),
        ("timeouts.request", t.request),
        ("timeouts.keepalive", t.keepalive),
        ("timeouts.write", t.write),
        ("pool.idle_timeout", raw.pool.idle_timeout),
        ("usage_hook.timeout", raw.usage_hook.timeout),
        ("usage_hook.flush_interval", raw.usage_hook.flush_interval),
        ("usage_hook.spool_fsync", raw.usage_hook.spool_fsync),
        ("limits.queue_timeout", raw.limits.queue_timeout),
        ("limits.promote_after", raw.limits.promote_after),
        ("auth.keys_file_poll", raw.auth.keys_file_poll),
    ] {
        if d.is_zero() {
            err(path, "must be greater than zero".to_string());
        }
    }

    let l = &raw.limits;
    for (path, zero) in [
        ("limits.max_body_bytes", l.max_body_bytes == 0),
        ("limits.max_header_bytes", l.max_header_bytes == 0),
        ("limits.max_connections", l.max_connections == 0),
    ] {
        if zero {
            err(path, "must be greater than zero".to_string());
        }
    }

    let mut usage_hook = raw.usage_hook;
    usage_hook.url = usage_hook
        .url
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty());
    match &usage_hook.url {
        Some(url) => {
            // Checked even when disabled: a bad URL left in place bites when someone enables it.
            if let Err(e) = parse_http_url(url, UrlUse::Webhook) {
                err("usage_hook.url", e);
            }
        }
        None if usage_hook.enabled => {
            err(
                "usage_hook.url",
                "is required when usage_hook.enabled is true".to_string(),
            );
        }
        None => {}
    }

    if usage_hook.batch_max == 0 {
        err("usage_hook.batch_max", "must be at least 1".to_string());
    }
    if usage_hook.spool_max_bytes == 0 {
        err(
            "usage_hook.spool_max_bytes",
            "must be greater than zero".to_string(),
        );
    }
    usage_hook.spool_dir = usage_hook.spool_dir.filter(|d| !d.trim().is_empty());
    usage_hook.secret = usage_hook.secret.filter(|s| !s.is_empty());
    for name in usage_hook.headers.keys() {
        if !valid_header_name(name) {
            err(
                &format!("usage_hook.headers.{name}"),
                "is not a valid header name".to_string(),
            );
        }
    }

    let tls = raw.tls.and_then(|t| {
        if t.handshake_timeout.is_zero() {
            err(
                "tls.handshake_timeout",
                "must be greater than zero".to_string(),
            );
        }
        match ServerTls::load(&t.cert_file, &t.key_file, t.client_ca_file.as_deref()) {
            Ok(server) => Some(ListenTls {
                cert_file: t.cert_file,
                key_file: t.key_file,
                client_ca_file: t.client_ca_file,
                handshake_timeout: t.handshake_timeout,
                server,
            }),
            Err(e) => {
                err("tls", e);
                None
            }
        }
    });

    // An error, not a warning: without a `least_load` strategy nothing scrapes engine metrics,
    // so the switch could never act, and `llmproxy check` should say so before a deploy.
    let scraped = std::iter::once(raw.strategy)
        .chain(models.iter().map(|p| p.strategy))
        .any(Strategy::uses_engine_load);
    if raw.limits.saturation == Saturation::EngineQueue && !scraped {
        err(
            "limits.saturation",
            "engine_queue needs engine metrics, which are scraped only under strategy least_load \
             (top level or a models pool); no strategy in use reads them"
                .to_string(),
        );
    }

    let auth = validate_auth(raw.auth, &mut errors);
    let ratelimit = validate_ratelimit(raw.ratelimit, &mut errors);

    match (listen, errors.is_empty()) {
        (Some(listen), true) => Ok(Config {
            listen,
            admin_listen,
            workers: raw.workers,
            cpus,
            shutdown_grace: raw.shutdown_grace,
            io_driver: raw.io_driver,
            backends,
            strategy: raw.strategy,
            routing,
            models,
            health_check: raw.health_check,
            timeouts: raw.timeouts,
            limits: raw.limits,
            retry: raw.retry,
            breaker: raw.breaker,
            pool: raw.pool,
            usage: raw.usage,
            usage_hook,
            logging: raw.logging,
            discovery,
            auth,
            tls,
            ratelimit,
        }),
        _ => Err(ConfigError::Invalid(errors)),
    }
}

/// `discovery:`: non-zero durations; `resolver` is `IP[:PORT]` (port 53 by default) or empty.
fn validate_discovery(raw: &RawDiscovery, err: &mut impl FnMut(&str, String)) -> Discovery {
    for (path, d) in [
        ("discovery.interval", raw.interval),
        ("discovery.stale_after", raw.stale_after),
    ] {
        if d.is_zero() {
            err(path, "must be greater than zero".to_string());
        }
    }
    let r = raw.resolver.trim();
    let resolver = if r.is_empty() {
        None
    } else if let Ok(a) = r.parse::<SocketAddr>() {
        Some(a)
    } else if let Ok(ip) = r.parse::<std::net::IpAddr>() {
        Some(SocketAddr::new(ip, 53))
    } else {
        err(
            "discovery.resolver",
            format!("\"{r}\" is not IP[:PORT] (e.g. \"10.96.0.10\" or \"127.0.0.1:5353\")"),
        );
        None
    };
    Discovery {
        interval: raw.interval,
        stale_after: raw.stale_after,
        resolver,
    }
}

fn validate_models(
    raw: BTreeMap<String, RawPool>,
    default_strategy: Strategy,
    backends: &[Backend],
    err: &mut impl FnMut(&str, String),
) -> Vec<ModelPool> {
    // Every name and alias routes to exactly one pool.
    let mut owner: HashMap<String, String> = HashMap::new();
    for (name, p) in &raw {
        if name.trim().is_empty() {
            err("models", "model name must not be empty".to_string());
        }
        owner.insert(name.clone(), name.clone());
        for (i, a) in p.aliases.iter().enumerate() {
            let at = format!("models.{name}.aliases[{i}]");
            if a.trim().is_empty() {
                err(&at, "alias must not be empty".to_string());
            } else if raw.contains_key(a) {
                err(&at, format!("\"{a}\" is also a model under models"));
            } else if let Some(prev) = owner.insert(a.clone(), name.clone()) {
                err(&at, format!("\"{a}\" is already an alias of \"{prev}\""));
            }
        }
    }
    let mut pools = Vec::with_capacity(raw.len());
    for (name, p) in raw {
        let at = format!("models.{name}");
        let listed = |b: &Backend| b.models.as_ref().is_none_or(|m| m.contains(&name));
        let urls = p.backends.map(|list| {
            let mut urls = Vec::with_capacity(list.len());
            for (i, u) in list.iter().enumerate() {
                let norm = parse_http_url(u, UrlUse::Backend)
                    .map(|url| {
                        let scheme = if url.https { "https" } else { "http" };
                        format!("{scheme}://{}{}", url.authority, url.base_path)
                    });
                match norm {
                    Ok(n) if backends.iter().any(|b| b.url == n) => urls.push(n),
                    Ok(n) => err(
                        &format!("{at}.backends[{i}]"),
                        format!("{n} is not one of the backends"),
                    ),
                    Err(e) => err(&format!("{at}.backends[{i}]"), e),
                }
            }
            if list.is_empty() {
                err(&format!("{at}.backends"), "must list at least one backend (omit the key to use the backends serving the model)".to_string());
            }
            urls
        });
        if urls.is_none() && !backends.iter().any(listed) {
            err(
                &at,
                "no backend serves this model (list it in a backend's models, or give backends)"
                    .to_string(),
            );
        }
        for (i, f) in p.fallbacks.iter().enumerate() {
            if owner.get(f) != Some(f) {
                err(
                    &format!("{at}.fallbacks[{i}]"),
                    format!("\"{f}\" is not a model under models"),
                );
            } else if *f == name {
                err(
                    &format!("{at}.fallbacks[{i}]"),
                    "a model cannot fall back to itself".to_string(),
                );
            }
        }
        pools.push(ModelPool {
            name,
            aliases: p.aliases,
            rewrite: p.rewrite,
            strategy: p.strategy.unwrap_or(default_strategy),
            backends: urls,
            fallbacks: p.fallbacks,
        });
    }
    pools
}

fn validate_routing(raw: RawRouting, err: &mut impl FnMut(&str, String)) -> Routing {
    let hash_key = parse_hash_key(&raw.hash_key).unwrap_or_else(|e| {
        err("routing.hash_key", e);
        Vec::new()
    });
    for (path, v) in [
        ("routing.queue_weight", raw.queue_weight),
        ("routing.kv_weight", raw.kv_weight),
        ("routing.inflight_weight", raw.inflight_weight),
        ("routing.kv_threshold", raw.kv_threshold),
        ("routing.prefix_cache.miss_cost", raw.prefix_cache.miss_cost),
    ] {
        if !(v.0.is_finite() && v.0 >= 0.0) {
            err(path, format!("must be a non-negative number, got {}", v.0));
        }
    }
    for (path, d) in [
        ("routing.metrics_interval", raw.metrics_interval),
        ("routing.metrics_stale_after", raw.metrics_stale_after),
    ] {
        if d.is_zero() {
            err(path, "must be greater than zero".to_string());
        }
    }
    let pc = raw.prefix_cache;
    for (path, v, lo, hi) in [
        (
            "routing.prefix_cache.block_bytes",
            pc.block_bytes,
            16,
            65536,
        ),
        ("routing.prefix_cache.max_blocks", pc.max_blocks, 1, 4096),
        (
            "routing.prefix_cache.capacity_blocks",
            pc.capacity_blocks,
            1,
            1 << 24,
        ),
    ] {
        if !(lo..=hi).contains(&v) {
            err(path, format!("must be between {lo} and {hi}, got {v}"));
        }
    }
    if raw.metrics_stale_after <= raw.metrics_interval {
        err(
            "routing.metrics_stale_after",
            format!(
                "must be longer than routing.metrics_interval ({:?}), or every reading is stale",
                raw.metrics_interval
            ),
        );
    }
    Routing {
        hash_key,
        max_imbalance: raw.max_imbalance,
        metrics_interval: raw.metrics_interval,
        metrics_stale_after: raw.metrics_stale_after,
        queue_weight: raw.queue_weight,
        kv_weight: raw.kv_weight,
        inflight_weight: raw.inflight_weight,
        kv_threshold: raw.kv_threshold,
        prefix_cache: raw.prefix_cache,
    }
}
