//! Step 6 of a request: the backend's response back to the client, as it arrives. The head is
//! decided by a pure function of the two heads (`plan_response`: framing, what the usage tap
//! does, keep-alive on both sides), so its rules are tested as a table; the body loop then moves
//! every upstream read to the client as one write (re-framed as one chunk when the client gets
//! chunks), through the usage tap, under the idle timeout. A response that fails after its head
//! went out can no longer get an error status: it is cut (`cut_stream`). Whenever the exchange goes
//! a few milliseconds without writing to the client, its socket is watched (`watch_client`): a
//! client that leaves drops the upstream connection at once (or at the next write, which fails),
//! which is what stops the GPU.

use std::cell::Cell;
use std::future::Future;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use monoio::io::Canceller;

use crate::alarm::{Alarm, Elapsed};
use crate::error::{Outcome, ProxyError};
use crate::http1::head::{BodyFraming, Head};
use crate::http1::headers::forwardable;
use crate::http1::io::READ_ROOM;
use crate::http1::name::Name;
use crate::http1::{write, ChunkedDecoder};
use crate::openai;
use crate::openai::tap::{Kind as UsageKind, Sink, Tap};
use crate::proxy::request::Exchange;
use crate::tls::io::{ClientReader, ClientWriter};
use crate::upstream::UpConn;
use crate::worker::traits::Trait;
use crate::worker::Worker;

/// How long an exchange goes without writing to the client before the client socket is watched
/// for a disconnect. Bounds the extra delay before an abandoned request is cancelled upstream
/// (a write, when one comes sooner, finds the client gone by itself).
const WATCH_AFTER: Duration = Duration::from_millis(5);

/// Room for what a client may send while its response is still running. The watch only has to
/// see the client leave (EOF or an error); bytes it does read (a pipelined request) end the
/// watch, and the rest of them is read after the response, so a few dozen bytes do. Every open
/// stream holds this buffer.
const WATCH_BUF: usize = 64;

/// Body writes at least this far apart make a stream slow (tokens at a reader's pace, not a
/// transfer): between its writes it keeps as little as it can (see `relay`).
const SLOW_GAP: Duration = Duration::from_millis(10);

/// The read buffer a slow stream waits in: an SSE token event is a few hundred bytes.
const SLOW_READ_BUF: usize = 1024;

/// A slow stream reads into the room its buffer has down to this; below, it grows by a page.
const SLOW_MIN_ROOM: usize = 256;

/// Room for the framing around the body bytes of one write (chunk size line and CRLFs).
const FRAMING_ROOM: usize = 32;

/// The result of a response that was (at least partly) sent to the client.
pub(crate) struct Sent {
    pub(crate) status: u16,
    pub(crate) outcome: Outcome,
    /// The client connection must be closed afterwards.
    pub(crate) close: bool,
}

impl Sent {
    /// A relayed 5xx is the backend failing, whatever else went right.
    fn new(status: u16, outcome: Outcome, close: bool) -> Self {
        Sent {
            status,
            outcome: if outcome == Outcome::Ok && status >= 500 {
                Outcome::UpstreamError
            } else {
                outcome
            },
            close,
        }
    }
}

/// What `plan_response` needs to know of the client's side.
pub(crate) struct ClientSide<'a> {
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    /// HTTP/1.1 (else 1.0: no chunks, keep-alive only when asked for).
    pub(crate) http11: bool,
    pub(crate) request_id: &'a str,
    /// What of the usage the proxy asked for is removed: (the usage-only event, the running
    /// usage of other chunks).
    pub(crate) strip: (bool, bool),
    /// The proxy asked llama.cpp for `timings_per_token`: the tap removes them again.
    pub(crate) timings: bool,
    /// The connection closes after this response anyway (asked for, or draining).
    pub(crate) close: bool,
}

/// How one response goes to the client, decided from the heads alone.
#[derive(Debug, PartialEq)]
pub(crate) struct ResponsePlan {
    /// How the upstream body is delimited.
    pub(crate) framing: BodyFraming,
    pub(crate) kind: UsageKind,
    pub(crate) event_stream: bool,
    /// The body goes to the client as chunks of our own.
    pub(crate) reframe: bool,
    pub(crate) close: bool,
    /// The upstream connection may be pooled once its body is read.
    pub(crate) reusable: bool,
    /// The client's response head.
    pub(crate) head: Vec<u8>,
}

