//! Configuration: the YAML schema, its defaults, `${VAR}` expansion and validation.
//!
//! This module owns turning text into a [`Config`] that the rest of the proxy can trust: every key
//! has a default, unknown keys are errors, and every problem is reported as `path: reason` with
//! all problems of a file listed at once, so an operator fixes a config in one pass.
//!
//! It must not touch the network beyond resolving `listen`/`admin_listen`: backend hostnames are
//! resolved by `runtime` when the proxy starts, so `llmproxy check` works on any machine. It keeps
//! no global state.

use std::collections::HashMap;
use std::env::VarError;
use std::fmt;
use std::net::{Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_yaml::Value;

/// The validated configuration of one proxy instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    /// `None`: admin endpoints are served on `listen`.
    pub admin_listen: Option<SocketAddr>,
    /// 0 = one worker per CPU available to the process.
    pub workers: usize,
    /// CPUs to pin workers to, one worker each; `None` = no pinning.
    pub cpus: Option<Vec<usize>>,
    pub shutdown_grace: Duration,
    pub io_driver: IoDriver,
    /// Never empty; URLs are unique.
    pub backends: Vec<Backend>,
    pub strategy: Strategy,
    pub routing: Routing,
    /// Model pools, sorted by name.
    pub models: Vec<ModelPool>,
    pub health_check: HealthCheck,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub retry: Retry,
    pub breaker: Breaker,
    pub pool: Pool,
    pub usage: Usage,
    pub usage_hook: UsageHook,
    pub logging: Logging,
    pub discovery: Discovery,
    pub auth: Auth,
}

/// One upstream inference server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Normalised `http://host:port[/base]`, no trailing slash; the backend's identity in metrics
    /// labels, logs and usage events.
    pub url: String,
    /// Lower-cased host name or IP address, without brackets for IPv6.
    pub host: String,
    pub port: u16,
    /// The `Host` header value: `host:port`, IPv6 in brackets.
    pub authority: String,
    /// `""` or `/prefix` without trailing slash; prepended to every proxied path.
    pub base_path: String,
    /// At least 1.
    pub weight: u32,
    /// `None` = serves any model; otherwise a non-empty list of non-empty names.
    pub models: Option<Vec<String>>,
    /// `Some(Dns)`: `host` names a set of replicas (every A/AAAA record), followed at run time.
    pub discover: Option<DiscoverKind>,
    /// The `backend` metrics label: the URL by default; for a discovered entry the prefix of
    /// each address's label (`NAME/IP:PORT`), by default the host name.
    pub name: Option<String>,
    /// Most requests in flight on this backend across the process; 0 = unlimited.
    pub max_inflight: usize,
    /// Sent upstream as `Authorization: Bearer <key>`; `None` = none (an empty value counts as none).
    pub api_key: Option<Secret>,
    /// Path (after `base_path`) of the engine's Prometheus metrics, scraped for `least_load`.
    pub metrics_path: String,
}

/// How a backend entry's addresses are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscoverKind {
    /// All A/AAAA records of the URL's host, re-resolved every `discovery.interval`.
    Dns,
}

/// Settings for `discover: dns` backend entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    pub interval: Duration,
    /// How long the last good answer is kept while resolution fails or comes back empty.
    pub stale_after: Duration,
    /// A DNS server queried over UDP; `None` = the system resolver (`/etc/resolv.conf`, hosts).
    pub resolver: Option<SocketAddr>,
}

impl Default for Discovery {
    fn default() -> Self {
        Discovery {
            interval: Duration::from_secs(5),
            stale_after: Duration::from_secs(300),
            resolver: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping")]
struct RawDiscovery {
    #[serde(deserialize_with = "de_duration")]
    interval: Duration,
    #[serde(deserialize_with = "de_duration")]
    stale_after: Duration,
    resolver: String,
}

impl Default for RawDiscovery {
    fn default() -> Self {
        let d = Discovery::default();
        RawDiscovery {
            interval: d.interval,
            stale_after: d.stale_after,
            resolver: String::new(),
        }
    }
}

/// Which kernel interface the workers' event loops use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoDriver {
    /// io_uring where the kernel allows it, else epoll.
    #[default]
    Auto,
    /// io_uring or a startup error.
    IoUring,
    /// epoll (readiness, then a syscall per read and write).
    Epoll,
}

/// How a backend is picked among the healthy ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    RoundRobin,
    WeightedRoundRobin,
    #[default]
    LeastConnections,
    /// Two random healthy candidates, the less loaded (in-flight / weight) wins.
    PowerOfTwo,
    /// Lowest score from the engines' own metrics (queue, KV cache) and in-flight counts.
    LeastLoad,
    /// Rendezvous hashing on a per-request key, guarded by `routing.max_imbalance`.
    ConsistentHash,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::WeightedRoundRobin => "weighted_round_robin",
            Strategy::LeastConnections => "least_connections",
            Strategy::PowerOfTwo => "power_of_two",
            Strategy::LeastLoad => "least_load",
            Strategy::ConsistentHash => "consistent_hash",
        }
    }

    /// Strategies that read the engines' `/metrics`.
    pub fn uses_engine_load(self) -> bool {
        self == Strategy::LeastLoad
    }
}

