//! The YAML shape of the sections whose validated form differs from what an operator writes
//! (strings still to parse, lists still to check), with the defaults of every key. Sections
//! whose YAML shape is already final deserialize straight into their `schema` types.
//!
//! Nothing here is checked: `validate` turns these into the `schema` types and is the only
//! reader, so the fields are visible to the `config` module and nowhere else.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::keys::RawAuth;
use super::parse::{de_duration, CpuSpec};
use super::ratelimit::RawRateLimit;
use super::schema::{
    Breaker, DiscoverKind, Discovery, HealthCheck, IoDriver, Limits, Logging, Pool, PrefixCache,
    Real, Retry, Routing, Strategy, Timeouts, Usage, UsageHook,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping of config keys")]
pub(super) struct RawConfig {
    pub(super) listen: String,
    pub(super) admin_listen: Option<String>,
    pub(super) workers: usize,
    pub(super) cpus: Option<CpuSpec>,
    #[serde(deserialize_with = "de_duration")]
    pub(super) shutdown_grace: Duration,
    pub(super) io_driver: IoDriver,
    pub(super) backends: Vec<RawBackend>,
    pub(super) strategy: Strategy,
    pub(super) routing: RawRouting,
    pub(super) models: BTreeMap<String, RawPool>,
    pub(super) health_check: HealthCheck,
    pub(super) timeouts: Timeouts,
    pub(super) limits: Limits,
    pub(super) retry: Retry,
    pub(super) breaker: Breaker,
    pub(super) pool: Pool,
    pub(super) usage: Usage,
    pub(super) usage_hook: UsageHook,
    pub(super) logging: Logging,
    pub(super) discovery: RawDiscovery,
    pub(super) auth: RawAuth,
    pub(super) tls: Option<RawListenTls>,
    pub(super) ratelimit: RawRateLimit,
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
            tls: None,
            ratelimit: RawRateLimit::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping with url, weight, models, discover, name, max_inflight, slots, api_key, metrics_path, tls"
)]
pub(super) struct RawBackend {
    pub(super) url: String,
    pub(super) weight: u32,
    pub(super) models: Option<Vec<String>>,
    pub(super) discover: Option<DiscoverKind>,
    pub(super) name: Option<String>,
    pub(super) max_inflight: usize,
    pub(super) slots: Option<usize>,
    pub(super) api_key: Option<String>,
    pub(super) metrics_path: String,
    pub(super) tls: Option<RawBackendTls>,
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
            slots: None,
            api_key: None,
            metrics_path: "/metrics".to_string(),
            tls: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping")]
pub(super) struct RawRouting {
    pub(super) hash_key: String,
    pub(super) max_imbalance: u32,
    #[serde(deserialize_with = "de_duration")]
    pub(super) metrics_interval: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub(super) metrics_stale_after: Duration,
    pub(super) queue_weight: Real,
    pub(super) kv_weight: Real,
    pub(super) inflight_weight: Real,
    pub(super) kv_threshold: Real,
    pub(super) prefix_cache: PrefixCache,
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
            prefix_cache: d.prefix_cache,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default, expecting = "a mapping")]
pub(super) struct RawPool {
    pub(super) aliases: Vec<String>,
    pub(super) rewrite: bool,
    pub(super) strategy: Option<Strategy>,
    pub(super) backends: Option<Vec<String>>,
    pub(super) fallbacks: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping")]
pub(super) struct RawDiscovery {
    #[serde(deserialize_with = "de_duration")]
    pub(super) interval: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub(super) stale_after: Duration,
    pub(super) resolver: String,
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

/// `tls:` on `listen`.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with cert_file, key_file, client_ca_file, handshake_timeout"
)]
pub(super) struct RawListenTls {
    pub(super) cert_file: PathBuf,
    pub(super) key_file: PathBuf,
    #[serde(default)]
    pub(super) client_ca_file: Option<PathBuf>,
    #[serde(
        default = "default_handshake_timeout",
        deserialize_with = "de_duration"
    )]
    pub(super) handshake_timeout: Duration,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `backends[].tls`.
#[derive(Deserialize, Default)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping with ca_file, cert_file, key_file, server_name, insecure_skip_verify"
)]
pub(super) struct RawBackendTls {
    pub(super) ca_file: Option<PathBuf>,
    pub(super) cert_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
    pub(super) server_name: Option<String>,
    pub(super) insecure_skip_verify: bool,
}
