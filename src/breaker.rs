//! Passive outlier detection: a circuit breaker per backend. A backend whose requests keep
//! failing (connect errors, resets and upstream read errors, timeouts before the first byte, 5xx
//! answers other than 503) is taken out of rotation for a cool-down; then exactly one probe
//! request is let through (half-open): success closes the breaker, failure re-opens it for twice
//! the last cool-down, up to `breaker.max_cooldown`. 4xx answers are the client's fault, and 429
//! and 503 are backpressure from a working backend: none of them count.
//!
//! Who decides what, and why:
//! - **Cores count.** Each core keeps its own consecutive-fault streak per backend slot
//!   (`CoreBreakers`), so the success path costs a core-local write and no message at all. The
//!   threshold is "N faults in a row as seen by one core": a backend failing every request trips
//!   after at most `cores × (N − 1) + 1` faults, and traffic interleaved over cores cannot hide a
//!   failure run from the core that sees it. Counting centrally would cost a message per request.
//! - **The health thread owns the state machine** (`Machine`, by backend id). A core whose streak
//!   reaches the threshold stops using the backend at once and reports a trip; the health thread
//!   opens the breaker, times the cool-down, arms the probe, takes the probe's result and
//!   broadcasts every change to every core's inbox (re-sent each health round, so a lost message
//!   heals). It already owns health state by id and follows the backend table, and it is never on
//!   a request path, so a slow decision cannot delay a request. The price: cool-downs are timed
//!   to its loop (200 ms, longer while an active probe round waits on `health_check.timeout`).
//! - **One probe, process-wide.** Half-open is broadcast with a fresh shared token (an
//!   `Arc<AtomicBool>`); the first core that picks the backend wins it with one compare-exchange,
//!   every other core sees it taken and skips the backend. A probe request that ends without a
//!   verdict (its client went away) hands the token back when it is dropped (`ProbeGuard` in
//!   `worker`); a probe whose report was lost is re-armed with a new token after the longest a
//!   probe can take (`timeouts.connect + timeouts.first_byte`).
//!
//! The breaker is not health: an open breaker leaves `up` alone (and `/health` stays 200 while
//! some backend is up, so the load balancer in front keeps sending the traffic that probes need);
//! a backend is eligible only when it is up *and* its breaker lets requests through. Per-slot core
//! state is reset when the slot's backend id changes. The pick path only reads core-local state
//! and, for a half-open backend, one atomic: no lock, no allocation.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backends::{BackendTable, Entry};
use crate::config::Breaker as Settings;
use crate::control::{Broadcast, ControlMsg};
use crate::error::ProxyError;
use crate::metrics::Metrics;

/// What one upstream exchange says about the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It answered (any status below 500, or a 5xx the breaker ignores).
    Ok,
    /// 429 or 503: working but overloaded; neither a fault nor a success for the streak.
    Backpressure,
    /// Connect error, reset, read error, timeout before the first byte, 5xx.
    Fault,
}

impl Verdict {
    pub fn of_status(status: u16) -> Verdict {
        match status {
            429 | 503 => Verdict::Backpressure,
            500..=599 => Verdict::Fault,
            _ => Verdict::Ok,
        }
    }

    /// Every error on the way to a response head is about the backend, except our own bugs.
    pub fn of_error(e: &ProxyError) -> Verdict {
        match e {
            ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamConnectTimeout
            | ProxyError::UpstreamClosed(_)
            | ProxyError::FirstByteTimeout(_)
            | ProxyError::UpstreamProtocol(_) => Verdict::Fault,
            ProxyError::UpstreamStatus(s) => Verdict::of_status(*s),
            _ => Verdict::Ok,
        }
    }
}

/// A breaker's state as the cores see it.
#[derive(Debug, Clone)]
pub enum Phase {
    Closed,
    Open,
    /// The token is true once some core has taken the one probe.
    HalfOpen(Arc<AtomicBool>),
}

impl Phase {
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::Closed => "closed",
            Phase::Open => "open",
            Phase::HalfOpen(_) => "half_open",
        }
    }

    /// `llmproxy_backend_breaker_state`: 0 closed, 1 open, 2 half-open.
    pub fn gauge(&self) -> i64 {
        match self {
            Phase::Closed => 0,
            Phase::Open => 1,
            Phase::HalfOpen(_) => 2,
        }
    }
}

/// What a core tells the health thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// The streak reached the threshold: open it.
    Trip,
    /// The probe this core took ended.
    Probe { ok: bool },
}

/// One backend's breaker on the health thread.
#[derive(Debug)]
pub struct Machine {
    state: State,
    /// Opens since it was last closed (the back-off exponent).
    opens: u32,
}

#[derive(Debug)]
enum State {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        token: Arc<AtomicBool>,
        armed: Instant,
    },
}