/// A non-negative finite number from the config (scoring weights, thresholds); compared by
/// bits so that `Config` stays `Eq`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(transparent)]
pub struct Real(pub f64);

impl PartialEq for Real {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Real {}

/// Where `consistent_hash` takes a request's key from; the first source that yields one wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A request header (lower-cased name).
    Header(String),
    /// The body's top-level `user` string.
    BodyUser,
    /// The raw text of the first N (1-4) chat messages, or the start of `prompt`.
    Prefix(usize),
}

/// Inputs of the LLM-aware strategies (`least_load`, `consistent_hash`) and the engine scraper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    pub hash_key: Vec<HashKey>,
    /// `consistent_hash` gives up affinity when its backend has this many more requests in flight
    /// than the least-loaded candidate.
    pub max_imbalance: u32,
    pub metrics_interval: Duration,
    /// Engine metrics older than this are ignored: the backend is scored by in-flight only.
    pub metrics_stale_after: Duration,
    /// `least_load` score = queue_weight × waiting + kv_weight × KV use (0-1) + inflight_weight ×
    /// in-flight, divided by the backend's weight.
    pub queue_weight: Real,
    pub kv_weight: Real,
    pub inflight_weight: Real,
    /// Backends whose KV cache use (0-1) is above this are avoided while any other is not.
    pub kv_threshold: Real,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            hash_key: vec![HashKey::Header("x-session-id".into())],
            max_imbalance: 8,
            metrics_interval: Duration::from_millis(250),
            metrics_stale_after: Duration::from_secs(2),
            queue_weight: Real(4.0),
            kv_weight: Real(8.0),
            inflight_weight: Real(1.0),
            kv_threshold: Real(0.9),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping")]
struct RawRouting {
    hash_key: String,
    max_imbalance: u32,
    #[serde(deserialize_with = "de_duration")]
    metrics_interval: Duration,
    #[serde(deserialize_with = "de_duration")]
    metrics_stale_after: Duration,
    queue_weight: Real,
    kv_weight: Real,
    inflight_weight: Real,
    kv_threshold: Real,
}

impl Default for RawRouting {
    fn default() -> Self {
        let d = Routing::default();
        RawRouting {
            hash_key: "header:x-session-id".into(),
            max_imbalance: d.max_imbalance,
            metrics_interval: d.metrics_interval,
            metrics_stale_after: d.metrics_stale_after,
            queue_weight: d.queue_weight,
            kv_weight: d.kv_weight,
            inflight_weight: d.inflight_weight,
            kv_threshold: d.kv_threshold,
        }
    }
}

/// A model pool: the backends serving one model (and its aliases) with a strategy of its own,
/// and the models to fall back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPool {
    pub name: String,
    /// Other names clients may use for this model.
    pub aliases: Vec<String>,
    /// Requests naming an alias reach the backend with `name` in the body's `model`.
    pub rewrite: bool,
    pub strategy: Strategy,
    /// Normalised URLs of the pool's backends; `None` = the backends whose `models` list `name`
    /// (and those serving any model).
    pub backends: Option<Vec<String>>,
    /// Pools tried in order when this one has no healthy backend or the backend rejects the
    /// prompt as longer than its context (before any byte reached the client).
    pub fallbacks: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default, expecting = "a mapping")]
struct RawPool {
    aliases: Vec<String>,
    rewrite: bool,
    strategy: Option<Strategy>,
    backends: Option<Vec<String>>,
    fallbacks: Vec<String>,
}

fn validate_models(
    raw: std::collections::BTreeMap<String, RawPool>,
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
                    .map(|url| format!("http://{}{}", url.authority, url.base_path));
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

/// `"header:x-session-id,body:user,prefix:2"` → the sources in order.
fn parse_hash_key(s: &str) -> Result<Vec<HashKey>, String> {
    let mut keys = Vec::new();
    for item in s.split(',').map(str::trim) {
        let key = match item.split_once(':') {
            Some(("header", name)) if valid_header_name(name) => {
                HashKey::Header(name.to_ascii_lowercase())
            }
            Some(("header", name)) => return Err(format!("invalid header name \"{name}\"")),
            Some(("body", "user")) => HashKey::BodyUser,
            Some(("prefix", n)) => match parse_digits(n) {
                Some(n @ 1..=4) => HashKey::Prefix(n),
                _ => return Err(format!("prefix takes 1 to 4 messages, got \"{n}\"")),
            },
            None if item == "prefix" => HashKey::Prefix(2),
            _ => {
                return Err(format!(
                    "unknown key source \"{item}\"; expected header:NAME, body:user or prefix[:N]"
                ))
            }
        };
        keys.push(key);
    }
    Ok(keys)
}

fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
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
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping")]
pub struct HealthCheck {
    #[serde(deserialize_with = "de_duration")]
    pub interval: Duration,
    /// Starts with `/`; appended to the backend's base path.
    pub path: String,
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Consecutive failed probes before a backend is marked down; at least 1.
    pub unhealthy_threshold: u32,
    /// Consecutive good probes before a down backend is marked up; at least 1.
    pub healthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: Duration::from_secs(10),
            path: "/health".to_string(),
            timeout: Duration::from_secs(2),
            unhealthy_threshold: 2,
            healthy_threshold: 1,
        }
    }
}

