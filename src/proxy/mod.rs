//! One request end to end: answer locally or route → pick → send upstream → stream the response
//! back → account. Upstream failures before the client saw a byte may be retried on another
//! backend; after that, never. While the upstream works, the client socket is watched: a client
//! that goes away drops the upstream connection at once, which is what stops the GPU.

pub mod account;
pub mod admin;
pub mod affinity;
pub mod conn;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use monoio::buf::SliceMut;
use monoio::io::{
    AsyncWriteRentExt, CancelableAsyncReadRent, Canceller, OwnedReadHalf, OwnedWriteHalf,
};
use monoio::net::TcpStream;

use crate::auth::Caller;
use crate::backends::route::{Local, Route};
use crate::backends::{BackendTable, Entry};
use crate::error::ProxyError;
use crate::error::Verdict;
use crate::http1::head::{BodyFraming, Head};
use crate::http1::headers::forwardable;
use crate::http1::io::read_more;
use crate::http1::{write, ChunkedDecoder};
use crate::openai::tap::{Kind as UsageKind, Tap};
use crate::openai::{self, RequestInfo};
use crate::proxy::account::{account, Done};
use crate::proxy::conn::Downstream;
use crate::telemetry::metrics::ModelIdx;
use crate::upstream::{self, UpConn};
use crate::worker::capacity;
use crate::worker::{InflightGuard, Worker};

/// How long an exchange runs before the client socket is watched for a disconnect. Bounds the
/// extra delay before an abandoned request is cancelled upstream.
const WATCH_AFTER: Duration = Duration::from_millis(5);

/// How a proxied exchange ended, for logs, metrics and (later) usage events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    ClientAborted,
    UpstreamError,
    Timeout,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientAborted => "client_aborted",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Timeout => "timeout",
        }
    }
}

/// The result of a response that was (at least partly) sent to the client.
struct Sent {
    status: u16,
    outcome: Outcome,
    /// The client connection must be closed afterwards.
    close: bool,
}

/// Per-request facts shared by the steps below.
struct Exchange<'a> {
    head: &'a Head,
    /// The body sent upstream (the client's, or with `include_usage` injected, or the model
    /// renamed); changes when a fallback pool is tried.
    body: Cell<&'a [u8]>,
    /// The proxy added `include_usage`, so the usage-only event is removed from the stream.
    injected: Cell<bool>,
    /// Another pool may still serve: a context-length error is not relayed but reported.
    may_fall_back: Cell<bool>,
    /// The backend rejected the prompt as longer than its context (and it was not relayed).
    context_exceeded: Cell<bool>,
    request_id: &'a str,
    client_ip: Rc<str>,
    /// The client connection closes after this response.
    close: bool,
    /// Set once the response head went to the client: from then on no retry, no error page.
    head_sent: Cell<bool>,
    status: Cell<u16>,
    backend: Cell<Option<usize>>,
    /// The in-flight slot on `backend`, held until the request is accounted for: while it is
    /// held the backend's slot cannot be freed and reused, so `backend` keeps meaning it.
    in_flight: RefCell<Option<InflightGuard>>,
    /// When the first response body byte went to the client.
    first_byte: Cell<Option<Instant>>,
    /// Streams record the gap between consecutive chunks (inter-token latency).
    stream: bool,
    model_idx: ModelIdx,
    /// Watches the response for usage; outside the relay future so that an aborted request
    /// still reports what arrived before the abort.
    tap: RefCell<Tap>,
    /// Remove the client's API key headers from what goes upstream.
    strip_client_key: bool,
    /// The request's `consistent_hash` key.
    affinity: Option<u64>,
}

