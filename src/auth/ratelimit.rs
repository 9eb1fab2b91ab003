//! Per-key request and token rates (`auth.keys[].rpm` / `.tpm`), shared by every core of the
//! process without a lock: each limit is one atomic "theoretical arrival time" (GCRA, the
//! token bucket written as a single timestamp). A bucket holds one minute's worth of its rate,
//! so a key may burst its whole per-minute allowance and then refills continuously.
//!
//! Requests are charged when admitted. Tokens are charged after the request, from its usage, so a
//! request is admitted while the token bucket is not empty and a big answer may drive it into
//! debt: the key then waits until the debt is paid off.
//!
//! With `ratelimit.store: local` the limits are per process. With `store: redis` the same
//! buckets stay the cores' only view — a core never talks to Redis and never waits for it — and
//! the sync thread (`control::ratelimit_sync`) reconciles them with a bucket per key and limit in
//! Redis every `sync_interval`:
//! 1. every admission / token charge also adds its units to the bucket's `pending` counter;
//! 2. the thread swaps `pending` to 0 and sends it (the key's consumption in this process since
//!    the last sync) to a Lua script, which, atomically in Redis, leaks the shared level at the
//!    key's rate for the time since its last update (Redis's own clock, so replicas' clocks do
//!    not matter), adds every replica's push, and returns the new shared level;
//! 3. `fold` makes the local bucket hold that level plus what this process admitted since the
//!    swap (`pending` again): the next admissions see every replica's consumption.
//!
//! Error bound. A replica sees another's consumption at most two sync intervals (plus a round
//! trip) after it happened: pushed at the other replica's next tick, pulled at its own next
//! tick (the replicas' ticks are not aligned). Within that window each replica may spend the
//! same headroom `h` (what the shared bucket had left at its last fold) and its own refill, so
//! with N replicas a key can be admitted at most
//! `(N-1) × (h + rate × 2 × sync_interval / 60 s)` units over its limit; for `rpm: 120`, 3
//! replicas, `100ms` and an exhausted bucket that is 2 × 0.4 = 0.8 → 0 or 1 request. The excess
//! is not lost: it is in the shared level, which goes into debt, and every replica waits it off,
//! so over any longer period the key gets its rate, not N × it. A full bucket (`h` = a minute's
//! allowance) is the worst case: N replicas hit at the same instant with a full bucket can each
//! take it before the next sync. Tokens are charged when a request finishes, so `tpm` adds, as
//! in one process, the requests admitted while the bucket was not yet empty.
//!
//! While the store fails, `ratelimit.on_store_error` decides (`StoreState`); consumption during
//! an outage is not pushed afterwards (it was governed by that mode, and pushing it would put a
//! key into debt for an outage it did not cause). A store that comes back empty is seeded with
//! the pushing replica's own level, so a restart does not hand every key a fresh burst.

pub(crate) use crate::error::Exceeded;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::OnStoreError;

/// The bucket size in time: one minute's allowance.
const WINDOW_NS: u64 = 60_000_000_000;

/// One rate limit: `rate` units per minute.
#[derive(Debug)]
pub(crate) struct Gcra {
    rate: u64,
    /// Nanoseconds after `Clock::epoch` at which the bucket is full again.
    tat: AtomicU64,
    /// Units taken or charged since the sync thread last collected them (unused, but as cheap as
    /// the `tat` update beside it on the same cache line, with `store: local`).
    pending: AtomicU64,
}

impl Gcra {
    pub(crate) fn new(rate_per_minute: u64) -> Self {
        Gcra {
            rate: rate_per_minute.max(1),
            tat: AtomicU64::new(0),
            pending: AtomicU64::new(0),
        }
    }

    pub(crate) fn rate(&self) -> u64 {
        self.rate
    }