/// All non-zero.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping")]
pub struct Timeouts {
    #[serde(deserialize_with = "de_duration")]
    pub connect: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub header: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub first_byte: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub idle: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub request: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub keepalive: Duration,
    #[serde(deserialize_with = "de_duration")]
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

/// All non-zero.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping")]
pub struct Limits {
    #[serde(deserialize_with = "de_size")]
    pub max_body_bytes: u64,
    #[serde(deserialize_with = "de_size_usize")]
    pub max_header_bytes: usize,
    pub max_connections: usize,
    /// Requests that may wait, process-wide, for a backend below its `max_inflight`; 0 = none wait.
    pub queue_size: usize,
    /// Longest such a wait.
    #[serde(deserialize_with = "de_duration")]
    pub queue_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 10 << 20,
            max_header_bytes: 64 << 10,
            max_connections: 100_000,
            queue_size: 1024,
            queue_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping")]
pub struct Retry {
    /// Extra attempts on another backend, only before the client saw a byte.
    pub attempts: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { attempts: 2 }
    }
}

/// Passive outlier detection (`breaker`): a backend that keeps failing is taken out of rotation
/// for a cool-down, then tried with one probe request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping")]
pub struct Breaker {
    pub enabled: bool,
    /// Consecutive faults (as seen by one core) that open the breaker; at least 1.
    pub consecutive_failures: u32,
    /// The first cool-down; each re-open after a failed probe doubles it, up to `max_cooldown`.
    #[serde(deserialize_with = "de_duration")]
    pub cooldown: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub max_cooldown: Duration,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            enabled: true,
            consecutive_failures: 5,
            cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(300),
        }
    }
}

