//! Usage metering: one event per finished inference request, streaming or not, aborted or not.
//! A core writes each event's JSON line straight from what it borrows (`UsageRecord`: no owned
//! strings) into its own buffer, handed to the usage intake once per event-loop turn
//! (`crate::batch`; the intake gives the buffers back). Before, a core allocated the event's ten
//! strings and the intake freed them: every event moved memory from the cores' allocator caches
//! to another thread's. `CoreSender` never blocks: a bounded channel, then what a core may hold
//! itself (flushed again on the tick), and only beyond that a counted drop. Events are spooled
//! and delivered off the cores by `deliver`.
//!
//! `UsageRecord::write_json` is the event's only serialiser: every spool line, log line and webhook
//! body (single or batch) is made of its output, and `tests::to_json_writes_the_pinned_format`
//! pins that output byte for byte, because receivers parse it. It is written by hand rather than
//! derived with serde because it is faster on the usage thread, which serialises every event:
//! measured 218 ns against 377 ns for `serde_json::to_string` of the derive (283 ns even into a
//! reused buffer), and 264 ns against 382 ns with strings that need escaping (`cargo bench --bench
//! micro -- usage_event`, benches/micro.rs `usage_event_json`). Nothing reads events back into
//! this type (the spool replays lines as text), so it derives neither `Serialize` nor
//! `Deserialize`.

pub mod deliver;
mod due;
pub(crate) mod spool;

use std::cell::Cell;

use crate::batch::{self, CoreBatch};
pub use crate::batch::{Consumer, Handoff};
use crate::encode;
pub use crate::encode::Rfc3339Millis as Timestamp;

/// Events the channel from all cores to the usage thread may hold. The channel itself is
/// unbounded (a linked list of small blocks) and this bound is checked on send: a bounded
/// crossbeam channel allocates and touches every slot up front, which for 64 Ki events was
/// 20 MB of resident memory in an idle proxy.
pub const CHANNEL_CAPACITY: usize = 64 * 1024;
/// Events a core keeps itself while the channel is full, before it counts drops.
const OVERFLOW_MAX: usize = 16 * 1024;

/// The channel from the cores (one `CoreSender` each) to the usage intake.
pub fn channel() -> (Handoff, Consumer) {
    batch::channel(CHANNEL_CAPACITY)
}

/// The billing contract (DESIGN.md §5). Field names follow the seed's webhook payload; its raw
/// `api_key` is replaced by `key_id`, a hash that cannot be turned back into the key.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageEvent {
    pub event_id: String,
    pub request_id: String,
    pub timestamp: String,
    pub model: Option<String>,
    pub endpoint: String,
    pub backend_url: Option<String>,
    pub is_stream: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cached_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
    pub status: u16,
    pub outcome: String,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    pub user_id: Option<String>,
    pub key_id: Option<String>,
    /// Where the token counts came from: `reported` (the engine's own figures, final or
    /// running) or `counted` (the proxy counted what it relayed).
    pub usage_source: &'static str,
    /// The model that served the request after an alias rewrite or a fallback (`model` stays
    /// what the client asked for).
    pub served_model: Option<String>,
    /// The class the request would wait as for a backend slot (`high`, `normal`, `low`);
    /// `None` for requests refused before that was known.
    pub priority: Option<&'static str>,
}

/// Whether usage events have a reader: the webhook, or the usage log. Without either a core
/// writes none (the token counts still reach the metrics and the access line); both settings
/// are read at startup only (a reload keeps them), so a core can ask its configuration.
pub(crate) fn has_reader(hook: &crate::config::UsageHook, usage: &crate::config::Usage) -> bool {
    hook.enabled || usage.log
}

/// A random 128-bit id, hex encoded: the idempotency key of one event.
pub fn new_event_id() -> String {
    let mut s = String::with_capacity(32);
    encode::push_hex(&mut s, fastrand::u128(..), 32);
    s
}

/// A string field of `UsageRecord` that a core does not have as a string: written straight into
/// the line.
#[derive(Debug, Clone, Copy)]
pub enum Text<'a> {
    Given(&'a str),
    /// A random 128-bit id, written as `new_event_id` would have.
    Hex(u128),
    /// RFC 3339 UTC with milliseconds, as `humantime::format_rfc3339_millis` writes it.
    Time(Timestamp),
}

