//! Logging through the `log` crate: JSON lines (or plain text) on stderr. Lines are formatted on
//! the calling thread and handed to a writer thread over a bounded channel, so a core never
//! blocks on a slow or full stderr; if the writer falls behind, lines are dropped and counted
//! rather than stalling the data plane.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use crossbeam_channel::{Sender, TrySendError};
use log::{LevelFilter, Log, Metadata, Record};

use crate::config::LogFormat;

/// Target used for one-JSON-object-per-request access lines.
pub(crate) const ACCESS: &str = "access";

const QUEUE: usize = 16 * 1024;

static DROPPED: AtomicU64 = AtomicU64::new(0);

struct Logger {
    filter: Filter,
    format: LogFormat,
    tx: Sender<String>,
}

/// Which records are written: a default level, and levels for targets (`RUST_LOG`'s
/// `target=level` directives; the longest matching target prefix wins), so
/// `RUST_LOG=llmproxy=trace` traces the proxy without the HTTP client library's own trace.
#[derive(Debug, Clone, PartialEq)]
struct Filter {
    default: LevelFilter,
    targets: Vec<(String, LevelFilter)>,
}

impl Filter {
    /// `RUST_LOG` over the configured level: a bare level replaces the default, `target=level`
    /// directives apply to targets starting with `target` (module paths: `llmproxy`,
    /// `llmproxy::proxy`, `ureq`, or `access` for access lines). Unreadable parts are ignored.
    fn parse(configured: LevelFilter, rust_log: Option<&str>) -> Filter {
        let mut f = Filter {
            default: configured,
            targets: Vec::new(),
        };
        for part in rust_log.unwrap_or("").split(',').map(str::trim) {
            match part.split_once('=') {
                Some((target, level)) => {
                    if let Ok(level) = level.trim().parse::<LevelFilter>() {
                        f.targets.push((target.trim().to_string(), level));
                    }
                }
                None => {
                    if let Ok(level) = part.parse::<LevelFilter>() {
                        f.default = level;
                    }
                }
            }
        }
        // Longest first, so the first match is the most specific.
        f.targets.sort_by_key(|t| std::cmp::Reverse(t.0.len()));
        f
    }

    fn level_for(&self, target: &str) -> LevelFilter {
        self.targets
            .iter()
            .find(|(t, _)| {
                target == t
                    || target
                        .strip_prefix(t.as_str())
                        .is_some_and(|r| r.starts_with("::"))
            })
            .map_or(self.default, |(_, l)| *l)
    }

    fn max(&self) -> LevelFilter {
        self.targets
            .iter()
            .map(|(_, l)| *l)
            .fold(self.default, std::cmp::Ord::max)
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.filter.level_for(metadata.target())
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format_line(self.format, record);
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(line)) => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    /// Waits (bounded) until the writer has taken every queued line; called before exit.
    fn flush(&self) {
        let start = std::time::Instant::now();
        while !self.tx.is_empty() && start.elapsed() < std::time::Duration::from_secs(1) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // The writer may still be writing its last batch.
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn format_line(format: LogFormat, record: &Record) -> String {
    let ts = humantime::format_rfc3339_millis(SystemTime::now());
    let msg = record.args().to_string();
    match format {
        LogFormat::Json if record.target() == ACCESS => {
            // Access lines are already a JSON object; add the envelope fields in front.
            let body = msg.strip_prefix('{').unwrap_or(&msg);
            format!("{{\"ts\":\"{ts}\",\"level\":\"INFO\",\"type\":\"access\",{body}\n")
        }
        LogFormat::Json => {
            let v = serde_json::json!({
                "ts": ts.to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "msg": msg,
            });
            format!("{v}\n")
        }
        LogFormat::Text if record.target() == ACCESS => {
            format!("{ts} access {}\n", text_fields(&msg))
        }
        LogFormat::Text => format!("{ts} {:<5} {}: {msg}\n", record.level(), record.target()),
    }
}

/// An access line (a JSON object) as `key=value` pairs for `logging.format: text`; strings with
/// spaces or quotes stay quoted, `null`s are left out.
fn text_fields(json: &str) -> String {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(json) else {
        return json.to_string();
    };
    let mut out = String::with_capacity(json.len());
    for (k, v) in map {
        let v = match v {
            serde_json::Value::Null => continue,
            serde_json::Value::String(s)
                if !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c == '"') =>
            {
                s
            }
            other => other.to_string(),
        };
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&k);
        out.push('=');
        out.push_str(&v);
    }
    out
}

/// Log lines dropped because the writer could not keep up.
pub(crate) fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Installs the logger once per process; later calls are ignored.
pub fn init(level: LevelFilter, format: LogFormat) {
    let filter = Filter::parse(level, std::env::var("RUST_LOG").ok().as_deref());
    let max = filter.max();
    let (tx, rx) = crossbeam_channel::bounded::<String>(QUEUE);
    let logger = Logger { filter, format, tx };
    if log::set_boxed_logger(Box::new(logger)).is_err() {
        return;
    }
    log::set_max_level(max);
    let spawned = std::thread::Builder::new()
        .name("llmproxy-log".into())
        .spawn(move || {
            let stderr = std::io::stderr();
            // Whatever queued up meanwhile goes out in the same write: one syscall per batch,
            // not per line, which under load was one per request.
            let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
            for line in rx.iter() {
                batch.clear();
                batch.extend_from_slice(line.as_bytes());
                for more in rx.try_iter().take(1024) {
                    batch.extend_from_slice(more.as_bytes());
                    if batch.len() >= 64 * 1024 {
                        break;
                    }
                }
                let mut out = stderr.lock();
                let _ = out.write_all(&batch);
                let _ = out.flush();
            }
        });
    if let Err(e) = spawned {
        eprintln!("llmproxy: cannot start the log writer thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_targets_apply_to_their_targets_only() {
        let f = Filter::parse(LevelFilter::Info, Some("llmproxy=trace"));
        assert_eq!(f.level_for("llmproxy::proxy::conn"), LevelFilter::Trace);
        assert_eq!(f.level_for("llmproxy"), LevelFilter::Trace);
        assert_eq!(f.level_for("ureq::unit"), LevelFilter::Info);
        assert_eq!(f.level_for("llmproxyx"), LevelFilter::Info);
        assert_eq!(f.max(), LevelFilter::Trace);
        let f = Filter::parse(
            LevelFilter::Info,
            Some("warn,llmproxy::proxy=debug,access=off"),
        );
        assert_eq!(f.level_for("llmproxy::proxy::relay"), LevelFilter::Debug);
        assert_eq!(f.level_for("llmproxy::control"), LevelFilter::Warn);
        assert_eq!(f.level_for(ACCESS), LevelFilter::Off);
        assert_eq!(
            Filter::parse(LevelFilter::Info, Some("debug")).default,
            LevelFilter::Debug
        );
        assert_eq!(
            Filter::parse(LevelFilter::Warn, Some("x=nonsense,")).max(),
            LevelFilter::Warn
        );
        assert_eq!(
            Filter::parse(LevelFilter::Warn, None).max(),
            LevelFilter::Warn
        );
    }

    #[test]
    fn text_access_lines_are_key_value_pairs() {
        let line = r#"{"backend":null,"client":"127.0.0.1:5","duration_ms":1.5,"model":"m x","status":200}"#;
        assert_eq!(
            text_fields(line),
            r#"client=127.0.0.1:5 duration_ms=1.5 model="m x" status=200"#
        );
        assert_eq!(text_fields("not json"), "not json");
    }
}
