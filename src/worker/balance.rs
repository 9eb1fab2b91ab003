//! Backend selection. `LoadView` is one core's picture of every backend (its own exact in-flight
//! counts, the latest counts other cores reported, health); `Balancer` applies the configured
//! strategy to it. Both are per-core and never shared: other cores' counts arrive as messages.
//!
//! The LLM-aware strategies take what they need per call (`Inputs`: engine readings, the
//! request's affinity key, the time) so a pick never allocates, locks or caches a backend count
//! beyond the balancer's own weights; every pick also says why it was made (`Reason`), which
//! feeds `llmproxy_routing_decisions_total`.
//!
//! `prefix_cache` keeps state of its own: an approximate index of the prompt blocks each backend
//! was sent (`worker::prefix`), learnt from this core's picks (`learn`, called once a pick is
//! taken) and from the other cores' picks (the same call, on their messages). On a backend that
//! declares `slots` it picks an engine slot too (the `slot` of the `Pick`, which the proxy pins
//! the request to with llama.cpp's `id_slot`), scoring each slot by its last prompt
//! (`prefix::SlotPrompts`, per core) and the requests pinned to it (process-wide atomics,
//! `backends::engine_slots`).

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::Instant;

use crate::backends::engine_slots::{SlotBusy, SlotGuard};

use crate::config::{Routing, Strategy};
pub use crate::hash::{block_chain, hash_bytes, mix64};
use crate::worker::engine::{EngineLoad, EngineView};
use crate::worker::prefix::{PrefixIndex, SlotPrompts};

/// Why a backend was chosen (a bounded label set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The strategy's ordinary choice (round robin turn, fewest in flight, ...).
    Balanced,
    /// `least_load` scored the winner on fresh engine metrics.
    EngineLoad,
    /// `least_load`: the winner's engine metrics were missing or stale; in-flight count only.
    StaleMetrics,
    /// `least_load`: every candidate's KV cache was above `routing.kv_threshold`.
    KvSaturated,
    /// `consistent_hash`: the key's own backend.
    AffinityHit,
    /// `consistent_hash`: the key's backend was too far above the least loaded.
    ImbalanceFallback,
    /// `consistent_hash`: the request had no key; least loaded.
    NoKey,
    /// The request's model pool had no healthy backend, or the backend rejected the prompt as
    /// too long: another model's pool served it (set by the proxy, not by a strategy).
    FallbackModel,
    /// `prefix_cache`: the backend holding the longest part of the prompt.
    CacheHit,
    /// `prefix_cache`: no backend holds any of the prompt (or it is shorter than a block);
    /// least loaded, ties at random.
    CacheMiss,
    /// `prefix_cache`: a backend holds more of the prompt, but it was too busy; this one was
    /// cheaper (and now holds the prompt too).
    LoadSpill,
    /// `prefix_cache` on a backend with `slots`: the engine slot holding the longest part of
    /// the prompt, busy at the pick: the request waits in the engine for that slot (llama.cpp
    /// defers a task pinned to a busy slot until it frees) rather than recomputing the prompt
    /// in an idle one and evicting what that one held.
    SlotWait,
}

impl Reason {
    pub(crate) const ALL: [Reason; 12] = [
        Reason::Balanced,
        Reason::EngineLoad,
        Reason::StaleMetrics,
        Reason::KvSaturated,
        Reason::AffinityHit,
        Reason::ImbalanceFallback,
        Reason::NoKey,
        Reason::FallbackModel,
        Reason::CacheHit,
        Reason::CacheMiss,
        Reason::LoadSpill,
        Reason::SlotWait,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::Balanced => "balanced",
            Reason::EngineLoad => "engine_load",
            Reason::StaleMetrics => "stale_metrics",
            Reason::KvSaturated => "kv_saturated",
            Reason::AffinityHit => "affinity_hit",
            Reason::ImbalanceFallback => "imbalance_fallback",
            Reason::NoKey => "no_key",
            Reason::FallbackModel => "fallback_model",
            Reason::CacheHit => "cache_hit",
            Reason::CacheMiss => "cache_miss",
            Reason::LoadSpill => "load_spill",
            Reason::SlotWait => "slot_wait",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// A backend and why it was picked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    pub backend: usize,
    pub reason: Reason,
    /// `prefix_cache` on a backend with `slots`: the engine slot to pin the request to.
    pub slot: Option<usize>,
    /// `prefix_cache`, for a prompt of at least one block: the share of its blocks the picked
    /// backend (or engine slot) is thought to hold (`llmproxy_prefix_cache_matched_share`).
    pub share: Option<f64>,
}

/// What one pick may consult besides the in-flight view.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    pub view: &'a LoadView,
    /// Engine readings (`least_load`); `None` scores by in-flight counts only.
    pub engine: Option<&'a EngineView>,
    /// The request's affinity key (`consistent_hash`).
    pub key: Option<u64>,
    /// The prompt's block chain (`prefix_cache`; `hash::block_chain`).
    pub blocks: &'a [u64],
    pub now: Instant,
}

