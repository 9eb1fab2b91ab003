//! Step 2–3 of a request, once its head and body are read: its id, what the proxy learns from
//! its body, where it may go (its route and fallback pools, each with the body that pool
//! needs), and the request head and body sent upstream. Also the state one request carries
//! through the later steps (`Exchange`).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use crate::auth::Caller;
use crate::backends::route::Local;
use crate::backends::{BackendTable, Entry};
use crate::config::{Config, Strategy};
use crate::error::ProxyError;
use crate::http1::head::Head;
use crate::http1::headers::forwardable;
use crate::http1::name::Name;
use crate::http1::write;
use crate::openai::tap::Tap;
use crate::openai::{self, RequestInfo};
use crate::proxy::affinity;
use crate::proxy::pick::Target;
use crate::scheduler::Flow;
use crate::telemetry::metrics::ModelIdx;
use crate::worker::{InflightGuard, Worker};

/// What is known of a request before it is routed; every answer and the accounting take it.
pub(crate) struct Request<'a> {
    pub(crate) head: &'a Head,
    pub(crate) id: String,
    pub(crate) received: Instant,
    pub(crate) caller: &'a Caller,
    /// The client connection closes after this response.
    pub(crate) close: bool,
}

impl<'a> Request<'a> {
    pub(crate) fn new(w: &Worker, head: &'a Head, received: Instant, caller: &'a Caller) -> Self {
        Request {
            head,
            id: request_id(w, Some(head)),
            received,
            caller,
            close: !head.keep_alive() || w.shared.draining(),
        }
    }
}

/// The local endpoint `head` asks for, if any. `/metrics` is answered on the admin listener when
/// there is one, else on the main listener.
pub(crate) fn local_route(w: &Worker, admin: bool, head: &Head) -> Option<Local> {
    let metrics_here = w.config().admin_listen.is_none() || admin;
    w.table()
        .routes
        .local(head.method(), head.path(), metrics_here)
}

/// The client's `x-request-id` if it is usable, else a fresh one.
pub(crate) fn request_id(w: &Worker, head: Option<&Head>) -> String {
    head.and_then(|h| h.get_str(Name::XRequestId))
        .filter(|v| valid_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| w.next_request_id())
}

fn valid_request_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= 200 && v.bytes().all(|b| b.is_ascii_graphic())
}

/// Reads what routing and metering need from the body (the affinity prefix only when a
/// `consistent_hash` key asks for it).
pub(crate) fn inspect(cfg: &Config, head: &Head, body: &[u8]) -> Result<RequestInfo, ProxyError> {
    let prefix = if cfg.uses_affinity() {
        affinity::prefix_messages(&cfg.routing.hash_key)
    } else {
        0
    };
    let pc = &cfg.routing.prefix_cache;
    let blocks = cfg
        .strategies()
        .any(|s| s == Strategy::PrefixCache)
        .then_some(openai::Blocks {
            bytes: pc.block_bytes,
            max: pc.max_blocks,
        });
    openai::inspect_with(
        head.method(),
        head.path(),
        body,
        &cfg.usage.identity.user_body_field,
        prefix,
        blocks,
    )
}

/// A request body rewritten for upstream (`None`: the client's as it is), what of the usage the
/// proxy asked for the tap must remove, and the model it asks for.
pub(crate) struct UpstreamBody<'a> {
    pub(crate) rewritten: Option<Vec<u8>>,
    /// (the usage-only chunk, the running usage): see `openai::usage_to_strip`.
    pub(crate) strip: (bool, bool),
    /// The proxy added `continuous_usage_stats` (the client did not ask for it): a backend that
    /// rejects it is asked again without it.
    pub(crate) added_running: bool,
    /// The model the backend is asked for (after an alias rewrite or a fallback).
    pub(crate) served: Option<&'a str>,
}

/// Where a request may go: its own route, then each fallback pool with the body it needs.
pub(crate) struct Plan<'a> {
    pub(crate) target: Target<'a>,
    pub(crate) body: UpstreamBody<'a>,
    /// Empty (unallocated) without pools.
    pub(crate) fallbacks: Vec<(Target<'a>, UpstreamBody<'a>)>,
}

