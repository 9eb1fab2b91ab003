//! One client connection: the keep-alive loop, reading a request and its body, the `x-mock-*`
//! hooks that shape the connection (idle limits, resets), and watching the client while an
//! answer is pending so that a disconnect is seen at once.
//!
//! Requests are parsed by monoio-http's `RequestDecoder`, not by `crate::http1`, on purpose: the
//! mock is the far end of the proxy's upstream connections, and a decoder that is not the proxy's
//! own is what catches a framing mistake in the requests the proxy writes (the same mistake in
//! writer and parser would cancel out). Responses, which the proxy parses, are framed with
//! `crate::http1` in `wire`. Nothing here may panic on what a client sends; a request the decoder
//! rejects gets a 400 and the connection closes.

use std::{cell::Cell, io, rc::Rc, sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use http::{header, HeaderMap, Version};
use monoio::{
    buf::{IoBufMut, IoVecBufMut},
    io::{stream::Stream as _, AsyncReadRent, OwnedReadHalf, Splitable},
    net::TcpStream,
    BufResult,
};
use monoio_http::{
    common::body::Body as _,
    h1::{
        codec::decoder::{FillPayload as _, RequestDecoder},
        payload::Payload,
    },
};

use super::{
    answer::answer,
    exchange::{Action, Exchange, Flow},
    hooks::Hooks,
    route::{is_inference_path, route},
    state::{ActiveGuard, Server},
    wire::{ConnHeader, Out, PeerGone, Reply, Writer},
};
use crate::http1::write as h1;

/// Largest request body accepted (by `Content-Length`); bigger ones get 413.
const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;

type Reader = RequestDecoder<LentRead>;
type Request = http::Request<Payload>;

pub(super) async fn serve_connection(
    stream: TcpStream,
    socket: socket2::Socket,
    server: Rc<Server>,
) {
    let (read_half, mut writer) = stream.into_split();
    let lent = LentRead(Rc::new(Cell::new(Some(read_half))));
    let mut reader: Reader = RequestDecoder::new(lent.clone());
    // Idle keep-alive limit, set by `x-mock-keepalive-timeout-ms`.
    let mut idle: Option<Duration> = None;
    loop {
        let next = match idle {
            // A timed-out read leaves the decoder in an unknown state: close after it.
            Some(limit) => match monoio::time::timeout(limit, reader.next()).await {
                Ok(next) => next,
                Err(_) => return,
            },
            None => reader.next().await,
        };
        let request = match next {
            None => return,
            Some(Ok(request)) => request,
            Some(Err(_)) => {
                let reply = Reply::error(400, "malformed HTTP request");
                reply_now(&mut writer, reply, ConnHeader::Close).await;
                return;
            }
        };
        let flow = handle(
            request,
            &mut reader,
            &mut writer,
            &socket,
            &server,
            &mut idle,
        )
        .await;
        match flow {
            Flow::KeepAlive => {}
            Flow::Close => return,
            Flow::Reset => {
                drop(reader);
                abort(lent, writer, socket);
                return;
            }
            Flow::Gone => {
                server.note_disconnect();
                return;
            }
        }
    }
}

/// Close with a TCP reset: zero linger, then close every descriptor of the socket without the
/// `shutdown` that dropping an `OwnedWriteHalf` does (that would send FIN first), so the last
/// close sends RST.
fn abort(lent: LentRead, writer: Writer, handle: socket2::Socket) {
    if let Err(e) = handle.set_linger(Some(Duration::ZERO)) {
        log::debug!("mock backend: SO_LINGER failed: {e}");
    }
    if let Some(read_half) = lent.0.take() {
        // Reunited, the stream closes without `shutdown`.
        if let Ok(stream) = read_half.reunite(writer) {
            drop(stream);
        }
    }
    drop(handle);
}

/// The connection's read half, lent to the request decoder and recoverable (for `reunite`)
/// whenever no read is in flight.
#[derive(Clone)]
struct LentRead(Rc<Cell<Option<OwnedReadHalf<TcpStream>>>>);

/// The read half taken out for one read; returned to the cell on drop, so a read cancelled by
/// `select!` or a timeout does not lose it.
struct Loan<'a> {
    cell: &'a Cell<Option<OwnedReadHalf<TcpStream>>>,
    half: Option<OwnedReadHalf<TcpStream>>,
}