impl<'a> Inputs<'a> {
    pub fn new(view: &'a LoadView) -> Self {
        Inputs {
            view,
            engine: None,
            key: None,
            blocks: &[],
            now: Instant::now(),
        }
    }
}

/// Tunables of the LLM-aware strategies, copied out of `routing:` once.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub(crate) max_imbalance: u32,
    pub(crate) queue_weight: f64,
    pub(crate) kv_weight: f64,
    pub(crate) inflight_weight: f64,
    pub(crate) kv_threshold: f64,
    pub(crate) miss_cost: f64,
    pub(crate) prefix_capacity: usize,
}

impl Params {
    pub(crate) fn from_config(r: &Routing) -> Self {
        Params {
            max_imbalance: r.max_imbalance,
            queue_weight: r.queue_weight.0,
            kv_weight: r.kv_weight.0,
            inflight_weight: r.inflight_weight.0,
            kv_threshold: r.kv_threshold.0,
            miss_cost: r.prefix_cache.miss_cost.0,
            prefix_capacity: r.prefix_cache.capacity_blocks,
        }
    }

    /// `prefix_cache`'s blocks remembered per backend and the in-flight worth of a miss (for
    /// the simulation and benches, which build balancers without a config).
    pub fn prefix_cache(self, capacity_blocks: usize, miss_cost: f64) -> Self {
        Params {
            prefix_capacity: capacity_blocks,
            miss_cost,
            ..self
        }
    }
}

impl Default for Params {
    fn default() -> Self {
        Params::from_config(&Routing::default())
    }
}

pub struct LoadView {
    core: usize,
    cores: usize,
    slots: RefCell<Slots>,
}

/// Per backend slot; grows and is reset as the backend table changes (`backends`).
struct Slots {
    /// `counts[slot * cores + core]`: in-flight requests of `core` on the backend in `slot`.
    counts: Vec<u32>,
    totals: Vec<u32>,
    up: Vec<bool>,
    /// The backend id each slot holds (0 = free); messages about another id are stale.
    ids: Vec<u64>,
}

impl LoadView {
    /// A view of `backends` slots holding ids `1..=backends`, all up (for tests and benches).
    pub fn new(core: usize, cores: usize, backends: usize) -> Self {
        let view = LoadView {
            core,
            cores,
            slots: RefCell::new(Slots {
                counts: Vec::new(),
                totals: Vec::new(),
                up: Vec::new(),
                ids: Vec::new(),
            }),
        };
        view.resize(backends);
        for b in 0..backends {
            view.reset(b, b as u64 + 1, true);
        }
        view
    }

    pub(crate) fn backends(&self) -> usize {
        self.slots.borrow().totals.len()
    }

    /// Grows or shrinks to `n` slots; new slots are free (id 0, down).
    pub(crate) fn resize(&self, n: usize) {
        let mut s = self.slots.borrow_mut();
        s.counts.resize(n * self.cores, 0);
        s.totals.resize(n, 0);
        s.up.resize(n, false);
        s.ids.resize(n, 0);
    }

    /// `slot` now holds backend `id` (0 = free): counts start at zero.
    pub(crate) fn reset(&self, slot: usize, id: u64, up: bool) {
        let mut s = self.slots.borrow_mut();
        if slot >= s.totals.len() {
            return;
        }
        let cores = self.cores;
        s.counts[slot * cores..(slot + 1) * cores].fill(0);
        s.totals[slot] = 0;
        s.up[slot] = up;
        s.ids[slot] = id;
    }

    pub(crate) fn id(&self, slot: usize) -> u64 {
        self.slots.borrow().ids.get(slot).copied().unwrap_or(0)
    }

