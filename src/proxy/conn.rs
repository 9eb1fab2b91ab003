//! Step 1 of a request: the downstream connection. The accept loop and one HTTP/1.1 connection
//! loop per client: it reads a request head under the header timeout (idle keep-alive timeout
//! between requests), authenticates it before reading a body, enforces the head and body limits
//! before reading a body, answers `Expect: 100-continue`, reads the body and hands the complete
//! request to `proxy::handle`. Pipelined requests are answered in order because the loop only
//! reads the next head once the previous response is written.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use monoio::io::Splitable;
use monoio::net::{TcpListener, TcpStream};
use rustls::ServerConnection;

use crate::alarm::Alarm;
use crate::auth::{Caller, KeyIdCache};
use crate::backends::route::Local;
use crate::capacity::ConnectionSlot;
use crate::clock;
use crate::config::ListenTls;
use crate::error::ProxyError;
use crate::http1::head::{BodyFraming, Head, HeadError, ParseStatus};
use crate::http1::io::take_copy;
use crate::http1::name::Name;
use crate::http1::ChunkedDecoder;
use crate::proxy::answer::{fail, reject};
use crate::proxy::downstream::Downstream;
use crate::proxy::request::{self, Request};
use crate::proxy::{self};
use crate::telemetry::reject::Reason;
use crate::tls::io::{ClientReader, ClientWriter, Reader, Writer};
use crate::tls::stream::{handshake, HandshakeError};
use crate::worker::Worker;

/// Request bodies up to this size are copied out of the connection's read buffer.
const SMALL_BODY: usize = 16 * 1024;

/// How often an accept loop checks whether the process is draining.
const DRAIN_POLL: Duration = Duration::from_millis(20);

