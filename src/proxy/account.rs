//! Step 7 of a request: accounting. Once a request is over — answered, failed or abandoned —
//! this records its metrics on the core, writes its access-log line and, for inference endpoints,
//! emits its usage event. It is the only place that does any of the three, so they always agree.

use std::time::{Duration, Instant};

use crate::encode::{self, Rfc3339Millis};
use crate::error::Outcome;
use crate::openai::tap::{Source, Usage};
use crate::openai::{self, RequestInfo};
use crate::proxy::downstream::Downstream;
use crate::proxy::request::Request;
use crate::telemetry::logging::{access_key, AccessFields, ACCESS};
use crate::usage::{self, Text, UsageRecord};
use crate::worker::Worker;

/// Everything known about a request once it is over.
pub(crate) struct Done<'a> {
    pub(crate) req: &'a Request<'a>,
    pub(crate) info: Option<&'a RequestInfo>,
    pub(crate) status: u16,
    pub(crate) backend: Option<usize>,
    pub(crate) outcome: Outcome,
    pub(crate) first_byte: Option<Instant>,
    pub(crate) usage: Option<Usage>,
    /// A probe (`/health`, `/ready`, `/metrics`): logged, but not traffic, so not in the request metrics
    /// (a readiness probe would feed the QPS panel, a failing `/health` the error-ratio alert).
    pub(crate) probe: bool,
    /// The model the backend was asked for (after an alias rewrite or a fallback).
    pub(crate) served_model: Option<&'a str>,
}

impl<'a> Done<'a> {
    /// A request the proxy answered itself (locally, or refused).
    pub(crate) fn answered(
        req: &'a Request<'a>,
        info: Option<&'a RequestInfo>,
        status: u16,
    ) -> Self {
        Done {
            req,
            info,
            status,
            backend: None,
            outcome: Outcome::Ok,
            first_byte: None,
            usage: None,
            probe: false,
            served_model: None,
        }
    }
}

/// The one place a finished request is accounted for: metrics, the access log line and — for
/// inference endpoints — the usage event.
pub(crate) fn account(w: &Worker, d: &Downstream, f: Done<'_>) {
    let cfg = w.config();
    let req = f.req;
    let elapsed = req.received.elapsed();
    let model = f.info.and_then(|i| i.model.as_deref());
    let is_stream = f.info.is_some_and(|i| i.stream);
    let ttft = f.first_byte.map(|t| t.duration_since(req.received));
    let model_idx = w.metrics.model_index(model);
    if !f.probe {
        w.metrics.request(
            f.status,
            f.backend,
            model_idx,
            elapsed,
            ttft.filter(|_| is_stream),
        );
    }
    if let Some(u) = &f.usage {
        w.metrics.tokens(
            model_idx,
            [
                u.prompt_tokens,
                u.completion_tokens,
                u.cached_tokens.unwrap_or(0),
                u.reasoning_tokens.unwrap_or(0),
            ],
        );
        req.caller
            .charge_tokens(u.total_tokens.max(u.prompt_tokens + u.completion_tokens));
    }
    // The request still holds its in-flight guard, so its slot still holds its backend.
    let table = w.table();
    let backend_url = f
        .backend
        .and_then(|b| table.get(b))
        .map(|b| b.spec.url.as_str());
    let head = req.head;
    let metered = openai::is_json_route(head.method(), head.path());
    let key_id = req.caller.key_id(head, metered, &d.key_ids);
    // Known once the request was read (`info`); an invalid header was refused before that.
    let priority = f
        .info
        .and_then(|_| req.caller.flow(head).ok())
        .map(|flow| flow.class.as_str());
    // The time is formatted once, for the access line and the usage event alike.
    let ts = std::cell::OnceCell::new();
    let stamp = || ts.get_or_init(|| Rfc3339Millis::new(std::time::SystemTime::now()));
    if cfg.logging.access_log && log::log_enabled!(target: ACCESS, log::Level::Info) {
        if let Some(access) = &w.access {
            access.line(stamp(), |l| {
                access_fields(
                    l,
                    d,
                    &f,
                    backend_url,
                    key_id.as_deref(),
                    priority,
                    elapsed,
                    ttft,
                );
            });
        }
    }
    // No webhook and no usage log: an event would have no reader, and none is written.
    if !metered || !req.caller.billable() || !usage::has_reader(&cfg.usage_hook, &cfg.usage) {
        return;
    }
    let identity = &cfg.usage.identity;
    let user_id = (!identity.user_header.is_empty())
        .then(|| head.header_str(&identity.user_header))
        .flatten()
        .or_else(|| f.info.and_then(|i| i.user.as_deref()));
    let u = f.usage.unwrap_or_default();
    // Written on this core straight from what it borrows (no owned strings: see `usage`).
    let event = UsageRecord {
        event_id: Text::Hex(fastrand::u128(..)),
        request_id: &req.id,
        timestamp: Text::Time(*stamp()),
        model,
        endpoint: head.path(),
        backend_url,
        is_stream,
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.total_tokens,
        cached_tokens: u.cached_tokens,
        reasoning_tokens: u.reasoning_tokens,
        status: f.status,
        outcome: f.outcome.as_str(),
        latency_ms: elapsed.as_millis() as u64,
        ttft_ms: ttft.map(|t| t.as_millis() as u64),
        user_id,
        key_id: key_id.as_deref(),
        // Nothing reported: whatever was counted (0 when nothing was relayed).
        usage_source: f.usage.map_or(Source::Counted, |u| u.source).as_str(),
        served_model: f.served_model,
        priority,
    };
    if !w.usage.send(&event) {
        w.shared
            .metrics
            .usage_events
            .with_label_values(&["dropped"])
            .inc();
        log::error!(
            "usage event dropped (channel and overflow full): request {} model {:?} tokens {}",
            event.request_id,
            event.model,
            event.total_tokens
        );
    }
}

