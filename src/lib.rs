//! llmproxy: a thread-per-core reverse proxy on io_uring for self-hosted LLM inference servers.
//! The modules follow the path a request takes: `server` (accept, HTTP/1.1) → `route` → `balance`
//! → `upstream` → `proxy` (stream back, account); `worker` is the state one core owns, `control`
//! the messages between threads, `health` the probing thread (which also decides the per-backend
//! circuit breakers of `breaker`).
#![forbid(unsafe_code)]

pub mod account;
pub mod admission;
pub mod affinity;
pub mod auth;
pub mod backends;
pub mod balance;
pub mod breaker;
pub mod config;
pub mod control;
pub mod discovery;
pub mod dns;
pub mod encode;
pub mod engine;
pub mod error;
pub mod health;
pub mod http1;
pub mod logging;
pub mod metrics;
pub mod mock;
pub mod openai;
pub mod plane;
pub mod proxy;
pub mod ratelimit;
pub mod reject;
pub mod reload;
pub mod route;
pub mod runtime;
pub mod server;
pub mod upstream;
pub mod usage;
pub mod worker;