/// The response head and body framing for the client. Re-framed as chunks: anything not
/// fixed-length, and fixed-length bodies the usage tap may shorten; an HTTP/1.0 client cannot
/// take chunks, so its body ends with the connection.
/// `room`: bytes of body already buffered, so the head's buffer can take them without growing.
#[cfg(test)]
pub(crate) fn plan_response(
    c: &ClientSide<'_>,
    resp: &Head,
    room: usize,
) -> Result<ResponsePlan, ProxyError> {
    plan_response_in(c, resp, Vec::with_capacity(1024 + room))
}

/// `plan_response`, the head written into `head` (empty, from the core's spare buffers).
pub(crate) fn plan_response_in(
    c: &ClientSide<'_>,
    resp: &Head,
    mut head: Vec<u8>,
) -> Result<ResponsePlan, ProxyError> {
    let framing = resp
        .response_framing(c.method)
        .map_err(|e| ProxyError::UpstreamProtocol(e.to_string()))?;
    let status = resp.status;
    let event_stream = resp
        .get(Name::ContentType)
        .is_some_and(|v| v.starts_with(b"text/event-stream"));
    let mut kind = openai::response_kind(c.path, status, event_stream, c.strip, c.timings);
    if kind.holds_back() && !c.http11 {
        // An HTTP/1.0 client with a fixed-length body cannot have an event removed; it is rare
        // enough to let it see the usage chunk rather than buffer the whole stream.
        if let BodyFraming::Length(_) = framing {
            kind = UsageKind::OpenAiSse {
                strip: false,
                running: false,
                timings: false,
            };
        }
    }
    let chunked_out = matches!(framing, BodyFraming::Chunked | BodyFraming::UntilClose)
        || (kind.holds_back() && matches!(framing, BodyFraming::Length(_)));
    let close = c.close || (chunked_out && !c.http11);

    write::status_line(&mut head, status, resp.reason_bytes());
    for line in forwardable(resp, &[Name::XRequestId]) {
        write::line(&mut head, line);
    }
    write::header(&mut head, "x-request-id", c.request_id.as_bytes());
    match framing {
        BodyFraming::Empty if c.method == "HEAD" => {
            if let Some(len) = resp.get(Name::ContentLength) {
                write::header(&mut head, "content-length", len);
            }
        }
        BodyFraming::Empty if status == 204 || status == 304 || status < 200 => {}
        BodyFraming::Empty => write::header_num(&mut head, "content-length", 0),
        _ if chunked_out && c.http11 => write::header(&mut head, "transfer-encoding", b"chunked"),
        BodyFraming::Length(n) if !chunked_out => write::header_num(&mut head, "content-length", n),
        _ => {}
    }
    if close {
        write::header(&mut head, "connection", b"close");
    } else if !c.http11 {
        write::header(&mut head, "connection", b"keep-alive");
    }
    write::end_head(&mut head);
    Ok(ResponsePlan {
        framing,
        kind,
        event_stream,
        reframe: chunked_out && c.http11,
        close,
        reusable: resp.keep_alive() && framing != BodyFraming::UntilClose,
        head,
    })
}

/// Where the upstream body stands: how much is left, and its chunk decoder.
struct Body {
    framing: BodyFraming,
    decoder: Option<ChunkedDecoder>,
    left: u64,
    finished: bool,
}

impl Body {
    fn new(framing: BodyFraming) -> Self {
        Body {
            framing,
            decoder: (framing == BodyFraming::Chunked).then(ChunkedDecoder::new),
            left: match framing {
                BodyFraming::Length(n) => n,
                _ => 0,
            },
            finished: matches!(framing, BodyFraming::Empty),
        }
    }

