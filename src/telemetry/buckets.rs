//! Histogram buckets shared by the request and queue metrics.

/// LLM latencies span a 1 ms cache hit to a 10 minute generation.
pub(super) const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];
