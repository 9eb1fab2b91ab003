//! Configuration: the YAML schema, its defaults, `${VAR}` expansion and validation.
//!
//! This module owns turning text into a [`Config`] that the rest of the proxy can trust: every key
//! has a default, unknown keys are errors, and every problem is reported as `path: reason` with
//! all problems of a file listed at once, so an operator fixes a config in one pass.
//!
//! It must not touch the network beyond resolving `listen`/`admin_listen`: backend hostnames are
//! resolved by `runtime` when the proxy starts, so `llmproxy check` works on any machine. It keeps
//! no global state, and it is a lower layer: it imports nothing of the request path (not even
//! `auth`, whose key digest lives here, next to the keys it names).
//!
//! A file travels `load` (YAML text → `${VAR}` expansion → the `raw` shapes) → `validate` (raw
//! shapes → the `schema` types, every problem collected) with `parse` supplying the value parsers
//! (durations, sizes, CPU lists, listen addresses, URLs). `keys` is the `auth:` section and the
//! `auth.keys_file` document, which is re-read at run time without the rest of the config.

mod keys;
mod load;
mod parse;
mod ratelimit;
mod raw;
mod schema;
mod validate;

#[cfg(test)]
mod tests;

pub use keys::{digest, parse_keys_file, ApiKey, Auth, KeyDigest, Priority};
pub use parse::parse_cpu_list;
pub use ratelimit::{OnStoreError, RateLimit, RateStore};
pub use schema::{
    Backend, BackendTls, Breaker, Config, DiscoverKind, Discovery, HashKey, HealthCheck,
    HookFormat, Identity, IoDriver, Limits, ListenTls, LogFormat, Logging, ModelPool, Pool,
    PrefixCache, Real, Retry, Routing, Saturation, Scheduling, Secret, Strategy, Timeouts, Usage,
    UsageHook, DEFAULT_MAX_EVENT_BYTES,
};

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

/// A deserialisation error as `path: reason` (`whole: reason` at the top level).
fn path_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>, whole: &str) -> ConfigError {
    ConfigError::Invalid(vec![path_line(e, whole)])
}

/// One `path: reason` line, the reason in the user's words (see `parse::in_users_words`).
fn path_line<E: std::fmt::Display>(e: serde_path_to_error::Error<E>, whole: &str) -> String {
    let path = e.path().to_string();
    let inner = parse::in_users_words(&e.into_inner().to_string());
    if path == "." {
        format!("{whole}: {inner}")
    } else {
        format!("{path}: {inner}")
    }
}
