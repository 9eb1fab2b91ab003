//! Starting the data plane: one OS thread per worker, each with its own monoio runtime
//! (io_uring, or epoll where io_uring is unavailable), its own SO_REUSEPORT listener and its own
//! `Worker` state; plus the health thread. Listeners are bound here, before any thread starts, so
//! that a port of 0 resolves to one real port shared by every worker and bind errors surface as
//! startup errors.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use socket2::{Domain, Protocol, Socket, Type};

use crate::auth::ratelimit::StoreState;
use crate::auth::KeyStore;
use crate::capacity::{Capacity, ConnectionLimit};
use crate::config::{Config, IoDriver};
use crate::config::{OnStoreError, RateStore};
use crate::control::plane::Plane;
use crate::control::Broadcast;
use crate::control::{PlaneMsg, ReloadError};
use crate::telemetry::metrics::Metrics;
use crate::usage::deliver::Delivery;
use crate::worker::{PaddedCount, Shared, Worker};

/// How often each core drains its inbox, flushes metrics and expires pooled connections.
const TICK: Duration = Duration::from_millis(100);

/// Why a core thread could not start; sent back to `start`, which fails with it. The text carries
/// the cause (it is the startup error the user reads), so it is not also a `source()`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CoreError {
    /// `error` is the OS's errno as monoio reports it (printed by name, as `EINVAL`).
    #[error("core {core}: pinning to CPU {cpu}: {error:?}")]
    Pin {
        core: usize,
        cpu: usize,
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("core {core}: runtime: {error}")]
    Runtime { core: usize, error: std::io::Error },
    #[error("core {core}: listener: {error}")]
    Listener { core: usize, error: std::io::Error },
    #[error("core {core}: io_driver is io_uring, but this thread's io_uring setup failed")]
    NoIoUring { core: usize },
}

pub struct Running {
    pub(crate) addr: SocketAddr,
    pub(crate) admin_addr: Option<SocketAddr>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) driver: &'static str,
    stop_health: Arc<AtomicBool>,
    delivery: Option<Delivery>,
    /// The startup banner (see `telemetry::banner`).
    banner: String,
}

/// How long `reload` waits for the control plane's answer.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);

