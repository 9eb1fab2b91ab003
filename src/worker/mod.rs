//! The state one core owns: its load view and balancer, its upstream pool, its local metrics,
//! its inbox. Nothing here is shared with another thread except through `control` messages and
//! the read-mostly `Shared` block; in-flight counts are held by RAII guards so a dropped future
//! (client gone, timeout) can never leak one.
//!
//! The backend set and the configuration can change at run time: a new `BackendTable` arrives as
//! a message and is applied here, between requests, on the inbox drain. Requests hold an `Rc` of
//! the table and config they started with, so a swap never pulls anything from under them.

pub mod balance;
pub(crate) mod breaker;
pub(crate) mod capacity;
pub(crate) mod decisions;
pub mod engine;
pub(crate) mod prefix;
pub(crate) mod spare;
#[cfg(test)]
pub(crate) mod testing;
pub(crate) mod traits;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::auth::{CoreAuth, KeyStore};
use crate::backends::engine_slots::SlotGuard;
use crate::backends::{BackendTable, State};
use crate::capacity::{Capacity, ConnectionLimit};
use crate::config::{Config, Strategy};
use crate::control::{Broadcast, ControlMsg, HealthReport, PlaneMsg};
use crate::error::{ProxyError, Verdict};
use crate::telemetry::metrics::{LocalMetrics, Metrics};
use crate::upstream::Pool;
use crate::usage::{CoreSender, Handoff};
use crate::worker::balance::{Balancer, Inputs, LoadView, Member, Params, Pick};
use crate::worker::breaker::CoreBreakers;
use crate::worker::capacity::CoreCapacity;
use crate::worker::decisions::LocalDecisions;
use crate::worker::engine::EngineView;
use crate::worker::traits::{Trait, Traits};

/// A counter on its own cache line, so cores updating their own never contend.
#[repr(align(128))]
#[derive(Default)]
pub(crate) struct PaddedCount(pub AtomicUsize);

/// Process-wide, read-mostly state.
pub(crate) struct Shared {
    pub(crate) draining: AtomicBool,
    /// In-flight requests per core (the drain waits for all to reach zero).
    pub(crate) inflight: Vec<PaddedCount>,
    pub(crate) connections: Vec<PaddedCount>,
    pub(crate) metrics: Arc<Metrics>,
    /// The control-plane thread: drain reports, reload requests.
    pub(crate) plane: Sender<PlaneMsg>,
    /// Client keys (replaced as a whole when `auth.keys_file` changes).
    pub(crate) keys: Arc<KeyStore>,
    /// `limits.max_connections`, counted across cores.
    pub(crate) connection_limit: Arc<ConnectionLimit>,
    /// `backends[].max_inflight` and the wait queue, counted across cores.
    pub(crate) capacity: Arc<Capacity>,
}

impl Shared {
    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn total_inflight(&self) -> usize {
        self.inflight
            .iter()
            .map(|c| c.0.load(Ordering::Acquire))
            .sum()
    }
}

