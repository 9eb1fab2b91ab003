//! The usage threads: `intake` takes events off the cores' channel, serialises them and appends
//! them to the spool (never waiting on the network); `sender` reads batches from the spool and
//! POSTs them to the webhook with retries, backoff and jitter, an `Idempotency-Key` per batch and
//! an optional HMAC signature. A batch leaves the spool only after a 2xx — or, when the receiver
//! rejects it for good (4xx other than 408/429), after it was written to the dead-letter file.
//! Delivery is therefore at-least-once; receivers deduplicate by `event_id`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::due::Waiting;
use super::spool::{Batch, Spool, SpoolError};
use super::Consumer;
use crate::config::{HookFormat, Usage as UsageConfig, UsageHook};
use crate::telemetry::metrics::Metrics;

/// Log target for `usage.log: true` event lines.
pub(crate) const USAGE_LOG: &str = "usage";

const MAX_BACKOFF: Duration = Duration::from_secs(30);

struct State {
    spool: Spool,
    /// Undelivered events and when they arrived (an upper bound after a restart, when the count
    /// is unknown).
    waiting: Waiting,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// The intake thread should drain the channel and stop.
    stop_intake: AtomicBool,
    /// The sender should deliver what it can, then stop.
    stopping: AtomicBool,
    /// Events per POST: the sender is woken when this many are pending (or the first of them
    /// arrives, to set its flush timer), not at every hand-over in between.
    batch_max: usize,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep delivering.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Delivery {
    shared: Arc<Shared>,
    intake: Option<JoinHandle<()>>,
    sender: Option<JoinHandle<()>>,
}

impl Delivery {
    /// Opens the spool (replaying what a previous run left) and starts the threads.
    pub fn start(
        hook: &UsageHook,
        usage: &UsageConfig,
        rx: Consumer,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Delivery> {
        let spool = match &hook.spool_dir {
            Some(dir) if hook.enabled => Spool::open_disk(
                std::path::Path::new(dir),
                hook.spool_max_bytes,
                hook.spool_fsync,
            )
            .map_err(|e| anyhow::anyhow!("usage_hook.spool_dir {dir}: {e}"))?,
            _ => Spool::memory(hook.spool_max_bytes),
        };
        let backlog = spool.pending_bytes();
        if backlog > 0 {
            log::info!(
                "usage spool: {backlog} bytes of undelivered events from a previous run; replaying"
            );
        }
        if hook.enabled && hook.spool_dir.is_none() {
            log::warn!("usage_hook.spool_dir is not set: undelivered usage events live in memory only and are lost if the process dies");
        }
        metrics.usage_spool_bytes.set(backlog as i64);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                spool,
                waiting: if backlog > 0 {
                    Waiting::backlog(Instant::now())
                } else {
                    Waiting::default()
                },
            }),
            wake: Condvar::new(),
            stop_intake: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            batch_max: batch_max(hook),
            metrics,
        });
        let intake = {
            let shared = shared.clone();
            let enabled = hook.enabled;
            let log_events = usage.log;
            std::thread::Builder::new()
                .name("llmproxy-usage-intake".into())
                .spawn(move || intake(&shared, &rx, enabled, log_events))?
        };
        let sender = if hook.enabled {
            let shared = shared.clone();
            let hook = hook.clone();
            Some(
                std::thread::Builder::new()
                    .name("llmproxy-usage-send".into())
                    .spawn(move || sender(&shared, &hook))?,
            )
        } else {
            None
        };
        Ok(Delivery {
            shared,
            intake: Some(intake),
            sender,
        })
    }

    /// Graceful stop: drain the channel (and what the cores still hold) into the spool, try to deliver until `deadline`, and
    /// leave whatever is still undelivered in the spool for the next start.
    pub fn shutdown(mut self, deadline: Instant) {
        self.shared.stop_intake.store(true, Ordering::SeqCst);
        if let Some(h) = self.intake.take() {
            let _ = h.join();
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        if let Some(h) = self.sender.take() {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let mut st = self.shared.lock();
        if let Err(e) = st.spool.sync() {
            log::error!("usage spool: final sync failed: {e}");
        }
        let left = st.spool.pending_bytes();
        if left > 0 {
            log::warn!("usage: {left} bytes of events not yet delivered; they stay in the spool for the next start");
        }
    }
}

/// How long a stopping intake waits for events a core still holds (a core hands them over at the
/// end of its turn, or on its tick when the channel was full).
const STOP_WAIT: Duration = Duration::from_secs(1);

fn intake(shared: &Shared, rx: &Consumer, enabled: bool, log_events: bool) {
    let mut stop_seen: Option<Instant> = None;
    while let Ok(got) = rx.recv_timeout(Duration::from_millis(100)) {
        if let Some(first) = got {
            // Whatever else is waiting goes into the spool under the same lock.
            let mut batches = vec![first];
            while batches.len() < 64 {
                match rx.try_recv() {
                    Some(b) => batches.push(b),
                    None => break,
                }
            }
            if log_events {
                for l in batches.iter().flat_map(|b| b.text.lines()) {
                    log::info!(target: USAGE_LOG, "{l}");
                }
            }
            if enabled {
                append(shared, batches.iter().map(|b| (b.text.as_str(), b.lines)));
            }
            for b in batches {
                rx.give_back(b);
            }
            std::thread::sleep(crate::batch::LINGER);
        }
        if enabled {
            let mut st = shared.lock();
            if let Err(e) = st.spool.sync_if_due() {
                log::error!("usage spool: fsync failed: {e}");
            }
        }
        if shared.stop_intake.load(Ordering::SeqCst) {
            let since = *stop_seen.get_or_insert_with(Instant::now);
            if rx.idle() || since.elapsed() >= STOP_WAIT {
                break;
            }
        }
    }
}

/// `blocks`: newline-terminated lines, and how many.
fn append<'a>(shared: &Shared, blocks: impl Iterator<Item = (&'a str, usize)>) {
    let m = &shared.metrics;
    let mut st = shared.lock();
    let (added, refused) = st.spool.append_all(blocks);
    for (line, e) in refused {
        m.usage_events.with_label_values(&["dropped"]).inc();
        match e {
            SpoolError::Full(pending) => {
                log::error!("usage spool full ({pending} bytes pending): event dropped: {line}")
            }
            e => log::error!("usage spool write failed ({e}): event dropped: {line}"),
        }
    }
    if added > 0 {
        let before = st.waiting.count();
        st.waiting.added(added, Instant::now());
        m.usage_events
            .with_label_values(&["spooled"])
            .inc_by(added as u64);
        m.usage_spool_bytes.set(st.spool.pending_bytes() as i64);
        // A sender that is waiting has either nothing (and must learn when the first event is
        // due) or less than a batch (and wakes by itself when its oldest is due): a wake at every
        // hand-over in between would be two context switches on a core's CPU for nothing.
        if before == 0 || (before < shared.batch_max && st.waiting.count() >= shared.batch_max) {
            shared.wake.notify_one();
        }
    }
}