impl Text<'_> {
    fn write_json(&self, o: &mut String) {
        match *self {
            Text::Given(s) => encode::push_json_str(o, s),
            Text::Hex(v) => {
                o.push('"');
                encode::push_hex(o, v, 32);
                o.push('"');
            }
            Text::Time(t) => {
                o.push('"');
                t.push(o);
                o.push('"');
            }
        }
    }
}

/// A usage event as a core has it: every string borrowed. Same fields, same meaning, same JSON as
/// `UsageEvent` (which is this with owned strings, for tests and tools).
#[derive(Debug, Clone, Copy)]
pub struct UsageRecord<'a> {
    pub event_id: Text<'a>,
    pub request_id: &'a str,
    pub timestamp: Text<'a>,
    pub model: Option<&'a str>,
    pub endpoint: &'a str,
    pub backend_url: Option<&'a str>,
    pub is_stream: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cached_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
    pub status: u16,
    pub outcome: &'a str,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    pub user_id: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub usage_source: &'static str,
    pub served_model: Option<&'a str>,
    pub priority: Option<&'static str>,
}

impl UsageEvent {
    /// The event as one JSON object (`UsageRecord::write_json`).
    pub fn to_json(&self) -> String {
        let mut o = String::with_capacity(512);
        self.record().write_json(&mut o);
        o
    }

    /// The event with its strings borrowed.
    pub fn record(&self) -> UsageRecord<'_> {
        UsageRecord {
            event_id: Text::Given(&self.event_id),
            request_id: &self.request_id,
            timestamp: Text::Given(&self.timestamp),
            model: self.model.as_deref(),
            endpoint: &self.endpoint,
            backend_url: self.backend_url.as_deref(),
            is_stream: self.is_stream,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.total_tokens,
            cached_tokens: self.cached_tokens,
            reasoning_tokens: self.reasoning_tokens,
            status: self.status,
            outcome: &self.outcome,
            latency_ms: self.latency_ms,
            ttft_ms: self.ttft_ms,
            user_id: self.user_id.as_deref(),
            key_id: self.key_id.as_deref(),
            usage_source: self.usage_source,
            served_model: self.served_model.as_deref(),
            priority: self.priority,
        }
    }
}

impl UsageRecord<'_> {
    /// Appends the event as one JSON object in the format receivers parse (see the module
    /// header): fields in declaration order, `cached_tokens` and `reasoning_tokens` left out when
    /// absent, every other absent value `null`, strings escaped as serde_json escapes them.
    pub fn write_json(&self, o: &mut String) {
        // Each key with the comma before it is one constant: one copy, not four pushes.
        macro_rules! key {
            ($o:expr, $k:literal) => {
                $o.push_str(concat!(",\"", $k, "\":"))
            };
        }
        o.push_str("{\"event_id\":");
        self.event_id.write_json(o);
        key!(o, "request_id");
        encode::push_json_str(o, self.request_id);
        key!(o, "timestamp");
        self.timestamp.write_json(o);
        key!(o, "model");
        encode::push_json_opt_str(o, self.model);
        key!(o, "endpoint");
        encode::push_json_str(o, self.endpoint);
        key!(o, "backend_url");
        encode::push_json_opt_str(o, self.backend_url);
        key!(o, "is_stream");
        o.push_str(if self.is_stream { "true" } else { "false" });
        key!(o, "prompt_tokens");
        encode::push_u64(o, self.prompt_tokens);
        key!(o, "completion_tokens");
        encode::push_u64(o, self.completion_tokens);
        key!(o, "total_tokens");
        encode::push_u64(o, self.total_tokens);
        if let Some(v) = self.cached_tokens {
            key!(o, "cached_tokens");
            encode::push_u64(o, v);
        }
        if let Some(v) = self.reasoning_tokens {
            key!(o, "reasoning_tokens");
            encode::push_u64(o, v);
        }
        key!(o, "status");
        encode::push_u64(o, u64::from(self.status));
        key!(o, "outcome");
        encode::push_json_str(o, self.outcome);
        key!(o, "latency_ms");
        encode::push_u64(o, self.latency_ms);
        key!(o, "ttft_ms");
        encode::push_opt_u64(o, self.ttft_ms);
        key!(o, "user_id");
        encode::push_json_opt_str(o, self.user_id);
        key!(o, "key_id");
        encode::push_json_opt_str(o, self.key_id);
        // Added after the seed's fields, so each event still starts with exactly the bytes it
        // had before they existed.
        key!(o, "usage_source");
        encode::push_json_str(o, self.usage_source);
        key!(o, "served_model");
        encode::push_json_opt_str(o, self.served_model);
        key!(o, "priority");
        encode::push_json_opt_str(o, self.priority);
        o.push('}');
    }
}