pub(crate) struct Worker {
    pub(crate) id: usize,
    pub(crate) shared: Arc<Shared>,
    pub(crate) view: LoadView,
    /// Circuit breakers by slot (decided on the health thread, streaks counted here).
    pub(crate) breakers: CoreBreakers,
    pub(crate) balancer: Rc<Balancer>,
    /// One balancer per model pool (`models:` of the config in force), each with its own
    /// strategy and state; rebuilt when a reload changes the pools.
    pub(crate) pool_balancers: RefCell<Vec<Rc<Balancer>>>,
    /// The engines' own load readings (`least_load`).
    pub(crate) engine: EngineView,
    pub(crate) decisions: LocalDecisions,
    pub(crate) pool: Pool,
    /// Client write buffers kept from one response for the next.
    pub(crate) spare: spare::Spare,
    /// Usage taps handed from one exchange to the next.
    pub(crate) taps: spare::Taps,
    pub(crate) metrics: LocalMetrics,
    pub(crate) usage: CoreSender,
    /// This core's access-log batch (`None` when the process logger is not ours).
    pub(crate) access: Option<crate::telemetry::logging::CoreAccess>,
    pub(crate) auth: CoreAuth,
    pub(crate) capacity: Rc<CoreCapacity>,
    inbox: Receiver<ControlMsg>,
    peers: Broadcast,
    health_tx: Sender<HealthReport>,
    seq: Cell<u64>,
    /// The fixed start of this core's request ids: a random u64 and the core's index in hex.
    /// `request_id_prefix`, as text once (hex digits), not checked as UTF-8 per request.
    id_prefix: Box<str>,
    last_snapshot: Cell<Instant>,
    // `Rc<Arc<_>>` on purpose: requests clone the `Rc` (a core-local count); cloning the `Arc`
    // per request would bounce its shared count between all cores.
    #[allow(clippy::redundant_allocation)]
    table: RefCell<Rc<Arc<BackendTable>>>,
    #[allow(clippy::redundant_allocation)]
    config: RefCell<Rc<Arc<Config>>>,
    /// The pool names `pool_balancers` was built for (to keep state across reloads).
    pool_names: RefCell<Vec<String>>,
    /// Draining backend ids this core has reported drained since the last table change.
    drained_sent: RefCell<Vec<u64>>,
    /// How each backend's engine answers where it changes what the proxy asks (`traits`).
    pub(crate) traits: Traits,
    started: Instant,
}

impl Worker {
    pub(crate) fn new(
        id: usize,
        shared: Arc<Shared>,
        inbox: Receiver<ControlMsg>,
        peers: Broadcast,
        health_tx: Sender<HealthReport>,
        usage_tx: Handoff,
        table: Arc<BackendTable>,
    ) -> Self {
        let cfg = table.config.clone();
        let w = Worker {
            id,
            view: LoadView::new(id, peers.cores(), 0),
            breakers: CoreBreakers::default(),
            balancer: Rc::new(Balancer::new(cfg.strategy, Vec::new())),
            pool_balancers: RefCell::new(Vec::new()),
            engine: EngineView::new(0, cfg.routing.metrics_stale_after),
            decisions: LocalDecisions::new(&shared.metrics.routing),
            pool: Pool::new(0, cfg.pool.max_idle_per_backend, cfg.pool.idle_timeout),
            spare: spare::Spare::default(),
            taps: spare::Taps::default(),
            metrics: LocalMetrics::new(shared.metrics.clone(), &cfg),
            usage: CoreSender::new(usage_tx),
            access: crate::telemetry::logging::CoreAccess::new(),
            auth: CoreAuth::new(shared.keys.clone()),
            capacity: CoreCapacity::new(shared.capacity.clone()),
            shared,
            inbox,
            peers,
            health_tx,
            seq: Cell::new(0),
            id_prefix: String::from_utf8_lossy(&request_id_prefix(fastrand::u64(..), id)).into(),
            last_snapshot: Cell::new(Instant::now()),
            table: RefCell::new(Rc::new(table.clone())),
            config: RefCell::new(Rc::new(cfg)),
            pool_names: RefCell::new(Vec::new()),
            drained_sent: RefCell::new(Vec::new()),
            traits: Traits::default(),
            started: Instant::now(),
        };
        w.install(&table, true);
        w
    }

    /// The configuration in force (follows reloads). Hold the `Rc` for as long as needed: a
    /// reload replaces it for later requests only.
    #[allow(clippy::redundant_allocation)]
    pub(crate) fn config(&self) -> Rc<Arc<Config>> {
        self.config.borrow().clone()
    }

    /// The backend set in force.
    #[allow(clippy::redundant_allocation)]
    pub(crate) fn table(&self) -> Rc<Arc<BackendTable>> {
        self.table.borrow().clone()
    }

