//! The validated configuration: the types the rest of the proxy reads, and their defaults.
//!
//! A value of these types has passed `validate`, so readers trust it without re-checking (the
//! doc comment of a field states what was checked). Sections whose YAML shape is already final
//! (`timeouts`, `limits`, `health_check`, ...) deserialize straight into these types; the others
//! go through a `raw` shape first. Nothing here parses or validates.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::keys::Auth;
use super::parse::{de_duration, de_level, de_size, de_size_usize};

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
    /// `Some`: `listen` speaks TLS only.
    pub tls: Option<ListenTls>,
    /// Where per-key rate state lives (`ratelimit:`).
    pub ratelimit: super::RateLimit,
}

/// Most bytes of one SSE event held back for inspection, unless configured
/// (`usage.max_event_bytes`).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

impl Config {
    /// What is valid but probably not meant: `llmproxy check` prints these, startup logs them.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let hook = &self.usage_hook;
        if !hook.enabled && hook.url.is_some() {
            w.push(
                "usage_hook.url is set but usage_hook.enabled is false: no usage event will be \
                 sent (set enabled: true)"
                    .to_string(),
            );
        }
        w
    }

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
    /// Sequences the engine serves at once, each with a KV cache of its own (llama.cpp's
    /// `--parallel`); 0 = not declared (one shared cache, as vLLM and SGLang keep). Under
    /// `prefix_cache` a declared backend gets each request pinned to one of its slots.
    pub slots: usize,
    /// Sent upstream as `Authorization: Bearer <key>`; `None` = none (an empty value counts as none).
    pub api_key: Option<Secret>,
    /// Path (after `base_path`) of the engine's Prometheus metrics, scraped for `least_load`.
    pub metrics_path: String,
    /// `Some` for an `https://` URL (and only then).
    pub tls: Option<BackendTls>,
}

/// `tls:`: client TLS on `listen`. The files were read and checked at load (the certificate
/// unexpired, the key its own, the CA a CA); `server` is what they built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// `Some`: clients must present a certificate signed by this CA (mTLS).
    pub client_ca_file: Option<PathBuf>,
    /// How long a client may take to complete the handshake.
    pub handshake_timeout: Duration,
    pub server: crate::tls::ServerTls,
}

/// `backends[].tls`: how an `https://` backend is reached; `client` was built from the files at
/// load (default roots: the Mozilla set built in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTls {
    pub insecure_skip_verify: bool,
    pub client: crate::tls::ClientTls,
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

/// The order in which waiting requests get backend slots (`limits.scheduling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduling {
    /// Highest class first, keys taking turns within a class, process-wide.
    #[default]
    Fair,
    /// First come first served, per core.
    Fifo,
}

/// When a backend counts as full for admission (`limits.saturation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Saturation {
    /// At its `max_inflight` (never, without one).
    #[default]
    Inflight,
    /// Also when its engine's scraped queue says so (`capacity::engine_cap`): requests then wait
    /// in the proxy's queue, in the scheduler's order, rather than in the engine's FIFO.
    EngineQueue,
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
    /// The backend that probably holds most of the prompt in its KV cache, traded against
    /// in-flight load (`routing.prefix_cache`).
    PrefixCache,
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
            Strategy::PrefixCache => "prefix_cache",
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
    pub prefix_cache: PrefixCache,
}

/// `prefix_cache`'s tunables: how a prompt is cut into blocks, how many blocks are remembered
/// per backend, and what a cache miss is worth against load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping")]
pub struct PrefixCache {
    /// Bytes of prompt text per block (about 4 bytes per token: 256 ≈ 64 tokens).
    pub block_bytes: usize,
    /// Blocks hashed per request at most (block_bytes × max_blocks bytes of prompt).
    pub max_blocks: usize,
    /// Blocks remembered per backend (least recently used go first): size it for the engine's
    /// prefix cache (KV tokens × 4 / block_bytes; llama.cpp with `--cache-ram 0` keeps only its
    /// slots' last prompts: slots × blocks per prompt). An index larger than the engine's cache
    /// keeps sending prompts where they were evicted long ago.
    pub capacity_blocks: usize,
    /// A whole-prompt cache miss costs as much as this many requests in flight: a backend
    /// holding the prefix keeps it until it has this many more in flight than one without.
    /// 8 by default: at 4 (the first default) routing_sim's chats spilled seven times as often
    /// and lost 17% of mean TTFT to `consistent_hash(session)` by recomputing whole histories.
    pub miss_cost: Real,
}

impl Default for PrefixCache {
    fn default() -> Self {
        PrefixCache {
            block_bytes: 256,
            max_blocks: 128,
            capacity_blocks: 8192,
            miss_cost: Real(8.0),
        }
    }
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
            prefix_cache: PrefixCache::default(),
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

impl Timeouts {
    /// The shortest of the timeouts one connection's reads and writes run under, one after the
    /// other (its `Alarm` is never set further away than this).
    pub(crate) fn shortest_wait(&self) -> Duration {
        self.header
            .min(self.keepalive)
            .min(self.first_byte)
            .min(self.idle)
            .min(self.write)
    }
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
    /// Who gets a backend slot that frees while requests wait.
    pub scheduling: Scheduling,
    /// Under `fair`, a request that has waited this long goes before every class (no starvation).
    #[serde(deserialize_with = "de_duration")]
    pub promote_after: Duration,
    /// When a backend is full: at `max_inflight`, or also when its engine reports a queue.
    pub saturation: Saturation,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 10 << 20,
            max_header_bytes: 64 << 10,
            max_connections: 100_000,
            queue_size: 1024,
            queue_timeout: Duration::from_secs(30),
            scheduling: Scheduling::Fair,
            promote_after: Duration::from_secs(5),
            saturation: Saturation::Inflight,
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
    /// Most bytes of one SSE event the usage tap holds back to inspect; a longer event goes on
    /// to the client uninspected (its usage, if any, is not read).
    #[serde(deserialize_with = "de_size_usize")]
    pub max_event_bytes: usize,
    pub identity: Identity,
    /// Also write each usage event as a log line.
    pub log: bool,
}

impl Default for Usage {
    fn default() -> Self {
        Usage {
            inject_include_usage: true,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
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

/// A value that must never be printed (`Debug` shows `***`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(super) String);

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