impl<'a> Plan<'a> {
    pub(crate) fn new(
        w: &Worker,
        head: &Head,
        body: &[u8],
        info: &'a RequestInfo,
        table: &'a BackendTable,
        flow: Flow,
    ) -> Result<Self, ProxyError> {
        let cfg = w.config();
        let routes = &table.routes;
        let route = routes.route(info.model.as_deref())?;
        let affinity = cfg
            .uses_affinity()
            .then(|| affinity::key(&cfg.routing.hash_key, head, info))
            .flatten();
        let fallbacks = routes
            .fallbacks(route.pool)
            .iter()
            .filter_map(|&p| routes.fallback_route(p))
            .map(|r| {
                let target = Target {
                    table,
                    route: r,
                    lookup: r.rewrite,
                    affinity,
                    blocks: &info.blocks,
                    flow,
                };
                (target, upstream_body(&cfg, head, body, info, r.rewrite))
            })
            .collect();
        Ok(Plan {
            target: Target {
                table,
                route,
                lookup: info.model.as_deref(),
                affinity,
                blocks: &info.blocks,
                flow,
            },
            body: upstream_body(&cfg, head, body, info, route.rewrite),
            fallbacks,
        })
    }
}

/// The body to send upstream for a route, when it differs from the client's: the model renamed
/// (a splice), `include_usage` injected.
fn upstream_body<'a>(
    cfg: &Config,
    head: &Head,
    body: &[u8],
    info: &'a RequestInfo,
    rewrite: Option<&'a str>,
) -> UpstreamBody<'a> {
    let renamed = rewrite
        .zip(info.model_span)
        .and_then(|(m, span)| openai::rewrite_model(body, span, m));
    let served = match renamed {
        Some(_) => rewrite,
        None => info.model.as_deref(),
    };
    let base = renamed.as_deref().unwrap_or(body);
    let injected = if cfg.usage.inject_include_usage {
        openai::inject_include_usage(head.path(), base, info)
    } else {
        None
    };
    let strip = if injected.is_some() {
        openai::usage_to_strip(info)
    } else {
        (false, false)
    };
    UpstreamBody {
        added_running: injected.is_some() && !info.continuous_usage,
        strip,
        served,
        rewritten: injected.or(renamed),
    }
}

/// One request on its way through forward and relay: what they share, and what accounting reads
/// once it is over (also when its future was dropped: the client went away).
pub(crate) struct Exchange<'a> {
    pub(crate) head: &'a Head,
    /// The body sent upstream (the client's, or with `include_usage` injected, or the model
    /// renamed); changes when a fallback pool is tried.
    pub(crate) body: Cell<&'a [u8]>,
    /// What of the usage the proxy asked for is removed from the stream (see `UpstreamBody`).
    pub(crate) strip: Cell<(bool, bool)>,
    /// The proxy added `continuous_usage_stats` to `body`.
    pub(crate) added_running: Cell<bool>,
    /// This attempt's body asks llama.cpp for `timings_per_token` (the proxy added it).
    pub(crate) added_timings: Cell<bool>,
    /// The model the backend is asked for.
    pub(crate) served_model: Cell<Option<&'a str>>,
    /// Another pool may still serve: a context-length error is not relayed but reported.
    pub(crate) may_fall_back: Cell<bool>,
    /// The backend rejected the prompt as longer than its context (and it was not relayed).
    pub(crate) context_exceeded: Cell<bool>,
    pub(crate) request_id: &'a str,
    pub(crate) client_ip: Rc<str>,
    /// The client connection closes after this response.
    pub(crate) close: bool,
    /// Set once the response head went to the client: from then on no retry, no error page.
    pub(crate) head_sent: Cell<bool>,
    pub(crate) status: Cell<u16>,
    pub(crate) backend: Cell<Option<usize>>,
    /// The in-flight count on `backend`, taken out of the attempt's lease (see `Lease`).
    pub(crate) in_flight: RefCell<Option<InflightGuard>>,
    /// When the first response body byte went to the client.
    pub(crate) first_byte: Cell<Option<Instant>>,
    /// When the last response body bytes went to the client: a response that is being written
    /// needs no client watch (`relay::watch_client`).
    pub(crate) last_write: Cell<Option<Instant>>,
    /// Streams record the gap between consecutive chunks (inter-token latency).
    pub(crate) stream: bool,
    pub(crate) model_idx: ModelIdx,
    /// Watches the response for usage; outside the relay future so that an aborted request
    /// still reports what arrived before the abort. Boxed: it is a few hundred bytes that every
    /// connection's future would otherwise carry (`the_connection_future_does_not_grow`).
    pub(crate) tap: RefCell<Box<Tap>>,
    /// Remove the client's API key headers from what goes upstream.
    pub(crate) strip_client_key: bool,
}

