//! Step 4 of a request: choosing its backend. `pick` is the one place where the strategy, the
//! capacity limits and the circuit breaker meet, and it returns one owned thing, a [`Lease`],
//! that holds everything the choice took: the in-flight count (the load view every strategy
//! reads), the `max_inflight` permit, the half-open breaker probe. Dropping the lease gives all of
//! it back, so a request that fails, times out or loses its client (its future dropped, mid-queue
//! included) can never leak a count, a permit or a probe.
//!
//! The order inside: the balancer chooses among the eligible backends (routed, healthy, breaker
//! not open, not tried yet by this request) that have room; the permit is taken (a gate can fill
//! between the look and the take on another core: then the next choice); the breaker's one
//! process-wide probe is claimed (losing that race rules the backend out for this request and
//! the balancer is asked again); only then is the decision counted. With every eligible backend
//! full (at `max_inflight`, or at its engine-queue window under `limits.saturation:
//! engine_queue`, see `crate::gate`), the request waits (`worker::capacity`, `crate::scheduler`)
//! within `queue_timeout`.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backends::route::Route;
use crate::backends::{BackendTable, Entry};
use crate::error::ProxyError;
use crate::scheduler::Flow;
use crate::worker::balance::{Balancer, Reason};
use crate::worker::capacity::{Permit, Wake, POLL};
use crate::worker::{InflightGuard, ProbeGuard, Worker};

/// The backends a request may go to, as routed against the table in force when it arrived.
#[derive(Clone, Copy)]
pub(crate) struct Target<'a> {
    pub(crate) table: &'a BackendTable,
    pub(crate) route: Route<'a>,
    /// The name routed by (the client's model, or a fallback pool's own name): a table change
    /// between attempts routes it again.
    pub(crate) lookup: Option<&'a str>,
    /// The request's `consistent_hash` key.
    pub(crate) affinity: Option<u64>,
    /// The prompt's block chain (`prefix_cache`; empty otherwise).
    pub(crate) blocks: &'a [u64],
    /// Who waits, should it have to (`limits.scheduling: fair`).
    pub(crate) flow: Flow,
}

/// Per backend slot, what this request may still do with it. One allocation per request, kept
/// across attempts and fallback pools' routes alike.
#[derive(Default)]
pub(crate) struct Tried(Vec<Slot>);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Not routed for this target.
    Out,
    Candidate,
    /// Given to this request once already (or lost to another core's probe): not again.
    Tried,
}

impl Tried {
    /// Routes to `mask` (the current table's route), keeping what was already tried.
    fn fit(&mut self, mask: &[bool]) {
        self.0.resize(mask.len(), Slot::Out);
        for (s, &m) in self.0.iter_mut().zip(mask) {
            if *s != Slot::Tried {
                *s = if m { Slot::Candidate } else { Slot::Out };
            }
        }
    }

    fn candidate(&self, slot: usize) -> bool {
        self.0.get(slot) == Some(&Slot::Candidate)
    }

    fn rule_out(&mut self, slot: usize) {
        if let Some(s) = self.0.get_mut(slot) {
            *s = Slot::Tried;
        }
    }

    /// Some routed backend not tried yet is eligible right now (worth a retry).
    pub(crate) fn any_left(&self, w: &Worker) -> bool {
        (0..self.0.len()).any(|i| self.candidate(i) && w.eligible(i))
    }
}

/// Everything one pick took on one backend. Field order is drop order: the probe and the
/// in-flight count go back before the permit wakes the next waiter of the queue.
pub(crate) struct Lease {
    backend: usize,
    /// The engine slot the request is pinned to (`id_slot`), when the pick chose one.
    slot: Option<usize>,
    /// The table the backend was picked from: `entry()` stays valid whatever reloads happen.
    #[allow(clippy::redundant_allocation)]
    table: Rc<Arc<BackendTable>>,
    _probe: Option<ProbeGuard>,
    in_flight: Option<InflightGuard>,
    _permit: Option<Permit>,
}

impl Lease {
    pub(crate) fn backend(&self) -> usize {
        self.backend
    }

    /// The engine slot to pin the request to (`prefix_cache` on a backend with `slots`).
    pub(crate) fn slot(&self) -> Option<usize> {
        self.slot
    }

    pub(crate) fn entry(&self) -> Option<&Entry> {
        self.table.get(self.backend)
    }

