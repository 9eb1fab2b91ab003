//! The core side of the per-backend circuit breakers: each core counts its own consecutive-fault
//! streak per backend slot, cuts a backend off at once when the streak reaches the threshold, and
//! holds the breaker phase the health thread broadcast (`control::breakers` owns the state machine
//! and says why the work is split this way). The pick path only reads core-local state and, for
//! a half-open backend, one atomic: no lock, no allocation.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub(crate) use crate::control::breakers::{Phase, Report};
use crate::error::Verdict;

/// One core's breaker view and fault streaks, by backend slot.
#[derive(Default)]
pub(crate) struct CoreBreakers {
    slots: RefCell<Vec<Slot>>,
}

#[derive(Debug, Clone)]
struct Slot {
    id: u64,
    phase: Phase,
    streak: u32,
    /// This core holds the half-open probe.
    probing: bool,
}

impl Slot {
    fn new(id: u64) -> Slot {
        Slot {
            id,
            phase: Phase::Closed,
            streak: 0,
            probing: false,
        }
    }
}

impl CoreBreakers {
    /// Grows or shrinks to `n` slots; new slots are free (id 0).
    pub(crate) fn resize(&self, n: usize) {
        self.slots.borrow_mut().resize(n, Slot::new(0));
    }

    /// `slot` now holds backend `id`: its breaker starts closed with no streak.
    pub(crate) fn reset(&self, slot: usize, id: u64) {
        if let Some(s) = self.slots.borrow_mut().get_mut(slot) {
            *s = Slot::new(id);
        }
    }

    /// The health thread's decision for backend `id` in `slot` (ignored if it left the slot).
    pub(crate) fn set(&self, slot: usize, id: u64, phase: Phase) {
        let mut slots = self.slots.borrow_mut();
        let Some(s) = slots.get_mut(slot).filter(|s| s.id == id) else {
            return;
        };
        // A re-sent copy of what this core already has keeps its streak and its probe claim.
        match (&s.phase, &phase) {
            (Phase::Closed, Phase::Closed) | (Phase::Open, Phase::Open) => return,
            (Phase::HalfOpen(old), Phase::HalfOpen(new)) if Arc::ptr_eq(old, new) => return,
            _ => {}
        }
        s.probing = false;
        if matches!(phase, Phase::Closed) {
            s.streak = 0;
        }
        s.phase = phase;
    }

    pub(crate) fn phase(&self, slot: usize) -> Phase {
        self.slots
            .borrow()
            .get(slot)
            .map_or(Phase::Closed, |s| s.phase.clone())
    }

    /// May a request be sent to `slot`? (Half-open: only while nobody has taken the probe.)
    pub(crate) fn eligible(&self, slot: usize) -> bool {
        match self.slots.borrow().get(slot).map(|s| &s.phase) {
            None | Some(Phase::Closed) => true,
            Some(Phase::Open) => false,
            Some(Phase::HalfOpen(token)) => !token.load(Ordering::Relaxed),
        }
    }

    /// Called once a backend is picked: takes the probe if the breaker is half-open. False when
    /// another core took it first (pick again without this backend).
    pub(crate) fn claim(&self, slot: usize) -> bool {
        let mut slots = self.slots.borrow_mut();
        let Some(s) = slots.get_mut(slot) else {
            return true;
        };
        match &s.phase {
            Phase::Closed => true,
            Phase::Open => false,
            Phase::HalfOpen(token) => {
                let won = token
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok();
                s.probing |= won;
                won
            }
        }
    }

    /// The token of the probe this core holds on `slot`, if any.
    pub(crate) fn probe(&self, slot: usize) -> Option<Arc<AtomicBool>> {
        match self.slots.borrow().get(slot) {
            Some(Slot {
                probing: true,
                phase: Phase::HalfOpen(token),
                ..
            }) => Some(token.clone()),
            _ => None,
        }
    }

    /// The request carrying the probe `token` ended without a verdict (its client went away):
    /// hand the probe back at once so that another request, on any core, can take it.
    pub(crate) fn release(&self, slot: usize, token: &Arc<AtomicBool>) {
        let mut slots = self.slots.borrow_mut();
        let Some(s) = slots.get_mut(slot) else {
            return;
        };
        if let Phase::HalfOpen(current) = &s.phase {
            if s.probing && Arc::ptr_eq(current, token) {
                s.probing = false;
                token.store(false, Ordering::Release);
            }
        }
    }

