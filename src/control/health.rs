//! Active health checks on a dedicated blocking thread. Every `interval` each active backend's
//! `health_check.path` is probed (in parallel, each bounded by `timeout`); a backend goes down after
//! `unhealthy_threshold` consecutive failures and up after `healthy_threshold` successes. Cores
//! report connect failures here (passive checks): the backend is marked down at once. The state
//! of every backend is broadcast to every core each round, so a missed message heals itself.
//!
//! The thread follows the backend table (`HealthReport::Table`): a backend added at run time
//! starts down and is probed at once, so it joins as soon as its first check passes rather than
//! a whole interval later; removed backends are forgotten. Settings come from the table's config,
//! so a reload changes them. State is keyed by backend id, never by slot, because slots are
//! reused.
//!
//! It also hosts the circuit breakers (`breaker::Board`): cores report trips and probe results
//! here, cool-downs are timed on this loop, and every breaker's phase is re-broadcast each round.
//! Health and breaker are independent: a backend takes requests only when it is up and its
//! breaker lets them through.

use std::collections::HashMap;
use std::io::Read as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::backends::{BackendTable, Entry, State as BackendState};
use crate::config::HealthCheck;
use crate::control::breakers::Board;
use crate::control::{Broadcast, ControlMsg, HealthReport};
use crate::telemetry::metrics::Metrics;

/// Why a health probe failed. Logged after the backend's URL ("is down: ..."); the text carries
/// the cause, so no `source()` repeats it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeError {
    /// The backend answered, with a status outside 2xx.
    #[error("status {0}")]
    Status(u16),
    /// No answer: connect, timeout, reset or a response that is not HTTP.
    #[error("{0}")]
    Transport(Box<ureq::Transport>),
    /// The probe's thread panicked (a bug, not the backend's fault, but it proves nothing up).
    #[error("probe panicked")]
    Panicked,
}

#[derive(Debug, Clone)]
struct State {
    up: bool,
    successes: u32,
    failures: u32,
}

pub(crate) fn spawn(
    table: Arc<BackendTable>,
    broadcast: Broadcast,
    reports: Receiver<HealthReport>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("llmproxy-health".into())
        .spawn(move || Checker::new(table, broadcast, metrics).run(&reports, &stop))
}

struct Checker {
    table: Arc<BackendTable>,
    broadcast: Broadcast,
    agent: ureq::Agent,
    /// By backend id.
    states: HashMap<u64, State>,
    breakers: Board,
}

fn agent(hc: &HealthCheck) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(hc.timeout)
        .redirects(0)
        .build()
}

impl Checker {
    fn new(table: Arc<BackendTable>, broadcast: Broadcast, metrics: Arc<Metrics>) -> Checker {
        let mut c = Checker {
            agent: agent(&table.config.health_check),
            table: table.clone(),
            broadcast,
            states: HashMap::new(),
            breakers: Board::new(metrics),
        };
        c.follow(table);
        c
    }

    /// Takes a new table; returns the slots of backends it has not seen before.
    fn follow(&mut self, table: Arc<BackendTable>) -> Vec<usize> {
        if table.config.health_check != self.table.config.health_check {
            self.agent = agent(&table.config.health_check);
        }
        let mut new = Vec::new();
        for (slot, e) in table.entries() {
            if let std::collections::hash_map::Entry::Vacant(v) = self.states.entry(e.id) {
                v.insert(State {
                    up: e.up_initially,
                    successes: 0,
                    failures: 0,
                });
                new.push(slot);
            }
        }
        self.states
            .retain(|id, _| table.entries().any(|(_, e)| e.id == *id));
        self.breakers.follow(&table);
        self.table = table;
        new
    }

    /// Probes the given slots' backends (active ones only: a draining backend gets no new
    /// requests, so its health does not matter) and broadcasts their state.
    fn round(&mut self, slots: &[usize]) {
        let hc = self.table.config.health_check.clone();
        let targets: Vec<(usize, &Entry)> = slots
            .iter()
            .filter_map(|&s| self.table.get(s).map(|e| (s, e)))
            .filter(|(_, e)| e.state == BackendState::Active)
            .collect();
        let results = probe_all(&self.agent, &targets, &hc.path, hc.timeout);
        for ((slot, e), ok) in targets.iter().zip(results) {
            let Some(s) = self.states.get_mut(&e.id) else {
                continue;
            };
            let url = &e.spec.url;
            match ok {
                Ok(()) => {
                    s.failures = 0;
                    s.successes += 1;
                    if !s.up && s.successes >= hc.healthy_threshold {
                        s.up = true;
                        log::info!("backend {url} is up");
                    }
                }
                Err(why) => {
                    s.successes = 0;
                    s.failures += 1;
                    if s.up && s.failures >= hc.unhealthy_threshold {
                        s.up = false;
                        log::warn!("backend {url} is down: {why}");
                    } else if s.up {
                        log::info!("backend {url} health probe failed: {why}");
                    }
                }
            }
            self.broadcast.send_all(&ControlMsg::Health {
                backend: *slot,
                id: e.id,
                up: s.up,
            });
        }
    }

