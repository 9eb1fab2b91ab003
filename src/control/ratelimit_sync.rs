//! The rate-limit sync thread (`ratelimit.store: redis`): every `sync_interval` it pushes each
//! key's consumption in this process since the last sync to Redis and folds the shared level
//! that comes back into the process's buckets (the algorithm and its error bound are in
//! `auth::ratelimit`'s header).
//!
//! It owns the one Redis connection of the process (the `redis` crate's synchronous client, no
//! async runtime) and the store's up/down state the cores read. Cores never call it and never
//! wait for it: when it is slow or the store is gone they keep admitting from their buckets, as
//! `ratelimit.on_store_error` says. Every exchange has a timeout of one `sync_interval`, so a
//! store that hangs is declared down as surely as one that refuses connections; a failed
//! exchange drops the connection and the next tick dials again, so a store that comes back —
//! even empty, after a restart — is used again without restarting the proxy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::ratelimit::{Gcra, KeyLimits, StoreState};
use crate::auth::KeyStore;
use crate::config::RateLimit;

/// One bucket per KEYS entry; per bucket three ARGV: the rate per minute, the units this replica
/// pushes, and its own level (the seed when the bucket is missing: first use, expired, or the
/// store restarted empty). Levels are in units; the leak uses Redis's clock (`TIME`, allowed in
/// scripts since Redis 5's effect replication), so the replicas' clocks never meet. Numbers go
/// back as strings: Redis would truncate Lua numbers to integers. A bucket expires once it
/// would have leaked empty, plus a minute, so Redis holds only keys in use.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[3 * i - 2])
  local push = tonumber(ARGV[3 * i - 1])
  local seed = tonumber(ARGV[3 * i])
  local v = redis.call('HMGET', key, 'l', 't')
  local level
  if v[1] and v[2] then
    local elapsed = math.max(0, now - tonumber(v[2]))
    level = math.max(0, tonumber(v[1]) - elapsed * rate / 60000000) + push
  else
    level = math.max(seed, push)
  end
  redis.call('HSET', key, 'l', string.format('%.17g', level), 't', string.format('%.0f', now))
  local ttl = math.min(math.ceil(level * 60000 / rate) + 60000, 604800000)
  redis.call('PEXPIRE', key, string.format('%.0f', ttl))
  out[i] = string.format('%.17g', level)
end
return out
";

/// Buckets per script call, so one call never blocks Redis for long.
const BATCH: usize = 512;

/// While the store stays down, one reminder line per this long.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// Starts the thread. It runs for the life of the process.
pub(crate) fn spawn(
    keys: Arc<KeyStore>,
    state: Arc<StoreState>,
    metrics: Option<Arc<crate::telemetry::metrics::Metrics>>,
    cfg: &RateLimit,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let url = cfg.redis_url.as_ref().map(|u| u.expose().to_string());
    let mut sync = Sync {
        client: url.and_then(|u| redis::Client::open(u).ok()),
        con: None,
        script: redis::Script::new(SCRIPT),
        prefix: cfg.key_prefix.clone(),
        timeout: cfg.sync_interval,
        log: Outage::default(),
    };
    let every = cfg.sync_interval;
    std::thread::Builder::new()
        .name("llmproxy-ratelimit".into())
        .spawn(move || loop {
            let start = Instant::now();
            let result = sync.once(&keys);
            let took = start.elapsed();
            state.set_up(result.is_ok());
            let store = metrics.as_deref().and_then(|m| m.ratelimit_store.as_ref());
            match result {
                Ok(()) => {
                    if let Some(m) = store {
                        m.synced(took.as_secs_f64());
                    }
                    sync.log.recovered();
                }
                Err(e) => {
                    if let Some(m) = store {
                        m.failed();
                    }
                    sync.con = None;
                    sync.log.failed(&e);
                }
            }
            std::thread::sleep(every.saturating_sub(took));
        })
}

struct Sync {
    /// `None` only if the URL, checked at load time, still failed to parse.
    client: Option<redis::Client>,
    con: Option<redis::Connection>,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
    log: Outage,
}