/// The access-log line's fields, keys in sorted order (as the `serde_json::json!` map this
/// replaced wrote them), written into the core's batch by hand (see `telemetry::logging`).
#[allow(clippy::too_many_arguments)]
fn access_fields(
    l: &mut AccessFields<'_>,
    d: &Downstream,
    f: &Done<'_>,
    backend_url: Option<&str>,
    key_id: Option<&str>,
    priority: Option<&str>,
    elapsed: Duration,
    ttft: Option<Duration>,
) {
    let (req, model) = (f.req, f.info.and_then(|i| i.model.as_deref()));
    let head = req.head;
    let u = f.usage.unwrap_or_default();
    l.str(access_key!("backend"), backend_url);
    l.plain(access_key!("client"), |out| {
        encode::push_socket_addr(out, &d.peer)
    });
    l.u64(access_key!("completion_tokens"), u.completion_tokens);
    l.millis(access_key!("duration_ms"), Some(micros(elapsed)));
    l.str(access_key!("key_id"), key_id);
    l.str(access_key!("method"), Some(head.method()));
    l.str(access_key!("model"), model);
    l.str(access_key!("outcome"), Some(f.outcome.as_str()));
    l.str(access_key!("path"), Some(head.path()));
    l.str(access_key!("priority"), priority);
    l.u64(access_key!("prompt_tokens"), u.prompt_tokens);
    l.str(access_key!("request_id"), Some(&req.id));
    l.u64(access_key!("status"), u64::from(f.status));
    l.millis(access_key!("ttft_ms"), ttft.map(micros));
}

/// Whole microseconds, rounded: access lines give milliseconds with microsecond resolution
/// (`141.339`, not `141.33900000000002`).
fn micros(d: Duration) -> u64 {
    // In u64, not `as_nanos`' u128: a 128-bit division is a call of about a hundred
    // instructions, twice per access line. Overflows only past 584,000 years.
    d.as_secs()
        .saturating_mul(1_000_000)
        .saturating_add(u64::from((d.subsec_nanos() + 500) / 1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micros_round_as_the_nanosecond_count_does() {
        for d in [
            Duration::ZERO,
            Duration::from_nanos(499),
            Duration::from_nanos(500),
            Duration::from_nanos(999_999_499),
            Duration::from_nanos(999_999_500),
            Duration::new(141, 339_000),
            Duration::new(7, 999_999_999),
            Duration::new(u64::MAX / 1_000_000, 0),
        ] {
            assert_eq!(u128::from(micros(d)), (d.as_nanos() + 500) / 1000, "{d:?}");
        }
        assert_eq!(micros(Duration::MAX), u64::MAX);
    }
}
