//! Prometheus metrics. The registry is process-wide; each core records into its own local
//! counters and histograms and folds them into the shared ones on its tick, so the request path
//! touches no shared cache line. Label values come only from config (backend URLs, configured
//! model names), never from raw client input, so cardinality is bounded.

use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use prometheus::local::LocalHistogram;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use super::buckets::SECONDS_BUCKETS;
pub(crate) use super::queue::QueueMetrics;
use crate::config::Config;

/// Model label for a model no backend is configured for.
pub(crate) const OTHER: &str = "other";
/// Backend/model label when there was none (answered locally, or no `model` in the body).
pub(crate) const NONE: &str = "none";

pub struct Metrics {
    pub(crate) registry: Registry,
    requests_total: IntCounterVec,
    latency_ms: HistogramVec,
    duration_seconds: HistogramVec,
    retries_total: IntCounterVec,
    backend_up: IntGaugeVec,
    backend_inflight: IntGaugeVec,
    pub(crate) connections_active: IntGauge,
    pub(crate) requests_inflight: IntGauge,
    /// Requests waiting for a backend below its `max_inflight`.
    pub(crate) requests_queued: IntGauge,
    ttft_seconds: HistogramVec,
    itl_seconds: HistogramVec,
    tokens_total: IntCounterVec,
    /// Upstream failures by backend and kind (the error code: upstream_connect_error, ...).
    pub(crate) upstream_errors: IntCounterVec,
    /// Usage events by what happened to them (delivered, retried, spooled, dead_lettered, dropped).
    pub usage_events: IntCounterVec,
    /// Requests and connections refused by auth, rates and capacity (`llmproxy_rejected_total`).
    pub(crate) rejected: crate::telemetry::reject::Rejections,
    pub(crate) usage_spool_bytes: IntGauge,
    /// Log lines the writer thread could not take (`logging`), read at each scrape.
    log_lines_dropped: prometheus::IntCounter,
    pub(crate) usage_delivery_seconds: Histogram,
    /// DNS discovery rounds by result: changed, unchanged, error, empty, expired.
    pub(crate) discovery_updates: IntCounterVec,
    breaker_state: IntGaugeVec,
    breaker_transitions: IntCounterVec,
    /// TLS handshakes by side (`client`, `backend`) and result.
    tls_handshakes: IntCounterVec,
    /// notAfter of each certificate the proxy presents, in seconds since the epoch.
    tls_cert_expiry: IntGaugeVec,
    /// Models configured at start (label values until a core learns the current set).
    pub(crate) models: Vec<String>,
    pub(crate) routing: RoutingMetrics,
    /// `Some` with `ratelimit.store: redis`.
    pub(crate) ratelimit_store: Option<super::ratestore::RateStoreMetrics>,
    /// The wait for a backend slot by class (`limits.scheduling`).
    pub(crate) queue: QueueMetrics,
}

