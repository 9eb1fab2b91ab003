//! The backend table: which backends exist right now, in which slot, in which state.
//!
//! Backends come and go at run time (DNS discovery, reload), so nothing on the request path may
//! index backends by their position in `config.backends`. Instead every backend lives in a
//! *slot*: a small integer that per-core state (load view, balancer, pool, local metrics) indexes
//! by, and that stays the same for as long as the backend exists. Each backend also has an `id`,
//! unique for the life of the process, which messages carry so that a message about a backend
//! that has since left its slot is recognised and ignored.
//!
//! [`Registry`] is the master copy, owned by the control-plane thread (`plane`): it diffs the
//! desired set of backends against the current one and publishes immutable [`BackendTable`]
//! versions, which reach each core as a `ControlMsg::Table` and are applied on its inbox drain.
//! A backend that disappears is first `Draining` (no new requests, in-flight ones finish), and
//! its slot is freed only once every core has reported its own in-flight count on it at zero.
//!
//! Slots are freed and reused rather than tombstoned: in Kubernetes every pod restart brings a
//! new IP, so over weeks of autoscaling tombstones would grow every per-core array and every
//! pick (which scans all slots) without bound. Reuse is safe because a slot is only reused after
//! all cores have drained it, and per-core state is reset whenever a slot's id changes.

pub(crate) mod engine_slots;
pub(crate) mod route;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::backends::engine_slots::SlotBusy;
use crate::backends::route::RouteTable;
use crate::config::{Config, Secret};
use crate::tls::ClientTls;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Eligible for new requests (once healthy).
    Active,
    /// Gone from config or DNS: in-flight requests finish, no new ones are sent.
    Draining,
}

impl State {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Draining => "draining",
        }
    }
}

/// What a backend is, as config and discovery describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Spec {
    /// The config entry it comes from (its normalised URL); with `addr`, its identity.
    pub(crate) source: String,
    pub(crate) addr: SocketAddr,
    /// What logs and usage events show: the entry's URL, or `http://IP:PORT/base` when discovered.
    pub(crate) url: String,
    /// The `backend` metrics label.
    pub(crate) name: String,
    /// The `Host` header sent upstream.
    pub(crate) authority: String,
    pub(crate) base_path: String,
    pub(crate) weight: u32,
    pub(crate) models: Option<Vec<String>>,
    /// Found by DNS (joins only after a good health check) rather than listed in the config.
    pub(crate) discovered: bool,
    /// Requests in flight allowed on this backend across the process; 0 = unlimited.
    pub(crate) max_inflight: usize,
    /// The engine's slots, each with a KV cache of its own (`backends[].slots`); 0 = one shared.
    pub(crate) slots: usize,
    /// Sent upstream as `Authorization: Bearer`.
    pub(crate) api_key: Option<Secret>,
    /// Where the engine's Prometheus metrics are (after `base_path`), for `least_load`.
    pub(crate) metrics_path: String,
    /// `Some` for an https backend: how to reach it (roots, client certificate, server name).
    pub(crate) tls: Option<ClientTls>,
}

