//! Logging through the `log` crate: JSON lines (or plain text) on stderr. Lines are formatted on
//! the calling thread and handed to a writer thread over a bounded channel, so a core never
//! blocks on a slow or full stderr; if the writer falls behind, lines are dropped and counted
//! rather than stalling the data plane.
//!
//! Access lines (one per request) do not go through `log`: a core writes each one by hand
//! (`CoreAccess`, no `core::fmt`, no allocation) into its own buffer, and hands the writer one
//! buffer per event-loop turn (`crate::batch`). Through `log` they cost a formatted copy, three
//! allocations, a channel send per line and, for `format: text`, a JSON parse of the line:
//! about a quarter of a request.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{LevelFilter, Log, Metadata, Record};

use crate::batch::{self, Consumer, CoreBatch, Handoff};
use crate::config::LogFormat;
use crate::encode::{self, Rfc3339Millis};

/// Target used for one-JSON-object-per-request access lines.
pub(crate) const ACCESS: &str = "access";

const QUEUE: usize = 16 * 1024;
/// Access lines one core holds while the writer is behind, before it drops (and counts) them.
const CORE_ACCESS_LINES: usize = 4 * 1024;

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Where the cores' access lines go, set once by `init`.
static ACCESS_OUT: std::sync::OnceLock<(LogFormat, Handoff)> = std::sync::OnceLock::new();

struct Logger {
    filter: Filter,
    format: LogFormat,
    tx: Sender<String>,
    access: std::sync::Arc<Consumer>,
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