/// One core's way out for events (see the module header). Never blocks.
pub struct CoreSender {
    batch: CoreBatch,
    dropped: Cell<u64>,
}

impl CoreSender {
    pub fn new(out: Handoff) -> Self {
        CoreSender {
            batch: CoreBatch::new(out, OVERFLOW_MAX),
            dropped: Cell::new(0),
        }
    }

    /// Writes the event into this core's batch. Order is kept. `false` (counted in `dropped`)
    /// when the core already holds `OVERFLOW_MAX` events the intake has not taken.
    pub fn send(&self, ev: &UsageRecord<'_>) -> bool {
        let ok = self.batch.push(|o| ev.write_json(o));
        if !ok {
            self.dropped.set(self.dropped.get() + 1);
        }
        ok
    }

    /// Hands what this core holds to the intake, as far as the channel has room (the tick; a
    /// running core also does it at the end of every turn, `run`).
    pub fn tick(&self) {
        self.batch.flush();
    }

    /// The turn-end flush task (`crate::batch::CoreBatch::run`).
    pub async fn run(&self) {
        self.batch.run().await;
    }

    /// Events this core holds that the intake has not taken yet.
    pub fn backlog(&self) -> usize {
        self.batch.held()
    }

    /// Events this core had to drop (both channel and overflow full).
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_a_reader_with_the_webhook_or_the_usage_log() {
        let (mut hook_cfg, mut usage_cfg) = (
            crate::config::UsageHook::default(),
            crate::config::Usage::default(),
        );
        for (hook, log) in [(false, false), (true, false), (false, true), (true, true)] {
            hook_cfg.enabled = hook;
            usage_cfg.log = log;
            assert_eq!(has_reader(&hook_cfg, &usage_cfg), hook || log);
        }
    }

    fn ev(n: u64) -> UsageEvent {
        UsageEvent {
            event_id: new_event_id(),
            request_id: n.to_string(),
            timestamp: String::new(),
            model: None,
            endpoint: "/v1/chat/completions".into(),
            backend_url: None,
            is_stream: false,
            prompt_tokens: n,
            completion_tokens: 0,
            total_tokens: n,
            cached_tokens: None,
            reasoning_tokens: None,
            status: 200,
            outcome: "ok".into(),
            latency_ms: 0,
            ttft_ms: None,
            user_id: None,
            key_id: None,
            usage_source: "reported",
            served_model: None,
            priority: None,
        }
    }

