//! llmproxy: a thread-per-core reverse proxy on io_uring for self-hosted LLM inference servers.
//!
//! The tree shows the two sides. On a core (never blocks, `!Send`): `proxy` is one request in
//! order (conn → request → pick → forward → relay → account), `worker` the state a core owns
//! (load view, balancers, breakers, capacity queue, engine view). On the blocking threads:
//! `control` (control plane, health and breaker board, discovery, scrapers, keys-file watcher, the
//! rate-limit store sync, and the messages to the cores) and `usage` delivery. Below both:
//! `backends` (the table both sides read), `capacity` (process-wide counters), `upstream` (backend
//! connections and the per-core pool), `auth`, `openai`, `http1`, `config`, `telemetry`, `error`,
//! `encode`, `batch` (per-core line batches for the log writer and the usage intake).

// Nothing outside tests may panic on what input, the network or the disk can make fail: every
// fallible call outside `#[cfg(test)]` is handled (clippy checks it in every non-test build).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![forbid(unsafe_code)]

// The public surface: what the binary, the benchmarks, the fuzz targets and the integration
// tests use. Inside these modules only that is `pub`; everything else is `pub(crate)`.
pub mod auth;
pub mod config;
pub mod error;
pub mod http1;
pub mod mock;
pub mod openai;
pub mod runtime;
pub mod telemetry;
pub mod usage;
pub mod worker;

/// Parsers of the control side that the fuzz targets (`tests/fuzz/`) drive, which are otherwise
/// internal: the DNS answer reader and the Prometheus text reader both read what the network
/// sends. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::control::dns::fuzz_answer as dns_answer;
    pub use crate::control::engine::prom::fuzz_engine_load as engine_load;
}

// Internal.
mod alarm;
mod backends;
mod batch;
mod capacity;
mod clock;
mod control;
mod encode;
mod gate;
mod hash;
mod proxy;
mod scheduler;
mod swar;
mod tls;
mod upstream;
