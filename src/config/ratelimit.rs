//! The `ratelimit:` section: where per-key rate state (`auth.keys[].rpm` / `.tpm`) lives — in
//! each process (`local`, the default) or shared by every replica through Redis (`redis`) — and
//! what happens while that store cannot be reached.
//!
//! Only parsing and checking happen here: the Redis URL is checked for its form (scheme, host,
//! database), never connected to, so `llmproxy check` works on any machine. The URL's password
//! usually comes from `${VAR}`; the validated URL is a `Secret` so it never reaches a log.

use std::time::Duration;

use serde::Deserialize;

use super::parse::de_duration;
use super::schema::Secret;

/// Where per-key rate state is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateStore {
    /// Per-process buckets: behind N replicas a key gets up to N × its limits.
    #[default]
    Local,
    /// Shared through Redis by every replica with the same `redis_url` and `key_prefix`.
    Redis,
}

/// What admission does while the store is unreachable, slow or failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Keep admitting from this process's buckets alone (per-process limits).
    #[default]
    Local,
    /// Admit every request of a rate-limited key (no limit at all).
    Allow,
    /// Refuse every request of a rate-limited key with 429 (keys without limits are unaffected).
    Deny,
}

impl OnStoreError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnStoreError::Local => "local",
            OnStoreError::Allow => "allow",
            OnStoreError::Deny => "deny",
        }
    }
}

/// The validated `ratelimit:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub store: RateStore,
    /// `redis://` or `rediss://`, parsed by the client library; `Some` iff `store` is `redis`.
    pub redis_url: Option<Secret>,
    /// How often each replica pushes its consumption and pulls the shared state; also the
    /// timeout of one exchange with the store. Between 10ms and 10s.
    pub sync_interval: Duration,
    pub on_store_error: OnStoreError,
    /// Prepended to every Redis key (`<prefix><key name>:rpm`); non-empty.
    pub key_prefix: String,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            store: RateStore::Local,
            redis_url: None,
            sync_interval: Duration::from_millis(100),
            on_store_error: OnStoreError::Local,
            key_prefix: "llmproxy:ratelimit:".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping with store, redis_url, sync_interval, on_store_error, key_prefix"
)]
pub(super) struct RawRateLimit {
    store: RateStore,
    redis_url: String,
    #[serde(deserialize_with = "de_duration")]
    sync_interval: Duration,
    on_store_error: OnStoreError,
    key_prefix: String,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        let d = RateLimit::default();
        RawRateLimit {
            store: d.store,
            redis_url: String::new(),
            sync_interval: d.sync_interval,
            on_store_error: d.on_store_error,
            key_prefix: d.key_prefix,
        }
    }
}

const MIN_SYNC: Duration = Duration::from_millis(10);
const MAX_SYNC: Duration = Duration::from_secs(10);

pub(super) fn validate_ratelimit(raw: RawRateLimit, errors: &mut Vec<String>) -> RateLimit {
    let mut err = |path: &str, reason: String| errors.push(format!("ratelimit.{path}: {reason}"));
    let url = raw.redis_url.trim().to_string();
    let redis_url = match (raw.store, url.is_empty()) {
        (RateStore::Redis, true) => {
            err("redis_url", "is required when store is redis".into());
            None
        }
        (_, false) => {
            // Checked even with `store: local`: a bad URL left in place bites when someone
            // switches the store on.
            if let Err(e) = check_redis_url(&url) {
                err("redis_url", e);
            }
            (raw.store == RateStore::Redis).then_some(Secret(url))
        }
        (RateStore::Local, true) => None,
    };
    if raw.sync_interval < MIN_SYNC || raw.sync_interval > MAX_SYNC {
        err(
            "sync_interval",
            format!(
                "must be between 10ms and 10s (got {})",
                humantime::format_duration(raw.sync_interval)
            ),
        );
    }
    if raw.key_prefix.is_empty() {
        err(
            "key_prefix",
            "must not be empty (it keeps the proxy's keys apart from everything else in Redis)"
                .into(),
        );
    }
    RateLimit {
        store: raw.store,
        redis_url,
        sync_interval: raw.sync_interval,
        on_store_error: raw.on_store_error,
        key_prefix: raw.key_prefix,
    }
}

/// The URL's form, as the client library reads it; the reason never repeats the URL (it may
/// hold a password).
fn check_redis_url(url: &str) -> Result<(), String> {
    let scheme = url.split_once("://").map(|(s, _)| s);
    match scheme {
        Some("redis") | Some("rediss") => {}
        _ => {
            return Err(
                "must be a redis:// or rediss:// URL (e.g. redis://redis:6379/0)".to_string(),
            )
        }
    }
    redis::IntoConnectionInfo::into_connection_info(url)
        .map(|_| ())
        .map_err(|e| {
            format!(
                "is not a valid Redis URL: {}",
                e.detail().unwrap_or("bad form")
            )
        })
}
