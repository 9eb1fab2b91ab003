//! Metrics of the wait for a backend slot, by priority class (`limits.scheduling`): how many wait,
//! how long those that got a slot waited, dispatches and promotions.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::buckets::SECONDS_BUCKETS;

/// Requests that waited for a backend slot, by class (`high`, `normal`, `low`): how many wait
/// now, how long each waited, how many were served and how many only after promotion.
pub(crate) struct QueueMetrics {
    waiting: IntGaugeVec,
    wait_seconds: HistogramVec,
    dispatches: IntCounterVec,
    promotions: prometheus::IntCounter,
}

impl QueueMetrics {
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let waiting = IntGaugeVec::new(
            Opts::new(
                "llmproxy_queue_waiting",
                "Requests waiting for a backend slot, by class (limits.scheduling: fair)",
            ),
            &["class"],
        )?;
        let wait_seconds = HistogramVec::new(
            HistogramOpts::new(
                "llmproxy_queue_wait_seconds",
                "Time a request waited for a backend slot before it got one, by class",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
            &["class"],
        )?;
        let dispatches = IntCounterVec::new(
            Opts::new(
                "llmproxy_queue_dispatches_total",
                "Requests that waited for a backend slot and got one, by class",
            ),
            &["class"],
        )?;
        let promotions = prometheus::IntCounter::new(
            "llmproxy_queue_promotions_total",
            "Requests served ahead of every class after waiting limits.promote_after",
        )?;
        registry.register(Box::new(waiting.clone()))?;
        registry.register(Box::new(wait_seconds.clone()))?;
        registry.register(Box::new(dispatches.clone()))?;
        registry.register(Box::new(promotions.clone()))?;
        for class in ["high", "normal", "low"] {
            waiting.with_label_values(&[class]);
            dispatches.with_label_values(&[class]);
        }
        Ok(QueueMetrics {
            waiting,
            wait_seconds,
            dispatches,
            promotions,
        })
    }

    /// A request that waited got its slot.
    pub(crate) fn dispatched(&self, class: &str, waited: Duration, promoted: bool) {
        self.dispatches.with_label_values(&[class]).inc();
        self.wait_seconds
            .with_label_values(&[class])
            .observe(waited.as_secs_f64());
        if promoted {
            self.promotions.inc();
        }
    }

    /// At each scrape: requests waiting now, per class.
    pub(crate) fn set_waiting(&self, per_class: &[(&str, usize)]) {
        for (class, n) in per_class {
            self.waiting.with_label_values(&[class]).set(*n as i64);
        }
    }
}
