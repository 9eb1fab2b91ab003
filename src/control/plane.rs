//! The control-plane thread: owns the master backend set (`backends::Registry`) and the running
//! configuration, and is the only place that changes either. Three things change them: DNS
//! discovery rounds (every `discovery.interval`), reloads (SIGHUP, `POST /admin/reload`) and
//! cores reporting that a draining backend has no request left. Each change is published as a
//! new immutable `BackendTable` to every core's inbox, to the health thread and to the
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
use crate::control::reload::{keep_restart_only, ReloadError};
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
}

/// A static backend that does not resolve, by its index in `backends`. The text carries the
/// cause (startup prints it through `anyhow`, a reload through `ReloadError`), so it is not also
/// a `source()`.
#[derive(Debug, thiserror::Error)]
pub enum StaticsError {
    #[error("backends[{index}].url: cannot resolve {host}: {error}")]
    Lookup {
        index: usize,
        host: String,
        error: std::io::Error,
    },
    #[error("backends[{index}].url: {host} has no address")]
    NoAddress { index: usize, host: String },
}

/// Resolves static backends: URLs already known keep their address; a new one that does not
/// resolve is an error (at start and on reload alike: a typo must not silently drop a backend).
fn resolve_statics(
    cfg: &Config,
    known: &HashMap<String, SocketAddr>,
) -> Result<HashMap<String, SocketAddr>, StaticsError> {
    let mut out = HashMap::new();
    for (index, b) in cfg.backends.iter().enumerate() {
        if b.discover.is_some() {
            continue;
        }
        let addr = match known.get(&b.url) {
            Some(a) => *a,
            None => (b.host.as_str(), b.port)
                .to_socket_addrs()
                .map_err(|error| StaticsError::Lookup {
                    index,
                    host: b.host.clone(),
                    error,
                })?
                .next()
                .ok_or_else(|| StaticsError::NoAddress {
                    index,
                    host: b.host.clone(),
                })?,
        };
        out.insert(b.url.clone(), addr);
    }
    Ok(out)
}

impl Plane {
    /// Resolves the backends for the first table: static ones must resolve; discovered ones are
    /// resolved once here (a failure only logs: discovery keeps trying).
    pub(crate) fn new(
        cfg: Arc<Config>,
        path: Option<PathBuf>,
        cores: usize,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Plane> {
        let statics = resolve_statics(&cfg, &HashMap::new())?;
        let mut discovery = Discovery::new(&cfg);
        discovery.resolve(None, &metrics);
        let registry = Registry::new(cores, desired(&cfg, &statics, &discovery.sets()));
        let current = registry.publish(cfg.clone());
        Ok(Plane {
            registry,
            config: cfg,
            path,
            statics,
            discovery,
            metrics,
            current,
            limits: None,
            scraper: None,
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
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let wait = next_discovery
                .min(next_resend)
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
                if !self.discovery.is_empty() && self.discovery.resolve(None, &self.metrics) {
                    self.apply_backends();
                    self.publish(cores, health);
                }
            }
            if now >= next_resend {
                next_resend = now + RESEND;
                self.send(cores, health);
            }
        }
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
        let statics =
            resolve_statics(&new, &self.statics).map_err(|e| rejected(ReloadError::from(e)))?;
        self.statics = statics;
        let added = self.discovery.configure(&new);
        self.metrics.tls_certificates(&new);
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