    fn taken(rx: &Consumer) -> Vec<u64> {
        let mut got = Vec::new();
        while let Some(b) = rx.try_recv() {
            for line in b.text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                got.push(v["prompt_tokens"].as_u64().unwrap());
            }
            rx.give_back(b);
        }
        got
    }

    /// The intake stuck: the core holds what the channel cannot take, in order, hands it over
    /// on the tick once there is room, and counts (never waits for) what is beyond its bound.
    #[test]
    fn overflow_keeps_order_and_drains_on_tick() {
        let (tx, rx) = batch::channel(2);
        let s = CoreSender::new(tx);
        for n in 0..2 {
            assert!(s.send(&ev(n).record()));
        }
        s.tick();
        for n in 2..5 {
            assert!(s.send(&ev(n).record()));
            s.tick();
        }
        assert_eq!(s.backlog(), 3);
        assert!(!rx.idle(), "events held on a core are pending");
        assert_eq!(taken(&rx), vec![0, 1]);
        s.tick();
        assert!(s.send(&ev(5).record()));
        s.tick();
        assert_eq!(taken(&rx), vec![2, 3, 4]);
        s.tick();
        assert_eq!(taken(&rx), vec![5]);
        assert!(rx.idle());
        assert_eq!(s.dropped(), 0);

        let (tx, rx) = batch::channel(1);
        let s = CoreSender::new(tx);
        assert!(s.send(&ev(0).record()));
        s.tick();
        for n in 1..=OVERFLOW_MAX as u64 {
            assert!(s.send(&ev(n).record()));
        }
        assert!(!s.send(&ev(0).record()));
        assert_eq!(s.dropped(), 1);
        assert_eq!(taken(&rx), vec![0]);
        s.tick();
        assert_eq!(taken(&rx), (1..=OVERFLOW_MAX as u64).collect::<Vec<_>>());
    }

    /// What a core writes without owning a string is what the owned event serialises to.
    #[test]
    fn a_record_with_generated_fields_writes_what_the_event_would() {
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_796_000_000_123);
        let id = 0x0123_4567_89ab_cdef_0011_2233_4455_6677_u128;
        let mut e = ev(7);
        e.event_id = {
            let mut s = String::new();
            encode::push_hex(&mut s, id, 32);
            s
        };
        e.timestamp = humantime::format_rfc3339_millis(now).to_string();
        let mut r = e.record();
        r.event_id = Text::Hex(id);
        r.timestamp = Text::Time(Timestamp::new(now));
        let mut line = String::from("x");
        r.write_json(&mut line);
        assert_eq!(line, format!("x{}", e.to_json()));
    }

    /// The wire format receivers parse, pinned byte for byte: key order, optional token counts
    /// left out when absent, other absent values as `null`, serde_json's string escaping.
    #[test]
    fn to_json_writes_the_pinned_format() {
        let mut e = UsageEvent {
            event_id: "0123456789abcdef0123456789abcdef".into(),
            request_id: "r\"1".into(),
            timestamp: "2026-11-26T23:00:00.000Z".into(),
            model: Some("llama \\ 3".into()),
            endpoint: "/v1/chat/completions".into(),
            backend_url: None,
            is_stream: true,
            prompt_tokens: 12,
            completion_tokens: 0,
            total_tokens: u64::MAX,
            cached_tokens: Some(3),
            reasoning_tokens: None,
            status: 200,
            outcome: "ok".into(),
            latency_ms: 5,
            ttft_ms: None,
            user_id: Some("ü\n\u{1}\t".into()),
            key_id: Some("5e5510a1c0ffee00".into()),
            usage_source: "reported",
            served_model: Some("llama-3-8b".into()),
            priority: Some("normal"),
        };
        assert_eq!(
            e.to_json(),
            r#"{"event_id":"0123456789abcdef0123456789abcdef","request_id":"r\"1","timestamp":"2026-11-26T23:00:00.000Z","model":"llama \\ 3","endpoint":"/v1/chat/completions","backend_url":null,"is_stream":true,"prompt_tokens":12,"completion_tokens":0,"total_tokens":18446744073709551615,"cached_tokens":3,"status":200,"outcome":"ok","latency_ms":5,"ttft_ms":null,"user_id":"ü\n\u0001\t","key_id":"5e5510a1c0ffee00","usage_source":"reported","served_model":"llama-3-8b","priority":"normal"}"#
        );
        // What a receiver's JSON parser reads back is what was sent.
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["request_id"], "r\"1");
        assert_eq!(v["model"], "llama \\ 3");
        assert_eq!(v["user_id"], "ü\n\u{1}\t");
        assert_eq!(v["total_tokens"].as_u64(), Some(u64::MAX));

        e.cached_tokens = None;
        e.reasoning_tokens = Some(0);
        e.ttft_ms = Some(1);
        e.backend_url = Some("http://b:1".into());
        e.model = None;
        e.is_stream = false;
        e.user_id = None;
        e.key_id = None;
        e.usage_source = "counted";
        e.served_model = None;
        assert_eq!(
            e.to_json(),
            r#"{"event_id":"0123456789abcdef0123456789abcdef","request_id":"r\"1","timestamp":"2026-11-26T23:00:00.000Z","model":null,"endpoint":"/v1/chat/completions","backend_url":"http://b:1","is_stream":false,"prompt_tokens":12,"completion_tokens":0,"total_tokens":18446744073709551615,"reasoning_tokens":0,"status":200,"outcome":"ok","latency_ms":5,"ttft_ms":1,"user_id":null,"key_id":null,"usage_source":"counted","served_model":null,"priority":"normal"}"#
        );
    }
}
