//! How many requests the proxy has pinned to each slot of a backend's engine (`backends[].slots`,
//! llama.cpp's `--parallel`): process-wide atomics, one per engine slot, shared by every core
//! through the backend's table entry.
//!
//! Atomics rather than per-core counts broadcast as messages (as the backend in-flight counts
//! are): a request pinned to a busy slot waits for it inside the engine, so two cores that both
//! see a slot idle and pin to it cost the second request a whole warm request of waiting; an
//! atomic is seen by the other core at once, a message only at its next inbox drain. The count is
//! exact (a guard gives back what it took, whatever ends the request) and costs one uncontended
//! atomic add per request. What each slot last held (its prompt's block chain) is not here: it is
//! per core, learnt like the rest of `prefix_cache`'s index (`worker::prefix`).
//!
//! Never shared across backends: a table entry whose `slots` changes gets a new board, and
//! requests still holding the old one give back to the old one.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Requests pinned to each engine slot of one backend, across all cores.
pub(crate) struct SlotBusy {
    counts: Box<[AtomicU32]>,
}

impl fmt::Debug for SlotBusy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SlotBusy({} slots)", self.counts.len())
    }
}

impl SlotBusy {
    pub(crate) fn new(slots: usize) -> Arc<Self> {
        Arc::new(SlotBusy {
            counts: (0..slots).map(|_| AtomicU32::new(0)).collect(),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.counts.len()
    }

    /// Requests pinned to engine slot `k` now (0 for a slot that does not exist).
    pub(crate) fn busy(&self, k: usize) -> u32 {
        self.counts.get(k).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Counts one more request on slot `k` until the guard drops (`None`: no such slot).
    pub(crate) fn occupy(self: &Arc<Self>, k: usize) -> Option<SlotGuard> {
        self.counts.get(k)?.fetch_add(1, Ordering::Relaxed);
        Some(SlotGuard {
            board: self.clone(),
            k,
        })
    }

    fn release(&self, k: usize) {
        if let Some(c) = self.counts.get(k) {
            // Never below zero, whatever a caller does.
            let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        }
    }
}

/// One request pinned to one engine slot; dropping it ends the count.
pub(crate) struct SlotGuard {
    board: Arc<SlotBusy>,
    k: usize,
}

impl SlotGuard {
    /// The engine slot held.
    pub(crate) fn slot(&self) -> usize {
        self.k
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.board.release(self.k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_per_slot_and_give_back_on_drop() {
        let b = SlotBusy::new(2);
        let g1 = b.occupy(1).unwrap();
        let g2 = b.occupy(1).unwrap();
        assert_eq!((b.busy(0), b.busy(1)), (0, 2));
        assert_eq!(g1.slot(), 1);
        assert!(b.occupy(2).is_none(), "no such slot");
        assert_eq!(b.busy(9), 0);
        drop(g1);
        drop(g2);
        assert_eq!(b.busy(1), 0);
        b.release(1);
        assert_eq!(b.busy(1), 0, "never below zero");
    }
}