fn batch_max(hook: &UsageHook) -> usize {
    match hook.format {
        HookFormat::Batch => hook.batch_max.max(1),
        HookFormat::Single => 1,
    }
}

enum Sent {
    Delivered,
    /// The receiver refused these events for good.
    Rejected(u16),
    Failed(String),
}

fn sender(shared: &Shared, hook: &UsageHook) {
    let Some(url) = hook.url.clone() else {
        return;
    };
    let agent = ureq::AgentBuilder::new().timeout(hook.timeout).build();
    let batch_max = shared.batch_max;
    let mut failures: u32 = 0;
    // A batch that failed is re-sent exactly as it was (same events, same Idempotency-Key).
    let mut retry: Option<Batch> = None;
    loop {
        let batch = if let Some(b) = retry.take() {
            b
        } else {
            let mut st = shared.lock();
            loop {
                let stopping = shared.stopping.load(Ordering::SeqCst);
                if st.waiting.count() > 0 && st.spool.is_empty() {
                    st.waiting.clear();
                }
                let now = Instant::now();
                let due = st.waiting.due(batch_max, hook.flush_interval, now)
                    || (stopping && st.waiting.count() > 0);
                if due {
                    break;
                }
                if stopping {
                    return;
                }
                let wait = st
                    .waiting
                    .wait(hook.flush_interval, Duration::from_millis(200), now)
                    .max(Duration::from_millis(1));
                st = shared
                    .wake
                    .wait_timeout(st, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            let batch = match st.spool.peek(batch_max) {
                Ok(b) => b,
                Err(e) => {
                    log::error!("usage spool read failed: {e}");
                    drop(st);
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            if batch.is_empty() {
                if st.spool.moves_on(&batch) {
                    // Only unreadable lines (skipped with a warning): step past them. Left in
                    // place, every later read would stop at them again when they are a
                    // replayed batch's (read up to its recorded end, whatever it holds).
                    if let Err(e) = st.spool.commit(&batch) {
                        log::error!("usage spool commit failed: {e}");
                    }
                } else {
                    st.waiting.clear();
                }
                continue;
            }
            if let Err(e) = st.spool.begin(&batch) {
                log::error!("usage spool cursor write failed: {e}");
            }
            batch
        };
        let started = Instant::now();
        let outcome = send_batch(&agent, &url, hook, &batch);
        let m = &shared.metrics;
        match outcome {
            Sent::Delivered => {
                failures = 0;
                m.usage_delivery_seconds
                    .observe(started.elapsed().as_secs_f64());
                m.usage_events
                    .with_label_values(&["delivered"])
                    .inc_by(batch.len() as u64);
                finish(shared, &batch);
            }
            Sent::Rejected(status) => {
                failures = 0;
                let mut st = shared.lock();
                match st.spool.dead_letter(&batch) {
                    Ok(Some(path)) => log::error!(
                        "usage webhook rejected {} events with {status}; written to {}",
                        batch.len(),
                        path.display()
                    ),
                    Ok(None) => log::error!(
                        "usage webhook rejected {} events with {status}; dead letters: {}",
                        batch.len(),
                        batch.lines().collect::<Vec<_>>().join(" ")
                    ),
                    Err(e) => log::error!("usage dead-letter write failed: {e}"),
                }
                drop(st);
                m.usage_events
                    .with_label_values(&["dead_lettered"])
                    .inc_by(batch.len() as u64);
                finish(shared, &batch);
            }
            Sent::Failed(why) => {
                failures = failures.saturating_add(1);
                m.usage_events
                    .with_label_values(&["retried"])
                    .inc_by(batch.len() as u64);
                let pause = backoff(failures, MAX_BACKOFF);
                log::warn!(
                    "usage webhook unavailable ({why}); {} events kept, next try in {pause:?}",
                    batch.len()
                );
                if shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                sleep_unless_stopping(shared, pause);
                retry = Some(batch);
            }
        }
    }
}

fn finish(shared: &Shared, batch: &Batch) {
    let mut st = shared.lock();
    if let Err(e) = st.spool.commit(batch) {
        log::error!("usage spool commit failed: {e}");
    }
    // What is left waits for a full batch or its own flush time, not sent at once as a
    // partial batch (see `due`).
    st.waiting.delivered(batch.len());
    shared
        .metrics
        .usage_spool_bytes
        .set(st.spool.pending_bytes() as i64);
}

fn sleep_unless_stopping(shared: &Shared, pause: Duration) {
    let until = Instant::now() + pause;
    while Instant::now() < until && !shared.stopping.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
    }
}

/// 100 ms · 2^n, capped, with ±50% jitter so many proxies don't retry in lockstep.
fn backoff(attempt: u32, cap: Duration) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1u32 << attempt.min(16));
    let base = base.min(cap);
    let jitter = 0.5 + fastrand::f64();
    base.mul_f64(jitter).min(cap)
}

/// One batch: `1 + retry` attempts with backoff between them.
fn send_batch(agent: &ureq::Agent, url: &str, hook: &UsageHook, batch: &Batch) -> Sent {
    let body = match hook.format {
        HookFormat::Batch => {
            let mut b = String::with_capacity(16 + batch.text().len());
            b.push_str("{\"events\":[");
            for (i, l) in batch.lines().enumerate() {
                if i > 0 {
                    b.push(',');
                }
                b.push_str(l);
            }
            b.push_str("]}");
            b
        }
        HookFormat::Single => batch.lines().next().unwrap_or_default().to_string(),
    };
    let key = batch_key(batch.lines());
    let signature = hook
        .secret
        .as_ref()
        .map(|s| sign(s.as_bytes(), body.as_bytes()));
    let mut last = String::new();
    for attempt in 0..=hook.retry {
        if attempt > 0 {
            std::thread::sleep(backoff(attempt - 1, Duration::from_secs(5)));
        }
        let mut req = agent
            .post(url)
            .set("content-type", "application/json")
            .set("idempotency-key", &key)
            .set(
                "user-agent",
                concat!("llmproxy/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(sig) = &signature {
            req = req.set("x-llmproxy-signature", sig);
        }
        for (k, v) in &hook.headers {
            req = req.set(k, v);
        }
        match req.send_string(&body) {
            Ok(resp) => {
                let _ = resp.into_string();
                return Sent::Delivered;
            }
            Err(ureq::Error::Status(code, resp)) => {
                let _ = resp.into_string();
                if (400..500).contains(&code) && code != 408 && code != 429 {
                    return Sent::Rejected(code);
                }
                last = format!("status {code}");
            }
            Err(e) => last = e.to_string(),
        }
    }
    Sent::Failed(last)
}

/// `sha256=<hex HMAC-SHA256 of the body>`.
pub(crate) fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        // HMAC accepts keys of any length; this arm cannot happen.
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex(&mac.finalize().into_bytes()))
}

