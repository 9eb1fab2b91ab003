//! Metrics of the shared rate-limit store (`ratelimit.store: redis`): whether it answered the
//! last sync, how long syncs take and how many failed. Registered only with that store, so a
//! proxy with per-process limits shows no series that could be mistaken for a healthy store.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};

/// One sync is one round trip to Redis: sub-millisecond on a LAN, and a sync slower than its
/// `sync_interval` (at most 10 s) counts as failed.
const SYNC_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

pub(crate) struct RateStoreMetrics {
    up: IntGauge,
    sync_seconds: Histogram,
    sync_errors: IntCounter,
}

impl RateStoreMetrics {
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let up = IntGauge::new(
            "llmproxy_ratelimit_store_up",
            "1 when the shared rate-limit store (Redis) answered the last sync, else 0",
        )?;
        let sync_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "llmproxy_ratelimit_sync_seconds",
                "Time of one successful rate-limit sync with the shared store (one round trip)",
            )
            .buckets(SYNC_BUCKETS.to_vec()),
        )?;
        let sync_errors = IntCounter::new(
            "llmproxy_ratelimit_sync_errors_total",
            "Rate-limit syncs with the shared store that failed or timed out",
        )?;
        registry.register(Box::new(up.clone()))?;
        registry.register(Box::new(sync_seconds.clone()))?;
        registry.register(Box::new(sync_errors.clone()))?;
        // Optimistic until the first sync, like the admission it describes.
        up.set(1);
        Ok(RateStoreMetrics {
            up,
            sync_seconds,
            sync_errors,
        })
    }

    pub(crate) fn synced(&self, seconds: f64) {
        self.up.set(1);
        self.sync_seconds.observe(seconds);
    }

    pub(crate) fn failed(&self) {
        self.up.set(0);
        self.sync_errors.inc();
    }
}