/// A change to broadcast; `transition` is false for a re-armed probe (same phase, new token).
#[derive(Debug)]
pub struct Change {
    pub phase: Phase,
    pub transition: bool,
}

impl Default for Machine {
    fn default() -> Self {
        Machine {
            state: State::Closed,
            opens: 0,
        }
    }
}

impl Machine {
    pub fn phase(&self) -> Phase {
        match &self.state {
            State::Closed => Phase::Closed,
            State::Open { .. } => Phase::Open,
            State::HalfOpen { token, .. } => Phase::HalfOpen(token.clone()),
        }
    }

    /// `cooldown × 2^(opens − 1)`, at most `max_cooldown`.
    fn cooldown(&self, s: &Settings) -> Duration {
        let doublings = self.opens.saturating_sub(1).min(20);
        s.cooldown
            .saturating_mul(1 << doublings)
            .min(s.max_cooldown)
    }

    fn open(&mut self, now: Instant, s: &Settings) -> Option<Change> {
        self.opens = self.opens.saturating_add(1);
        self.state = State::Open {
            until: now + self.cooldown(s),
        };
        Some(Change {
            phase: Phase::Open,
            transition: true,
        })
    }

    fn arm(&mut self, now: Instant, transition: bool) -> Option<Change> {
        let token = Arc::new(AtomicBool::new(false));
        self.state = State::HalfOpen {
            token: token.clone(),
            armed: now,
        };
        Some(Change {
            phase: Phase::HalfOpen(token),
            transition,
        })
    }

    /// A report from a core. Trips count only when closed (a trip from a request that started
    /// before the breaker opened says nothing new); probe results only when half-open.
    pub fn report(&mut self, r: Report, now: Instant, s: &Settings) -> Option<Change> {
        match (&self.state, r) {
            (State::Closed, Report::Trip) => self.open(now, s),
            (State::HalfOpen { .. }, Report::Probe { ok: false }) => self.open(now, s),
            (State::HalfOpen { .. }, Report::Probe { ok: true }) => self.close(),
            _ => None,
        }
    }

    fn close(&mut self) -> Option<Change> {
        self.opens = 0;
        self.state = State::Closed;
        Some(Change {
            phase: Phase::Closed,
            transition: true,
        })
    }

    /// Time passing: an expired cool-down arms the probe; a probe unanswered for `probe_timeout`
    /// (its request was abandoned) is re-armed; a disabled breaker closes.
    pub fn tick(&mut self, now: Instant, s: &Settings, probe_timeout: Duration) -> Option<Change> {
        if !s.enabled {
            return match self.state {
                State::Closed => None,
                _ => self.close(),
            };
        }
        match &self.state {
            State::Open { until } if now >= *until => self.arm(now, true),
            State::HalfOpen { armed, .. } if now.duration_since(*armed) >= probe_timeout => {
                self.arm(now, false)
            }
            _ => None,
        }
    }
}

/// Every backend's breaker, on the health thread; by backend id (slots are reused).
pub struct Board {
    machines: HashMap<u64, Machine>,
    /// Metrics label by id, to drop the gauge of a departed backend.
    names: HashMap<u64, String>,
    metrics: Arc<Metrics>,
}

impl Board {
    pub fn new(metrics: Arc<Metrics>) -> Board {
        Board {
            machines: HashMap::new(),
            names: HashMap::new(),
            metrics,
        }
    }

    /// New backends start closed; departed ones are forgotten (their gauge too, in case this
    /// thread re-created it after a core had removed it).
    pub fn follow(&mut self, table: &BackendTable) {
        for (_, e) in table.entries() {
            if let std::collections::hash_map::Entry::Vacant(v) = self.machines.entry(e.id) {
                v.insert(Machine::default());
                self.names.insert(e.id, e.spec.name.clone());
                self.metrics.breaker_changed(&e.spec.name, 0, None);
            }
        }
        self.machines
            .retain(|id, _| table.entries().any(|(_, e)| e.id == *id));
        let metrics = &self.metrics;
        let machines = &self.machines;
        self.names.retain(|id, name| {
            let keep = machines.contains_key(id);
            if !keep {
                metrics.forget_breaker(name);
            }
            keep
        });
    }

    /// A core's report about backend `id` in `slot`.
    pub fn report(
        &mut self,
        table: &BackendTable,
        slot: usize,
        id: u64,
        r: Report,
        out: &Broadcast,
    ) {
        let Some(e) = table.get(slot).filter(|e| e.id == id) else {
            return;
        };
        let Some(m) = self.machines.get_mut(&id) else {
            return;
        };
        if !table.config.breaker.enabled {
            return;
        }
        if let Some(c) = m.report(r, Instant::now(), &table.config.breaker) {
            self.publish(slot, e, c, out);
        }
    }