impl Running {
    /// The address the main listener is bound to (a configured port 0 resolved).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn workers(&self) -> usize {
        self.shared.inflight.len()
    }

    /// The admin listener's address, when `admin_listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// `io_uring` or `epoll`.
    pub fn driver(&self) -> &'static str {
        self.driver
    }

    /// One line with what an operator checks first: backends, strategy, auth, usage hook, io
    /// driver, admin listener.
    pub fn banner(&self) -> &str {
        &self.banner
    }

    /// Requests in flight across all cores.
    pub fn in_flight(&self) -> usize {
        self.shared.total_inflight()
    }

    /// Stops accepting and answers /health with 503; in-flight work continues.
    pub fn begin_drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
    }

    /// Waits until no request is in flight or `grace` passes; returns whether it drained fully.
    pub fn wait_drained(&self, grace: Duration) -> bool {
        let deadline = crate::clock::deadline(grace);
        loop {
            if self.shared.total_inflight() == 0 {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Re-reads the config file (SIGHUP); blocks until the control plane answers.
    pub fn reload(&self) -> Result<crate::control::Summary, ReloadError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.shared
            .plane
            .send_timeout(PlaneMsg::Reload { reply: tx }, RELOAD_TIMEOUT)
            .map_err(|_| ReloadError::NotRunning)?;
        rx.recv_timeout(RELOAD_TIMEOUT)
            .map_err(|_| ReloadError::NoAnswer)?
    }

    pub fn stop_health(&self) {
        self.stop_health.store(true, Ordering::Relaxed);
    }

    /// Flushes usage events: channel → spool → delivery attempts until `deadline`.
    pub fn flush_usage(&mut self, deadline: std::time::Instant) {
        if let Some(d) = self.delivery.take() {
            d.shutdown(deadline);
        }
    }
}

/// Worker count: explicit CPUs, else explicit count, else the CPUs this process may use
/// (affinity mask and cgroup quota, as `available_parallelism` reports them).
pub fn worker_plan(cfg: &Config) -> anyhow::Result<(usize, Option<Vec<usize>>)> {
    if let Some(cpus) = &cfg.cpus {
        let allowed = allowed_cpus()?;
        for c in cpus {
            if !allowed.contains(c) {
                bail!(
                    "cpus: CPU {c} is not available to this process (allowed: {})",
                    format_cpus(&allowed)
                );
            }
        }
        if cfg.workers != 0 && cfg.workers != cpus.len() {
            bail!(
                "workers ({}) and cpus ({} CPUs) disagree: one worker runs per listed CPU",
                cfg.workers,
                cpus.len()
            );
        }
        return Ok((cpus.len(), Some(cpus.clone())));
    }
    let n = if cfg.workers > 0 {
        cfg.workers
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    Ok((n, None))
}

fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    // SAFETY-free path: read the affinity list the kernel publishes for this process.
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .ok_or_else(|| anyhow!("no Cpus_allowed_list in /proc/self/status"))?;
    crate::config::parse_cpu_list(list.trim()).map_err(|e| anyhow!("Cpus_allowed_list: {e}"))
}

fn format_cpus(cpus: &[usize]) -> String {
    cpus.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<StdListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Binds one listener per worker on the same port. The first bind fixes the port (so `:0`
/// works); the others join it with SO_REUSEPORT and the kernel spreads connections over them.
///
/// SO_REUSEPORT would also let another process join the port (another llmproxy, perhaps with
/// another config or without auth), and the kernel would split connections between the two. So
/// a fixed port is first probed with a plain bind, which fails while anyone listens on it.
fn bind_all(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<StdListener>> {
    if addr.port() != 0 {
        match bind(addr, false) {
            Ok(probe) => drop(probe),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => anyhow::bail!(
                "{addr}: port {} is already in use by another process (only the workers of one \
                 llmproxy may share a port)",
                addr.port()
            ),
            Err(e) => return Err(e).with_context(|| format!("binding {addr}")),
        }
    }
    let first = bind(addr, true).with_context(|| format!("binding {addr}"))?;
    let actual = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..n {
        all.push(bind(actual, true).with_context(|| format!("binding {actual}"))?);
    }
    Ok(all)
}

/// Everything startup checks that does not need the network or a port: the worker plan, the
/// keys file, the spool directory. `llmproxy check` runs exactly this, so "ok" means the proxy
/// will start (short of a port in use).
pub fn preflight(cfg: &Config) -> anyhow::Result<()> {
    worker_plan(cfg)?;
    if let (Some(file), Err(e)) = (&cfg.auth.keys_file, KeyStore::new(&cfg.auth)) {
        bail!("auth.keys_file {}: {e}", file.display());
    }
    let hook = &cfg.usage_hook;
    if let (true, Some(dir)) = (hook.enabled, &hook.spool_dir) {
        crate::usage::spool::check_dir(Path::new(dir))
            .map_err(|e| anyhow!("usage_hook.spool_dir {dir}: {e}"))?;
    }
    Ok(())
}

/// What `llmproxy check` warns about without failing: what the config says but probably does
/// not mean (`Config::warnings`), and static backends whose name does not resolve from here (the
/// proxy starts with them down and keeps trying).
pub fn warnings(cfg: &Config) -> Vec<String> {
    let mut w = cfg.warnings();
    w.extend(crate::control::plane::unresolved_statics(cfg));
    w
}

/// Starts the proxy; `path` is the config file a reload re-reads.
pub fn start_with(cfg: Config, path: Option<PathBuf>) -> anyhow::Result<Running> {
    preflight(&cfg)?;
    for w in cfg.warnings() {
        log::warn!("{w}");
    }
    let (workers, cpus) = worker_plan(&cfg)?;
    let listeners = bind_all(cfg.listen, workers)?;
    let addr = listeners[0].local_addr()?;
    let admin = match cfg.admin_listen {
        Some(a) => Some(bind(a, false).with_context(|| format!("binding admin_listen {a}"))?),
        None => None,
    };
    let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;
    let driver = match cfg.io_driver {
        IoDriver::Epoll => "epoll",
        IoDriver::Auto | IoDriver::IoUring if monoio::utils::detect_uring() => "io_uring",
        IoDriver::IoUring => bail!(
            "io_driver is io_uring, but the kernel refused io_uring \
             (blocked by seccomp or kernel.io_uring_disabled?)"
        ),
        IoDriver::Auto => "epoll",
    };
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(
        Metrics::new(&cfg, workers, driver).map_err(|e| anyhow!("metrics registry: {e}"))?,
    );
    metrics.tls_certificates(&cfg);
    for b in cfg
        .backends
        .iter()
        .filter(|b| b.tls.as_ref().is_some_and(|t| t.insecure_skip_verify))
    {
        log::warn!(
            "INSECURE: backends {}: tls.insecure_skip_verify is true; its certificate is NOT \
             verified, so anyone on the path can impersonate it and read every request",
            b.url
        );
    }
    let mut plane = Plane::new(cfg.clone(), path, workers, metrics.clone())?;
    let connection_limit = ConnectionLimit::new(cfg.limits.max_connections);
    let capacity = Capacity::from_config(&cfg);
    plane.attach_limits(capacity.clone(), connection_limit.clone());
    let table = plane.table();
    // Small: a bounded crossbeam channel writes every slot when it is made (4096 slots were
    // 160 KB of idle memory), and what goes through it is rare (drain reports, which a core
    // re-sends on its next tick when the channel is full, and reload requests).
    let (plane_tx, plane_rx) = crossbeam_channel::bounded(256);
    // With `ratelimit.store: redis` the cores read the store's state; the sync thread sets it.
    let rate_store = (cfg.ratelimit.store == RateStore::Redis).then(|| {
        Arc::new(StoreState::new(
            cfg.ratelimit.on_store_error,
            cfg.ratelimit.sync_interval,
        ))
    });
    // With `on_store_error: local` a failing store changes nothing on the request path (the
    // local buckets decide either way), so the cores are not given its state to look at: their
    // path is exactly `store: local`'s.
    let admission_store = rate_store
        .clone()
        .filter(|_| cfg.ratelimit.on_store_error != OnStoreError::Local);
    let keys = Arc::new(
        KeyStore::with_store(&cfg.auth, admission_store).map_err(|e| {
            let file = cfg.auth.keys_file.as_deref().unwrap_or(Path::new(""));
            anyhow!("auth.keys_file {}: {e}", file.display())
        })?,
    );
    if let Some(state) = rate_store {
        crate::control::ratelimit_sync::spawn(
            keys.clone(),
            state,
            Some(metrics.clone()),
            &cfg.ratelimit,
        )
        .context("starting the rate-limit sync thread")?;
        log::info!(
            "ratelimit: per-key limits shared through Redis, synced every {:?}, on_store_error {}",
            cfg.ratelimit.sync_interval,
            cfg.ratelimit.on_store_error.as_str()
        );
    }
    if let Some(path) = &cfg.auth.keys_file {
        crate::control::keys_watch::watch(keys.clone(), path.clone(), cfg.auth.keys_file_poll)
            .context("starting the keys_file watcher")?;
    }
    let shared = Arc::new(Shared {
        plane: plane_tx,
        draining: AtomicBool::new(false),
        inflight: (0..workers).map(|_| PaddedCount::default()).collect(),
        connections: (0..workers).map(|_| PaddedCount::default()).collect(),
        metrics,
        keys,
        connection_limit,
        capacity,
    });
    let (broadcast, inboxes) = Broadcast::new(workers);
    let (health_tx, health_rx) = crossbeam_channel::bounded(1024);
    let (usage_tx, usage_rx) = crate::usage::channel();
    let delivery = Delivery::start(
        &cfg.usage_hook,
        &cfg.usage,
        usage_rx,
        shared.metrics.clone(),
    )
    .context("starting usage delivery")?;
    let stop_health = Arc::new(AtomicBool::new(false));
    crate::control::health::spawn(
        table.clone(),
        broadcast.clone(),
        health_rx,
        shared.metrics.clone(),
        stop_health.clone(),
    )
    .context("starting the health thread")?;
    let (scrape_tx, scrape_rx) = crossbeam_channel::bounded(64);
    crate::control::engine::scrape::spawn(
        table.clone(),
        broadcast.clone(),
        shared.metrics.clone(),
        shared.capacity.clone(),
        scrape_rx,
        stop_health.clone(),
    )
    .context("starting the engine metrics scraper")?;
    plane.attach_scraper(scrape_tx);
    plane
        .spawn(
            plane_rx,
            broadcast.clone(),
            health_tx.clone(),
            stop_health.clone(),
        )
        .context("starting the control-plane thread")?;

    let mut admin = admin;
    let io_driver = cfg.io_driver;
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<(), CoreError>>(workers);
    for (id, (listener, inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
        let shared = shared.clone();
        let broadcast = broadcast.clone();
        let health_tx = health_tx.clone();
        let usage_tx = usage_tx.clone();
        let cpu = cpus.as_ref().map(|c| c[id]);
        let admin_listener = if id == 0 { admin.take() } else { None };
        let ready = ready_tx.clone();
        let table = table.clone();
        std::thread::Builder::new()
            .name(format!("llmproxy-core-{id}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if let Err(e) = monoio::utils::bind_to_cpu_set([cpu]) {
                        let _ = ready.send(Err(CoreError::Pin {
                            core: id,
                            cpu,
                            error: Box::new(e),
                        }));
                        return;
                    }
                }
                let rt = match io_driver {
                    IoDriver::Epoll => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                        .enable_timer()
                        .build()
                        .map(Into::into),
                    IoDriver::Auto | IoDriver::IoUring => uring_runtime(id),
                };
                let mut rt = match rt {
                    Ok(rt) => rt,
                    Err(error) => {
                        let _ = ready.send(Err(CoreError::Runtime { core: id, error }));
                        return;
                    }
                };
                rt.block_on(async move {
                    let setup = || -> std::io::Result<_> {
                        let main = monoio::net::TcpListener::from_std(listener)?;
                        let admin = admin_listener
                            .map(monoio::net::TcpListener::from_std)
                            .transpose()?;
                        Ok((main, admin))
                    };
                    let (main, admin) = match setup() {
                        Ok(l) => l,
                        Err(error) => {
                            let _ = ready.send(Err(CoreError::Listener { core: id, error }));
                            return;
                        }
                    };
                    let legacy = monoio::utils::is_legacy();
                    if legacy && io_driver == IoDriver::IoUring {
                        let _ = ready.send(Err(CoreError::NoIoUring { core: id }));
                        return;
                    }
                    log::info!(
                        "core {id} running on {}{}",
                        if legacy { "epoll" } else { "io_uring" },
                        cpu.map(|c| format!(", pinned to CPU {c}"))
                            .unwrap_or_default()
                    );
                    let worker = Rc::new(Worker::new(
                        id, shared, inbox, broadcast, health_tx, usage_tx, table,
                    ));
                    let _ = ready.send(Ok(()));
                    let flusher = worker.clone();
                    // The turn-end flushes of this core's access lines and usage events.
                    let usage_flusher = worker.clone();
                    monoio::spawn(async move { usage_flusher.usage.run().await });
                    monoio::spawn(async move {
                        if let Some(a) = &flusher.access {
                            a.run().await;
                        }
                    });
                    let ticker = worker.clone();
                    monoio::spawn(async move {
                        loop {
                            monoio::time::sleep(TICK).await;
                            ticker.tick();
                        }
                    });
                    if let Some(admin) = admin {
                        monoio::spawn(crate::proxy::conn::accept_loop(worker.clone(), admin, true));
                    }
                    crate::proxy::conn::accept_loop(worker, main, false).await;
                    // Connections keep being served until the process exits after the drain.
                    std::future::pending::<()>().await;
                });
            })
            .context("spawning a worker thread")?;
    }
    drop(ready_tx);
    for _ in 0..workers {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => bail!("a worker thread exited during startup"),
        }
    }
    drop(usage_tx);
    let banner = crate::telemetry::banner::banner(
        &cfg,
        &crate::telemetry::banner::Started {
            keys: shared.keys.len(),
            driver,
            workers,
            admin: admin_addr,
        },
    );
    Ok(Running {
        banner,
        addr,
        admin_addr,
        shared,
        driver,
        stop_health,
        delivery: Some(delivery),
    })
}

/// Sets flags on a ring builder.
type UringFlags = fn(&mut io_uring::Builder) -> &mut io_uring::Builder;

/// The ring's set-up flags. A core's ring is created, entered and waited on by that core's
/// thread alone (SINGLE_ISSUER), and monoio waits for completions by entering the ring with
/// GETEVENTS (its park), so the kernel can run completion work when the thread asks for it
/// (DEFER_TASKRUN) instead of interrupting it with task work (COOP_TASKRUN is what older kernels
/// get). `LLMPROXY_URING_FLAGS=none` builds a plain ring (for before/after measurements).
fn uring_flags() -> Vec<(&'static str, UringFlags)> {
    if std::env::var("LLMPROXY_URING_FLAGS").is_ok_and(|v| v == "none") {
        return Vec::new();
    }
    vec![
        ("single_issuer+defer_taskrun", |b| {
            b.setup_single_issuer().setup_defer_taskrun()
        }),
        ("coop_taskrun", |b| {
            b.setup_coop_taskrun().setup_taskrun_flag()
        }),
    ]
}

/// A core's io_uring runtime (epoll when the kernel has no io_uring), with the most helpful
/// set-up flags the kernel accepts: each set is tried in turn, then none.
fn uring_runtime(
    core: usize,
) -> std::io::Result<
    monoio::FusionRuntime<
        monoio::time::TimeDriver<monoio::IoUringDriver>,
        monoio::time::TimeDriver<monoio::LegacyDriver>,
    >,
> {
    // 1,024 submission slots (and the kernel's default of twice as many completion slots): the
    // ring is mapped whole, so 4,096 cost 404 KB resident per core against 104 KB, and bought
    // nothing (BENCHMARKS.md, row 45). A turn that queues more than 1,024 operations submits
    // the full queue and goes on (monoio), and completions beyond the completion ring wait in
    // the kernel's overflow list (IORING_FEAT_NODROP, which every kernel monoio runs on has).
    let build = |urb: io_uring::Builder| {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .with_entries(1024)
            .uring_builder(urb)
            .enable_timer()
            .build()
    };
    for (name, flags) in uring_flags() {
        let mut urb = io_uring::IoUring::builder();
        flags(&mut urb);
        match build(urb) {
            Ok(rt) => {
                log::debug!("core {core}: io_uring set up with {name}");
                return Ok(rt);
            }
            Err(e) => log::debug!("core {core}: io_uring with {name} refused ({e})"),
        }
    }
    build(io_uring::IoUring::builder())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_start_failures_name_the_core_and_the_cause() {
        assert_eq!(
            CoreError::NoIoUring { core: 1 }.to_string(),
            "core 1: io_driver is io_uring, but this thread's io_uring setup failed"
        );
        let e = CoreError::Listener {
            core: 0,
            error: std::io::Error::other("bad fd"),
        };
        assert_eq!(e.to_string(), "core 0: listener: bad fd");
        // The errno is printed by name, as monoio's error debug-prints it. A CPU beyond any
        // CPU set fails before anything is pinned.
        let Err(error) = monoio::utils::bind_to_cpu_set([usize::MAX]) else {
            panic!("CPU usize::MAX was accepted");
        };
        let e = CoreError::Pin {
            core: 2,
            cpu: 7,
            error: Box::new(error),
        };
        assert_eq!(e.to_string(), "core 2: pinning to CPU 7: EINVAL");
    }
}