    /// In-flight requests on `backend` across all cores, as far as this core knows.
    pub(crate) fn load(&self, backend: usize) -> u32 {
        self.slots
            .borrow()
            .totals
            .get(backend)
            .copied()
            .unwrap_or(0)
    }

    pub(crate) fn own(&self, backend: usize) -> u32 {
        self.slots
            .borrow()
            .counts
            .get(backend * self.cores + self.core)
            .copied()
            .unwrap_or(0)
    }

    /// This core's count on every slot, with the id it is about.
    pub(crate) fn own_counts(&self) -> Vec<(u64, u32)> {
        (0..self.backends())
            .map(|b| (self.id(b), self.own(b)))
            .collect()
    }

    pub fn is_up(&self, backend: usize) -> bool {
        self.slots
            .borrow()
            .up
            .get(backend)
            .copied()
            .unwrap_or(false)
    }

    /// Sets health of `backend` if it still holds backend `id`.
    pub fn set_up(&self, backend: usize, id: u64, up: bool) {
        let mut s = self.slots.borrow_mut();
        if s.ids.get(backend) == Some(&id) {
            s.up[backend] = up;
        }
    }

    /// Records `core`'s absolute count for `backend` (holding `id`); returns false for an unknown
    /// index or a backend that has left the slot.
    pub fn set(&self, core: usize, backend: usize, id: u64, in_flight: u32) -> bool {
        let mut s = self.slots.borrow_mut();
        if core >= self.cores || backend >= s.totals.len() || s.ids[backend] != id {
            return false;
        }
        let i = backend * self.cores + core;
        s.totals[backend] = s.totals[backend] - s.counts[i] + in_flight;
        s.counts[i] = in_flight;
        true
    }

    /// Adjusts this core's own count and returns the new value (to broadcast).
    pub fn add_own(&self, backend: usize, delta: i32) -> u32 {
        let v = self.own(backend).saturating_add_signed(delta);
        self.set(self.core, backend, self.id(backend), v);
        v
    }
}

pub struct Balancer {
    strategy: Cell<Strategy>,
    /// By backend slot; free and draining slots keep a placeholder (they are never eligible).
    weights: RefCell<Vec<u32>>,
    /// Rendezvous identity of each slot's backend (a hash of its URL, so that every proxy
    /// replica, every reordering of the config and every table change maps a key to the same
    /// backend).
    keys: RefCell<Vec<u64>>,
    /// The backend id each slot held when state was last set (0 = free): a slot taken over by
    /// another backend starts from scratch.
    owners: RefCell<Vec<u64>>,
    params: Cell<Params>,
    next: Cell<usize>,
    /// Smooth weighted round robin state (nginx's `current_weight`).
    current: RefCell<Vec<i64>>,
    /// `prefix_cache`: what each slot's backend was recently sent (empty for other strategies).
    prefix: RefCell<PrefixIndex>,
    /// `prefix_cache`: what each engine slot of a backend with `slots` last held.
    engine: RefCell<SlotPrompts>,
}

/// One slot as the balancer sees it.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    /// The backend id (0 = free slot).
    pub(crate) id: u64,
    pub(crate) weight: u32,
    /// Rendezvous identity (`hash_bytes` of the backend's URL).
    pub(crate) key: u64,
    /// Requests pinned to each of its engine slots (`backends[].slots`; `None`: not declared).
    pub(crate) busy: Option<Arc<SlotBusy>>,
}

impl Balancer {
    pub fn new(strategy: Strategy, weights: Vec<u32>) -> Self {
        let ids = (0..weights.len() as u64).map(mix64).collect();
        Self::with(strategy, weights, ids, Params::default())
    }

    /// A balancer over backends with these weights and rendezvous identities (`keys`).
    pub fn with(strategy: Strategy, weights: Vec<u32>, keys: Vec<u64>, params: Params) -> Self {
        let n = weights.len();
        Balancer {
            strategy: Cell::new(strategy),
            weights: RefCell::new(weights),
            owners: RefCell::new((1..=n as u64).collect()),
            keys: RefCell::new(keys),
            params: Cell::new(params),
            // Cores start at different offsets so they don't all hit backend 0 first.
            next: Cell::new(fastrand::usize(..n.max(1))),
            current: RefCell::new(vec![0; n]),
            prefix: RefCell::new({
                let mut ix = PrefixIndex::new(params.prefix_capacity);
                ix.resize(n);
                ix
            }),
            engine: RefCell::new({
                let mut sp = SlotPrompts::new();
                sp.resize(n);
                sp
            }),
        }
    }

