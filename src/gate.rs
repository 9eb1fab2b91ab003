//! One backend's in-flight count and limit, process-wide: what `max_inflight` is counted in. Its
//! own module because both the capacity table (`capacity`) and the fair queue (`scheduler`), which
//! hands a freed slot straight to the next waiter, touch it.

use std::sync::atomic::{AtomicUsize, Ordering};

/// One backend's in-flight count and limit, process-wide.
#[derive(Default)]
pub(crate) struct Gate {
    /// 0 = unlimited.
    pub(crate) limit: AtomicUsize,
    pub(crate) used: AtomicUsize,
}

impl Gate {
    pub(crate) fn has_room(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        limit == 0 || self.used.load(Ordering::Relaxed) < limit
    }
}
