//! When the usage sender's next POST is due: how many events wait for delivery and since when.
//!
//! A batch is due when `batch_max` events wait, or when the oldest waiting event has waited
//! `flush_interval`. Knowing "the oldest" after a POST took only part of what waited needs the
//! arrival times of what is left, so events are remembered in the groups the intake appended
//! them in (one per hand-over, a few hundred a second under load). Before, what was left after a
//! POST was sent at once as a partial batch, since its age was unknown: under steady load every
//! full batch was followed by a small one (69–75 events a POST on average instead of 100, measured
//! with the load benchmark's webhook), and each POST costs the sender two sleeps and wakes on a
//! core's CPU whatever its size.
//!
//! The groups are bounded: past `MAX_GROUPS` a new group joins the newest one and takes its
//! (older) time, so a long webhook outage cannot grow this; an event can then only look older
//! than it is, which makes its batch due sooner, never later.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Arrival groups kept (a webhook outage of any length fits in these).
const MAX_GROUPS: usize = 64;

/// Events that wait for delivery, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Waiting {
    /// (events, when they were appended), oldest first; no group is empty.
    groups: VecDeque<(usize, Instant)>,
    /// The sum of the groups' events.
    count: usize,
}

impl Waiting {
    /// Undelivered events of a previous run, of unknown number: counted as more than any batch,
    /// so that they are due at once.
    pub(crate) fn backlog(at: Instant) -> Waiting {
        let mut w = Waiting::default();
        w.added(usize::MAX / 2, at);
        w
    }

    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// When the oldest waiting event was appended.
    pub(crate) fn oldest(&self) -> Option<Instant> {
        self.groups.front().map(|g| g.1)
    }

    pub(crate) fn added(&mut self, events: usize, at: Instant) {
        if events == 0 {
            return;
        }
        self.count = self.count.saturating_add(events);
        let full = self.groups.len() >= MAX_GROUPS;
        match self.groups.back_mut() {
            Some(newest) if full => newest.0 = newest.0.saturating_add(events),
            _ => self.groups.push_back((events, at)),
        }
    }

    /// The oldest `events` were delivered (or dead-lettered).
    pub(crate) fn delivered(&mut self, mut events: usize) {
        self.count = self.count.saturating_sub(events);
        while events > 0 {
            let Some(oldest) = self.groups.front_mut() else {
                break;
            };
            if oldest.0 > events {
                oldest.0 -= events;
                break;
            }
            events -= oldest.0;
            self.groups.pop_front();
        }
    }

    /// Nothing waits after all (the spool is empty: a backlog's estimate was too high).
    pub(crate) fn clear(&mut self) {
        self.groups.clear();
        self.count = 0;
    }

    pub(crate) fn due(&self, batch_max: usize, flush_interval: Duration, now: Instant) -> bool {
        self.count >= batch_max
            || self
                .oldest()
                .is_some_and(|t| now.saturating_duration_since(t) >= flush_interval)
    }

    /// How long the sender may sleep before the oldest event is due (`idle` when none waits).
    pub(crate) fn wait(&self, flush_interval: Duration, idle: Duration, now: Instant) -> Duration {
        self.oldest().map_or(idle, |t| {
            flush_interval.saturating_sub(now.saturating_duration_since(t))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn what_is_left_after_a_batch_keeps_its_arrival_time() {
        let t0 = Instant::now();
        let mut w = Waiting::default();
        w.added(60, t0);
        w.added(60, t0 + Duration::from_millis(300));
        assert!(
            w.due(100, SECOND, t0 + Duration::from_millis(300)),
            "120 waiting"
        );
        w.delivered(100);
        assert_eq!(w.count(), 20);
        // The 20 left arrived at +300 ms: due a second after that, not at once.
        assert_eq!(w.oldest(), Some(t0 + Duration::from_millis(300)));
        assert!(!w.due(100, SECOND, t0 + Duration::from_millis(400)));
        assert_eq!(
            w.wait(SECOND, SECOND, t0 + Duration::from_millis(400)),
            Duration::from_millis(900)
        );
        assert!(w.due(100, SECOND, t0 + Duration::from_millis(1300)));
        w.delivered(20);
        assert_eq!((w.count(), w.oldest()), (0, None));
        assert!(!w.due(1, SECOND, t0 + Duration::from_secs(60)));
        assert_eq!(w.wait(SECOND, SECOND / 5, t0), SECOND / 5);
    }

    #[test]
    fn groups_are_bounded_and_only_ever_look_older() {
        let t0 = Instant::now();
        let mut w = Waiting::default();
        for i in 0..10_000u64 {
            w.added(1, t0 + Duration::from_millis(i));
        }
        assert_eq!(w.count(), 10_000);
        assert!(w.groups.len() <= MAX_GROUPS);
        let mut last = t0;
        while w.count() > 0 {
            let oldest = w.oldest().unwrap();
            assert!(oldest >= last, "oldest first");
            last = oldest;
            w.delivered(7);
        }
        // The last event arrived at +9,999 ms; merged, it is remembered as no younger than that.
        assert!(last <= t0 + Duration::from_millis(9_999));
        assert!(w.groups.is_empty());
    }

    #[test]
    fn a_backlog_is_due_at_once_and_clears() {
        let t0 = Instant::now();
        let mut w = Waiting::backlog(t0);
        assert!(w.due(100, SECOND, t0));
        w.delivered(100);
        assert!(w.due(100, SECOND, t0));
        w.clear();
        assert_eq!((w.count(), w.oldest()), (0, None));
        w.added(0, t0);
        assert_eq!(w.count(), 0, "an empty hand-over adds no group");
    }
}