impl Spec {
    fn key(&self) -> (&str, SocketAddr) {
        (&self.source, self.addr)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Unique for the life of the process; never reused.
    pub(crate) id: u64,
    pub(crate) spec: Spec,
    pub(crate) state: State,
    /// Backends of the first table and backends listed in a reloaded config start healthy (as
    /// a static config always did: the operator named them, and a dead one is taken out by its
    /// first failed connect, with a retry elsewhere). Addresses found later by DNS wait for
    /// their first successful health check.
    pub(crate) up_initially: bool,
    /// The table version in which it started draining (reports from before are stale).
    pub(crate) draining_since: u64,
    /// Requests pinned to each engine slot (`spec.slots` of them; `None` without slots), shared
    /// by every core and every table version while `spec.slots` stays the same.
    pub(crate) busy: Option<Arc<SlotBusy>>,
}

/// A new board for `slots` engine slots (none for an engine with one shared cache).
fn board(slots: usize) -> Option<Arc<SlotBusy>> {
    (slots > 0).then(|| SlotBusy::new(slots))
}

/// One immutable version of the backend set, shared by every core.
pub(crate) struct BackendTable {
    pub(crate) version: u64,
    /// Indexed by slot; `None` = free.
    pub(crate) slots: Vec<Option<Entry>>,
    /// Model → eligible slots (only `Active` ones).
    pub(crate) routes: RouteTable,
    /// Every model some backend declares or a pool names (with aliases), sorted (metrics labels).
    pub(crate) models: Vec<String>,
    /// The configuration this version belongs to.
    pub(crate) config: Arc<Config>,
}

impl BackendTable {
    pub(crate) fn get(&self, slot: usize) -> Option<&Entry> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn entries(&self) -> impl Iterator<Item = (usize, &Entry)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (i, e)))
    }
}

/// The desired backend set: every static entry at its resolved address, and every discovered
/// entry once per address found. Entries without an address (not resolved yet) are left out.
pub(crate) fn desired(
    cfg: &Config,
    statics: &HashMap<String, SocketAddr>,
    discovered: &HashMap<String, Vec<SocketAddr>>,
) -> Vec<Spec> {
    let mut out = Vec::new();
    for b in &cfg.backends {
        let spec = |addr: SocketAddr, url: String, name: String| Spec {
            source: b.url.clone(),
            addr,
            url,
            name,
            authority: b.authority.clone(),
            base_path: b.base_path.clone(),
            weight: b.weight,
            models: b.models.clone(),
            discovered: b.discover.is_some(),
            max_inflight: b.max_inflight,
            slots: b.slots,
            api_key: b.api_key.clone(),
            metrics_path: b.metrics_path.clone(),
            tls: b.tls.as_ref().map(|t| t.client.clone()),
        };
        if b.discover.is_some() {
            let prefix = b.name.as_deref().unwrap_or(&b.host);
            for &addr in discovered.get(&b.url).into_iter().flatten() {
                out.push(spec(
                    addr,
                    format!(
                        "{}://{addr}{}",
                        if b.tls.is_some() { "https" } else { "http" },
                        b.base_path
                    ),
                    format!("{prefix}/{addr}"),
                ));
            }
        } else if let Some(&addr) = statics.get(&b.url) {
            let name = b.name.clone().unwrap_or_else(|| b.url.clone());
            out.push(spec(addr, b.url.clone(), name));
        }
    }
    out
}

/// What one `Registry::apply` changed, by backend name (for logs and the reload answer).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Changes {
    pub(crate) added: Vec<String>,
    pub(crate) removed: Vec<String>,
    pub(crate) updated: Vec<String>,
}

impl Changes {
    pub(crate) fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.updated.is_empty()
    }
}

/// The master backend set; lives on the control-plane thread only.
pub(crate) struct Registry {
    slots: Vec<Option<Entry>>,
    cores: usize,
    next_id: u64,
    version: u64,
    /// Draining id → which cores have reported their in-flight count on it at zero.
    drained: HashMap<u64, Vec<bool>>,
}

impl Registry {
    /// The first table: every backend starts healthy.
    pub(crate) fn new(cores: usize, specs: Vec<Spec>) -> Registry {
        let mut r = Registry {
            slots: Vec::new(),
            cores,
            next_id: 1,
            version: 1,
            drained: HashMap::new(),
        };
        for spec in specs {
            r.insert(spec, true);
        }
        r
    }

    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// A new version with the same backends (the configuration changed).
    pub(crate) fn bump(&mut self) {
        self.version += 1;
    }