impl<'a> Exchange<'a> {
    pub(crate) fn new(
        w: &Worker,
        req: &'a Request<'a>,
        client_ip: Rc<str>,
        info: &RequestInfo,
        original: &'a [u8],
        plan: &'a Plan<'_>,
    ) -> Self {
        Exchange {
            head: req.head,
            body: Cell::new(plan.body.rewritten.as_deref().unwrap_or(original)),
            strip: Cell::new(plan.body.strip),
            added_running: Cell::new(plan.body.added_running),
            added_timings: Cell::new(false),
            served_model: Cell::new(plan.body.served),
            may_fall_back: Cell::new(!plan.fallbacks.is_empty()),
            context_exceeded: Cell::new(false),
            request_id: &req.id,
            client_ip,
            close: req.close,
            head_sent: Cell::new(false),
            status: Cell::new(0),
            backend: Cell::new(None),
            in_flight: RefCell::new(None),
            first_byte: Cell::new(None),
            last_write: Cell::new(None),
            stream: info.stream,
            model_idx: w.metrics.model_index(info.model.as_deref()),
            tap: RefCell::new(w.taps.take()),
            strip_client_key: w.auth.store().strip_client_key(),
        }
    }

    /// Switches to a fallback pool's body.
    pub(crate) fn fall_back(&self, original: &'a [u8], body: &'a UpstreamBody<'_>, more: bool) {
        self.context_exceeded.set(false);
        self.body.set(body.rewritten.as_deref().unwrap_or(original));
        self.strip.set(body.strip);
        self.added_running.set(body.added_running);
        self.served_model.set(body.served);
        self.may_fall_back.set(more);
    }
}

/// The request as it goes to `backend`: its path under the backend's base path, the client's
/// headers minus hop-by-hop ones and the proxy's own, the backend's credential,
/// `X-Forwarded-For` and `X-Request-Id`, and the (possibly rewritten) body.
pub(crate) fn upstream_request(x: &Exchange<'_>, backend: &Entry, body: &[u8]) -> Vec<u8> {
    let backend = &backend.spec;
    let head = x.head;
    let mut out = Vec::with_capacity(head.raw_len() + body.len() + 256);
    out.extend_from_slice(head.method().as_bytes());
    out.push(b' ');
    out.extend_from_slice(backend.base_path.as_bytes());
    out.extend_from_slice(head.target().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    write::header(&mut out, "host", backend.authority.as_bytes());
    // The proxy's own headers, plus the client's key when it must not travel upstream, plus the
    // client's Authorization when the backend gets its own credential.
    const OWN: &[Name] = &[Name::Host, Name::XForwardedFor, Name::XRequestId];
    const OWN_AUTHZ: &[Name] = &[
        Name::Host,
        Name::XForwardedFor,
        Name::XRequestId,
        Name::Authorization,
    ];
    const OWN_KEYS: &[Name] = &[
        Name::Host,
        Name::XForwardedFor,
        Name::XRequestId,
        Name::Authorization,
        Name::XApiKey,
    ];
    let skip = match (x.strip_client_key, &backend.api_key) {
        (true, _) => OWN_KEYS,
        (false, Some(_)) => OWN_AUTHZ,
        (false, None) => OWN,
    };
    for line in forwardable(head, skip) {
        write::line(&mut out, line);
    }
    if let Some(key) = &backend.api_key {
        out.extend_from_slice(b"authorization: Bearer ");
        out.extend_from_slice(key.expose().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let ip = &*x.client_ip;
    match head.get(Name::XForwardedFor) {
        Some(prev) if !prev.is_empty() => {
            let mut v = prev.to_vec();
            v.extend_from_slice(b", ");
            v.extend_from_slice(ip.as_bytes());
            write::header(&mut out, "x-forwarded-for", &v);
        }
        _ => write::header(&mut out, "x-forwarded-for", ip.as_bytes()),
    }
    write::header(&mut out, "x-request-id", x.request_id.as_bytes());
    if !body.is_empty() || matches!(head.method(), "POST" | "PUT" | "PATCH") {
        write::header_num(&mut out, "content-length", body.len() as u64);
    }
    write::end_head(&mut out);
    out.extend_from_slice(body);
    out
}
