//! The control-plane thread: owns the master backend set (`backends::Registry`) and the running
//! configuration, and is the only place that changes either. Four things change them: DNS
//! discovery rounds (every `discovery.interval`, which also retry the static backend names that
//! did not resolve yet: such a backend is down, never fatal), reloads (SIGHUP, `POST
//! /admin/reload`), the listen certificate's files changing (`tls_watch`, polled every second)
//! and cores reporting that a draining backend has no request left. Each change is published as
//! a new immutable `BackendTable` to every core's inbox, to the health thread and to the
//! engine-metrics scraper.
//!
//! It blocks freely (DNS, reading the config file) because no request ever waits on it; it must
//! never be on a core. A message to a core may be dropped when that core's inbox is full, so the
//! current table is re-sent every second (cores ignore versions they already have).

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::backends::{desired, BackendTable, Changes, Registry};
use crate::capacity::{Capacity, ConnectionLimit};
use crate::clock;
use crate::config::Config;
use crate::control::discovery::Discovery;
use crate::control::reload::{keep_restart_only, ReloadError, StaticsError};
use crate::control::tls_watch::{self, TlsWatch};
use crate::control::Summary;
use crate::control::{Broadcast, ControlMsg, HealthReport, PlaneMsg};
use crate::telemetry::metrics::Metrics;

const RESEND: Duration = Duration::from_secs(1);
/// Longest sleep between checks of the stop flag.
const MAX_WAIT: Duration = Duration::from_millis(200);

pub(crate) struct Plane {
    registry: Registry,
    config: Arc<Config>,
    /// The file a reload re-reads; `None` (demo) = reload is refused.
    path: Option<PathBuf>,
    /// Resolved address of each static backend, by URL.
    statics: HashMap<String, SocketAddr>,
    discovery: Discovery,
    metrics: Arc<Metrics>,
    current: Arc<BackendTable>,
    limits: Option<(Arc<Capacity>, Arc<ConnectionLimit>)>,
    /// The engine-metrics scraper, which follows the table like the health thread.
    scraper: Option<Sender<Arc<BackendTable>>>,
    lookup: Lookup,
    /// When unresolved static backends were last warned about.
    warned_unresolved: Option<Instant>,
    /// The listen certificate's files, re-read when they change (`tls_watch`).
    tls_watch: TlsWatch,
}

/// How a static backend's host is looked up: the system resolver, or a stand-in in tests.
pub(crate) type Lookup = fn(&str, u16) -> std::io::Result<Vec<SocketAddr>>;

fn system_lookup(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    (host, port).to_socket_addrs().map(Iterator::collect)
}

/// Static backends whose host did not resolve, with why.
type Unresolved = Vec<(String, StaticsError)>;

/// Resolves static backends: URLs already known keep their address (a name is looked up once;
/// a backend that moves is a reload). Returns those that resolved and, for the others, why not:
/// the caller decides whether that is fatal (a reload adding a new one) or a backend down (at
/// start, and one already waiting for its name).
fn resolve_statics(
    cfg: &Config,
    known: &HashMap<String, SocketAddr>,
    lookup: Lookup,
) -> (HashMap<String, SocketAddr>, Unresolved) {
    let mut out = HashMap::new();
    let mut unresolved = Vec::new();
    for (index, b) in cfg.backends.iter().enumerate() {
        if b.discover.is_some() {
            continue;
        }
        if let Some(a) = known.get(&b.url) {
            out.insert(b.url.clone(), *a);
            continue;
        }
        match lookup(&b.host, b.port) {
            Ok(addrs) => match addrs.first() {
                Some(a) => {
                    out.insert(b.url.clone(), *a);
                }
                None => unresolved.push((
                    b.url.clone(),
                    StaticsError::NoAddress {
                        index,
                        host: b.host.clone(),
                    },
                )),
            },
            Err(error) => unresolved.push((
                b.url.clone(),
                StaticsError::Lookup {
                    index,
                    host: b.host.clone(),
                    error,
                },
            )),
        }
    }
    (out, unresolved)
}

/// Static backends whose name does not resolve now, as warnings (`llmproxy check`): the proxy
/// would start with them down.
pub(crate) fn unresolved_statics(cfg: &Config) -> Vec<String> {
    let (_, unresolved) = resolve_statics(cfg, &HashMap::new(), system_lookup);
    unresolved
        .into_iter()
        .map(|(_, e)| {
            format!(
                "{e} (the proxy starts with this backend down and retries every {:?})",
                cfg.discovery.interval
            )
        })
        .collect()
}

/// How often an unresolved static backend is warned about again (it is retried every
/// `discovery.interval`, which is too often to log each time).
const UNRESOLVED_WARN_EVERY: Duration = Duration::from_secs(60);

