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

use super::spool::{Batch, Spool, SpoolError};
use super::Consumer;
use crate::config::{HookFormat, Usage as UsageConfig, UsageHook};
use crate::telemetry::metrics::Metrics;

/// Log target for `usage.log: true` event lines.
pub(crate) const USAGE_LOG: &str = "usage";

const MAX_BACKOFF: Duration = Duration::from_secs(30);

struct State {
    spool: Spool,
    /// Undelivered events (an upper bound after a restart, when the count is unknown).
    pending: usize,
    /// When the oldest undelivered event was appended (decides when a partial batch is due).
    oldest: Option<Instant>,
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
                pending: if backlog > 0 { usize::MAX / 2 } else { 0 },
                oldest: (backlog > 0).then(Instant::now),
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
        let before = st.pending;
        if before == 0 {
            st.oldest = Some(Instant::now());
        }
        st.pending = st.pending.saturating_add(added);
        m.usage_events
            .with_label_values(&["spooled"])
            .inc_by(added as u64);
        m.usage_spool_bytes.set(st.spool.pending_bytes() as i64);
        // A sender that is waiting has either nothing (and must learn when the first event is
        // due) or less than a batch (and wakes by itself when its oldest is due): a wake at every
        // hand-over in between would be two context switches on a core's CPU for nothing.
        if before == 0 || (before < shared.batch_max && st.pending >= shared.batch_max) {
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
                if st.pending > 0 && st.spool.is_empty() {
                    st.pending = 0;
                    st.oldest = None;
                }
                let due = st.pending >= batch_max
                    || st
                        .oldest
                        .is_some_and(|t| t.elapsed() >= hook.flush_interval)
                    || (stopping && st.pending > 0);
                if due {
                    break;
                }
                if stopping {
                    return;
                }
                let wait = st
                    .oldest
                    .map_or(Duration::from_millis(200), |t| {
                        hook.flush_interval.saturating_sub(t.elapsed())
                    })
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
            if batch.lines.is_empty() {
                st.pending = 0;
                st.oldest = None;
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
                    .inc_by(batch.lines.len() as u64);
                finish(shared, &batch);
            }
            Sent::Rejected(status) => {
                failures = 0;
                let mut st = shared.lock();
                match st.spool.dead_letter(&batch.lines) {
                    Ok(Some(path)) => log::error!(
                        "usage webhook rejected {} events with {status}; written to {}",
                        batch.lines.len(),
                        path.display()
                    ),
                    Ok(None) => log::error!(
                        "usage webhook rejected {} events with {status}; dead letters: {}",
                        batch.lines.len(),
                        batch.lines.join(" ")
                    ),
                    Err(e) => log::error!("usage dead-letter write failed: {e}"),
                }
                drop(st);
                m.usage_events
                    .with_label_values(&["dead_lettered"])
                    .inc_by(batch.lines.len() as u64);
                finish(shared, &batch);
            }
            Sent::Failed(why) => {
                failures = failures.saturating_add(1);
                m.usage_events
                    .with_label_values(&["retried"])
                    .inc_by(batch.lines.len() as u64);
                let pause = backoff(failures, MAX_BACKOFF);
                log::warn!(
                    "usage webhook unavailable ({why}); {} events kept, next try in {pause:?}",
                    batch.lines.len()
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
    st.pending = st.pending.saturating_sub(batch.lines.len());
    st.oldest = if st.pending > 0 {
        Some(Instant::now() - Duration::from_secs(3600))
    } else {
        None
    };
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
            let mut b =
                String::with_capacity(16 + batch.lines.iter().map(|l| l.len() + 1).sum::<usize>());
            b.push_str("{\"events\":[");
            for (i, l) in batch.lines.iter().enumerate() {
                if i > 0 {
                    b.push(',');
                }
                b.push_str(l);
            }
            b.push_str("]}");
            b
        }
        HookFormat::Single => batch.lines.first().cloned().unwrap_or_default(),
    };
    let key = batch_key(&batch.lines);
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
fn batch_key(lines: &[String]) -> String {
    const ID: &str = "{\"event_id\":\"";
    let mut h = Sha256::new();
    for line in lines {
        // `memchr` (SIMD) rather than `split_once`'s generic search: once per event.
        let id = line
            .strip_prefix(ID)
            .and_then(|rest| Some(&rest[..memchr::memchr(b'"', rest.as_bytes())?]))
            .unwrap_or(line.as_str());
        h.update(id.as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize()[..16])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(batch_key(&ab), batch_key(&[line("a1", 7), line("b2", 8)]));
        // ...in order, and one id more or less is another batch.
        assert_ne!(batch_key(&ab), batch_key(&[line("b2", 2), line("a1", 1)]));
        assert_ne!(batch_key(&ab), batch_key(&[line("a1", 1)]));
        assert_ne!(batch_key(&ab), batch_key(&[line("a1b2", 1)]));
        // A line without its id first is hashed whole.
        assert_ne!(
            batch_key(&["{\"x\":1}".into()]),
            batch_key(&["{\"x\":2}".into()])
        );
        assert_eq!(batch_key(&ab).len(), 32);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(0, MAX_BACKOFF) <= Duration::from_millis(150));
        assert!(backoff(20, MAX_BACKOFF) <= MAX_BACKOFF);
        assert!(backoff(5, MAX_BACKOFF) >= Duration::from_millis(1600));
    }
}