    /// The time `units` take to refill.
    fn cost(&self, units: u64) -> u64 {
        let ns = u128::from(units) * u128::from(WINDOW_NS) / u128::from(self.rate);
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    /// Takes `units` if they fit in the bucket; otherwise how long until they would.
    pub(crate) fn take(&self, now: u64, units: u64) -> Result<(), Duration> {
        let cost = self.cost(units);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now).saturating_add(cost);
            let used = next - now;
            if used > WINDOW_NS {
                return Err(Duration::from_nanos(used - WINDOW_NS));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.pending.fetch_add(units, Ordering::Relaxed);
                    return Ok(());
                }
                Err(actual) => tat = actual,
            }
        }
    }

    /// Whether anything is left in the bucket; otherwise how long until something is.
    pub(crate) fn check(&self, now: u64) -> Result<(), Duration> {
        let used = self.tat.load(Ordering::Relaxed).saturating_sub(now);
        if used >= WINDOW_NS {
            // At least one nanosecond past the full bucket, so a retry then succeeds.
            Err(Duration::from_nanos(used - WINDOW_NS + 1))
        } else {
            Ok(())
        }
    }

    /// Charges `units` unconditionally (the bucket may go into debt).
    pub(crate) fn charge(&self, now: u64, units: u64) {
        let cost = self.cost(units);
        let _ = self
            .tat
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                Some(tat.max(now).saturating_add(cost))
            });
        self.pending.fetch_add(units, Ordering::Relaxed);
    }

    /// The units consumed in this process since the last call (the sync thread's push).
    pub(crate) fn take_pending(&self) -> u64 {
        self.pending.swap(0, Ordering::Relaxed)
    }

    /// How full the bucket is at `now`, in units (above `rate` = in debt).
    pub(crate) fn level(&self, now: u64) -> f64 {
        let used = self.tat.load(Ordering::Relaxed).saturating_sub(now);
        used as f64 * self.rate as f64 / WINDOW_NS as f64
    }

    /// Makes the bucket hold `shared` units (the store's level, every replica's consumption
    /// included, as of the push) plus what this process consumed since the push.
    pub(crate) fn fold(&self, now: u64, shared: f64) {
        let base = shared.max(0.0) * WINDOW_NS as f64 / self.rate as f64;
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            // Read after `tat`: a take that moved `tat` before our exchange bumps `pending`
            // right after it, so at worst one in-flight unit per core is missed until the next
            // sync pushes it.
            let since = self.cost(self.pending.load(Ordering::Relaxed));
            // `as` saturates: a level past u64 nanoseconds is a debt of centuries.
            let next = now.saturating_add(base as u64).saturating_add(since);
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(actual) => tat = actual,
            }
        }
    }
}

/// The limits of one key.
#[derive(Debug)]
pub(crate) struct KeyLimits {
    clock: Clock,
    rpm: Option<Gcra>,
    tpm: Option<Gcra>,
}

impl KeyLimits {
    /// `None` when both are 0 (unlimited): such keys touch no shared state at all.
    pub(crate) fn new(clock: Clock, rpm: u64, tpm: u64) -> Option<Self> {
        if rpm == 0 && tpm == 0 {
            return None;
        }
        Some(KeyLimits {
            clock,
            rpm: (rpm > 0).then(|| Gcra::new(rpm)),
            tpm: (tpm > 0).then(|| Gcra::new(tpm)),
        })
    }

    /// Whether these limits were built from the same rates (so their state can be kept).
    pub(crate) fn same_rates(&self, rpm: u64, tpm: u64) -> bool {
        self.rpm.as_ref().map_or(0, Gcra::rate) == rpm
            && self.tpm.as_ref().map_or(0, Gcra::rate) == tpm
    }

    /// Admits one request: the token bucket must not be empty, then one request is taken.
    pub(crate) fn admit(&self, at: Instant) -> Result<(), (Exceeded, Duration)> {
        let now = self.clock.ns(at);
        if let Some(t) = &self.tpm {
            t.check(now).map_err(|d| (Exceeded::Tokens, d))?;
        }
        if let Some(r) = &self.rpm {
            r.take(now, 1).map_err(|d| (Exceeded::Requests, d))?;
        }
        Ok(())
    }

    /// The request bucket, if the key has one (for the sync thread).
    pub(crate) fn rpm(&self) -> Option<&Gcra> {
        self.rpm.as_ref()
    }

    /// The token bucket, if the key has one (for the sync thread).
    pub(crate) fn tpm(&self) -> Option<&Gcra> {
        self.tpm.as_ref()
    }

    /// Now on this key's clock.
    pub(crate) fn now(&self) -> u64 {
        self.clock.ns(Instant::now())
    }

    /// Charges the tokens a finished request used.
    pub(crate) fn charge_tokens(&self, tokens: u64) {
        if let (Some(t), true) = (&self.tpm, tokens > 0) {
            t.charge(self.clock.ns(Instant::now()), tokens);
        }
    }
}

/// Whether the shared store answers, as the sync thread last saw it, and what admission does
/// when it does not. One per process with `store: redis`; cores read it with one relaxed load.
#[derive(Debug)]
pub(crate) struct StoreState {
    on_error: OnStoreError,
    up: AtomicBool,
    /// `Retry-After` for `deny`: the store is retried every `sync_interval`.
    retry_after: u64,
}

