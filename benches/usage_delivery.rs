//! Usage delivery throughput (issue 3): how many events per second go from the cores' channel
//! through the usage threads (`Delivery`: intake → spool → batched POSTs) to a webhook, and
//! whether a steady 10,000 events/s is delivered without falling behind.
//!
//! ```sh
//! cargo bench --bench usage_delivery
//! ```
//!
//! Everything runs in this process on loopback: a small HTTP/1.1 keep-alive webhook receiver
//! (std threads) that answers 200 and records, per event, when it arrived; `Delivery` started
//! exactly as `runtime` starts it, with `format: batch`, `batch_max: 100`, `flush_interval: 50ms`,
//! once with the in-memory spool and once with a disk spool in a temporary directory (removed
//! afterwards). Two runs per spool:
//!
//! - full speed: one producer thread pushes 200,000 events through `CoreSender` as fast as the
//!   bounded channel takes them (a refused event is retried, so the channel's bound paces it); reported: events/s and batches/s from the
//!   first send to the last event received.
//! - paced: 10,000 events/s for 5 s through `CoreSender`, as a core sends them (never blocking,
//!   overflow retried on a 1 ms tick); reported: delivery lag per event (received − sent) against
//!   `flush_interval` + the time one batch takes to arrive (`batch_max / rate`): delivery keeps up
//!   when the final backlog (drain) and the 99th percentile stay within it. Timing is reported,
//!   never failed on (the machine may be shared); a lost or duplicated event fails the run.
//!
//! Every event carries its sequence number as `request_id`; the receiver marks each one, so "all
//! arrived" means every event exactly once (no loss, no duplicate, nothing unknown).
//! Without `--bench` (e.g. `cargo test --benches`) it runs a few thousand events as a smoke test
//! that checks only that every event arrives once.

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use llmproxy::auth::key_id;
use llmproxy::config::{Config, HookFormat, Usage as UsageConfig, UsageHook};
use llmproxy::telemetry::metrics::Metrics;
use llmproxy::usage::deliver::Delivery;
use llmproxy::usage::{new_event_id, CoreSender, UsageEvent, CHANNEL_CAPACITY};

const BATCH_MAX: usize = 100;
const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// How long a run may take before it is reported as incomplete.
const RUN_DEADLINE: Duration = Duration::from_secs(20);
const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// When each event was sent and first received, in ns since the run started (0 = not yet), and
/// what the receiver saw.
struct Tracker {
    base: Instant,
    sent_ns: Vec<AtomicU64>,
    recv_ns: Vec<AtomicU64>,
    distinct: AtomicU64,
    duplicates: AtomicU64,
    /// `request_id`s that are not one of ours, and bodies that are not `{"events":[...]}`.
    unknown: AtomicU64,
    malformed: AtomicU64,
    batches: AtomicU64,
}

impl Tracker {
    fn new(events: usize) -> Tracker {
        Tracker {
            base: Instant::now(),
            sent_ns: (0..events).map(|_| AtomicU64::new(0)).collect(),
            recv_ns: (0..events).map(|_| AtomicU64::new(0)).collect(),
            distinct: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            unknown: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            batches: AtomicU64::new(0),
        }
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64 + 1
    }

    fn sent(&self, seq: usize) {
        self.sent_ns[seq].store(self.now_ns(), Ordering::Relaxed);
    }

