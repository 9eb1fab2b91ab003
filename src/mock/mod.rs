//! A simulated OpenAI-compatible (and TGI-compatible) inference backend on monoio.
//!
//! It backs `llmproxy demo`, the integration tests and the benchmarks: it speaks HTTP/1.1 with
//! keep-alive, answers `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, TGI's
//! `/generate` and `/generate_stream`, `/v1/models`, `/health` and a vLLM-style `/metrics`, and
//! streams Server-Sent Events token by token, each event in its own chunk and its own write.
//! Per-request `x-mock-*` headers inject the failures a proxy must survive (error statuses, resets,
//! stalls, odd framings, garbage instead of HTTP, short keep-alive timeouts); `/mock/stats` and
//! `/mock/control` let tests observe and steer it (health and failure statuses, a reset of every
//! Nth inference request).
//!
//! It is not a model: the text is `tok0 tok1 ...`, token counts are whitespace-separated words,
//! and time is simulated with timers. It must never be deployed in front of real users.
//!
//! The parts, in the order a request meets them: `server` (listener, per-runtime state) →
//! `conn` (connection loop, request reading, peer watch) → `hooks` (the `x-mock-*` faults) →
//! `route` (which answer) → `generation` with its dialects `openai` and `tgi`, or `control`
//! (stats and steering) and `metrics` → `answer` (writing it, stream pacing) over `wire`
//! (response framing, written with the proxy's own `crate::http1`).
//!
//! Invariants: one single-threaded runtime per mock (per-thread state in `Rc`/`Cell`, counters
//! shared with the caller in `Arc<MockStats>` atomics); nothing in here panics on client input or
//! socket failures; while a request is being served the read half is watched, so a client that
//! goes away is counted in `disconnects` at once and its request abandoned.

mod answer;
mod conn;
mod control;
mod exchange;
mod generation;
mod hooks;
mod json;
mod metrics;
mod openai;
mod route;
mod server;
mod state;
mod tgi;
mod wire;

use std::{
    io::{self, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{atomic::AtomicU64, Arc},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;

/// How the mock behaves when a request does not say otherwise.
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Address to bind (default 127.0.0.1).
    pub host: IpAddr,
    /// Port to bind; 0 picks an ephemeral port.
    pub port: u16,
    /// Delay before the first token.
    pub ttft: Duration,
    /// Delay between tokens.
    pub token_delay: Duration,
    /// A stream with no delays leaves in one write (head, every event, the last chunk) instead
    /// of one write per event: what a proxy meets when a fast engine's events all arrived before
    /// it read (the benchmark's W5), so its per-event work is not hidden behind one read and
    /// one write per event.
    pub burst: bool,
    /// Completion tokens when the request has no `max_tokens`.
    pub tokens: u32,
    /// Model id reported by `/v1/models` and used when a request names none.
    pub model: String,
    /// What `/metrics` reports (changeable at run time through `/mock/control`).
    pub engine: EngineKnobs,
}

/// The vLLM-style gauges `/metrics` serves, and whether it answers at all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineKnobs {
    /// `vllm:num_requests_waiting`.
    pub waiting: f64,
    /// `vllm:num_requests_running`; `None` reports the requests being served right now.
    pub running: Option<f64>,
    /// `vllm:kv_cache_usage_perc` (0-1).
    pub kv_usage: f64,
    /// `/metrics` never answers (the connection stays open, silent).
    pub hang: bool,
    /// The engine's batch (vLLM's `max_num_seqs`): at most this many generations at once, the
    /// rest wait first come first served before their time to first token starts, and count in
    /// `waiting` and not in `running`. 0 = no limit.
    pub max_running: f64,
}

impl Default for EngineKnobs {
    fn default() -> Self {
        EngineKnobs {
            waiting: 0.0,
            running: None,
            kv_usage: 0.0,
            hang: false,
            max_running: 0.0,
        }
    }
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            ttft: Duration::ZERO,
            token_delay: Duration::ZERO,
            burst: false,
            tokens: 16,
            model: "mock-model".to_string(),
            engine: EngineKnobs::default(),
        }
    }
}

/// Counters shared with whoever started the mock (tests read them directly).
#[derive(Default, Debug)]
pub struct MockStats {
    /// Inference requests received (chat, completions, embeddings, TGI), whatever their outcome.
    pub requests: AtomicU64,
    /// Inference requests being served right now.
    pub active: AtomicU64,
    /// Responses abandoned because the client went away (EOF, read error or failed write).
    pub disconnects: AtomicU64,
    /// Wall-clock time (ms since the Unix epoch) of the last disconnect; 0 if none.
    pub last_disconnect_unix_ms: AtomicU64,
    /// Inference responses written completely (error answers included).
    pub completed: AtomicU64,
    /// TCP connections accepted (shows whether a client reuses keep-alive connections).
    pub connections: AtomicU64,
}

/// A mock running on its own thread (it lives until the process exits).
#[derive(Debug, Clone)]
pub struct MockHandle {
    pub addr: SocketAddr,
    pub stats: Arc<MockStats>,
}

/// Bind, print exactly one line `mock-backend listening on ADDR` to stdout (flushed), then serve
/// forever on a single-threaded monoio runtime. Returns only on a bind/runtime error.
pub fn run(opts: MockOptions) -> anyhow::Result<()> {
    let bind = SocketAddr::new(opts.host, opts.port);
    server::serve(opts, Arc::new(MockStats::default()), |addr| {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "mock-backend listening on {addr}");
        let _ = out.flush();
    })
    .with_context(|| format!("mock backend on {bind}"))
}

/// Start the mock on its own OS thread and return once it is bound.
pub fn spawn(opts: MockOptions) -> io::Result<MockHandle> {
    let stats = Arc::new(MockStats::default());
    let (tx, rx) = std::sync::mpsc::channel::<io::Result<SocketAddr>>();
    let thread_stats = stats.clone();
    std::thread::Builder::new()
        .name("mock-backend".to_string())
        .spawn(move || {
            let bound = tx.clone();
            if let Err(e) = server::serve(opts, thread_stats, move |addr| {
                let _ = bound.send(Ok(addr));
            }) {
                let _ = tx.send(Err(e));
            }
        })?;
    match rx.recv() {
        Ok(Ok(addr)) => Ok(MockHandle { addr, stats }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::other(
            "mock backend thread exited before binding",
        )),
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