    /// Applies a newer backend table: slots whose backend changed start from scratch (counts,
    /// health, pooled connections, metrics labels); slots that keep their backend keep all of
    /// it. Older or equal versions (re-sent copies) are ignored.
    fn apply_table(&self, new: Arc<BackendTable>) {
        let old = self.table();
        if new.version <= old.version {
            return;
        }
        // Every core, not just the one publishing gauges on its tick: any core answering
        // /metrics publishes them too, and must not bring a forgotten backend back.
        for (slot, e) in old.entries() {
            if new.get(slot).is_none_or(|n| n.id != e.id) {
                self.shared.metrics.forget_backend(&e.spec.name);
            }
        }
        if !Arc::ptr_eq(&new.config, &old.config) {
            *self.config.borrow_mut() = Rc::new(new.config.clone());
        }
        self.install(&new, false);
        *self.table.borrow_mut() = Rc::new(new);
        self.drained_sent.borrow_mut().clear();
    }

    /// Sizes and resets per-slot state for `table` (`first`: the view starts empty).
    fn install(&self, table: &BackendTable, first: bool) {
        let n = table.len();
        let labels: Vec<String> = table
            .slots
            .iter()
            .map(|e| e.as_ref().map_or_else(String::new, |e| e.spec.name.clone()))
            .collect();
        self.metrics.set_backends(labels, table.models.clone());
        self.view.resize(n);
        self.breakers.resize(n);
        self.engine.resize(n);
        for slot in 0..n {
            let id = table.get(slot).map_or(0, |e| e.id);
            if first || self.view.id(slot) != id {
                let up = table.get(slot).is_some_and(|e| e.up_initially);
                self.view.reset(slot, id, up);
                self.breakers.reset(slot, id);
                self.pool.clear(slot);
                // Another backend's engine readings must not carry over to this one.
                self.engine.clear(slot);
            }
        }
        let open: Vec<bool> = (0..n)
            .map(|s| table.get(s).is_some_and(|e| e.state == State::Active))
            .collect();
        self.pool.set_slots(&open);
        self.engine
            .set_stale_after(table.config.routing.metrics_stale_after);
        self.install_balancers(table);
    }

    /// Brings the top-level and per-pool balancers to `table`'s slots and config. A pool keeps
    /// its balancer (and state) while its name and strategy stay; otherwise it gets a new one.
    fn install_balancers(&self, table: &BackendTable) {
        let cfg = &table.config;
        let params = Params::from_config(&cfg.routing);
        let members: Vec<Member> = (0..table.len())
            .map(|s| match table.get(s) {
                Some(e) => Member {
                    id: e.id,
                    weight: e.spec.weight,
                    key: balance::hash_bytes(e.spec.url.as_bytes()),
                    busy: e.busy.clone(),
                },
                None => Member {
                    id: 0,
                    weight: 1,
                    key: 0,
                    busy: None,
                },
            })
            .collect();
        self.balancer.update(cfg.strategy, params, &members);
        let old_names = self
            .pool_names
            .replace(cfg.models.iter().map(|p| p.name.clone()).collect());
        let mut pools = self.pool_balancers.borrow_mut();
        let old = std::mem::take(&mut *pools);
        for p in &cfg.models {
            let kept = old_names
                .iter()
                .position(|n| *n == p.name)
                .and_then(|i| old.get(i))
                .filter(|b| b.strategy() == p.strategy)
                .cloned();
            let b = kept.unwrap_or_else(|| Rc::new(Balancer::new(p.strategy, Vec::new())));
            b.update(p.strategy, params, &members);
            pools.push(b);
        }
    }

