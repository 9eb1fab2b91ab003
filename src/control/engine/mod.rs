//! Engine load: what an inference server says about itself on its Prometheus `/metrics` (queue
//! depth, running batch, KV-cache use), scraped by a dedicated blocking thread (`scrape`) and
//! parsed by a small text-format reader (`prom`). Readings reach the cores as
//! `ControlMsg::Engine`; the cores' side is `worker::engine::EngineView`.

pub(crate) mod prom;
pub(crate) mod scrape;

use std::time::Instant;

/// One backend's load as its engine reports it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EngineLoad {
    /// Requests queued inside the engine, not yet scheduled.
    pub waiting: f64,
    /// Requests in the running batch.
    pub running: f64,
    /// KV-cache use in 0..=1, when the engine reports it (TGI does not).
    pub kv_usage: Option<f64>,
}

/// A reading and the moment it was taken (on the scraper thread; `Instant` is process-wide).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub load: EngineLoad,
    pub at: Instant,
}
