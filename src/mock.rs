//! A simulated OpenAI-compatible (and TGI-compatible) inference backend on monoio.
//!
//! It backs `llmproxy demo`, the integration tests and the benchmarks: it speaks HTTP/1.1 with
//! keep-alive, answers `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, TGI's
//! `/generate` and `/generate_stream`, `/v1/models`, `/health` and a vLLM-style `/metrics`, and
//! streams Server-Sent Events token by token, each event in its own chunk and its own write.
//! Per-request `x-mock-*` headers inject the failures a proxy must survive (error statuses, resets,
//! stalls, odd framings, garbage instead of HTTP, short keep-alive timeouts); `/mock/stats` and
//! `/mock/control` let tests observe and steer it (health and failure statuses, a reset of every
//! Nth inference request).
//!
//! It is not a model: the text is `tok0 tok1 ...`, token counts are whitespace-separated words,
//! and time is simulated with timers. It must never be deployed in front of real users.
//!
//! Invariants: one single-threaded runtime per mock (per-thread state in `Rc`/`Cell`, counters
//! shared with the caller in `Arc<MockStats>` atomics); nothing in here panics on client input or
//! socket failures; while a request is being served the read half is watched, so a client that
//! goes away is counted in `disconnects` at once and its request abandoned.

use std::{
    cell::Cell,
    future::pending,
    io::{self, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    rc::Rc,
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, HeaderMap, Method, Version};
use monoio::{
    buf::{IoBufMut, IoVecBufMut},
    io::{
        stream::Stream as _, AsyncReadRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf,
        Splitable,
    },
    net::{TcpListener, TcpStream},
    BufResult,
};
use monoio_http::{
    common::body::Body as _,
    h1::{
        codec::decoder::{FillPayload as _, RequestDecoder},
        payload::Payload,
    },
};
use serde_json::{json, Value};

/// Largest request body accepted (by `Content-Length`); bigger ones get 413.
const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Largest completion a request may ask for (bounds the memory of a non-streaming answer).
const MAX_COMPLETION_TOKENS: u64 = 1_000_000;
/// Pause between the two halves of an SSE event under `x-mock-chunk-split`.
const SPLIT_PAUSE: Duration = Duration::from_millis(2);
/// Longest delay a hook header may ask for (keeps timer arithmetic far from overflow).
const MAX_HOOK_DELAY: Duration = Duration::from_secs(24 * 60 * 60);
/// Length of the fake embedding vectors.
const EMBEDDING_DIMS: usize = 8;

/// How the mock behaves when a request does not say otherwise.
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Address to bind (default 127.0.0.1).
    pub host: IpAddr,
    /// Port to bind; 0 picks an ephemeral port.
    pub port: u16,
    /// Delay before the first token.
    pub ttft: Duration,
    /// Delay between tokens.
    pub token_delay: Duration,
    /// Completion tokens when the request has no `max_tokens`.
    pub tokens: u32,
    /// Model id reported by `/v1/models` and used when a request names none.
    pub model: String,
    /// What `/metrics` reports (changeable at run time through `/mock/control`).
    pub engine: EngineKnobs,
}

/// The vLLM-style gauges `/metrics` serves, and whether it answers at all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineKnobs {
    /// `vllm:num_requests_waiting`.
    pub waiting: f64,
    /// `vllm:num_requests_running`; `None` reports the requests being served right now.
    pub running: Option<f64>,
    /// `vllm:kv_cache_usage_perc` (0-1).
    pub kv_usage: f64,
    /// `/metrics` never answers (the connection stays open, silent).
    pub hang: bool,
}

impl Default for EngineKnobs {
    fn default() -> Self {
        EngineKnobs {
            waiting: 0.0,
            running: None,
            kv_usage: 0.0,
            hang: false,
        }
    }
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            ttft: Duration::ZERO,
            token_delay: Duration::ZERO,
            tokens: 16,
            model: "mock-model".to_string(),
            engine: EngineKnobs::default(),
        }
    }
}

/// Counters shared with whoever started the mock (tests read them directly).
#[derive(Default, Debug)]
pub struct MockStats {
    /// Inference requests received (chat, completions, embeddings, TGI), whatever their outcome.
    pub requests: AtomicU64,
    /// Inference requests being served right now.
    pub active: AtomicU64,
    /// Responses abandoned because the client went away (EOF, read error or failed write).
    pub disconnects: AtomicU64,
    /// Wall-clock time (ms since the Unix epoch) of the last disconnect; 0 if none.
    pub last_disconnect_unix_ms: AtomicU64,
    /// Inference responses written completely (error answers included).
    pub completed: AtomicU64,
    /// TCP connections accepted (shows whether a client reuses keep-alive connections).
    pub connections: AtomicU64,
}

/// A mock running on its own thread (it lives until the process exits).
#[derive(Debug, Clone)]
pub struct MockHandle {
    pub addr: SocketAddr,
    pub stats: Arc<MockStats>,
}

/// Bind, print exactly one line `mock-backend listening on ADDR` to stdout (flushed), then serve
/// forever on a single-threaded monoio runtime. Returns only on a bind/runtime error.
pub fn run(opts: MockOptions) -> anyhow::Result<()> {
    let bind = SocketAddr::new(opts.host, opts.port);
    serve(opts, Arc::new(MockStats::default()), |addr| {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "mock-backend listening on {addr}");
        let _ = out.flush();
    })
    .with_context(|| format!("mock backend on {bind}"))
}

/// Start the mock on its own OS thread and return once it is bound.
pub fn spawn(opts: MockOptions) -> io::Result<MockHandle> {
    let stats = Arc::new(MockStats::default());
    let (tx, rx) = std::sync::mpsc::channel::<io::Result<SocketAddr>>();
    let thread_stats = stats.clone();
    std::thread::Builder::new()
        .name("mock-backend".to_string())
        .spawn(move || {
            let bound = tx.clone();
            if let Err(e) = serve(opts, thread_stats, move |addr| {
                let _ = bound.send(Ok(addr));
            }) {
                let _ = tx.send(Err(e));
            }
        })?;
    match rx.recv() {
        Ok(Ok(addr)) => Ok(MockHandle { addr, stats }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::other(
            "mock backend thread exited before binding",
        )),
    }
}

