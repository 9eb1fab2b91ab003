//! Engine load, as the cores see it: each core keeps the latest reading per backend in its own
//! `EngineView`, fed by `ControlMsg::Engine` from the scraper thread (`control::engine`); a reading
//! older than `routing.metrics_stale_after` is ignored so a backend whose metrics go silent is
//! judged by in-flight counts alone.
//!
//! Must never block a core: the view is plain `Cell`s read at pick time. It is indexed by backend
//! slot and follows the backend table: the worker resizes it and clears a slot whose backend
//! changed, and drops readings about a backend id that no longer holds the slot.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

pub use crate::control::engine::{EngineLoad, Reading};

/// One core's latest engine readings, by backend slot.
pub struct EngineView {
    readings: RefCell<Vec<Cell<Option<Reading>>>>,
    stale_after: Cell<Duration>,
}

impl EngineView {
    pub fn new(backends: usize, stale_after: Duration) -> Self {
        EngineView {
            readings: RefCell::new((0..backends).map(|_| Cell::new(None)).collect()),
            stale_after: Cell::new(stale_after),
        }
    }

    /// Follows the backend table's slot count (new slots have no reading).
    pub(crate) fn resize(&self, slots: usize) {
        self.readings
            .borrow_mut()
            .resize_with(slots, || Cell::new(None));
    }

    /// `routing.metrics_stale_after` changed (reload).
    pub(crate) fn set_stale_after(&self, d: Duration) {
        self.stale_after.set(d);
    }

    pub fn set(&self, backend: usize, reading: Reading) {
        let mut r = self.readings.borrow_mut();
        if backend >= r.len() {
            // Bounded by the backend count the scraper knows; never driven by client input.
            r.resize_with(backend + 1, || Cell::new(None));
        }
        r[backend].set(Some(reading));
    }

    /// Forgets a backend's reading (it was removed or its slot reused).
    pub(crate) fn clear(&self, backend: usize) {
        if let Some(c) = self.readings.borrow().get(backend) {
            c.set(None);
        }
    }

    /// The backend's reading if it is fresh at `now`.
    pub(crate) fn fresh(&self, backend: usize, now: Instant) -> Option<EngineLoad> {
        let r = self.readings.borrow().get(backend)?.get()?;
        (now.saturating_duration_since(r.at) <= self.stale_after.get()).then_some(r.load)
    }

    /// The latest reading whatever its age.
    #[cfg(test)]
    pub(crate) fn latest(&self, backend: usize) -> Option<Reading> {
        self.readings.borrow().get(backend)?.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_go_stale_and_the_view_grows() {
        let v = EngineView::new(1, Duration::from_secs(2));
        let t0 = Instant::now();
        let load = EngineLoad {
            waiting: 3.0,
            running: 1.0,
            kv_usage: Some(0.5),
        };
        assert_eq!(v.fresh(0, t0), None);
        v.set(0, Reading { load, at: t0 });
        assert_eq!(v.fresh(0, t0 + Duration::from_secs(1)), Some(load));
        assert_eq!(v.fresh(0, t0 + Duration::from_millis(2001)), None);
        assert!(v.latest(0).is_some());
        v.set(3, Reading { load, at: t0 });
        assert_eq!(v.fresh(3, t0), Some(load));
        assert_eq!(v.fresh(2, t0), None);
        v.clear(3);
        assert_eq!(v.fresh(3, t0), None);
        assert_eq!(v.fresh(99, t0), None);
    }
}