impl Metrics {
    pub fn new(cfg: &Config, workers: usize, driver: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests_total = IntCounterVec::new(
            Opts::new("llmproxy_requests_total", "Requests answered, by status"),
            &["status", "backend", "model"],
        )?;
        let ms_buckets: Vec<f64> = SECONDS_BUCKETS.iter().map(|s| s * 1000.0).collect();
        let latency_ms = HistogramVec::new(
            HistogramOpts::new("llmproxy_latency_ms", "Request latency in milliseconds")
                .buckets(ms_buckets),
            &["backend", "model"],
        )?;
        let duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "llmproxy_request_duration_seconds",
                "Request duration from head received to last byte sent",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
            &["backend", "model"],
        )?;
        let retries_total = IntCounterVec::new(
            Opts::new(
                "llmproxy_upstream_retries_total",
                "Attempts that failed before the client saw a byte and were retried",
            ),
            &["backend"],
        )?;
        let backend_up = IntGaugeVec::new(
            Opts::new("llmproxy_backend_up", "1 when the backend is healthy"),
            &["backend"],
        )?;
        let backend_inflight = IntGaugeVec::new(
            Opts::new(
                "llmproxy_backend_inflight",
                "In-flight requests per backend across all cores",
            ),
            &["backend"],
        )?;
        let connections_active =
            IntGauge::new("llmproxy_connections_active", "Open client connections")?;
        let requests_inflight =
            IntGauge::new("llmproxy_requests_inflight", "Requests being processed")?;
        let ttft_seconds = HistogramVec::new(
            HistogramOpts::new(
                "llmproxy_time_to_first_token_seconds",
                "Time from request received to the first response body byte sent (streams)",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
            &["backend", "model"],
        )?;
        let itl_seconds = HistogramVec::new(
            HistogramOpts::new(
                "llmproxy_inter_token_latency_seconds",
                "Gap between consecutive chunks relayed to a streaming client",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
            &["backend", "model"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "llmproxy_upstream_errors_total",
                "Upstream failures by backend and kind",
            ),
            &["backend", "kind"],
        )?;
        let tokens_total = IntCounterVec::new(
            Opts::new("llmproxy_tokens_total", "Tokens reported by backends"),
            &["type", "model"],
        )?;
        let usage_events = IntCounterVec::new(
            Opts::new(
                "llmproxy_usage_events_total",
                "Usage events by outcome: spooled, delivered, retried, dead_lettered, dropped",
            ),
            &["outcome"],
        )?;
        for o in [
            "spooled",
            "delivered",
            "retried",
            "dead_lettered",
            "dropped",
        ] {
            usage_events.with_label_values(&[o]);
        }
        let log_lines_dropped = prometheus::IntCounter::new(
            "llmproxy_log_lines_dropped_total",
            "Log lines dropped because the log writer could not keep up",
        )?;
        registry.register(Box::new(log_lines_dropped.clone()))?;
        let usage_spool_bytes = IntGauge::new(
            "llmproxy_usage_spool_bytes",
            "Bytes of usage events waiting for delivery",
        )?;
        let usage_delivery_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "llmproxy_usage_delivery_seconds",
                "Time to deliver one batch of usage events (successful POSTs)",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
        )?;
        let discovery_updates = IntCounterVec::new(
            Opts::new(
                "llmproxy_discovery_updates_total",
                "DNS discovery resolutions by result: changed, unchanged, error, empty, expired",
            ),
            &["result"],
        )?;
        for r in ["changed", "unchanged", "error", "empty", "expired"] {
            discovery_updates.with_label_values(&[r]);
        }
        let breaker_state = IntGaugeVec::new(
            Opts::new(
                "llmproxy_backend_breaker_state",
                "Circuit breaker per backend: 0 closed, 1 open, 2 half-open",
            ),
            &["backend"],
        )?;
        let breaker_transitions = IntCounterVec::new(
            Opts::new(
                "llmproxy_breaker_transitions_total",
                "Circuit breaker state changes by backend and new state (open, half_open, closed)",
            ),
            &["backend", "to"],
        )?;
        registry.register(Box::new(breaker_state.clone()))?;
        registry.register(Box::new(breaker_transitions.clone()))?;
        let workers_gauge = IntGauge::new("llmproxy_workers", "Worker threads (cores)")?;
        workers_gauge.set(workers as i64);
        let build_info = IntGaugeVec::new(
            Opts::new("llmproxy_build_info", "Build and runtime information"),
            &["version", "driver"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), driver])
            .set(1);
        let rejected = IntCounterVec::new(
            Opts::new(
                "llmproxy_rejected_total",
                "Requests and connections refused by authentication, rate limits and capacity",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(rejected.clone()))?;
        let rejected = crate::telemetry::reject::Rejections::new(&rejected);
        registry.register(Box::new(requests_total.clone()))?;
        registry.register(Box::new(latency_ms.clone()))?;
        registry.register(Box::new(duration_seconds.clone()))?;
        registry.register(Box::new(retries_total.clone()))?;
        registry.register(Box::new(backend_up.clone()))?;
        registry.register(Box::new(backend_inflight.clone()))?;
        registry.register(Box::new(connections_active.clone()))?;
        registry.register(Box::new(requests_inflight.clone()))?;
        let requests_queued = IntGauge::new(
            "llmproxy_requests_queued",
            "Requests waiting for a backend slot (backends[].max_inflight)",
        )?;
        registry.register(Box::new(requests_queued.clone()))?;
        registry.register(Box::new(workers_gauge))?;
        // process_cpu_seconds_total, process_resident_memory_bytes, open fds, ... (Linux).
        registry.register(Box::new(super::process::ProcessCollector::new()?))?;
        registry.register(Box::new(ttft_seconds.clone()))?;
        registry.register(Box::new(itl_seconds.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        registry.register(Box::new(tokens_total.clone()))?;
        registry.register(Box::new(usage_events.clone()))?;
        registry.register(Box::new(usage_spool_bytes.clone()))?;
        registry.register(Box::new(usage_delivery_seconds.clone()))?;
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(discovery_updates.clone()))?;
        let tls_handshakes = IntCounterVec::new(
            Opts::new(
                "llmproxy_tls_handshakes_total",
                "TLS handshakes by side (client: on listen; backend: to https backends) and result \
                 (ok, plaintext, timeout, certificate, error)",
            ),
            &["side", "result"],
        )?;
        registry.register(Box::new(tls_handshakes.clone()))?;
        let tls_cert_expiry = IntGaugeVec::new(
            Opts::new(
                "llmproxy_tls_certificate_expiry_timestamp_seconds",
                "When each certificate the proxy presents expires (notAfter, Unix seconds): \
                 certificate=\"listen\" is the serving one, \"backend:NAME\" a client certificate",
            ),
            &["certificate"],
        )?;
        registry.register(Box::new(tls_cert_expiry.clone()))?;
        let routing = RoutingMetrics::register(&registry)?;
        let ratelimit_store = match cfg.ratelimit.store {
            crate::config::RateStore::Redis => {
                Some(super::ratestore::RateStoreMetrics::register(&registry)?)
            }
            crate::config::RateStore::Local => None,
        };
        let queue = QueueMetrics::register(&registry)?;
        // Discovered backends appear once found; static ones are known now.
        let backends = cfg
            .backends
            .iter()
            .filter(|b| b.discover.is_none())
            .map(|b| b.name.clone().unwrap_or_else(|| b.url.clone()));
        for b in backends {
            backend_up.with_label_values(&[&b]).set(1);
            backend_inflight.with_label_values(&[&b]).set(0);
            routing.engine_present(&b);
            // Present from the start so rate() sees the first increase.
            retries_total.with_label_values(&[&b]);
            upstream_errors.with_label_values(&[&b, "upstream_connect_error"]);
            breaker_state.with_label_values(&[&b]).set(0);
            breaker_transitions.with_label_values(&[&b, "open"]);
        }
        Ok(Metrics {
            registry,
            requests_total,
            latency_ms,
            duration_seconds,
            retries_total,
            backend_up,
            backend_inflight,
            connections_active,
            requests_inflight,
            requests_queued,
            ttft_seconds,
            itl_seconds,
            tokens_total,
            upstream_errors,
            usage_events,
            rejected,
            usage_spool_bytes,
            log_lines_dropped,
            usage_delivery_seconds,
            discovery_updates,
            breaker_state,
            breaker_transitions,
            tls_handshakes,
            tls_cert_expiry,
            models: configured_models(cfg),
            routing,
            ratelimit_store,
            queue,
        })
    }

    /// One TLS handshake ended (`side`: client | backend).
    pub(crate) fn tls_handshake(&self, side: &str, result: &str) {
        self.tls_handshakes.with_label_values(&[side, result]).inc();
    }

    /// Sets the expiry gauges from the configuration in force (startup and every reload).
    pub(crate) fn tls_certificates(&self, cfg: &Config) {
        self.tls_cert_expiry.reset();
        if let Some(t) = &cfg.tls {
            self.tls_cert_expiry
                .with_label_values(&["listen"])
                .set(t.server.expires_unix() as i64);
            for r in ["ok", "plaintext", "timeout", "error"] {
                self.tls_handshakes.with_label_values(&["client", r]);
            }
        }
        for b in &cfg.backends {
            let Some(t) = &b.tls else { continue };
            let name = b.name.clone().unwrap_or_else(|| b.url.clone());
            if let Some(exp) = t.client.expires_unix() {
                self.tls_cert_expiry
                    .with_label_values(&[&format!("backend:{name}")])
                    .set(exp as i64);
            }
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let dropped = super::logging::dropped();
        let seen = self.log_lines_dropped.get();
        if dropped > seen {
            self.log_lines_dropped.inc_by(dropped - seen);
        }
        let mut out = Vec::with_capacity(8 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// A backend left for good: its gauges go, so dashboards do not show it stuck at its last
    /// value. (Counters and histograms keep their series, as Prometheus expects.)
    pub(crate) fn forget_backend(&self, name: &str) {
        let _ = self.backend_up.remove_label_values(&[name]);
        let _ = self.backend_inflight.remove_label_values(&[name]);
        self.forget_breaker(name);
        self.routing.forget(name);
    }

    pub(crate) fn forget_breaker(&self, name: &str) {
        let _ = self.breaker_state.remove_label_values(&[name]);
    }

    /// A backend's breaker is now in `state` (0 closed, 1 open, 2 half-open); `to` names the
    /// transition to count, if it was one.
    pub(crate) fn breaker_changed(&self, backend: &str, state: i64, to: Option<&str>) {
        self.breaker_state.with_label_values(&[backend]).set(state);
        if let Some(to) = to {
            self.breaker_transitions
                .with_label_values(&[backend, to])
                .inc();
        }
    }
}

/// Every model name that appears in some backend's `models` list or names a model pool (or
/// one of its aliases), sorted and deduplicated.
pub(crate) fn configured_models(cfg: &Config) -> Vec<String> {
    let mut models: Vec<String> = cfg
        .backends
        .iter()
        .flat_map(|b| b.models.iter().flatten().cloned())
        .chain(
            cfg.models
                .iter()
                .flat_map(|p| std::iter::once(&p.name).chain(&p.aliases).cloned()),
        )
        .collect();
    models.sort();
    models.dedup();
    models
}

/// Index into `Metrics::models`, `OTHER_IDX` or `NONE_IDX`.
pub(crate) type ModelIdx = u16;
const OTHER_IDX: ModelIdx = u16::MAX;
const NONE_IDX: ModelIdx = u16::MAX - 1;
const NO_BACKEND: u16 = u16::MAX;

struct Histos {
    ms: LocalHistogram,
    seconds: LocalHistogram,
    ttft: LocalHistogram,
    itl: LocalHistogram,
}

/// Token counts by type, in the order of `TOKEN_TYPES`.
const TOKEN_TYPES: [&str; 4] = ["prompt", "completion", "cached", "reasoning"];

/// One core's not-yet-flushed observations. Backends are recorded by slot; the slot → label map
/// follows the backend table, and observations are flushed before it changes, so a reused slot
/// never lends its new label to the previous backend's numbers.
pub struct LocalMetrics {
    global: Arc<Metrics>,
    /// `backend` label by slot ("" = free slot).
    labels: RefCell<Vec<String>>,
    /// Sorted configured models (the `model` label values).
    models: RefCell<Vec<String>>,
    // Keyed by small integers and looked up several times per request: FxHash, because
    // SipHash's DoS resistance buys nothing here and cost ~500 instructions per request.
    requests: RefCell<FxHashMap<(u16, u16, ModelIdx), u64>>,
    latency: RefCell<FxHashMap<(u16, ModelIdx), Histos>>,
    retries: RefCell<Vec<u64>>,
    tokens: RefCell<FxHashMap<ModelIdx, [u64; 4]>>,
}

impl LocalMetrics {
    pub fn new(global: Arc<Metrics>, cfg: &Config) -> Self {
        let labels: Vec<String> = cfg
            .backends
            .iter()
            .map(|b| b.name.clone().unwrap_or_else(|| b.url.clone()))
            .collect();
        LocalMetrics {
            requests: RefCell::new(FxHashMap::default()),
            latency: RefCell::new(FxHashMap::default()),
            retries: RefCell::new(vec![0; labels.len()]),
            tokens: RefCell::new(FxHashMap::default()),
            labels: RefCell::new(labels),
            models: RefCell::new(global.models.clone()),
            global,
        }
    }

    /// The backend table changed: flush everything recorded under the old slot labels, then
    /// take the new ones (`labels[slot]`, "" for a free slot) and the new model list.
    pub(crate) fn set_backends(&self, labels: Vec<String>, models: Vec<String>) {
        // Backend gauges are not published here: under the old labels they would bring back
        // a backend that was just forgotten. The next flush publishes the new ones.
        self.flush(None);
        self.latency.borrow_mut().clear();
        self.retries.borrow_mut().resize(labels.len(), 0);
        *self.labels.borrow_mut() = labels;
        *self.models.borrow_mut() = models;
    }

    fn backend_label(&self, b: Option<usize>) -> String {
        let labels = self.labels.borrow();
        b.and_then(|i| labels.get(i))
            .filter(|l| !l.is_empty())
            .map_or_else(|| NONE.to_string(), String::clone)
    }

    pub fn model_index(&self, model: Option<&str>) -> ModelIdx {
        match model {
            None => NONE_IDX,
            Some(m) => self
                .models
                .borrow()
                .binary_search_by(|x| x.as_str().cmp(m))
                .map_or(OTHER_IDX, |i| i as ModelIdx),
        }
    }

    pub fn request(
        &self,
        status: u16,
        backend: Option<usize>,
        model: ModelIdx,
        elapsed: Duration,
        ttft: Option<Duration>,
    ) {
        let b = backend.map_or(NO_BACKEND, |b| b as u16);
        *self
            .requests
            .borrow_mut()
            .entry((status, b, model))
            .or_insert(0) += 1;
        // Every counted request is in the latency histograms too, answered by a backend or by
        // the proxy itself (`backend="none"`), so their counts agree with requests_total.
        self.with_histos(b, model, |h| {
            let secs = elapsed.as_secs_f64();
            h.ms.observe(secs * 1000.0);
            h.seconds.observe(secs);
            if let Some(t) = ttft {
                h.ttft.observe(t.as_secs_f64());
            }
        });
    }

    /// The gap between two chunks relayed to a streaming client.
    pub(crate) fn inter_token(&self, backend: usize, model: ModelIdx, gap: Duration) {
        self.with_histos(backend as u16, model, |h| h.itl.observe(gap.as_secs_f64()));
    }

    /// The local histograms of one (backend, model) pair, created on first use.
    fn with_histos(&self, backend: u16, model: ModelIdx, f: impl FnOnce(&Histos)) {
        let mut lat = self.latency.borrow_mut();
        let h = lat.entry((backend, model)).or_insert_with(|| {
            let slot = (backend != NO_BACKEND).then_some(usize::from(backend));
            let (backend, model) = (self.backend_label(slot), self.model_label(model));
            let labels = [backend.as_str(), model.as_str()];
            Histos {
                ms: self.global.latency_ms.with_label_values(&labels).local(),
                seconds: self
                    .global
                    .duration_seconds
                    .with_label_values(&labels)
                    .local(),
                ttft: self.global.ttft_seconds.with_label_values(&labels).local(),
                itl: self.global.itl_seconds.with_label_values(&labels).local(),
            }
        });
        f(h);
    }

    pub(crate) fn upstream_error(&self, backend: usize, kind: &str) {
        self.global
            .upstream_errors
            .with_label_values(&[&self.backend_label(Some(backend)), kind])
            .inc();
    }

    /// Tokens of one finished request: prompt, completion, cached, reasoning.
    pub fn tokens(&self, model: ModelIdx, add: [u64; 4]) {
        let mut t = self.tokens.borrow_mut();
        let e = t.entry(model).or_insert([0; 4]);
        // Backends report these: absurd values saturate rather than overflow (a debug panic).
        for (sum, n) in e.iter_mut().zip(add) {
            *sum = sum.saturating_add(n);
        }
    }

    pub(crate) fn retry(&self, backend: usize) {
        if let Some(c) = self.retries.borrow_mut().get_mut(backend) {
            *c += 1;
        }
    }

    fn model_label(&self, m: ModelIdx) -> String {
        match m {
            OTHER_IDX => OTHER.to_string(),
            NONE_IDX => NONE.to_string(),
            i => self
                .models
                .borrow()
                .get(usize::from(i))
                .map_or_else(|| OTHER.to_string(), String::clone),
        }
    }

    /// Folds local observations into the shared registry. With `backends`, also publishes each
    /// backend's gauges from `backends(slot) -> (up, in flight)` (core 0's cross-core view).
    pub(crate) fn flush(&self, backends: Option<&dyn Fn(usize) -> (bool, u32)>) {
        let g = &self.global;
        for ((status, b, m), n) in self.requests.borrow_mut().drain() {
            let backend = if b == NO_BACKEND {
                None
            } else {
                Some(usize::from(b))
            };
            let status = status.to_string();
            g.requests_total
                .with_label_values(&[&status, &self.backend_label(backend), &self.model_label(m)])
                .inc_by(n);
        }
        for h in self.latency.borrow().values() {
            h.ms.flush();
            h.seconds.flush();
            h.ttft.flush();
            h.itl.flush();
        }
        for (m, counts) in self.tokens.borrow_mut().drain() {
            for (kind, n) in TOKEN_TYPES.iter().zip(counts) {
                if n > 0 {
                    g.tokens_total
                        .with_label_values(&[kind, &self.model_label(m)])
                        .inc_by(n);
                }
            }
        }
        for (b, n) in self.retries.borrow_mut().iter_mut().enumerate() {
            if *n > 0 {
                g.retries_total
                    .with_label_values(&[&self.backend_label(Some(b))])
                    .inc_by(*n);
                *n = 0;
            }
        }
        if let Some(backend) = backends {
            for (i, name) in self.labels.borrow().iter().enumerate() {
                if name.is_empty() {
                    continue;
                }
                let (up, in_flight) = backend(i);
                g.backend_up.with_label_values(&[name]).set(i64::from(up));
                g.backend_inflight
                    .with_label_values(&[name])
                    .set(i64::from(in_flight));
            }
        }
    }
}

/// Routing decisions and the engines' own load, re-exported per backend (its `backend` label,
/// as the other backend series; removed with them when the backend leaves the table).
pub(crate) struct RoutingMetrics {
    decisions: IntCounterVec,
    matched_share: Histogram,
    engine_up: IntGaugeVec,
    engine_waiting: prometheus::GaugeVec,
    engine_running: prometheus::GaugeVec,
    engine_kv: prometheus::GaugeVec,
}

impl RoutingMetrics {
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let decisions = IntCounterVec::new(
            Opts::new(
                "llmproxy_routing_decisions_total",
                "Backend picks by strategy and reason (affinity_hit, imbalance_fallback, stale_metrics, ...)",
            ),
            &["strategy", "reason"],
        )?;
        let gauge =
            |name: &str, help: &str| prometheus::GaugeVec::new(Opts::new(name, help), &["backend"]);
        let engine_up = IntGaugeVec::new(
            Opts::new(
                "llmproxy_backend_engine_metrics_up",
                "1 when the backend's engine metrics were read on the last scrape",
            ),
            &["backend"],
        )?;
        let engine_waiting = gauge(
            "llmproxy_backend_engine_waiting",
            "Requests queued inside the backend's engine (last scrape)",
        )?;
        let engine_running = gauge(
            "llmproxy_backend_engine_running",
            "Requests in the backend's running batch (last scrape)",
        )?;
        let engine_kv = gauge(
            "llmproxy_backend_engine_kv_cache_usage_ratio",
            "KV-cache use of the backend's engine, 0-1 (last scrape)",
        )?;
        let matched_share = Histogram::with_opts(
            HistogramOpts::new(
                "llmproxy_prefix_cache_matched_share",
                "prefix_cache picks of a prompt of at least one block, by the share of its blocks \
                 the chosen backend (or engine slot) was thought to hold",
            )
            .buckets(vec![0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]),
        )?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(matched_share.clone()))?;
        registry.register(Box::new(engine_up.clone()))?;
        registry.register(Box::new(engine_waiting.clone()))?;
        registry.register(Box::new(engine_running.clone()))?;
        registry.register(Box::new(engine_kv.clone()))?;
        Ok(RoutingMetrics {
            decisions,
            matched_share,
            engine_up,
            engine_waiting,
            engine_running,
            engine_kv,
        })
    }

    /// Publishes one scrape of the backend labelled `name` (`None`: it failed, or it has not
    /// been scraped yet: the gauges read NaN until a scrape says otherwise).
    /// `load`: requests waiting, requests running, KV-cache use (0..=1) when reported.
    pub(crate) fn engine_reading(&self, name: &str, load: Option<(f64, f64, Option<f64>)>) {
        let labels = [name];
        self.engine_up
            .with_label_values(&labels)
            .set(i64::from(load.is_some()));
        if let Some((waiting, running, kv_usage)) = load {
            self.engine_waiting.with_label_values(&labels).set(waiting);
            self.engine_running.with_label_values(&labels).set(running);
            if let Some(kv) = kv_usage {
                self.engine_kv.with_label_values(&labels).set(kv);
            }
        }
    }

    /// A backend joined: its engine series exist from now on, unknown (NaN) until scraped, so
    /// dashboards and alerts see it before the first scrape.
    /// A core's own copy of `llmproxy_prefix_cache_matched_share`, flushed on its tick.
    pub(crate) fn local_matched_share(&self) -> LocalHistogram {
        self.matched_share.local()
    }

    /// Counts `n` routing decisions of `strategy` for `reason`.
    pub(crate) fn decided(&self, strategy: &str, reason: &str, n: u64) {
        self.decisions
            .with_label_values(&[strategy, reason])
            .inc_by(n);
    }

    pub(crate) fn engine_present(&self, name: &str) {
        self.engine_up.with_label_values(&[name]).set(0);
        for g in [&self.engine_waiting, &self.engine_running, &self.engine_kv] {
            g.with_label_values(&[name]).set(f64::NAN);
        }
    }

    /// A backend left: its engine series go with it.
    pub(crate) fn forget(&self, name: &str) {
        let _ = self.engine_up.remove_label_values(&[name]);
        for g in [&self.engine_waiting, &self.engine_running, &self.engine_kv] {
            let _ = g.remove_label_values(&[name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_token_counts_saturate() {
        let cfg =
            Config::with_backends("127.0.0.1:0".parse().unwrap(), &["http://a:1".into()]).unwrap();
        let local = LocalMetrics::new(Arc::new(Metrics::new(&cfg, 1, "epoll").unwrap()), &cfg);
        let huge = [u64::MAX, u64::MAX, u64::MAX, 0];
        local.tokens(NONE_IDX, huge);
        local.tokens(NONE_IDX, huge);
        assert_eq!(
            local.tokens.borrow()[&NONE_IDX],
            [u64::MAX, u64::MAX, u64::MAX, 0]
        );
    }
}