    fn insert(&mut self, spec: Spec, up_initially: bool) {
        let entry = Entry {
            id: self.next_id,
            busy: board(spec.slots),
            spec,
            state: State::Active,
            up_initially,
            draining_since: 0,
        };
        self.next_id += 1;
        match self.slots.iter().position(Option::is_none) {
            Some(free) => self.slots[free] = Some(entry),
            None => self.slots.push(Some(entry)),
        }
    }

    /// Makes `desired` the set of active backends: new ones are added (in a free slot, waiting
    /// for a health check), missing ones start draining, kept ones keep their slot and id and
    /// take the new weight, models and labels. A draining backend that comes back is active
    /// again under the same id. Bumps the version when anything changed.
    pub(crate) fn apply(&mut self, desired: Vec<Spec>) -> Changes {
        let mut changes = Changes::default();
        let mut wanted: HashMap<(String, SocketAddr), Spec> = desired
            .into_iter()
            .map(|s| ((s.source.clone(), s.addr), s))
            .collect();
        let next_version = self.version + 1;
        for e in self.slots.iter_mut().flatten() {
            let key = (e.spec.source.clone(), e.spec.addr);
            match wanted.remove(&key) {
                Some(spec) => {
                    if e.state == State::Draining {
                        e.state = State::Active;
                        self.drained.remove(&e.id);
                        changes.added.push(spec.name.clone());
                    } else if spec != e.spec {
                        changes.updated.push(spec.name.clone());
                    }
                    if spec.slots != e.spec.slots {
                        e.busy = board(spec.slots);
                    }
                    e.spec = spec;
                }
                None if e.state == State::Active => {
                    e.state = State::Draining;
                    e.draining_since = next_version;
                    self.drained.insert(e.id, vec![false; self.cores]);
                    changes.removed.push(e.spec.name.clone());
                }
                None => {}
            }
        }
        // Insert in a stable order so that slot assignment does not depend on hashing.
        let mut new: Vec<Spec> = wanted.into_values().collect();
        new.sort_by(|a, b| a.key().cmp(&b.key()));
        for spec in new {
            changes.added.push(spec.name.clone());
            let up = !spec.discovered;
            self.insert(spec, up);
        }
        if !changes.is_empty() {
            self.version = next_version;
        }
        changes
    }

    /// `core` has no request in flight on draining backend `id` as of table version `seen`.
    /// Returns true when that frees the slot (every core has now reported).
    pub(crate) fn drained(&mut self, core: usize, id: u64, seen: u64) -> bool {
        let Some(slot) = self
            .slots
            .iter()
            .position(|e| e.as_ref().is_some_and(|e| e.id == id))
        else {
            return false;
        };
        let Some(entry) = &self.slots[slot] else {
            return false;
        };
        // A report from before this drain began may predate requests picked while it was active.
        if entry.state != State::Draining || seen < entry.draining_since {
            return false;
        }
        let Some(cores) = self.drained.get_mut(&id) else {
            return false;
        };
        if let Some(c) = cores.get_mut(core) {
            *c = true;
        }
        if cores.iter().all(|c| *c) {
            self.drained.remove(&id);
            self.slots[slot] = None;
            while self.slots.last().is_some_and(Option::is_none) {
                self.slots.pop();
            }
            self.version += 1;
            return true;
        }
        false
    }