/// Handles one complete request; returns whether the connection may serve another.
pub async fn handle(
    w: &Rc<Worker>,
    d: &mut Downstream,
    head: Head,
    body: Bytes,
    received: Instant,
    caller: Caller,
) -> bool {
    let request_id = request_id(w, Some(&head));
    // Debug builds only: lets the test suite prove a panic stays inside its connection.
    #[cfg(debug_assertions)]
    if head.header("x-llmproxy-debug-panic").is_some() {
        panic!("panic requested by x-llmproxy-debug-panic");
    }
    let close = !head.keep_alive() || w.shared.draining();
    // A reload answered just before this request must already apply to how its body is read
    // (e.g. whether an affinity key is computed), not only to the pick.
    w.drain_inbox();
    let cfg = w.config();
    let table = w.table();
    if let Some(local) = local_route(w, d, &head) {
        let (status, ctype, payload) = match local {
            Local::Reload => crate::proxy::admin::reload(w).await,
            _ => local_response(w, local),
        };
        let keep = respond(d, status, ctype, payload, &request_id, close, &head, None).await;
        account(
            w,
            d,
            Done {
                head: &head,
                request_id: &request_id,
                info: None,
                status,
                backend: None,
                outcome: Outcome::Ok,
                received,
                first_byte: None,
                usage: None,
                caller: &caller,
            },
        );
        return keep;
    }
    if d.admin {
        let e = ProxyError::NotFound(head.path().to_string());
        return fail(w, d, &head, &request_id, e, None, received, close, &caller).await;
    }
    let hashing = cfg.uses_affinity();
    let prefix = if hashing {
        affinity::prefix_messages(&cfg.routing.hash_key)
    } else {
        0
    };
    let info = match openai::inspect_with(
        head.method(),
        head.path(),
        &body,
        &cfg.usage.identity.user_body_field,
        prefix,
    ) {
        Ok(info) => info,
        Err(e) => return fail(w, d, &head, &request_id, e, None, received, true, &caller).await,
    };
    let admitted = caller
        .check_model(head.method(), info.model.as_deref())
        .and_then(|()| caller.admit(received));
    if let Err(e) = admitted {
        let i = Some(&info);
        return fail(w, d, &head, &request_id, e, i, received, close, &caller).await;
    }
    let routes = &table.routes;
    let route = match routes.route(info.model.as_deref()) {
        Ok(route) => route,
        Err(e) => {
            let i = Some(&info);
            return fail(w, d, &head, &request_id, e, i, received, close, &caller).await;
        }
    };
    let injected = upstream_body(w, &head, &body, &info, route.rewrite);
    // Fallback pools with their own bodies (the model renamed); empty, unallocated, without pools.
    let fallbacks: Vec<_> = routes
        .fallbacks(route.pool)
        .iter()
        .filter_map(|&p| routes.fallback_route(p))
        .map(|r| (r, upstream_body(w, &head, &body, &info, r.rewrite)))
        .collect();
    let x = Exchange {
        affinity: hashing
            .then(|| affinity::key(&cfg.routing.hash_key, &head, &info))
            .flatten(),
        head: &head,
        body: Cell::new(injected.0.as_deref().unwrap_or(&body)),
        injected: Cell::new(injected.1),
        may_fall_back: Cell::new(!fallbacks.is_empty()),
        context_exceeded: Cell::new(false),
        request_id: &request_id,
        client_ip: d.peer_ip.clone(),
        close,
        head_sent: Cell::new(false),
        status: Cell::new(0),
        backend: Cell::new(None),
        in_flight: RefCell::new(None),
        first_byte: Cell::new(None),
        stream: info.stream,
        model_idx: w.metrics.model_index(info.model.as_deref()),
        tap: RefCell::new(Tap::new(UsageKind::None)),
        strip_client_key: w.auth.store().strip_client_key(),
    };
    let Downstream { rd, wr, buf, .. } = d;
    let route = Target {
        table: &table,
        route,
        lookup: info.model.as_deref(),
    };
    let fallbacks: Vec<_> = fallbacks
        .into_iter()
        .map(|(r, body)| {
            let target = Target {
                table: &table,
                route: r,
                lookup: r.rewrite,
            };
            (target, body)
        })
        .collect();
    let forward = monoio::time::timeout(
        cfg.timeouts.request,
        Box::pin(forward_with_fallbacks(w, &x, &route, &body, &fallbacks, wr)),
    );
    let result = watch_client(rd, buf, forward).await;
    let (status, outcome, keep) = match result {
        None => (x.status.get(), Outcome::ClientAborted, false),
        Some(Ok(Ok(sent))) => (sent.status, sent.outcome, !sent.close),
        Some(Ok(Err(e))) => {
            let close = close || e.closes_connection();
            let keep = error_response(d, &e, &request_id, close, &head).await;
            if !note_rejection(w, &request_id, &head, &e) {
                log::warn!(
                    "request {request_id} {} {}: {e}",
                    head.method(),
                    head.path()
                );
            }
            let outcome = if e.is_timeout() {
                Outcome::Timeout
            } else {
                Outcome::UpstreamError
            };
            (e.status(), outcome, keep)
        }
        Some(Err(_elapsed)) if !x.head_sent.get() => {
            let e = ProxyError::RequestTimeout;
            error_response(d, &e, &request_id, true, &head).await;
            (e.status(), Outcome::Timeout, false)
        }
        Some(Err(_elapsed)) => (x.status.get(), Outcome::Timeout, false),
    };
    let usage = x.tap.borrow().usage();
    account(
        w,
        d,
        Done {
            head: &head,
            request_id: &request_id,
            info: Some(&info),
            status,
            backend: x.backend.get(),
            outcome,
            received,
            first_byte: x.first_byte.get(),
            usage,
            caller: &caller,
        },
    );
    keep
}

fn local_route(w: &Worker, d: &Downstream, head: &Head) -> Option<Local> {
    let metrics_here = w.config().admin_listen.is_none() || d.admin;
    w.table()
        .routes
        .local(head.method(), head.path(), metrics_here)
}