    /// Waits (bounded) until the writer has taken every queued line, and the cores have handed
    /// over their access lines; called before exit.
    fn flush(&self) {
        let start = std::time::Instant::now();
        while !(self.tx.is_empty() && self.access.idle())
            && start.elapsed() < std::time::Duration::from_secs(1)
        {
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

/// Installs the logger once per process; later calls are ignored.
pub fn init(level: LevelFilter, format: LogFormat) {
    let filter = Filter::parse(level, std::env::var("RUST_LOG").ok().as_deref());
    let max = filter.max();
    let (tx, rx) = crossbeam_channel::bounded::<String>(QUEUE);
    let (handoff, access) = batch::channel(QUEUE);
    let access = std::sync::Arc::new(access);
    let logger = Logger {
        filter,
        format,
        tx,
        access: access.clone(),
    };
    if log::set_boxed_logger(Box::new(logger)).is_err() {
        return;
    }
    let _ = ACCESS_OUT.set((format, handoff));
    log::set_max_level(max);
    let spawned = std::thread::Builder::new()
        .name("llmproxy-log".into())
        .spawn(move || write_loop(&rx, &access));
    if let Err(e) = spawned {
        eprintln!("llmproxy: cannot start the log writer thread: {e}");
    }
}

/// The writer thread: log lines and the cores' access batches to stderr, whatever queued up
/// meanwhile in the same write (one syscall per batch, not per line).
fn write_loop(rx: &Receiver<String>, access: &Consumer) {
    let stderr = std::io::stderr();
    let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
    let add_access = |batch: &mut Vec<u8>, b: batch::Batch| {
        batch.extend_from_slice(b.text.as_bytes());
        access.give_back(b);
    };
    loop {
        batch.clear();
        crossbeam_channel::select! {
            recv(rx) -> line => match line {
                Ok(line) => batch.extend_from_slice(line.as_bytes()),
                Err(_) => return,
            },
            recv(access.receiver()) -> b => match b {
                Ok(b) => add_access(&mut batch, access.took(b)),
                Err(_) => return,
            },
        }
        for more in rx.try_iter().take(1024) {
            batch.extend_from_slice(more.as_bytes());
            if batch.len() >= 64 * 1024 {
                break;
            }
        }
        while batch.len() < 64 * 1024 {
            match access.try_recv() {
                Some(b) => add_access(&mut batch, b),
                None => break,
            }
        }
        let mut out = stderr.lock();
        let _ = out.write_all(&batch);
        let _ = out.flush();
        drop(out);
        std::thread::sleep(batch::LINGER);
    }
}

/// One core's access log: lines written in place into its batch (see the module header).
pub(crate) struct CoreAccess {
    format: LogFormat,
    batch: CoreBatch,
}

impl CoreAccess {
    /// This core's access log, once `init` has run (no logger, no access lines).
    pub(crate) fn new() -> Option<CoreAccess> {
        ACCESS_OUT.get().map(|(format, out)| CoreAccess {
            format: *format,
            batch: CoreBatch::new(out.clone(), CORE_ACCESS_LINES),
        })
    }

    /// Writes one access line: the envelope (`ts`, …), then the fields `fields` adds, in the
    /// order it adds them. A line this core cannot hold (the writer stuck) is dropped and counted.
    pub(crate) fn line(&self, ts: &Rfc3339Millis, fields: impl FnOnce(&mut AccessFields<'_>)) {
        let format = self.format;
        let ok = self.batch.push(|out| write_access(out, format, ts, fields));
        if !ok {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hands over what this core holds (on the tick: what the turn-end flush could not).
    pub(crate) fn flush(&self) {
        self.batch.flush();
    }

    /// The turn-end flush task (`CoreBatch::run`).
    pub(crate) async fn run(&self) {
        self.batch.run().await;
    }
}

/// One access line without its newline: for JSON the object `{"ts","level","type",...}`, for text
/// `<ts> access key=value ...`.
fn write_access(
    out: &mut String,
    format: LogFormat,
    ts: &Rfc3339Millis,
    fields: impl FnOnce(&mut AccessFields<'_>),
) {
    let text = format == LogFormat::Text;
    if text {
        ts.push(out);
        out.push_str(" access");
    } else {
        out.push_str("{\"ts\":\"");
        ts.push(out);
        out.push_str("\",\"level\":\"INFO\",\"type\":\"access\"");
    }
    fields(&mut AccessFields { out, text });
    if !text {
        out.push('}');
    }
}

/// No whitespace (Unicode's, as `char::is_whitespace`) and no `"`: bytewise for ASCII.
fn no_space_or_quote(v: &str) -> bool {
    if v.is_ascii() {
        !v.bytes().any(|b| matches!(b, b'\t'..=b'\r' | b' ' | b'"'))
    } else {
        !v.contains(|c: char| c.is_whitespace() || c == '"')
    }
}

/// The fields of one access line: `"key":value` members of the JSON object, or for
/// `format: text` ` key=value` pairs, `null`s left out and strings quoted (JSON-escaped) only
/// when empty or holding whitespace or a quote.
pub(crate) struct AccessFields<'a> {
    out: &'a mut String,
    text: bool,
}

/// A field's name as both formats write it in front of the value (`,"name":` and ` name=`), so
/// it goes out in one copy: `access_key!("name")`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AccessKey {
    pub(crate) json: &'static str,
    pub(crate) text: &'static str,
}

macro_rules! access_key {
    ($name:literal) => {
        $crate::telemetry::logging::AccessKey {
            json: concat!(",\"", $name, "\":"),
            text: concat!(" ", $name, "="),
        }
    };
}
pub(crate) use access_key;

impl AccessFields<'_> {
    fn key(&mut self, k: AccessKey) {
        self.out.push_str(if self.text { k.text } else { k.json });
    }

    fn null(&mut self, k: AccessKey) {
        if !self.text {
            self.key(k);
            self.out.push_str("null");
        }
    }

    pub(crate) fn str(&mut self, k: AccessKey, v: Option<&str>) {
        let Some(v) = v else {
            return self.null(k);
        };
        self.key(k);
        if self.text && !v.is_empty() && no_space_or_quote(v) {
            self.out.push_str(v);
        } else {
            encode::push_json_str(self.out, v);
        }
    }

    /// A string `write` appends that never needs escaping and is never empty nor holds
    /// whitespace (an address).
    pub(crate) fn plain(&mut self, k: AccessKey, write: impl FnOnce(&mut String)) {
        self.key(k);
        if !self.text {
            self.out.push('"');
        }
        write(self.out);
        if !self.text {
            self.out.push('"');
        }
    }

    pub(crate) fn u64(&mut self, k: AccessKey, v: u64) {
        self.key(k);
        encode::push_u64(self.out, v);
    }

    /// Milliseconds with microsecond resolution, as `encode::push_millis` writes them.
    pub(crate) fn millis(&mut self, k: AccessKey, micros: Option<u64>) {
        let Some(us) = micros else {
            return self.null(k);
        };
        self.key(k);
        encode::push_millis(self.out, us);
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

    /// What access lines were before they were written by hand: the JSON object through
    /// `log` with the envelope spliced in front, and for text that object parsed back and
    /// printed as pairs. The hand-written lines must equal these byte for byte.
    fn old_line(format: LogFormat, ts: &str, json: &str) -> String {
        fn text_fields(json: &str) -> String {
            let Ok(serde_json::Value::Object(map)) =
                serde_json::from_str::<serde_json::Value>(json)
            else {
                return json.to_string();
            };
            let mut out = String::with_capacity(json.len());
            for (k, v) in map {
                let v = match v {
                    serde_json::Value::Null => continue,
                    serde_json::Value::String(s)
                        if !s.is_empty()
                            && !s.contains(|c: char| c.is_whitespace() || c == '"') =>
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
        match format {
            LogFormat::Json => {
                let body = json.strip_prefix('{').unwrap_or(json);
                format!("{{\"ts\":\"{ts}\",\"level\":\"INFO\",\"type\":\"access\",{body}")
            }
            LogFormat::Text => format!("{ts} access {}", text_fields(json)),
        }
    }

    #[test]
    fn the_ascii_space_test_is_char_is_whitespace() {
        for c in (0..=0x7fu8)
            .map(char::from)
            .chain(['\u{85}', '\u{a0}', 'é', '\u{3000}'])
        {
            let v = format!("a{c}b");
            assert_eq!(
                no_space_or_quote(&v),
                !(c.is_whitespace() || c == '"'),
                "{c:?}"
            );
        }
    }

    #[test]
    fn access_lines_are_written_exactly_as_before() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_796_000_000_123);
        let ts = humantime::format_rfc3339_millis(now).to_string();
        type Sample<'a> = (Option<&'a str>, &'a str, Option<&'a str>, u64, Option<u64>);
        let samples: [Sample; 4] = [
            (None, "127.0.0.1:5", Some("m x"), 1500, None),
            (
                Some("http://b:1"),
                "[::1]:80",
                Some("llama-3"),
                141_339,
                Some(2_000),
            ),
            (Some(""), "10.0.0.2:1", Some("q\"uote\\ \u{1}"), 0, Some(1)),
            (Some("ü"), "10.0.0.2:1", None, 987_654_321, Some(120)),
        ];
        for (backend, client, model, dur, ttft) in samples {
            for format in [LogFormat::Json, LogFormat::Text] {
                let mut got = String::new();
                write_access(&mut got, format, &Rfc3339Millis::new(now), |l| {
                    l.str(access_key!("backend"), backend);
                    l.plain(access_key!("client"), |o| o.push_str(client));
                    l.u64(access_key!("completion_tokens"), 3);
                    l.millis(access_key!("duration_ms"), Some(dur));
                    l.str(access_key!("model"), model);
                    l.millis(access_key!("ttft_ms"), ttft);
                });
                // The object as account.rs built it before, through serde_json for the values.
                let ms = |us: u64| serde_json::to_string(&(us as f64 / 1000.0)).unwrap();
                let json = format!(
                    "{{\"backend\":{},\"client\":\"{client}\",\"completion_tokens\":3,\"duration_ms\":{},\"model\":{},\"ttft_ms\":{}}}",
                    serde_json::to_string(&backend).unwrap(),
                    ms(dur).trim_end_matches(".0"),
                    serde_json::to_string(&model).unwrap(),
                    ttft.map_or("null".into(), |t| ms(t).trim_end_matches(".0").to_string()),
                );
                assert_eq!(got, old_line(format, &ts, &json), "{format:?}");
            }
        }
    }
}