impl StoreState {
    pub(crate) fn new(on_error: OnStoreError, sync_interval: Duration) -> Self {
        StoreState {
            on_error,
            // Until the first sync says otherwise the local buckets decide, as they would
            // with a store that just answered.
            up: AtomicBool::new(true),
            retry_after: retry_after_secs(sync_interval),
        }
    }

    pub(crate) fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// What admission does now: `None` while the store answers.
    pub(crate) fn failing(&self) -> Option<(OnStoreError, u64)> {
        (!self.is_up()).then_some((self.on_error, self.retry_after))
    }
}

/// The process-wide time origin of the buckets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    epoch: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Clock {
            epoch: Instant::now(),
        }
    }

    fn ns(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Whole seconds for `Retry-After`, rounded up, at least 1.
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn requests_burst_a_minute_then_refill_continuously() {
        let g = Gcra::new(60);
        for i in 0..60 {
            assert!(g.take(0, 1).is_ok(), "request {i} of the burst");
        }
        let wait = g.take(0, 1).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        assert!(g.take(S / 2, 1).is_err());
        assert!(g.take(S, 1).is_ok());
        assert!(g.take(S, 1).is_err());
        // After a quiet minute the whole burst is back, and not more.
        let later = 200 * S;
        for _ in 0..60 {
            assert!(g.take(later, 1).is_ok());
        }
        assert!(g.take(later, 1).is_err());
    }

    #[test]
    fn uneven_rates_do_not_drift() {
        // 7 per minute: 60/7 s each; after exactly one minute 7 more fit, not 6 or 8.
        let g = Gcra::new(7);
        for _ in 0..7 {
            assert!(g.take(0, 1).is_ok());
        }
        assert!(g.take(0, 1).is_err());
        let mut admitted = 0;
        for step in 1..=600 {
            if g.take(step * S / 10, 1).is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 7);
    }

    #[test]
    fn tokens_admit_until_empty_and_debt_is_paid_back() {
        let g = Gcra::new(600);
        assert!(g.check(0).is_ok());
        g.charge(0, 500);
        assert!(g.check(0).is_ok(), "100 tokens are left");
        g.charge(0, 500);
        // 1000 tokens at 600/min: 100 s of refill, 40 s beyond the one-minute bucket.
        let wait = g.check(0).unwrap_err();
        assert!(
            wait > Duration::from_secs(40) && wait < Duration::from_millis(40_001),
            "{wait:?}"
        );
        assert!(g.check(40 * S).is_err());
        assert!(g.check(40 * S + 1).is_ok());
    }

    #[test]
    fn key_limits_report_which_limit() {
        let clock = Clock::new();
        let l = KeyLimits::new(clock, 2, 10).unwrap();
        let t0 = clock.epoch;
        assert!(l.admit(t0).is_ok());
        assert!(l.admit(t0).is_ok());
        assert_eq!(l.admit(t0).unwrap_err().0, Exceeded::Requests);
        let l = KeyLimits::new(clock, 0, 10).unwrap();
        l.tpm.as_ref().unwrap().charge(0, 20);
        assert_eq!(l.admit(t0).unwrap_err().0, Exceeded::Tokens);
        assert!(KeyLimits::new(clock, 0, 0).is_none());
        assert!(l.same_rates(0, 10));
        assert!(!l.same_rates(1, 10));
    }

    #[test]
    fn concurrent_takes_never_exceed_the_burst() {
        let g = std::sync::Arc::new(Gcra::new(1000));
        let ok = std::sync::Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (g, ok) = (g.clone(), ok.clone());
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        if g.take(0, 1).is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(ok.load(Ordering::Relaxed), 1000);
    }

    #[test]
    fn pending_counts_what_was_taken_and_charged_once() {
        let g = Gcra::new(10);
        assert!(g.take(0, 1).is_ok());
        assert!(g.take(0, 3).is_ok());
        g.charge(0, 20);
        // A refused take charges nothing.
        assert!(g.take(0, 1).is_err());
        assert_eq!(g.take_pending(), 24);
        assert_eq!(g.take_pending(), 0);
    }

    #[test]
    fn fold_holds_the_shared_level_plus_what_came_after_the_push() {
        let g = Gcra::new(60);
        for _ in 0..10 {
            assert!(g.take(0, 1).is_ok());
        }
        assert_eq!(g.take_pending(), 10);
        // Two more while the push is on its way.
        assert!(g.take(0, 1).is_ok() && g.take(0, 1).is_ok());
        // The store says 30 in all (ours and two other replicas'): 32 with the two since.
        g.fold(0, 30.0);
        assert!((g.level(0) - 32.0).abs() < 1e-6, "{}", g.level(0));
        let mut more = 0;
        while g.take(0, 1).is_ok() {
            more += 1;
        }
        assert_eq!(more, 28);
        // The store may also be lower than our view (it leaked, or restarted and was seeded
        // lower): the shared level wins.
        g.take_pending();
        g.fold(0, 5.0);
        assert!((g.level(0) - 5.0).abs() < 1e-6);
        // Debt survives the fold: 90 at 60/min is 30 s beyond the full bucket.
        g.fold(0, 90.0);
        let wait = g.take(0, 1).unwrap_err();
        assert!(wait > Duration::from_millis(30_999) && wait < Duration::from_secs(32));
    }

    /// The sync script's arithmetic (`control::ratelimit_sync::SCRIPT`), step for step: leak
    /// the stored level at `rate` per minute since its last update, add the push; a missing
    /// bucket takes the pusher's own level.
    fn store_merge(
        stored: Option<(f64, u64)>,
        now: u64,
        rate: u64,
        push: u64,
        seed: f64,
    ) -> (f64, u64) {
        let level = match stored {
            Some((l, t)) => {
                let elapsed = now.saturating_sub(t) as f64;
                (l - elapsed * rate as f64 / WINDOW_NS as f64).max(0.0) + push as f64
            }
            None => seed.max(push as f64),
        };
        (level, now)
    }

    #[test]
    fn the_store_leaks_at_the_rate_and_seeds_a_missing_bucket() {
        // 60/min leaks one per second.
        let (l, t) = store_merge(Some((10.0, 0)), 4 * S, 60, 2, 0.0);
        assert!((l - 8.0).abs() < 1e-9 && t == 4 * S);
        // Never below empty, however long ago.
        assert_eq!(store_merge(Some((10.0, 0)), 100 * S, 60, 1, 0.0).0, 1.0);
        // Restarted empty: the pusher's level (which already holds its push), not a free burst.
        assert_eq!(store_merge(None, 0, 60, 3, 42.0).0, 42.0);
        assert_eq!(store_merge(None, 0, 60, 3, 0.0).0, 3.0);
    }

    /// N replicas, each asked for far more than the limit, syncing every 100 ms through the
    /// modelled store: the total stays within the documented bound in every interval and the
    /// long-run rate is the key's, not N times it.
    #[test]
    fn replicas_sharing_a_store_get_the_rate_once_within_the_bound() {
        const MS: u64 = 1_000_000;
        let (rate, n, sync) = (120u64, 3usize, 100 * MS);
        let replicas: Vec<Gcra> = (0..n).map(|_| Gcra::new(rate)).collect();
        let mut stored = None;
        let mut admitted = 0u64;
        let mut in_interval = 0u64;
        let mut worst_interval = 0u64;
        // Ten simulated minutes, one attempt per replica per millisecond.
        let end = 600_000 * MS;
        let mut now = 0;
        while now < end {
            for r in &replicas {
                if r.take(now, 1).is_ok() {
                    admitted += 1;
                    in_interval += 1;
                }
            }
            now += MS;
            if now % sync == 0 {
                for r in &replicas {
                    let push = r.take_pending();
                    let merged = store_merge(stored, now, rate, push, r.level(now));
                    stored = Some(merged);
                    r.fold(now, merged.0);
                }
                if now > 60_000 * MS {
                    worst_interval = worst_interval.max(in_interval);
                }
                in_interval = 0;
            }
        }
        // A minute's burst plus ten minutes of refill, within a few requests.
        let ideal = rate + rate * 10;
        eprintln!("admitted {admitted} (ideal {ideal}); most in one interval {worst_interval}");
        assert!(
            admitted >= ideal - 2 && admitted <= ideal + 2 * n as u64,
            "admitted {admitted}, ideal {ideal}"
        );
        // Past the burst the headroom at a sync is at most one interval's refill, so one
        // interval admits at most N × (headroom + refill), rounded up per replica. (The
        // simulated replicas sync in step, so consumption is seen after one interval here.)
        let refill_per_sync = rate as f64 * (sync as f64 / WINDOW_NS as f64);
        let bound = (n as f64 * 2.0 * refill_per_sync).ceil() as u64 + n as u64;
        assert!(
            worst_interval <= bound,
            "{worst_interval} in one interval, bound {bound}"
        );
    }

    #[test]
    fn store_state_says_what_admission_does_while_down() {
        let s = StoreState::new(OnStoreError::Deny, Duration::from_millis(100));
        assert_eq!(s.failing(), None);
        s.set_up(false);
        assert_eq!(s.failing(), Some((OnStoreError::Deny, 1)));
        s.set_up(true);
        assert!(s.is_up());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
