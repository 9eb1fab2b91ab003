//! Client authentication: which named key a request carries, whether that key may use the
//! request's model and whether it is within its rates. Keys are kept only as SHA-256 digests;
//! a presented key is hashed once and looked up by its digest, and the final comparison is in
//! constant time, so neither the stored keys nor the lookup's timing reveal a key.
//!
//! The key set is process-wide and replaced as a whole when `auth.keys_file` changes (a
//! background thread polls the file's inode, size and mtime, so Kubernetes Secret updates, which
//! swap a symlink, are seen). Cores never lock on the request path: each keeps an `Rc` of the
//! current set and swaps it only when the store's version number moved. A broken file keeps the
//! previous keys. Rate-limit state is kept across reloads for keys whose name and rates did not
//! change.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

mod key_id;
pub(crate) mod ratelimit;

pub(crate) use crate::config::digest;
pub use key_id::key_id;
pub(crate) use key_id::{client_key, KeyIdCache};

use crate::config::OnStoreError;
use crate::config::{ApiKey, Auth, ConfigError, KeyDigest, Priority};
use crate::error::Exceeded;
use crate::error::{AuthFailure, ProxyError};
use crate::http1::head::Head;
use crate::http1::name::Name;
use crate::scheduler::Flow;
use ratelimit::{retry_after_secs, Clock, KeyLimits, StoreState};

/// Compares two digests in time independent of where they differ.
pub(crate) fn ct_eq(a: &KeyDigest, b: &KeyDigest) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// One key as the request path sees it.
pub(crate) struct KeyEntry {
    pub(crate) name: Arc<str>,
    digest: KeyDigest,
    models: Option<Box<[String]>>,
    limits: Option<Arc<KeyLimits>>,
    admin: bool,
    priority: Priority,
    weight: u32,
}

/// Digests are uniformly distributed already: their first 8 bytes are the hash.
#[derive(Default)]
struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

fn prefix(d: &KeyDigest) -> u64 {
    let mut p = [0u8; 8];
    p.copy_from_slice(&d[..8]);
    u64::from_le_bytes(p)
}

/// An immutable set of keys.
pub(crate) struct KeySet {
    /// Digest prefix → entries with that prefix (one, unless digests collide in 64 bits).
    index: HashMap<u64, Vec<usize>, BuildHasherDefault<PrefixHasher>>,
    entries: Vec<KeyEntry>,
    /// The shared store's state (`ratelimit.store: redis` with `on_store_error` `allow` or
    /// `deny`); `None` = the local buckets decide even while the store fails.
    store: Option<Arc<StoreState>>,
}

impl KeySet {
    /// Builds the set, keeping the rate-limit state of `previous` keys with the same name and
    /// rates.
    fn build(
        keys: &[ApiKey],
        clock: Clock,
        previous: Option<&KeySet>,
        store: Option<Arc<StoreState>>,
    ) -> KeySet {
        let mut index: HashMap<u64, Vec<usize>, BuildHasherDefault<PrefixHasher>> =
            HashMap::default();
        let mut entries = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            let kept = previous
                .and_then(|p| p.entries.iter().find(|e| *e.name == *k.name))
                .and_then(|e| e.limits.clone())
                .filter(|l| l.same_rates(k.rpm, k.tpm));
            let limits = kept.or_else(|| KeyLimits::new(clock, k.rpm, k.tpm).map(Arc::new));
            index.entry(prefix(&k.digest)).or_default().push(i);
            entries.push(KeyEntry {
                name: k.name.as_str().into(),
                digest: k.digest,
                models: k.models.clone().map(Vec::into_boxed_slice),
                limits,
                admin: k.admin,
                priority: k.priority,
                weight: k.weight,
            });
        }
        KeySet {
            index,
            entries,
            store,
        }
    }

    fn find(&self, d: &KeyDigest) -> Option<usize> {
        let candidates = self.index.get(&prefix(d))?;
        candidates
            .iter()
            .copied()
            .find(|&i| ct_eq(&self.entries[i].digest, d))
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Each rate-limited key's name and limits (for the sync thread).
    pub(crate) fn limited(&self) -> impl Iterator<Item = (&str, &KeyLimits)> {
        self.entries
            .iter()
            .filter_map(|e| Some((&*e.name, e.limits.as_deref()?)))
    }
}

