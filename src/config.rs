//! The YAML configuration: schema, defaults, `${VAR}` expansion and validation. Parsing goes
//! through private "raw" serde structs that reject unknown keys; validation then collects every
//! problem as `path: reason` lines (never just the first) and produces the typed `Config` the
//! rest of the program reads. Nothing here touches the network except resolving `listen`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub workers: usize,
    pub cpus: Option<Vec<usize>>,
    pub shutdown_grace: Duration,
    pub backends: Vec<Backend>,
    pub strategy: Strategy,
    pub health_check: HealthCheck,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub retry: Retry,
    pub pool: Pool,
    pub usage_hook: UsageHook,
    pub logging: Logging,
}

#[derive(Debug, Clone)]
pub struct Backend {
    /// Normalised `http://host:port[/base]`, used for display and as the metrics label.
    pub url: String,
    pub host: String,
    pub port: u16,
    /// The `Host` header value sent upstream.
    pub authority: String,
    /// Prefix prepended to proxied paths ("" or "/prefix").
    pub base_path: String,
    pub weight: u32,
    /// `None` serves any model.
    pub models: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    RoundRobin,
    WeightedRoundRobin,
    LeastConnections,
}

#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub interval: Duration,
    pub path: String,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: Duration::from_secs(10),
            path: "/health".into(),
            timeout: Duration::from_secs(2),
            unhealthy_threshold: 2,
            healthy_threshold: 1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub connect: Duration,
    pub header: Duration,
    pub first_byte: Duration,
    pub idle: Duration,
    pub request: Duration,
    pub keepalive: Duration,
    pub write: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            header: Duration::from_secs(10),
            first_byte: Duration::from_secs(60),
            idle: Duration::from_secs(60),
            request: Duration::from_secs(30 * 60),
            keepalive: Duration::from_secs(75),
            write: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 10 << 20,
            max_header_bytes: 64 << 10,
            max_connections: 100_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Retry {
    /// Extra attempts on another backend.
    pub attempts: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { attempts: 2 }
    }
}

#[derive(Debug, Clone)]
pub struct Pool {
    pub max_idle_per_backend: usize,
    pub idle_timeout: Duration,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            max_idle_per_backend: 64,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone)]
pub struct UsageHook {
    pub enabled: bool,
    pub url: Option<String>,
    pub timeout: Duration,
    /// Retries after the first attempt.
    pub retry: u32,
}

