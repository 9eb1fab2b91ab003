//! The state one core owns: its load view and balancer, its upstream pool, its local metrics,
//! its inbox. Nothing here is shared with another thread except through `control` messages and
//! the read-mostly `Shared` block; in-flight counts are held by RAII guards so a dropped future
//! (client gone, timeout) can never leak one.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::balance::{self, Balancer, Inputs, LoadView, Params, Pick};
use crate::config::{Backend, Config, Strategy};
use crate::control::{Broadcast, ControlMsg, HealthReport};
use crate::engine::EngineView;
use crate::metrics::{LocalDecisions, LocalMetrics, Metrics};
use crate::route::RouteTable;
use crate::upstream::Pool;
use crate::usage::{CoreSender, UsageEvent};

/// A counter on its own cache line, so cores updating their own never contend.
#[repr(align(128))]
#[derive(Default)]
pub struct PaddedCount(pub AtomicUsize);

/// Process-wide, read-mostly state.
pub struct Shared {
    pub config: Arc<Config>,
    /// Resolved address of each backend, index-aligned with `config.backends`.
    pub backend_addrs: Vec<SocketAddr>,
    pub draining: AtomicBool,
    /// In-flight requests per core (the drain waits for all to reach zero).
    pub inflight: Vec<PaddedCount>,
    pub connections: Vec<PaddedCount>,
    pub metrics: Arc<Metrics>,
    pub routes: RouteTable,
}

impl Shared {
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn total_inflight(&self) -> usize {
        self.inflight
            .iter()
            .map(|c| c.0.load(Ordering::Acquire))
            .sum()
    }
}

pub struct Worker {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub view: LoadView,
    pub balancer: Balancer,
    /// One balancer per model pool (`Config::models`), each with its own strategy and state.
    pub pool_balancers: Vec<Balancer>,
    /// The engines' own load readings (`least_load`).
    pub engine: EngineView,
    pub decisions: LocalDecisions,
    pub pool: Pool,
    pub metrics: LocalMetrics,
    pub usage: CoreSender,
    inbox: Receiver<ControlMsg>,
    peers: Broadcast,
    health_tx: Sender<HealthReport>,
    seq: Cell<u64>,
    id_prefix: u64,
    last_snapshot: Cell<Instant>,
    started: Instant,
}