    fn unreachable(&mut self, backend: usize, id: u64) {
        let threshold = self.table.config.health_check.unhealthy_threshold;
        let (Some(s), Some(e)) = (self.states.get_mut(&id), self.table.get(backend)) else {
            return;
        };
        if e.id != id {
            return;
        }
        if s.up {
            log::warn!("backend {} is down: connect failed", e.spec.url);
        }
        s.up = false;
        s.successes = 0;
        s.failures = s.failures.max(threshold);
        self.broadcast.send_all(&ControlMsg::Health {
            backend,
            id,
            up: false,
        });
    }

    fn run(mut self, reports: &Receiver<HealthReport>, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let round = Instant::now();
            let all: Vec<usize> = self.table.entries().map(|(s, _)| s).collect();
            self.round(&all);
            self.breakers.resend(&self.table, &self.broadcast);
            // Wait for the next round, handling passive reports and new tables as they come.
            let next = round + self.table.config.health_check.interval;
            loop {
                let now = Instant::now();
                self.breakers.tick(&self.table, &self.broadcast);
                if now >= next || stop.load(Ordering::Relaxed) {
                    break;
                }
                match reports.recv_timeout((next - now).min(Duration::from_millis(200))) {
                    Ok(HealthReport::Unreachable { backend, id }) => self.unreachable(backend, id),
                    Ok(HealthReport::Breaker {
                        backend,
                        id,
                        report,
                    }) => {
                        let table = &self.table;
                        self.breakers
                            .report(table, backend, id, report, &self.broadcast)
                    }
                    Ok(HealthReport::Table(table)) => {
                        let new = self.follow(table);
                        if !new.is_empty() {
                            self.round(&new);
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
}

fn probe_all(
    agent: &ureq::Agent,
    backends: &[(usize, &Entry)],
    path: &str,
    timeout: std::time::Duration,
) -> Vec<Result<(), ProbeError>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = backends
            .iter()
            .map(|(_, e)| scope.spawn(move || probe(agent, e, path, timeout)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(ProbeError::Panicked)))
            .collect()
    })
}

fn probe(
    agent: &ureq::Agent,
    backend: &Entry,
    path: &str,
    timeout: std::time::Duration,
) -> Result<(), ProbeError> {
    let spec = &backend.spec;
    let path = format!("{}{}", spec.base_path, path);
    let url = crate::tls::blocking::url(spec.tls.as_ref(), spec.addr, &path);
    // An https backend gets an agent with its own TLS settings, pinned to its address (the
    // shared agent's pool is keyed by host, which for TLS is the server name, not the address).
    let own;
    let agent = match &spec.tls {
        None => agent,
        Some(tls) => {
            let builder = ureq::AgentBuilder::new().timeout(timeout).redirects(0);
            own = crate::tls::blocking::agent(builder, Some(tls), spec.addr);
            &own
        }
    };
    match agent.get(&url).set("host", &backend.spec.authority).call() {
        Ok(resp) if (200..300).contains(&resp.status()) => {
            // Drain so the agent can reuse the connection next round.
            let _ = std::io::copy(
                &mut resp.into_reader().take(64 * 1024),
                &mut std::io::sink(),
            );
            Ok(())
        }
        Ok(resp) => Err(ProbeError::Status(resp.status())),
        Err(ureq::Error::Status(code, _)) => Err(ProbeError::Status(code)),
        Err(ureq::Error::Transport(t)) => Err(ProbeError::Transport(Box::new(t))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_failures_read_as_before() {
        assert_eq!(ProbeError::Status(503).to_string(), "status 503");
        assert_eq!(ProbeError::Panicked.to_string(), "probe panicked");
        // A transport error reads exactly as ureq's own error does.
        let refused = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .build()
            .get("http://127.0.0.1:1/health")
            .call()
            .unwrap_err();
        let words = refused.to_string();
        let ureq::Error::Transport(t) = refused else {
            panic!("not a transport error: {words}");
        };
        assert_eq!(ProbeError::Transport(Box::new(t)).to_string(), words);
    }
}