impl Default for UsageHook {
    fn default() -> Self {
        UsageHook {
            enabled: false,
            url: None,
            timeout: Duration::from_secs(1),
            retry: 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone)]
pub struct Logging {
    pub level: log::LevelFilter,
    pub format: LogFormat,
    pub access_log: bool,
}

impl Default for Logging {
    fn default() -> Self {
        Logging {
            level: log::LevelFilter::Info,
            format: LogFormat::Json,
            access_log: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

// ---- raw serde layer: strings as written, unknown keys rejected --------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    workers: usize,
    cpus: Option<String>,
    shutdown_grace: Option<String>,
    backends: Vec<RawBackend>,
    strategy: Option<Strategy>,
    health_check: RawHealthCheck,
    timeouts: RawTimeouts,
    limits: RawLimits,
    retry: RawRetry,
    pool: RawPool,
    usage_hook: RawUsageHook,
    logging: RawLogging,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    url: String,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    models: Option<Vec<String>>,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawHealthCheck {
    interval: Option<String>,
    path: Option<String>,
    timeout: Option<String>,
    unhealthy_threshold: Option<u32>,
    healthy_threshold: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawTimeouts {
    connect: Option<String>,
    header: Option<String>,
    first_byte: Option<String>,
    idle: Option<String>,
    request: Option<String>,
    keepalive: Option<String>,
    write: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_body_bytes: Option<Size>,
    max_header_bytes: Option<Size>,
    max_connections: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawRetry {
    attempts: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawPool {
    max_idle_per_backend: Option<usize>,
    idle_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawUsageHook {
    enabled: Option<bool>,
    url: Option<String>,
    timeout: Option<String>,
    retry: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLogging {
    level: Option<String>,
    format: Option<LogFormat>,
    access_log: Option<bool>,
}

/// A size written as bytes (`1048576`) or with a unit (`64KiB`, `10MiB`, `1GB`).
#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

// ---- loading ------------------------------------------------------------------------------------

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_yaml_str(&text)
    }

    pub fn from_yaml_str(text: &str) -> Result<Config, ConfigError> {
        let mut value: serde_yaml::Value = serde_yaml::from_str(text)
            .map_err(|e| ConfigError::Invalid(vec![format!("invalid YAML: {e}")]))?;
        if value.is_null() {
            value = serde_yaml::Value::Mapping(Default::default());
        }
        let mut errors = Vec::new();
        expand_env(&mut value, &mut String::new(), &mut errors);
        if !errors.is_empty() {
            return Err(ConfigError::Invalid(errors));
        }
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { "config".into() } else { path };
            ConfigError::Invalid(vec![format!("{path}: {}", e.into_inner())])
        })?;
        validate(raw)
    }

    /// Defaults for everything, with these backends (the demo and tests use it).
    pub fn with_backends(listen: SocketAddr, urls: &[String]) -> Result<Config, ConfigError> {
        let raw = RawConfig {
            listen: Some(listen.to_string()),
            backends: urls
                .iter()
                .map(|u| RawBackend {
                    url: u.clone(),
                    weight: 1,
                    models: None,
                })
                .collect(),
            ..RawConfig::default()
        };
        validate(raw)
    }
}

/// Replaces `${VAR}` in every string scalar; a missing variable is an error at that path.
fn expand_env(v: &mut serde_yaml::Value, path: &mut String, errors: &mut Vec<String>) {
    match v {
        serde_yaml::Value::String(s) if s.contains("${") => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let Some(end) = after.find('}') else {
                    errors.push(format!("{}: unterminated ${{ in {s:?}", display_path(path)));
                    return;
                };
                let name = &after[..end];
                match std::env::var(name) {
                    Ok(val) => out.push_str(&val),
                    Err(_) => errors.push(format!(
                        "{}: environment variable {name} is not set",
                        display_path(path)
                    )),
                }
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        serde_yaml::Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                expand_env(item, path, errors);
                path.truncate(len);
            }
        }
        serde_yaml::Value::Mapping(map) => {
            for (k, item) in map.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k.as_str().unwrap_or("?"));
                expand_env(item, path, errors);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn display_path(p: &str) -> &str {
    if p.is_empty() {
        "config"
    } else {
        p
    }
}

/// Collects problems as `path: reason` lines.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, path: impl std::fmt::Display, why: impl std::fmt::Display) {
        self.0.push(format!("{path}: {why}"));
    }

    /// A required-positive duration with a default.
    fn duration(&mut self, path: &str, v: &Option<String>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(s) {
                Ok(d) if d.is_zero() => {
                    self.add(path, "must be greater than zero");
                    default
                }
                Ok(d) => d,
                Err(e) => {
                    self.add(path, e);
                    default
                }
            },
        }
    }

    fn size(&mut self, path: &str, v: &Option<Size>, default: u64) -> u64 {
        match v {
            None => default,
            Some(Size::Bytes(0)) => {
                self.add(path, "must be greater than zero");
                default
            }
            Some(Size::Bytes(n)) => *n,
            Some(Size::Text(s)) => match parse_size(s) {
                Ok(0) => {
                    self.add(path, "must be greater than zero");
                    default
                }
                Ok(n) => n,
                Err(e) => {
                    self.add(path, e);
                    default
                }
            },
        }
    }
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut p = Problems::default();

    let listen = match parse_listen(raw.listen.as_deref().unwrap_or(":8080")) {
        Ok(a) => Some(a),
        Err(e) => {
            p.add("listen", e);
            None
        }
    };
    let admin_listen = match raw.admin_listen.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(s) => match parse_listen(s) {
            Ok(a) => Some(a),
            Err(e) => {
                p.add("admin_listen", e);
                None
            }
        },
    };
    let cpus = match raw.cpus.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(s) => match parse_cpu_list(s) {
            Ok(c) => Some(c),
            Err(e) => {
                p.add("cpus", e);
                None
            }
        },
    };
    let shutdown_grace = p.duration(
        "shutdown_grace",
        &raw.shutdown_grace,
        Duration::from_secs(30),
    );

