//! One core's routing decision counts by (strategy, reason), for
//! `llmproxy_routing_decisions_total`: counting a pick touches only this core's memory and never
//! allocates; the counts are folded into the registry on the core's tick (and on `/metrics`).

use std::cell::RefCell;

use crate::config::Strategy;
use crate::telemetry::metrics::RoutingMetrics;
use crate::worker::balance::Reason;

/// One core's routing decision counts by (strategy, reason), folded into the registry on its
/// tick: counting a pick touches only this core's memory and never allocates.
pub(crate) struct LocalDecisions {
    counts: RefCell<[[u64; Reason::ALL.len()]; STRATEGIES.len()]>,
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

impl Default for LocalDecisions {
    fn default() -> Self {
        LocalDecisions {
            counts: RefCell::new([[0; Reason::ALL.len()]; STRATEGIES.len()]),
        }
    }
}

impl LocalDecisions {
    pub(crate) fn record(&self, strategy: Strategy, reason: Reason) {
        let s = STRATEGIES.iter().position(|x| *x == strategy).unwrap_or(0);
        self.counts.borrow_mut()[s][reason.index()] += 1;
    }

    pub(crate) fn flush(&self, m: &RoutingMetrics) {
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
