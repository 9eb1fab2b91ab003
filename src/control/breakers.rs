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

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backends::{BackendTable, Entry};
use crate::config::Breaker as Settings;
use crate::control::{Broadcast, ControlMsg};
use crate::telemetry::metrics::Metrics;

/// A breaker's state as the cores see it.
#[derive(Debug, Clone)]
pub(crate) enum Phase {
    Closed,
    Open,
    /// The token is true once some core has taken the one probe.
    HalfOpen(Arc<AtomicBool>),
}

impl Phase {
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Phase::Closed => "closed",
            Phase::Open => "open",
            Phase::HalfOpen(_) => "half_open",
        }
    }

    /// `llmproxy_backend_breaker_state`: 0 closed, 1 open, 2 half-open.
    pub(crate) fn gauge(&self) -> i64 {
        match self {
            Phase::Closed => 0,
            Phase::Open => 1,
            Phase::HalfOpen(_) => 2,
        }
    }
}

/// What a core tells the health thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Report {
    /// The streak reached the threshold: open it.
    Trip,
    /// The probe this core took ended.
    Probe { ok: bool },
}

/// One backend's breaker on the health thread.
#[derive(Debug)]
pub(crate) struct Machine {
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
pub(crate) struct Change {
    pub(crate) phase: Phase,
    pub(crate) transition: bool,
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
    pub(crate) fn phase(&self) -> Phase {
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
            until: crate::clock::after(now, self.cooldown(s)),
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
    pub(crate) fn report(&mut self, r: Report, now: Instant, s: &Settings) -> Option<Change> {
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
    pub(crate) fn tick(
        &mut self,
        now: Instant,
        s: &Settings,
        probe_timeout: Duration,
    ) -> Option<Change> {
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
pub(crate) struct Board {
    machines: HashMap<u64, Machine>,
    /// Metrics label by id, to drop the gauge of a departed backend.
    names: HashMap<u64, String>,
    metrics: Arc<Metrics>,
}

impl Board {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Board {
        Board {
            machines: HashMap::new(),
            names: HashMap::new(),
            metrics,
        }
    }

    /// New backends start closed; departed ones are forgotten (their gauge too, in case this
    /// thread re-created it after a core had removed it).
    pub(crate) fn follow(&mut self, table: &BackendTable) {
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
    pub(crate) fn report(
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
    pub(crate) fn tick(&mut self, table: &BackendTable, out: &Broadcast) {
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
    pub(crate) fn resend(&self, table: &BackendTable, out: &Broadcast) {
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