    /// The in-flight count, to be held until the request is accounted for: while it is held the
    /// backend's slot cannot be freed and reused, so the slot number keeps naming this backend
    /// in the usage event. The permit and the probe stay with the lease (one attempt).
    pub(crate) fn take_in_flight(&mut self) -> Option<InflightGuard> {
        self.in_flight.take()
    }
}

/// Chooses a backend for `target` among those `tried` still allows, waiting for room when every
/// eligible one is at `max_inflight`. `NoHealthyBackend` when none is left; `QueueFull` /
/// `QueueTimeout` when waiting is not possible or took too long; `UnknownModel` when a reload
/// since the request arrived removed its model.
pub(crate) async fn pick(
    w: &Rc<Worker>,
    target: &Target<'_>,
    tried: &mut Tried,
) -> Result<Lease, ProxyError> {
    w.drain_inbox();
    let table = w.table();
    let route = if table.version == target.table.version {
        target.route
    } else {
        table.routes.route(target.lookup)?
    };
    // Pool balancers follow the newest table, which is `table` whenever a pool is used.
    let balancer = w.balancer_for(route.pool);
    tried.fit(route.mask);
    loop {
        let eligible = |i: usize| tried.candidate(i) && w.eligible(i);
        let Some(taken) = take_or_wait(w, &balancer, target, eligible).await? else {
            return Err(ProxyError::NoHealthyBackend);
        };
        if let Some(lease) = lease(w, &table, &balancer, taken, tried) {
            // Only a pick that was taken teaches the index (here and on the other cores).
            w.learn(
                &balancer,
                route.pool,
                lease.backend,
                lease.slot,
                target.blocks,
            );
            return Ok(lease);
        }
    }
}

/// Turns a chosen backend into a lease, claiming its breaker probe when it is half-open. `None`
/// when another core claimed the probe first: the backend is ruled out and the caller picks
/// again (bounded: each round rules one backend out).
#[allow(clippy::redundant_allocation)]
fn lease(
    w: &Rc<Worker>,
    table: &Rc<Arc<BackendTable>>,
    balancer: &Balancer,
    taken: Taken,
    tried: &mut Tried,
) -> Option<Lease> {
    let b = taken.backend;
    tried.rule_out(b);
    if !w.breakers.claim(b) || table.get(b).is_none() {
        return None;
    }
    w.decisions.record(balancer.strategy(), taken.reason);
    if let Some(share) = taken.share {
        w.decisions.matched_share(share);
    }
    let mut in_flight = w.begin(b);
    // Counted before this core picks again: the next pick (here or on another core) sees the
    // engine slot busy.
    let slot = taken.slot.and_then(|k| balancer.occupy(b, k));
    let pinned = slot.as_ref().map(|g| g.slot());
    in_flight.hold_slot(slot);
    Some(Lease {
        backend: b,
        slot: pinned,
        _probe: w.probe_guard(b),
        in_flight: Some(in_flight),
        _permit: taken.permit,
        table: table.clone(),
    })
}

/// A backend the balancer chose and its permit.
struct Taken {
    backend: usize,
    permit: Option<Permit>,
    reason: Reason,
    /// The engine slot chosen with it (`Pick::slot`).
    slot: Option<usize>,
    /// How much of the prompt it holds (`Pick::share`).
    share: Option<f64>,
}

enum Attempt {
    Got(Taken),
    /// Eligible backends exist but all are at their limit.
    AllFull,
    NoneEligible,
}

/// What the strategy may key on.
#[derive(Clone, Copy)]
struct Keys<'a> {
    affinity: Option<u64>,
    blocks: &'a [u64],
}

/// One look for an eligible backend with room, taking its permit.
fn try_take(
    w: &Worker,
    balancer: &Balancer,
    key: Keys<'_>,
    eligible: &impl Fn(usize) -> bool,
) -> Attempt {
    let core = &w.capacity;
    core.refresh();
    if !core.limited() {
        return match w.choose(balancer, key.affinity, key.blocks, eligible) {
            Some(p) => Attempt::Got(Taken {
                backend: p.backend,
                permit: None,
                reason: p.reason,
                slot: p.slot,
                share: p.share,
            }),
            None => Attempt::NoneEligible,
        };
    }
    // Under `fair`, requests already wait: this one queues behind them (the queue hands it a
    // free slot at once if it is its turn).
    if core.backlogged() && core.fair() {
        return if (0..w.view.backends()).any(eligible) {
            Attempt::AllFull
        } else {
            Attempt::NoneEligible
        };
    }
    // A gate may fill between the look and the increment (another core): try the next one, at
    // most once per backend.
    for _ in 0..=w.view.backends() {
        let Some(p) = w.choose(balancer, key.affinity, key.blocks, |i| {
            eligible(i) && core.has_room(i)
        }) else {
            break;
        };
        if let Ok(permit) = core.acquire(p.backend) {
            return Attempt::Got(Taken {
                backend: p.backend,
                permit,
                reason: p.reason,
                slot: p.slot,
                share: p.share,
            });
        }
    }
    if (0..w.view.backends()).any(eligible) {
        Attempt::AllFull
    } else {
        Attempt::NoneEligible
    }
}