    if raw.backends.is_empty() {
        p.add("backends", "at least one backend is required");
    }
    let mut backends = Vec::with_capacity(raw.backends.len());
    for (i, b) in raw.backends.iter().enumerate() {
        let parsed = match parse_backend_url(&b.url) {
            Ok(u) => Some(u),
            Err(e) => {
                p.add(format!("backends[{i}].url"), e);
                None
            }
        };
        if b.weight == 0 {
            p.add(format!("backends[{i}].weight"), "must be at least 1");
        }
        if let Some(models) = &b.models {
            if models.is_empty() {
                p.add(
                    format!("backends[{i}].models"),
                    "must not be empty (omit it to serve any model)",
                );
            }
            if models.iter().any(|m| m.trim().is_empty()) {
                p.add(
                    format!("backends[{i}].models"),
                    "model names must not be empty",
                );
            }
        }
        if let Some(u) = parsed {
            if backends.iter().any(|x: &Backend| x.url == u.url) {
                p.add(
                    format!("backends[{i}].url"),
                    format!("duplicate backend {}", u.url),
                );
            }
            backends.push(Backend {
                weight: b.weight.max(1),
                models: b.models.clone(),
                ..u
            });
        }
    }

    let hc = &raw.health_check;
    let d = HealthCheck::default();
    let health_check = HealthCheck {
        interval: p.duration("health_check.interval", &hc.interval, d.interval),
        path: hc.path.clone().unwrap_or(d.path),
        timeout: p.duration("health_check.timeout", &hc.timeout, d.timeout),
        unhealthy_threshold: hc.unhealthy_threshold.unwrap_or(d.unhealthy_threshold),
        healthy_threshold: hc.healthy_threshold.unwrap_or(d.healthy_threshold),
    };
    if !health_check.path.starts_with('/') {
        p.add("health_check.path", "must start with '/'");
    }
    if health_check.unhealthy_threshold == 0 {
        p.add("health_check.unhealthy_threshold", "must be at least 1");
    }
    if health_check.healthy_threshold == 0 {
        p.add("health_check.healthy_threshold", "must be at least 1");
    }

    let t = &raw.timeouts;
    let d = Timeouts::default();
    let timeouts = Timeouts {
        connect: p.duration("timeouts.connect", &t.connect, d.connect),
        header: p.duration("timeouts.header", &t.header, d.header),
        first_byte: p.duration("timeouts.first_byte", &t.first_byte, d.first_byte),
        idle: p.duration("timeouts.idle", &t.idle, d.idle),
        request: p.duration("timeouts.request", &t.request, d.request),
        keepalive: p.duration("timeouts.keepalive", &t.keepalive, d.keepalive),
        write: p.duration("timeouts.write", &t.write, d.write),
    };

    let d = Limits::default();
    let max_header = p.size(
        "limits.max_header_bytes",
        &raw.limits.max_header_bytes,
        d.max_header_bytes as u64,
    );
    let limits = Limits {
        max_body_bytes: p.size(
            "limits.max_body_bytes",
            &raw.limits.max_body_bytes,
            d.max_body_bytes,
        ),
        max_header_bytes: usize::try_from(max_header).unwrap_or(usize::MAX),
        max_connections: raw.limits.max_connections.unwrap_or(d.max_connections),
    };
    if limits.max_connections == 0 {
        p.add("limits.max_connections", "must be at least 1");
    }
    if limits.max_header_bytes < 1024 {
        p.add("limits.max_header_bytes", "must be at least 1KiB");
    }

    let retry = Retry {
        attempts: raw.retry.attempts.unwrap_or(Retry::default().attempts),
    };
    let d = Pool::default();
    let pool = Pool {
        max_idle_per_backend: raw
            .pool
            .max_idle_per_backend
            .unwrap_or(d.max_idle_per_backend),
        idle_timeout: p.duration("pool.idle_timeout", &raw.pool.idle_timeout, d.idle_timeout),
    };

    let u = &raw.usage_hook;
    let d = UsageHook::default();
    let usage_hook = UsageHook {
        enabled: u.enabled.unwrap_or(d.enabled),
        url: u.url.clone().filter(|s| !s.trim().is_empty()),
        timeout: p.duration("usage_hook.timeout", &u.timeout, d.timeout),
        retry: u.retry.unwrap_or(d.retry),
    };
    match (&usage_hook.url, usage_hook.enabled) {
        (None, true) => p.add("usage_hook.url", "required when usage_hook.enabled is true"),
        (Some(url), _) => {
            if let Err(e) = check_webhook_url(url) {
                p.add("usage_hook.url", e);
            }
        }
        (None, false) => {}
    }