    /// Tells the control plane which draining backends this core no longer has requests on, so
    /// their slots can be freed once every core has said so.
    fn report_drained(&self) {
        let table = self.table();
        let mut sent = self.drained_sent.borrow_mut();
        for (slot, e) in table.entries() {
            if e.state != State::Draining || self.view.own(slot) != 0 || sent.contains(&e.id) {
                continue;
            }
            let msg = PlaneMsg::Drained {
                core: self.id,
                id: e.id,
                version: table.version,
            };
            // A full channel is retried on the next tick.
            if self.shared.plane.try_send(msg).is_ok() {
                sent.push(e.id);
            }
        }
    }

    /// Applies every pending message. Cheap when the inbox is empty (one atomic load).
    pub(crate) fn drain_inbox(&self) {
        for msg in self.inbox.try_iter() {
            match msg {
                ControlMsg::Load {
                    core,
                    backend,
                    id,
                    in_flight,
                } => {
                    self.view.set(core, backend, id, in_flight);
                }
                ControlMsg::Snapshot { core, counts } => {
                    for (b, (id, c)) in counts.into_iter().enumerate() {
                        self.view.set(core, b, id, c);
                    }
                }
                ControlMsg::Health { backend, id, up } => {
                    if self.view.id(backend) == id && self.view.is_up(backend) != up {
                        log::debug!("core {}: backend {backend} up={up}", self.id);
                        if !up {
                            // Down means restarted or gone: its KV cache cannot be trusted.
                            self.forget_prefixes(backend);
                        }
                    }
                    self.view.set_up(backend, id, up);
                }
                ControlMsg::Breaker { backend, id, phase } => self.breakers.set(backend, id, phase),
                ControlMsg::Table(table) => self.apply_table(table),
                ControlMsg::Prefix {
                    pool,
                    backend,
                    id,
                    slot,
                    blocks,
                } => {
                    if self.view.id(backend) == id {
                        self.balancer_for(pool).learn_slot(backend, slot, &blocks);
                    }
                }
                ControlMsg::Trait {
                    backend,
                    id,
                    learnt,
                } => {
                    self.traits.learn(backend, id, learnt);
                }
                ControlMsg::Engine {
                    backend,
                    id,
                    reading,
                } => {
                    if self.view.id(backend) == id {
                        self.engine.set(backend, reading);
                    }
                }
            }
        }
    }

    /// Periodic housekeeping: inbox, drift-healing snapshot, pool expiry, metrics flush.
    pub(crate) fn tick(&self) {
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
        self.report_drained();
        self.pool.prune();
        self.capacity.tick();
        self.usage.tick();
        if let Some(a) = &self.access {
            a.flush();
        }
        self.flush_metrics(self.id == 0);
        self.decisions.flush(&self.shared.metrics.routing);
    }

    /// Folds this core's metrics into the registry; with `backends`, also publishes every
    /// backend's health and in-flight gauges from this core's cross-core view.
    pub(crate) fn flush_metrics(&self, backends: bool) {
        let view = |i: usize| (self.view.is_up(i), self.view.load(i));
        self.metrics
            .flush(backends.then_some(&view as &dyn Fn(usize) -> (bool, u32)));
    }

    /// Every balancer forgets what `slot`'s backend held (`prefix_cache`).
    fn forget_prefixes(&self, slot: usize) {
        self.balancer.forget(slot);
        for b in self.pool_balancers.borrow().iter() {
            b.forget(slot);
        }
    }

    /// The balancer of a model pool (an index into the `models` of the config in force), or
    /// the top-level one.
    pub(crate) fn balancer_for(&self, pool: Option<usize>) -> Rc<Balancer> {
        pool.and_then(|p| self.pool_balancers.borrow().get(p).cloned())
            .unwrap_or_else(|| self.balancer.clone())
    }

