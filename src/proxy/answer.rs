//! Every answer the proxy writes itself rather than relays — errors, refusals, local endpoints —
//! so there is one place that knows how they look: OpenAI's error shape, `x-request-id`, the
//! connection header, and a write bounded by `timeouts.write` (a client that never reads must not
//! hold its connection forever).

use std::time::Duration;

use crate::error::{Outcome, ProxyError};
use crate::http1::head::Head;
use crate::http1::write;
use crate::openai::RequestInfo;
use crate::proxy::account::{account, Done};
use crate::proxy::downstream::Downstream;
use crate::proxy::relay::write_client;
use crate::proxy::request::{request_id, Request};
use crate::worker::Worker;

/// A complete small response the proxy writes itself.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) content_type: &'static str,
    pub(crate) body: Vec<u8>,
    /// A header the answer carries besides the usual ones (`Retry-After`, `WWW-Authenticate`).
    pub(crate) extra: Option<(&'static str, String)>,
}

impl Answer {
    pub(crate) fn json(status: u16, body: Vec<u8>) -> Self {
        Answer {
            status,
            content_type: "application/json",
            body,
            extra: None,
        }
    }

    pub(crate) fn error(e: &ProxyError) -> Self {
        Answer {
            extra: e.extra_header(),
            ..Answer::json(e.status(), e.body())
        }
    }
}

/// Writes a complete small response; returns whether the connection stays open.
pub(crate) async fn respond(d: &mut Downstream, req: &Request<'_>, a: Answer, close: bool) -> bool {
    let mut out = Vec::with_capacity(256 + a.body.len());
    write::status_line(&mut out, a.status, "");
    write::header(&mut out, "content-type", a.content_type.as_bytes());
    write::header_num(&mut out, "content-length", a.body.len() as u64);
    write::header(&mut out, "x-request-id", req.id.as_bytes());
    if let Some((name, value)) = a.extra {
        write::header(&mut out, name, value.as_bytes());
    }
    if close {
        write::header(&mut out, "connection", b"close");
    } else if req.head.version == 0 {
        write::header(&mut out, "connection", b"keep-alive");
    }
    write::end_head(&mut out);
    if req.head.method() != "HEAD" {
        out.extend_from_slice(&a.body);
    }
    // Bounded like a stream: a client that never reads must not hold its connection forever.
    let (ok, _) = write_client(&mut d.wr, &mut d.alarm, out, d.write_timeout).await;
    ok && !close
}

/// Answers with `e` and logs it: refusals (auth, rates, capacity) are counted and logged under
/// the rejection log budget, other errors at `level`.
pub(crate) async fn error_response(
    w: &Worker,
    d: &mut Downstream,
    req: &Request<'_>,
    e: &ProxyError,
    level: log::Level,
) -> bool {
    let (head, id) = (req.head, &req.id);
    match e.rejection() {
        Some(reason) => w.shared.metrics.rejected.note(
            reason,
            format_args!("request {id} {} {}: {e}", head.method(), head.path()),
        ),
        None => log::log!(level, "request {id} {} {}: {e}", head.method(), head.path()),
    }
    let close = req.close || e.closes_connection();
    respond(d, req, Answer::error(e), close).await
}

/// Refuses a request with `e` before it reached a backend, and accounts for it.
pub(crate) async fn fail(
    w: &Worker,
    d: &mut Downstream,
    req: &Request<'_>,
    e: ProxyError,
    info: Option<&RequestInfo>,
) -> bool {
    let keep = error_response(w, d, req, &e, log::Level::Info).await;
    let done = Done {
        outcome: Outcome::Refused,
        ..Done::answered(req, info, e.status())
    };
    account(w, d, done);
    keep
}

/// Answers a request that could not even be read completely (bad head, limits, timeouts); the
/// connection is always closed afterwards.
pub(crate) async fn reject(w: &Worker, d: &mut Downstream, e: &ProxyError, head: Option<&Head>) {
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
    let _ = write_client(&mut d.wr, &mut d.alarm, out, d.write_timeout).await;
    w.metrics.request(
        e.status(),
        None,
        w.metrics.model_index(None),
        Duration::ZERO,
        None,
    );
}