    /// Records one exchange with `slot`; returns what the health thread must hear, if anything.
    /// A trip also opens the breaker on this core at once.
    pub(crate) fn record(&self, slot: usize, v: Verdict, threshold: u32) -> Option<Report> {
        let mut slots = self.slots.borrow_mut();
        let s = slots.get_mut(slot)?;
        if s.probing {
            s.probing = false;
            let ok = v != Verdict::Fault;
            if !ok {
                s.phase = Phase::Open;
            }
            return Some(Report::Probe { ok });
        }
        if !matches!(s.phase, Phase::Closed) {
            // A request that started before the breaker opened: the decision is made.
            return None;
        }
        match v {
            Verdict::Ok => s.streak = 0,
            Verdict::Backpressure => {}
            Verdict::Fault => {
                s.streak += 1;
                if s.streak >= threshold {
                    s.streak = 0;
                    s.phase = Phase::Open;
                    return Some(Report::Trip);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Breaker as Settings;
    use crate::control::breakers::*;
    use std::time::{Duration, Instant};

    fn settings() -> Settings {
        Settings {
            enabled: true,
            consecutive_failures: 3,
            cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(35),
        }
    }

    fn core(id: u64) -> CoreBreakers {
        let c = CoreBreakers::default();
        c.resize(1);
        c.reset(0, id);
        c
    }

    #[test]
    fn the_threshold_trips_and_a_success_resets_the_streak() {
        let c = core(7);
        assert_eq!(c.record(0, Verdict::Fault, 3), None);
        assert_eq!(c.record(0, Verdict::Fault, 3), None);
        assert_eq!(c.record(0, Verdict::Ok, 3), None);
        assert_eq!(c.record(0, Verdict::Fault, 3), None);
        // The health thread's periodic re-send of "closed" does not reset the streak.
        c.set(0, 7, Phase::Closed);
        assert_eq!(c.record(0, Verdict::Fault, 3), None);
        assert!(c.eligible(0));
        assert_eq!(c.record(0, Verdict::Fault, 3), Some(Report::Trip));
        // Open on this core at once, before the health thread answers.
        assert!(!c.eligible(0));
        assert!(!c.claim(0));
        // Late results of requests already in flight change nothing.
        assert_eq!(c.record(0, Verdict::Fault, 3), None);
    }

    #[test]
    fn client_errors_and_backpressure_never_trip_nor_reset() {
        let c = core(1);
        c.record(0, Verdict::Fault, 3);
        c.record(0, Verdict::Fault, 3);
        for _ in 0..100 {
            // 429 / 503: neither counted nor a reset of the run of faults.
            assert_eq!(c.record(0, Verdict::of_status(503), 3), None);
            assert_eq!(c.record(0, Verdict::of_status(429), 3), None);
        }
        assert!(c.eligible(0));
        assert_eq!(c.record(0, Verdict::of_status(404), 3), None);
        for _ in 0..100 {
            assert_eq!(c.record(0, Verdict::of_status(400), 3), None);
        }
        assert!(c.eligible(0));
        assert_eq!(c.record(0, Verdict::Fault, 3), None);
        assert_eq!(c.record(0, Verdict::Fault, 3), None);
        assert_eq!(c.record(0, Verdict::Fault, 3), Some(Report::Trip));
    }

    #[test]
    fn cool_down_then_half_open_then_close() {
        let s = settings();
        let probe = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut m = Machine::default();
        assert!(m.tick(t0, &s, probe).is_none());
        let c = m.report(Report::Trip, t0, &s).unwrap();
        assert!(c.transition && matches!(c.phase, Phase::Open));
        // A second trip while open (another core) is not a new transition.
        assert!(m.report(Report::Trip, t0, &s).is_none());
        assert!(m.tick(t0 + Duration::from_secs(9), &s, probe).is_none());
        let c = m.tick(t0 + Duration::from_secs(10), &s, probe).unwrap();
        assert!(c.transition && matches!(c.phase, Phase::HalfOpen(_)));
        let c = m.report(Report::Probe { ok: true }, t0, &s).unwrap();
        assert!(c.transition && matches!(c.phase, Phase::Closed));
    }

    #[test]
    fn a_failed_probe_reopens_with_a_doubled_capped_cool_down() {
        let s = settings();
        let probe = Duration::from_secs(600);
        let mut now = Instant::now();
        let mut m = Machine::default();
        m.report(Report::Trip, now, &s);
        let mut waited = Vec::new();
        for _ in 0..4 {
            let opened = now;
            while m.tick(now, &s, probe).is_none() {
                now += Duration::from_secs(1);
            }
            waited.push(now.duration_since(opened).as_secs());
            let c = m.report(Report::Probe { ok: false }, now, &s).unwrap();
            assert!(matches!(c.phase, Phase::Open));
        }
        assert_eq!(waited, vec![10, 20, 35, 35]);
        // Closing resets the back-off.
        while m.tick(now, &s, probe).is_none() {
            now += Duration::from_secs(1);
        }
        m.report(Report::Probe { ok: true }, now, &s);
        m.report(Report::Trip, now, &s);
        let opened = now;
        while m.tick(now, &s, probe).is_none() {
            now += Duration::from_secs(1);
        }
        assert_eq!(now.duration_since(opened).as_secs(), 10);
    }

    #[test]
    fn exactly_one_core_takes_the_probe_and_reports_it() {
        let s = settings();
        let t0 = Instant::now();
        let mut m = Machine::default();
        m.report(Report::Trip, t0, &s);
        let half = m
            .tick(t0 + s.cooldown, &s, Duration::from_secs(60))
            .unwrap();
        let (a, b) = (core(3), core(3));
        a.set(0, 3, half.phase.clone());
        b.set(0, 3, half.phase.clone());
        assert!(a.eligible(0) && b.eligible(0));
        assert!(a.claim(0));
        // The other core sees the probe taken.
        assert!(!b.eligible(0));
        assert!(!b.claim(0));
        // A re-sent copy of the same episode keeps the claim.
        a.set(0, 3, m.phase());
        assert!(!a.eligible(0));
        assert_eq!(b.record(0, Verdict::Fault, 3), None);
        assert_eq!(
            a.record(0, Verdict::Fault, 3),
            Some(Report::Probe { ok: false })
        );
        assert!(!a.eligible(0));
        let c = m.report(Report::Probe { ok: false }, t0, &s).unwrap();
        a.set(0, 3, c.phase);
        assert!(!a.eligible(0));
        // Next episode: a backpressure answer to the probe means alive, so it closes.
        let half = m.tick(t0 + Duration::from_secs(60), &s, Duration::from_secs(60));
        a.set(0, 3, half.unwrap().phase);
        assert!(a.claim(0));
        let r = a.record(0, Verdict::Backpressure, 3).unwrap();
        let c = m.report(r, t0, &s).unwrap();
        a.set(0, 3, c.phase);
        assert!(a.eligible(0) && matches!(a.phase(0), Phase::Closed));
    }

    #[test]
    fn a_probe_abandoned_without_a_verdict_is_handed_back() {
        let token = Arc::new(AtomicBool::new(false));
        let (a, b) = (core(2), core(2));
        a.set(0, 2, Phase::HalfOpen(token.clone()));
        b.set(0, 2, Phase::HalfOpen(token.clone()));
        assert!(a.probe(0).is_none());
        assert!(a.claim(0));
        let held = a.probe(0).unwrap();
        assert!(!b.eligible(0));
        a.release(0, &held);
        assert!(a.probe(0).is_none());
        assert!(b.eligible(0) && b.claim(0));
        // A probe that ended with a verdict has nothing to hand back.
        assert_eq!(
            b.record(0, Verdict::Ok, 3),
            Some(Report::Probe { ok: true })
        );
        b.release(0, &token);
        assert!(!a.eligible(0));
        // A guard from an earlier episode does not release a later one.
        let next = Arc::new(AtomicBool::new(false));
        a.set(0, 2, Phase::HalfOpen(next.clone()));
        assert!(a.claim(0));
        a.release(0, &held);
        assert!(next.load(Ordering::Relaxed));
    }

    #[test]
    fn an_abandoned_probe_is_re_armed_and_disabling_closes() {
        let s = settings();
        let probe = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut m = Machine::default();
        m.report(Report::Trip, t0, &s);
        let first = m.tick(t0 + s.cooldown, &s, probe).unwrap().phase;
        let c = core(9);
        c.set(0, 9, first);
        assert!(c.claim(0));
        assert!(m
            .tick(t0 + s.cooldown + Duration::from_secs(4), &s, probe)
            .is_none());
        let again = m.tick(t0 + s.cooldown + probe, &s, probe).unwrap();
        assert!(!again.transition);
        c.set(0, 9, again.phase);
        assert!(c.eligible(0));
        let off = Settings {
            enabled: false,
            ..settings()
        };
        let c = m.tick(t0, &off, probe).unwrap();
        assert!(c.transition && matches!(c.phase, Phase::Closed));
        assert!(m.tick(t0, &off, probe).is_none());
    }

    #[test]
    fn messages_about_a_previous_backend_in_the_slot_are_ignored() {
        let c = core(4);
        c.set(0, 3, Phase::Open);
        assert!(c.eligible(0));
        c.set(0, 4, Phase::Open);
        assert!(!c.eligible(0));
        c.reset(0, 5);
        assert!(c.eligible(0));
        assert_eq!(c.phase(0).as_str(), "closed");
    }
}
