//! One core's side of admission control: its cached view of the process-wide backend gates
//! (`crate::capacity`) and its queue of requests waiting for a free backend slot.
//!
//! A request that finds every eligible backend full waits in its core's FIFO. A slot freed on
//! this core wakes the first waiter; a waiter that still finds nothing passes the wake on to the
//! next, so one freed slot is offered to the whole queue once. Slots freed on other cores cannot
//! wake this one: the first waiter of each core polls every few milliseconds, and the core's
//! periodic tick offers a chance to the whole queue. A waiter's ticket is an RAII guard: a client
//! that goes away or a request timeout leaves no trace in the queue. The order is FIFO per core
//! only: a request arriving as a slot frees may take it before a waiter does (throughput first;
//! `queue_timeout` bounds the wait).
//!
//! That is `limits.scheduling: fifo`. Under `fair` (the default) this queue stays empty: waiters
//! join the process-wide [`crate::scheduler::FairQueue`] instead ([`FairTicket`]), which hands a
//! freed slot, from any core, straight to the request that goes next. A permit given back here
//! tells that queue (one atomic load while nobody waits).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use std::time::Instant;

use crate::capacity::Capacity;
use crate::gate::Gate;
use crate::scheduler::{Flow, Grant, Handoff};

/// One core's view of `Capacity`, and its queue of waiting requests.
pub(crate) struct CoreCapacity {
    shared: Arc<Capacity>,
    version: Cell<u64>,
    gates: RefCell<Vec<Arc<Gate>>>,
    /// Some gate counts requests (a limit, or `engine_queue`): otherwise picking never looks at
    /// the gates.
    limited: Cell<bool>,
    waiters: RefCell<VecDeque<Rc<Waiter>>>,
}

impl CoreCapacity {
    pub(crate) fn new(shared: Arc<Capacity>) -> Rc<Self> {
        let core = CoreCapacity {
            shared,
            version: Cell::new(u64::MAX),
            gates: RefCell::new(Vec::new()),
            limited: Cell::new(false),
            waiters: RefCell::new(VecDeque::new()),
        };
        core.refresh();
        Rc::new(core)
    }

    /// Follows the process-wide gate table when its version moved.
    pub(crate) fn refresh(&self) {
        let v = self.shared.version.load(Ordering::Acquire);
        if v == self.version.get() {
            return;
        }
        if let Ok(gates) = self.shared.gates.read() {
            self.limited.set(gates.iter().any(|g| g.counts()));
            *self.gates.borrow_mut() = gates.clone();
            self.version.set(v);
        }
    }

    pub(crate) fn has_room(&self, backend: usize) -> bool {
        self.gates
            .borrow()
            .get(backend)
            .is_none_or(|g| g.has_room())
    }

    /// Takes a slot on `backend`: `Ok(None)` when it is not counted, `Err` when it is full.
    pub(crate) fn acquire(self: &Rc<Self>, backend: usize) -> Result<Option<Permit>, ()> {
        let gates = self.gates.borrow();
        let Some(gate) = gates.get(backend) else {
            return Ok(None);
        };
        if !gate.counts() {
            return Ok(None);
        }
        // 0: counted (`limits.saturation: engine_queue`) but without a limit right now.
        let cap = gate.cap();
        if gate.used.fetch_add(1, Ordering::AcqRel) >= cap && cap > 0 {
            gate.used.fetch_sub(1, Ordering::AcqRel);
            return Err(());
        }
        Ok(Some(Permit {
            core: self.clone(),
            gate: gate.clone(),
        }))
    }

    /// Wakes the first waiter not woken yet after `after` (from the front when `None`).
    fn wake_next(&self, after: Option<&Rc<Waiter>>) {
        let waiters = self.waiters.borrow();
        let start = match after {
            Some(me) => match waiters.iter().position(|w| Rc::ptr_eq(w, me)) {
                Some(i) => i + 1,
                None => 0,
            },
            None => 0,
        };
        if let Some(w) = waiters
            .iter()
            .skip(start)
            .find(|w| w.wake.get() != Wake::Baton)
        {
            w.wake(Wake::Baton);
        }
    }