    let d = Logging::default();
    let level = match raw.logging.level.as_deref() {
        None => d.level,
        Some(s) => match s.trim().to_ascii_lowercase().parse::<log::LevelFilter>() {
            Ok(l) => l,
            Err(_) => {
                p.add(
                    "logging.level",
                    format!(
                        "unknown level {s:?} (expected off, error, warn, info, debug or trace)"
                    ),
                );
                d.level
            }
        },
    };
    let logging = Logging {
        level,
        format: raw.logging.format.unwrap_or(d.format),
        access_log: raw.logging.access_log.unwrap_or(d.access_log),
    };

    match (p.0.is_empty(), listen) {
        (true, Some(listen)) => Ok(Config {
            listen,
            admin_listen,
            workers: raw.workers,
            cpus,
            shutdown_grace,
            backends,
            strategy: raw.strategy.unwrap_or(Strategy::LeastConnections),
            health_check,
            timeouts,
            limits,
            retry,
            pool,
            usage_hook,
            logging,
        }),
        _ => Err(ConfigError::Invalid(p.0)),
    }
}

/// `:8080` → all interfaces; `host:port` resolved; `[v6]:port`.
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let full = if let Some(port) = s.strip_prefix(':') {
        format!("0.0.0.0:{port}")
    } else {
        s.to_string()
    };
    if let Ok(a) = full.parse::<SocketAddr>() {
        return Ok(a);
    }
    full.to_socket_addrs()
        .map_err(|e| format!("invalid address {s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

fn parse_backend_url(url: &str) -> Result<Backend, String> {
    let url = url.trim();
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if url.starts_with("https://") {
        return Err(
            "TLS upstreams are not supported; terminate TLS in front or use http://".into(),
        );
    } else {
        return Err(format!("{url:?} must start with http://"));
    };
    if rest.contains('?') || rest.contains('#') {
        return Err("query strings and fragments are not allowed".into());
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err("credentials in the URL are not supported (use api_key)".into());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("unterminated IPv6 address")?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err("garbage after the IPv6 address".into()),
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
    {
        return Err(format!("invalid host {host:?}"));
    }
    let port: u16 = match port {
        None => 80,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("invalid port {p:?}")),
            Ok(n) => n,
        },
    };
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let base_path = path.trim_end_matches('/').to_string();
    Ok(Backend {
        url: format!("http://{authority}{base_path}"),
        host,
        port,
        authority,
        base_path,
        weight: 1,
        models: None,
    })
}

fn check_webhook_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} must be an http:// or https:// URL"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() {
        return Err("missing host".into());
    }
    Ok(())
}