    /// `backend`'s engine keeps `slots` KV caches of its own (`backends[].slots`; 0 = one
    /// shared): for the simulation and benches, which build balancers without a table.
    pub fn set_engine_slots(&self, backend: usize, slots: usize) {
        let busy = (slots > 0).then(|| SlotBusy::new(slots));
        self.engine.borrow_mut().set_board(backend, busy.as_ref());
    }

    /// Counts a request pinned to engine `slot` of `backend` until the guard drops (`None`: the
    /// backend has no such slot). The proxy holds it for the request's life (`proxy::pick`).
    pub(crate) fn occupy(&self, backend: usize, slot: usize) -> Option<SlotGuard> {
        self.engine.borrow().board(backend)?.occupy(slot)
    }

    /// `occupy` for the simulation: the guard as an opaque value.
    pub fn occupy_slot(&self, backend: usize, slot: usize) -> Option<impl Drop> {
        self.occupy(backend, slot)
    }

    /// The backend table, the strategy or its tunables changed (reload, discovery).
    /// Smooth-weighted state is kept for slots that keep their backend and weight, so a reload
    /// does not reset the interleaving; a slot now holding another backend starts from zero.
    pub(crate) fn update(&self, strategy: Strategy, params: Params, members: &[Member]) {
        self.strategy.set(strategy);
        self.params.set(params);
        let mut current = self.current.borrow_mut();
        let mut weights = self.weights.borrow_mut();
        let mut owners = self.owners.borrow_mut();
        current.resize(members.len(), 0);
        let mut prefix = self.prefix.borrow_mut();
        prefix.set_capacity(params.prefix_capacity);
        prefix.resize(members.len());
        let mut engine = self.engine.borrow_mut();
        engine.resize(members.len());
        for (slot, m) in members.iter().enumerate() {
            if owners.get(slot) != Some(&m.id) || weights.get(slot) != Some(&m.weight) {
                current[slot] = 0;
            }
            if owners.get(slot) != Some(&m.id) {
                // Another backend (or none) in this slot: it holds none of the old one's cache.
                prefix.forget(slot);
                engine.forget(slot);
            }
            engine.set_board(slot, m.busy.as_ref());
        }
        *weights = members.iter().map(|m| m.weight).collect();
        *owners = members.iter().map(|m| m.id).collect();
        *self.keys.borrow_mut() = members.iter().map(|m| m.key).collect();
    }

    pub(crate) fn strategy(&self) -> Strategy {
        self.strategy.get()
    }

    fn len(&self) -> usize {
        self.weights.borrow().len()
    }

    /// Picks one backend among those for which `eligible` is true.
    pub fn pick(&self, view: &LoadView, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        self.choose(&Inputs::new(view), eligible).map(|p| p.backend)
    }

    /// Picks one backend among those for which `eligible` is true, and says why.
    pub fn choose(&self, input: &Inputs<'_>, eligible: impl Fn(usize) -> bool) -> Option<Pick> {
        let view = input.view;
        let balanced = |b: Option<usize>| {
            b.map(|backend| Pick {
                backend,
                reason: Reason::Balanced,
                slot: None,
                share: None,
            })
        };
        match self.strategy.get() {
            Strategy::RoundRobin => balanced(self.round_robin(&eligible)),
            Strategy::WeightedRoundRobin => balanced(self.smooth_weighted(&eligible)),
            Strategy::LeastConnections => balanced(self.least_connections(view, &eligible)),
            Strategy::PowerOfTwo => balanced(self.power_of_two(view, &eligible)),
            Strategy::LeastLoad => self.least_load(input, &eligible),
            Strategy::ConsistentHash => self.consistent_hash(input, &eligible),
            Strategy::PrefixCache => self.prefix_cache(input, &eligible),
        }
    }

    /// A pick of `backend` for a prompt with this block chain was taken (here or on another
    /// core): the backend now probably holds it. Only `prefix_cache` remembers anything.
    pub fn learn(&self, backend: usize, blocks: &[u64]) {
        self.learn_slot(backend, None, blocks);
    }

