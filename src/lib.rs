//! llmproxy: a thread-per-core reverse proxy on io_uring for self-hosted LLM inference servers.
//! The modules follow the path a request takes: `server` (accept, HTTP/1.1) → `route` → `balance`
//! → `upstream` → `proxy` (stream back, account); `worker` is the state one core owns, `control`
//! the messages between threads, `health` the probing thread.
#![forbid(unsafe_code)]

pub mod account;
pub mod affinity;
pub mod balance;
pub mod config;
pub mod control;
pub mod engine;
pub mod error;
pub mod health;
pub mod http1;
pub mod logging;
pub mod metrics;
pub mod mock;
pub mod openai;
pub mod proxy;
pub mod route;
pub mod runtime;
pub mod server;
pub mod upstream;
pub mod usage;
pub mod worker;
