//! DNS discovery for `discover: dns` backend entries: each entry's host name is resolved (every
//! A/AAAA record) and every address becomes a backend. Runs on the control-plane thread (blocking
//! lookups never touch a core).
//!
//! A failed or empty resolution is not an outage: the last good set is kept (warning log,
//! `llmproxy_discovery_updates_total{result="error"|"empty"}`) until it is older than
//! `discovery.stale_after`, then dropped (`result="expired"`). An entry that never resolved has
//! no backends, which is not fatal: it is tried again every interval.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::config::{self, Config};
use crate::control::dns::DnsError;
use crate::telemetry::metrics::Metrics;

/// Bound on one lookup (per record type with a custom resolver).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Why an entry's name did not resolve. Logged after the entry's URL; the text carries the
/// cause, so no `source()` repeats it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ResolveError {
    /// Through `discovery.resolver`.
    #[error(transparent)]
    Dns(#[from] DnsError),
    /// Through the system resolver.
    #[error("cannot resolve {host}: {error}")]
    System { host: String, error: std::io::Error },
}

/// One discovered entry's known addresses.
#[derive(Debug, Clone, PartialEq)]
struct Tracked {
    host: String,
    port: u16,
    /// Sorted, deduplicated.
    addrs: Vec<SocketAddr>,
    /// When `addrs` last came from a good, non-empty answer.
    good_at: Option<Instant>,
}

/// What one resolution did to an entry.
#[derive(Debug)]
pub(crate) enum Outcome {
    Changed,
    Unchanged,
    /// Resolution failed; the last good set is kept.
    Error(ResolveError),
    /// No address in the answer; the last good set is kept.
    Empty,
    /// Failing or empty for longer than `stale_after`: the set was dropped.
    Expired,
}

impl Outcome {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Outcome::Changed => "changed",
            Outcome::Unchanged => "unchanged",
            Outcome::Error(_) => "error",
            Outcome::Empty => "empty",
            Outcome::Expired => "expired",
        }
    }
}

/// Applies one resolution result to an entry's set.
fn update(
    t: &mut Tracked,
    result: Result<Vec<SocketAddr>, ResolveError>,
    now: Instant,
    stale_after: Duration,
) -> Outcome {
    let failed = match result {
        Ok(mut addrs) if !addrs.is_empty() => {
            addrs.sort();
            addrs.dedup();
            t.good_at = Some(now);
            if addrs == t.addrs {
                return Outcome::Unchanged;
            }
            t.addrs = addrs;
            return Outcome::Changed;
        }
        Ok(_) => Outcome::Empty,
        Err(e) => Outcome::Error(e),
    };
    let stale = t
        .good_at
        .is_some_and(|at| now.duration_since(at) > stale_after);
    if stale && !t.addrs.is_empty() {
        t.addrs.clear();
        return Outcome::Expired;
    }
    failed
}

pub(crate) struct Discovery {
    settings: config::Discovery,
    /// By the entry's normalised URL.
    entries: HashMap<String, Tracked>,
}

impl Discovery {
    pub(crate) fn new(cfg: &Config) -> Discovery {
        let mut d = Discovery {
            settings: cfg.discovery.clone(),
            entries: HashMap::new(),
        };
        d.configure(cfg);
        d
    }