/// Per core.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping")]
pub struct Pool {
    /// 0 disables pooling.
    pub max_idle_per_backend: usize,
    #[serde(deserialize_with = "de_duration")]
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

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping")]
pub struct UsageHook {
    pub enabled: bool,
    /// An http(s) URL; always `Some` when `enabled`.
    pub url: Option<String>,
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Retries after the first attempt.
    pub retry: u32,
    /// `batch`: `{"events": [...]}` per POST; `single`: one event object per POST (the seed's).
    pub format: HookFormat,
    /// Most events in one batch.
    pub batch_max: usize,
    /// A batch is sent once its oldest event is this old, even if not full.
    #[serde(deserialize_with = "de_duration")]
    pub flush_interval: Duration,
    /// Durable on-disk log of events; `None` keeps undelivered events in memory only.
    pub spool_dir: Option<String>,
    #[serde(deserialize_with = "de_size")]
    pub spool_max_bytes: u64,
    /// How often appended events are fsynced (what a crash can lose at most).
    #[serde(deserialize_with = "de_duration")]
    pub spool_fsync: Duration,
    /// HMAC-SHA256 key for the `X-Llmproxy-Signature` header.
    pub secret: Option<String>,
    /// Extra headers on every POST (e.g. Authorization).
    pub headers: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookFormat {
    #[default]
    Batch,
    Single,
}

impl Default for UsageHook {
    fn default() -> Self {
        UsageHook {
            enabled: false,
            url: None,
            timeout: Duration::from_secs(1),
            retry: 2,
            format: HookFormat::Batch,
            batch_max: 100,
            flush_interval: Duration::from_secs(1),
            spool_dir: None,
            spool_max_bytes: 1 << 30,
            spool_fsync: Duration::from_secs(1),
            secret: None,
            headers: std::collections::BTreeMap::new(),
        }
    }
}

/// What the proxy does with token usage (extraction happens always).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping")]
pub struct Usage {
    /// Ask streaming backends for usage (`stream_options.include_usage`) when the client did not,
    /// and remove the extra usage chunk from what the client receives.
    pub inject_include_usage: bool,
    pub identity: Identity,
    /// Also write each usage event as a log line.
    pub log: bool,
}

impl Default for Usage {
    fn default() -> Self {
        Usage {
            inject_include_usage: true,
            identity: Identity::default(),
            log: false,
        }
    }
}

/// Where a request's tenant comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping")]
pub struct Identity {
    /// Header carrying the user id ("" = none).
    pub user_header: String,
    /// Top-level body field carrying the user id ("" = none); the header wins.
    pub user_body_field: String,
}

impl Default for Identity {
    fn default() -> Self {
        Identity {
            user_header: "x-user-id".into(),
            user_body_field: "user".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping")]
pub struct Logging {
    #[serde(deserialize_with = "de_level")]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// One `path: reason` line per problem.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

impl Config {
    /// Whether any strategy in use reads the engines' metrics (so the scrapers must run).
    pub fn uses_engine_load(&self) -> bool {
        self.strategies().any(Strategy::uses_engine_load)
    }

    /// The top-level strategy and every pool's.
    pub fn strategies(&self) -> impl Iterator<Item = Strategy> + '_ {
        std::iter::once(self.strategy).chain(self.models.iter().map(|p| p.strategy))
    }

    /// Whether any strategy in use hashes requests to backends (so keys must be computed).
    pub fn uses_affinity(&self) -> bool {
        self.strategies().any(|s| s == Strategy::ConsistentHash)
    }

    pub fn from_yaml_str(text: &str) -> Result<Config, ConfigError> {
        from_yaml_with_env(text, &|name| std::env::var(name))
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_yaml_str(&text)
    }

    /// A config with defaults for everything and these backend URLs (used by the `demo` command
    /// and tests); validates the URLs.
    pub fn with_backends(listen: SocketAddr, urls: &[String]) -> Result<Config, ConfigError> {
        let raw = RawConfig {
            listen: listen.to_string(),
            backends: urls
                .iter()
                .map(|url| RawBackend {
                    url: url.clone(),
                    ..RawBackend::default()
                })
                .collect(),
            ..RawConfig::default()
        };
        validate(raw)
    }
}

/// `"0-3,8"` -> `[0, 1, 2, 3, 8]`, in the order given.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    // libc's cpu_set_t holds this many CPUs; pinning beyond it would index out of bounds.
    const MAX_CPUS: usize = 1024;
    if s.trim().is_empty() {
        return Err("empty CPU list".to_string());
    }
    let number = |t: &str| -> Result<usize, String> {
        let t = t.trim();
        let n = parse_digits(t).ok_or_else(|| format!("invalid CPU number \"{t}\""))?;
        if n >= MAX_CPUS {
            return Err(format!("CPU {n} is out of range (0-{})", MAX_CPUS - 1));
        }
        Ok(n)
    };
    let mut cpus = Vec::new();
    for item in s.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(format!("empty item in CPU list \"{s}\""));
        }
        let (lo, hi) = match item.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let n = number(item)?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(format!("reversed range \"{item}\""));
        }
        for cpu in lo..=hi {
            if cpus.contains(&cpu) {
                return Err(format!("CPU {cpu} is listed twice"));
            }
            cpus.push(cpu);
        }
    }
    Ok(cpus)
}

// ---------------------------------------------------------------------------------------------
// Loading pipeline: YAML text -> Value -> ${VAR} expansion -> raw structs -> validated Config.

type EnvLookup<'a> = &'a dyn Fn(&str) -> Result<String, VarError>;

/// The environment is a parameter so tests never mutate the process environment.
fn from_yaml_with_env(text: &str, env: EnvLookup) -> Result<Config, ConfigError> {
    let mut value: Value = serde_yaml::from_str(text)
        .map_err(|e| ConfigError::Invalid(vec![format!("invalid YAML: {e}")]))?;
    // An empty file is a config with nothing set; report what is missing, not a type error.
    if value.is_null() {
        value = Value::Mapping(Default::default());
    }
    value
        .apply_merge()
        .map_err(|e| ConfigError::Invalid(vec![format!("invalid YAML: {e}")]))?;

    let mut errors = Vec::new();
    expand_env(&mut value, &mut String::new(), env, &mut errors);
    if !errors.is_empty() {
        return Err(ConfigError::Invalid(errors));
    }

    let raw: RawConfig =
        serde_path_to_error::deserialize(value).map_err(|e| path_error(e, "config"))?;
    validate(raw)
}

/// A deserialisation error as `path: reason` (`whole: reason` at the top level).
fn path_error<E: fmt::Display>(e: serde_path_to_error::Error<E>, whole: &str) -> ConfigError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    ConfigError::Invalid(vec![if path == "." {
        format!("{whole}: {inner}")
    } else {
        format!("{path}: {inner}")
    }])
}

/// Replaces `${VAR}` in every string value (not in keys), recording `path: reason` per failure.
fn expand_env(value: &mut Value, path: &mut String, env: EnvLookup, errors: &mut Vec<String>) {
    match value {
        Value::String(s) => match substitute_env(s, env) {
            Ok(Some(expanded)) => *s = expanded,
            Ok(None) => {}
            Err(reason) => {
                let at = if path.is_empty() { "config" } else { path };
                errors.push(format!("{at}: {reason}"));
            }
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                expand_env(item, path, env, errors);
                path.truncate(len);
            }
        }
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                match key {
                    Value::String(k) => path.push_str(k),
                    other => {
                        path.push_str(serde_yaml::to_string(other).unwrap_or_default().trim_end())
                    }
                }
                expand_env(item, path, env, errors);
                path.truncate(len);
            }
        }
        Value::Tagged(tagged) => expand_env(&mut tagged.value, path, env, errors),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// `Ok(None)` when `s` has no reference, so untouched strings are not reallocated.
fn substitute_env(s: &str, env: EnvLookup) -> Result<Option<String>, String> {
    if !s.contains("${") {
        return Ok(None);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated \"${\" (expected ${NAME})".to_string())?;
        let name = &after[..end];
        let valid_name = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(format!("invalid environment variable name \"{name}\""));
        }
        match env(name) {
            Ok(v) => out.push_str(&v),
            Err(VarError::NotPresent) => {
                return Err(format!("environment variable {name} is not set"))
            }
            Err(VarError::NotUnicode(_)) => {
                return Err(format!("environment variable {name} is not valid UTF-8"))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Some(out))
}

