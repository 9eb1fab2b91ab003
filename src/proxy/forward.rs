//! Step 5 of a request: sending it upstream. Each attempt picks a backend (`pick`), sends on a
//! pooled keep-alive connection or a new one, and waits for the response head; a failure before
//! the client saw a byte may be retried on another backend (connect errors, a connection closed
//! before answering, a 502/503 answer while another backend is left), never after. When the
//! request's model pool cannot serve at all, its fallback pools are tried in order.

use std::borrow::Cow;
use std::rc::Rc;

use crate::alarm::Alarm;
use crate::backends::Entry;
use crate::error::{ProxyError, Verdict};
use crate::http1::head::{BodyFraming, Head};
use crate::openai;
use crate::proxy::pick::{pick, Target, Tried};
use crate::proxy::relay::{relay, Sent};
use crate::proxy::request::{upstream_request, Exchange, Plan};
use crate::tls::io::ClientWriter;
use crate::tls::ClientTls;
use crate::upstream::{self, UpConn};
use crate::worker::balance::Reason;
use crate::worker::traits::Trait;
use crate::worker::Worker;

/// `forward` on the request's route, then on each fallback pool while the previous one had no
/// healthy backend, could not be reached, or rejected the prompt as too long for its context.
pub(crate) async fn forward_with_fallbacks<'a>(
    w: &Rc<Worker>,
    x: &Exchange<'a>,
    plan: &'a Plan<'_>,
    original: &'a [u8],
    wr: &mut ClientWriter,
    alarm: &mut Alarm,
) -> Result<Sent, ProxyError> {
    let mut result = forward(w, x, &plan.target, wr, alarm).await;
    for (i, (next, body)) in plan.fallbacks.iter().enumerate() {
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
        x.fall_back(original, body, i + 1 < plan.fallbacks.len());
        let balancer = w.balancer_for(next.route.pool);
        w.decisions
            .record(balancer.strategy(), Reason::FallbackModel);
        // Boxed: a fallback is rare, and a second inline `forward` state would double the size
        // of every request's future (it is moved, whole, several times per request).
        result = Box::pin(forward(w, x, next, wr, alarm)).await;
    }
    result
}

