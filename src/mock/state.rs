//! The state of one running mock (per runtime): its options, counters, and what `/mock/control`
//! has set; and the guard that counts a request as active.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{unix_millis, EngineKnobs, MockOptions, MockStats};

/// Per-runtime state.
pub(super) struct Server {
    pub(super) opts: MockOptions,
    pub(super) stats: Arc<MockStats>,
    pub(super) port: u16,
    /// Status `/health` answers with (`None` = 200), set through `/mock/control`.
    pub(super) health_status: Cell<Option<u16>>,
    /// Status every inference request answers with (`None` = normal), set through `/mock/control`.
    pub(super) fail_status: Cell<Option<u16>>,
    /// Every Nth inference request is answered by a TCP reset (0 = never), set through
    /// `/mock/control`: a backend that drops every other connection.
    pub(super) reset_every: Cell<u64>,
    pub(super) inference_seen: Cell<u64>,
    /// What `/metrics` says, set through `/mock/control`.
    pub(super) engine: Cell<EngineKnobs>,
    /// Prompt + completion tokens beyond this get vLLM's context-length 400 (`/mock/control`).
    pub(super) context_limit: Cell<Option<u64>>,
    pub(super) next_id: Cell<u64>,
}

impl Server {
    /// Counts an inference request; true when this one is to be reset (`reset_every`).
    pub(super) fn reset_this_one(&self) -> bool {
        let every = self.reset_every.get();
        if every == 0 {
            return false;
        }
        let n = self.inference_seen.get() + 1;
        self.inference_seen.set(n);
        n.is_multiple_of(every)
    }

    pub(super) fn next_id(&self) -> u64 {
        let id = self.next_id.get() + 1;
        self.next_id.set(id);
        id
    }

    pub(super) fn note_disconnect(&self) {
        self.stats.disconnects.fetch_add(1, Ordering::Relaxed);
        self.stats
            .last_disconnect_unix_ms
            .store(unix_millis(), Ordering::Relaxed);
    }
}

/// Holds `MockStats::active` up for as long as an inference request is being served.
pub(super) struct ActiveGuard(Arc<MockStats>);

impl ActiveGuard {
    pub(super) fn new(stats: &Arc<MockStats>) -> Self {
        stats.active.fetch_add(1, Ordering::Relaxed);
        Self(stats.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}