// ---------------------------------------------------------------------------------------------
// Raw forms of the parts whose YAML shape differs from the validated one. Sections whose YAML
// shape is already final deserialize straight into their public types and are checked below.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping of config keys")]
struct RawConfig {
    listen: String,
    admin_listen: Option<String>,
    workers: usize,
    cpus: Option<CpuSpec>,
    #[serde(deserialize_with = "de_duration")]
    shutdown_grace: Duration,
    io_driver: IoDriver,
    backends: Vec<RawBackend>,
    strategy: Strategy,
    routing: RawRouting,
    models: std::collections::BTreeMap<String, RawPool>,
    health_check: HealthCheck,
    timeouts: Timeouts,
    limits: Limits,
    retry: Retry,
    breaker: Breaker,
    pool: Pool,
    usage: Usage,
    usage_hook: UsageHook,
    logging: Logging,
    discovery: RawDiscovery,
    auth: RawAuth,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            listen: ":8080".to_string(),
            admin_listen: None,
            workers: 0,
            cpus: None,
            shutdown_grace: Duration::from_secs(30),
            io_driver: IoDriver::default(),
            backends: Vec::new(),
            strategy: Strategy::default(),
            routing: RawRouting::default(),
            models: Default::default(),
            health_check: HealthCheck::default(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            retry: Retry::default(),
            breaker: Breaker::default(),
            pool: Pool::default(),
            usage: Usage::default(),
            usage_hook: UsageHook::default(),
            logging: Logging::default(),
            discovery: RawDiscovery::default(),
            auth: RawAuth::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping with url, weight, models, discover, name, max_inflight, api_key, metrics_path"
)]
struct RawBackend {
    url: String,
    weight: u32,
    models: Option<Vec<String>>,
    discover: Option<DiscoverKind>,
    name: Option<String>,
    max_inflight: usize,
    api_key: Option<String>,
    metrics_path: String,
}

impl Default for RawBackend {
    fn default() -> Self {
        RawBackend {
            url: String::new(),
            weight: 1,
            models: None,
            discover: None,
            name: None,
            max_inflight: 0,
            api_key: None,
            metrics_path: "/metrics".to_string(),
        }
    }
}

/// `cpus: 3` is as natural to write as `cpus: "3"`; both mean CPU 3.
struct CpuSpec(String);

impl<'de> Deserialize<'de> for CpuSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = CpuSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a CPU list such as \"0-3,8\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CpuSpec, E> {
                Ok(CpuSpec(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<CpuSpec, E> {
                Ok(CpuSpec(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
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
        let normalised = format!("http://{}{}", url.authority, url.base_path);
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
            api_key: b.api_key.filter(|k| !k.is_empty()).map(Secret),
            metrics_path: b.metrics_path,
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
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            err(
                &format!("usage_hook.headers.{name}"),
                "is not a valid header name".to_string(),
            );
        }
    }

    let auth = validate_auth(raw.auth, &mut errors);

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

// ---------------------------------------------------------------------------------------------
// Client authentication (`auth:`) and the key list shared with `auth.keys_file`.

/// A value that must never be printed (`Debug` shows `***`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// SHA-256 of an API key: the only form in which keys are kept.
pub type KeyDigest = [u8; 32];

/// Client authentication: on when `keys` is non-empty or `keys_file` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub keys: Vec<ApiKey>,
    /// More keys in their own YAML/JSON file (`keys: [...]`), re-read when it changes.
    pub keys_file: Option<std::path::PathBuf>,
    /// How often `keys_file` is checked for a change (inode, size, mtime).
    pub keys_file_poll: Duration,
    /// Send the client's `Authorization` / `x-api-key` upstream (default: stripped).
    pub forward_client_key: bool,
}

impl Auth {
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty() || self.keys_file.is_some()
    }
}

/// One named client key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Appears as `key_id` in usage events and access logs.
    pub name: String,
    pub digest: KeyDigest,
    /// `None` = every model.
    pub models: Option<Vec<String>>,
    /// Requests per minute; 0 = unlimited.
    pub rpm: u64,
    /// Tokens per minute (charged from the usage of finished requests); 0 = unlimited.
    pub tpm: u64,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping with keys, keys_file, keys_file_poll, forward_client_key"
)]
struct RawAuth {
    keys: Vec<RawKey>,
    keys_file: Option<String>,
    #[serde(deserialize_with = "de_duration")]
    keys_file_poll: Duration,
    forward_client_key: bool,
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            keys: Vec::new(),
            keys_file: None,
            keys_file_poll: Duration::from_secs(5),
            forward_client_key: false,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping with name, key or key_sha256, models, rpm, tpm"
)]
struct RawKey {
    name: String,
    key: Option<String>,
    key_sha256: Option<String>,
    models: Vec<String>,
    rpm: u64,
    tpm: u64,
}

/// The shape of `auth.keys_file`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with a `keys` list")]
struct RawKeysFile {
    keys: Vec<RawKey>,
}