/// Who sends this request. Runs before the body is read, so that an unauthenticated client
/// cannot make the proxy buffer a body. Health and metrics stay open (probes and scrapers carry
/// no key), and so does the admin listener; everything else needs a key when auth is on.
pub fn authenticate(w: &Worker, d: &Downstream, head: &Head) -> Result<Caller, ProxyError> {
    if d.admin || local_route(w, d, head).is_some_and(|l| l != Local::Models) {
        return Ok(Caller::Open);
    }
    w.auth.identify(head)
}

/// Answers a request whose authentication failed (its body unread); returns whether the
/// connection may serve another request (only if the refused one had no body).
pub async fn refuse(
    w: &Worker,
    d: &mut Downstream,
    head: &Head,
    e: ProxyError,
    received: Instant,
) -> bool {
    let has_body = !matches!(head.request_framing(), Ok(BodyFraming::Empty));
    let close = has_body || !head.keep_alive() || w.shared.draining();
    let request_id = request_id(w, Some(head));
    let unknown = Caller::Unknown;
    fail(w, d, head, &request_id, e, None, received, close, &unknown).await
}

/// The client's `x-request-id` if it is usable, else a fresh one.
fn request_id(w: &Worker, head: Option<&Head>) -> String {
    head.and_then(|h| h.header_str("x-request-id"))
        .filter(|v| valid_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| w.next_request_id())
}

/// The backends a request may go to, as routed against the table in force when it arrived.
struct Target<'a> {
    table: &'a BackendTable,
    route: Route<'a>,
    /// The name routed by (the client's model, or a fallback pool's own name): a table change
    /// between attempts routes it again.
    lookup: Option<&'a str>,
}

/// A request body rewritten for upstream (`None`: the client's as it is), and whether
/// `include_usage` was injected into it.
type UpstreamBody = (Option<Vec<u8>>, bool);

/// The body to send upstream for a route, when it differs from the client's: the model renamed
/// (a splice), `include_usage` injected.
fn upstream_body(
    w: &Worker,
    head: &Head,
    body: &[u8],
    info: &RequestInfo,
    rewrite: Option<&str>,
) -> UpstreamBody {
    let renamed = rewrite
        .zip(info.model_span)
        .and_then(|(m, span)| openai::rewrite_model(body, span, m));
    let base = renamed.as_deref().unwrap_or(body);
    let injected = if w.config().usage.inject_include_usage {
        openai::inject_include_usage(head.path(), base, info)
    } else {
        None
    };
    let was_injected = injected.is_some();
    (injected.or(renamed), was_injected)
}

/// `forward` on the request's route, then on each fallback pool while the previous one had no
/// healthy backend, could not be reached, or rejected the prompt as too long for its context.
async fn forward_with_fallbacks<'a>(
    w: &Rc<Worker>,
    x: &Exchange<'a>,
    route: &Target<'_>,
    original: &'a [u8],
    fallbacks: &'a [(Target<'_>, UpstreamBody)],
    wr: &mut OwnedWriteHalf<TcpStream>,
) -> Result<Sent, ProxyError> {
    let mut result = forward(w, x, route, wr).await;
    for (i, (next, (body, injected))) in fallbacks.iter().enumerate() {
        let why = match &result {
            Err(_) if x.context_exceeded.get() => "the prompt exceeds its context",
            Err(ProxyError::NoHealthyBackend) => "no healthy backend",
            Err(e) if e.retryable() => "its backends failed",
            _ => break,
        };
        log::info!(
            "request {}: model pool cannot serve ({why}); falling back to {}",
            x.request_id,
            next.lookup.unwrap_or("?")
        );
        x.context_exceeded.set(false);
        x.body.set(body.as_deref().unwrap_or(original));
        x.injected.set(*injected);
        x.may_fall_back.set(i + 1 < fallbacks.len());
        let balancer = w.balancer_for(next.route.pool);
        w.decisions.record(
            balancer.strategy(),
            crate::worker::balance::Reason::FallbackModel,
        );
        // Boxed: a fallback is rare, and a second inline `forward` state would double the size
        // of every request's future (it is moved, whole, several times per request).
        result = Box::pin(forward(w, x, next, wr)).await;
    }
    result
}