/// One bucket in one sync.
struct Push<'a> {
    key: String,
    limits: &'a KeyLimits,
    bucket: &'a Gcra,
    units: u64,
    level: f64,
}

impl Sync {
    /// One exchange: collect, push, fold.
    fn once(&mut self, keys: &KeyStore) -> Result<(), String> {
        let set = keys
            .snapshot()
            .ok_or_else(|| "key store lock poisoned".to_string())?;
        let mut pushes = Vec::new();
        for (name, limits) in set.limited() {
            let now = limits.now();
            for (suffix, bucket) in [("rpm", limits.rpm()), ("tpm", limits.tpm())] {
                if let Some(bucket) = bucket {
                    // Taken before the exchange, so a failed one loses it: consumption during an
                    // outage is governed by `on_store_error`, not charged afterwards.
                    let units = bucket.take_pending();
                    pushes.push(Push {
                        key: format!("{}{name}:{suffix}", self.prefix),
                        limits,
                        bucket,
                        units,
                        level: bucket.level(now),
                    });
                }
            }
        }
        let con = connection(&mut self.con, self.client.as_ref(), self.timeout)?;
        if pushes.is_empty() {
            // Nothing to share; still ask, so `store_up` tells the truth.
            return redis::cmd("PING")
                .query::<String>(con)
                .map(|_| ())
                .map_err(|e| e.to_string());
        }
        for batch in pushes.chunks(BATCH) {
            let mut call = self.script.prepare_invoke();
            for p in batch {
                call.key(&p.key)
                    .arg(p.bucket.rate())
                    .arg(p.units)
                    .arg(p.level);
            }
            let levels: Vec<String> = call.invoke(con).map_err(|e| e.to_string())?;
            if levels.len() != batch.len() {
                return Err(format!(
                    "the sync script answered {} levels for {} buckets",
                    levels.len(),
                    batch.len()
                ));
            }
            for (p, level) in batch.iter().zip(levels) {
                let level: f64 = level
                    .parse()
                    .map_err(|_| format!("the sync script answered a bad level {level:?}"))?;
                p.bucket.fold(p.limits.now(), level);
            }
        }
        Ok(())
    }
}

/// The open connection, or a new one with every read and write bounded by `timeout`.
fn connection<'a>(
    con: &'a mut Option<redis::Connection>,
    client: Option<&redis::Client>,
    timeout: Duration,
) -> Result<&'a mut redis::Connection, String> {
    if con.is_none() {
        let client =
            client.ok_or_else(|| "ratelimit.redis_url is not a usable Redis URL".to_string())?;
        let c = client
            .get_connection_with_timeout(timeout)
            .map_err(|e| format!("connect: {e}"))?;
        c.set_read_timeout(Some(timeout))
            .and_then(|()| c.set_write_timeout(Some(timeout)))
            .map_err(|e| e.to_string())?;
        *con = Some(c);
    }
    con.as_mut().ok_or_else(|| "no connection".to_string())
}

/// Logs an outage once when it starts, then at most every `LOG_EVERY`, and once when it ends.
#[derive(Default)]
struct Outage {
    since: Option<Instant>,
    failures: u64,
    last_line: Option<Instant>,
}

impl Outage {
    fn failed(&mut self, e: &str) {
        let now = Instant::now();
        self.failures += 1;
        match self.since {
            None => {
                self.since = Some(now);
                self.last_line = Some(now);
                log::error!(
                    "ratelimit: the shared store failed ({e}); ratelimit.on_store_error applies \
                     until it answers again"
                );
            }
            Some(since) if self.last_line.is_none_or(|l| now - l >= LOG_EVERY) => {
                self.last_line = Some(now);
                log::error!(
                    "ratelimit: the shared store still fails after {:.0?} ({} failed syncs; last: {e})",
                    now - since,
                    self.failures
                );
            }
            Some(_) => {}
        }
    }

    fn recovered(&mut self) {
        if let Some(since) = self.since.take() {
            log::info!(
                "ratelimit: the shared store answers again after {:.1?} ({} failed syncs); limits are shared again",
                since.elapsed(),
                self.failures
            );
            self.failures = 0;
        }
    }
}
