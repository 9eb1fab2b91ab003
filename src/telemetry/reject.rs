//! Requests and connections the proxy refuses on purpose (authentication, rates, capacity):
//! one counter per reason (`llmproxy_rejected_total{reason}`, a fixed label set) and one log line
//! per rejection, rate-limited process-wide, because whoever causes rejections can cause as many
//! as they like.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prometheus::{IntCounter, IntCounterVec};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    MissingKey,
    InvalidKey,
    ModelNotAllowed,
    RequestRate,
    TokenRate,
    /// `ratelimit.on_store_error: deny` while the shared store fails.
    RateStoreDown,
    QueueFull,
    QueueTimeout,
    MaxConnections,
}

impl Reason {
    pub(crate) const ALL: [Reason; 9] = [
        Reason::MissingKey,
        Reason::InvalidKey,
        Reason::ModelNotAllowed,
        Reason::RequestRate,
        Reason::TokenRate,
        Reason::RateStoreDown,
        Reason::QueueFull,
        Reason::QueueTimeout,
        Reason::MaxConnections,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Reason::MissingKey => "missing_key",
            Reason::InvalidKey => "invalid_key",
            Reason::ModelNotAllowed => "model_not_allowed",
            Reason::RequestRate => "rate_limit_requests",
            Reason::TokenRate => "rate_limit_tokens",
            Reason::RateStoreDown => "rate_limit_store_down",
            Reason::QueueFull => "queue_full",
            Reason::QueueTimeout => "queue_timeout",
            Reason::MaxConnections => "max_connections",
        }
    }
}

/// Most rejection lines logged per second, process-wide.
const LINES_PER_SECOND: u64 = 10;

pub(crate) struct Rejections {
    counters: Vec<IntCounter>,
    budget: LogBudget,
}

impl Rejections {
    /// Resolves every reason's counter once, so a rejection costs one atomic add.
    pub(crate) fn new(vec: &IntCounterVec) -> Self {
        Rejections {
            counters: Reason::ALL
                .iter()
                .map(|r| vec.with_label_values(&[r.label()]))
                .collect(),
            budget: LogBudget::new(LINES_PER_SECOND),
        }
    }

    /// Counts a rejection and logs `what` unless the log budget of this second is spent.
    pub(crate) fn note(&self, reason: Reason, what: std::fmt::Arguments<'_>) {
        if let Some(c) = self.counters.get(reason as usize) {
            c.inc();
        }
        match self.budget.take() {
            Some(0) => log::warn!("rejected ({}): {what}", reason.label()),
            Some(n) => log::warn!(
                "rejected ({}): {what} ({n} earlier rejection lines suppressed)",
                reason.label()
            ),
            None => {}
        }
    }
}

/// At most `per_second` grants per wall-clock second; counts what it refused.
struct LogBudget {
    start: Instant,
    per_second: u64,
    /// `second << 20 | lines granted in that second`.
    state: AtomicU64,
    suppressed: AtomicU64,
}

impl LogBudget {
    fn new(per_second: u64) -> Self {
        LogBudget {
            start: Instant::now(),
            per_second: per_second.min(0xF_FFFF),
            state: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last grant)` when a line may be logged.
    fn take(&self) -> Option<u64> {
        self.take_at(self.start.elapsed().as_secs())
    }

    fn take_at(&self, second: u64) -> Option<u64> {
        let granted = self
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                let (sec, n) = (s >> 20, s & 0xF_FFFF);
                if sec != second {
                    Some(second << 20 | 1)
                } else if n < self.per_second {
                    Some(s + 1)
                } else {
                    None
                }
            })
            .is_ok();
        if granted {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_grants_per_second_and_reports_suppressed() {
        let b = LogBudget::new(2);
        assert_eq!(b.take_at(5), Some(0));
        assert_eq!(b.take_at(5), Some(0));
        assert_eq!(b.take_at(5), None);
        assert_eq!(b.take_at(5), None);
        assert_eq!(b.take_at(6), Some(2));
        assert_eq!(b.take_at(6), Some(0));
        assert_eq!(b.take_at(6), None);
    }

    #[test]
    fn labels_are_distinct() {
        let mut l: Vec<_> = Reason::ALL.iter().map(|r| r.label()).collect();
        l.sort();
        l.dedup();
        assert_eq!(l.len(), Reason::ALL.len());
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