pub(crate) async fn accept_loop(worker: Rc<Worker>, listener: TcpListener, admin: bool) {
    loop {
        let accepted = monoio::select! {
            r = listener.accept() => Some(r),
            _ = wait_for_drain(&worker) => None,
        };
        let Some(accepted) = accepted else {
            log::debug!("core {}: draining, listener closed", worker.id);
            return;
        };
        match accepted {
            Ok((stream, peer)) => {
                // The admin listener is exempt, so metrics and health stay reachable when full.
                let slot = match admin {
                    true => None,
                    false => match worker.shared.connection_limit.try_open() {
                        Some(slot) => Some(slot),
                        None => {
                            refuse_connection(&worker, stream, peer);
                            continue;
                        }
                    },
                };
                // The connection future is built in its box: wrapping it in an `async move`
                // block would store it twice (once captured, once awaited), 9.6 KB per open
                // connection instead of 4.7.
                let conn = serve(worker.clone(), stream, peer, admin, slot);
                monoio::spawn(Contained(Box::pin(conn)));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on a full fd table.
                log::warn!("accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Over `limits.max_connections`: closed at once, before a byte is read (a FIN, or a reset if
/// the client already sent data), counted and logged under the rejection log budget.
fn refuse_connection(worker: &Worker, stream: TcpStream, peer: SocketAddr) {
    drop(stream);
    worker.shared.metrics.rejected.note(
        Reason::MaxConnections,
        format_args!(
            "connection from {peer}: limits.max_connections ({}) reached",
            worker.shared.connection_limit.max()
        ),
    );
}

/// Keeps a panic in one connection's task from unwinding through the runtime, which would take
/// the whole core (and every connection on it) down: monoio does not catch task panics itself.
/// The panicking connection is dropped, which releases its guards and closes its sockets.
struct Contained<F>(Pin<Box<F>>);

impl<F: Future<Output = ()>> Future for Contained<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.0.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(_) => {
                log::error!("a connection task panicked; that connection was closed");
                Poll::Ready(())
            }
        }
    }
}

async fn wait_for_drain(worker: &Worker) {
    while !worker.shared.draining() {
        monoio::time::sleep(DRAIN_POLL).await;
    }
}

async fn serve(
    worker: Rc<Worker>,
    stream: TcpStream,
    peer: SocketAddr,
    admin: bool,
    slot: Option<ConnectionSlot>,
) {
    let _slot = slot;
    let _conn = worker.connection_guard();
    let _ = stream.set_nodelay(true);
    let (rd, wr) = match worker.config().tls.as_ref().filter(|_| !admin) {
        None => {
            let (rd, wr) = stream.into_split();
            (Reader::Plain(rd), Writer::Plain(wr))
        }
        // Boxed: the handshake's state lives only while it runs, and plaintext connections do
        // not carry it in their future.
        Some(tls) => match Box::pin(accept_tls(&worker, stream, peer, tls)).await {
            Some(halves) => halves,
            None => return,
        },
    };
    let mut d = Downstream {
        key_ids: KeyIdCache::default(),
        rd,
        wr,
        buf: BytesMut::with_capacity(4 * 1024),
        peer,
        peer_ip: peer.ip().to_string().into(),
        admin,
        alarm: Alarm::new(worker.config().timeouts.shortest_wait()),
        write_timeout: worker.config().timeouts.write,
    };
    // A new connection gets the header timeout for its first request: keep-alive is for
    // connections that have served one, and a client that connects and sends nothing must not
    // hold a connection (and a `max_connections` slot) for the whole keep-alive time.
    let mut first = true;
    loop {
        let head = match read_head(&worker, &mut d, std::mem::take(&mut first)).await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(e) => {
                log::info!("client {peer}: {e}; closing");
                reject(&worker, &mut d, &e, None).await;
                return;
            }
        };
        let received = Instant::now();
        let _in_flight = worker.request_guard();
        let caller = match authenticate(&worker, &d, &head) {
            Ok(caller) => caller,
            Err(e) => {
                if !refuse(&worker, &mut d, &head, e, received).await {
                    return;
                }
                continue;
            }
        };
        let body = match read_body(&worker, &mut d, &head).await {
            Ok(body) => body,
            Err(e) => {
                log::info!("client {peer} {} {}: {e}", head.method(), head.path());
                reject(&worker, &mut d, &e, Some(&head)).await;
                return;
            }
        };
        if !proxy::handle(&worker, &mut d, head, body, received, caller).await {
            return;
        }
    }
}

/// The TLS handshake with a client, on the core that accepted it, under
/// `tls.handshake_timeout`. A failure closes the connection without an answer (there is no
/// channel to answer on); every outcome is counted, failures logged at debug (a port scan must
/// not flood the log).
async fn accept_tls(
    worker: &Worker,
    stream: TcpStream,
    peer: SocketAddr,
    tls: &ListenTls,
) -> Option<(ClientReader, ClientWriter)> {
    let conn = match ServerConnection::new(tls.server.config.clone()) {
        Ok(c) => c,
        Err(e) => {
            log::warn!("client {peer}: cannot start TLS: {e}");
            return None;
        }
    };
    let result = monoio::time::timeout(tls.handshake_timeout, handshake(stream, conn, true)).await;
    let label = match &result {
        Ok(Ok(_)) => "ok",
        Ok(Err(HandshakeError::NotTls)) => "plaintext",
        Ok(Err(_)) => "error",
        Err(_) => "timeout",
    };
    worker.shared.metrics.tls_handshake("client", label);
    match result {
        Ok(Ok((rd, wr))) => Some((Reader::Tls(Box::new(rd)), Writer::Tls(Box::new(wr)))),
        Ok(Err(e)) => {
            log::debug!("client {peer}: {e}; closing");
            None
        }
        Err(_) => {
            log::debug!("client {peer}: TLS handshake timed out; closing");
            None
        }
    }
}

/// Reads one request head. `Ok(None)` means the client closed (or idled out) between requests.
async fn read_head(
    worker: &Worker,
    d: &mut Downstream,
    first: bool,
) -> Result<Option<Head>, ProxyError> {
    let cfg = worker.config();
    let max = cfg.limits.max_header_bytes;
    let mut head_deadline: Option<Instant> = None;
    loop {
        if !d.buf.is_empty() {
            match Head::parse_request(&mut d.buf) {
                Ok(ParseStatus::Complete(head)) => {
                    if head.raw_len() > max {
                        return Err(ProxyError::HeadTooLarge(max));
                    }
                    if !head.target().starts_with('/') {
                        return Err(ProxyError::BadRequest(
                            "request target must be an absolute path".into(),
                        ));
                    }
                    // RFC 9112 §3.2: a request with more than one Host is refused; two
                    // proxies could read two different hosts from it.
                    if head.count(Name::Host) > 1 {
                        return Err(ProxyError::BadRequest("more than one Host header".into()));
                    }
                    return Ok(Some(head));
                }
                Ok(ParseStatus::Partial) if d.buf.len() > max => {
                    return Err(ProxyError::HeadTooLarge(max))
                }
                Ok(ParseStatus::Partial) => {}
                Err(HeadError::TooManyHeaders) => return Err(ProxyError::HeadTooLarge(max)),
                Err(e) => return Err(ProxyError::BadRequest(e.to_string())),
            }
        }
        // Between requests the keep-alive timeout applies; once a head has started, the header
        // timeout bounds the whole head (slowloris).
        let now = Instant::now();
        let deadline = match head_deadline {
            None if d.buf.is_empty() && !first => clock::after(now, cfg.timeouts.keepalive),
            None if d.buf.is_empty() => clock::after(now, cfg.timeouts.header),
            None => *head_deadline.insert(clock::after(now, cfg.timeouts.header)),
            Some(deadline) => deadline,
        };
        let buf = std::mem::take(&mut d.buf);
        let started = !buf.is_empty();
        match d.alarm.until(now, deadline, d.rd.read_more(buf)).await {
            Ok((Ok(0), buf)) | Ok((Err(_), buf)) => {
                d.buf = buf;
                return Ok(None);
            }
            // The header timeout starts with the head's first bytes: it is set on the next turn,
            // if they are not yet the whole head.
            Ok((Ok(_), buf)) => d.buf = buf,
            Err(_) if started => return Err(ProxyError::RequestReadTimeout),
            Err(_) => return Ok(None),
        }
    }
}

async fn read_body(worker: &Worker, d: &mut Downstream, head: &Head) -> Result<Bytes, ProxyError> {
    let cfg = worker.config();
    let max = cfg.limits.max_body_bytes;
    let framing = head
        .request_framing()
        .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    if let BodyFraming::Length(n) = framing {
        // Refuse before reading a byte of it.
        if n > max {
            return Err(ProxyError::BodyTooLarge(max));
        }
    }
    if framing != BodyFraming::Empty
        && head
            .get(Name::Expect)
            .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"))
        && d.buf.is_empty()
    {
        let (res, _) = d.wr.write_all(&b"HTTP/1.1 100 Continue\r\n\r\n"[..]).await;
        res.map_err(|e| ProxyError::BadRequest(format!("client gone: {e}")))?;
    }
    // The header timeout bounds the whole body, not each read: a body trickled a byte at a time
    // (slow POST) would otherwise hold the connection forever.
    // Taken when the first read is needed (most bodies came with their head: no clock read).
    let mut deadline = None;
    let mut deadline = || *deadline.get_or_insert_with(|| clock::deadline(cfg.timeouts.header));
    match framing {
        BodyFraming::Empty | BodyFraming::UntilClose => Ok(Bytes::new()),
        BodyFraming::Length(n) => {
            let n = usize::try_from(n).map_err(|_| ProxyError::BodyTooLarge(max))?;
            while d.buf.len() < n {
                read_some(d, deadline()).await?;
            }
            // Small bodies are copied, like heads (see `take_copy`); a large one has grown the
            // buffer for itself and takes that allocation along.
            if n <= SMALL_BODY {
                Ok(take_copy(&mut d.buf, n))
            } else {
                Ok(d.buf.split_to(n).freeze())
            }
        }
        BodyFraming::Chunked => {
            let mut dec = ChunkedDecoder::new();
            let mut body = Vec::new();
            loop {
                let consumed = dec
                    .decode(&d.buf, |data| body.extend_from_slice(data))
                    .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
                let _ = d.buf.split_to(consumed);
                if body.len() as u64 > max {
                    return Err(ProxyError::BodyTooLarge(max));
                }
                if dec.is_done() {
                    return Ok(Bytes::from(body));
                }
                read_some(d, deadline()).await?;
            }
        }
    }
}

/// One read of request-body bytes, given up at `deadline`.
async fn read_some(d: &mut Downstream, deadline: Instant) -> Result<(), ProxyError> {
    let buf = std::mem::take(&mut d.buf);
    match d
        .alarm
        .until(Instant::now(), deadline, d.rd.read_more(buf))
        .await
    {
        Ok((Ok(n), buf)) if n > 0 => {
            d.buf = buf;
            Ok(())
        }
        Ok((_, buf)) => {
            d.buf = buf;
            Err(ProxyError::BadRequest(
                "connection closed before the request body was complete".into(),
            ))
        }
        Err(_) => Err(ProxyError::RequestReadTimeout),
    }
}

/// Who sends this request. Runs before the body is read, so that an unauthenticated client
/// cannot make the proxy buffer a body. Health and metrics stay open (probes and scrapers carry
/// no key), and so does the admin listener; everything else needs a key when auth is on, and
/// `POST /admin/reload` on the main listener an `admin: true` key (checked by `admin::serve`).
fn authenticate(w: &Worker, d: &Downstream, head: &Head) -> Result<Caller, ProxyError> {
    if d.admin {
        return Ok(Caller::Open);
    }
    match request::local_route(w, d.admin, head) {
        Some(Local::Models | Local::Reload) | None => w.auth.identify(head),
        Some(_) => Ok(Caller::Open),
    }
}

/// Answers a request whose authentication failed (its body unread); returns whether the
/// connection may serve another request (only if the refused one had no body).
async fn refuse(
    w: &Worker,
    d: &mut Downstream,
    head: &Head,
    e: ProxyError,
    received: Instant,
) -> bool {
    let has_body = !matches!(head.request_framing(), Ok(BodyFraming::Empty));
    let unknown = Caller::Unknown;
    let mut req = Request::new(w, head, received, &unknown);
    req.close |= has_body;
    fail(w, d, &req, e, None).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::testing::*;

    /// Every open connection holds this future (boxed once); the request path's restructuring
    /// must not grow it. 4,864 bytes in a debug build at 97d682c, before `proxy/` was split; still
    /// 4,864 with TLS (issue 16: the plain-or-TLS halves return an `Either` of the two futures,
    /// the TLS one boxed); 4,736 once the usage tap was boxed (issue 14), 4,864 again with the
    /// request's queue identity for fair admission (issue 18); 4,480 once the client watch's
    /// timer no longer sat beside its read (issue 17: memory per stream); 3,584 once reads and
    /// writes ran under the connection's `Alarm` (its `Sleep`, 640 bytes, boxed once) instead of
    /// a `Timeout` each (3,840 before).
    const MAX_CONNECTION_FUTURE: usize = 3_584;

    #[test]
    fn the_connection_future_does_not_grow() {
        let cfg = config(&["http://127.0.0.1:1"]);
        let (w, _inbox, _plane) = worker(registry(&cfg, 2).publish(cfg.clone()));
        let size = block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let client = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (stream, peer) = listener.accept().await.unwrap();
            let conn = serve(w, stream, peer, false, None);
            let size = std::mem::size_of_val(&conn);
            drop((conn, client));
            size
        });
        eprintln!("connection future: {size} bytes");
        assert!(
            size <= MAX_CONNECTION_FUTURE,
            "{size} > {MAX_CONNECTION_FUTURE}"
        );
    }

    /// What an open stream's two boxed futures are made of: prints the size of each future the
    /// request path awaits (`cargo test --lib future_sizes -- --nocapture`), largest first. An
    /// async fn's future is as large as its largest await point, streaming or not.
    #[test]
    fn future_sizes() {
        use crate::proxy::request::{inspect, Exchange, Plan};
        let cfg = config(&["http://127.0.0.1:1"]);
        let (w, _inbox, _plane) = worker(registry(&cfg, 2).publish(cfg.clone()));
        block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let _client = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (stream, peer) = listener.accept().await.unwrap();
            let (rd, wr) = stream.into_split();
            let mut d = Downstream {
                key_ids: KeyIdCache::default(),
                rd: Reader::Plain(rd),
                wr: Writer::Plain(wr),
                buf: BytesMut::new(),
                peer,
                peer_ip: peer.ip().to_string().into(),
                admin: false,
                alarm: Alarm::new(Duration::from_secs(1)),
                write_timeout: Duration::from_secs(1),
            };
            let (head, body) = streaming_chat();
            let caller = Caller::Open;
            let mut sizes: Vec<(&str, usize)> = Vec::new();
            sizes.push((
                "conn::read_head",
                std::mem::size_of_val(&read_head(&w, &mut d, true)),
            ));
            let canceller = monoio::io::Canceller::new();
            sizes.push((
                "ClientReader::cancelable_read_more",
                std::mem::size_of_val(
                    &d.rd
                        .cancelable_read_more(BytesMut::new(), canceller.handle()),
                ),
            ));
            sizes.push((
                "conn::read_body",
                std::mem::size_of_val(&read_body(&w, &mut d, &head)),
            ));
            let now = Instant::now();
            let req = Request::new(&w, &head, now, &caller);
            sizes.push((
                "admin::serve",
                std::mem::size_of_val(&proxy::admin::serve(&w, &mut d, &req, Local::Health)),
            ));
            sizes.push((
                "answer::fail",
                std::mem::size_of_val(&fail(&w, &mut d, &req, ProxyError::RequestTimeout, None)),
            ));
            sizes.push((
                "answer::reject",
                std::mem::size_of_val(&reject(&w, &mut d, &ProxyError::RequestTimeout, None)),
            ));
            let info = inspect(&w.config(), &head, &body).unwrap();
            let table = w.table();
            let plan =
                Plan::new(&w, &head, &body, &info, &table, caller.flow(&head).unwrap()).unwrap();
            let x = Exchange::new(&w, &req, d.peer_ip.clone(), &info, &body, &plan);
            let Downstream {
                rd, wr, buf, alarm, ..
            } = &mut d;
            let fwd = proxy::forward::forward_with_fallbacks(&w, &x, &plan, &body, wr, alarm);
            sizes.push((
                "forward::forward_with_fallbacks (boxed)",
                std::mem::size_of_val(&fwd),
            ));
            let started = std::time::Instant::now();
            let deadline = started + Duration::from_secs(1);
            let watch = proxy::relay::watch_client(
                rd,
                buf,
                started,
                deadline,
                &x.last_write,
                Box::pin(fwd),
            );
            sizes.push((
                "relay::watch_client(Box<forward>)",
                std::mem::size_of_val(&watch),
            ));
            drop(watch);
            sizes.push((
                "monoio::time::sleep",
                std::mem::size_of_val(&monoio::time::sleep(Duration::from_secs(1))),
            ));
            drop(x);
            drop(plan);
            let h = proxy::handle(&w, &mut d, head, body, now, Caller::Open);
            sizes.push(("proxy::handle", std::mem::size_of_val(&h)));
            drop(h);
            sizes.push(("Request", std::mem::size_of::<Request<'_>>()));
            sizes.push(("Plan", std::mem::size_of::<Plan<'_>>()));
            sizes.push(("Exchange", std::mem::size_of::<Exchange<'_>>()));
            sizes.push(("RequestInfo", std::mem::size_of_val(&info)));
            sizes.push(("Downstream", std::mem::size_of::<Downstream>()));
            // A stream holds this one inline in its connection's future (debug-build sizes).
            let handle = report_sizes(&mut sizes, "proxy::handle");
            assert!(handle <= Some(2_688), "{handle:?}");
        });
    }
}
