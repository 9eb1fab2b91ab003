//! One core's routing decision counts by (strategy, reason), for
//! `llmproxy_routing_decisions_total`, and `prefix_cache`'s matched shares, for
//! `llmproxy_prefix_cache_matched_share`: counting a pick touches only this core's memory and
//! never allocates; both are folded into the registry on the core's tick (and on `/metrics`).

use std::cell::RefCell;

use prometheus::local::LocalHistogram;

use crate::config::Strategy;
use crate::telemetry::metrics::RoutingMetrics;
use crate::worker::balance::Reason;

/// One core's routing decision counts by (strategy, reason), folded into the registry on its
/// tick: counting a pick touches only this core's memory and never allocates.
pub(crate) struct LocalDecisions {
    counts: RefCell<[[u64; Reason::ALL.len()]; STRATEGIES.len()]>,
    shares: LocalHistogram,
}

const STRATEGIES: [Strategy; 7] = [
    Strategy::RoundRobin,
    Strategy::WeightedRoundRobin,
    Strategy::LeastConnections,
    Strategy::PowerOfTwo,
    Strategy::LeastLoad,
    Strategy::ConsistentHash,
    Strategy::PrefixCache,
];

impl LocalDecisions {
    pub(crate) fn new(m: &RoutingMetrics) -> Self {
        LocalDecisions {
            counts: RefCell::new([[0; Reason::ALL.len()]; STRATEGIES.len()]),
            shares: m.local_matched_share(),
        }
    }

    /// A `prefix_cache` pick's share of the prompt found on the backend it chose.
    pub(crate) fn matched_share(&self, share: f64) {
        self.shares.observe(share);
    }

    pub(crate) fn record(&self, strategy: Strategy, reason: Reason) {
        let s = STRATEGIES.iter().position(|x| *x == strategy).unwrap_or(0);
        self.counts.borrow_mut()[s][reason.index()] += 1;
    }

    pub(crate) fn flush(&self, m: &RoutingMetrics) {
        self.shares.flush();
        let mut counts = self.counts.borrow_mut();
        for (s, row) in counts.iter_mut().enumerate() {
            for (r, n) in row.iter_mut().enumerate() {
                if *n > 0 {
                    m.decided(STRATEGIES[s].as_str(), Reason::ALL[r].as_str(), *n);
                    *n = 0;
                }
            }
        }
    }
}