/// Build the runtime, bind, report the address, accept forever.
fn serve(
    opts: MockOptions,
    stats: Arc<MockStats>,
    on_bound: impl FnOnce(SocketAddr),
) -> io::Result<()> {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()?;
    rt.block_on(async move {
        let listener = Listener::bind(SocketAddr::new(opts.host, opts.port))?;
        let addr = listener.local_addr()?;
        on_bound(addr);
        let server = Rc::new(Server {
            engine: Cell::new(opts.engine),
            context_limit: Cell::new(None),
            opts,
            stats,
            port: addr.port(),
            health_status: Cell::new(None),
            fail_status: Cell::new(None),
            reset_every: Cell::new(0),
            inference_seen: Cell::new(0),
            next_id: Cell::new(0),
        });
        loop {
            match listener.accept().await.and_then(adopt) {
                Ok((stream, handle)) => {
                    server.stats.connections.fetch_add(1, Ordering::Relaxed);
                    monoio::spawn(serve_connection(stream, handle, server.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    log::warn!("mock backend: accept failed: {e}");
                    monoio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    })
}

/// The listening socket, accepted from through std rather than `monoio::net::TcpListener::accept`.
///
/// Why: `x-mock-reset-after` needs SO_LINGER on the connection, and a monoio `TcpStream` exposes
/// no handle to set it without `unsafe` (which the crate forbids). Accepting with std yields a
/// `std::net::TcpStream` whose duplicate we keep for that; monoio only reports readiness, on a
/// duplicate of the listening socket.
struct Listener {
    /// Non-blocking; `accept` loops on it until `WouldBlock`.
    socket: std::net::TcpListener,
    /// The same socket registered with the runtime, used only for `readable`.
    ready: TcpListener,
}

impl Listener {
    fn bind(addr: SocketAddr) -> io::Result<Self> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        // No SO_REUSEPORT: a second mock on the same port must fail, not share the traffic.
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        socket.set_nonblocking(true)?;
        let socket = std::net::TcpListener::from(socket);
        let ready = TcpListener::from_std(socket.try_clone()?)?;
        Ok(Self { socket, ready })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    async fn accept(&self) -> io::Result<std::net::TcpStream> {
        loop {
            match self.socket.accept() {
                Ok((stream, _)) => return Ok(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.ready.readable(false).await?
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Hand an accepted socket to monoio, keeping a duplicate handle for SO_LINGER.
fn adopt(stream: std::net::TcpStream) -> io::Result<(TcpStream, socket2::Socket)> {
    stream.set_nodelay(true)?;
    // As monoio's own accept does: blocking fds for io_uring, non-blocking for epoll.
    stream.set_nonblocking(monoio::utils::is_legacy())?;
    let handle = socket2::Socket::from(stream.try_clone()?);
    Ok((TcpStream::from_std(stream)?, handle))
}

/// Per-runtime state.
struct Server {
    opts: MockOptions,
    stats: Arc<MockStats>,
    port: u16,
    /// Status `/health` answers with (`None` = 200), set through `/mock/control`.
    health_status: Cell<Option<u16>>,
    /// Status every inference request answers with (`None` = normal), set through `/mock/control`.
    fail_status: Cell<Option<u16>>,
    /// Every Nth inference request is answered by a TCP reset (0 = never), set through
    /// `/mock/control`: a backend that drops every other connection.
    reset_every: Cell<u64>,
    inference_seen: Cell<u64>,
    /// What `/metrics` says, set through `/mock/control`.
    engine: Cell<EngineKnobs>,
    /// Prompt + completion tokens beyond this get vLLM's context-length 400 (`/mock/control`).
    context_limit: Cell<Option<u64>>,
    next_id: Cell<u64>,
}

impl Server {
    /// Counts an inference request; true when this one is to be reset (`reset_every`).
    fn reset_this_one(&self) -> bool {
        let every = self.reset_every.get();
        if every == 0 {
            return false;
        }
        let n = self.inference_seen.get() + 1;
        self.inference_seen.set(n);
        n.is_multiple_of(every)
    }

    fn next_id(&self) -> u64 {
        let id = self.next_id.get() + 1;
        self.next_id.set(id);
        id
    }

    fn note_disconnect(&self) {
        self.stats.disconnects.fetch_add(1, Ordering::Relaxed);
        self.stats
            .last_disconnect_unix_ms
            .store(unix_millis(), Ordering::Relaxed);
    }
}

/// Holds `MockStats::active` up for as long as an inference request is being served.
struct ActiveGuard(Arc<MockStats>);

impl ActiveGuard {
    fn new(stats: &Arc<MockStats>) -> Self {
        stats.active.fetch_add(1, Ordering::Relaxed);
        Self(stats.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

type Reader = RequestDecoder<LentRead>;
type Writer = OwnedWriteHalf<TcpStream>;
type Request = http::Request<Payload>;

/// What happens to the connection after a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    KeepAlive,
    Close,
    /// Abort with a TCP reset (`x-mock-reset-after`).
    Reset,
    /// The client went away mid-response.
    Gone,
}

/// A write failed: the client is gone.
struct PeerGone;

async fn serve_connection(stream: TcpStream, socket: socket2::Socket, server: Rc<Server>) {
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
                let _ = send(&mut writer, reply.encode(false, ConnHeader::Close)).await;
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

/// Everything about one request that the answer depends on.
struct Exchange {
    method: Method,
    path: String,
    /// Path with query, as received.
    target: String,
    version: Version,
    headers: Vec<(String, String)>,
    body: Bytes,
    keep_alive: bool,
    hooks: Hooks,
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
    if has_body
        && expects_continue(&parts.headers)
        && send(writer, b"HTTP/1.1 100 Continue\r\n\r\n".to_vec())
            .await
            .is_err()
    {
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
    let instant =
        action.is_instant() && !exchange.hooks.stall_head && exchange.hooks.stall_after.is_none();
    if instant {
        answer(&action, &exchange, writer).await
    } else {
        // Something to wait for: watch the read half so a client that leaves is noticed at once.
        monoio::select! {
            // The answer first: a client that closes right after the last byte was written
            // must not turn a complete response into a disconnect.
            biased;
            flow = answer(&action, &exchange, writer) => flow,
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
    match send(writer, reply.encode(false, conn)).await {
        Ok(()) if conn == ConnHeader::Close => Flow::Close,
        Ok(()) => Flow::KeepAlive,
        Err(PeerGone) => Flow::Gone,
    }
}

async fn send(writer: &mut Writer, buf: Vec<u8>) -> Result<(), PeerGone> {
    let (result, _) = writer.write_all(buf).await;
    result.map(|_| ()).map_err(|_| PeerGone)
}

async fn sleep(duration: Duration) {
    if !duration.is_zero() {
        monoio::time::sleep(duration).await;
    }
}

fn is_inference_path(path: &str) -> bool {
    matches!(
        path,
        "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/embeddings"
            | "/generate"
            | "/generate_stream"
    )
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

/// Where `x-mock-garbage` breaks the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Garbage {
    /// Not an HTTP response at all.
    Head,
    /// A valid head and first token, then (after the token delay) an invalid chunk size line.
    Chunk,
}

/// What `x-mock-garbage: head` answers: binary junk of another protocol.
const GARBAGE_HEAD: &[u8] = b"\x00\xffSSH-2.0-OpenSSH_9.6\r\n\x16\x03\x01\x02\x00garbage\r\n\r\n";
/// What `x-mock-garbage: chunk` sends after the first token instead of a chunk.
const GARBAGE_CHUNK: &[u8] = b"zz-not-a-size\r\ngarbage\r\n";

/// How a non-streaming body is delimited (`x-mock-framing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length,
    Chunked,
    Close,
}

/// The per-request `x-mock-*` knobs, with the options' defaults filled in.
#[derive(Debug, Clone, PartialEq)]
struct Hooks {
    echo: bool,
    status: Option<u16>,
    ttft: Duration,
    token_delay: Duration,
    tokens: u32,
    reset_after: Option<u32>,
    stall_head: bool,
    stall_after: Option<u32>,
    close: bool,
    framing: Framing,
    chunk_split: bool,
    /// `x-mock-garbage`: bytes that are not HTTP instead of a response, or a stream whose
    /// chunk framing breaks after the first token.
    garbage: Option<Garbage>,
    keepalive_timeout: Option<Duration>,
    /// Close after this idle time without announcing it (`x-mock-idle-close-ms`): the race a
    /// proxy's pool must survive when a server's keep-alive limit is unknown to it.
    idle_close: Option<Duration>,
}

impl Hooks {
    fn parse(headers: &HeaderMap, opts: &MockOptions) -> Result<Self, String> {
        let text = |name: &str| -> Result<Option<String>, String> {
            match headers.get(name) {
                None => Ok(None),
                Some(v) => v
                    .to_str()
                    .map(|s| Some(s.trim().to_ascii_lowercase()))
                    .map_err(|_| format!("invalid {name} header")),
            }
        };
        fn number<T: FromStr>(name: &str, value: Option<String>) -> Result<Option<T>, String> {
            value
                .map(|v| {
                    v.parse::<T>()
                        .map_err(|_| format!("invalid {name} header: {v:?}"))
                })
                .transpose()
        }
        let flag = |name: &str| -> Result<bool, String> {
            Ok(matches!(text(name)?.as_deref(), Some("1" | "true" | "yes")))
        };
        let millis = |name: &str| -> Result<Option<Duration>, String> {
            match number::<u64>(name, text(name)?)?.map(Duration::from_millis) {
                Some(d) if d > MAX_HOOK_DELAY => Err(format!("{name} must be at most 1 day")),
                d => Ok(d),
            }
        };

        let status = number::<u16>("x-mock-status", text("x-mock-status")?)?;
        if let Some(code) = status {
            if !(200..=599).contains(&code) {
                return Err(format!("x-mock-status must be 200..=599, got {code}"));
            }
        }
        let stall_head = match text("x-mock-stall")?.as_deref() {
            None => false,
            Some("head") => true,
            Some(other) => return Err(format!("x-mock-stall must be \"head\", got {other:?}")),
        };
        let framing = match text("x-mock-framing")?.as_deref() {
            None | Some("length") => Framing::Length,
            Some("chunked") => Framing::Chunked,
            Some("close") => Framing::Close,
            Some(other) => {
                return Err(format!(
                    "x-mock-framing must be length, chunked or close, got {other:?}"
                ))
            }
        };
        let garbage = match text("x-mock-garbage")?.as_deref() {
            None => None,
            Some("head") => Some(Garbage::Head),
            Some("chunk") => Some(Garbage::Chunk),
            Some(other) => {
                return Err(format!(
                    "x-mock-garbage must be head or chunk, got {other:?}"
                ))
            }
        };
        Ok(Self {
            garbage,
            echo: flag("x-mock-echo")?,
            status,
            ttft: millis("x-mock-ttft-ms")?.unwrap_or(opts.ttft),
            token_delay: millis("x-mock-token-delay-ms")?.unwrap_or(opts.token_delay),
            tokens: number("x-mock-tokens", text("x-mock-tokens")?)?.unwrap_or(opts.tokens),
            reset_after: number("x-mock-reset-after", text("x-mock-reset-after")?)?,
            stall_head,
            stall_after: number("x-mock-stall-after", text("x-mock-stall-after")?)?,
            close: flag("x-mock-close")?,
            framing,
            chunk_split: flag("x-mock-chunk-split")?,
            keepalive_timeout: millis("x-mock-keepalive-timeout-ms")?,
            idle_close: millis("x-mock-idle-close-ms")?,
        })
    }
}

/// A complete, immediately known response.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(status: u16, value: &Value) -> Self {
        Self {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body: value.to_string().into_bytes(),
        }
    }

    /// An OpenAI-shaped error.
    fn error(status: u16, message: &str) -> Self {
        Self::json(status, &error_body(status, message))
    }

    /// Head and body with `Content-Length` (or no body where the status forbids one).
    fn encode(&self, head_only: bool, conn: ConnHeader) -> Vec<u8> {
        let framing = if has_no_body(self.status) {
            BodyFraming::None
        } else {
            BodyFraming::Length(self.body.len())
        };
        let mut out = response_head(self.status, self.content_type, &self.headers, framing, conn);
        if !head_only && framing != BodyFraming::None {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

fn error_body(status: u16, message: &str) -> Value {
    let kind = if (400..500).contains(&status) {
        "invalid_request_error"
    } else {
        "server_error"
    };
    json!({"error": {"message": message, "type": kind, "param": null, "code": status}})
}

fn has_no_body(status: u16) -> bool {
    status == 204 || status == 304 || status < 200
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFraming {
    None,
    Length(usize),
    Chunked,
    /// No length: the body ends when the connection closes.
    UntilClose,
}

fn response_head(
    status: u16,
    content_type: &str,
    extra: &[(&'static str, String)],
    framing: BodyFraming,
    conn: ConnHeader,
) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    if framing != BodyFraming::None {
        head.push_str("content-type: ");
        head.push_str(content_type);
        head.push_str("\r\n");
    }
    match framing {
        BodyFraming::None | BodyFraming::UntilClose => {}
        BodyFraming::Length(n) => head.push_str(&format!("content-length: {n}\r\n")),
        BodyFraming::Chunked => head.push_str("transfer-encoding: chunked\r\n"),
    }
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    match conn {
        _ if framing == BodyFraming::UntilClose => head.push_str("connection: close\r\n"),
        ConnHeader::Close => head.push_str("connection: close\r\n"),
        ConnHeader::KeepAlive { explicit, timeout } => {
            if explicit || timeout.is_some() {
                head.push_str("connection: keep-alive\r\n");
            }
            if let Some(limit) = timeout {
                let secs = limit.as_millis() / 1000;
                head.push_str(&format!("keep-alive: timeout={secs}\r\n"));
            }
        }
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// What a response head says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnHeader {
    Close,
    /// `explicit`: say `connection: keep-alive` (HTTP/1.0 clients need it); `timeout`: advertise
    /// `keep-alive: timeout=S` (`x-mock-keepalive-timeout-ms`).
    KeepAlive {
        explicit: bool,
        timeout: Option<Duration>,
    },
}

impl ConnHeader {
    fn for_request(version: Version, close: bool, timeout: Option<Duration>) -> Self {
        if close {
            Self::Close
        } else {
            Self::KeepAlive {
                explicit: version == Version::HTTP_10,
                timeout,
            }
        }
    }
}

/// One chunk of a chunked body: `{len:x}\r\n{data}\r\n`.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// What to answer.
enum Action {
    /// Answer at once.
    Reply(Reply),
    /// A non-streaming generation: answer after `wait`.
    Delayed { reply: Reply, wait: Duration },
    /// An SSE stream.
    Stream(Completion),
}

impl Action {
    /// True when answering involves no waiting, so the peer need not be watched.
    fn is_instant(&self) -> bool {
        match self {
            Action::Reply(_) => true,
            Action::Delayed { wait, .. } => wait.is_zero(),
            Action::Stream(_) => false,
        }
    }
}

fn route(ex: &Exchange, server: &Server) -> Action {
    let path = ex.path.as_str();
    if ex.hooks.echo || path == "/mock/echo" {
        return Action::Reply(echo(ex, server.port));
    }
    let admin = path.starts_with("/mock/");
    if let Some(status) = ex.hooks.status.filter(|_| !admin) {
        return Action::Reply(Reply::error(
            status,
            &format!("mock status {status} (x-mock-status)"),
        ));
    }
    if is_inference_path(path) {
        if let Some(status) = server.fail_status.get() {
            return Action::Reply(Reply::error(
                status,
                &format!("mock failure {status} (/mock/control)"),
            ));
        }
    }
    let opts = &server.opts;
    match (&ex.method, path) {
        (&Method::POST, "/v1/chat/completions") => generation(ex, server, Kind::Chat),
        (&Method::POST, "/v1/completions") => generation(ex, server, Kind::Text),
        (&Method::POST, "/generate") => generation(ex, server, Kind::Tgi),
        (&Method::POST, "/generate_stream") => generation(ex, server, Kind::TgiStream),
        (&Method::POST, "/v1/embeddings") => Action::Reply(embeddings(ex, opts)),
        (&Method::GET, "/v1/models") => Action::Reply(Reply::json(
            200,
            &json!({"object": "list", "data": [{"id": opts.model, "object": "model", "owned_by": "mock"}]}),
        )),
        (&Method::GET, "/health") => Action::Reply(health(server.health_status.get())),
        (&Method::GET, "/metrics") if server.engine.get().hang => Action::Delayed {
            reply: metrics(server),
            wait: MAX_HOOK_DELAY,
        },
        (&Method::GET, "/metrics") => Action::Reply(metrics(server)),
        (&Method::GET, "/mock/stats") => Action::Reply(Reply::json(200, &stats_json(server))),
        (&Method::POST, "/mock/control") => Action::Reply(control(ex, server)),
        _ => Action::Reply(Reply::error(
            404,
            &format!("no route for {} {}", ex.method, ex.target),
        )),
    }
}

fn echo(ex: &Exchange, port: u16) -> Reply {
    let headers: Vec<Value> = ex
        .headers
        .iter()
        .map(|(name, value)| json!([name, value]))
        .collect();
    Reply::json(
        200,
        &json!({
            "method": ex.method.as_str(),
            "path": ex.target,
            "version": format!("{:?}", ex.version),
            "headers": headers,
            "body": String::from_utf8_lossy(&ex.body),
            "port": port,
        }),
    )
}

fn health(status: Option<u16>) -> Reply {
    let status = status.unwrap_or(200);
    let state = if (200..300).contains(&status) {
        "ok"
    } else {
        "unavailable"
    };
    Reply::json(status, &json!({"status": state}))
}

fn metrics(server: &Server) -> Reply {
    let model = server
        .opts
        .model
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    let e = server.engine.get();
    let running = e
        .running
        .unwrap_or(server.stats.active.load(Ordering::Relaxed) as f64);
    let (waiting, kv) = (e.waiting, e.kv_usage);
    let body = format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{model_name=\"{model}\"}} {running}\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{model_name=\"{model}\"}} {waiting}\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{model_name=\"{model}\"}} {kv}\n"
    );
    Reply {
        status: 200,
        content_type: "text/plain; version=0.0.4",
        headers: Vec::new(),
        body: body.into_bytes(),
    }
}

fn stats_json(server: &Server) -> Value {
    let s = &server.stats;
    json!({
        "requests": s.requests.load(Ordering::Relaxed),
        "active": s.active.load(Ordering::Relaxed),
        "disconnects": s.disconnects.load(Ordering::Relaxed),
        "last_disconnect_unix_ms": s.last_disconnect_unix_ms.load(Ordering::Relaxed),
        "completed": s.completed.load(Ordering::Relaxed),
        "connections": s.connections.load(Ordering::Relaxed),
        "port": server.port,
    })
}

/// `POST /mock/control`: `{"health_status": 503, "fail_status": 500, "reset_every": 2}`; absent
/// keys stay as they are, `null` clears. Engine gauges: `{"engine": {"waiting": 3, "running": 2,
/// "kv_usage": 0.5, "hang": true}}` (`running: null` reports the requests being served).
/// `{"context_limit": N}` answers longer requests with vLLM's context-length error.
fn control(ex: &Exchange, server: &Server) -> Reply {
    let body: Value = match serde_json::from_slice(&ex.body) {
        Ok(Value::Object(map)) => Value::Object(map),
        _ => return Reply::error(400, "control body must be a JSON object"),
    };
    match body.get("context_limit") {
        None => {}
        Some(Value::Null) => server.context_limit.set(None),
        Some(v) => match v.as_u64() {
            Some(n) => server.context_limit.set(Some(n)),
            None => return Reply::error(400, "context_limit must be a token count or null"),
        },
    }
    if let Some(engine) = body.get("engine") {
        match engine_knobs(engine, server.engine.get()) {
            Ok(k) => server.engine.set(k),
            Err(e) => return Reply::error(400, &e),
        }
    }
    let parse = |key: &str| -> Result<Option<Option<u16>>, String> {
        match body.get(key) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(v) => match v.as_u64() {
                Some(code) if (100..=599).contains(&code) => Ok(Some(u16::try_from(code).ok())),
                _ => Err(format!("{key} must be an HTTP status or null")),
            },
        }
    };
    let reset = match body.get("reset_every") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(0)),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| "reset_every must be a count or null".to_string()),
    };
    let (health, fail, reset) = match (parse("health_status"), parse("fail_status"), reset) {
        (Ok(h), Ok(f), Ok(r)) => (h, f, r),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return Reply::error(400, &e),
    };
    if let Some(h) = health {
        server.health_status.set(h);
    }
    if let Some(f) = fail {
        server.fail_status.set(f);
    }
    if let Some(n) = reset {
        server.reset_every.set(n);
        server.inference_seen.set(0);
    }
    Reply::json(200, &json!({}))
}

/// Applies the keys present in `v` to `k`.
fn engine_knobs(v: &Value, mut k: EngineKnobs) -> Result<EngineKnobs, String> {
    let Value::Object(map) = v else {
        return Err("engine must be a JSON object".into());
    };
    for (key, val) in map {
        let num = || {
            val.as_f64()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .ok_or_else(|| format!("engine.{key} must be a non-negative number"))
        };
        match key.as_str() {
            "waiting" => k.waiting = num()?,
            "running" if val.is_null() => k.running = None,
            "running" => k.running = Some(num()?),
            "kv_usage" => k.kv_usage = num()?,
            "hang" => {
                k.hang = val
                    .as_bool()
                    .ok_or_else(|| "engine.hang must be true or false".to_string())?
            }
            other => return Err(format!("unknown engine key \"{other}\"")),
        }
    }
    Ok(k)
}

/// Prompt size in "tokens": whitespace-separated words in strings (message contents, content
/// parts' `text`, prompts), one per number in a pre-tokenized prompt.
fn count_words(value: &Value) -> u64 {
    match value {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Array(items) => items.iter().map(count_words).sum(),
        Value::Number(_) => 1,
        Value::Object(part) => part.get("text").map(count_words).unwrap_or(0),
        _ => 0,
    }
}

fn chat_prompt_tokens(messages: Option<&Value>) -> u64 {
    messages
        .and_then(Value::as_array)
        .map(|ms| {
            ms.iter()
                .filter_map(|m| m.get("content"))
                .map(count_words)
                .sum()
        })
        .unwrap_or(0)
}

fn parse_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, Reply> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Reply::error(400, "request body must be a JSON object")),
        Err(e) => Err(Reply::error(400, &format!("invalid JSON body: {e}"))),
    }
}

/// A token count field: absent/null → None, else a non-negative integer within bounds.
fn token_limit(map: &serde_json::Map<String, Value>, key: &str) -> Result<Option<u32>, Reply> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= MAX_COMPLETION_TOKENS => Ok(u32::try_from(n).ok()),
            _ => Err(Reply::error(
                400,
                &format!("{key} must be an integer in 0..={MAX_COMPLETION_TOKENS}"),
            )),
        },
    }
}

fn bool_field(map: &serde_json::Map<String, Value>, key: &str) -> Result<bool, Reply> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(Reply::error(400, &format!("{key} must be a boolean"))),
    }
}

fn generation(ex: &Exchange, server: &Server, kind: Kind) -> Action {
    match plan_generation(ex, server, kind) {
        Ok(action) => action,
        Err(reply) => Action::Reply(reply),
    }
}

fn plan_generation(ex: &Exchange, server: &Server, kind: Kind) -> Result<Action, Reply> {
    let map = parse_object(&ex.body)?;
    let hooks = &ex.hooks;
    let model = map
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(&server.opts.model)
        .to_string();
    let mut running_usage = false;
    let (prompt_tokens, completion_tokens, stream, include_usage, details) = match kind {
        Kind::Chat | Kind::Text => {
            let prompt = if kind == Kind::Chat {
                chat_prompt_tokens(map.get("messages"))
            } else {
                map.get("prompt").map(count_words).unwrap_or(0)
            };
            let limit = match token_limit(&map, "max_tokens")? {
                Some(n) => Some(n),
                None => token_limit(&map, "max_completion_tokens")?,
            };
            let (include_usage, continuous) = match map.get("stream_options") {
                Some(Value::Object(o)) => (
                    bool_field(o, "include_usage")?,
                    bool_field(o, "continuous_usage_stats")?,
                ),
                _ => (false, false),
            };
            // vLLM: running usage only with include_usage as well.
            running_usage = include_usage && continuous;
            let stream = bool_field(&map, "stream")?;
            (
                prompt,
                limit.unwrap_or(hooks.tokens),
                stream,
                include_usage,
                false,
            )
        }
        Kind::Tgi | Kind::TgiStream => {
            let prompt = map.get("inputs").map(count_words).unwrap_or(0);
            let (limit, details) = match map.get("parameters") {
                Some(Value::Object(p)) => {
                    (token_limit(p, "max_new_tokens")?, bool_field(p, "details")?)
                }
                _ => (None, false),
            };
            let n = limit.unwrap_or(hooks.tokens);
            if n == 0 {
                return Err(Reply::error(400, "max_new_tokens must be greater than 0"));
            }
            (prompt, n, kind == Kind::TgiStream, false, details)
        }
    };
    if u64::from(completion_tokens) > MAX_COMPLETION_TOKENS {
        return Err(Reply::error(400, "too many completion tokens requested"));
    }
    let wanted = prompt_tokens + u64::from(completion_tokens);
    if let Some(limit) = server.context_limit.get().filter(|l| wanted > *l) {
        // vLLM's wording (a 400 before any byte of a stream).
        return Err(Reply::error(
            400,
            &format!(
                "This model's maximum context length is {limit} tokens. However, you requested \
                 {wanted} tokens ({prompt_tokens} in the messages, {completion_tokens} in the \
                 completion). Please reduce the length of the messages or completion."
            ),
        ));
    }
    let completion = Completion {
        kind,
        id: match kind {
            Kind::Chat => format!("chatcmpl-mock-{}", server.next_id()),
            _ => format!("cmpl-mock-{}", server.next_id()),
        },
        created: unix_millis() / 1000,
        model,
        prompt_tokens,
        completion_tokens,
        include_usage,
        running_usage,
    };
    if stream {
        return Ok(Action::Stream(completion));
    }
    let wait = hooks
        .ttft
        .saturating_add(hooks.token_delay.saturating_mul(completion_tokens));
    let reply = match kind {
        Kind::Tgi | Kind::TgiStream => {
            let mut reply = Reply::json(200, &completion.tgi_response(details));
            reply.headers = vec![
                ("x-prompt-tokens", prompt_tokens.to_string()),
                ("x-generated-tokens", completion_tokens.to_string()),
                ("x-total-time", wait.as_millis().to_string()),
            ];
            reply
        }
        Kind::Chat | Kind::Text => Reply::json(200, &completion.response()),
    };
    Ok(Action::Delayed { reply, wait })
}

fn embeddings(ex: &Exchange, opts: &MockOptions) -> Reply {
    let map = match parse_object(&ex.body) {
        Ok(map) => map,
        Err(reply) => return reply,
    };
    let model = map
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(&opts.model);
    let tokens = map.get("input").map(count_words).unwrap_or(0);
    let vector: Vec<f64> = (0..EMBEDDING_DIMS)
        .map(|i| ((i as f64 + 1.0) * 0.125 + tokens as f64 * 0.001).fract())
        .collect();
    Reply::json(
        200,
        &json!({
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Text,
    /// TGI `/generate`
    Tgi,
    /// TGI `/generate_stream`
    TgiStream,
}

/// One simulated generation; builds the non-streaming body and every SSE event.
#[derive(Debug, Clone)]
struct Completion {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    prompt_tokens: u64,
    completion_tokens: u32,
    include_usage: bool,
    /// `stream_options.continuous_usage_stats` (with `include_usage`): like vLLM, every chunk
    /// carries the usage so far.
    running_usage: bool,
}

impl Completion {
    fn token_text(&self, i: u32) -> String {
        match self.kind {
            Kind::Tgi | Kind::TgiStream => "tok ".to_string(),
            Kind::Chat | Kind::Text => format!("tok{i} "),
        }
    }

    fn full_text(&self) -> String {
        (0..self.completion_tokens)
            .map(|i| self.token_text(i))
            .collect()
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + u64::from(self.completion_tokens),
        })
    }

    /// Non-streaming OpenAI body.
    fn response(&self) -> Value {
        let (object, choice) = match self.kind {
            Kind::Chat => (
                "chat.completion",
                json!({"index": 0, "message": {"role": "assistant", "content": self.full_text()},
                       "logprobs": null, "finish_reason": "length"}),
            ),
            _ => (
                "text_completion",
                json!({"index": 0, "text": self.full_text(), "logprobs": null, "finish_reason": "length"}),
            ),
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": self.usage(),
        })
    }

    /// Non-streaming TGI `/generate` body.
    fn tgi_response(&self, details: bool) -> Value {
        let mut body = json!({"generated_text": self.full_text()});
        if details {
            body["details"] = json!({
                "finish_reason": "length",
                "generated_tokens": self.completion_tokens,
                "seed": null,
            });
        }
        body
    }

    /// An OpenAI stream chunk around one choice (`None` = the usage chunk); `done`: tokens
    /// generated up to and including this chunk.
    fn openai_chunk(&self, choice: Option<Value>, done: u32) -> Vec<u8> {
        let object = if self.kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut chunk = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
        });
        match choice {
            Some(choice) => {
                chunk["choices"] = json!([choice]);
                chunk["timings"] = json!({"predicted_ms": 1.0});
                if self.running_usage {
                    chunk["usage"] = json!({
                        "prompt_tokens": self.prompt_tokens,
                        "completion_tokens": done,
                        "total_tokens": self.prompt_tokens + u64::from(done),
                    });
                } else if self.include_usage {
                    chunk["usage"] = Value::Null;
                }
            }
            None => {
                chunk["choices"] = json!([]);
                chunk["usage"] = self.usage();
            }
        }
        sse_event("data: ", &chunk)
    }

    /// The events sent before the first token (the chat role delta).
    fn opening_events(&self) -> Vec<Vec<u8>> {
        match self.kind {
            Kind::Chat => vec![self.openai_chunk(
                Some(json!({
                    "index": 0, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null,
                })),
                0,
            )],
            _ => Vec::new(),
        }
    }

    fn token_event(&self, i: u32) -> Vec<u8> {
        let text = self.token_text(i);
        match self.kind {
            Kind::Chat => self.openai_chunk(
                Some(json!({
                    "index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null,
                })),
                i + 1,
            ),
            Kind::Text => self.openai_chunk(
                Some(json!({
                    "index": 0, "text": text, "logprobs": null, "finish_reason": null,
                })),
                i + 1,
            ),
            Kind::Tgi | Kind::TgiStream => {
                let last = i + 1 == self.completion_tokens;
                let (generated, details) = if last {
                    (
                        json!(self.full_text()),
                        json!({
                            "finish_reason": "length",
                            "generated_tokens": self.completion_tokens,
                            "input_length": self.prompt_tokens,
                        }),
                    )
                } else {
                    (Value::Null, Value::Null)
                };
                sse_event(
                    "data:",
                    &json!({
                        "index": i,
                        "token": {"id": i, "text": text, "logprob": 0.0, "special": false},
                        "generated_text": generated,
                        "details": details,
                    }),
                )
            }
        }
    }

    /// The events after the last token: finish chunk, usage chunk (if asked), `[DONE]`.
    fn closing_events(&self) -> Vec<Vec<u8>> {
        let finish = match self.kind {
            Kind::Chat => {
                json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"})
            }
            Kind::Text => {
                json!({"index": 0, "text": "", "logprobs": null, "finish_reason": "length"})
            }
            // TGI's last token event carries the finish; there is no `[DONE]`.
            Kind::Tgi | Kind::TgiStream => return Vec::new(),
        };
        let n = self.completion_tokens;
        let mut events = vec![self.openai_chunk(Some(finish), n)];
        if self.include_usage {
            events.push(self.openai_chunk(None, n));
        }
        events.push(b"data: [DONE]\n\n".to_vec());
        events
    }
}

fn sse_event(prefix: &str, value: &Value) -> Vec<u8> {
    let mut out = prefix.as_bytes().to_vec();
    out.extend_from_slice(value.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
    out
}

/// Write the answer, honouring the hooks. Never returns while stalled.
async fn answer(action: &Action, ex: &Exchange, writer: &mut Writer) -> Flow {
    if ex.hooks.stall_head {
        return pending().await;
    }
    if ex.hooks.garbage == Some(Garbage::Head) {
        return match send(writer, GARBAGE_HEAD.to_vec()).await {
            Ok(()) => Flow::Close,
            Err(PeerGone) => Flow::Gone,
        };
    }
    let result = match action {
        Action::Reply(reply) => write_reply(reply, ex, writer).await,
        Action::Delayed { reply, wait } => {
            sleep(*wait).await;
            write_reply(reply, ex, writer).await
        }
        Action::Stream(completion) => write_stream(completion, ex, writer).await,
    };
    result.unwrap_or(Flow::Gone)
}

/// The connection's fate once a response has been written in full.
fn after_response(close: bool) -> Flow {
    if close {
        Flow::Close
    } else {
        Flow::KeepAlive
    }
}

/// A plain response in the framing `x-mock-framing` asks for. `x-mock-stall-after: N` /
/// `x-mock-reset-after: N` cut it after the head and N body bytes (as framed on the wire).
async fn write_reply(reply: &Reply, ex: &Exchange, writer: &mut Writer) -> Result<Flow, PeerGone> {
    let hooks = &ex.hooks;
    let head_only = ex.method == Method::HEAD;
    let mut close = hooks.close || !ex.keep_alive;
    let framing = match hooks.framing {
        _ if has_no_body(reply.status) => BodyFraming::None,
        Framing::Length => BodyFraming::Length(reply.body.len()),
        // HTTP/1.0 clients cannot read chunked bodies.
        Framing::Chunked if ex.version == Version::HTTP_11 => BodyFraming::Chunked,
        Framing::Chunked | Framing::Close => BodyFraming::UntilClose,
    };
    if framing == BodyFraming::UntilClose {
        close = true;
    }
    let conn = ConnHeader::for_request(ex.version, close, hooks.keepalive_timeout);
    let head = response_head(
        reply.status,
        reply.content_type,
        &reply.headers,
        framing,
        conn,
    );
    let body = match framing {
        _ if head_only => Vec::new(),
        BodyFraming::None => Vec::new(),
        BodyFraming::Length(_) | BodyFraming::UntilClose => reply.body.clone(),
        BodyFraming::Chunked => {
            let mut body = if reply.body.is_empty() {
                Vec::new()
            } else {
                chunk(&reply.body)
            };
            body.extend_from_slice(LAST_CHUNK);
            body
        }
    };
    if let Some(cut) = hooks.stall_after.or(hooks.reset_after) {
        let cut = usize::try_from(cut).unwrap_or(usize::MAX).min(body.len());
        let mut partial = head;
        partial.extend_from_slice(&body[..cut]);
        send(writer, partial).await?;
        if hooks.stall_after.is_some() {
            return pending().await;
        }
        return Ok(Flow::Reset);
    }
    if framing == BodyFraming::Chunked {
        // Head and body chunks in separate writes, so the client sees real chunk boundaries.
        send(writer, head).await?;
        send(writer, body).await?;
    } else {
        let mut all = head;
        all.extend_from_slice(&body);
        send(writer, all).await?;
    }
    Ok(after_response(close))
}

/// An SSE stream: head at once, the opening events after ttft, then one event per token spaced
/// by token_delay, then the closing events. Each event is its own chunk in its own write.
async fn write_stream(
    completion: &Completion,
    ex: &Exchange,
    writer: &mut Writer,
) -> Result<Flow, PeerGone> {
    let hooks = &ex.hooks;
    // HTTP/1.0 has no chunked encoding: delimit by closing the connection.
    let chunked = ex.version == Version::HTTP_11;
    let close = hooks.close || !ex.keep_alive || !chunked;
    let framing = if chunked {
        BodyFraming::Chunked
    } else {
        BodyFraming::UntilClose
    };
    let conn = ConnHeader::for_request(ex.version, close, hooks.keepalive_timeout);
    let headers = [("cache-control", "no-cache".to_string())];
    let head = response_head(200, "text/event-stream", &headers, framing, conn);
    send(writer, head).await?;

    sleep(hooks.ttft).await;
    for event in completion.opening_events() {
        send_event(writer, event, chunked, hooks.chunk_split).await?;
    }
    for i in 0..=completion.completion_tokens {
        if hooks.reset_after == Some(i) {
            return Ok(Flow::Reset);
        }
        if hooks.stall_after == Some(i) {
            return pending().await;
        }
        if i == completion.completion_tokens {
            break;
        }
        if i > 0 {
            sleep(hooks.token_delay).await;
        }
        if i == 1 && hooks.garbage == Some(Garbage::Chunk) {
            send(writer, GARBAGE_CHUNK.to_vec()).await?;
            return Ok(Flow::Close);
        }
        send_event(
            writer,
            completion.token_event(i),
            chunked,
            hooks.chunk_split,
        )
        .await?;
    }
    for event in completion.closing_events() {
        send_event(writer, event, chunked, hooks.chunk_split).await?;
    }
    if chunked {
        send(writer, LAST_CHUNK.to_vec()).await?;
    }
    Ok(after_response(close))
}

async fn send_event(
    writer: &mut Writer,
    event: Vec<u8>,
    chunked: bool,
    split: bool,
) -> Result<(), PeerGone> {
    let frame = |data: &[u8]| if chunked { chunk(data) } else { data.to_vec() };
    if split && event.len() > 1 {
        let (first, second) = event.split_at(event.len() / 2);
        send(writer, frame(first)).await?;
        monoio::time::sleep(SPLIT_PAUSE).await;
        send(writer, frame(second)).await
    } else if chunked {
        send(writer, chunk(&event)).await
    } else {
        send(writer, event).await
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn completion(kind: Kind, n: u32, include_usage: bool) -> Completion {
        Completion {
            kind,
            id: "id-1".to_string(),
            created: 7,
            model: "m".to_string(),
            prompt_tokens: 3,
            completion_tokens: n,
            include_usage,
            running_usage: false,
        }
    }

    #[test]
    fn running_usage_like_vllm() {
        let mut c = completion(Kind::Chat, 2, true);
        c.running_usage = true;
        let first = event_json(&c.opening_events()[0]);
        assert_eq!(first["usage"]["completion_tokens"], 0);
        let second = event_json(&c.token_event(1));
        assert_eq!(second["usage"]["completion_tokens"], 2);
        assert_eq!(second["usage"]["prompt_tokens"], 3);
        let closing = c.closing_events();
        assert_eq!(event_json(&closing[0])["usage"]["total_tokens"], 5);
        assert_eq!(event_json(&closing[1])["choices"], json!([]));
    }

    /// Parse `data: {json}\n\n` (or TGI's `data:{json}\n\n`).
    fn event_json(event: &[u8]) -> Value {
        let text = std::str::from_utf8(event).expect("utf8");
        assert!(
            text.ends_with("\n\n"),
            "event must end with a blank line: {text:?}"
        );
        let payload = text
            .strip_prefix("data: ")
            .or_else(|| text.strip_prefix("data:"))
            .expect("data prefix");
        serde_json::from_str(payload.trim_end()).expect("json")
    }

    #[test]
    fn counts_words_in_prompts_and_messages() {
        assert_eq!(count_words(&json!("  hello   big world ")), 3);
        assert_eq!(count_words(&json!(["a b", "c"])), 3);
        assert_eq!(count_words(&json!([1, 2, 3])), 3);
        assert_eq!(count_words(&json!(null)), 0);
        let messages = json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "one two three"},
                                         {"type": "image_url", "image_url": {"url": "x y"}}]},
            {"role": "assistant", "content": null},
        ]);
        assert_eq!(chat_prompt_tokens(Some(&messages)), 5);
        assert_eq!(chat_prompt_tokens(None), 0);
    }

    #[test]
    fn chunk_framing() {
        assert_eq!(chunk(b"hello"), b"5\r\nhello\r\n");
        assert_eq!(chunk(&[b'x'; 26])[..4], *b"1a\r\n");
    }

    #[test]
    fn chat_stream_events_with_usage() {
        let c = completion(Kind::Chat, 2, true);
        let opening = c.opening_events();
        assert_eq!(opening.len(), 1);
        let first = event_json(&opening[0]);
        assert_eq!(
            first["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(first["usage"], Value::Null);
        assert!(first.as_object().expect("object").contains_key("usage"));
        assert_eq!(first["timings"]["predicted_ms"], json!(1.0));

        let token = event_json(&c.token_event(1));
        assert_eq!(token["object"], "chat.completion.chunk");
        assert_eq!(token["choices"][0]["delta"]["content"], "tok1 ");

        let closing = c.closing_events();
        assert_eq!(closing.len(), 3);
        let finish = event_json(&closing[0]);
        assert_eq!(finish["choices"][0]["finish_reason"], "length");
        assert_eq!(finish["choices"][0]["delta"], json!({}));
        let usage = event_json(&closing[1]);
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
        );
        assert!(usage.get("timings").is_none());
        assert_eq!(closing[2], b"data: [DONE]\n\n");
    }

    #[test]
    fn stream_without_include_usage_has_no_usage_key() {
        let c = completion(Kind::Text, 1, false);
        assert!(c.opening_events().is_empty());
        let token = event_json(&c.token_event(0));
        assert_eq!(token["choices"][0]["text"], "tok0 ");
        assert!(token.get("usage").is_none());
        let closing = c.closing_events();
        assert_eq!(closing.len(), 2);
        assert_eq!(closing[1], b"data: [DONE]\n\n");
    }

    #[test]
    fn tgi_stream_last_event_carries_details() {
        let c = completion(Kind::TgiStream, 2, false);
        let first = c.token_event(0);
        assert!(first.starts_with(b"data:{"));
        let first = event_json(&first);
        assert_eq!(first["token"]["text"], "tok ");
        assert_eq!(first["generated_text"], Value::Null);
        let last = event_json(&c.token_event(1));
        assert_eq!(last["generated_text"], "tok tok ");
        assert_eq!(
            last["details"],
            json!({"finish_reason": "length", "generated_tokens": 2, "input_length": 3})
        );
        assert!(c.closing_events().is_empty());
    }

    #[test]
    fn non_streaming_bodies() {
        let c = completion(Kind::Chat, 3, false);
        let body = c.response();
        assert_eq!(body["choices"][0]["message"]["content"], "tok0 tok1 tok2 ");
        assert_eq!(body["usage"]["total_tokens"], 6);
        let tgi = completion(Kind::Tgi, 2, false);
        assert!(tgi.tgi_response(false).get("details").is_none());
        assert_eq!(tgi.tgi_response(true)["details"]["generated_tokens"], 2);
    }

    #[test]
    fn hooks_parse_and_reject() {
        let opts = MockOptions::default();
        let defaults = Hooks::parse(&HeaderMap::new(), &opts).expect("defaults");
        assert_eq!(defaults.tokens, 16);
        assert_eq!(defaults.framing, Framing::Length);

        let mut h = HeaderMap::new();
        h.insert("x-mock-ttft-ms", HeaderValue::from_static("250"));
        h.insert("x-mock-tokens", HeaderValue::from_static("4"));
        h.insert("x-mock-framing", HeaderValue::from_static("Chunked"));
        h.insert("x-mock-stall", HeaderValue::from_static("head"));
        h.insert("x-mock-echo", HeaderValue::from_static("1"));
        h.insert("x-mock-garbage", HeaderValue::from_static("Chunk"));
        let hooks = Hooks::parse(&h, &opts).expect("hooks");
        assert_eq!(hooks.garbage, Some(Garbage::Chunk));
        assert_eq!(hooks.ttft, Duration::from_millis(250));
        assert_eq!(hooks.tokens, 4);
        assert_eq!(hooks.framing, Framing::Chunked);
        assert!(hooks.stall_head && hooks.echo);

        for (name, value) in [
            ("x-mock-status", "99"),
            ("x-mock-status", "abc"),
            ("x-mock-framing", "gzip"),
            ("x-mock-stall", "body"),
            ("x-mock-garbage", "tail"),
            ("x-mock-tokens", "-1"),
            ("x-mock-ttft-ms", "86400001"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static(value));
            assert!(Hooks::parse(&h, &opts).is_err(), "{name}: {value}");
        }
    }

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

    #[test]
    fn heads() {
        let head = response_head(
            200,
            "text/event-stream",
            &[],
            BodyFraming::Chunked,
            ConnHeader::for_request(Version::HTTP_11, false, Some(Duration::from_millis(5500))),
        );
        let head = String::from_utf8(head).expect("utf8");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(head.contains("transfer-encoding: chunked\r\n"));
        assert!(head.contains("keep-alive: timeout=5\r\n"));
        assert!(head.ends_with("\r\n\r\n"));

        let reply = Reply::error(503, "down");
        let wire = String::from_utf8(reply.encode(false, ConnHeader::Close)).expect("utf8");
        assert!(wire.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(wire.contains("connection: close\r\n"));
        let body = wire.split("\r\n\r\n").nth(1).expect("body");
        let v: Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["error"]["code"], 503);
        assert_eq!(v["error"]["type"], "server_error");

        let implicit = ConnHeader::for_request(Version::HTTP_11, false, None);
        let wire =
            String::from_utf8(Reply::json(200, &json!({})).encode(false, implicit)).expect("utf8");
        assert!(!wire.contains("connection:"), "{wire}");
        let http10 = ConnHeader::for_request(Version::HTTP_10, false, None);
        let wire =
            String::from_utf8(Reply::json(200, &json!({})).encode(true, http10)).expect("utf8");
        assert!(wire.contains("connection: keep-alive\r\n") && wire.ends_with("\r\n\r\n"));

        let no_body = String::from_utf8(Reply::error(204, "x").encode(
            false,
            ConnHeader::for_request(Version::HTTP_11, false, None),
        ))
        .expect("utf8");
        assert_eq!(no_body, "HTTP/1.1 204 No Content\r\n\r\n");
    }
}
