//! The control side: threads that may block (the control plane, health checks and the breaker
//! board, DNS discovery, engine-metrics scrapers, the keys-file watcher) and the typed messages
//! they exchange with the cores. Nothing here runs on a core, and nothing here reads per-core
//! state: what a core needs to know reaches it as a `ControlMsg` in its inbox.

pub mod breakers;
pub mod discovery;
pub mod dns;
pub mod engine;
pub mod health;
pub mod keys_watch;
pub mod messages;
pub mod plane;
pub mod reload;

pub use messages::*;