impl<'a> Loan<'a> {
    fn new(cell: &'a Cell<Option<OwnedReadHalf<TcpStream>>>) -> Self {
        Self {
            cell,
            half: cell.take(),
        }
    }
}

impl Drop for Loan<'_> {
    fn drop(&mut self) {
        self.cell.set(self.half.take());
    }
}

fn half_taken() -> io::Error {
    io::Error::other("read half already taken")
}

impl AsyncReadRent for LentRead {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        let mut loan = Loan::new(&self.0);
        match loan.half.as_mut() {
            Some(half) => half.read(buf).await,
            None => (Err(half_taken()), buf),
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        let mut loan = Loan::new(&self.0);
        match loan.half.as_mut() {
            Some(half) => half.readv(buf).await,
            None => (Err(half_taken()), buf),
        }
    }
}

/// Serve one request; inference requests are counted in `requests`, `active` and `completed`.
async fn handle(
    request: Request,
    reader: &mut Reader,
    writer: &mut Writer,
    peer: &socket2::Socket,
    server: &Server,
    idle: &mut Option<Duration>,
) -> Flow {
    if !is_inference_path(request.uri().path()) {
        return respond(request, reader, writer, peer, server, idle).await;
    }
    server.stats.requests.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard::new(&server.stats);
    let flow = respond(request, reader, writer, peer, server, idle).await;
    if matches!(flow, Flow::KeepAlive | Flow::Close) {
        server.stats.completed.fetch_add(1, Ordering::Relaxed);
    }
    flow
}

/// Read the body, decide the answer, write it while watching the peer.
async fn respond(
    request: Request,
    reader: &mut Reader,
    writer: &mut Writer,
    peer: &socket2::Socket,
    server: &Server,
    idle: &mut Option<Duration>,
) -> Flow {
    let (parts, mut payload) = request.into_parts();
    let path = parts.uri.path().to_string();
    let keep_alive = wants_keep_alive(parts.version, &parts.headers);

    let declared = match content_length(&parts.headers) {
        Ok(n) => n,
        Err(()) => {
            return reply_now(
                writer,
                Reply::error(400, "invalid Content-Length"),
                ConnHeader::Close,
            )
            .await
        }
    };
    if declared > MAX_BODY_BYTES {
        return reply_now(
            writer,
            Reply::error(413, "request body too large"),
            ConnHeader::Close,
        )
        .await;
    }
    let has_body = declared > 0 || !matches!(payload, Payload::None);
    if has_body && expects_continue(&parts.headers) && send_continue(writer).await.is_err() {
        return Flow::Gone;
    }
    // The body only arrives while `fill_payload` runs; then it sits in the payload.
    if reader.fill_payload().await.is_err() {
        return reply_now(
            writer,
            Reply::error(400, "malformed request body"),
            ConnHeader::Close,
        )
        .await;
    }
    let mut body = Vec::new();
    while let Some(data) = payload.next_data().await {
        match data {
            Ok(bytes) => body.extend_from_slice(&bytes),
            Err(_) => {
                return reply_now(
                    writer,
                    Reply::error(400, "malformed request body"),
                    ConnHeader::Close,
                )
                .await
            }
        }
    }

    let hooks = match Hooks::parse(&parts.headers, &server.opts) {
        Ok(hooks) => hooks,
        Err(message) => {
            let conn = ConnHeader::for_request(parts.version, !keep_alive, None);
            return reply_now(writer, Reply::error(400, &message), conn).await;
        }
    };
    if let Some(limit) = hooks.keepalive_timeout.or(hooks.idle_close) {
        *idle = Some(limit);
    }
    let exchange = Exchange {
        target: parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str().to_string())
            .unwrap_or_else(|| path.clone()),
        method: parts.method,
        path,
        version: parts.version,
        headers: header_list(&parts.headers),
        body: Bytes::from(body),
        keep_alive,
        hooks,
    };

    if is_inference_path(&exchange.path) && server.reset_this_one() {
        return Flow::Reset;
    }
    let action = route(&exchange, server);
    // A generation (not an error answer) takes a place in the simulated engine batch.
    let batched = is_inference_path(&exchange.path)
        && !matches!(action, Action::Reply(_))
        && server.engine.get().max_running > 0.0;
    let instant = action.is_instant()
        && !batched
        && !exchange.hooks.stall_head
        && exchange.hooks.stall_after.is_none();
    if instant {
        answer(&action, &exchange, writer).await
    } else {
        let generate = async {
            let _in_batch = match batched {
                // Saturating float-to-int cast of a non-negative whole number.
                true => Some(
                    server
                        .batch
                        .enter(|| server.engine.get().max_running as usize)
                        .await,
                ),
                false => None,
            };
            answer(&action, &exchange, writer).await
        };
        // Something to wait for: watch the read half so a client that leaves is noticed at once.
        monoio::select! {
            // The answer first: a client that closes right after the last byte was written
            // must not turn a complete response into a disconnect.
            biased;
            flow = generate => flow,
            _ = watch_peer(peer) => Flow::Gone,
        }
    }
}