    /// One webhook body: marks every event in it by the sequence number in its `request_id`.
    fn batch(&self, body: &[u8]) {
        const KEY: &[u8] = b"\"request_id\":\"";
        let now = self.now_ns();
        self.batches.fetch_add(1, Ordering::Relaxed);
        if !body.starts_with(b"{\"events\":[") || !body.ends_with(b"]}") {
            self.malformed.fetch_add(1, Ordering::Relaxed);
        }
        for at in memchr::memmem::find_iter(body, KEY) {
            let digits = &body[at + KEY.len()..];
            let end = digits.iter().position(|b| *b == b'"').unwrap_or(0);
            let seq = std::str::from_utf8(&digits[..end])
                .ok()
                .and_then(|s| s.parse::<usize>().ok());
            match seq.and_then(|s| self.recv_ns.get(s)) {
                Some(slot) => {
                    if slot
                        .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                    {
                        self.distinct.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
                None => {
                    self.unknown.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The loopback webhook: one thread accepting, one per keep-alive connection.
struct Receiver {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Receiver {
    fn start(tracker: Arc<Tracker>) -> io::Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let stop = stop.clone();
            thread::Builder::new()
                .name("webhook-accept".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(conn) = conn else { continue };
                        if let Err(e) = spawn_connection(conn, tracker.clone()) {
                            eprintln!("webhook receiver: cannot start a thread: {e}");
                        }
                    }
                })?
        };
        Ok(Receiver {
            addr,
            stop,
            accept: Some(accept),
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag; connection threads end when their peer closes.
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn spawn_connection(conn: TcpStream, tracker: Arc<Tracker>) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("webhook-conn".into())
        .spawn(move || {
            if let Err(e) = serve(conn, &tracker) {
                eprintln!("webhook receiver: {e}");
            }
        })
}

/// Serves POSTs on one connection until the peer closes it: reads head and `Content-Length`
/// body, records the body, answers an empty 200.
fn serve(mut conn: TcpStream, tracker: &Tracker) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(128 * 1024);
    let mut read = vec![0u8; 64 * 1024];
    loop {
        let (head_len, body_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let len = req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                        .and_then(|v| v.trim().parse::<usize>().ok());
                    break (n, len);
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            let n = conn.read(&mut read)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&read[..n]);
        };
        let Some(body_len) = body_len else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "POST without Content-Length",
            ));
        };
        while buf.len() < head_len + body_len {
            let n = conn.read(&mut read)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&read[..n]);
        }
        tracker.batch(&buf[head_len..head_len + body_len]);
        buf.drain(..head_len + body_len);
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")?;
    }
}

/// A temporary spool directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> io::Result<TempDir> {
        let dir =
            std::env::temp_dir().join(format!("llmproxy-bench-spool-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An event as the proxy builds it for a finished streaming chat request.
fn event(seq: usize, key: &str) -> UsageEvent {
    UsageEvent {
        event_id: new_event_id(),
        request_id: seq.to_string(),
        timestamp: "2025-06-01T12:00:00.000Z".into(),
        model: Some(MODEL.into()),
        endpoint: "/v1/chat/completions".into(),
        backend_url: Some("http://10.0.0.3:8000".into()),
        is_stream: true,
        prompt_tokens: 187,
        completion_tokens: 64,
        total_tokens: 251,
        cached_tokens: Some(128),
        reasoning_tokens: None,
        status: 200,
        outcome: "ok".into(),
        latency_ms: 1850,
        ttft_ms: Some(42),
        user_id: Some("tenant-4711".into()),
        key_id: Some(key.to_string()),
        usage_source: "reported",
        served_model: Some(MODEL.into()),
        priority: None,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum SpoolKind {
    Memory,
    Disk,
}

#[derive(Clone, Copy)]
enum Load {
    /// This many events, as fast as the channel takes them.
    FullSpeed(usize),
    /// `rate` events/s for `secs`, through `CoreSender`.
    Paced { rate: usize, secs: usize },
}

impl Load {
    fn events(self) -> usize {
        match self {
            Load::FullSpeed(n) => n,
            Load::Paced { rate, secs } => rate * secs,
        }
    }
}

struct Outcome {
    events: usize,
    /// First send to last event received.
    seconds: f64,
    producer_seconds: f64,
    /// Last send to last event received: the backlog left when sending stopped.
    drain_ms: f64,
    distinct: u64,
    duplicates: u64,
    unknown: u64,
    malformed: u64,
    batches: u64,
    dropped: u64,
    /// Per-event lag (received − sent), sorted, in ns.
    lags: Vec<u64>,
}

impl Outcome {
    fn all_arrived(&self) -> bool {
        self.distinct == self.events as u64
            && self.duplicates == 0
            && self.unknown == 0
            && self.malformed == 0
            && self.dropped == 0
    }

    fn rate(&self) -> f64 {
        self.distinct as f64 / self.seconds
    }

    /// Share of events whose lag exceeded `bound_ms`.
    fn late_share(&self, bound_ms: f64) -> f64 {
        let bound = (bound_ms * 1e6) as u64;
        let late = self.lags.len() - self.lags.partition_point(|l| *l <= bound);
        late as f64 / self.lags.len().max(1) as f64
    }

    /// Delivery kept pace: no backlog at the end, and 99% of events within the bound (the rest
    /// are scheduler or fsync stalls, which the max shows).
    fn kept_up(&self, bound_ms: f64) -> bool {
        self.drain_ms <= bound_ms && self.lag_ms(0.99) <= bound_ms
    }

    fn lag_ms(&self, q: f64) -> f64 {
        if self.lags.is_empty() {
            return f64::NAN;
        }
        let i = ((self.lags.len() - 1) as f64 * q).round() as usize;
        self.lags[i] as f64 / 1e6
    }
}

fn run(spool: SpoolKind, load: Load) -> anyhow::Result<Outcome> {
    let events = load.events();
    let tracker = Arc::new(Tracker::new(events));
    let receiver = Receiver::start(tracker.clone()).context("webhook receiver")?;
    let dir = match spool {
        SpoolKind::Disk => Some(TempDir::new("disk").context("spool directory")?),
        SpoolKind::Memory => None,
    };
    let hook = UsageHook {
        enabled: true,
        url: Some(format!("http://{}/usage", receiver.addr)),
        format: HookFormat::Batch,
        batch_max: BATCH_MAX,
        flush_interval: FLUSH_INTERVAL,
        spool_dir: dir.as_ref().map(|d| d.0.to_string_lossy().into_owned()),
        ..UsageHook::default()
    };
    let cfg = Config::with_backends(
        "127.0.0.1:0".parse()?,
        &["http://10.0.0.3:8000".to_string()],
    )?;
    let metrics = Arc::new(Metrics::new(&cfg, 1, "bench")?);
    let (tx, rx) = llmproxy::usage::channel();
    let delivery = Delivery::start(&hook, &UsageConfig::default(), rx, metrics.clone())?;

    let key = key_id("sk-bench-key");
    let producer = {
        let tracker = tracker.clone();
        thread::Builder::new()
            .name("producer".into())
            .spawn(move || -> u64 {
                match load {
                    Load::FullSpeed(n) => {
                        // As fast as the channel takes them: a refused event is retried after
                        // handing over what the producer holds.
                        let core = CoreSender::new(tx);
                        for seq in 0..n {
                            let ev = event(seq, &key);
                            tracker.sent(seq);
                            while !core.send(&ev.record()) {
                                core.tick();
                                thread::sleep(Duration::from_micros(100));
                            }
                            if seq % 64 == 63 {
                                core.tick();
                            }
                        }
                        while core.backlog() > 0 {
                            core.tick();
                            thread::sleep(Duration::from_micros(100));
                        }
                        0
                    }
                    Load::Paced { rate, .. } => {
                        let core = CoreSender::new(tx);
                        let start = Instant::now();
                        let mut seq = 0;
                        while seq < events {
                            let due = ((start.elapsed().as_secs_f64() * rate as f64) as usize)
                                .min(events);
                            while seq < due {
                                tracker.sent(seq);
                                // A refused event is counted by `dropped()`.
                                let _ = core.send(&event(seq, &key).record());
                                seq += 1;
                            }
                            core.tick();
                            thread::sleep(Duration::from_millis(1));
                        }
                        let until = Instant::now() + Duration::from_secs(5);
                        while core.backlog() > 0 && Instant::now() < until {
                            core.tick();
                            thread::sleep(Duration::from_millis(1));
                        }
                        core.dropped() + core.backlog() as u64
                    }
                }
            })?
    };

    let started = Instant::now();
    let deadline = started
        + RUN_DEADLINE
        + match load {
            Load::Paced { secs, .. } => Duration::from_secs(secs as u64),
            Load::FullSpeed(_) => Duration::ZERO,
        };
    while tracker.distinct.load(Ordering::Relaxed) < events as u64 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
    let producer_dropped = producer
        .join()
        .map_err(|_| anyhow::anyhow!("producer thread panicked"))?;
    let producer_seconds = tracker.sent_ns[events - 1]
        .load(Ordering::Relaxed)
        .saturating_sub(tracker.sent_ns[0].load(Ordering::Relaxed))
        as f64
        / 1e9;
    delivery.shutdown(Instant::now() + Duration::from_secs(2));
    drop(receiver);
    drop(dir);

    let mut lags = Vec::with_capacity(events);
    let mut first_sent = u64::MAX;
    let mut last_sent = 0;
    let mut last_recv = 0;
    for (sent, recv) in tracker.sent_ns.iter().zip(&tracker.recv_ns) {
        let (sent, recv) = (sent.load(Ordering::Relaxed), recv.load(Ordering::Relaxed));
        if sent > 0 {
            first_sent = first_sent.min(sent);
            last_sent = last_sent.max(sent);
        }
        if recv > 0 {
            last_recv = last_recv.max(recv);
            lags.push(recv.saturating_sub(sent));
        }
    }
    lags.sort_unstable();
    let metric_dropped = metrics.usage_events.with_label_values(&["dropped"]).get();
    Ok(Outcome {
        events,
        seconds: last_recv.saturating_sub(first_sent) as f64 / 1e9,
        producer_seconds,
        drain_ms: last_recv.saturating_sub(last_sent) as f64 / 1e6,
        distinct: tracker.distinct.load(Ordering::Relaxed),
        duplicates: tracker.duplicates.load(Ordering::Relaxed),
        unknown: tracker.unknown.load(Ordering::Relaxed),
        malformed: tracker.malformed.load(Ordering::Relaxed),
        batches: tracker.batches.load(Ordering::Relaxed),
        dropped: producer_dropped + metric_dropped,
        lags,
    })
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; anything else (`cargo test --benches`) gets a smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let (burst, rate, secs) = if full {
        (200_000, 10_000, 5)
    } else {
        (5_000, 2_000, 1)
    };
    let began = Instant::now();
    println!(
        "usage delivery: format batch, batch_max {BATCH_MAX}, flush_interval {FLUSH_INTERVAL:?}, \
         channel {CHANNEL_CAPACITY}, loopback webhook (HTTP/1.1 keep-alive)"
    );
    println!(
        "{:<26} {:<6} {:>8} {:>8} {:>10} {:>8} {:>9} {:>8} {:>8} {:>8}  result",
        "run",
        "spool",
        "events",
        "time s",
        "events/s",
        "batches",
        "batches/s",
        "lag p50",
        "lag p99",
        "lag max"
    );
    let mut complete = true;
    let mut kept_up = true;
    for spool in [SpoolKind::Memory, SpoolKind::Disk] {
        let name = if spool == SpoolKind::Memory {
            "memory"
        } else {
            "disk"
        };
        let fast = run(spool, Load::FullSpeed(burst))?;
        print_row(&format!("full speed ({burst})"), name, &fast, None);
        complete &= fast.all_arrived();
        // An event's batch is due at most `flush_interval` after it arrived; delivery keeps up
        // when, beyond that, events never wait longer than one more batch takes to arrive
        // (`batch_max / rate`): the backlog stays under one batch.
        let bound = (FLUSH_INTERVAL.as_secs_f64() + BATCH_MAX as f64 / rate as f64) * 1e3;
        let paced = run(spool, Load::Paced { rate, secs })?;
        print_row(
            &format!("paced {rate}/s for {secs} s"),
            name,
            &paced,
            Some(bound),
        );
        complete &= paced.all_arrived();
        kept_up &= paced.kept_up(bound);
    }
    println!(
        "lag = webhook received − channel send, per event; time = first send → last event \
         received;\nbound = flush_interval + batch_max / paced rate; kept up = drain and \
         lag p99 within it; total {:.1} s",
        began.elapsed().as_secs_f64()
    );
    // Timing on a shared machine is reported, never failed on; a lost or duplicated event is a
    // bug and fails the run.
    if !kept_up {
        println!("note: delivery fell behind in a paced run (see the table)");
    }
    if !complete {
        eprintln!("usage delivery: events were lost, duplicated or garbled (see the table)");
        std::process::exit(1);
    }
    Ok(())
}

fn print_row(run: &str, spool: &str, o: &Outcome, bound_ms: Option<f64>) {
    let mut result = if o.all_arrived() {
        "all arrived once".to_string()
    } else {
        format!(
            "MISSING {} dup {} unknown {} malformed {} dropped {}",
            o.events as u64 - o.distinct,
            o.duplicates,
            o.unknown,
            o.malformed,
            o.dropped
        )
    };
    let verdict = |b: f64| {
        if o.kept_up(b) {
            "kept up"
        } else {
            "FELL BEHIND"
        }
    };
    match bound_ms {
        Some(b) => result.push_str(&format!(
            "; drain {:.0} ms, {:.2}% over the {b:.0} ms bound: {}",
            o.drain_ms,
            o.late_share(b) * 100.0,
            verdict(b)
        )),
        None => result.push_str(&format!("; producer done in {:.2} s", o.producer_seconds)),
    }
    println!(
        "{:<26} {:<6} {:>8} {:>8.2} {:>10.0} {:>8} {:>9.0} {:>6.1}ms {:>6.1}ms {:>6.1}ms  {}",
        run,
        spool,
        o.events,
        o.seconds,
        o.rate(),
        o.batches,
        o.batches as f64 / o.seconds,
        o.lag_ms(0.5),
        o.lag_ms(0.99),
        o.lag_ms(1.0),
        result
    );
}