/// Raw keys shorter than this are refused: they could be guessed.
const MIN_KEY_LEN: usize = 16;

fn validate_auth(raw: RawAuth, errors: &mut Vec<String>) -> Auth {
    let keys = validate_keys(raw.keys, "auth.keys", errors);
    let keys_file = raw
        .keys_file
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from);
    Auth {
        keys,
        keys_file,
        keys_file_poll: raw.keys_file_poll,
        forward_client_key: raw.forward_client_key,
    }
}

fn validate_keys(raw: Vec<RawKey>, at: &str, errors: &mut Vec<String>) -> Vec<ApiKey> {
    let mut keys: Vec<ApiKey> = Vec::with_capacity(raw.len());
    for (i, k) in raw.into_iter().enumerate() {
        let at = format!("{at}[{i}]");
        let name = k.name.trim().to_string();
        let name_ok = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:@/".contains(&b));
        if !name_ok {
            errors.push(format!(
                "{at}.name: must be 1-128 characters of A-Z a-z 0-9 - _ . : @ /"
            ));
        } else if keys.iter().any(|o| o.name == name) {
            errors.push(format!("{at}.name: duplicate key name \"{name}\""));
        }
        let digest = match (k.key, k.key_sha256) {
            (Some(key), None) if key.len() >= MIN_KEY_LEN => Some(crate::auth::digest(&key)),
            (Some(_), None) => {
                errors.push(format!(
                    "{at}.key: must be at least {MIN_KEY_LEN} characters"
                ));
                None
            }
            (None, Some(hex)) => match parse_hex_digest(hex.trim()) {
                Some(d) => Some(d),
                None => {
                    errors.push(format!(
                        "{at}.key_sha256: must be 64 hex digits (sha256sum of the key)"
                    ));
                    None
                }
            },
            (Some(_), Some(_)) => {
                errors.push(format!("{at}: give key or key_sha256, not both"));
                None
            }
            (None, None) => {
                errors.push(format!("{at}: key or key_sha256 is required"));
                None
            }
        };
        for (j, m) in k.models.iter().enumerate() {
            if m.trim().is_empty() {
                errors.push(format!("{at}.models[{j}]: model name must not be empty"));
            }
        }
        let Some(digest) = digest else { continue };
        if let Some(o) = keys.iter().find(|o| o.digest == digest) {
            errors.push(format!("{at}: same key as \"{}\"", o.name));
            continue;
        }
        keys.push(ApiKey {
            name,
            digest,
            models: (!k.models.is_empty()).then_some(k.models),
            rpm: k.rpm,
            tpm: k.tpm,
        });
    }
    keys
}

/// Parses the text of an `auth.keys_file` (YAML or JSON; `${VAR}` is not expanded: the file is
/// the secret). Errors are `path: reason` lines.
pub fn parse_keys_file(text: &str) -> Result<Vec<ApiKey>, ConfigError> {
    let raw: RawKeysFile =
        serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text))
            .map_err(|e| path_error(e, "keys file"))?;
    let mut errors = Vec::new();
    let keys = validate_keys(raw.keys, "keys", &mut errors);
    if errors.is_empty() {
        Ok(keys)
    } else {
        Err(ConfigError::Invalid(errors))
    }
}

fn parse_hex_digest(s: &str) -> Option<KeyDigest> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Value parsers.

/// `":PORT"` (all interfaces), `"HOST:PORT"`, `"[v6]:PORT"`; a host name resolves to its first
/// address.
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("must not be empty; use \":PORT\" or \"HOST:PORT\"".to_string());
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("\"{s}\" has no port; use \":PORT\" or \"HOST:PORT\""))?;
    let port = parse_digits(port)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| format!("invalid port \"{port}\" in \"{s}\" (0-65535)"))?;
    if host.is_empty() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if host.starts_with('[') {
        return Err(format!("invalid IPv6 address in \"{s}\""));
    }
    if host.contains(':') {
        return Err(format!(
            "IPv6 addresses must be in brackets, e.g. \"[::1]:{port}\""
        ));
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve \"{host}\": {e}"))?
        .next()
        .ok_or_else(|| format!("\"{host}\" resolved to no address"))
}

#[derive(Clone, Copy, PartialEq)]
enum UrlUse {
    Backend,
    Webhook,
}

struct HttpUrl {
    host: String,
    port: u16,
    authority: String,
    base_path: String,
}