    /// Picks a backend with `balancer` for a request with affinity `key`. The caller counts
    /// the decision (`decisions.record`) once the pick is taken: a pick whose backend turns out
    /// full (`proxy::pick`) is not a decision.
    pub(crate) fn choose(
        &self,
        balancer: &Balancer,
        key: Option<u64>,
        blocks: &[u64],
        eligible: impl Fn(usize) -> bool,
    ) -> Option<Pick> {
        let engine = balancer.strategy().uses_engine_load();
        let input = Inputs {
            view: &self.view,
            engine: engine.then_some(&self.engine),
            key,
            blocks,
            // Only engine readings age; other strategies skip the clock read.
            now: if engine { Instant::now() } else { self.started },
        };
        balancer.choose(&input, eligible)
    }

    /// A pick of `backend` (pinned to its engine slot `slot`, if any) for a prompt with this
    /// block chain was taken through `balancer` (the top-level one or pool `pool`'s):
    /// `prefix_cache` remembers it and tells the other cores, so a burst of one new prefix over
    /// several cores does not warm it on several backends. One shared allocation per pick, sent
    /// only by `prefix_cache` balancers; a full inbox drops the news (the index is approximate;
    /// the load view is what must not drift, and the engine slots' busy counts are atomics).
    pub(crate) fn learn(
        &self,
        balancer: &Balancer,
        pool: Option<usize>,
        backend: usize,
        slot: Option<usize>,
        blocks: &[u64],
    ) {
        if balancer.strategy() != Strategy::PrefixCache || blocks.is_empty() {
            return;
        }
        balancer.learn_slot(backend, slot, blocks);
        if self.peers.cores() > 1 {
            self.peers.send_others(
                Some(self.id),
                &ControlMsg::Prefix {
                    pool,
                    backend,
                    id: self.view.id(backend),
                    slot,
                    blocks: blocks.into(),
                },
            );
        }
    }

    /// This core learnt `t` of the backend in `slot` from one of its requests: the other cores
    /// are told. Whether it is news here (the caller logs it once).
    pub(crate) fn learn_trait(&self, slot: usize, t: Trait) -> bool {
        let id = self.view.id(slot);
        let news = self.traits.learn(slot, id, t);
        if news && self.peers.cores() > 1 {
            let msg = ControlMsg::Trait {
                backend: slot,
                id,
                learnt: t,
            };
            self.peers.send_others(Some(self.id), &msg);
        }
        news
    }

    /// Takes an in-flight slot on `backend`, released when the guard drops.
    pub(crate) fn begin(self: &Rc<Self>, backend: usize) -> InflightGuard {
        self.change_load(backend, 1);
        InflightGuard {
            worker: self.clone(),
            backend,
            _slot: None,
        }
    }

    fn change_load(&self, backend: usize, delta: i32) {
        let v = self.view.add_own(backend, delta);
        self.peers.send_others(
            Some(self.id),
            &ControlMsg::Load {
                core: self.id,
                backend,
                id: self.view.id(backend),
                in_flight: v,
            },
        );
    }

    /// Passive health: a connect failure marks the backend down here at once and tells the
    /// health thread, which broadcasts it and keeps probing.
    pub(crate) fn report_unreachable(&self, backend: usize) {
        let id = self.view.id(backend);
        self.view.set_up(backend, id, false);
        let _ = self
            .health_tx
            .try_send(HealthReport::Unreachable { backend, id });
    }

    /// An exchange with `backend` failed: counted by kind, fed to its breaker, and a backend that
    /// cannot be reached is marked down at once (passive health). All three read the error.
    pub(crate) fn upstream_failed(&self, backend: usize, e: &ProxyError) {
        if let Some(kind) = e.upstream_kind() {
            self.metrics.upstream_error(backend, kind);
        }
        if let Some(v) = e.verdict() {
            self.outcome(backend, v);
        }
        if e.backend_unreachable() {
            self.report_unreachable(backend);
        }
    }

    /// May a request go to `backend` now? Healthy, and its breaker lets requests through.
    pub(crate) fn eligible(&self, backend: usize) -> bool {
        self.view.is_up(backend) && self.breakers.eligible(backend)
    }