    fn is_front(&self, me: &Rc<Waiter>) -> bool {
        self.waiters
            .borrow()
            .front()
            .is_some_and(|w| Rc::ptr_eq(w, me))
    }

    /// Some backend has a limit: otherwise a pick never looks at the gates.
    pub(crate) fn limited(&self) -> bool {
        self.limited.get()
    }

    pub(crate) fn queue_timeout(&self) -> Duration {
        self.shared.queue_timeout()
    }

    /// `limits.scheduling: fair`.
    pub(crate) fn fair(&self) -> bool {
        self.shared.fair.on()
    }

    /// Under `fair`, requests wait: an arrival queues behind them instead of taking a slot.
    pub(crate) fn backlogged(&self) -> bool {
        self.shared.fair.backlogged()
    }

    /// A place in the process-wide fair queue (`None`: the queue is full). The request may
    /// have been handed a slot already: look with [`FairTicket::grant`].
    pub(crate) fn enqueue_fair(
        self: &Rc<Self>,
        flow: Flow,
        since: Instant,
        mask: Vec<bool>,
    ) -> Option<FairTicket> {
        let shared = &self.shared;
        let size = shared.queue_size.load(Ordering::Relaxed);
        if shared.queued.fetch_add(1, Ordering::AcqRel) >= size {
            shared.queued.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let gates = self.gates.borrow();
        let Some((id, cell)) = shared.fair.join(&gates, flow, since, mask) else {
            shared.queued.fetch_sub(1, Ordering::AcqRel);
            return None;
        };
        Some(FairTicket {
            core: self.clone(),
            id,
            cell,
        })
    }

    /// On the core's tick: slots may have freed on other cores.
    pub(crate) fn tick(&self) {
        if !self.waiters.borrow().is_empty() {
            self.wake_next(None);
        }
        // Slots can also appear without a permit given back (a reload raised a limit).
        if self.shared.fair.backlogged() {
            self.refresh();
            self.shared.fair.freed(&self.gates.borrow());
        }
    }

    /// A place in the queue, or `None` when the process-wide queue is full.
    pub(crate) fn enqueue(self: &Rc<Self>) -> Option<Ticket> {
        let shared = &self.shared;
        let size = shared.queue_size.load(Ordering::Relaxed);
        if shared.queued.fetch_add(1, Ordering::AcqRel) >= size {
            shared.queued.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let me = Rc::new(Waiter::default());
        self.waiters.borrow_mut().push_back(me.clone());
        Some(Ticket {
            core: self.clone(),
            me,
        })
    }
}

/// A backend slot held for the length of one attempt.
pub(crate) struct Permit {
    core: Rc<CoreCapacity>,
    gate: Arc<Gate>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        // SeqCst: pairs with the fair queue's count of waiters (see `FairQueue::freed`).
        self.gate.used.fetch_sub(1, Ordering::SeqCst);
        self.core.shared.fair.freed(&self.core.gates.borrow());
        self.core.wake_next(None);
    }
}

/// A place in the process-wide fair queue; leaving it (any way) frees the place and gives back
/// a slot handed to it and not taken.
pub(crate) struct FairTicket {
    core: Rc<CoreCapacity>,
    id: u64,
    cell: Arc<Handoff>,
}

impl FairTicket {
    /// The slot handed to this request, as a permit, once one was.
    pub(crate) fn grant(&self) -> Option<(Grant, Option<Permit>)> {
        let g = self.cell.poll_grant(None)?;
        // The dispatching core may have had a newer gate table than this core's cache.
        let gate = g.counted.then(|| {
            self.core
                .gates
                .borrow()
                .get(g.backend)
                .cloned()
                .or_else(|| {
                    let gates = self.core.shared.gates.read().ok()?;
                    gates.get(g.backend).cloned()
                })
        });
        let gate = gate.flatten();
        let permit = gate.map(|gate| Permit {
            core: self.core.clone(),
            gate,
        });
        Some((g, permit))
    }