fn warn_unresolved(unresolved: &Unresolved, interval: Duration) {
    for (_, e) in unresolved {
        log::warn!(
            "{e}; this backend is down until its name resolves (retried every {interval:?})"
        );
    }
}

impl Plane {
    /// Resolves the backends for the first table. A static backend whose name does not resolve
    /// (its Service not created yet, a typo) is left out, logged, and looked up again every
    /// `discovery.interval`: the proxy starts without it rather than not at all (under
    /// Kubernetes, exiting would be a crash loop until the name exists). Discovered backends are
    /// resolved once here (a failure only logs: discovery keeps trying).
    pub(crate) fn new(
        cfg: Arc<Config>,
        path: Option<PathBuf>,
        cores: usize,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Plane> {
        Plane::with_lookup(cfg, path, cores, metrics, system_lookup)
    }

    pub(crate) fn with_lookup(
        cfg: Arc<Config>,
        path: Option<PathBuf>,
        cores: usize,
        metrics: Arc<Metrics>,
        lookup: Lookup,
    ) -> anyhow::Result<Plane> {
        let (statics, unresolved) = resolve_statics(&cfg, &HashMap::new(), lookup);
        let mut warned_unresolved = None;
        if !unresolved.is_empty() {
            warn_unresolved(&unresolved, cfg.discovery.interval);
            warned_unresolved = Some(Instant::now());
        }
        let mut discovery = Discovery::new(&cfg);
        discovery.resolve(None, &metrics);
        let registry = Registry::new(cores, desired(&cfg, &statics, &discovery.sets()));
        let current = registry.publish(cfg.clone());
        Ok(Plane {
            registry,
            path,
            statics,
            discovery,
            metrics,
            current,
            limits: None,
            scraper: None,
            lookup,
            warned_unresolved,
            tls_watch: TlsWatch::new(&cfg),
            config: cfg,
        })
    }

    pub(crate) fn table(&self) -> Arc<BackendTable> {
        self.current.clone()
    }

    pub(crate) fn spawn(
        self,
        inbox: Receiver<PlaneMsg>,
        cores: Broadcast,
        health: Sender<HealthReport>,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("llmproxy-plane".into())
            .spawn(move || self.run(&inbox, &cores, &health, &stop))
    }

    fn run(
        mut self,
        inbox: &Receiver<PlaneMsg>,
        cores: &Broadcast,
        health: &Sender<HealthReport>,
        stop: &AtomicBool,
    ) {
        let mut next_discovery = clock::deadline(self.discovery.interval());
        let mut next_resend = Instant::now() + RESEND;
        let mut next_tls = Instant::now() + tls_watch::POLL;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let wait = next_discovery
                .min(next_resend)
                .min(next_tls)
                .saturating_duration_since(now)
                .min(MAX_WAIT);
            let changed = match inbox.recv_timeout(wait) {
                Ok(PlaneMsg::Drained { core, id, version }) => {
                    let freed = self.registry.drained(core, id, version);
                    if freed {
                        log::info!("backend id {id} drained on every core; its slot is free");
                    }
                    freed
                }
                Ok(PlaneMsg::Reload { reply }) => {
                    let result = self.reload();
                    // Published before the answer: a request sent after a successful reload
                    // was answered finds the new table in its core's inbox.
                    if result.is_ok() {
                        self.publish(cores, health);
                    }
                    let _ = reply.send(result);
                    false
                }
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(wait);
                    false
                }
            };
            if changed {
                self.publish(cores, health);
            }
            let now = Instant::now();
            if now >= next_discovery {
                next_discovery = clock::after(now, self.discovery.interval());
                let discovered =
                    !self.discovery.is_empty() && self.discovery.resolve(None, &self.metrics);
                if self.retry_statics() || discovered {
                    self.apply_backends();
                    self.publish(cores, health);
                }
            }
            if now >= next_tls {
                next_tls = now + tls_watch::POLL;
                if self.tls_watch.changed() && self.rotate_tls() {
                    self.publish(cores, health);
                }
            }
            if now >= next_resend {
                next_resend = now + RESEND;
                self.send(cores, health);
            }
        }
    }

    /// Looks up again the static backends whose name did not resolve yet; returns whether any
    /// did now (the caller applies and publishes).
    fn retry_statics(&mut self) -> bool {
        let waiting = self
            .config
            .backends
            .iter()
            .any(|b| b.discover.is_none() && !self.statics.contains_key(&b.url));
        if !waiting {
            return false;
        }
        let (statics, unresolved) = resolve_statics(&self.config, &self.statics, self.lookup);
        let found: Vec<(&String, &SocketAddr)> = statics
            .iter()
            .filter(|(url, _)| !self.statics.contains_key(*url))
            .collect();
        for (url, addr) in &found {
            log::info!("backend {url} resolved to {addr}; it joins the backend set");
        }
        let changed = !found.is_empty();
        if !unresolved.is_empty()
            && self
                .warned_unresolved
                .is_none_or(|t| t.elapsed() >= UNRESOLVED_WARN_EVERY)
        {
            warn_unresolved(&unresolved, self.config.discovery.interval);
            self.warned_unresolved = Some(Instant::now());
        }
        self.statics = statics;
        changed
    }

    /// Diffs the desired backend set against the registry; logs what changed.
    fn apply_backends(&mut self) -> Changes {
        let specs = desired(&self.config, &self.statics, &self.discovery.sets());
        let changes = self.registry.apply(specs);
        if !changes.is_empty() {
            log::info!(
                "backends changed (version {}): added {:?}, removed (draining) {:?}, updated {:?}",
                self.registry.version(),
                changes.added,
                changes.removed,
                changes.updated
            );
        }
        changes
    }

    fn publish(&mut self, cores: &Broadcast, health: &Sender<HealthReport>) {
        self.current = self.registry.publish(self.config.clone());
        self.apply_limits();
        self.send(cores, health);
    }

    /// Hands the process-wide admission limits over to the plane, which keeps them in step with
    /// each table it publishes (backend limits by slot) and each config it reloads.
    pub(crate) fn attach_limits(
        &mut self,
        capacity: Arc<Capacity>,
        connections: Arc<ConnectionLimit>,
    ) {
        self.limits = Some((capacity, connections));
        self.apply_limits();
    }

    /// Gives the plane the engine-metrics scraper's inbox: it gets every table published.
    pub(crate) fn attach_scraper(&mut self, scraper: Sender<Arc<BackendTable>>) {
        self.scraper = Some(scraper);
    }

    fn apply_limits(&self) {
        let Some((capacity, connections)) = &self.limits else {
            return;
        };
        let per_slot: Vec<usize> = self
            .current
            .slots
            .iter()
            .map(|e| e.as_ref().map_or(0, |e| e.spec.max_inflight))
            .collect();
        capacity.set_limits(&per_slot);
        let limits = &self.config.limits;
        capacity.set_queue(limits.queue_size, limits.queue_timeout);
        capacity.set_scheduling(limits.scheduling, limits.promote_after);
        capacity.set_saturation(limits.saturation);
        connections.set_max(limits.max_connections);
    }

    fn send(&self, cores: &Broadcast, health: &Sender<HealthReport>) {
        cores.send_all(&ControlMsg::Table(self.current.clone()));
        // A full health channel is healed by the next re-send.
        let _ = health.try_send(HealthReport::Table(self.current.clone()));
        if let Some(scraper) = &self.scraper {
            let _ = scraper.try_send(self.current.clone());
        }
    }

    /// The listen certificate's files changed: the running config with the pair built anew
    /// (published by the caller when this returns true), or, when they do not build, a log line
    /// and the running certificate stays.
    fn rotate_tls(&mut self) -> bool {
        match tls_watch::rebuild(&self.config) {
            None => false,
            Some(Err(e)) => {
                log::error!(
                    "tls: the changed certificate files are refused, the running certificate \
                     keeps serving: {e}"
                );
                false
            }
            Some(Ok(new)) => {
                self.metrics.tls_certificates(&new);
                if let Some(t) = &new.tls {
                    log::info!(
                        "tls: certificate files changed; new handshakes use {} (expires at {} s \
                         since the epoch)",
                        t.cert_file.display(),
                        t.server.expires_unix()
                    );
                }
                self.config = Arc::new(new);
                // Cores take a new config only with a new table version.
                self.registry.bump();
                true
            }
        }
    }

    /// Re-reads the config file; on success the new config and backend set are in the registry
    /// (published by the caller). On failure nothing changed.
    fn reload(&mut self) -> Result<Summary, ReloadError> {
        let Some(path) = self.path.clone() else {
            return Err(ReloadError::NoConfigFile);
        };
        let rejected = |e: ReloadError| {
            log::error!("reload rejected, the running configuration stays: {e}");
            e
        };
        let mut new = Config::load(&path).map_err(|error| {
            rejected(ReloadError::Invalid {
                path: path.clone(),
                error,
            })
        })?;
        let warnings = keep_restart_only(&self.config, &mut new);
        for w in &warnings {
            log::warn!("reload: {w}");
        }
        // A backend the running config already had waiting for its name keeps waiting; a reload
        // that adds a name which does not resolve is refused (the operator is there to read the
        // answer, and a typo must not silently leave a backend out).
        let (statics, unresolved) = resolve_statics(&new, &self.statics, self.lookup);
        let waiting = |url: &str| {
            self.config
                .backends
                .iter()
                .any(|b| b.discover.is_none() && b.url == url)
        };
        if let Some((_, e)) = unresolved.into_iter().find(|(url, _)| !waiting(url)) {
            return Err(rejected(ReloadError::from(e)));
        }
        self.statics = statics;
        let added = self.discovery.configure(&new);
        self.metrics.tls_certificates(&new);
        // The reload just read the (possibly other) files: watch those, as of now.
        self.tls_watch = TlsWatch::new(&new);
        self.config = Arc::new(new);
        if !added.is_empty() {
            self.discovery.resolve(Some(&added), &self.metrics);
        }
        let changes = self.apply_backends();
        // Cores take a new config only with a new table version.
        self.registry.bump();
        log::info!(
            "configuration reloaded from {} (version {})",
            path.display(),
            self.registry.version()
        );
        Ok(Summary {
            version: self.registry.version(),
            added: changes.added,
            removed: changes.removed,
            updated: changes.updated,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// `vllm` resolves once `VLLM_EXISTS` is set; `typo` never does.
    static VLLM_EXISTS: AtomicBool = AtomicBool::new(false);

    fn fake_dns(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        match host {
            "vllm" if VLLM_EXISTS.load(Ordering::SeqCst) => Ok(vec![([10, 0, 0, 7], port).into()]),
            "known" => Ok(vec![([10, 0, 0, 1], port).into()]),
            "empty" => Ok(vec![]),
            _ => Err(std::io::Error::other("no such host")),
        }
    }

    fn urls(p: &Plane) -> Vec<String> {
        let mut v: Vec<String> = p
            .table()
            .entries()
            .map(|(_, e)| e.spec.url.clone())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn unresolved_statics_are_reported_not_fatal() {
        let cfg = Config::from_yaml_str(
            "backends: [{ url: \"http://known:1\" }, { url: \"http://typo:2\" }, { url: \"http://empty:3\" }]\n",
        )
        .unwrap();
        let (ok, bad) = resolve_statics(&cfg, &HashMap::new(), fake_dns);
        assert_eq!(ok.len(), 1);
        let texts: Vec<String> = bad.iter().map(|(_, e)| e.to_string()).collect();
        assert_eq!(
            texts,
            [
                "backends[1].url: cannot resolve typo: no such host",
                "backends[2].url: empty has no address"
            ]
        );
    }

    /// Issue 21 item 8: the Helm chart's default `http://vllm:8000` before the vLLM Service
    /// exists. The proxy starts with that backend down and adds it once the name resolves.
    #[test]
    fn a_static_backend_joins_when_its_name_starts_resolving() {
        let cfg = Arc::new(
            Config::from_yaml_str(
                "backends: [{ url: \"http://known:1\" }, { url: \"http://vllm:8000\" }]\n",
            )
            .unwrap(),
        );
        let metrics = Arc::new(Metrics::new(&cfg, 1, "test").unwrap());
        let mut plane = Plane::with_lookup(cfg, None, 1, metrics, fake_dns).unwrap();
        assert_eq!(urls(&plane), ["http://known:1"]);
        assert!(!plane.retry_statics(), "still unresolved: nothing changes");
        VLLM_EXISTS.store(true, Ordering::SeqCst);
        assert!(plane.retry_statics());
        plane.apply_backends();
        plane.current = plane.registry.publish(plane.config.clone());
        assert_eq!(urls(&plane), ["http://known:1", "http://vllm:8000"]);
        assert_eq!(
            plane.statics["http://vllm:8000"],
            ([10, 0, 0, 7], 8000).into()
        );
        assert!(
            !plane.retry_statics(),
            "resolved names are not looked up again"
        );
    }

    /// Reload: a backend already waiting for its name keeps waiting (the reload succeeds); a
    /// reload that adds a name which does not resolve is refused, as before.
    #[test]
    fn reload_keeps_a_waiting_backend_and_refuses_a_new_unresolved_one() {
        let dir = std::env::temp_dir().join(format!("llmproxy-plane-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.yaml");
        let first = "backends: [{ url: \"http://known:1\" }, { url: \"http://typo:2\" }]\n";
        std::fs::write(&path, first).unwrap();
        let cfg = Arc::new(Config::from_yaml_str(first).unwrap());
        let metrics = Arc::new(Metrics::new(&cfg, 1, "test").unwrap());
        let mut plane = Plane::with_lookup(cfg, Some(path.clone()), 1, metrics, fake_dns).unwrap();
        plane
            .reload()
            .expect("the waiting backend does not block a reload");
        std::fs::write(
            &path,
            "backends: [{ url: \"http://known:1\" }, { url: \"http://typo:2\" }, { url: \"http://typo2:3\" }]\n",
        )
        .unwrap();
        let e = plane
            .reload()
            .expect_err("a new unresolved name is refused");
        assert_eq!(
            e.to_string(),
            "backends[2].url: cannot resolve typo2: no such host"
        );
        assert_eq!(plane.config.backends.len(), 2, "nothing applied");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
