//! The control side: threads that may block (the control plane, health checks and the breaker
//! board, DNS discovery, engine-metrics scrapers, the keys-file watcher, the rate-limit store sync; the plane also watches the TLS files) and the typed messages
//! they exchange with the cores. Nothing here runs on a core, and nothing here reads per-core
//! state: what a core needs to know reaches it as a `ControlMsg` in its inbox.

pub(crate) mod breakers;
pub(crate) mod discovery;
pub(crate) mod dns;
pub(crate) mod engine;
pub(crate) mod health;
pub(crate) mod keys_watch;
pub(crate) mod messages;
pub(crate) mod plane;
pub(crate) mod ratelimit_sync;
pub(crate) mod reload;
pub(crate) mod stamp;
pub(crate) mod tls_watch;

pub(crate) use messages::*;
pub(crate) use reload::ReloadError;