/// Tries backends until one answers (or attempts run out), then relays its response. Each
/// attempt picks from the backend table in force at that moment (it may change between
/// attempts: then the request is routed again); the in-flight guard of the chosen backend is
/// kept in `x`.
async fn forward(
    w: &Rc<Worker>,
    x: &Exchange<'_>,
    target: &Target<'_>,
    wr: &mut OwnedWriteHalf<TcpStream>,
) -> Result<Sent, ProxyError> {
    let attempts = w.config().retry.attempts;
    let mut tried: Vec<bool> = Vec::new();
    let mut last_err: Option<ProxyError> = None;
    for attempt in 0..=attempts {
        w.drain_inbox();
        let latest = w.table();
        let (table, route) = if latest.version == target.table.version {
            (target.table, target.route)
        } else {
            (&**latest, latest.routes.route(target.lookup)?)
        };
        let mask = route.mask;
        // Pool balancers follow the newest table, which is `table` whenever a pool is used.
        let balancer = w.balancer_for(route.pool);
        tried.resize(mask.len(), false);
        // A half-open backend takes one probe process-wide: losing the race for it to another
        // core means picking again without it (bounded: each round rules one backend out).
        let picked = loop {
            let eligible = |i: usize| mask.get(i) == Some(&true) && !tried[i] && w.eligible(i);
            match capacity::pick(w, &balancer, x.affinity, eligible).await? {
                Some((b, permit)) if w.breakers.claim(b) => break Some((b, permit)),
                Some((b, _)) => tried[b] = true,
                None => break None,
            }
        };
        let Some((b, _slot)) = picked else {
            break;
        };
        let Some(backend) = table.get(b) else {
            break;
        };
        tried[b] = true;
        let _probe = w.probe_guard(b);
        x.backend.set(Some(b));
        *x.in_flight.borrow_mut() = Some(w.begin(b));
        let request = upstream_request(x, backend);
        let sent = send(w, b, backend.spec.addr, request).await;
        w.outcome(
            b,
            match &sent {
                Ok((_, resp)) => Verdict::of_status(resp.status),
                Err(e) => e.verdict(),
            },
        );
        match sent {
            Ok((conn, resp)) => {
                let more = (0..mask.len()).any(|i| mask[i] && !tried[i] && w.eligible(i));
                if matches!(resp.status, 502 | 503) && attempt < attempts && more {
                    log::warn!(
                        "request {}: backend {} answered {}; trying another",
                        x.request_id,
                        backend.spec.url,
                        resp.status
                    );
                    w.metrics.retry(b);
                    last_err = Some(ProxyError::UpstreamStatus(resp.status));
                    continue;
                }
                let mut conn = conn;
                if x.may_fall_back.get() && context_exceeded(w, x, &mut conn, &resp).await? {
                    x.context_exceeded.set(true);
                    return Err(ProxyError::UpstreamStatus(resp.status));
                }
                return relay(w, x, b, conn, resp, wr).await;
            }
            Err(e) => {
                log::warn!(
                    "request {}: backend {}: {e}",
                    x.request_id,
                    backend.spec.url
                );
                w.metrics.upstream_error(b, e.code());
                if e.backend_unreachable() {
                    w.report_unreachable(b);
                }
                if !e.retryable() {
                    return Err(e);
                }
                w.metrics.retry(b);
                last_err = Some(e);
            }
        }
    }
    Err(last_err.unwrap_or(ProxyError::NoHealthyBackend))
}

/// Whether the response is an engine's "prompt longer than the context" error. Small
/// fixed-length error bodies are read (and stay buffered for relaying if it is not).
async fn context_exceeded(
    w: &Worker,
    x: &Exchange<'_>,
    conn: &mut UpConn,
    resp: &Head,
) -> Result<bool, ProxyError> {
    const MAX_ERROR_BODY: u64 = 64 * 1024;
    if !openai::may_be_context_error(resp.status) {
        return Ok(false);
    }
    match resp.response_framing(x.head.method()) {
        Ok(BodyFraming::Length(n)) if n <= MAX_ERROR_BODY => {
            let body = conn
                .buffer_body(n as usize, w.config().timeouts.first_byte)
                .await?;
            Ok(openai::is_context_length_error(body))
        }
        _ => Ok(false),
    }
}

/// Sends the request on a pooled connection (or a new one) and waits for the response head. A
/// pooled connection that fails before any response byte may simply have been closed by the
/// backend while idle: the request is sent once more on a fresh connection.
async fn send(
    w: &Worker,
    backend: usize,
    addr: std::net::SocketAddr,
    request: Vec<u8>,
) -> Result<(UpConn, Head), ProxyError> {
    let t = &w.config().timeouts;
    let mut conn = match w.pool.take(backend) {
        Some(c) => c,
        None => upstream::connect(addr, t.connect).await?,
    };
    let (res, request) = conn.exchange(request, t.first_byte).await;
    match res {
        Ok(head) => Ok((conn, head)),
        Err(ProxyError::UpstreamClosed(why)) if conn.reused => {
            log::debug!("pooled connection to backend {backend} was stale ({why}); reconnecting");
            drop(conn);
            let mut fresh = upstream::connect(addr, t.connect).await?;
            let (res, _) = fresh.exchange(request, t.first_byte).await;
            res.map(|head| (fresh, head))
        }
        Err(e) => Err(e),
    }
}

