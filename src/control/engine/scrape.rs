//! The scraper: one blocking thread per backend (so a backend whose `/metrics` hangs delays
//! nobody else) fetches `metrics_path` every `routing.metrics_interval` with ureq and broadcasts
//! the reading to every core. A failed or unreadable scrape sends nothing: the last reading ages
//! out on the cores after `routing.metrics_stale_after`, which is what makes them fall back to
//! in-flight counts.
//!
//! A manager thread follows the backend table (sent by the control plane on every change, like
//! to the health thread): a backend that joins (discovery, reload) gets a scraper, one that
//! leaves or starts draining has its scraper stopped, and a reload that changes the routing
//! settings restarts them. Scrapers are keyed by backend id and every reading carries the id,
//! so a reading about a backend that has since left its slot is dropped by the cores.
//!
//! Under `limits.saturation: engine_queue` a reading also renews the backend's engine-queue cap
//! (`crate::gate`) in the process-wide capacity table, here and not on the cores: the cap is
//! one value per backend, and this thread is its one writer.

use std::collections::HashMap;
use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::{prom, Reading};
use crate::backends::{BackendTable, Entry, State};
use crate::capacity::Capacity;
use crate::control::{Broadcast, ControlMsg};
use crate::telemetry::metrics::Metrics;

/// Bodies beyond this are cut (vLLM's histograms make a few hundred KiB at most).
const MAX_BODY: u64 = 4 << 20;
/// Longest sleep between checks of the stop flags.
const MAX_WAIT: Duration = Duration::from_millis(100);

/// Why a scrape gave no reading. Logged after the URL ("unusable: ..."); the text carries the
/// cause, so no `source()` repeats it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ScrapeError {
    /// Worded as ureq words it (`<url>: status code <n>`; redirects are off, so it never adds a
    /// "redirected from"), as the log always showed it.
    #[error("{url}: status code {code}")]
    Status { url: String, code: u16 },
    #[error("{0}")]
    Transport(Box<ureq::Transport>),
    #[error("reading body: {0}")]
    Body(std::io::Error),
    /// The page parsed, but holds none of the gauges `prom` knows (not vLLM, SGLang or TGI).
    #[error("no known engine gauges")]
    NoGauges,
}

/// Everything one backend's scraper works with; a change restarts it.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    slot: usize,
    id: u64,
    addr: SocketAddr,
    /// `base_path` + `metrics_path`.
    path: String,
    authority: String,
    /// `Some` for an https backend.
    tls: Option<crate::tls::ClientTls>,
    /// The `backend` metrics label.
    name: String,
    interval: Duration,
    stale_after: Duration,
}

impl Target {
    fn new(slot: usize, e: &Entry, table: &BackendTable) -> Target {
        let r = &table.config.routing;
        Target {
            slot,
            id: e.id,
            addr: e.spec.addr,
            path: format!("{}{}", e.spec.base_path, e.spec.metrics_path),
            authority: e.spec.authority.clone(),
            tls: e.spec.tls.clone(),
            name: e.spec.name.clone(),
            interval: r.metrics_interval,
            stale_after: r.metrics_stale_after,
        }
    }
}

struct Running {
    target: Target,
    stop: Arc<AtomicBool>,
}

/// Starts the manager thread, which starts a scraper per active backend of `table` (and of
/// every later table) when some strategy in force reads engine load.
pub(crate) fn spawn(
    table: Arc<BackendTable>,
    broadcast: Broadcast,
    metrics: Arc<Metrics>,
    capacity: Arc<Capacity>,
    tables: Receiver<Arc<BackendTable>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("llmproxy-scrape".into())
        .spawn(move || {
            let mut m = Manager {
                broadcast,
                metrics,
                capacity,
                stop,
                running: HashMap::new(),
                version: None,
            };
            m.follow(&table);
            m.run(&tables);
        })
}

struct Manager {
    broadcast: Broadcast,
    metrics: Arc<Metrics>,
    capacity: Arc<Capacity>,
    stop: Arc<AtomicBool>,
    /// By backend id.
    running: HashMap<u64, Running>,
    version: Option<u64>,
}