/// Why `auth.keys_file` did not replace the key set (the previous keys stay). The text follows
/// `auth.keys_file <path>: ` in the log and the startup error, so it carries the cause itself
/// and no `source()` repeats it.
#[derive(Debug, thiserror::Error)]
pub enum KeysFileError {
    #[error("cannot read: {0}")]
    Read(std::io::Error),
    /// `path: reason` lines, one per problem.
    #[error("{0}")]
    Parse(ConfigError),
    /// A file key that has the name or the key of an `auth.keys` entry (`with`).
    #[error("key \"{name}\" clashes with auth.keys entry \"{with}\" (same name or same key)")]
    Clash { name: String, with: String },
    #[error("key store lock poisoned")]
    Poisoned,
}

/// The process-wide key set and what replaces it.
pub struct KeyStore {
    enabled: bool,
    /// Client keys are removed from what is sent upstream.
    strip_client_key: bool,
    clock: Clock,
    config_keys: Vec<ApiKey>,
    current: Mutex<Arc<KeySet>>,
    /// Bumped on every replacement; cores compare it with the version they hold.
    version: AtomicU64,
    store: Option<Arc<StoreState>>,
}

impl KeyStore {
    /// Reads `auth.keys_file` once when set: a proxy with auth configured never starts with
    /// keys it could not read.
    pub fn new(cfg: &Auth) -> Result<KeyStore, KeysFileError> {
        KeyStore::with_store(cfg, None)
    }

    /// A key store whose admission depends on whether a shared store answers
    /// (`ratelimit.store: redis` with `on_store_error` `allow` or `deny`): cores consult
    /// `store` for that.
    pub(crate) fn with_store(
        cfg: &Auth,
        store: Option<Arc<StoreState>>,
    ) -> Result<KeyStore, KeysFileError> {
        let clock = Clock::new();
        let store = KeyStore {
            enabled: cfg.enabled(),
            strip_client_key: cfg.enabled() && !cfg.forward_client_key,
            clock,
            config_keys: cfg.keys.clone(),
            current: Mutex::new(Arc::new(KeySet::build(
                &cfg.keys,
                clock,
                None,
                store.clone(),
            ))),
            version: AtomicU64::new(0),
            store,
        };
        if let Some(path) = &cfg.keys_file {
            store.reload_file(path)?;
        }
        Ok(store)
    }

    pub(crate) fn strip_client_key(&self) -> bool {
        self.strip_client_key
    }

    /// Replaces the key set by the config's keys plus the file's; on any error the current set
    /// stays. Returns the number of keys now in force.
    pub(crate) fn reload_file(&self, path: &Path) -> Result<usize, KeysFileError> {
        let text = std::fs::read_to_string(path).map_err(KeysFileError::Read)?;
        let file_keys = crate::config::parse_keys_file(&text).map_err(KeysFileError::Parse)?;
        for k in &file_keys {
            if let Some(c) = self
                .config_keys
                .iter()
                .find(|c| c.name == k.name || ct_eq(&c.digest, &k.digest))
            {
                return Err(KeysFileError::Clash {
                    name: k.name.clone(),
                    with: c.name.clone(),
                });
            }
        }
        let mut all = self.config_keys.clone();
        all.extend(file_keys);
        let mut current = self.current.lock().map_err(|_| KeysFileError::Poisoned)?;
        let next = Arc::new(KeySet::build(
            &all,
            self.clock,
            Some(&current),
            self.store.clone(),
        ));
        let n = next.len();
        *current = next;
        self.version.fetch_add(1, Ordering::Release);
        Ok(n)
    }