/// `try_take`, then, while every eligible backend is full, waiting in the core's queue.
/// `Ok(None)`: no eligible backend at all.
async fn take_or_wait(
    w: &Worker,
    balancer: &Balancer,
    target: &Target<'_>,
    eligible: impl Fn(usize) -> bool,
) -> Result<Option<Taken>, ProxyError> {
    let key = Keys {
        affinity: target.affinity,
        blocks: target.blocks,
    };
    match try_take(w, balancer, key, &eligible) {
        Attempt::Got(t) => return Ok(Some(t)),
        Attempt::NoneEligible => return Ok(None),
        Attempt::AllFull => {}
    }
    // Boxed: waiting is the saturated case, and its timers (640 bytes each) would otherwise sit
    // in every request's future, which is copied whole into its box once per request.
    Box::pin(wait_for_room(w, balancer, target, key, eligible)).await
}

/// Every eligible backend is full: waits in this core's queue (or the fair one) for a slot.
async fn wait_for_room(
    w: &Worker,
    balancer: &Balancer,
    target: &Target<'_>,
    key: Keys<'_>,
    eligible: impl Fn(usize) -> bool,
) -> Result<Option<Taken>, ProxyError> {
    let core = &w.capacity;
    if core.fair() {
        return wait_fair(w, target.flow, eligible).await;
    }
    let Some(ticket) = core.enqueue() else {
        return Err(ProxyError::QueueFull);
    };
    let timeout = core.queue_timeout();
    let deadline = Instant::now().checked_add(timeout);
    loop {
        let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
        if left.is_zero() {
            return Err(ProxyError::QueueTimeout(timeout));
        }
        let wait = if ticket.is_front() {
            left.min(POLL)
        } else {
            left
        };
        let wake = monoio::time::timeout(wait, ticket.woken())
            .await
            .unwrap_or(Wake::None);
        w.drain_inbox();
        match try_take(w, balancer, key, &eligible) {
            Attempt::Got(t) => {
                let waited =
                    deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
                let waited = timeout.saturating_sub(waited);
                let class = target.flow.class.as_str();
                w.shared.metrics.queue.dispatched(class, waited, false);
                return Ok(Some(t));
            }
            Attempt::NoneEligible => return Ok(None),
            // Only a baton goes round the queue: a poll or a nudge that finds nothing stays put.
            Attempt::AllFull if wake == Wake::Baton => ticket.pass_on(),
            Attempt::AllFull => {}
        }
    }
}

/// How often a request waiting in the fair queue looks again at which backends it may use
/// (health, breakers) and at its deadline; slots are handed to it, whichever core frees them.
const FAIR_RECHECK: Duration = Duration::from_millis(100);

