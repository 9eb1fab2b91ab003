//! llmproxy: a thread-per-core reverse proxy on io_uring for self-hosted LLM inference servers.
//!
//! The tree shows the two sides. On a core (never blocks, `!Send`): `proxy` is one request in
//! order (conn → request → pick → forward → relay → account), `worker` the state a core owns
//! (load view, balancers, breakers, capacity queue, engine view). On the blocking threads:
//! `control` (control plane, health and breaker board, discovery, scrapers, keys-file watcher, the
//! rate-limit store sync, and the messages to the cores) and `usage` delivery. Below both:
//! `backends` (the table both sides read), `capacity` (process-wide counters), `upstream` (backend
//! connections and the per-core pool), `auth`, `openai`, `http1`, `config`, `telemetry`, `error`,
//! `encode`.
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

// Internal.
mod backends;
mod capacity;
mod control;
mod encode;
mod hash;
mod proxy;
mod upstream;
