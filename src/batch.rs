//! Per-core batches of text lines for one consumer thread (access-log lines for the log writer,
//! usage events for the usage intake). A core appends a line into its own reused buffer —
//! written in place, no allocation, no channel operation — and hands the whole buffer over once
//! per event-loop turn (`CoreBatch::run`, woken by the first line of a batch) or when it is
//! large. The consumer gives emptied buffers back, so the memory a core writes into was
//! allocated on that core and is never freed on another thread (which would defeat the
//! allocator's per-thread caches).
//!
//! It must never block a core: sending is `try_send`, the lines in the channel are bounded
//! (`capacity`), and a core holds at most `max_lines` itself while the consumer is behind;
//! beyond that a line is refused, and the caller counts it. Lines keep their order per core.
//! Nothing here knows about monoio: the turn-end flush is a plain future a core spawns.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};

/// A buffer at or above this size is handed over at once rather than at the end of the turn.
const FLUSH_BYTES: usize = 32 * 1024;
/// What a fresh buffer is allocated with (most batches are a few lines).
const INITIAL_BYTES: usize = 4 * 1024;
/// Buffers larger than this are not kept for reuse (one burst should not pin its memory).
const KEEP_BYTES: usize = 64 * 1024;
/// Emptied buffers kept for reuse per channel.
const SPARES: usize = 32;
/// How long a consumer waits after taking what was there before it waits for more. A consumer
/// blocked in a receive is woken by the first batch a core hands over (a futex wake and two
/// context switches on the core's CPU, once per event-loop turn: thousands per second under
/// load); one that lingers is not waiting, so the cores' sends stay an atomic load, and it
/// takes everything that arrived meanwhile in one go. A line is written at most this much
/// later; the first line after a quiet spell still wakes it at once.
pub const LINGER: Duration = Duration::from_millis(2);

/// One core's lines, newline-terminated, in the order they were written.
#[derive(Debug)]
pub struct Batch {
    pub text: String,
    pub lines: usize,
}

/// Every core's side of a channel is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// What the cores and the consumer share.
#[derive(Debug, Default)]
struct Link {
    /// Lines sent and not yet taken by the consumer (the channel's bound, in lines).
    queued: AtomicUsize,
    /// Cores holding lines they have not handed over yet (so a consumer told to stop knows
    /// whether more is coming).
    held: AtomicUsize,
}

/// The cores' side, cloned once per core (`CoreBatch::new`).
#[derive(Clone, Debug)]
pub struct Handoff {
    tx: Sender<Batch>,
    spare: Receiver<String>,
    link: Arc<Link>,
    capacity: usize,
}

/// The consumer's side.
#[derive(Debug)]
pub struct Consumer {
    rx: Receiver<Batch>,
    spare: Sender<String>,
    link: Arc<Link>,
}

/// A channel from the cores to one consumer that holds at most `capacity` lines.
pub fn channel(capacity: usize) -> (Handoff, Consumer) {
    let (tx, rx) = crossbeam_channel::unbounded();
    // A few spare buffers per channel: enough that a core rarely allocates, few enough that the
    // buffers of one burst are not kept (at most SPARES × KEEP_BYTES stay resident).
    let (spare_tx, spare_rx) = crossbeam_channel::bounded(SPARES);
    let link = Arc::new(Link::default());
    (
        Handoff {
            tx,
            spare: spare_rx,
            link: link.clone(),
            capacity,
        },
        Consumer {
            rx,
            spare: spare_tx,
            link,
        },
    )
}

impl Consumer {
    /// The next batch, waiting at most `timeout` (`Ok(None)`); `Err(Closed)` once every core's
    /// side is gone and nothing is left.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Batch>, Closed> {
        match self.rx.recv_timeout(timeout) {
            Ok(b) => Ok(Some(self.taken(b))),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Ok(None),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(Closed),
        }
    }

    /// A batch if one is waiting.
    pub fn try_recv(&self) -> Option<Batch> {
        self.rx.try_recv().ok().map(|b| self.taken(b))
    }

    fn taken(&self, b: Batch) -> Batch {
        self.link.queued.fetch_sub(b.lines, Ordering::AcqRel);
        b
    }

    /// Gives a batch's buffer back to the cores for reuse.
    pub fn give_back(&self, mut b: Batch) {
        if b.text.capacity() <= KEEP_BYTES {
            b.text.clear();
            let _ = self.spare.try_send(b.text);
        }
    }

    /// Nothing in the channel and nothing held on a core.
    pub fn idle(&self) -> bool {
        self.rx.is_empty() && self.link.held.load(Ordering::Acquire) == 0
    }

    /// The receiver, for `crossbeam_channel::select!` (batches taken through it must go through
    /// `took`).
    pub(crate) fn receiver(&self) -> &Receiver<Batch> {
        &self.rx
    }

    /// Accounts for a batch received directly from `receiver()`.
    pub(crate) fn took(&self, b: Batch) -> Batch {
        self.taken(b)
    }
}

