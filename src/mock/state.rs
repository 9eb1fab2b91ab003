//! The state of one running mock (per runtime): its options, counters, and what `/mock/control`
//! has set; the guard that counts a request as active; the simulated engine batch.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};

use super::{unix_millis, EngineKnobs, MockOptions, MockStats};

/// Per-runtime state.
pub(super) struct Server {
    pub(super) opts: MockOptions,
    pub(super) stats: Arc<MockStats>,
    pub(super) port: u16,
    /// Status `/health` answers with (`None` = 200), set through `/mock/control`.
    pub(super) health_status: Cell<Option<u16>>,
    /// Status every inference request answers with (`None` = normal), set through `/mock/control`.
    pub(super) fail_status: Cell<Option<u16>>,
    /// Every Nth inference request is answered by a TCP reset (0 = never), set through
    /// `/mock/control`: a backend that drops every other connection.
    pub(super) reset_every: Cell<u64>,
    pub(super) inference_seen: Cell<u64>,
    /// What `/metrics` says, set through `/mock/control`.
    pub(super) engine: Cell<EngineKnobs>,
    /// Prompt + completion tokens beyond this get vLLM's context-length 400 (`/mock/control`).
    pub(super) context_limit: Cell<Option<u64>>,
    pub(super) next_id: Cell<u64>,
    /// Generations in the engine's batch and those queued for it (`EngineKnobs::max_running`).
    pub(super) batch: Batch,
}

impl Server {
    /// Counts an inference request; true when this one is to be reset (`reset_every`).
    pub(super) fn reset_this_one(&self) -> bool {
        let every = self.reset_every.get();
        if every == 0 {
            return false;
        }
        let n = self.inference_seen.get() + 1;
        self.inference_seen.set(n);
        n.is_multiple_of(every)
    }

    pub(super) fn next_id(&self) -> u64 {
        let id = self.next_id.get() + 1;
        self.next_id.set(id);
        id
    }

    pub(super) fn note_disconnect(&self) {
        self.stats.disconnects.fetch_add(1, Ordering::Relaxed);
        self.stats
            .last_disconnect_unix_ms
            .store(unix_millis(), Ordering::Relaxed);
    }
}

/// Holds `MockStats::active` up for as long as an inference request is being served.
pub(super) struct ActiveGuard(Arc<MockStats>);

impl ActiveGuard {
    pub(super) fn new(stats: &Arc<MockStats>) -> Self {
        stats.active.fetch_add(1, Ordering::Relaxed);
        Self(stats.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The simulated engine batch: at most `max_running` generations at once, the others queued
/// first come first served (as vLLM's scheduler queues them), visible on `/metrics`. A queued
/// generation whose client leaves (its future dropped) leaves the queue at once.
#[derive(Default)]
pub(super) struct Batch {
    running: Cell<usize>,
    queue: RefCell<VecDeque<(u64, Option<Waker>)>>,
    next: Cell<u64>,
}

impl Batch {
    pub(super) fn running(&self) -> usize {
        self.running.get()
    }

    pub(super) fn waiting(&self) -> usize {
        self.queue.borrow().len()
    }

    /// Wakes the first queued generation (room may have appeared).
    pub(super) fn wake_front(&self) {
        if let Some(w) = self
            .queue
            .borrow_mut()
            .front_mut()
            .and_then(|(_, w)| w.take())
        {
            w.wake();
        }
    }

    /// A place in the batch, waiting for one while `limit()` are running (0 = no limit).
    pub(super) async fn enter(&self, limit: impl Fn() -> usize) -> InBatch<'_> {
        let room = |running: usize| limit() == 0 || running < limit();
        if self.queue.borrow().is_empty() && room(self.running.get()) {
            self.running.set(self.running.get() + 1);
            return InBatch(self);
        }
        let id = self.next.get();
        self.next.set(id + 1);
        self.queue.borrow_mut().push_back((id, None));
        let queued = Queued { batch: self, id };
        poll_fn(|cx| {
            let mut q = self.queue.borrow_mut();
            let front = q.front().is_some_and(|(first, _)| *first == id);
            if front && room(self.running.get()) {
                q.pop_front();
                self.running.set(self.running.get() + 1);
                return Poll::Ready(());
            }
            if let Some(entry) = q.iter_mut().find(|(i, _)| *i == id) {
                entry.1 = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await;
        std::mem::forget(queued);
        // Room for more than one: the next in line looks too.
        self.wake_front();
        InBatch(self)
    }
}

/// Leaves the queue when a waiting generation is dropped.
struct Queued<'a> {
    batch: &'a Batch,
    id: u64,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.batch.queue.borrow_mut().retain(|(i, _)| *i != self.id);
        self.batch.wake_front();
    }
}

/// A generation in the batch; leaving it lets the first queued one in.
pub(super) struct InBatch<'a>(&'a Batch);

impl Drop for InBatch<'_> {
    fn drop(&mut self) {
        self.0.running.set(self.0.running.get().saturating_sub(1));
        self.0.wake_front();
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::Context;

    use super::*;

    #[test]
    fn the_batch_queues_in_order_and_forgets_a_generation_given_up() {
        let batch = Batch::default();
        let mut cx = Context::from_waker(Waker::noop());
        let mut first = pin!(batch.enter(|| 1));
        let Poll::Ready(a) = first.as_mut().poll(&mut cx) else {
            panic!("room for one");
        };
        let mut b = Box::pin(batch.enter(|| 1));
        let mut c = pin!(batch.enter(|| 1));
        assert!(b.as_mut().poll(&mut cx).is_pending());
        assert!(c.as_mut().poll(&mut cx).is_pending());
        assert_eq!((batch.running(), batch.waiting()), (1, 2));
        // b's client leaves: c is next.
        drop(b);
        assert_eq!(batch.waiting(), 1);
        assert!(c.as_mut().poll(&mut cx).is_pending(), "the batch is full");
        drop(a);
        let Poll::Ready(_c) = c.as_mut().poll(&mut cx) else {
            panic!("a left the batch: c's turn");
        };
        assert_eq!((batch.running(), batch.waiting()), (1, 0));
    }
}