    /// Keys in force now (for the startup banner).
    pub(crate) fn len(&self) -> usize {
        self.snapshot().map_or(0, |s| s.len())
    }

    pub(crate) fn snapshot(&self) -> Option<Arc<KeySet>> {
        self.current.lock().ok().map(|c| c.clone())
    }
}

/// A core's handle on a key set: cloning the `Rc` of it per request costs no atomic operation
/// on a cache line that other cores share (cloning the `Arc` would).
pub(crate) struct CoreKeys(Arc<KeySet>);

/// One core's view of the key store.
pub(crate) struct CoreAuth {
    store: Arc<KeyStore>,
    version: Cell<u64>,
    keys: RefCell<Rc<CoreKeys>>,
}

impl CoreAuth {
    pub(crate) fn new(store: Arc<KeyStore>) -> CoreAuth {
        let keys = store
            .snapshot()
            .unwrap_or_else(|| Arc::new(KeySet::build(&[], store.clock, None, None)));
        CoreAuth {
            version: Cell::new(store.version.load(Ordering::Acquire)),
            keys: RefCell::new(Rc::new(CoreKeys(keys))),
            store,
        }
    }

    pub(crate) fn store(&self) -> &KeyStore {
        &self.store
    }

    /// The current set; swapped only when the store changed (one atomic load otherwise).
    fn keys(&self) -> Rc<CoreKeys> {
        let v = self.store.version.load(Ordering::Acquire);
        if v != self.version.get() {
            if let Some(fresh) = self.store.snapshot() {
                *self.keys.borrow_mut() = Rc::new(CoreKeys(fresh));
                self.version.set(v);
            }
        }
        self.keys.borrow().clone()
    }

    /// Who is calling. With auth off everyone is `Open`; otherwise the request must carry a
    /// known key in `Authorization: Bearer` or `x-api-key`.
    pub(crate) fn identify(&self, head: &Head) -> Result<Caller, ProxyError> {
        if !self.store.enabled {
            return Ok(Caller::Open);
        }
        let Some(key) = client_key(head).filter(|k| !k.is_empty()) else {
            return Err(ProxyError::Unauthorized(AuthFailure::Missing));
        };
        let keys = self.keys();
        match keys.0.find(&digest(key)) {
            Some(idx) => Ok(Caller::Key { keys, idx }),
            None => Err(ProxyError::Unauthorized(AuthFailure::Invalid)),
        }
    }
}

/// Lowers a request's class (`Caller::flow`).
pub(crate) const PRIORITY_HEADER: &str = Name::XLlmproxyPriority.as_str();

/// The caller of one request, as far as it is known.
pub(crate) enum Caller {
    /// Authentication is off: `key_id` is derived from whatever key the client sent.
    Open,
    /// A configured key.
    Key { keys: Rc<CoreKeys>, idx: usize },
    /// The request was refused before a key was established: it is not billed to anyone.
    Unknown,
}

impl Caller {
    fn entry(&self) -> Option<&KeyEntry> {
        match self {
            Caller::Key { keys, idx } => keys.0.entries.get(*idx),
            _ => None,
        }
    }

    /// The `key_id` of usage events and access lines: the key's name; with auth off, a hash of
    /// the key the client sent (on metered routes).
    pub(crate) fn key_id(&self, head: &Head, metered: bool, cache: &KeyIdCache) -> Option<String> {
        match self {
            Caller::Open if metered => client_key(head).map(|k| cache.key_id(k)),
            Caller::Key { .. } => self.entry().map(|e| e.name.to_string()),
            Caller::Open | Caller::Unknown => None,
        }
    }

    /// Whether this caller may use the admin endpoints on the main listener: with auth on, only
    /// a key marked `admin: true`; with auth off, anyone who can reach the listener.
    pub(crate) fn may_administer(&self) -> bool {
        match self {
            Caller::Open => true,
            Caller::Key { .. } => self.entry().is_some_and(|e| e.admin),
            Caller::Unknown => false,
        }
    }