impl Manager {
    fn run(mut self, tables: &Receiver<Arc<BackendTable>>) {
        while !self.stop.load(Ordering::Relaxed) {
            match tables.recv_timeout(MAX_WAIT * 2) {
                Ok(table) => {
                    // Only the newest of what queued up matters.
                    let table = tables.try_iter().last().unwrap_or(table);
                    self.follow(&table);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(MAX_WAIT),
            }
        }
        for r in self.running.values() {
            r.stop.store(true, Ordering::Relaxed);
        }
    }

    /// Starts, restarts and stops scrapers to match `table` (re-sent copies change nothing).
    fn follow(&mut self, table: &BackendTable) {
        if self.version.is_some_and(|v| v >= table.version) {
            return;
        }
        self.version = Some(table.version);
        let wanted: HashMap<u64, Target> = if table.config.uses_engine_load() {
            table
                .entries()
                .filter(|(_, e)| e.state == State::Active)
                .map(|(slot, e)| (e.id, Target::new(slot, e, table)))
                .collect()
        } else {
            HashMap::new()
        };
        self.running.retain(|id, r| {
            let keep = wanted.get(id) == Some(&r.target);
            if !keep {
                r.stop.store(true, Ordering::Relaxed);
            }
            keep
        });
        for (id, target) in wanted {
            if self.running.contains_key(&id) {
                continue;
            }
            let own = Arc::new(AtomicBool::new(false));
            let scraper = Scraper {
                target: target.clone(),
                broadcast: self.broadcast.clone(),
                metrics: self.metrics.clone(),
                capacity: self.capacity.clone(),
                stop: self.stop.clone(),
                own: own.clone(),
            };
            self.metrics.routing.engine_present(&target.name);
            let started = std::thread::Builder::new()
                .name(format!("llmproxy-scrape-{}", target.slot))
                .spawn(move || scraper.run());
            match started {
                Ok(_) => {
                    self.running.insert(id, Running { target, stop: own });
                }
                // Retried with the next table that differs (or the next restart).
                Err(e) => log::error!("backend {}: cannot start its scraper: {e}", target.name),
            }
        }
    }
}

struct Scraper {
    target: Target,
    broadcast: Broadcast,
    metrics: Arc<Metrics>,
    capacity: Arc<Capacity>,
    /// The process is stopping.
    stop: Arc<AtomicBool>,
    /// This backend left the table (or its settings changed).
    own: Arc<AtomicBool>,
}

impl Scraper {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.own.load(Ordering::Relaxed)
    }

    fn run(self) {
        let t = &self.target;
        // A scrape slower than half the staleness bound is as good as none.
        let timeout = (t.stale_after / 2).max(Duration::from_millis(50));
        let builder = ureq::AgentBuilder::new().timeout(timeout).redirects(0);
        let agent = crate::tls::blocking::agent(builder, t.tls.as_ref(), t.addr);
        let url = crate::tls::blocking::url(t.tls.as_ref(), t.addr, &t.path);
        let mut failing = false;
        while !self.stopped() {
            let started = Instant::now();
            let result = fetch(&agent, &url, &t.authority);
            // A backend that left while the scrape ran must not get its series back.
            if self.stopped() {
                break;
            }
            match result {
                Ok(load) => {
                    if failing {
                        log::info!("backend {}: engine metrics readable again", t.name);
                        failing = false;
                    }
                    self.metrics
                        .routing
                        .engine_reading(&t.name, Some((load.waiting, load.running, load.kv_usage)));
                    self.capacity
                        .engine_reading(t.slot, load.waiting, started, t.stale_after);
                    let reading = Reading { load, at: started };
                    self.broadcast.send_all(&ControlMsg::Engine {
                        backend: t.slot,
                        id: t.id,
                        reading,
                    });
                }
                Err(why) => {
                    if !failing {
                        log::warn!(
                            "backend {}: engine metrics from {url} unusable: {why}",
                            t.name
                        );
                        failing = true;
                    }
                    self.metrics.routing.engine_reading(&t.name, None);
                }
            }
            let next = crate::clock::after(started, t.interval);
            while !self.stopped() {
                let now = Instant::now();
                if now >= next {
                    break;
                }
                std::thread::sleep((next - now).min(MAX_WAIT));
            }
        }
    }
}

fn fetch(agent: &ureq::Agent, url: &str, host: &str) -> Result<super::EngineLoad, ScrapeError> {
    let resp = agent
        .get(url)
        .set("host", host)
        .call()
        .map_err(|e| match e {
            ureq::Error::Status(code, resp) => ScrapeError::Status {
                url: resp.get_url().to_string(),
                code,
            },
            ureq::Error::Transport(t) => ScrapeError::Transport(Box::new(t)),
        })?;
    let mut text = String::new();
    resp.into_reader()
        .take(MAX_BODY)
        .read_to_string(&mut text)
        .map_err(ScrapeError::Body)?;
    prom::engine_load(&text).ok_or(ScrapeError::NoGauges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// A one-shot server per response: answers each connection with the next of `responses`.
    fn serve(responses: &'static [&'static str]) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for r in responses {
                let (mut c, _) = listener.accept().unwrap();
                let mut head = [0u8; 1024];
                let _ = c.read(&mut head);
                let _ = c.write_all(r.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn failed_scrapes_say_why_as_the_log_always_did() {
        let addr = serve(&[
            "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nup 1\n\n",
        ]);
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .redirects(0)
            .build();
        let url = format!("http://{addr}/metrics");
        let e = fetch(&agent, &url, "engine").unwrap_err();
        assert!(matches!(e, ScrapeError::Status { code: 500, .. }), "{e:?}");
        assert_eq!(e.to_string(), format!("{url}: status code 500"));
        let e = fetch(&agent, &url, "engine").unwrap_err();
        assert!(matches!(e, ScrapeError::NoGauges), "{e:?}");
        assert_eq!(e.to_string(), "no known engine gauges");
        // Nobody listens any more: a transport error, worded by ureq.
        let e = fetch(&agent, &url, "engine").unwrap_err();
        assert!(matches!(e, ScrapeError::Transport(_)), "{e:?}");
    }
}