fn parse_http_url(s: &str, usage: UrlUse) -> Result<HttpUrl, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("is required (e.g. \"http://10.0.0.5:8000\")".to_string());
    }
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| format!("\"{s}\" has no scheme; expected http://HOST[:PORT][/PATH]"))?;
    let default_port = match (scheme.to_ascii_lowercase().as_str(), usage) {
        ("http", _) => 80,
        ("https", UrlUse::Webhook) => 443,
        ("https", UrlUse::Backend) => {
            return Err(
                "TLS upstreams are not supported; terminate TLS in front or use http://"
                    .to_string(),
            )
        }
        (_, UrlUse::Backend) => {
            return Err(format!(
                "unsupported scheme \"{scheme}\"; only http:// is supported"
            ))
        }
        (_, UrlUse::Webhook) => {
            return Err(format!(
                "unsupported scheme \"{scheme}\"; only http:// and https:// are supported"
            ))
        }
    };
    if rest.contains('#') {
        return Err("fragments (#...) are not allowed".to_string());
    }
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let path = match tail.split_once('?') {
        Some(_) if usage == UrlUse::Backend => {
            return Err("query strings (?...) are not allowed in a backend URL".to_string());
        }
        Some((path, _)) => path,
        None => tail,
    };
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("path must not contain whitespace".to_string());
    }
    if authority.contains('@') {
        return Err("credentials in the URL are not supported".to_string());
    }

    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (h, after) = bracketed
            .split_once(']')
            .ok_or_else(|| "unclosed '[' in host".to_string())?;
        if h.parse::<Ipv6Addr>().is_err() {
            return Err(format!("invalid IPv6 address \"{h}\""));
        }
        let port = match after {
            "" => None,
            a => Some(
                a.strip_prefix(':')
                    .ok_or_else(|| format!("unexpected \"{a}\" after IPv6 address"))?,
            ),
        };
        (h.to_ascii_lowercase(), port)
    } else {
        let (h, port) = match authority.split_once(':') {
            Some((_, p)) if p.contains(':') => {
                return Err("IPv6 addresses must be in brackets, e.g. http://[::1]:8000".into())
            }
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if h.is_empty() {
            return Err("missing host".to_string());
        }
        if !h
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Err(format!("invalid host \"{h}\""));
        }
        (h.to_ascii_lowercase(), port)
    };
    let port = match port {
        None => default_port,
        Some(p) => parse_digits(p)
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&n| n != 0)
            .ok_or_else(|| format!("invalid port \"{p}\" (1-65535)"))?,
    };
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok(HttpUrl {
        host,
        port,
        authority,
        base_path: path.trim_end_matches('/').to_string(),
    })
}

/// Digits only: `str::parse` would also take a leading `+`, which no config value means.
fn parse_digits(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A human duration (`250ms`, `10s`, `30m`, `1h`); a bare number is refused because its unit
/// would be a guess.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "duration \"{t}\" needs a unit, e.g. \"{t}s\" or \"{t}ms\""
        ));
    }
    humantime::parse_duration(t).map_err(|e| {
        format!("invalid duration \"{t}\": {e} (use e.g. \"250ms\", \"10s\", \"30m\", \"1h\")")
    })
}

/// Bytes with an optional unit: `KiB`/`MiB`/`GiB` and `K`/`M`/`G` are binary, `KB`/`MB`/`GB`
/// decimal (units are case-insensitive).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let usage = "expected bytes with an optional unit, e.g. 512, \"64KiB\", \"10MiB\", \"1GiB\"";
    if num.is_empty() {
        return Err(format!("invalid size \"{t}\": {usage}"));
    }
    if unit.starts_with('.') {
        return Err(format!(
            "invalid size \"{t}\": fractions are not supported; use a smaller unit"
        ));
    }
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => {
            return Err(format!(
                "invalid size \"{t}\": unknown unit \"{other}\"; {usage}"
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("size \"{t}\" is too large"))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a duration with a unit, e.g. \"10s\" or \"250ms\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            self.visit_str(&v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "duration {v} needs a unit and must not be negative"
            )))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "duration {v} needs a unit, e.g. \"{v}s\" → \"1500ms\""
            )))
        }
    }
    d.deserialize_any(V)
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a size such as 512, \"64KiB\" or \"10MiB\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("size {v} must not be negative")))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
            Err(E::custom(format!(
                "size {v}: fractions are not supported; use a smaller unit"
            )))
        }
    }
    d.deserialize_any(V)
}

fn de_size_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = de_size(d)?;
    usize::try_from(n).map_err(|_| de::Error::custom(format!("size {n} is too large")))
}