    /// Who waits, when this request must wait for a backend slot: the key (its digest prefix;
    /// one flow for everyone with auth off), its weight and the class, the key's own unless the
    /// `x-llmproxy-priority` header lowers it (it can never raise it).
    pub(crate) fn flow(&self, head: &Head) -> Result<Flow, ProxyError> {
        let (key, own, weight) = match self.entry() {
            Some(e) => (prefix(&e.digest), e.priority, e.weight),
            None => (0, Priority::Normal, 1),
        };
        let class = match head.get(Name::XLlmproxyPriority) {
            None => own,
            Some(v) => match std::str::from_utf8(v).ok().and_then(Priority::parse) {
                Some(asked) => asked.max(own),
                None => {
                    return Err(ProxyError::BadRequest(format!(
                        "{PRIORITY_HEADER} must be high, normal or low"
                    )))
                }
            },
        };
        Ok(Flow { key, class, weight })
    }

    /// Whether a usage event is emitted for this caller (not for failed authentication, which
    /// anyone can cause in any number).
    pub(crate) fn billable(&self) -> bool {
        !matches!(self, Caller::Unknown)
    }

    /// The key's model allowlist. A restricted key must name an allowed model, except on reads
    /// (`GET`, e.g. a proxied `/v1/models`), which run no model.
    pub(crate) fn check_model(&self, method: &str, model: Option<&str>) -> Result<(), ProxyError> {
        let Some(allowed) = self.entry().and_then(|e| e.models.as_deref()) else {
            return Ok(());
        };
        match model {
            Some(m) if allowed.iter().any(|a| a == m) => Ok(()),
            None if method == "GET" || method == "HEAD" => Ok(()),
            m => Err(ProxyError::ModelNotAllowed(
                m.unwrap_or("(none)").to_string(),
            )),
        }
    }

    /// Takes one request from the key's rates. While a shared store fails,
    /// `ratelimit.on_store_error` decides instead: `allow` admits, `deny` refuses, `local` goes
    /// on with this process's buckets.
    pub(crate) fn admit(&self, at: Instant) -> Result<(), ProxyError> {
        let Some(limits) = self.entry().and_then(|e| e.limits.as_deref()) else {
            return Ok(());
        };
        if let Caller::Key { keys, .. } = self {
            match keys.0.store.as_deref().and_then(StoreState::failing) {
                None | Some((OnStoreError::Local, _)) => {}
                Some((OnStoreError::Allow, _)) => return Ok(()),
                Some((OnStoreError::Deny, retry_after)) => {
                    return Err(ProxyError::RateLimited {
                        limit: Exceeded::StoreDown,
                        retry_after,
                    })
                }
            }
        }
        limits
            .admit(at)
            .map_err(|(limit, wait)| ProxyError::RateLimited {
                limit,
                retry_after: retry_after_secs(wait),
            })
    }

