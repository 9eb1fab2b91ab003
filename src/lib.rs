//! llmproxy: a thread-per-core reverse proxy on io_uring for self-hosted LLM inference servers.
//!
//! The tree shows the two sides. On a core (never blocks, `!Send`): `proxy` is one request in
//! order (conn → request → pick → forward → relay → account), `worker` the state a core owns
//! (load view, balancers, breakers, capacity queue, engine view). On the blocking threads:
//! `control` (control plane, health and breaker board, discovery, scrapers, keys-file watcher, and
//! the messages to the cores) and `usage` delivery. Below both: `backends` (the table both sides
//! read), `capacity` (process-wide counters), `upstream` (backend connections and the per-core
//! pool), `auth`, `openai`, `http1`, `config`, `telemetry`, `error`, `encode`.
#![forbid(unsafe_code)]

pub mod auth;
pub mod backends;
pub mod capacity;
pub mod config;
pub mod control;
pub mod encode;
pub mod error;
pub mod hash;
pub mod http1;
pub mod mock;
pub mod openai;
pub mod proxy;
pub mod runtime;
pub mod telemetry;
pub mod upstream;
pub mod usage;
pub mod worker;