    /// Follows a (re)loaded config: entries that stay keep their addresses; returns the URLs of
    /// entries not tracked before (to be resolved at once).
    pub(crate) fn configure(&mut self, cfg: &Config) -> Vec<String> {
        self.settings = cfg.discovery.clone();
        let mut added = Vec::new();
        let mut next = HashMap::new();
        for b in cfg.backends.iter().filter(|b| b.discover.is_some()) {
            let t = match self.entries.remove(&b.url) {
                Some(t) if t.host == b.host && t.port == b.port => t,
                _ => {
                    added.push(b.url.clone());
                    Tracked {
                        host: b.host.clone(),
                        port: b.port,
                        addrs: Vec::new(),
                        good_at: None,
                    }
                }
            };
            next.insert(b.url.clone(), t);
        }
        self.entries = next;
        added
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn interval(&self) -> Duration {
        self.settings.interval
    }

    /// Resolves every entry (or only those in `only`); returns whether any set changed.
    pub(crate) fn resolve(&mut self, only: Option<&[String]>, metrics: &Metrics) -> bool {
        let mut changed = false;
        let now = Instant::now;
        let resolver = self.settings.resolver;
        let stale_after = self.settings.stale_after;
        for (url, t) in self.entries.iter_mut() {
            if only.is_some_and(|o| !o.contains(url)) {
                continue;
            }
            let result = lookup(resolver, &t.host, t.port);
            let outcome = update(t, result, now(), stale_after);
            metrics
                .discovery_updates
                .with_label_values(&[outcome.label()])
                .inc();
            let kept = t.addrs.len();
            match &outcome {
                Outcome::Changed => {
                    log::info!("discovery: {url} resolved to {kept} addresses: {:?}", t.addrs);
                    changed = true;
                }
                Outcome::Unchanged => {}
                Outcome::Error(why) => log::warn!(
                    "discovery: {url}: {why}; keeping the last {kept} addresses (up to discovery.stale_after {stale_after:?})"
                ),
                Outcome::Empty => log::warn!(
                    "discovery: {url}: no addresses in the answer; keeping the last {kept} (up to discovery.stale_after {stale_after:?})"
                ),
                Outcome::Expired => {
                    log::error!(
                        "discovery: {url}: no good answer for longer than discovery.stale_after ({stale_after:?}); its backends are removed"
                    );
                    changed = true;
                }
            }
        }
        changed
    }

    /// The current address set of every entry, by URL.
    pub(crate) fn sets(&self) -> HashMap<String, Vec<SocketAddr>> {
        self.entries
            .iter()
            .map(|(url, t)| (url.clone(), t.addrs.clone()))
            .collect()
    }
}

/// Every address of `host`, with `port`: through `resolver` (UDP) if set, else the system
/// resolver (which also reads /etc/hosts and applies the search domains).
fn lookup(
    resolver: Option<SocketAddr>,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, ResolveError> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    match resolver {
        Some(server) => {
            let ips = crate::control::dns::lookup(server, host, LOOKUP_TIMEOUT)?;
            Ok(ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect())
        }
        None => (host, port)
            .to_socket_addrs()
            .map(Iterator::collect)
            .map_err(|error| ResolveError::System {
                host: host.to_string(),
                error,
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked() -> Tracked {
        Tracked {
            host: "vllm".into(),
            port: 8000,
            addrs: Vec::new(),
            good_at: None,
        }
    }

    fn addrs(last: &[u8]) -> Vec<SocketAddr> {
        last.iter()
            .map(|&l| SocketAddr::from(([10, 0, 0, l], 8000)))
            .collect()
    }

    /// A failed lookup as the custom resolver reports it.
    fn down() -> ResolveError {
        ResolveError::Dns(DnsError::Timeout {
            server: SocketAddr::from(([10, 0, 0, 53], 53)),
            after: Duration::from_secs(2),
        })
    }

    #[test]
    fn answers_replace_the_set_and_failures_keep_it_until_stale() {
        let stale = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut t = tracked();
        let outcome = |t: &mut Tracked, r, at| update(t, r, at, stale).label();
        assert_eq!(outcome(&mut t, Err(down()), t0), "error");
        assert_eq!(outcome(&mut t, Ok(addrs(&[2, 1, 2])), t0), "changed");
        assert_eq!(t.addrs, addrs(&[1, 2]));
        assert_eq!(outcome(&mut t, Ok(addrs(&[1, 2])), t0), "unchanged");
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(outcome(&mut t, Ok(vec![]), t1), "empty");
        assert_eq!(outcome(&mut t, Err(down()), t1), "error");
        assert_eq!(t.addrs, addrs(&[1, 2]));
        let t2 = t0 + Duration::from_secs(61);
        assert_eq!(outcome(&mut t, Err(down()), t2), "expired");
        assert!(t.addrs.is_empty());
        assert_eq!(outcome(&mut t, Err(down()), t2), "error");
        assert_eq!(outcome(&mut t, Ok(addrs(&[3])), t2), "changed");
        assert_eq!(t.addrs, addrs(&[3]));
    }

    #[test]
    fn resolve_errors_read_as_before() {
        assert_eq!(
            down().to_string(),
            "resolver 10.0.0.53:53: no answer within 2s"
        );
        let bad = ResolveError::from(DnsError::BadAnswer {
            server: SocketAddr::from(([10, 0, 0, 53], 53)),
            why: crate::control::dns::BadAnswer::Rcode(2),
        });
        assert_eq!(
            bad.to_string(),
            "resolver 10.0.0.53:53: server answered rcode 2"
        );
        let system = ResolveError::System {
            host: "vllm.svc".into(),
            error: std::io::Error::other("failed to lookup address information"),
        };
        assert_eq!(
            system.to_string(),
            "cannot resolve vllm.svc: failed to lookup address information"
        );
        let invalid = lookup(Some(SocketAddr::from(([127, 0, 0, 1], 9))), "a..b", 80);
        assert!(matches!(
            invalid,
            Err(ResolveError::Dns(DnsError::InvalidName(_)))
        ));
    }

    #[test]
    fn configure_keeps_entries_that_stay() {
        let yaml = |entries: &str| Config::from_yaml_str(&format!("backends:\n{entries}")).unwrap();
        let a = "  - { url: \"http://a.svc:8000\", discover: dns }\n";
        let b = "  - { url: \"http://b.svc:8000\", discover: dns }\n";
        let s = "  - { url: \"http://127.0.0.1:9\" }\n";
        let mut d = Discovery::new(&yaml(&format!("{a}{s}")));
        assert_eq!(d.sets().len(), 1);
        d.entries.get_mut("http://a.svc:8000").unwrap().addrs = addrs(&[1]);
        assert_eq!(
            d.configure(&yaml(&format!("{a}{b}"))),
            vec!["http://b.svc:8000"]
        );
        assert_eq!(d.sets()["http://a.svc:8000"], addrs(&[1]));
        d.configure(&yaml(b));
        assert_eq!(d.sets().len(), 1);
        assert!(!d.is_empty());
    }

    #[test]
    fn ip_literals_need_no_lookup() {
        assert_eq!(
            lookup(None, "10.0.0.9", 80).unwrap(),
            vec![SocketAddr::from(([10, 0, 0, 9], 80))]
        );
    }
}