/// Human durations: `250ms`, `10s`, `30m`, `1h`. A bare number is ambiguous and refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("{s:?} needs a unit, e.g. \"{s}s\" or \"{s}ms\""));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// `512`, `64KiB`, `10MiB`, `1GiB`; `KB`/`MB`/`GB` are decimal, `K`/`M`/`G` binary.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (e.g. 512, 64KiB, 10MiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(format!("unknown size unit in {s:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// `"0-3,8"` → `[0, 1, 2, 3, 8]`.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for item in s.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(format!("empty item in CPU list {s:?}"));
        }
        let num = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| format!("invalid CPU number {x:?} in {s:?}"))
        };
        let (lo, hi) = match item.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let n = num(item)?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(format!("reversed CPU range {item:?}"));
        }
        if hi > 4095 {
            return Err(format!("CPU {hi} is out of range"));
        }
        for c in lo..=hi {
            if cpus.contains(&c) {
                return Err(format!("CPU {c} listed twice"));
            }
            cpus.push(c);
        }
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(yaml: &str) -> String {
        match Config::from_yaml_str(yaml) {
            Ok(_) => panic!("expected errors for:\n{yaml}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn seed_config_and_defaults() {
        let c = Config::from_yaml_str(
            r#"
listen: ":8080"
backends:
  - url: "http://vllm-0:8000"
    weight: 5
strategy: least_connections
health_check: { interval: 10s, path: /health, timeout: 2s }
usage_hook: { enabled: true, url: "https://billing.example.com/llm-usage", timeout: 1s, retry: 2 }
"#,
        )
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.backends[0].authority, "vllm-0:8000");
        assert_eq!(c.backends[0].weight, 5);
        assert_eq!(c.strategy, Strategy::LeastConnections);
        assert_eq!(c.timeouts.request, Duration::from_secs(1800));
        assert_eq!(c.limits.max_body_bytes, 10 << 20);
        assert_eq!(c.retry.attempts, 2);
        assert!(c.usage_hook.enabled);
        assert_eq!(c.logging.format, LogFormat::Json);
    }

    #[test]
    fn example_file_parses() {
        let c = Config::from_yaml_str(include_str!("../config/llmproxy.example.yaml")).unwrap();
        assert!(!c.backends.is_empty());
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let e = errors(
            r#"
listen: "nonsense"
backends:
  - url: "https://secure:443"
  - url: "http://a:8000"
    weight: 0
    models: []
  - url: "http://a:8000"
health_check: { path: health, unhealthy_threshold: 0 }
timeouts: { connect: 0s, idle: "10" }
usage_hook: { enabled: true }
logging: { level: loud }
cpus: "3-1"
"#,
        );
        for needle in [
            "listen:",
            "backends[0].url: TLS upstreams are not supported",
            "backends[1].weight: must be at least 1",
            "backends[1].models",
            "backends[2].url: duplicate",
            "health_check.path",
            "health_check.unhealthy_threshold",
            "timeouts.connect: must be greater than zero",
            "timeouts.idle: \"10\" needs a unit",
            "usage_hook.url: required",
            "logging.level",
            "cpus: reversed",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in:\n{e}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_types_name_the_path() {
        let e = errors("backends:\n  - url: \"http://a:1\"\n    wieght: 2\n");
        assert!(e.contains("backends[0]") && e.contains("wieght"), "{e}");
        let e = errors("backends:\n  - url: \"http://a:1\"\nstrategy: fastest\n");
        assert!(e.contains("strategy") && e.contains("round_robin"), "{e}");
        let e = errors("backends:\n  - url: \"http://a:1\"\ntimeouts: { conect: 1s }\n");
        assert!(e.contains("timeouts") && e.contains("conect"), "{e}");
        let e = errors("backends: []\n");
        assert!(
            e.contains("backends: at least one backend is required"),
            "{e}"
        );
        let e = errors("listen: \":8080\"\n");
        assert!(e.contains("backends: at least one"), "{e}");
    }

    #[test]
    fn env_substitution() {
        std::env::set_var("LLMPROXY_TEST_HOST", "10.1.2.3");
        let c =
            Config::from_yaml_str("backends:\n  - url: \"http://${LLMPROXY_TEST_HOST}:8000\"\n")
                .unwrap();
        assert_eq!(c.backends[0].host, "10.1.2.3");
        let e = errors("backends:\n  - url: \"http://${LLMPROXY_NOPE_NOT_SET}:8000\"\n");
        assert!(
            e.contains("backends[0].url: environment variable LLMPROXY_NOPE_NOT_SET is not set"),
            "{e}"
        );
    }

    #[test]
    fn urls_are_normalised() {
        let b = parse_backend_url("http://h:9000/v1-prefix/").unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.base_path.as_str()),
            ("h", 9000, "/v1-prefix")
        );
        assert_eq!(b.url, "http://h:9000/v1-prefix");
        let b = parse_backend_url("http://[::1]:8000").unwrap();
        assert_eq!(b.authority, "[::1]:8000");
        assert_eq!(parse_backend_url("http://h").unwrap().port, 80);
        assert!(parse_backend_url("http://:80").is_err());
        assert!(parse_backend_url("http://h:0").is_err());
        assert!(parse_backend_url("http://h:1?x=1").is_err());
        assert!(parse_backend_url("h:1").is_err());
    }

    #[test]
    fn durations_sizes_cpus() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("12XB").is_err());
        assert_eq!(parse_cpu_list("0-3,8").unwrap(), vec![0, 1, 2, 3, 8]);
        assert!(parse_cpu_list("1,,2").is_err());
        assert!(parse_cpu_list("1,1").is_err());
        assert!(parse_cpu_list("a").is_err());
        let c = Config::from_yaml_str(
            "backends:\n  - url: \"http://a:1\"\nlimits: { max_body_bytes: 1KiB, max_header_bytes: 4096 }\n",
        )
        .unwrap();
        assert_eq!(c.limits.max_body_bytes, 1024);
        assert_eq!(c.limits.max_header_bytes, 4096);
    }
}