    /// Charges a finished request's tokens to the key's token rate.
    pub(crate) fn charge_tokens(&self, tokens: u64) {
        if let Some(limits) = self.entry().and_then(|e| e.limits.as_deref()) {
            limits.charge_tokens(tokens);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, raw: &str, models: Option<&[&str]>, rpm: u64) -> ApiKey {
        ApiKey {
            name: name.into(),
            digest: digest(raw),
            models: models.map(|m| m.iter().map(|s| s.to_string()).collect()),
            rpm,
            tpm: 0,
            admin: false,
            priority: Priority::Normal,
            weight: 1,
        }
    }

    #[test]
    fn constant_time_compare() {
        let a = digest("a");
        let mut b = a;
        assert!(ct_eq(&a, &b));
        b[31] ^= 1;
        assert!(!ct_eq(&a, &b));
        b = a;
        b[0] ^= 0x80;
        assert!(!ct_eq(&a, &b));
        assert!(!ct_eq(&a, &digest("b")));
    }

    #[test]
    fn lookup_by_digest() {
        let set = KeySet::build(
            &[
                key("a", "sk-aaaaaaaaaaaaaaaa", None, 0),
                key("b", "sk-bbbbbbbbbbbbbbbb", None, 0),
            ],
            Clock::new(),
            None,
            None,
        );
        assert_eq!(set.find(&digest("sk-bbbbbbbbbbbbbbbb")), Some(1));
        assert_eq!(set.find(&digest("sk-aaaaaaaaaaaaaaaa")), Some(0));
        assert_eq!(set.find(&digest("sk-cccccccccccccccc")), None);
    }

    #[test]
    fn rate_state_survives_a_rebuild_with_the_same_rates() {
        let clock = Clock::new();
        let old = KeySet::build(
            &[key("a", "sk-aaaaaaaaaaaaaaaa", None, 1)],
            clock,
            None,
            None,
        );
        let keep = KeySet::build(
            &[key("a", "sk-aaaaaaaaaaaaaaaa", None, 1)],
            clock,
            Some(&old),
            None,
        );
        let changed = KeySet::build(
            &[key("a", "sk-aaaaaaaaaaaaaaaa", None, 2)],
            clock,
            Some(&old),
            None,
        );
        let l = |s: &KeySet| s.entries[0].limits.clone().unwrap();
        assert!(Arc::ptr_eq(&l(&old), &l(&keep)));
        assert!(!Arc::ptr_eq(&l(&old), &l(&changed)));
    }

    #[test]
    fn model_allowlist() {
        let set = Rc::new(CoreKeys(Arc::new(KeySet::build(
            &[key("a", "sk-aaaaaaaaaaaaaaaa", Some(&["m1"]), 0)],
            Clock::new(),
            None,
            None,
        ))));
        let c = Caller::Key { keys: set, idx: 0 };
        assert!(c.check_model("POST", Some("m1")).is_ok());
        assert!(matches!(
            c.check_model("POST", Some("m2")),
            Err(ProxyError::ModelNotAllowed(_))
        ));
        assert!(c.check_model("POST", None).is_err());
        assert!(c.check_model("GET", None).is_ok());
        assert!(Caller::Open.check_model("POST", Some("m2")).is_ok());
    }

    #[test]
    fn a_keys_file_that_cannot_be_used_says_why_and_keeps_the_keys() {
        let auth = Auth {
            keys: vec![key("ops", "sk-oooooooooooooooo", None, 0)],
            keys_file: None,
            keys_file_poll: std::time::Duration::from_secs(1),
            forward_client_key: false,
        };
        let store = KeyStore::new(&auth).unwrap();
        let dir = std::env::temp_dir().join(format!("llmproxy-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();

        let missing = dir.join("missing.yaml");
        let e = store.reload_file(&missing).unwrap_err();
        assert!(matches!(&e, KeysFileError::Read(io) if io.kind() == std::io::ErrorKind::NotFound));
        assert!(e.to_string().starts_with("cannot read: "), "{e}");

        let broken = dir.join("broken.yaml");
        std::fs::write(&broken, "keys: [ { name: broken").unwrap();
        assert!(matches!(
            store.reload_file(&broken),
            Err(KeysFileError::Parse(ConfigError::Invalid(_)))
        ));

        let clash = dir.join("clash.yaml");
        std::fs::write(
            &clash,
            "keys:\n  - { name: ops, key: \"sk-pppppppppppppppp\" }\n",
        )
        .unwrap();
        let e = store.reload_file(&clash).unwrap_err();
        assert_eq!(
            e.to_string(),
            "key \"ops\" clashes with auth.keys entry \"ops\" (same name or same key)"
        );
        assert_eq!(store.version.load(Ordering::Relaxed), 0, "nothing replaced");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