    /// Moves the body bytes buffered in `buf` through the tap into `out` (framed for the
    /// client); the end of the body flushes the tap and closes the client's chunking. What was
    /// moved is dropped from `buf` by advancing its start, not split off: a split makes the
    /// read buffer a shared one (an allocation, then two reference-count updates on every read,
    /// and a uniqueness check on every reserve).
    fn drain(
        &mut self,
        buf: &mut BytesMut,
        tap: &mut Tap,
        out: &mut Vec<u8>,
        reframe: bool,
    ) -> Result<(), ProxyError> {
        if self.finished {
            return Ok(());
        }
        let mut emit = ToClient::new(out, reframe);
        match self.framing {
            BodyFraming::Length(_) => {
                let take = (buf.len() as u64).min(self.left) as usize;
                tap.feed(&buf[..take], &mut emit);
                buf.advance(take);
                self.left -= take as u64;
                self.finished = self.left == 0;
            }
            BodyFraming::Chunked => {
                let Some(dec) = self.decoder.as_mut() else {
                    return Err(ProxyError::Internal("chunked decoder missing".into()));
                };
                let consumed = dec
                    .decode(buf, |data| tap.feed(data, &mut emit))
                    .map_err(|e| ProxyError::UpstreamProtocol(e.to_string()))?;
                buf.advance(consumed);
                self.finished = dec.is_done();
            }
            BodyFraming::UntilClose => {
                tap.feed(buf, &mut emit);
                buf.clear();
            }
            BodyFraming::Empty => {}
        }
        drop(emit);
        if self.finished {
            finish(tap, out, reframe);
        }
        Ok(())
    }
}

/// The body's bytes on their way to the client. Reframed, all that one drain puts (one upstream
/// read: often several SSE events) goes out as one chunk, framed when it is dropped, when its
/// size is known: one header and one move of the bytes instead of a header per event. Nothing
/// is held back: a drain's bytes go out in the write that follows it.
struct ToClient<'a> {
    out: &'a mut Vec<u8>,
    reframe: bool,
    /// Where the open chunk's bytes start in `out`.
    open: Option<usize>,
}

impl<'a> ToClient<'a> {
    fn new(out: &'a mut Vec<u8>, reframe: bool) -> Self {
        ToClient {
            out,
            reframe,
            open: None,
        }
    }
}

impl Sink for ToClient<'_> {
    fn put(&mut self, data: &[u8]) {
        if self.reframe && self.open.is_none() {
            self.open = Some(self.out.len());
        }
        self.out.extend_from_slice(data);
    }
}

impl Drop for ToClient<'_> {
    fn drop(&mut self) {
        if let Some(start) = self.open.take() {
            write::frame_chunk_from(self.out, start);
        }
    }
}

/// The body ended: whatever the tap held back goes out, then the last chunk.
fn finish(tap: &mut Tap, out: &mut Vec<u8>, reframe: bool) {
    tap.finish(&mut ToClient::new(out, reframe));
    if reframe {
        out.extend_from_slice(write::LAST_CHUNK);
    }
}

