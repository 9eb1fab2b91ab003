//! Usage metering: one `UsageEvent` per finished inference request, streaming or not, aborted or
//! not. Cores build events and hand them to `CoreSender`, which never blocks: a bounded channel,
//! then a small per-core overflow retried on the tick, and only beyond that a counted drop.
//! Events are serialised, spooled and delivered off the cores by `deliver`.
//!
//! `UsageEvent::to_json` is the event's only serialiser: every spool line, log line and webhook
//! body (single or batch) is made of its output, and `tests::to_json_writes_the_pinned_format`
//! pins that output byte for byte, because receivers parse it. It is written by hand rather than
//! derived with serde because it is faster on the usage thread, which serialises every event:
//! measured 218 ns against 377 ns for `serde_json::to_string` of the derive (283 ns even into a
//! reused buffer), and 264 ns against 382 ns with strings that need escaping (`cargo bench --bench
//! micro -- usage_event`, benches/micro.rs `usage_event_json`). Nothing reads events back into
//! this type (the spool replays lines as text), so it derives neither `Serialize` nor
//! `Deserialize`.

pub mod deliver;
pub(crate) mod spool;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use crossbeam_channel::{Sender, TrySendError};

use crate::encode;

/// Events the channel from all cores to the usage thread may hold. The channel itself is
/// unbounded (a linked list of small blocks) and this bound is checked on send: a bounded
/// crossbeam channel allocates and touches every slot up front, which for 64 Ki events was
/// 20 MB of resident memory in an idle proxy.
pub const CHANNEL_CAPACITY: usize = 64 * 1024;
/// Events a core keeps itself while the channel is full, before it counts drops.
const OVERFLOW_MAX: usize = 16 * 1024;

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

/// A random 128-bit id, hex encoded: the idempotency key of one event.
pub fn new_event_id() -> String {
    let mut s = String::with_capacity(32);
    encode::push_hex(&mut s, fastrand::u128(..), 32);
    s
}

impl UsageEvent {
    /// The event as one JSON object in the format receivers parse (see the module header):
    /// fields in declaration order, `cached_tokens` and `reasoning_tokens` left out when absent,
    /// every other absent value `null`, strings escaped as serde_json escapes them.
    pub fn to_json(&self) -> String {
        let mut o = String::with_capacity(512);
        let key = |o: &mut String, k: &str| {
            o.push(if o.is_empty() { '{' } else { ',' });
            o.push('"');
            o.push_str(k);
            o.push_str("\":");
        };
        key(&mut o, "event_id");
        encode::push_json_str(&mut o, &self.event_id);
        key(&mut o, "request_id");
        encode::push_json_str(&mut o, &self.request_id);
        key(&mut o, "timestamp");
        encode::push_json_str(&mut o, &self.timestamp);
        key(&mut o, "model");
        encode::push_json_opt_str(&mut o, self.model.as_deref());
        key(&mut o, "endpoint");
        encode::push_json_str(&mut o, &self.endpoint);
        key(&mut o, "backend_url");
        encode::push_json_opt_str(&mut o, self.backend_url.as_deref());
        key(&mut o, "is_stream");
        o.push_str(if self.is_stream { "true" } else { "false" });
        key(&mut o, "prompt_tokens");
        encode::push_u64(&mut o, self.prompt_tokens);
        key(&mut o, "completion_tokens");
        encode::push_u64(&mut o, self.completion_tokens);
        key(&mut o, "total_tokens");
        encode::push_u64(&mut o, self.total_tokens);
        if let Some(v) = self.cached_tokens {
            key(&mut o, "cached_tokens");
            encode::push_u64(&mut o, v);
        }
        if let Some(v) = self.reasoning_tokens {
            key(&mut o, "reasoning_tokens");
            encode::push_u64(&mut o, v);
        }
        key(&mut o, "status");
        encode::push_u64(&mut o, u64::from(self.status));
        key(&mut o, "outcome");
        encode::push_json_str(&mut o, &self.outcome);
        key(&mut o, "latency_ms");
        encode::push_u64(&mut o, self.latency_ms);
        key(&mut o, "ttft_ms");
        encode::push_opt_u64(&mut o, self.ttft_ms);
        key(&mut o, "user_id");
        encode::push_json_opt_str(&mut o, self.user_id.as_deref());
        key(&mut o, "key_id");
        encode::push_json_opt_str(&mut o, self.key_id.as_deref());
        // Added after the seed's fields, so each event still starts with exactly the bytes it
        // had before they existed.
        key(&mut o, "usage_source");
        encode::push_json_str(&mut o, self.usage_source);
        key(&mut o, "served_model");
        encode::push_json_opt_str(&mut o, self.served_model.as_deref());
        key(&mut o, "priority");
        encode::push_json_opt_str(&mut o, self.priority);
        o.push('}');
        o
    }
}