    /// Resolves once a slot was handed over (the grant itself is read by `grant`).
    pub(crate) fn granted(&self) -> Granted<'_> {
        Granted(&self.cell)
    }

    /// The backends this request may use changed (health, breakers).
    pub(crate) fn set_mask(&self, mask: Vec<bool>) {
        let gates = self.core.gates.borrow();
        self.core.shared.fair.set_mask(&gates, self.id, mask);
    }
}

impl Drop for FairTicket {
    fn drop(&mut self) {
        let gates = self.core.gates.borrow();
        self.core.shared.fair.leave(&gates, self.id, &self.cell);
        self.core.shared.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) struct Granted<'a>(&'a Handoff);

impl Future for Granted<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.has_grant(cx.waker()) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Why a waiter was woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Wake {
    #[default]
    None,
    /// It became the first of its core's queue: from now on it polls (see `POLL`).
    Nudge,
    /// A slot may be free: look, and if it is not for you, pass the chance on.
    Baton,
}

#[derive(Default)]
struct Waiter {
    wake: Cell<Wake>,
    waker: Cell<Option<Waker>>,
}

impl Waiter {
    fn wake(&self, kind: Wake) {
        if self.wake.get() != Wake::Baton {
            self.wake.set(kind);
        }
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// A place in the core's wait queue; leaving it (any way) frees the place.
pub(crate) struct Ticket {
    core: Rc<CoreCapacity>,
    me: Rc<Waiter>,
}

impl Ticket {
    /// Resolves once woken; consumes the wake.
    pub(crate) fn woken(&self) -> Woken<'_> {
        Woken(&self.me)
    }

    /// First in its core's queue: it must poll, since slots freed on other cores cannot wake it.
    pub(crate) fn is_front(&self) -> bool {
        self.core.is_front(&self.me)
    }

    /// This waiter was woken and could not use the chance: offer it to the next one.
    pub(crate) fn pass_on(&self) {
        self.core.wake_next(Some(&self.me));
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let wake = self.me.wake.get();
        let was_front = self.core.is_front(&self.me);
        {
            let mut waiters = self.core.waiters.borrow_mut();
            if let Some(i) = waiters.iter().position(|w| Rc::ptr_eq(w, &self.me)) {
                waiters.remove(i);
            }
        }
        self.core.shared.queued.fetch_sub(1, Ordering::AcqRel);
        if wake == Wake::Baton {
            // Woken but gone before looking (timeout, client left): the chance is not lost.
            self.core.wake_next(None);
        } else if was_front {
            if let Some(next) = self.core.waiters.borrow().front() {
                next.wake(Wake::Nudge);
            }
        }
    }
}

pub(crate) struct Woken<'a>(&'a Waiter);

impl Future for Woken<'_> {
    type Output = Wake;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Wake> {
        match self.0.wake.replace(Wake::None) {
            Wake::None => {
                self.0.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
            kind => Poll::Ready(kind),
        }
    }
}