    /// Feeds the outcome of one exchange with `backend` to its breaker; a trip or the end of a
    /// probe goes to the health thread, which decides and tells every core.
    pub(crate) fn outcome(&self, backend: usize, v: Verdict) {
        let settings = &self.config().breaker;
        if !settings.enabled {
            return;
        }
        let Some(report) = self
            .breakers
            .record(backend, v, settings.consecutive_failures)
        else {
            return;
        };
        let id = self.view.id(backend);
        if report == crate::worker::breaker::Report::Trip {
            let table = self.table();
            let name = table.get(backend).map_or("?", |e| e.spec.name.as_str());
            log::warn!(
                "core {}: backend {name} failed {} times in a row; opening its breaker",
                self.id,
                settings.consecutive_failures
            );
        }
        // A lost trip is undone by the health thread's next re-send (closed), and the streak
        // trips again; a lost probe result is re-armed by the health thread after a while.
        let _ = self.health_tx.try_send(HealthReport::Breaker {
            backend,
            id,
            report,
        });
    }

    /// Held by the request that carries `backend`'s half-open probe (if this core holds it): a
    /// request dropped before its verdict hands the probe back instead of leaving it taken.
    pub(crate) fn probe_guard(self: &Rc<Self>, backend: usize) -> Option<ProbeGuard> {
        self.breakers.probe(backend).map(|token| ProbeGuard {
            worker: self.clone(),
            backend,
            token,
        })
    }

    /// A request id unique across cores and restarts without any shared counter.
    pub(crate) fn next_request_id(&self) -> String {
        let n = self.seq.get().wrapping_add(1);
        self.seq.set(n);
        // Eight digits, more once a core has served 2^32 requests (never wraps around).
        let digits = (16 - n.leading_zeros() as usize / 4).max(8);
        let mut out = String::with_capacity(self.id_prefix.len() + digits);
        out.push_str(&self.id_prefix);
        out.extend(
            crate::encode::hex16(n)[16 - digits..]
                .iter()
                .map(|&d| char::from(d)),
        );
        out
    }

    /// Counts one request as in flight on this core for the drain, released on drop.
    pub(crate) fn request_guard(self: &Rc<Self>) -> RequestGuard {
        self.shared.inflight[self.id]
            .0
            .fetch_add(1, Ordering::AcqRel);
        RequestGuard {
            worker: self.clone(),
        }
    }

    pub(crate) fn connection_guard(self: &Rc<Self>) -> ConnectionGuard {
        self.shared.connections[self.id]
            .0
            .fetch_add(1, Ordering::Relaxed);
        ConnectionGuard {
            worker: self.clone(),
        }
    }
}

/// A request id's fixed start: `random` as 16 hex digits, then the core's index as 4.
fn request_id_prefix(random: u64, core: usize) -> [u8; 20] {
    let mut p = [0u8; 20];
    p[..16].copy_from_slice(&crate::encode::hex16(random));
    p[16..].copy_from_slice(&crate::encode::hex16(core as u64)[12..]);
    p
}

pub(crate) struct InflightGuard {
    worker: Rc<Worker>,
    backend: usize,
    /// The engine slot the request is pinned to (`prefix_cache` on a backend with `slots`):
    /// counted for as long as the backend's in-flight count.
    _slot: Option<SlotGuard>,
}

impl InflightGuard {
    pub(crate) fn hold_slot(&mut self, slot: Option<SlotGuard>) {
        self._slot = slot;
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.worker.change_load(self.backend, -1);
    }
}

pub(crate) struct ProbeGuard {
    worker: Rc<Worker>,
    backend: usize,
    token: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        self.worker.breakers.release(self.backend, &self.token);
    }
}

pub(crate) struct RequestGuard {
    worker: Rc<Worker>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.worker.shared.inflight[self.worker.id]
            .0
            .fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) struct ConnectionGuard {
    worker: Rc<Worker>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.worker.shared.connections[self.worker.id]
            .0
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