/// Resolves when the client closes or breaks the connection. It only peeks (MSG_PEEK) at the
/// socket, so bytes of a pipelined request are never consumed: an earlier version read through
/// the decoder here and lost a request whose bytes arrived just as the answer completed (the
/// cancelled read took them along). Polling every few milliseconds keeps disconnects visible
/// within the 100 ms the proxy's tests demand.
async fn watch_peer(peer: &socket2::Socket) {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    loop {
        match peer.recv_with_flags(&mut probe, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
            Ok(0) => return,
            // Data waiting (a pipelined request): the peer is alive; stop watching.
            Ok(_) => return std::future::pending::<()>().await,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn reply_now(writer: &mut Writer, reply: Reply, conn: ConnHeader) -> Flow {
    let mut out = Out::new(writer);
    reply.encode(&mut out.buf, false, conn);
    match out.flush().await {
        Ok(()) if conn == ConnHeader::Close => Flow::Close,
        Ok(()) => Flow::KeepAlive,
        Err(PeerGone) => Flow::Gone,
    }
}

/// `100 Continue`, written before the body is read.
async fn send_continue(writer: &mut Writer) -> Result<(), PeerGone> {
    let mut out = Out::new(writer);
    h1::status_line(&mut out.buf, 100, "");
    h1::end_head(&mut out.buf);
    out.flush().await
}

/// HTTP/1.1 keeps the connection unless `Connection: close`; HTTP/1.0 only with `keep-alive`.
fn wants_keep_alive(version: Version, headers: &HeaderMap) -> bool {
    let has = |token: &str| {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if has("close") {
        false
    } else if version == Version::HTTP_10 {
        has("keep-alive")
    } else {
        version == Version::HTTP_11
    }
}

fn content_length(headers: &HeaderMap) -> Result<u64, ()> {
    match headers.get(header::CONTENT_LENGTH) {
        None => Ok(0),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or(()),
    }
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Header names (lowercase) and values in the order the decoder kept them.
fn header_list(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn keep_alive_rules() {
        let mut h = HeaderMap::new();
        assert!(wants_keep_alive(Version::HTTP_11, &h));
        assert!(!wants_keep_alive(Version::HTTP_10, &h));
        h.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        assert!(wants_keep_alive(Version::HTTP_10, &h));
        h.insert(header::CONNECTION, HeaderValue::from_static("foo, close"));
        assert!(!wants_keep_alive(Version::HTTP_11, &h));
    }
}
