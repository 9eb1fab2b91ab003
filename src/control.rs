//! Messages that cross threads, and the fan-out that delivers them. Cores never block on these:
//! they `try_send`, and drain their inbox with `try_iter` at pick time and on their tick. A lost
//! `Load` message is healed by the next periodic `Snapshot`; health state is re-broadcast by the
//! health thread every round, so a full inbox can delay but never corrupt a core's view.

use crossbeam_channel::{Receiver, Sender, TrySendError};

/// Bounded so a stalled core cannot make the others grow memory without limit.
const INBOX_CAPACITY: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub enum ControlMsg {
    /// One core's absolute in-flight count for one backend.
    Load {
        core: usize,
        backend: usize,
        in_flight: u32,
    },
    /// One core's counts for every backend; sent every second to heal drift.
    Snapshot { core: usize, counts: Vec<u32> },
    /// A backend's health as decided by the health thread (or a core's passive report).
    Health { backend: usize, up: bool },
    /// A backend's engine load as scraped from its `/metrics`.
    Engine {
        backend: usize,
        reading: crate::engine::Reading,
    },
}

/// Sent by cores to the health thread.
#[derive(Debug, Clone)]
pub enum HealthReport {
    /// A connect to this backend failed or timed out: mark it down now, probe it again soon.
    Unreachable { backend: usize },
}

/// The senders into every core's inbox.
#[derive(Clone)]
pub struct Broadcast {
    inboxes: Vec<Sender<ControlMsg>>,
}

impl Broadcast {
    /// Creates one inbox per core.
    pub fn new(cores: usize) -> (Broadcast, Vec<Receiver<ControlMsg>>) {
        let (tx, rx): (Vec<_>, Vec<_>) = (0..cores)
            .map(|_| crossbeam_channel::bounded(INBOX_CAPACITY))
            .unzip();
        (Broadcast { inboxes: tx }, rx)
    }

    pub fn cores(&self) -> usize {
        self.inboxes.len()
    }

    /// Sends to every core except `skip` (a core does not message itself).
    pub fn send_others(&self, skip: Option<usize>, msg: &ControlMsg) {
        for (i, tx) in self.inboxes.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            match tx.try_send(msg.clone()) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(_)) => {
                    log::debug!("core {i} inbox full; message dropped until the next snapshot")
                }
            }
        }
    }

    pub fn send_all(&self, msg: &ControlMsg) {
        self.send_others(None, msg)
    }
}
