//! Process-wide capacity counters, shared by the cores and the control plane: how many client
//! connections the process holds (`limits.max_connections`) and how many requests each backend
//! serves at once (`backends[].max_inflight`), plus the wait-queue bounds.
//!
//! Both counts are process-wide atomics: a connection or a request is counted once, whichever
//! core took it, and the limit is exact (a failed increment is undone). Backends are addressed by
//! their slot index in a table that may grow and change limits at run time (`set_limits`, from
//! the control plane); each core caches the table (`worker::capacity`) and refreshes it only when
//! its version moved, so with no limit configured the request path pays one atomic load.
//!
//! Under `limits.saturation: engine_queue` every request is counted (limited or not) and the
//! engine scrapers feed each gate's engine-queue cap (`crate::gate`); a cap that rises or lapses
//! reaches waiters through the scraper's own dispatch (fair) and the cores' polls and ticks.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::config::{Config, Saturation, Scheduling};
use crate::gate::Gate;
use crate::scheduler::FairQueue;

// ---------------------------------------------------------------------------------------------
// Connections.

/// Open client connections of the process (the admin listener's are not counted).
pub(crate) struct ConnectionLimit {
    max: AtomicUsize,
    open: AtomicUsize,
}

impl ConnectionLimit {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnectionLimit {
            max: AtomicUsize::new(max),
            open: AtomicUsize::new(0),
        })
    }

    /// A slot for one more connection, or `None` when `max` are open.
    pub(crate) fn try_open(self: &Arc<Self>) -> Option<ConnectionSlot> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max() {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnectionSlot(self.clone()))
    }

    pub(crate) fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// A new limit (config reload); connections above it are not closed, new ones wait for room.
    pub(crate) fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }
}

/// Held by a connection's task for its whole life.
pub(crate) struct ConnectionSlot(Arc<ConnectionLimit>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

// ---------------------------------------------------------------------------------------------
// Backend slots.

/// The process-wide table of backend gates and the wait-queue bounds.
pub(crate) struct Capacity {
    pub(crate) gates: RwLock<Vec<Arc<Gate>>>,
    pub(crate) version: AtomicU64,
    pub(crate) queued: AtomicUsize,
    pub(crate) queue_size: AtomicUsize,
    queue_timeout_ms: AtomicU64,
    /// `limits.scheduling: fair`: the process-wide queue (off under `fifo`, whose queues are
    /// per core, in `worker::capacity`).
    pub(crate) fair: FairQueue,
    /// `limits.saturation: engine_queue`.
    engine_queue: AtomicBool,
}

impl Capacity {
    pub(crate) fn new(limits: &[usize], queue_size: usize, queue_timeout: Duration) -> Arc<Self> {
        let c = Capacity {
            gates: RwLock::new(Vec::new()),
            version: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
            queue_size: AtomicUsize::new(0),
            queue_timeout_ms: AtomicU64::new(0),
            fair: FairQueue::new(false, Duration::from_secs(5)),
            engine_queue: AtomicBool::new(false),
        };
        c.set_queue(queue_size, queue_timeout);
        c.set_limits(limits);
        Arc::new(c)
    }

    /// Queue bounds from the config; backend limits arrive with each backend table
    /// (`set_limits`, by slot), since discovery decides which slot a backend has.
    pub(crate) fn from_config(cfg: &Config) -> Arc<Self> {
        let c = Capacity::new(&[], cfg.limits.queue_size, cfg.limits.queue_timeout);
        c.set_scheduling(cfg.limits.scheduling, cfg.limits.promote_after);
        c.set_saturation(cfg.limits.saturation);
        c
    }

    /// `limits.saturation` (startup and reload). Turned on, requests admitted before are not
    /// counted: the window may let that many more through until they finish.
    pub(crate) fn set_saturation(&self, saturation: Saturation) {
        let on = saturation == Saturation::EngineQueue;
        if self.engine_queue.swap(on, Ordering::AcqRel) == on {
            return;
        }
        if let Ok(gates) = self.gates.read() {
            for g in gates.iter() {
                g.count_all.store(on, Ordering::Relaxed);
                if !on {
                    g.clear_engine_cap();
                }
            }
        }
        self.version.fetch_add(1, Ordering::Release);
        if let Ok(gates) = self.gates.read() {
            self.fair.freed(&gates);
        }
    }

    /// An engine reading for backend `slot` (from its scraper thread): under `engine_queue`,
    /// renews the backend's cap and hands out what it frees. Never called on a core.
    pub(crate) fn engine_reading(
        &self,
        slot: usize,
        waiting: f64,
        at: Instant,
        valid_for: Duration,
    ) {
        if !self.engine_queue.load(Ordering::Acquire) {
            return;
        }
        let Ok(gates) = self.gates.read() else {
            return;
        };
        if let Some(g) = gates.get(slot) {
            g.engine_reading(waiting, at, valid_for);
            self.fair.freed(&gates);
        }
    }

    pub(crate) fn set_scheduling(&self, scheduling: Scheduling, promote_after: Duration) {
        let fair = scheduling == Scheduling::Fair;
        self.fair.configure(fair, promote_after);
    }

    pub(crate) fn set_queue(&self, size: usize, timeout: Duration) {
        self.queue_size.store(size, Ordering::Relaxed);
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.queue_timeout_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn queue_timeout(&self) -> Duration {
        Duration::from_millis(self.queue_timeout_ms.load(Ordering::Relaxed))
    }

    /// Sets the limit of every backend slot (index = slot id), growing the table as needed.
    /// Requests in flight keep their count, so a lowered limit takes effect as they finish.
    pub(crate) fn set_limits(&self, limits: &[usize]) {
        let Ok(mut gates) = self.gates.write() else {
            return;
        };
        let count_all = self.engine_queue.load(Ordering::Acquire);
        while gates.len() < limits.len() {
            let g = Gate::default();
            g.count_all.store(count_all, Ordering::Relaxed);
            gates.push(Arc::new(g));
        }
        for (i, g) in gates.iter().enumerate() {
            let limit = limits.get(i).copied().unwrap_or(0);
            g.limit.store(limit, Ordering::Relaxed);
        }
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Requests waiting for a slot, process-wide.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limit_is_exact() {
        let l = ConnectionLimit::new(2);
        let a = l.try_open();
        let b = l.try_open();
        assert!(a.is_some() && b.is_some());
        assert!(l.try_open().is_none());
        drop(a);
        assert!(l.try_open().is_some());
    }
}