/// Streams the backend's response to the client: the head at once, then every upstream read as
/// one downstream write.
pub(crate) async fn relay(
    w: &Worker,
    x: &Exchange<'_>,
    backend: usize,
    mut conn: UpConn,
    resp: Head,
    wr: &mut ClientWriter,
    alarm: &mut Alarm,
) -> Result<Sent, ProxyError> {
    let t = &w.config().timeouts;
    let client = ClientSide {
        method: x.head.method(),
        path: x.head.path(),
        http11: x.head.version == 1,
        request_id: x.request_id,
        strip: x.strip.get(),
        timings: x.added_timings.get(),
        // A drain that began while the backend worked: say so in this head, so the client opens
        // its next request elsewhere instead of racing the process exit on this connection.
        close: x.close || w.shared.draining(),
    };
    let plan = plan_response_in(&client, &resp, w.spare.take(1024 + conn.buf.len()))?;
    let status = resp.status;
    x.status.set(status);
    start_tap(x, plan.kind, &resp, w.config().usage.max_event_bytes);
    let sent = |outcome, close| Sent::new(status, outcome, close);
    let head_len = plan.head.len();
    let c = Ctx {
        w,
        x,
        backend,
        event_stream: plan.event_stream,
        reframe: plan.reframe,
        write_timeout: t.write,
    };
    let mut out = plan.head;
    let mut body = Body::new(plan.framing);
    let mut first = true;
    let mut last_chunk: Option<Instant> = None;
    // Slow: the last two body writes were `SLOW_GAP` or more apart. A slow stream spends almost
    // all its life waiting for the next token, and with thousands open what each holds while it
    // waits is the proxy's memory: it frees its write buffer after every write and waits in a
    // small read buffer. (One allocation per token, at a few tokens per second; a fast stream
    // keeps both buffers.)
    let mut slow = false;
    loop {
        if out.capacity() == 0 {
            out.reserve(conn.buf.len() + FRAMING_ROOM);
        }
        let drained = body.drain(
            &mut conn.buf,
            &mut x.tap.borrow_mut(),
            &mut out,
            plan.reframe,
        );
        if let Err(e) = drained {
            if first {
                return Err(e);
            }
            return Ok(sent(Box::pin(cut(&c, wr, alarm, out, &e)).await, true));
        }
        let mut wrote_at = None;
        if !out.is_empty() || first {
            let carries_body = !first || out.len() > head_len;
            let (ok, buf) = write_client(wr, alarm, out, t.write).await;
            out = buf;
            out.clear();
            if ok && carries_body {
                let (now, gap) = note_chunk(&c, last_chunk);
                slow = gap.is_some_and(|gap| gap >= SLOW_GAP);
                last_chunk = Some(now);
                wrote_at = Some(now);
            }
            if first {
                first = false;
                x.head_sent.set(true);
            }
            if !ok {
                return Ok(sent(Outcome::ClientAborted, true));
            }
        }
        if body.finished {
            break;
        }
        let mut min_room = READ_ROOM;
        if slow {
            out = Vec::new();
            small_read_buf(&mut conn.buf);
            min_room = SLOW_MIN_ROOM;
        } else {
            conn.make_room();
        }
        let buf = std::mem::take(&mut conn.buf);
        let read = conn.rd.read_with_room(buf, min_room);
        // From the end of the write: a slow client's write is no backend's idleness.
        let now = wrote_at.unwrap_or_else(Instant::now);
        let e = match alarm.within(now, t.idle, read).await {
            Ok((Ok(0), buf)) if body.framing == BodyFraming::UntilClose => {
                conn.buf = buf;
                // The end of a close-delimited body is its connection's end.
                finish(&mut x.tap.borrow_mut(), &mut out, plan.reframe);
                if !out.is_empty() && !write_client(wr, alarm, out, t.write).await.0 {
                    return Ok(sent(Outcome::ClientAborted, true));
                }
                return Ok(sent(Outcome::Ok, plan.close));
            }
            Ok((Ok(0), _)) => ProxyError::BodyClosed,
            Ok((Ok(n), buf)) => {
                conn.buf = buf;
                // A slow stream's small buffer filling up says nothing of bursts.
                if !slow {
                    conn.after_read(n);
                }
                continue;
            }
            Ok((Err(e), _)) => ProxyError::BodyRead(e),
            Err(_) => ProxyError::IdleTimeout(t.idle),
        };
        // Boxed: a cut stream is rare, and its two writes would be the largest state of the
        // relay that every open stream holds.
        return Ok(sent(Box::pin(cut(&c, wr, alarm, out, &e)).await, true));
    }
    w.spare.give(out);
    learn_timings(w, x, backend);
    // Bytes after the end of the body: the backend is confused; don't reuse it.
    if plan.reusable && conn.buf.is_empty() {
        w.pool.put(backend, conn);
    }
    Ok(sent(Outcome::Ok, plan.close))
}

/// Moves what a slow stream's read buffer holds (usually nothing, or the few bytes of a chunk's
/// end) into a `SLOW_READ_BUF` one, when the buffer is larger than that or has too little room
/// left to read into (the consumed front of a buffer is not room: reserving would allocate a
/// page and more). Leftovers too large for it stay where they are.
fn small_read_buf(buf: &mut BytesMut) {
    let room = buf.capacity() - buf.len();
    if (buf.capacity() > SLOW_READ_BUF || room < SLOW_MIN_ROOM)
        && buf.len() <= SLOW_READ_BUF - SLOW_MIN_ROOM
    {
        let mut small = BytesMut::with_capacity(SLOW_READ_BUF);
        small.extend_from_slice(buf);
        *buf = small;
    }
}