    /// `learn`, for a pick pinned to engine slot `slot` (`Pick::slot`): that slot now holds
    /// this prompt and nothing else.
    pub fn learn_slot(&self, backend: usize, slot: Option<usize>, blocks: &[u64]) {
        if self.strategy.get() != Strategy::PrefixCache || blocks.is_empty() {
            return;
        }
        match slot {
            Some(k) => self.engine.borrow_mut().record(backend, k, blocks),
            None => self.prefix.borrow_mut().record(backend, blocks),
        }
    }

    /// The backend in `slot` went down or restarted: its KV cache is gone.
    pub(crate) fn forget(&self, slot: usize) {
        self.prefix.borrow_mut().forget(slot);
        self.engine.borrow_mut().forget(slot);
    }

    /// Leading blocks of `blocks` that `backend` probably holds (tests, the simulation).
    pub fn cached_blocks(&self, backend: usize, blocks: &[u64]) -> usize {
        self.prefix.borrow().matched(backend, blocks)
    }

    fn weight(&self, b: usize) -> u32 {
        self.weights.borrow().get(b).copied().unwrap_or(1).max(1)
    }

    /// `least_load`'s score of one backend (lower is better) and whether it came from fresh
    /// engine metrics. Without them the backend is judged by its in-flight count alone.
    fn load_score(&self, input: &Inputs<'_>, b: usize) -> (f64, Option<EngineLoad>) {
        let p = self.params.get();
        let inflight = p.inflight_weight * f64::from(input.view.load(b));
        let engine = input.engine.and_then(|e| e.fresh(b, input.now));
        let score = match engine {
            Some(l) => {
                inflight + p.queue_weight * l.waiting + p.kv_weight * l.kv_usage.unwrap_or(0.0)
            }
            None => inflight,
        };
        (score / f64::from(self.weight(b)), engine)
    }

    /// Lowest score wins; a backend whose KV cache is above the threshold only wins when every
    /// candidate is above it. Ties are broken at random (cores picking at once spread out).
    fn least_load(&self, input: &Inputs<'_>, eligible: &impl Fn(usize) -> bool) -> Option<Pick> {
        // (backend, score, fresh, ties) for candidates below and above the KV threshold.
        let mut below: Option<(usize, f64, bool, u32)> = None;
        let mut above: Option<(usize, f64, bool, u32)> = None;
        for b in 0..self.len() {
            if !eligible(b) {
                continue;
            }
            let (score, engine) = self.load_score(input, b);
            let fresh = engine.is_some();
            let kv = engine.and_then(|l| l.kv_usage);
            let slot = if kv.is_some_and(|k| k > self.params.get().kv_threshold) {
                &mut above
            } else {
                &mut below
            };
            match slot {
                None => *slot = Some((b, score, fresh, 1)),
                Some((_, best, _, ties)) if score == *best => {
                    *ties += 1;
                    if fastrand::u32(..*ties) == 0 {
                        *slot = Some((b, score, fresh, *ties));
                    }
                }
                Some((_, best, _, _)) if score < *best => *slot = Some((b, score, fresh, 1)),
                Some(_) => {}
            }
        }
        let (backend, reason) = match (below, above) {
            (Some((b, _, fresh, _)), _) => {
                let reason = if fresh {
                    Reason::EngineLoad
                } else {
                    Reason::StaleMetrics
                };
                (b, reason)
            }
            (None, Some((b, _, _, _))) => (b, Reason::KvSaturated),
            (None, None) => return None,
        };
        Some(Pick {
            backend,
            reason,
            slot: None,
            share: None,
        })
    }