/// One core's buffer (`!Send`: lives on its core).
pub struct CoreBatch {
    out: Handoff,
    buf: RefCell<String>,
    lines: Cell<usize>,
    max_lines: usize,
    /// The turn-end flush is due (a line was written since the last one).
    due: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl CoreBatch {
    /// A core's buffer; it holds at most `max_lines` while the consumer is behind.
    pub fn new(out: Handoff, max_lines: usize) -> CoreBatch {
        CoreBatch {
            out,
            buf: RefCell::new(String::new()),
            lines: Cell::new(0),
            max_lines,
            due: Cell::new(false),
            waker: Cell::new(None),
        }
    }

    /// Appends one line written by `write` (which must not write a newline; one is added).
    /// Never blocks; `false` (nothing written) when this core already holds `max_lines`.
    pub fn push(&self, write: impl FnOnce(&mut String)) -> bool {
        let lines = self.lines.get();
        if lines >= self.max_lines {
            return false;
        }
        let big = {
            let mut buf = self.buf.borrow_mut();
            if buf.capacity() == 0 {
                *buf = self
                    .out
                    .spare
                    .try_recv()
                    .unwrap_or_else(|_| String::with_capacity(INITIAL_BYTES));
            }
            write(&mut buf);
            buf.push('\n');
            buf.len() >= FLUSH_BYTES
        };
        self.lines.set(lines + 1);
        if lines == 0 {
            self.out.link.held.fetch_add(1, Ordering::AcqRel);
        }
        if big {
            self.flush();
        } else if !self.due.replace(true) {
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
        true
    }

    /// Hands what this core holds to the consumer, unless the channel is at its bound (then it
    /// is kept, in order, for the next flush).
    pub fn flush(&self) {
        let lines = self.lines.get();
        if lines == 0 {
            return;
        }
        let link = &self.out.link;
        // An empty channel takes any batch, so a core holding more than `capacity` still drains.
        let queued = link.queued.load(Ordering::Acquire);
        if queued > 0 && queued + lines > self.out.capacity {
            return;
        }
        let text = std::mem::take(&mut *self.buf.borrow_mut());
        // Counted before the send, so the consumer's subtraction never goes below zero.
        link.queued.fetch_add(lines, Ordering::AcqRel);
        match self.out.tx.try_send(Batch { text, lines }) {
            Ok(()) => {
                self.lines.set(0);
                link.held.fetch_sub(1, Ordering::AcqRel);
            }
            Err(TrySendError::Full(b)) | Err(TrySendError::Disconnected(b)) => {
                link.queued.fetch_sub(lines, Ordering::AcqRel);
                *self.buf.borrow_mut() = b.text;
            }
        }
    }

    /// Lines this core holds (written, not yet handed over).
    pub fn held(&self) -> usize {
        self.lines.get()
    }

    /// The turn-end flush: a core spawns this once; it runs after the tasks that were ready
    /// when the first line of a batch was written, so the lines of one event-loop turn go over
    /// together, and none waits for a timer.
    pub async fn run(&self) {
        loop {
            poll_fn(|cx| {
                if self.due.get() {
                    Poll::Ready(())
                } else {
                    self.waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            self.due.set(false);
            self.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::Context;

    fn lines(c: &Consumer) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(b) = c.try_recv() {
            assert_eq!(b.text.lines().count(), b.lines);
            out.extend(b.text.lines().map(str::to_owned));
            c.give_back(b);
        }
        out
    }

    #[test]
    fn lines_keep_their_order_and_buffers_come_back() {
        let (h, c) = channel(100);
        let core = CoreBatch::new(h, 10);
        for n in 0..3 {
            assert!(core.push(|s| s.push_str(&n.to_string())));
        }
        assert!(!c.idle(), "lines held on the core count as pending");
        core.flush();
        assert_eq!(lines(&c), ["0", "1", "2"]);
        assert!(c.idle());
        // The next batch is written into the buffer the consumer gave back.
        assert!(core.push(|s| s.push('x')));
        assert!(core.buf.borrow().capacity() >= INITIAL_BYTES);
        core.flush();
        assert_eq!(lines(&c), ["x"]);
    }

    /// A stuck consumer: the channel's bound, then the core's, and what is beyond both is refused
    /// (for the caller to count) — never a wait. Once the consumer catches up, everything held
    /// arrives, in order.
    #[test]
    fn a_stuck_consumer_bounds_the_core_and_loses_nothing_it_accepted() {
        let (h, c) = channel(4);
        let core = CoreBatch::new(h, 6);
        let mut refused = 0;
        for n in 0..4 {
            core.push(|s| s.push_str(&n.to_string()));
        }
        core.flush();
        for n in 4..20 {
            if !core.push(|s| s.push_str(&n.to_string())) {
                refused += 1;
            }
            core.flush();
        }
        assert_eq!(core.held(), 6);
        assert_eq!(refused, 10);
        assert_eq!(lines(&c), ["0", "1", "2", "3"]);
        core.flush();
        let expected: Vec<String> = (4..10).map(|n| n.to_string()).collect();
        assert_eq!(lines(&c), expected);
        assert!(c.idle());
    }

    #[test]
    fn large_buffers_go_over_at_once() {
        let (h, c) = channel(1000);
        let core = CoreBatch::new(h, 1000);
        let long = "y".repeat(1000);
        for _ in 0..40 {
            core.push(|s| s.push_str(&long));
        }
        assert!(core.held() < 40);
        assert!(c.try_recv().is_some());
    }

    /// The turn-end task flushes after the first line wakes it, and sleeps otherwise.
    #[test]
    fn run_flushes_when_woken() {
        let (h, c) = channel(100);
        let core = CoreBatch::new(h, 10);
        let mut task = pin!(core.run());
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(task.as_mut().poll(&mut cx).is_pending());
        assert!(core.push(|s| s.push('a')));
        assert!(core.push(|s| s.push('b')));
        assert!(c.try_recv().is_none(), "held until the turn ends");
        assert!(task.as_mut().poll(&mut cx).is_pending());
        assert_eq!(lines(&c), ["a", "b"]);
        assert!(task.as_mut().poll(&mut cx).is_pending());
        assert!(c.try_recv().is_none());
    }
}