/// A complete stream that carried llama.cpp's `timings` at its end only: every core asks that
/// backend for them on every chunk from now on (`worker::traits`).
fn learn_timings(w: &Worker, x: &Exchange<'_>, backend: usize) {
    if x.added_timings.get() || !x.tap.borrow().timings_at_end_only() {
        return;
    }
    if !w.learn_trait(backend, Trait::PerTokenTimings) {
        return;
    }
    let table = w.table();
    if let Some(url) = table.get(backend).map(|e| &e.spec.url) {
        log::info!(
            "backend {url} reports llama.cpp timings at the end of a stream only: asking it for {} \
             from now on, so that aborted streams are billed its own counts",
            openai::PER_TOKEN_TIMINGS
        );
    }
}

/// What the relay's helpers need to know of it.
struct Ctx<'a, 'x> {
    w: &'a Worker,
    x: &'a Exchange<'x>,
    backend: usize,
    event_stream: bool,
    reframe: bool,
    write_timeout: Duration,
}

/// Sets up the usage tap for this response (TGI's `/generate` also reports counts in headers).
fn start_tap(x: &Exchange<'_>, kind: UsageKind, resp: &Head, max_event: usize) {
    let mut tap = x.tap.borrow_mut();
    tap.reset(kind, max_event);
    if kind == UsageKind::TgiJson {
        let num = |h: &str| {
            resp.header_str(h)
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        tap.set_header_counts(num("x-prompt-tokens"), num("x-generated-tokens"));
    }
}

/// A body write reached the client: first-byte time, and for streams the gap since the last
/// one (inter-token latency). Returns the time and that gap (also for non-streams: the relay
/// tells slow streams by it).
fn note_chunk(c: &Ctx<'_, '_>, last: Option<Instant>) -> (Instant, Option<Duration>) {
    let (w, x) = (c.w, c.x);
    let now = Instant::now();
    let gap = last.map(|prev| now.duration_since(prev));
    if let Some(gap) = gap.filter(|_| x.stream) {
        w.metrics.inter_token(c.backend, x.model_idx, gap);
    }
    if x.first_byte.get().is_none() {
        x.first_byte.set(Some(now));
    }
    x.last_write.set(Some(now));
    (now, gap)
}

/// The upstream failed after the head went out: counted, fed to the breaker, logged; what was
/// decoded before the failure still goes out, then the stream is cut.
async fn cut(
    c: &Ctx<'_, '_>,
    wr: &mut ClientWriter,
    alarm: &mut Alarm,
    out: Vec<u8>,
    e: &ProxyError,
) -> Outcome {
    log::warn!("request {}: {e}", c.x.request_id);
    c.w.upstream_failed(c.backend, e);
    if !out.is_empty() {
        let _ = write_client(wr, alarm, out, c.write_timeout).await;
    }
    cut_stream(wr, alarm, e, c.event_stream, c.reframe, c.write_timeout).await;
    e.outcome()
}

/// Ends a response that failed after its head went out, when no error status can be sent any
/// more. An event stream gets a last SSE event with the error in OpenAI's shape (SDKs raise it
/// instead of waiting for more); either way the connection is then closed without the last
/// chunk, so no client can take the body for complete.
async fn cut_stream(
    wr: &mut ClientWriter,
    alarm: &mut Alarm,
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
    let _ = write_client(wr, alarm, out, timeout).await;
}

/// Writes to the client under the write timeout; false when the client is gone or too slow
/// (the buffer is lost with a cancelled write, so a fresh one is handed back then).
pub(crate) async fn write_client(
    wr: &mut ClientWriter,
    alarm: &mut Alarm,
    buf: Vec<u8>,
    timeout: Duration,
) -> (bool, Vec<u8>) {
    match alarm
        .within(Instant::now(), timeout, wr.write_all(buf))
        .await
    {
        Ok((res, buf)) => (res.is_ok(), buf),
        Err(_) => (false, Vec::new()),
    }
}

/// Runs `fut` until `deadline` (`timeouts.request`; past it, `Elapsed`) while watching the client
/// socket. EOF or an error on the socket means the client went away: `fut` is dropped (cancelling
/// the upstream exchange) and `None` returned. Bytes that arrive meanwhile (a pipelined request)
/// are kept in `buf`, never lost: the read is cancelled and awaited rather than dropped.
///
/// The watch starts once the exchange has gone `WATCH_AFTER` without writing to the client:
/// `WATCH_AFTER` from `started`, or from the last body write (`last_write`), whichever is later.
/// Most exchanges end before it, and a response that is being written needs no watch: a client
/// that left fails the next write (the relay then drops the upstream connection just the same).
/// Watching costs two ring operations (the read and its cancellation) and a poll of the read on
/// every wake of the exchange; a stream relaying its tokens less than `WATCH_AFTER` apart used
/// to pay them all, for nothing. One timer at a time: until the watch starts (moved on while
/// the response is written), then until `deadline` while the socket is watched. A timer for the
/// deadline beside the watch's own was one clock read and one entry in and out of the timer wheel
/// per request.
pub(crate) async fn watch_client<F: Future>(
    rd: &mut ClientReader,
    buf: &mut BytesMut,
    started: Instant,
    deadline: Instant,
    last_write: &Cell<Option<Instant>>,
    fut: F,
) -> Option<Result<F::Output, Elapsed>> {
    use monoio::time::Instant as At;
    let mut fut = std::pin::pin!(fut);
    let mut watch_at = crate::clock::after(started, WATCH_AFTER);
    loop {
        let first = At::from_std(watch_at.min(deadline));
        if let Ok(out) = monoio::time::timeout_at(first, &mut fut).await {
            return Some(Ok(out));
        }
        if deadline <= watch_at {
            return Some(Err(Elapsed));
        }
        match last_write
            .get()
            .map(|t| crate::clock::after(t, WATCH_AFTER))
        {
            Some(later) if later > watch_at => watch_at = later,
            _ => break,
        }
    }
    // Its own future, awaited after the first timer's is gone: the two then share their space
    // in this one (inline, the timer's 640 bytes stayed beside the watch's state for the whole
    // stream).
    let timed = std::pin::pin!(monoio::time::timeout_at(At::from_std(deadline), fut));
    let out = watching(rd, buf, timed).await?;
    Some(out.map_err(|_| Elapsed))
}

/// `watch_client` once the exchange has gone `WATCH_AFTER` without writing to the client.
async fn watching<F: Future>(
    rd: &mut ClientReader,
    buf: &mut BytesMut,
    mut fut: std::pin::Pin<&mut F>,
) -> Option<F::Output> {
    let canceller = Canceller::new();
    let mut b = std::mem::take(buf);
    // A long exchange (a stream) holds this buffer only to notice the client leaving (or to keep
    // a pipelined request): an empty page-sized buffer is swapped for a small one, because with
    // thousands of open streams a page each was a fifth of the proxy's memory (512 bytes, then
    // 64). The next request's read grows it again.
    if b.is_empty() {
        b = BytesMut::with_capacity(WATCH_BUF);
    } else if b.capacity() - b.len() < WATCH_BUF {
        b.reserve(WATCH_BUF);
    }
    let read = rd.cancelable_read_more(b, canceller.handle());
    let mut read = std::pin::pin!(read);
    monoio::select! {
        // The exchange first: a client that closes right after reading the last byte has
        // completed, not aborted (and its upstream connection goes back to the pool).
        biased;
        out = &mut fut => {
            let _ = canceller.cancel();
            let (_, b) = read.await;
            *buf = b;
            Some(out)
        }
        (res, b) = &mut read => {
            *buf = b;
            match res {
                Ok(n) if n > 0 => Some(fut.await),
                _ => None,
            }
        }
    }
}

#[cfg(test)]
mod tests;
