//! One backend's in-flight count and limits, process-wide: what `max_inflight` is counted in, and
//! the engine-queue cap (`limits.saturation: engine_queue`). Its own module because both the
//! capacity table (`capacity`) and the fair queue (`scheduler`), which hands a freed slot straight
//! to the next waiter, touch it.
//!
//! The engine-queue cap is a window learned from the engine's own `/metrics` (written by the
//! scraper thread, one per backend, read by every core):
//! - a reading with requests waiting in the engine sets the cap to this process's in-flight count
//!   at that moment minus the waiting ones (at least 1): the backend is full until that many of
//!   its requests are left, that is until the engine's queue has drained through completions;
//!   each completion after that lets one waiting request through;
//! - [`GROW_AFTER`] readings in a row with no queue while the cap binds raise it by an eighth (at
//!   least 1), so the window follows an engine that can take more (shorter prompts, a freed KV
//!   cache); each such probe may put a request or a few in the engine's queue until the next
//!   reading, which is why it is not done on every reading;
//! - the cap lapses when no reading renewed it within `routing.metrics_stale_after` (scrape
//!   failing, `/metrics` gone, backend removed): the backend is then limited by `max_inflight`
//!   alone, as without the switch.
//!
//! Why a window and not "full while the last reading showed a queue": a reading comes every
//! `metrics_interval`, so by the time it shows a queue, the requests sent since are already in the
//! engine's FIFO; letting one through per completion would keep that queue as long as it is,
//! forever. The window drains it first. It cannot stall: the cap is at least 1 and counts only
//! this process's requests, so with nothing of ours in flight one request always goes, and with
//! something in flight a completion (bounded by the request timeouts) frees a place. Its limits:
//! `waiting` is the engine's whole queue, so requests from other clients of the engine (another
//! proxy replica) shrink our window (down to 1), and between two readings the window is only as
//! right as the last one.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One backend's in-flight count and limits, process-wide.
#[derive(Default)]
pub(crate) struct Gate {
    /// `max_inflight`; 0 = unlimited.
    pub(crate) limit: AtomicUsize,
    /// Requests holding a slot (counted only while [`Gate::counts`]).
    pub(crate) used: AtomicUsize,
    /// Count every request, limited or not (`limits.saturation: engine_queue`: the engine cap is
    /// compared with the count).
    pub(crate) count_all: AtomicBool,
    /// The engine-queue cap; 0 = none.
    engine_cap: AtomicUsize,
    /// Until when (ms on [`now_ms`]'s clock) the engine cap holds without a new reading.
    engine_until: AtomicU64,
    /// Readings in a row with no queue while the cap bound.
    engine_streak: AtomicUsize,
}

impl Gate {
    /// Requests on this backend take a counted slot.
    pub(crate) fn counts(&self) -> bool {
        self.limit.load(Ordering::Relaxed) > 0 || self.count_all.load(Ordering::Relaxed)
    }

    /// The limit in force: `max_inflight` and a live engine cap, the lower; 0 = unlimited.
    pub(crate) fn cap(&self) -> usize {
        let limit = self.limit.load(Ordering::Relaxed);
        match (limit, self.engine_cap()) {
            (l, 0) => l,
            (0, e) => e,
            (l, e) => l.min(e),
        }
    }

    pub(crate) fn has_room(&self) -> bool {
        let cap = self.cap();
        cap == 0 || self.used.load(Ordering::Relaxed) < cap
    }

    /// The engine cap if a reading renewed it recently enough; 0 otherwise.
    pub(crate) fn engine_cap(&self) -> usize {
        let cap = self.engine_cap.load(Ordering::Acquire);
        if cap == 0 || now_ms() > self.engine_until.load(Ordering::Acquire) {
            return 0;
        }
        cap
    }

    /// A reading of the engine's queue, taken at `at`, good for `valid_for` (see the module
    /// header). Called by the backend's scraper only (one writer per backend).
    pub(crate) fn engine_reading(&self, waiting: f64, at: Instant, valid_for: Duration) {
        let used = self.used.load(Ordering::Acquire);
        let cap = self.engine_cap();
        let streak = self.engine_streak.load(Ordering::Relaxed);
        let (next, streak) = next_cap(cap, used, waiting, streak);
        self.engine_streak.store(streak, Ordering::Relaxed);
        let until = ms_of(at).saturating_add(u64::try_from(valid_for.as_millis()).unwrap_or(0));
        self.engine_until.store(until, Ordering::Release);
        self.engine_cap.store(next, Ordering::Release);
    }