/// A batch's `Idempotency-Key`: its events' ids, in order, hashed. The same events give the same
/// key, so a batch re-sent after a crash is recognisable. Only the ids are hashed, not the body:
/// SHA-256 over whole events was nine tenths of this thread's instructions (about half a
/// microsecond per event natively), and an event's id already names it. A line that does not
/// start with its id (none is written so; the fallback keeps the key defined) is hashed whole.
fn batch_key<'a>(lines: impl Iterator<Item = &'a str>) -> String {
    const ID: &str = "{\"event_id\":\"";
    let mut h = Sha256::new();
    for line in lines {
        // `memchr` (SIMD) rather than `split_once`'s generic search: once per event.
        let id = line
            .strip_prefix(ID)
            .and_then(|rest| Some(&rest[..memchr::memchr(b'"', rest.as_bytes())?]))
            .unwrap_or(line);
        h.update(id.as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize()[..16])
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for chunk in bytes.chunks(16) {
        let mut word = [0u8; 16];
        word[..chunk.len()].copy_from_slice(chunk);
        // `push_hex` writes the last digits of a number: shift a short chunk down to them.
        let v = u128::from_be_bytes(word) >> (8 * (16 - chunk.len()));
        crate::encode::push_hex(&mut s, v, chunk.len() * 2);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(lines: &[String]) -> String {
        batch_key(lines.iter().map(String::as_str))
    }

    #[test]
    fn hex_writes_every_byte_as_two_lowercase_digits() {
        let bytes: Vec<u8> = (0..=255).collect();
        for n in [0, 1, 7, 8, 9, 16, 32, 256] {
            let want: String = bytes[..n].iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex(&bytes[..n]), want);
        }
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let sig = sign(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_batch_key_names_its_events_in_order() {
        let line = |id: &str, n: u32| format!("{{\"event_id\":\"{id}\",\"n\":{n}}}");
        let ab = [line("a1", 1), line("b2", 2)];
        // The ids decide, not the rest of the line...
        assert_eq!(key(&ab), key(&[line("a1", 7), line("b2", 8)]));
        // ...in order, and one id more or less is another batch.
        assert_ne!(key(&ab), key(&[line("b2", 2), line("a1", 1)]));
        assert_ne!(key(&ab), key(&[line("a1", 1)]));
        assert_ne!(key(&ab), key(&[line("a1b2", 1)]));
        // A line without its id first is hashed whole.
        assert_ne!(key(&["{\"x\":1}".into()]), key(&["{\"x\":2}".into()]));
        assert_eq!(key(&ab).len(), 32);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(0, MAX_BACKOFF) <= Duration::from_millis(150));
        assert!(backoff(20, MAX_BACKOFF) <= MAX_BACKOFF);
        assert!(backoff(5, MAX_BACKOFF) >= Duration::from_millis(1600));
    }
}