    /// Cool-downs that ended, probes to re-arm, breakers to close because the feature was
    /// turned off by a reload.
    pub fn tick(&mut self, table: &BackendTable, out: &Broadcast) {
        let cfg = &table.config;
        let probe_timeout = cfg.timeouts.connect + cfg.timeouts.first_byte + Duration::from_secs(1);
        let now = Instant::now();
        for (slot, e) in table.entries() {
            let change = self
                .machines
                .get_mut(&e.id)
                .and_then(|m| m.tick(now, &cfg.breaker, probe_timeout));
            if let Some(c) = change {
                self.publish(slot, e, c, out);
            }
        }
    }

    /// Re-sends every breaker's phase, so that a core that missed a message catches up.
    pub fn resend(&self, table: &BackendTable, out: &Broadcast) {
        for (slot, e) in table.entries() {
            if let Some(m) = self.machines.get(&e.id) {
                out.send_all(&ControlMsg::Breaker {
                    backend: slot,
                    id: e.id,
                    phase: m.phase(),
                });
            }
        }
    }

    /// Cores first, metrics after: once a scrape shows a change, every core has it queued.
    fn publish(&self, slot: usize, e: &Entry, c: Change, out: &Broadcast) {
        out.send_all(&ControlMsg::Breaker {
            backend: slot,
            id: e.id,
            phase: c.phase.clone(),
        });
        let name = &e.spec.name;
        if c.transition {
            match c.phase {
                Phase::Open => log::warn!("backend {name}: breaker open"),
                Phase::HalfOpen(_) => log::info!("backend {name}: breaker half-open, probing"),
                Phase::Closed => log::info!("backend {name}: breaker closed"),
            }
            let to = Some(c.phase.as_str());
            self.metrics.breaker_changed(name, c.phase.gauge(), to);
        } else {
            log::info!("backend {name}: breaker probe unanswered; another may be sent");
        }
    }
}

/// One core's breaker view and fault streaks, by backend slot.
#[derive(Default)]
pub struct CoreBreakers {
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
    pub fn resize(&self, n: usize) {
        self.slots.borrow_mut().resize(n, Slot::new(0));
    }

    /// `slot` now holds backend `id`: its breaker starts closed with no streak.
    pub fn reset(&self, slot: usize, id: u64) {
        if let Some(s) = self.slots.borrow_mut().get_mut(slot) {
            *s = Slot::new(id);
        }
    }

    /// The health thread's decision for backend `id` in `slot` (ignored if it left the slot).
    pub fn set(&self, slot: usize, id: u64, phase: Phase) {
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

    pub fn phase(&self, slot: usize) -> Phase {
        self.slots
            .borrow()
            .get(slot)
            .map_or(Phase::Closed, |s| s.phase.clone())
    }

    /// May a request be sent to `slot`? (Half-open: only while nobody has taken the probe.)
    pub fn eligible(&self, slot: usize) -> bool {
        match self.slots.borrow().get(slot).map(|s| &s.phase) {
            None | Some(Phase::Closed) => true,
            Some(Phase::Open) => false,
            Some(Phase::HalfOpen(token)) => !token.load(Ordering::Relaxed),
        }
    }

    /// Called once a backend is picked: takes the probe if the breaker is half-open. False when
    /// another core took it first (pick again without this backend).
    pub fn claim(&self, slot: usize) -> bool {
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
    pub fn probe(&self, slot: usize) -> Option<Arc<AtomicBool>> {
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
    pub fn release(&self, slot: usize, token: &Arc<AtomicBool>) {
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
    pub fn record(&self, slot: usize, v: Verdict, threshold: u32) -> Option<Report> {
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
    fn verdicts_count_faults_not_client_errors_or_backpressure() {
        for s in [500, 501, 502, 504, 599] {
            assert_eq!(Verdict::of_status(s), Verdict::Fault, "{s}");
        }
        for s in [429, 503] {
            assert_eq!(Verdict::of_status(s), Verdict::Backpressure, "{s}");
        }
        for s in [200, 204, 301, 400, 401, 404, 413, 422] {
            assert_eq!(Verdict::of_status(s), Verdict::Ok, "{s}");
        }
        let timeout = ProxyError::FirstByteTimeout(Duration::from_secs(1));
        assert_eq!(Verdict::of_error(&timeout), Verdict::Fault);
        let reset = ProxyError::UpstreamClosed("reset".into());
        assert_eq!(Verdict::of_error(&reset), Verdict::Fault);
        assert_eq!(
            Verdict::of_error(&ProxyError::UpstreamConnectTimeout),
            Verdict::Fault
        );
        assert_eq!(
            Verdict::of_error(&ProxyError::UpstreamStatus(503)),
            Verdict::Backpressure
        );
        assert_eq!(Verdict::of_error(&ProxyError::QueueFull), Verdict::Ok);
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
