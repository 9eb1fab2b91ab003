//! Active health checks on a dedicated blocking thread. Every `interval` each backend's
//! `health_check.path` is probed (in parallel, each bounded by `timeout`); a backend goes down after
//! `unhealthy_threshold` consecutive failures and up after `healthy_threshold` successes. Cores
//! report connect failures here (passive checks): the backend is marked down at once. The state
//! of every backend is broadcast to every core each round, so a missed message heals itself.

use std::io::Read as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::config::{Backend, Config};
use crate::control::{Broadcast, ControlMsg, HealthReport};

#[derive(Debug, Clone)]
struct State {
    up: bool,
    successes: u32,
    failures: u32,
}

pub fn spawn(
    cfg: Arc<Config>,
    broadcast: Broadcast,
    reports: Receiver<HealthReport>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("llmproxy-health".into())
        .spawn(move || run(&cfg, &broadcast, &reports, &stop))
}

fn run(cfg: &Config, broadcast: &Broadcast, reports: &Receiver<HealthReport>, stop: &AtomicBool) {
    let hc = &cfg.health_check;
    let agent = ureq::AgentBuilder::new()
        .timeout(hc.timeout)
        .redirects(0)
        .build();
    let mut states: Vec<State> = cfg
        .backends
        .iter()
        .map(|_| State {
            up: true,
            successes: 0,
            failures: 0,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        let round = Instant::now();
        let results = probe_all(&agent, &cfg.backends, &hc.path);
        for (i, (b, ok)) in cfg.backends.iter().zip(results).enumerate() {
            let s = &mut states[i];
            match ok {
                Ok(()) => {
                    s.failures = 0;
                    s.successes += 1;
                    if !s.up && s.successes >= hc.healthy_threshold {
                        s.up = true;
                        log::info!("backend {} is up", b.url);
                    }
                }
                Err(why) => {
                    s.successes = 0;
                    s.failures += 1;
                    if s.up && s.failures >= hc.unhealthy_threshold {
                        s.up = false;
                        log::warn!("backend {} is down: {why}", b.url);
                    } else if s.up {
                        log::info!("backend {} health probe failed: {why}", b.url);
                    }
                }
            }
            broadcast.send_all(&ControlMsg::Health {
                backend: i,
                up: s.up,
            });
        }
        // Wait for the next round, handling passive reports as they come.
        let next = round + hc.interval;
        loop {
            let now = Instant::now();
            if now >= next || stop.load(Ordering::Relaxed) {
                break;
            }
            match reports.recv_timeout((next - now).min(Duration::from_millis(200))) {
                Ok(HealthReport::Unreachable { backend }) => {
                    if let (Some(s), Some(b)) = (states.get_mut(backend), cfg.backends.get(backend))
                    {
                        if s.up {
                            log::warn!("backend {} is down: connect failed", b.url);
                        }
                        s.up = false;
                        s.successes = 0;
                        s.failures = s.failures.max(hc.unhealthy_threshold);
                        broadcast.send_all(&ControlMsg::Health { backend, up: false });
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep((next - now).min(Duration::from_millis(200)))
                }
            }
        }
    }
}

fn probe_all(agent: &ureq::Agent, backends: &[Backend], path: &str) -> Vec<Result<(), String>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = backends
            .iter()
            .map(|b| scope.spawn(move || probe(agent, b, path)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("probe panicked".into())))
            .collect()
    })
}

fn probe(agent: &ureq::Agent, backend: &Backend, path: &str) -> Result<(), String> {
    let url = format!("{}{}", backend.url, path);
    match agent.get(&url).call() {
        Ok(resp) if (200..300).contains(&resp.status()) => {
            // Drain so the agent can reuse the connection next round.
            let _ = std::io::copy(
                &mut resp.into_reader().take(64 * 1024),
                &mut std::io::sink(),
            );
            Ok(())
        }
        Ok(resp) => Err(format!("status {}", resp.status())),
        Err(ureq::Error::Status(code, _)) => Err(format!("status {code}")),
        Err(e) => Err(e.to_string()),
    }
}