/// How often the first waiter of a core looks for slots freed on other cores, which cannot wake
/// it (the tick would, but only every 100 ms). One timer per core with waiters.
pub(crate) const POLL: Duration = Duration::from_millis(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_grow_and_keep_counts() {
        let cap = Capacity::new(&[1], 4, Duration::from_secs(1));
        let core = CoreCapacity::new(cap.clone());
        assert!(core.limited.get());
        let p = core.acquire(0).unwrap();
        assert!(p.is_some());
        assert!(core.acquire(0).is_err());
        assert!(!core.has_room(0));
        // Slots beyond the table are unlimited until the table grows.
        assert!(matches!(core.acquire(3), Ok(None)));
        cap.set_limits(&[2, 0, 0, 1]);
        core.refresh();
        assert!(core.has_room(0));
        let q = core.acquire(0).unwrap();
        assert!(core.acquire(0).is_err());
        let r = core.acquire(3).unwrap();
        assert!(r.is_some() && core.acquire(3).is_err());
        drop((p, q, r));
        assert!(core.has_room(0) && core.has_room(3));
        cap.set_limits(&[0]);
        core.refresh();
        assert!(!core.limited.get());
    }

    #[test]
    fn queue_is_bounded_and_wakes_in_order() {
        let cap = Capacity::new(&[1], 2, Duration::from_secs(1));
        let core = CoreCapacity::new(cap.clone());
        let t1 = core.enqueue().unwrap();
        let t2 = core.enqueue().unwrap();
        assert!(core.enqueue().is_none(), "queue_size is 2");
        assert_eq!(cap.queued(), 2);
        core.wake_next(None);
        assert_eq!(
            (t1.me.wake.get(), t2.me.wake.get()),
            (Wake::Baton, Wake::None)
        );
        // t1 could not use it: t2 gets the chance.
        t1.pass_on();
        assert_eq!(t2.me.wake.get(), Wake::Baton);
        drop(t2);
        assert_eq!(cap.queued(), 1);
        assert_eq!(core.waiters.borrow().len(), 1);
        drop(t1);
        assert_eq!(cap.queued(), 0);
        assert!(core.enqueue().is_some());
    }

    #[test]
    fn a_dropped_woken_waiter_passes_the_wake_on() {
        let cap = Capacity::new(&[1], 8, Duration::from_secs(1));
        let core = CoreCapacity::new(cap);
        let t1 = core.enqueue().unwrap();
        let t2 = core.enqueue().unwrap();
        core.wake_next(None);
        drop(t1);
        assert_eq!(t2.me.wake.get(), Wake::Baton);
    }

    #[test]
    fn the_next_front_waiter_is_nudged_not_given_a_baton() {
        let cap = Capacity::new(&[1], 8, Duration::from_secs(1));
        let core = CoreCapacity::new(cap);
        let t1 = core.enqueue().unwrap();
        let t2 = core.enqueue().unwrap();
        let t3 = core.enqueue().unwrap();
        assert!(core.is_front(&t1.me) && !core.is_front(&t2.me));
        drop(t1);
        assert!(core.is_front(&t2.me));
        assert_eq!(
            (t2.me.wake.get(), t3.me.wake.get()),
            (Wake::Nudge, Wake::None)
        );
        // A baton still reaches a nudged waiter.
        core.wake_next(None);
        assert_eq!(t2.me.wake.get(), Wake::Baton);
        drop(t3);
        assert_eq!(t2.me.wake.get(), Wake::Baton);
    }

    #[test]
    fn an_engine_queue_fills_a_backend_until_completions_drain_it() {
        use crate::config::Saturation;
        let cap = Capacity::new(&[0], 8, Duration::from_secs(1));
        cap.fair.configure(true, Duration::from_secs(60));
        cap.set_saturation(Saturation::EngineQueue);
        let core = CoreCapacity::new(cap.clone());
        assert!(core.limited(), "every request counted");
        let held: Vec<Permit> = (0..3).map(|_| core.acquire(0).unwrap().unwrap()).collect();
        // Two of the three wait in the engine: one runs, so one is this process's window.
        cap.engine_reading(0, 2.0, Instant::now(), Duration::from_secs(60));
        assert!(core.acquire(0).is_err() && !core.has_room(0));
        let ticket = core
            .enqueue_fair(Flow::default(), Instant::now(), vec![true])
            .unwrap();
        let mut held = held.into_iter();
        drop(held.next());
        drop(held.next());
        assert!(
            ticket.grant().is_none(),
            "the engine's queue is still draining"
        );
        drop(held.next());
        let (grant, permit) = ticket.grant().expect("the last completion lets it in");
        assert!(grant.counted && permit.is_some());
        drop((ticket, permit));
        // Switched off: not counted, no window.
        cap.set_saturation(Saturation::Inflight);
        core.refresh();
        assert!(!core.limited() && matches!(core.acquire(0), Ok(None)));
        // Readings are ignored while it is off.
        cap.engine_reading(0, 9.0, Instant::now(), Duration::from_secs(60));
        assert!(core.has_room(0));
    }
}