/// Waits in the process-wide fair queue (`limits.scheduling: fair`) until a slot is handed over.
/// `Ok(None)`: no eligible backend left.
async fn wait_fair(
    w: &Worker,
    flow: Flow,
    eligible: impl Fn(usize) -> bool,
) -> Result<Option<Taken>, ProxyError> {
    let core = &w.capacity;
    let since = Instant::now();
    let timeout = core.queue_timeout();
    let deadline = since.checked_add(timeout);
    let mask = |w: &Worker| -> Vec<bool> { (0..w.view.backends()).map(&eligible).collect() };
    let mut allowed = mask(w);
    // Once per slot handed over that this core no longer sees as eligible (bounded: each
    // round rules that backend out for this wait).
    loop {
        if !allowed.iter().any(|&e| e) {
            return Ok(None);
        }
        let Some(ticket) = core.enqueue_fair(flow, since, allowed.clone()) else {
            return Err(ProxyError::QueueFull);
        };
        loop {
            if let Some((grant, permit)) = ticket.grant() {
                if eligible(grant.backend) {
                    let class = grant.class.as_str();
                    let metrics = &w.shared.metrics.queue;
                    metrics.dispatched(class, since.elapsed(), grant.promoted);
                    return Ok(Some(Taken {
                        backend: grant.backend,
                        permit,
                        reason: Reason::Balanced,
                        slot: None,
                        share: None,
                    }));
                }
                // Went down in this core's view since it joined: the slot goes on to the next
                // waiter, and this request joins again (keeping its age) without that backend.
                drop(ticket);
                drop(permit);
                if let Some(a) = allowed.get_mut(grant.backend) {
                    *a = false;
                }
                break;
            }
            let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return Err(ProxyError::QueueTimeout(timeout));
            }
            let _ = monoio::time::timeout(left.min(FAIR_RECHECK), ticket.granted()).await;
            w.drain_inbox();
            core.refresh();
            let now = mask(w);
            if !now.iter().any(|&e| e) {
                return Ok(None);
            }
            if now != allowed {
                ticket.set_mask(now.clone());
                allowed = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::task::{Context, Poll, Waker};

    use super::*;
    use crate::worker::breaker::Phase;
    use crate::worker::testing::*;

    /// Core 0 of two on backends 0..n (all up), with `limits` as their `max_inflight`.
    fn core(n: usize, limits: &[usize]) -> Rc<Worker> {
        let urls: Vec<String> = (1..=n).map(|p| format!("http://127.0.0.1:{p}")).collect();
        let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
        let cfg = config(&urls);
        let (w, _inbox, _plane) = worker(registry(&cfg, 2).publish(cfg.clone()));
        w.shared.capacity.set_limits(limits);
        w
    }

    /// Picks for a request without a model (every backend routed).
    async fn pick_any(w: &Rc<Worker>, tried: &mut Tried) -> Result<Lease, ProxyError> {
        let table = w.table();
        let target = Target {
            table: &table,
            route: table.routes.route(None).unwrap(),
            lookup: None,
            affinity: None,
            blocks: &[],
            flow: Flow::default(),
        };
        pick(w, &target, tried).await
    }

    fn half_open(w: &Worker, slot: usize) -> Arc<AtomicBool> {
        let token = Arc::new(AtomicBool::new(false));
        w.breakers
            .set(slot, w.view.id(slot), Phase::HalfOpen(token.clone()));
        token
    }

    #[test]
    fn a_dropped_lease_gives_back_permit_probe_and_in_flight_count() {
        let w = core(2, &[1, 1]);
        let token = half_open(&w, 0);
        w.view.set_up(1, w.view.id(1), false);
        let lease = block_on(pick_any(&w, &mut Tried::default())).unwrap();
        assert_eq!(lease.backend(), 0);
        assert_eq!(w.view.own(0), 1, "in flight");
        assert!(!w.capacity.has_room(0), "permit taken");
        assert!(token.load(Ordering::Relaxed), "probe claimed");
        drop(lease);
        assert_eq!(w.view.own(0), 0);
        assert!(w.capacity.has_room(0));
        assert!(!token.load(Ordering::Relaxed), "probe handed back");
        assert!(w.breakers.eligible(0));
    }

    #[test]
    fn the_request_keeps_its_in_flight_count_after_the_lease_is_gone() {
        let w = core(1, &[1]);
        let mut lease = block_on(pick_any(&w, &mut Tried::default())).unwrap();
        let in_flight = lease.take_in_flight();
        drop(lease);
        assert!(w.capacity.has_room(0), "the permit is the attempt's");
        assert_eq!(
            w.view.own(0),
            1,
            "the slot still names this request's backend"
        );
        drop(in_flight);
        assert_eq!(w.view.own(0), 0);
    }

    #[test]
    fn a_pick_dropped_while_queued_leaves_no_trace() {
        let w = core(1, &[1]);
        block_on(async {
            let held = pick_any(&w, &mut Tried::default()).await.unwrap();
            let mut tried = Tried::default();
            let mut waiting = Box::pin(pick_any(&w, &mut tried));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(matches!(waiting.as_mut().poll(&mut cx), Poll::Pending));
            assert_eq!(w.shared.capacity.queued(), 1, "waits in the queue");
            drop(waiting);
            assert_eq!(w.shared.capacity.queued(), 0);
            assert_eq!(w.view.own(0), 1, "only the held lease counts");
            drop(held);
            assert_eq!(w.view.own(0), 0);
            assert!(w.capacity.has_room(0));
        });
    }

    #[test]
    fn a_freed_slot_goes_to_the_higher_class_not_the_first_in_line() {
        use crate::config::Priority;
        let w = core(1, &[1]);
        block_on(async {
            let held = pick_any(&w, &mut Tried::default()).await.unwrap();
            let table = w.table();
            let target = |class| Target {
                table: &table,
                route: table.routes.route(None).unwrap(),
                lookup: None,
                affinity: None,
                blocks: &[],
                flow: Flow {
                    key: class as u64,
                    class,
                    weight: 1,
                },
            };
            let (low_t, high_t) = (target(Priority::Low), target(Priority::High));
            let (mut t1, mut t2) = (Tried::default(), Tried::default());
            let mut low = Box::pin(pick(&w, &low_t, &mut t1));
            let mut high = Box::pin(pick(&w, &high_t, &mut t2));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(low.as_mut().poll(&mut cx).is_pending());
            assert!(high.as_mut().poll(&mut cx).is_pending());
            assert_eq!(w.shared.capacity.queued(), 2);
            drop(held);
            assert!(!w.capacity.has_room(0), "handed over, not freed");
            let Poll::Ready(Ok(lease)) = high.as_mut().poll(&mut cx) else {
                panic!("the high request did not get the slot");
            };
            assert!(low.as_mut().poll(&mut cx).is_pending());
            assert_eq!(w.shared.capacity.queued(), 1);
            // Its slot goes on to the low one when it is done.
            drop(lease);
            assert!(matches!(low.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
            assert_eq!(w.shared.capacity.queued(), 0);
        });
    }

    #[test]
    fn a_lost_half_open_claim_picks_again_without_that_backend() {
        let w = core(2, &[0, 0]);
        let token = half_open(&w, 0);
        let table = w.table();
        let mut tried = Tried::default();
        tried.fit(table.routes.route(None).unwrap().mask);
        // Chosen while the probe was free; another core claims it before this one does.
        token.store(true, Ordering::Release);
        let taken = Taken {
            backend: 0,
            permit: None,
            reason: Reason::Balanced,
            slot: None,
            share: None,
        };
        assert!(lease(&w, &table, &w.balancer, taken, &mut tried).is_none());
        assert_eq!(w.view.own(0), 0, "nothing taken");
        assert!(!tried.candidate(0));
        // The probe frees up again (the other core's request ended), but this request has
        // ruled backend 0 out: it goes to 1.
        token.store(false, Ordering::Release);
        let lease = block_on(pick(
            &w,
            &Target {
                table: &table,
                route: table.routes.route(None).unwrap(),
                lookup: None,
                affinity: None,
                blocks: &[],
                flow: Flow::default(),
            },
            &mut tried,
        ))
        .unwrap();
        assert_eq!(lease.backend(), 1);
    }

    #[test]
    fn running_out_of_candidates_is_no_healthy_backend() {
        let w = core(2, &[0, 0]);
        let mut tried = Tried::default();
        let a = block_on(pick_any(&w, &mut tried)).unwrap();
        let b = block_on(pick_any(&w, &mut tried)).unwrap();
        assert_ne!(a.backend(), b.backend(), "a retry never reuses a backend");
        assert!(!tried.any_left(&w));
        assert!(matches!(
            block_on(pick_any(&w, &mut tried)),
            Err(ProxyError::NoHealthyBackend)
        ));
        // A backend that is down is no candidate either.
        let w = core(2, &[0, 0]);
        w.view.set_up(0, w.view.id(0), false);
        w.view.set_up(1, w.view.id(1), false);
        assert!(matches!(
            block_on(pick_any(&w, &mut Tried::default())),
            Err(ProxyError::NoHealthyBackend)
        ));
    }

    #[test]
    fn a_full_queue_and_a_wait_too_long_are_refused() {
        let w = core(1, &[1]);
        w.shared
            .capacity
            .set_queue(0, std::time::Duration::from_millis(20));
        block_on(async {
            let _held = pick_any(&w, &mut Tried::default()).await.unwrap();
            let e = pick_any(&w, &mut Tried::default()).await.err();
            assert!(matches!(e, Some(ProxyError::QueueFull)), "{e:?}");
            w.shared
                .capacity
                .set_queue(4, std::time::Duration::from_millis(20));
            let e = pick_any(&w, &mut Tried::default()).await.err();
            assert!(matches!(e, Some(ProxyError::QueueTimeout(_))), "{e:?}");
            assert_eq!(w.shared.capacity.queued(), 0);
        });
    }
}