    /// Weighted rendezvous hashing: every candidate draws `-w / ln(u)` from a hash of (key,
    /// backend id); the highest wins. Removing a backend moves only its own keys. If the winner
    /// has more than `max_imbalance` requests in flight above the least loaded candidate, the
    /// least loaded serves instead (bounded load: a hot key cannot pin one GPU).
    fn consistent_hash(
        &self,
        input: &Inputs<'_>,
        eligible: &impl Fn(usize) -> bool,
    ) -> Option<Pick> {
        let least = |reason| {
            self.least_connections(input.view, eligible)
                .map(|backend| Pick {
                    backend,
                    reason,
                    slot: None,
                    share: None,
                })
        };
        let Some(key) = input.key else {
            return least(Reason::NoKey);
        };
        let mut best: Option<(usize, f64)> = None;
        let mut min_load = u32::MAX;
        for b in 0..self.len() {
            if !eligible(b) {
                continue;
            }
            min_load = min_load.min(input.view.load(b));
            let h = mix64(key ^ self.keys.borrow().get(b).copied().unwrap_or(b as u64));
            // 53 random bits as a uniform draw in (0, 1).
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = -f64::from(self.weight(b)) / u.ln();
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((b, score));
            }
        }
        let (b, _) = best?;
        if input.view.load(b) > min_load.saturating_add(self.params.get().max_imbalance) {
            return least(Reason::ImbalanceFallback);
        }
        Some(Pick {
            backend: b,
            reason: Reason::AffinityHit,
            slot: None,
            share: None,
        })
    }

    fn round_robin(&self, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.weights.borrow().len();
        let start = self.next.get();
        for i in 0..n {
            let b = (start + i) % n;
            if eligible(b) {
                self.next.set((b + 1) % n);
                return Some(b);
            }
        }
        None
    }

    /// Each pick adds every eligible backend's weight to its current value, takes the largest and
    /// subtracts the total from it: weights 5:1 give a a a b a a ... interleaved, never bursts.
    fn smooth_weighted(&self, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
        let mut current = self.current.borrow_mut();
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (b, w) in self.weights.borrow().iter().enumerate() {
            if !eligible(b) {
                continue;
            }
            let w = i64::from(*w);
            current[b] += w;
            total += w;
            if best.is_none_or(|x| current[b] > current[x]) {
                best = Some(b);
            }
        }
        let b = best?;
        current[b] -= total;
        Some(b)
    }

    /// Two distinct eligible backends drawn at random; the one with the lower in-flight/weight
    /// (across all cores) wins. Unlike a global minimum, many cores picking at once with slightly
    /// stale views do not all pile onto the same backend.
    fn power_of_two(&self, view: &LoadView, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
        let weights = self.weights.borrow();
        let n = weights.len();
        let count = (0..n).filter(|&b| eligible(b)).count();
        let nth = |k: usize| (0..n).filter(|&b| eligible(b)).nth(k);
        match count {
            0 => None,
            1 => nth(0),
            _ => {
                let i = fastrand::usize(..count);
                let mut j = fastrand::usize(..count - 1);
                if j >= i {
                    j += 1;
                }
                let (a, b) = (nth(i)?, nth(j)?);
                // a beats b when load_a / w_a <= load_b / w_b.
                let (la, lb) = (u64::from(view.load(a)), u64::from(view.load(b)));
                let (wa, wb) = (u64::from(weights[a].max(1)), u64::from(weights[b].max(1)));
                Some(if la * wb <= lb * wa { a } else { b })
            }
        }
    }

    /// Lowest in-flight/weight across all cores; ties broken uniformly at random so that cores
    /// picking at the same moment spread out instead of herding onto one backend.
    /// Fewest in flight per unit of weight, across all cores. Ties go by smooth weighted
    /// round robin among the tied backends (as nginx's weighted `least_conn`): with sequential
    /// requests every backend is at 0 in flight, and a random tie-break would split 3:1 weights
    /// evenly.
    fn least_connections(
        &self,
        view: &LoadView,
        eligible: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        // (load, weight) of the least loaded so far; load/w < bl/bw compared without division.
        let mut best: Option<(u64, u64)> = None;
        let mut ties = 0usize;
        for (b, w) in self.weights.borrow().iter().enumerate() {
            if !eligible(b) {
                continue;
            }
            let (load, w) = (u64::from(view.load(b)), u64::from(*w).max(1));
            match best {
                Some((bl, bw)) if load * bw > bl * w => {}
                Some((bl, bw)) if load * bw == bl * w => ties += 1,
                _ => {
                    best = Some((load, w));
                    ties = 1;
                }
            }
        }
        let (bl, bw) = best?;
        let least = |b: usize| {
            let w = u64::from(self.weights.borrow().get(b).copied().unwrap_or(1)).max(1);
            u64::from(view.load(b)) * bw == bl * w
        };
        if ties == 1 {
            return (0..self.len()).find(|&b| eligible(b) && least(b));
        }
        self.smooth_weighted(&|b| eligible(b) && least(b))
    }
}

mod prefix;
#[cfg(test)]
mod tests;