    /// Forgets the engine cap (switch turned off).
    pub(crate) fn clear_engine_cap(&self) {
        self.engine_cap.store(0, Ordering::Release);
    }
}

/// Queue-free readings in a row, with the window binding, before it grows.
pub(crate) const GROW_AFTER: usize = 4;

/// The window rule (module header): `cap` now (0 = none), this process's requests in flight,
/// the engine's queue, and the binding queue-free readings before this one. Returns the new cap
/// and streak.
pub(crate) fn next_cap(cap: usize, used: usize, waiting: f64, streak: usize) -> (usize, usize) {
    // Gauges are floats; a queue is "some request waits" (a fraction is an average).
    if waiting >= 0.5 {
        // Saturating float-to-int cast: NaN is ruled out by `>=`, huge values clamp.
        let waiting = waiting.round() as usize;
        return (used.saturating_sub(waiting).max(1), 0);
    }
    if cap > 0 && used >= cap {
        if streak + 1 >= GROW_AFTER {
            return (cap.saturating_add((cap / 8).max(1)), 0);
        }
        return (cap, streak + 1);
    }
    (cap, 0)
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn ms_of(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch()).as_millis()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    ms_of(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_shrinks_the_window_to_what_the_engine_runs_of_ours() {
        // 24 of ours in flight, 16 of them waiting in the engine: 8 run.
        assert_eq!(next_cap(0, 24, 16.0, 0), (8, 0));
        // Whatever the window was, and a growth streak starts over.
        assert_eq!(next_cap(30, 24, 16.0, 3), (8, 0));
        // The queue is someone else's: one of ours still goes at a time, never none.
        assert_eq!(next_cap(0, 0, 5.0, 0).0, 1);
        assert_eq!(next_cap(8, 3, 40.0, 0).0, 1);
        assert_eq!(next_cap(0, 5, f64::INFINITY, 0).0, 1);
    }

    #[test]
    fn no_queue_grows_a_binding_window_now_and_then_and_leaves_the_rest() {
        // Binding (as many in flight as the cap): grows by an eighth, at least one, after
        // GROW_AFTER such readings in a row.
        let mut state = (8, 0);
        for _ in 1..GROW_AFTER {
            state = next_cap(state.0, 8, 0.0, state.1);
            assert_eq!(state.0, 8);
        }
        assert_eq!(next_cap(state.0, 8, 0.0, state.1), (9, 0));
        assert_eq!(next_cap(64, 64, 0.0, GROW_AFTER - 1), (72, 0));
        // Not binding: kept as it is, and the streak is broken.
        assert_eq!(next_cap(8, 5, 0.0, 2), (8, 0));
        // No window: none is made from a reading without a queue.
        assert_eq!(next_cap(0, 100, 0.0, 0), (0, 0));
        // A fraction below one half is no queue.
        assert_eq!(next_cap(0, 10, 0.4, 0), (0, 0));
        assert_eq!(next_cap(0, 10, f64::NAN, 0), (0, 0));
    }

    #[test]
    fn the_cap_limits_the_gate_and_lapses_without_readings() {
        let g = Gate::default();
        g.count_all.store(true, Ordering::Relaxed);
        assert!(g.counts() && g.has_room() && g.cap() == 0);
        g.used.store(4, Ordering::Relaxed);
        g.engine_reading(2.0, Instant::now(), Duration::from_secs(60));
        assert_eq!((g.engine_cap(), g.cap()), (2, 2));
        assert!(!g.has_room());
        // max_inflight below the window wins, and above it the window does.
        g.limit.store(1, Ordering::Relaxed);
        assert_eq!(g.cap(), 1);
        g.limit.store(10, Ordering::Relaxed);
        assert_eq!(g.cap(), 2);
        // A reading too old to count: the window is gone, max_inflight alone limits.
        g.engine_reading(2.0, Instant::now(), Duration::from_millis(5));
        assert_eq!(g.cap(), 2);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!((g.engine_cap(), g.cap()), (0, 10));
        assert!(g.has_room());
        g.engine_reading(2.0, Instant::now(), Duration::from_secs(60));
        g.clear_engine_cap();
        assert_eq!(g.cap(), 10);
    }
}