/// Tries backends until one answers (or attempts run out), then relays its response. Each
/// attempt picks from the backend table in force at that moment (it may change between
/// attempts: then the request is routed again).
async fn forward(
    w: &Rc<Worker>,
    x: &Exchange<'_>,
    target: &Target<'_>,
    wr: &mut ClientWriter,
    alarm: &mut Alarm,
) -> Result<Sent, ProxyError> {
    let attempts = w.config().retry.attempts;
    let mut tried = Tried::default();
    let mut last_err: Option<ProxyError> = None;
    for attempt in 0..=attempts {
        let mut lease = match pick(w, target, &mut tried).await {
            Ok(lease) => lease,
            Err(ProxyError::NoHealthyBackend) => break,
            Err(e) => return Err(e),
        };
        let b = lease.backend();
        x.backend.set(Some(b));
        *x.in_flight.borrow_mut() = lease.take_in_flight();
        // Never `None`: `pick` leases only backends of its table.
        let Some(backend) = lease.entry() else {
            break;
        };
        let e = match send_asking(w, x, b, lease.slot(), backend, alarm).await {
            Ok((mut conn, resp)) => {
                w.outcome(b, Verdict::of_status(resp.status));
                if matches!(resp.status, 502 | 503) && attempt < attempts && tried.any_left(w) {
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
                if x.may_fall_back.get() && context_exceeded(w, x, &mut conn, &resp).await? {
                    x.context_exceeded.set(true);
                    return Err(ProxyError::UpstreamStatus(resp.status));
                }
                return relay(w, x, b, conn, resp, wr, alarm).await;
            }
            Err(e) => e,
        };
        log::warn!(
            "request {}: backend {}: {e}",
            x.request_id,
            backend.spec.url
        );
        w.upstream_failed(b, &e);
        if !e.retryable() {
            return Err(e);
        }
        w.metrics.retry(b);
        last_err = Some(e);
    }
    Err(last_err.unwrap_or(ProxyError::NoHealthyBackend))
}

/// Sends the request to `backend`, with the running usage the proxy asks for unless this backend
/// rejects it. A backend that answers the request with a 400 naming `continuous_usage_stats` is
/// remembered (on this core) and asked again at once without it: nothing reached the client yet.
/// A pick pinned to an engine slot (`slot`) names it in the body (`id_slot`).
async fn send_asking(
    w: &Worker,
    x: &Exchange<'_>,
    b: usize,
    slot: Option<usize>,
    backend: &Entry,
    alarm: &mut Alarm,
) -> Result<(UpConn, Head), ProxyError> {
    let url = &backend.spec.url;
    let mut body = Cow::Borrowed(x.body.get());
    if let Some(pinned) = slot.and_then(|k| openai::with_id_slot(&body, k)) {
        body = Cow::Owned(pinned);
    }
    let has = |t| w.traits.has(b, backend.id, t);
    if x.added_running.get() && has(Trait::NoRunningUsage) {
        if let Some(plain) = openai::without_running_usage(&body) {
            body = Cow::Owned(plain);
        }
    }
    // Only where the proxy asks for usage itself (it then owns what the client sees of it).
    let mut timings = false;
    if (x.added_running.get() || x.strip.get().0) && has(Trait::PerTokenTimings) {
        if let Some(asking) = openai::with_per_token_timings(&body) {
            body = Cow::Owned(asking);
            timings = true;
        }
    }
    x.added_timings.set(timings);
    let request = upstream_request(x, backend, &body);
    let (addr, tls) = (backend.spec.addr, backend.spec.tls.as_ref());
    let (mut conn, resp) = send(w, b, addr, tls, request, alarm).await?;
    if !x.added_running.get() || !rejects_running_usage(w, x, &mut conn, &resp).await? {
        return Ok((conn, resp));
    }
    let Some(plain) = openai::without_running_usage(&body) else {
        return Ok((conn, resp));
    };
    if w.learn_trait(b, Trait::NoRunningUsage) {
        log::warn!(
            "request {}: backend {url} rejects stream_options.{}; asking it without from now on \
             (aborted streams from it are billed what the proxy counted)",
            x.request_id,
            openai::RUNNING_USAGE
        );
    }
    drop(conn);
    let request = upstream_request(x, backend, &plain);
    send(w, b, addr, tls, request, alarm).await
}

/// Whether the response is a 400 that names `continuous_usage_stats`. Small fixed-length error
/// bodies are read (and stay buffered for relaying if it is not).
async fn rejects_running_usage(
    w: &Worker,
    x: &Exchange<'_>,
    conn: &mut UpConn,
    resp: &Head,
) -> Result<bool, ProxyError> {
    const MAX_ERROR_BODY: u64 = 64 * 1024;
    if !matches!(resp.status, 400 | 422) {
        return Ok(false);
    }
    match resp.response_framing(x.head.method()) {
        Ok(BodyFraming::Length(n)) if n <= MAX_ERROR_BODY => {
            // Boxed (here and for the context check): error answers are rare, and every request's future
            // would otherwise hold the read's state (copied whole into its box once per request).
            let read = conn.buffer_body(n as usize, w.config().timeouts.first_byte);
            let body = Box::pin(read).await?;
            Ok(openai::rejects_running_usage(resp.status, body))
        }
        _ => Ok(false),
    }
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
            let read = conn.buffer_body(n as usize, w.config().timeouts.first_byte);
            let body = Box::pin(read).await?;
            Ok(openai::is_context_length_error(body))
        }
        _ => Ok(false),
    }
}

/// A new connection to a backend; TLS handshakes are counted by result.
async fn connect(
    w: &Worker,
    addr: std::net::SocketAddr,
    tls: Option<&ClientTls>,
) -> Result<UpConn, ProxyError> {
    let res = upstream::connect(addr, w.config().timeouts.connect, tls).await;
    if tls.is_some() {
        let result = match &res {
            Ok(_) => "ok",
            Err(ProxyError::UpstreamTlsCertificate(_)) => "certificate",
            Err(ProxyError::UpstreamConnectTimeout) => "timeout",
            // Refused or unreachable: no handshake took place.
            Err(ProxyError::UpstreamConnect(_)) => return res,
            Err(_) => "error",
        };
        w.shared.metrics.tls_handshake("backend", result);
    }
    res
}

