//! The scraper: one blocking thread per backend (so a backend whose `/metrics` hangs delays
//! nobody else) fetches `metrics_path` every `routing.metrics_interval` with ureq and broadcasts
//! the reading to every core. A failed or unreadable scrape sends nothing: the last reading ages
//! out on the cores after `routing.metrics_stale_after`, which is what makes them fall back to
//! in-flight counts.

use std::io::Read as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{prom, Reading};
use crate::config::{Backend, Config};
use crate::control::{Broadcast, ControlMsg};
use crate::metrics::Metrics;

/// Bodies beyond this are cut (vLLM's histograms make a few hundred KiB at most).
const MAX_BODY: u64 = 4 << 20;

/// Starts the scrapers if any strategy in use reads engine load; returns how many started.
pub fn spawn(
    cfg: &Arc<Config>,
    broadcast: &Broadcast,
    metrics: &Arc<Metrics>,
    stop: &Arc<AtomicBool>,
) -> std::io::Result<usize> {
    if !cfg.uses_engine_load() {
        return Ok(0);
    }
    for (i, b) in cfg.backends.iter().enumerate() {
        let (cfg, broadcast, metrics, stop) = (
            cfg.clone(),
            broadcast.clone(),
            metrics.clone(),
            stop.clone(),
        );
        let url = format!("{}{}", b.url, b.metrics_path);
        std::thread::Builder::new()
            .name(format!("llmproxy-scrape-{i}"))
            .spawn(move || run(i, &url, &cfg, &broadcast, &metrics, &stop))?;
    }
    Ok(cfg.backends.len())
}

fn run(
    backend: usize,
    url: &str,
    cfg: &Config,
    broadcast: &Broadcast,
    metrics: &Metrics,
    stop: &AtomicBool,
) {
    let r = &cfg.routing;
    // A scrape slower than half the staleness bound is as good as none.
    let timeout = (r.metrics_stale_after / 2).max(Duration::from_millis(50));
    let agent = ureq::AgentBuilder::new()
        .timeout(timeout)
        .redirects(0)
        .build();
    let name = cfg.backends.get(backend).map_or("", |b: &Backend| &b.url);
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        match fetch(&agent, url) {
            Ok(load) => {
                if failing {
                    log::info!("backend {name}: engine metrics readable again");
                    failing = false;
                }
                metrics.routing.engine_reading(backend, Some(&load));
                let reading = Reading { load, at: started };
                broadcast.send_all(&ControlMsg::Engine { backend, reading });
            }
            Err(why) => {
                if !failing {
                    log::warn!("backend {name}: engine metrics from {url} unusable: {why}");
                    failing = true;
                }
                metrics.routing.engine_reading(backend, None);
            }
        }
        let next = started + r.metrics_interval;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= next {
                break;
            }
            std::thread::sleep((next - now).min(Duration::from_millis(100)));
        }
    }
}

fn fetch(agent: &ureq::Agent, url: &str) -> Result<super::EngineLoad, String> {
    let resp = agent.get(url).call().map_err(|e| e.to_string())?;
    let mut text = String::new();
    resp.into_reader()
        .take(MAX_BODY)
        .read_to_string(&mut text)
        .map_err(|e| format!("reading body: {e}"))?;
    prom::engine_load(&text).ok_or_else(|| "no known engine gauges".to_string())
}