fn de_level<'de, D: Deserializer<'de>>(d: D) -> Result<log::LevelFilter, D::Error> {
    let s = String::deserialize(d)?;
    s.trim().parse().map_err(|_| {
        de::Error::custom(format!(
            "unknown log level \"{s}\", expected one of off, error, warn, info, debug, trace"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "backends: [{ url: \"http://127.0.0.1:8000\" }]\n";

    fn parse(yaml: &str) -> Result<Config, ConfigError> {
        from_yaml_with_env(yaml, &|name| match name {
            "BILLING_URL" => Ok("https://billing.example.com/usage".to_string()),
            "BACKEND_HOST" => Ok("vllm-7".to_string()),
            "EMPTY" => Ok(String::new()),
            _ => Err(VarError::NotPresent),
        })
    }

    fn ok(yaml: &str) -> Config {
        match parse(yaml) {
            Ok(c) => c,
            Err(e) => panic!("expected a valid config, got:\n{e}\n--- yaml:\n{yaml}"),
        }
    }

    fn errors(yaml: &str) -> Vec<String> {
        match parse(yaml) {
            Ok(c) => panic!("expected errors, got {c:?}"),
            Err(ConfigError::Invalid(lines)) => lines,
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    /// Asserts that some error line starts with `path: ` and contains `needle`.
    #[track_caller]
    fn assert_error(yaml: &str, path: &str, needle: &str) {
        let errs = errors(yaml);
        assert!(
            errs.iter()
                .any(|e| e.starts_with(&format!("{path}: ")) && e.contains(needle)),
            "no error at {path} containing {needle:?}; got {errs:#?}"
        );
    }

    fn with_backend(extra: &str) -> String {
        format!("{MINIMAL}{extra}")
    }

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
                api_key: None,
                metrics_path: "/metrics".into(),
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
        let c = match Config::from_yaml_str(include_str!("../../config/llmproxy.example.yaml")) {
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
        assert_eq!(
            a.keys[0].digest,
            crate::auth::digest("sk-team-a-0123456789")
        );
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
        let json =
            parse_keys_file(r#"{"keys": [{"name": "y", "key": "0123456789abcdef"}]}"#).unwrap();
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
            (
                "https://a:8000",
                "TLS upstreams are not supported; terminate TLS in front or use http://",
            ),
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
    fn all_problems_are_reported_at_once() {
        let errs = errors(
            r#"
listen: "nope"
backends:
  - url: https://a
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
    fn cpu_list_parsing() {
        assert_eq!(parse_cpu_list("0-3,8"), Ok(vec![0, 1, 2, 3, 8]));
        assert_eq!(parse_cpu_list("7"), Ok(vec![7]));
        assert_eq!(parse_cpu_list(" 2 - 3 , 0 "), Ok(vec![2, 3, 0]));
        assert_eq!(parse_cpu_list("5-5"), Ok(vec![5]));
        for (s, needle) in [
            ("", "empty CPU list"),
            ("0,", "empty item"),
            (",0", "empty item"),
            ("a", "invalid CPU number \"a\""),
            ("+1", "invalid CPU number"),
            ("-1", "invalid CPU number \"\""),
            ("1-", "invalid CPU number \"\""),
            ("1-2-3", "invalid CPU number \"2-3\""),
            ("3-1", "reversed range \"3-1\""),
            ("0-2,1", "CPU 1 is listed twice"),
            ("1,1", "listed twice"),
            ("4096", "out of range"),
        ] {
            match parse_cpu_list(s) {
                Ok(v) => panic!("{s:?} parsed as {v:?}"),
                Err(e) => assert!(e.contains(needle), "{s:?}: {e:?} lacks {needle:?}"),
            }
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("10").unwrap_err().contains("needs a unit"));
        assert!(parse_duration("ten seconds")
            .unwrap_err()
            .contains("invalid duration"));
        assert!(parse_duration("").is_err());

        assert_error(
            &with_backend("timeouts: { connect: 5 }\n"),
            "timeouts.connect",
            "needs a unit",
        );
        assert_error(
            &with_backend("timeouts: { connect: \"5\" }\n"),
            "timeouts.connect",
            "needs a unit",
        );
        assert_error(
            &with_backend("timeouts: { connect: 1.5 }\n"),
            "timeouts.connect",
            "needs a unit",
        );
        assert_error(
            &with_backend("timeouts: { connect: -1 }\n"),
            "timeouts.connect",
            "needs a unit",
        );
        assert_error(
            &with_backend("shutdown_grace: soon\n"),
            "shutdown_grace",
            "invalid duration",
        );
        assert_error(
            &with_backend("pool: { idle_timeout: 5x }\n"),
            "pool.idle_timeout",
            "invalid duration",
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2KB"), Ok(2_000));
        assert_eq!(parse_size("3MB"), Ok(3_000_000));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("16 kib"), Ok(16 << 10));
        assert_eq!(parse_size("100B"), Ok(100));
        assert!(parse_size("MiB").unwrap_err().contains("invalid size"));
        assert!(parse_size("10XB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("1.5MiB").unwrap_err().contains("fractions"));
        assert!(parse_size("99999999999GiB")
            .unwrap_err()
            .contains("too large"));

        let c = ok(&with_backend(
            "limits: { max_body_bytes: 2048, max_header_bytes: \"1KiB\" }\n",
        ));
        assert_eq!(c.limits.max_body_bytes, 2048);
        assert_eq!(c.limits.max_header_bytes, 1024);
        assert_error(
            &with_backend("limits: { max_body_bytes: 10Mb/s }\n"),
            "limits.max_body_bytes",
            "unknown unit",
        );
        assert_error(
            &with_backend("limits: { max_header_bytes: -5 }\n"),
            "limits.max_header_bytes",
            "negative",
        );
        assert_error(
            &with_backend("limits: { max_body_bytes: 0.5 }\n"),
            "limits.max_body_bytes",
            "fractions",
        );
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
        let e = Config::from_yaml_str(
            "backends: [{ url: \"${LLMPROXY_TEST_SURELY_UNSET_VARIABLE}\" }]\n",
        )
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

        let bad = vec!["https://x".to_string()];
        match Config::with_backends(listen, &bad) {
            Err(ConfigError::Invalid(e)) => {
                assert!(e[0].starts_with("backends[0].url: TLS"), "{e:?}")
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
}