impl Worker {
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        inbox: Receiver<ControlMsg>,
        peers: Broadcast,
        health_tx: Sender<HealthReport>,
        usage_tx: Sender<UsageEvent>,
    ) -> Self {
        let cfg = &shared.config;
        let n = cfg.backends.len();
        Worker {
            id,
            view: LoadView::new(id, peers.cores(), n),
            balancer: new_balancer(cfg, cfg.strategy, &cfg.backends),
            pool_balancers: cfg
                .models
                .iter()
                .map(|p| new_balancer(cfg, p.strategy, &cfg.backends))
                .collect(),
            engine: EngineView::new(n, cfg.routing.metrics_stale_after),
            decisions: LocalDecisions::default(),
            pool: Pool::new(n, cfg.pool.max_idle_per_backend, cfg.pool.idle_timeout),
            metrics: LocalMetrics::new(shared.metrics.clone(), cfg),
            usage: CoreSender::new(usage_tx),
            shared,
            inbox,
            peers,
            health_tx,
            seq: Cell::new(0),
            id_prefix: fastrand::u64(..),
            last_snapshot: Cell::new(Instant::now()),
            started: Instant::now(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Applies every pending message. Cheap when the inbox is empty (one atomic load).
    pub fn drain_inbox(&self) {
        for msg in self.inbox.try_iter() {
            match msg {
                ControlMsg::Load {
                    core,
                    backend,
                    in_flight,
                } => {
                    self.view.set(core, backend, in_flight);
                }
                ControlMsg::Snapshot { core, counts } => {
                    for (b, c) in counts.into_iter().enumerate() {
                        self.view.set(core, b, c);
                    }
                }
                ControlMsg::Health { backend, up } => {
                    if self.view.backends() > backend && self.view.is_up(backend) != up {
                        log::debug!("core {}: backend {backend} up={up}", self.id);
                    }
                    self.view.set_up(backend, up);
                }
                ControlMsg::Engine { backend, reading } => self.engine.set(backend, reading),
            }
        }
    }

    /// Periodic housekeeping: inbox, drift-healing snapshot, pool expiry, metrics flush.
    pub fn tick(&self) {
        self.drain_inbox();
        if self.last_snapshot.get().elapsed() >= Duration::from_secs(1) {
            self.last_snapshot.set(Instant::now());
            self.peers.send_others(
                Some(self.id),
                &ControlMsg::Snapshot {
                    core: self.id,
                    counts: self.view.own_counts(),
                },
            );
        }
        self.pool.prune();
        self.usage.tick();
        self.metrics.flush(&self.view, self.id == 0);
        self.decisions.flush(&self.shared.metrics.routing);
    }

    /// The balancer of a model pool, or the top-level one.
    pub fn balancer_for(&self, pool: Option<usize>) -> &Balancer {
        pool.and_then(|p| self.pool_balancers.get(p))
            .unwrap_or(&self.balancer)
    }

    /// Picks a backend with `balancer` for a request with affinity `key`, counting the decision.
    pub fn choose(
        &self,
        balancer: &Balancer,
        key: Option<u64>,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<Pick> {
        let engine = balancer.strategy().uses_engine_load();
        let input = Inputs {
            view: &self.view,
            engine: engine.then_some(&self.engine),
            key,
            // Only engine readings age; other strategies skip the clock read.
            now: if engine { Instant::now() } else { self.started },
        };
        let pick = balancer.choose(&input, eligible)?;
        self.decisions.record(balancer.strategy(), pick.reason);
        Some(pick)
    }

    /// Takes an in-flight slot on `backend`, released when the guard drops.
    pub fn begin(self: &Rc<Self>, backend: usize) -> InflightGuard {
        self.change_load(backend, 1);
        InflightGuard {
            worker: self.clone(),
            backend,
        }
    }

    fn change_load(&self, backend: usize, delta: i32) {
        let v = self.view.add_own(backend, delta);
        self.peers.send_others(
            Some(self.id),
            &ControlMsg::Load {
                core: self.id,
                backend,
                in_flight: v,
            },
        );
    }

    /// Passive health: a connect failure marks the backend down here at once and tells the
    /// health thread, which broadcasts it and keeps probing.
    pub fn report_unreachable(&self, backend: usize) {
        self.view.set_up(backend, false);
        let _ = self
            .health_tx
            .try_send(HealthReport::Unreachable { backend });
    }

    /// A request id unique across cores and restarts without any shared counter.
    pub fn next_request_id(&self) -> String {
        let n = self.seq.get().wrapping_add(1);
        self.seq.set(n);
        format!("{:016x}{:04x}{:08x}", self.id_prefix, self.id, n)
    }

    /// Counts one request as in flight on this core for the drain, released on drop.
    pub fn request_guard(self: &Rc<Self>) -> RequestGuard {
        self.shared.inflight[self.id]
            .0
            .fetch_add(1, Ordering::AcqRel);
        RequestGuard {
            worker: self.clone(),
        }
    }

    pub fn connection_guard(self: &Rc<Self>) -> ConnectionGuard {
        self.shared.connections[self.id]
            .0
            .fetch_add(1, Ordering::Relaxed);
        ConnectionGuard {
            worker: self.clone(),
        }
    }
}

/// A balancer over `backends` (indices as in `cfg.backends`) whose rendezvous identities are
/// their URLs, so every replica and every config order hashes a key to the same backend.
pub fn new_balancer(cfg: &Config, strategy: Strategy, backends: &[Backend]) -> Balancer {
    let weights = backends.iter().map(|b| b.weight).collect();
    let ids = backends
        .iter()
        .map(|b| balance::hash_bytes(b.url.as_bytes()))
        .collect();
    Balancer::with(strategy, weights, ids, Params::from_config(&cfg.routing))
}

pub struct InflightGuard {
    worker: Rc<Worker>,
    backend: usize,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.worker.change_load(self.backend, -1);
    }
}

pub struct RequestGuard {
    worker: Rc<Worker>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.worker.shared.inflight[self.worker.id]
            .0
            .fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct ConnectionGuard {
    worker: Rc<Worker>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.worker.shared.connections[self.worker.id]
            .0
            .fetch_sub(1, Ordering::Relaxed);
    }
}