    /// The current set as an immutable table for the cores and the health thread.
    pub(crate) fn publish(&self, config: Arc<Config>) -> Arc<BackendTable> {
        let routes = RouteTable::build(
            self.slots.len(),
            self.slots.iter().enumerate().filter_map(|(i, e)| {
                e.as_ref()
                    .filter(|e| e.state == State::Active)
                    .map(|e| (i, e.spec.source.as_str(), e.spec.models.as_deref()))
            }),
            config.backends.iter().map(|b| b.models.as_deref()),
            &config.models,
        );
        // Draining backends keep their models' labels; pools and aliases are labels too.
        let mut models: Vec<String> = self
            .slots
            .iter()
            .flatten()
            .flat_map(|e| e.spec.models.iter().flatten().cloned())
            .chain(crate::telemetry::metrics::configured_models(&config))
            .collect();
        models.sort();
        models.dedup();
        Arc::new(BackendTable {
            version: self.version,
            slots: self.slots.clone(),
            routes,
            models,
            config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(source: &str, port: u16, weight: u32) -> Spec {
        let addr: SocketAddr = ([10, 0, 0, 1], port).into();
        Spec {
            source: source.to_string(),
            addr,
            url: format!("http://{addr}"),
            name: format!("{source}/{addr}"),
            authority: addr.to_string(),
            base_path: String::new(),
            weight,
            models: None,
            discovered: true,
            max_inflight: 0,
            slots: 0,
            api_key: None,
            metrics_path: "/metrics".into(),
            tls: None,
        }
    }

    fn cfg() -> Arc<Config> {
        let url = ["http://127.0.0.1:1".to_string()];
        Arc::new(Config::with_backends("127.0.0.1:0".parse().unwrap(), &url).unwrap())
    }

    #[test]
    fn desired_specs_expand_discovered_entries_by_address() {
        let yaml = "backends:\n  - url: http://127.0.0.1:7000/v1\n    weight: 3\n  - url: http://vllm.svc:8000\n    discover: dns\n    models: [m]\n";
        let c = Config::from_yaml_str(yaml).unwrap();
        let statics = HashMap::from([(
            "http://127.0.0.1:7000/v1".to_string(),
            "127.0.0.1:7000".parse().unwrap(),
        )]);
        let found: Vec<SocketAddr> = vec![
            "10.0.0.7:8000".parse().unwrap(),
            "[fd00::1]:8000".parse().unwrap(),
        ];
        let discovered = HashMap::from([("http://vllm.svc:8000".to_string(), found)]);
        let specs = desired(&c, &statics, &discovered);
        assert_eq!(specs.len(), 3);
        assert_eq!(specs[0].name, "http://127.0.0.1:7000/v1");
        assert_eq!(specs[0].weight, 3);
        assert_eq!(specs[1].name, "vllm.svc/10.0.0.7:8000");
        assert_eq!(specs[1].url, "http://10.0.0.7:8000");
        assert_eq!(specs[1].authority, "vllm.svc:8000");
        assert_eq!(specs[2].name, "vllm.svc/[fd00::1]:8000");
        assert_eq!(specs[2].models.as_deref(), Some(&["m".to_string()][..]));
    }

    fn ids(r: &Registry) -> Vec<Option<(u64, State)>> {
        r.slots
            .iter()
            .map(|e| e.as_ref().map(|e| (e.id, e.state)))
            .collect()
    }

    #[test]
    fn kept_backends_keep_slot_and_id_and_take_new_weights() {
        let mut r = Registry::new(2, vec![spec("a", 1, 1), spec("a", 2, 1)]);
        assert_eq!(r.version(), 1);
        let c = r.apply(vec![spec("a", 1, 1), spec("a", 2, 5)]);
        assert_eq!(c.updated, vec!["a/10.0.0.1:2"]);
        assert!(c.added.is_empty() && c.removed.is_empty());
        assert_eq!(r.version(), 2);
        assert_eq!(
            ids(&r),
            vec![Some((1, State::Active)), Some((2, State::Active))]
        );
        assert_eq!(r.slots[1].as_ref().unwrap().spec.weight, 5);
        // Nothing changed: no new version.
        assert!(r.apply(vec![spec("a", 1, 1), spec("a", 2, 5)]).is_empty());
        assert_eq!(r.version(), 2);
    }

    #[test]
    fn engine_slot_boards_follow_the_slots_key_and_outlive_other_changes() {
        let with = |slots, weight| Spec {
            slots,
            ..spec("a", 1, weight)
        };
        let board = |r: &Registry| r.slots[0].as_ref().unwrap().busy.clone();
        let mut r = Registry::new(2, vec![with(2, 1)]);
        let first = board(&r).unwrap();
        assert_eq!(first.len(), 2);
        // Another weight: the same board (requests pinned now keep counting on it).
        r.apply(vec![with(2, 3)]);
        assert!(Arc::ptr_eq(&first, &board(&r).unwrap()));
        assert!(Arc::ptr_eq(
            &first,
            r.publish(cfg()).get(0).unwrap().busy.as_ref().unwrap()
        ));
        // Another slot count: a new board; none without slots.
        r.apply(vec![with(4, 3)]);
        let second = board(&r).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second.len(), 4);
        r.apply(vec![with(0, 3)]);
        assert!(board(&r).is_none());
    }

    #[test]
    fn removed_backends_drain_until_every_core_reports_then_free_their_slot() {
        let mut r = Registry::new(2, vec![spec("a", 1, 1), spec("a", 2, 1)]);
        let c = r.apply(vec![spec("a", 2, 1)]);
        assert_eq!(c.removed, vec!["a/10.0.0.1:1"]);
        let v = r.version();
        assert_eq!(ids(&r)[0], Some((1, State::Draining)));
        let t = r.publish(cfg());
        assert_eq!(t.routes.backends_for(None).unwrap(), &[false, true]);
        // A stale report (from before the drain began) does not count.
        assert!(!r.drained(0, 1, v - 1));
        assert!(!r.drained(0, 1, v));
        assert!(!r.drained(0, 1, v));
        assert_eq!(ids(&r)[0], Some((1, State::Draining)));
        assert!(r.drained(1, 1, v));
        assert_eq!(ids(&r)[0], None);
        assert_eq!(r.version(), v + 1);
        // The freed slot is reused by the next new backend, under a new id.
        let c = r.apply(vec![spec("a", 2, 1), spec("b", 9, 1)]);
        assert_eq!(c.added, vec!["b/10.0.0.1:9"]);
        assert_eq!(
            ids(&r),
            vec![Some((3, State::Active)), Some((2, State::Active))]
        );
        assert!(!r.slots[0].as_ref().unwrap().up_initially);
    }

    #[test]
    fn a_draining_backend_that_returns_is_active_under_the_same_id() {
        let mut r = Registry::new(1, vec![spec("a", 1, 1)]);
        r.apply(vec![]);
        let v = r.version();
        let c = r.apply(vec![spec("a", 1, 1)]);
        assert_eq!(c.added, vec!["a/10.0.0.1:1"]);
        assert_eq!(ids(&r), vec![Some((1, State::Active))]);
        // The report of the first drain no longer frees it.
        assert!(!r.drained(0, 1, v));
        assert_eq!(ids(&r), vec![Some((1, State::Active))]);
    }

    #[test]
    fn trailing_free_slots_are_trimmed_and_unknown_reports_ignored() {
        let mut r = Registry::new(1, vec![spec("a", 1, 1), spec("a", 2, 1)]);
        r.apply(vec![spec("a", 1, 1)]);
        let v = r.version();
        assert!(!r.drained(0, 99, v));
        assert!(r.drained(0, 2, v));
        assert_eq!(r.slots.len(), 1);
        let t = r.publish(cfg());
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(0).unwrap().id, 1);
        assert!(t.get(1).is_none());
    }

    #[test]
    fn new_backends_are_placed_in_a_stable_order() {
        let mut a = Registry::new(1, vec![]);
        let mut b = Registry::new(1, vec![]);
        a.apply(vec![spec("x", 3, 1), spec("x", 1, 1), spec("x", 2, 1)]);
        b.apply(vec![spec("x", 2, 1), spec("x", 3, 1), spec("x", 1, 1)]);
        let ports = |r: &Registry| -> Vec<u16> {
            r.slots
                .iter()
                .flatten()
                .map(|e| e.spec.addr.port())
                .collect()
        };
        assert_eq!(ports(&a), vec![1, 2, 3]);
        assert_eq!(ports(&a), ports(&b));
    }
}