/// One core's way out for events.
pub struct CoreSender {
    tx: Sender<UsageEvent>,
    overflow: RefCell<VecDeque<UsageEvent>>,
    dropped: Cell<u64>,
}

impl CoreSender {
    pub fn new(tx: Sender<UsageEvent>) -> Self {
        CoreSender {
            tx,
            overflow: RefCell::new(VecDeque::new()),
            dropped: Cell::new(0),
        }
    }

    /// Never blocks. Order is kept: once something waits in the overflow, new events queue
    /// behind it.
    pub fn send(&self, ev: UsageEvent) -> Result<(), Box<UsageEvent>> {
        let mut overflow = self.overflow.borrow_mut();
        if overflow.is_empty() && self.tx.len() < CHANNEL_CAPACITY {
            match self.tx.try_send(ev) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(ev)) | Err(TrySendError::Disconnected(ev)) => {
                    if overflow.len() < OVERFLOW_MAX {
                        overflow.push_back(ev);
                        return Ok(());
                    }
                    self.dropped.set(self.dropped.get() + 1);
                    return Err(Box::new(ev));
                }
            }
        }
        if overflow.len() < OVERFLOW_MAX {
            overflow.push_back(ev);
            Ok(())
        } else {
            self.dropped.set(self.dropped.get() + 1);
            Err(Box::new(ev))
        }
    }

    /// Moves what waits in the overflow into the channel, as far as it has room.
    pub fn tick(&self) {
        let mut overflow = self.overflow.borrow_mut();
        while let Some(ev) = overflow.pop_front() {
            if self.tx.len() >= CHANNEL_CAPACITY {
                overflow.push_front(ev);
                break;
            }
            match self.tx.try_send(ev) {
                Ok(()) => {}
                Err(TrySendError::Full(ev)) | Err(TrySendError::Disconnected(ev)) => {
                    overflow.push_front(ev);
                    break;
                }
            }
        }
    }

    pub fn backlog(&self) -> usize {
        self.overflow.borrow().len()
    }

    /// Events this core had to drop (both channel and overflow full).
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn overflow_keeps_order_and_drains_on_tick() {
        let (tx, rx) = crossbeam_channel::bounded(2);
        let s = CoreSender::new(tx);
        for n in 0..5 {
            s.send(ev(n)).unwrap();
        }
        assert_eq!(s.backlog(), 3);
        let got: Vec<u64> = rx.try_iter().map(|e| e.prompt_tokens).collect();
        assert_eq!(got, vec![0, 1]);
        s.tick();
        s.send(ev(5)).unwrap();
        let got: Vec<u64> = rx.try_iter().map(|e| e.prompt_tokens).collect();
        assert_eq!(got, vec![2, 3]);
        s.tick();
        let got: Vec<u64> = rx.try_iter().map(|e| e.prompt_tokens).collect();
        assert_eq!(got, vec![4, 5]);
        assert_eq!(s.dropped(), 0);
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