fn upstream_request(x: &Exchange<'_>, backend: &Entry) -> Vec<u8> {
    let backend = &backend.spec;
    let head = x.head;
    let body = x.body.get();
    let mut out = Vec::with_capacity(head.raw_len() + body.len() + 256);
    out.extend_from_slice(head.method().as_bytes());
    out.push(b' ');
    out.extend_from_slice(backend.base_path.as_bytes());
    out.extend_from_slice(head.target().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    write::header(&mut out, "host", backend.authority.as_bytes());
    // The proxy's own headers, plus the client's key when it must not travel upstream, plus the
    // client's Authorization when the backend gets its own credential.
    const OWN: &[&str] = &["host", "x-forwarded-for", "x-request-id"];
    const OWN_AUTHZ: &[&str] = &["host", "x-forwarded-for", "x-request-id", "authorization"];
    const OWN_KEYS: &[&str] = &[
        "host",
        "x-forwarded-for",
        "x-request-id",
        "authorization",
        "x-api-key",
    ];
    let skip = match (x.strip_client_key, &backend.api_key) {
        (true, _) => OWN_KEYS,
        (false, Some(_)) => OWN_AUTHZ,
        (false, None) => OWN,
    };
    for (name, value) in forwardable(head, skip) {
        write::header(&mut out, name, value);
    }
    if let Some(key) = &backend.api_key {
        out.extend_from_slice(b"authorization: Bearer ");
        out.extend_from_slice(key.expose().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let ip = &*x.client_ip;
    match head.header("x-forwarded-for") {
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

/// Streams the backend's response to the client as it arrives: the head at once, then every
/// upstream read as one downstream write (re-framed as one chunk when chunked).
async fn relay(
    w: &Worker,
    x: &Exchange<'_>,
    backend: usize,
    mut conn: UpConn,
    resp: Head,
    wr: &mut OwnedWriteHalf<TcpStream>,
) -> Result<Sent, ProxyError> {
    let t = &w.config().timeouts;
    let method = x.head.method();
    let framing = resp
        .response_framing(method)
        .map_err(|e| ProxyError::UpstreamProtocol(e.to_string()))?;
    let client_11 = x.head.version == 1;
    let status = resp.status;
    x.status.set(status);
    let event_stream = resp
        .header("content-type")
        .is_some_and(|v| v.starts_with(b"text/event-stream"));
    let mut kind = openai::response_kind(x.head.path(), status, event_stream, x.injected.get());
    if matches!(kind, UsageKind::OpenAiSse { strip: true }) && !client_11 {
        // An HTTP/1.0 client with a fixed-length body cannot have an event removed; it is rare
        // enough to let it see the usage chunk rather than buffer the whole stream.
        if let BodyFraming::Length(_) = framing {
            kind = UsageKind::OpenAiSse { strip: false };
        }
    }
    {
        let mut tap = x.tap.borrow_mut();
        *tap = Tap::new(kind);
        if kind == UsageKind::TgiJson {
            let num = |h: &str| {
                resp.header_str(h)
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            tap.set_header_counts(num("x-prompt-tokens"), num("x-generated-tokens"));
        }
    }
    let holds_back = x.tap.borrow().holds_back();
    // Re-framed as chunks: anything not fixed-length, and fixed-length bodies that may shrink.
    let chunked_out = matches!(framing, BodyFraming::Chunked | BodyFraming::UntilClose)
        || (holds_back && matches!(framing, BodyFraming::Length(_)));
    // An HTTP/1.0 client cannot take chunks: its body ends with the connection.
    // A drain that began while the backend worked: say so in this head, so the client opens its
    // next request elsewhere instead of racing the process exit on this connection.
    let close = x.close || (chunked_out && !client_11) || w.shared.draining();
    let mut reusable = resp.keep_alive() && framing != BodyFraming::UntilClose;

    let mut out = Vec::with_capacity(1024 + conn.buf.len());
    write::status_line(&mut out, status, resp.reason());
    for (name, value) in forwardable(&resp, &["x-request-id"]) {
        write::header(&mut out, name, value);
    }
    write::header(&mut out, "x-request-id", x.request_id.as_bytes());
    match framing {
        BodyFraming::Empty if method == "HEAD" => {
            if let Some(len) = resp.header("content-length") {
                write::header(&mut out, "content-length", len);
            }
        }
        BodyFraming::Empty if status == 204 || status == 304 || status < 200 => {}
        BodyFraming::Empty => write::header_num(&mut out, "content-length", 0),
        _ if chunked_out && client_11 => write::header(&mut out, "transfer-encoding", b"chunked"),
        BodyFraming::Length(n) if !chunked_out => write::header_num(&mut out, "content-length", n),
        _ => {}
    }
    if close {
        write::header(&mut out, "connection", b"close");
    } else if !client_11 {
        write::header(&mut out, "connection", b"keep-alive");
    }
    write::end_head(&mut out);
    let head_len = out.len();

    // A relayed 5xx is the backend failing, whatever else went right.
    let sent = |outcome: Outcome, close: bool| Sent {
        status,
        outcome: if outcome == Outcome::Ok && status >= 500 {
            Outcome::UpstreamError
        } else {
            outcome
        },
        close,
    };
    let reframe = chunked_out && client_11;
    let mut decoder = (framing == BodyFraming::Chunked).then(ChunkedDecoder::new);
    let mut left = match framing {
        BodyFraming::Length(n) => n,
        _ => 0,
    };
    let mut finished = matches!(framing, BodyFraming::Empty);
    let mut first = true;
    let mut last_chunk: Option<Instant> = None;
    loop {
        // Move whatever body bytes are buffered into `out`, framed for the client, through the
        // usage tap.
        let mut bad_chunk = None;
        if !finished {
            let mut tap = x.tap.borrow_mut();
            let mut emit = |data: &[u8]| {
                if reframe {
                    write::chunk(&mut out, data);
                } else {
                    out.extend_from_slice(data);
                }
            };
            match framing {
                BodyFraming::Length(_) => {
                    let take = (conn.buf.len() as u64).min(left) as usize;
                    tap.feed(&conn.buf.split_to(take), &mut emit);
                    left -= take as u64;
                    finished = left == 0;
                }
                BodyFraming::Chunked => {
                    let Some(dec) = decoder.as_mut() else {
                        return Err(ProxyError::Internal("chunked decoder missing".into()));
                    };
                    let res = dec.decode(&conn.buf, |data| tap.feed(data, &mut emit));
                    match res {
                        Ok(consumed) => {
                            let _ = conn.buf.split_to(consumed);
                            finished = dec.is_done();
                        }
                        Err(e) if first => return Err(ProxyError::UpstreamProtocol(e.to_string())),
                        Err(e) => {
                            log::warn!("request {}: bad chunking from upstream: {e}", x.request_id);
                            bad_chunk = Some(ProxyError::UpstreamProtocol(e.to_string()));
                        }
                    }
                }
                BodyFraming::UntilClose => {
                    let data = conn.buf.split();
                    tap.feed(&data, &mut emit);
                }
                BodyFraming::Empty => {}
            }
            if finished {
                tap.finish(&mut emit);
                if reframe {
                    out.extend_from_slice(write::LAST_CHUNK);
                }
            }
        }
        if let Some(e) = bad_chunk {
            w.outcome(backend, Verdict::Fault);
            // Data decoded before the bad chunk still goes out first.
            if !out.is_empty() {
                let _ = write_client(wr, std::mem::take(&mut out), t.write).await;
            }
            cut_stream(wr, &e, event_stream, reframe, t.write).await;
            return Ok(sent(Outcome::UpstreamError, true));
        }
        if !out.is_empty() || first {
            let carries_body = !first || out.len() > head_len;
            let (ok, buf) = write_client(wr, out, t.write).await;
            out = buf;
            out.clear();
            if ok && carries_body {
                let now = Instant::now();
                match last_chunk {
                    Some(prev) if x.stream => {
                        w.metrics
                            .inter_token(backend, x.model_idx, now.duration_since(prev))
                    }
                    _ => {}
                }
                last_chunk = Some(now);
                if x.first_byte.get().is_none() {
                    x.first_byte.set(Some(now));
                }
            }
            if first {
                first = false;
                x.head_sent.set(true);
            }
            if !ok {
                return Ok(sent(Outcome::ClientAborted, true));
            }
        }
        if finished {
            break;
        }
        let buf = std::mem::take(&mut conn.buf);
        match monoio::time::timeout(t.idle, read_more(&mut conn.io, buf)).await {
            Ok((Ok(n), buf)) => {
                conn.buf = buf;
                if n == 0 {
                    if framing == BodyFraming::UntilClose {
                        x.tap.borrow_mut().finish(&mut |data: &[u8]| {
                            if reframe {
                                write::chunk(&mut out, data);
                            } else {
                                out.extend_from_slice(data);
                            }
                        });
                        if reframe {
                            out.extend_from_slice(write::LAST_CHUNK);
                        }
                        if !out.is_empty() {
                            let (ok, _) = write_client(wr, out, t.write).await;
                            if !ok {
                                return Ok(sent(Outcome::ClientAborted, true));
                            }
                        }
                        return Ok(sent(Outcome::Ok, close));
                    }
                    log::warn!("request {}: upstream closed mid-body", x.request_id);
                    w.metrics
                        .upstream_error(backend, "upstream_closed_mid_body");
                    w.outcome(backend, Verdict::Fault);
                    let e = ProxyError::UpstreamClosed("mid-body".into());
                    cut_stream(wr, &e, event_stream, reframe, t.write).await;
                    return Ok(sent(Outcome::UpstreamError, true));
                }
            }
            Ok((Err(e), _)) => {
                log::warn!("request {}: upstream read failed: {e}", x.request_id);
                w.metrics.upstream_error(backend, "upstream_read_error");
                w.outcome(backend, Verdict::Fault);
                let e = ProxyError::UpstreamClosed(e.to_string());
                cut_stream(wr, &e, event_stream, reframe, t.write).await;
                return Ok(sent(Outcome::UpstreamError, true));
            }
            Err(_) => {
                log::warn!(
                    "request {}: upstream idle for {:?}; aborting",
                    x.request_id,
                    t.idle
                );
                w.metrics.upstream_error(backend, "upstream_idle_timeout");
                let e = ProxyError::IdleTimeout(t.idle);
                cut_stream(wr, &e, event_stream, reframe, t.write).await;
                return Ok(sent(Outcome::Timeout, true));
            }
        }
    }
    if !conn.buf.is_empty() {
        // Bytes after the end of the body: the backend is confused; don't reuse it.
        reusable = false;
    }
    if reusable {
        w.pool.put(backend, conn);
    }
    Ok(sent(Outcome::Ok, close))
}

/// Ends a response that failed after its head went out, when no error status can be sent any
/// more. An event stream gets a last SSE event with the error in OpenAI's shape (SDKs raise it
/// instead of waiting for more); either way the connection is then closed without the last
/// chunk, so no client can take the body for complete.
async fn cut_stream(
    wr: &mut OwnedWriteHalf<TcpStream>,
    e: &ProxyError,
    event_stream: bool,
    reframe: bool,
    timeout: Duration,
) {
    if !event_stream {
        return;
    }
    let mut event = b"data: ".to_vec();
    event.extend_from_slice(&e.body());
    event.push(b'\n');
    let out = if reframe {
        let mut out = Vec::with_capacity(event.len() + 16);
        write::chunk(&mut out, &event);
        out
    } else {
        event
    };
    let _ = write_client(wr, out, timeout).await;
}

/// Writes to the client under the write timeout; false when the client is gone or too slow
/// (the buffer is lost with a cancelled write, so a fresh one is handed back then).
async fn write_client(
    wr: &mut OwnedWriteHalf<TcpStream>,
    buf: Vec<u8>,
    timeout: Duration,
) -> (bool, Vec<u8>) {
    match monoio::time::timeout(timeout, wr.write_all(buf)).await {
        Ok((res, buf)) => (res.is_ok(), buf),
        Err(_) => (false, Vec::new()),
    }
}

/// Room for what a client may send while its response is still running.
const WATCH_BUF: usize = 512;

/// Runs `fut` while watching the client socket. EOF or an error on the socket means the client
/// went away: `fut` is dropped (cancelling the upstream exchange) and `None` returned. Bytes that
/// arrive meanwhile (a pipelined request) are kept in `buf`, never lost: the read is cancelled
/// and awaited rather than dropped.
async fn watch_client<F: Future>(
    rd: &mut OwnedReadHalf<TcpStream>,
    buf: &mut BytesMut,
    fut: F,
) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    // Most exchanges finish within a few milliseconds; only the ones that don't pay for a socket
    // watch (a read and its cancellation on every request would cost two ring operations).
    if let Ok(out) = monoio::time::timeout(WATCH_AFTER, &mut fut).await {
        return Some(out);
    }
    let canceller = Canceller::new();
    let mut b = std::mem::take(buf);
    // A long exchange (a stream) holds this buffer only to notice the client leaving (or to keep
    // a pipelined request): an empty page-sized buffer is swapped for a small one, because with
    // thousands of open streams a page each was a fifth of the proxy's memory. The next
    // request's read grows it again.
    if b.is_empty() {
        b = BytesMut::with_capacity(WATCH_BUF);
    } else if b.capacity() - b.len() < WATCH_BUF {
        b.reserve(WATCH_BUF);
    }
    let (len, cap) = (b.len(), b.capacity());
    let read = rd.cancelable_read(SliceMut::new(b, len, cap), canceller.handle());
    let mut read = std::pin::pin!(read);
    monoio::select! {
        // The exchange first: a client that closes right after reading the last byte has
        // completed, not aborted (and its upstream connection goes back to the pool).
        biased;
        out = &mut fut => {
            let _ = canceller.cancel();
            let (_, slice) = read.await;
            *buf = slice.into_inner();
            Some(out)
        }
        (res, slice) = &mut read => {
            *buf = slice.into_inner();
            match res {
                Ok(n) if n > 0 => Some(fut.await),
                _ => None,
            }
        }
    }
}

fn valid_request_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= 200 && v.bytes().all(|b| b.is_ascii_graphic())
}

fn local_response(w: &Worker, local: Local) -> (u16, &'static str, Vec<u8>) {
    match local {
        Local::Health => {
            w.drain_inbox();
            let draining = w.shared.draining();
            let table = w.table();
            let backends: Vec<serde_json::Value> = table
                .entries()
                .map(|(i, e)| {
                    serde_json::json!({
                        "url": e.spec.url,
                        "name": e.spec.name,
                        "state": e.state.as_str(),
                        "up": w.view.is_up(i),
                        "breaker": w.breakers.phase(i).as_str(),
                        "inflight": w.view.load(i),
                    })
                })
                .collect();
            let any_up = table
                .entries()
                .any(|(i, e)| e.state == crate::backends::State::Active && w.view.is_up(i));
            let (status, state) = match (draining, any_up) {
                (true, _) => (503, "draining"),
                (false, false) => (503, "unavailable"),
                (false, true) => (200, "ok"),
            };
            let body = serde_json::json!({"status": state, "backends": backends});
            (status, "application/json", body.to_string().into_bytes())
        }
        Local::Metrics => {
            // This core's view is the freshest at hand; other cores flush on their tick.
            w.drain_inbox();
            w.metrics.flush(&w.view, true);
            w.decisions.flush(&w.shared.metrics.routing);
            let g = &w.shared.metrics;
            let sum = |v: &[crate::worker::PaddedCount]| -> i64 {
                v.iter()
                    .map(|c| c.0.load(std::sync::atomic::Ordering::Relaxed) as i64)
                    .sum()
            };
            g.connections_active.set(sum(&w.shared.connections));
            g.requests_inflight.set(sum(&w.shared.inflight));
            g.requests_queued.set(w.shared.capacity.queued() as i64);
            (200, "text/plain; version=0.0.4", g.encode())
        }
        Local::Models => (200, "application/json", w.table().routes.models_body()),
        Local::Reload => (500, "application/json", Vec::new()),
        Local::AdminElsewhere => {
            let e = ProxyError::NotFound(
                "/admin/reload (POST, on the admin listener when admin_listen is set)".into(),
            );
            (e.status(), "application/json", e.body())
        }
        Local::MetricsElsewhere => {
            let e = ProxyError::NotFound("/metrics (served on the admin listener)".into());
            (e.status(), "application/json", e.body())
        }
    }
}

/// Writes a complete small response; returns whether the connection stays open.
#[allow(clippy::too_many_arguments)]
async fn respond(
    d: &mut Downstream,
    status: u16,
    content_type: &str,
    body: Vec<u8>,
    request_id: &str,
    close: bool,
    head: &Head,
    extra: Option<(&str, String)>,
) -> bool {
    let mut out = Vec::with_capacity(256 + body.len());
    write::status_line(&mut out, status, "");
    write::header(&mut out, "content-type", content_type.as_bytes());
    write::header_num(&mut out, "content-length", body.len() as u64);
    write::header(&mut out, "x-request-id", request_id.as_bytes());
    if let Some((name, value)) = extra {
        write::header(&mut out, name, value.as_bytes());
    }
    if close {
        write::header(&mut out, "connection", b"close");
    } else if head.version == 0 {
        write::header(&mut out, "connection", b"keep-alive");
    }
    write::end_head(&mut out);
    if head.method() != "HEAD" {
        out.extend_from_slice(&body);
    }
    // Bounded like a stream: a client that never reads must not hold its connection forever.
    let (ok, _) = write_client(&mut d.wr, out, d.write_timeout).await;
    ok && !close
}

async fn error_response(
    d: &mut Downstream,
    e: &ProxyError,
    request_id: &str,
    close: bool,
    head: &Head,
) -> bool {
    respond(
        d,
        e.status(),
        "application/json",
        e.body(),
        request_id,
        close,
        head,
        e.extra_header(),
    )
    .await
}

/// Refusals (auth, rates, capacity) are counted and logged under the rejection log budget;
/// returns false for other errors, which the caller logs itself.
fn note_rejection(w: &Worker, request_id: &str, head: &Head, e: &ProxyError) -> bool {
    let Some(reason) = e.rejection() else {
        return false;
    };
    w.shared.metrics.rejected.note(
        reason,
        format_args!(
            "request {request_id} {} {}: {e}",
            head.method(),
            head.path()
        ),
    );
    true
}

#[allow(clippy::too_many_arguments)]
async fn fail(
    w: &Worker,
    d: &mut Downstream,
    head: &Head,
    request_id: &str,
    e: ProxyError,
    info: Option<&RequestInfo>,
    received: Instant,
    close: bool,
    caller: &Caller,
) -> bool {
    if !note_rejection(w, request_id, head, &e) {
        log::info!(
            "request {request_id} {} {}: {e}",
            head.method(),
            head.path()
        );
    }
    let close = close || e.closes_connection();
    let keep = error_response(d, &e, request_id, close, head).await;
    account(
        w,
        d,
        Done {
            head,
            request_id,
            info,
            status: e.status(),
            backend: None,
            outcome: Outcome::Ok,
            received,
            first_byte: None,
            usage: None,
            caller,
        },
    );
    keep
}

/// Answers a request that could not even be read completely (bad head, limits, timeouts); the
/// connection is always closed afterwards.
pub async fn reject(w: &Worker, d: &mut Downstream, e: &ProxyError, head: Option<&Head>) {
    let request_id = request_id(w, head);
    let body = e.body();
    let mut out = Vec::with_capacity(256 + body.len());
    write::status_line(&mut out, e.status(), "");
    write::header(&mut out, "content-type", b"application/json");
    write::header_num(&mut out, "content-length", body.len() as u64);
    write::header(&mut out, "x-request-id", request_id.as_bytes());
    write::header(&mut out, "connection", b"close");
    write::end_head(&mut out);
    out.extend_from_slice(&body);
    let _ = write_client(&mut d.wr, out, d.write_timeout).await;
    w.metrics.request(
        e.status(),
        None,
        w.metrics.model_index(None),
        Duration::ZERO,
        None,
    );
}
