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
    level: LevelFilter,
    format: LogFormat,
    tx: Sender<String>,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
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
        LogFormat::Text => format!("{ts} {:<5} {}: {msg}\n", record.level(), record.target()),
    }
}

/// Log lines dropped because the writer could not keep up.
pub(crate) fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// `RUST_LOG` (a plain level such as `debug`, or `llmproxy=debug`) overrides the configured level.
fn effective_level(configured: LevelFilter) -> LevelFilter {
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| {
            v.split(',')
                .filter_map(|part| part.rsplit('=').next())
                .filter_map(|l| l.trim().parse::<LevelFilter>().ok())
                .max()
        })
        .unwrap_or(configured)
}

/// Installs the logger once per process; later calls are ignored.
pub fn init(level: LevelFilter, format: LogFormat) {
    let level = effective_level(level);
    let (tx, rx) = crossbeam_channel::bounded::<String>(QUEUE);
    let logger = Logger { level, format, tx };
    if log::set_boxed_logger(Box::new(logger)).is_err() {
        return;
    }
    log::set_max_level(level);
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
