//! Messages that cross threads, and the fan-out that delivers them. Cores never block on these:
//! they `try_send`, and drain their inbox with `try_iter` at pick time and on their tick. A lost
//! `Load` message is healed by the next periodic `Snapshot`; health state is re-broadcast by the
//! health thread every round, and the control plane re-sends the current backend table every
//! second, so a full inbox can delay but never corrupt a core's view. Messages about one backend
//! carry its slot (what per-core state is indexed by) and its id (see `backends`): a message
//! about a backend that has left its slot is ignored.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;

use crate::backends::BackendTable;
use crate::control::breakers::{Phase, Report};
use crate::control::reload::ReloadError;

/// Bounded so a stalled core cannot make the others grow memory without limit. The bound is
/// checked on send over an unbounded (block-list) channel, which allocates only for what is
/// queued; a bounded crossbeam channel would allocate and touch all its slots at start.
const INBOX_CAPACITY: usize = 64 * 1024;

#[derive(Clone)]
pub(crate) enum ControlMsg {
    /// One core's absolute in-flight count for one backend.
    Load {
        core: usize,
        backend: usize,
        id: u64,
        in_flight: u32,
    },
    /// One core's `(id, count)` for every slot; sent every second to heal drift.
    Snapshot {
        core: usize,
        counts: Vec<(u64, u32)>,
    },
    /// A backend's health as decided by the health thread (or a core's passive report).
    Health { backend: usize, id: u64, up: bool },
    /// A backend's circuit breaker as decided by the health thread (`breaker`).
    Breaker {
        backend: usize,
        id: u64,
        phase: Phase,
    },
    /// A new version of the backend set (and the configuration it belongs to).
    Table(Arc<BackendTable>),
    /// A backend's engine load as scraped from its `/metrics` (ignored unless `id` still holds
    /// the slot).
    Engine {
        backend: usize,
        id: u64,
        reading: crate::control::engine::Reading,
    },
    /// Another core learnt how backend `id` answers (`worker::traits`).
    Trait {
        backend: usize,
        id: u64,
        learnt: Trait,
    },
    /// `prefix_cache`: another core sent a prompt with this block chain to `backend` (holding
    /// `id`), pinned to its engine slot `slot` if any, through the balancer of model pool `pool`
    /// (`None`: the top-level one).
    Prefix {
        pool: Option<usize>,
        backend: usize,
        id: u64,
        slot: Option<usize>,
        blocks: Arc<[u64]>,
    },
}

/// How a backend's engine answers, learnt by a core from one of its requests (kept by
/// `worker::traits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trait {
    /// Answers a 400 naming `continuous_usage_stats`: asked without it.
    NoRunningUsage,
    /// llama.cpp with `timings` at a stream's end only: asked for `timings_per_token`.
    PerTokenTimings,
}

/// Sent to the health thread.
pub(crate) enum HealthReport {
    /// A connect to this backend failed or timed out: mark it down now, probe it again soon.
    Unreachable { backend: usize, id: u64 },
    /// The backend set changed: probe new backends now, forget removed ones.
    Table(Arc<BackendTable>),
    /// A core's breaker news about a backend: its fault streak tripped, or its probe ended.
    Breaker {
        backend: usize,
        id: u64,
        report: Report,
    },
}

/// Sent to the control-plane thread (`plane`).
pub(crate) enum PlaneMsg {
    /// `core` has no request in flight on draining backend `id`, as of table `version`.
    Drained { core: usize, id: u64, version: u64 },
    /// Re-read the config file; the outcome goes to `reply`.
    Reload {
        reply: Sender<Result<Summary, ReloadError>>,
    },
}

/// The senders into every core's inbox.
#[derive(Clone)]
pub(crate) struct Broadcast {
    inboxes: Vec<Sender<ControlMsg>>,
}

impl Broadcast {
    /// Creates one inbox per core.
    pub(crate) fn new(cores: usize) -> (Broadcast, Vec<Receiver<ControlMsg>>) {
        let (tx, rx): (Vec<_>, Vec<_>) = (0..cores).map(|_| crossbeam_channel::unbounded()).unzip();
        (Broadcast { inboxes: tx }, rx)
    }

    pub(crate) fn cores(&self) -> usize {
        self.inboxes.len()
    }

    /// Sends to every core except `skip` (a core does not message itself).
    pub(crate) fn send_others(&self, skip: Option<usize>, msg: &ControlMsg) {
        for (i, tx) in self.inboxes.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            if tx.len() >= INBOX_CAPACITY {
                log::debug!("core {i} inbox full; message dropped until the next snapshot");
                continue;
            }
            // Unbounded: the only error is a core that has exited, which needs nothing.
            let _ = tx.try_send(msg.clone());
        }
    }

    pub(crate) fn send_all(&self, msg: &ControlMsg) {
        self.send_others(None, msg)
    }
}

/// The outcome of a successful reload.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// The backend table version now in force.
    pub version: u64,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub updated: Vec<String>,
    /// Settings that changed in the file but need a restart (their running value is kept).
    pub warnings: Vec<String>,
}