/// Sends the request on a pooled connection (or a new one) and waits for the response head. A
/// pooled connection that fails before any response byte may simply have been closed by the
/// backend while idle: the request is sent once more on a fresh connection.
async fn send(
    w: &Worker,
    backend: usize,
    addr: std::net::SocketAddr,
    tls: Option<&ClientTls>,
    request: Vec<u8>,
    alarm: &mut Alarm,
) -> Result<(UpConn, Head), ProxyError> {
    let t = &w.config().timeouts;
    let mut conn = match w.pool.take(backend) {
        Some(c) => c,
        // Boxed: a new connection is the rare case with pooling, and its future (connect
        // timeout, TLS handshake) was the largest state of this one, so every open stream's
        // exchange future carried it (2.8 of 4.9 KB).
        None => Box::pin(connect(w, addr, tls)).await?,
    };
    let (res, request) = conn.exchange(request, t.first_byte, alarm).await;
    match res {
        Ok(head) => Ok((conn, head)),
        Err(ProxyError::UpstreamClosed(why)) if conn.reused => {
            log::debug!("pooled connection to backend {backend} was stale ({why}); reconnecting");
            drop(conn);
            let mut fresh = Box::pin(connect(w, addr, tls)).await?;
            let (res, _) = fresh.exchange(request, t.first_byte, alarm).await;
            res.map(|head| (fresh, head))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use bytes::BytesMut;
    use monoio::io::Splitable;
    use monoio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::auth::Caller;
    use crate::http1::ParseStatus;
    use crate::proxy::request::{inspect, Request};
    use crate::tls::io::Writer;
    use crate::worker::testing::*;

    /// What the boxed exchange future of every open stream is made of: the size of each future
    /// `forward` awaits (`cargo test --lib exchange_future_sizes -- --nocapture`). Pinned like
    /// the connection future: 4,864 bytes (debug build) before issue 17 boxed the connect; 3,072
    /// until its reads and writes ran under the connection's `Alarm` instead of a `Timeout` each
    /// (a 640-byte `Sleep` in every one); 2,816 until the waits of saturated backends and the
    /// reads of error bodies were boxed; 2,360 since a parsed head indexes its known header
    /// names (24 bytes a `Head`, four of them live at once: −1,800 instructions a request for a
    /// client sending the OpenAI SDK's 17 headers, 96 bytes an open stream).
    const MAX_EXCHANGE_FUTURE: usize = 2_360;

    #[test]
    fn exchange_future_sizes() {
        let cfg = config(&["http://127.0.0.1:1"]);
        let (w, _inbox, _plane) = worker(registry(&cfg, 2).publish(cfg.clone()));
        block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let client = TcpStream::connect(addr).await.unwrap();
            let (_rd, wr) = client.into_split();
            let mut wr: ClientWriter = Writer::Plain(wr);
            let (head, body) = streaming_chat();
            let caller = Caller::Open;
            let req = Request::new(&w, &head, Instant::now(), &caller);
            let info = inspect(&w.config(), &head, &body).unwrap();
            let table = w.table();
            let plan =
                Plan::new(&w, &head, &body, &info, &table, caller.flow(&head).unwrap()).unwrap();
            let x = Exchange::new(&w, &req, "127.0.0.1".into(), &info, &body, &plan);
            let entry = table.get(0).unwrap();
            let mut sizes: Vec<(&str, usize)> = Vec::new();
            let mut tried = Tried::default();
            let mut alarm = Alarm::new(Duration::from_secs(1));
            let alarm = &mut alarm;
            sizes.push((
                "forward_with_fallbacks",
                std::mem::size_of_val(&forward_with_fallbacks(
                    &w, &x, &plan, &body, &mut wr, alarm,
                )),
            ));
            sizes.push((
                "forward",
                std::mem::size_of_val(&forward(&w, &x, &plan.target, &mut wr, alarm)),
            ));
            sizes.push((
                "pick",
                std::mem::size_of_val(&pick(&w, &plan.target, &mut tried)),
            ));
            sizes.push((
                "send_asking",
                std::mem::size_of_val(&send_asking(&w, &x, 0, None, entry, alarm)),
            ));
            sizes.push((
                "send",
                std::mem::size_of_val(&send(&w, 0, addr, None, Vec::new(), alarm)),
            ));
            sizes.push(("connect", std::mem::size_of_val(&connect(&w, addr, None))));
            let mut conn = upstream::connect(addr, Duration::from_secs(1), None)
                .await
                .unwrap();
            let mut rbuf = BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n");
            let Ok(ParseStatus::Complete(resp)) = Head::parse_response(&mut rbuf) else {
                panic!("response head")
            };
            sizes.push((
                "context_exceeded",
                std::mem::size_of_val(&context_exceeded(&w, &x, &mut conn, &resp)),
            ));
            sizes.push((
                "rejects_running_usage",
                std::mem::size_of_val(&rejects_running_usage(&w, &x, &mut conn, &resp)),
            ));
            sizes.push(("UpConn", std::mem::size_of::<UpConn>()));
            sizes.push(("Head", std::mem::size_of::<Head>()));
            sizes.push(("ProxyError", std::mem::size_of::<ProxyError>()));
            sizes.push(("Sent", std::mem::size_of::<Sent>()));
            sizes.push((
                "write_client",
                std::mem::size_of_val(&crate::proxy::relay::write_client(
                    &mut wr,
                    alarm,
                    Vec::new(),
                    Duration::from_secs(1),
                )),
            ));
            sizes.push((
                "relay",
                std::mem::size_of_val(&relay(&w, &x, 0, conn, resp, &mut wr, alarm)),
            ));
            let exchange = report_sizes(&mut sizes, "forward_with_fallbacks");
            assert!(exchange <= Some(MAX_EXCHANGE_FUTURE), "{exchange:?}");
        });
    }
}
