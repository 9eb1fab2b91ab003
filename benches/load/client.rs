//! The load generator: one monoio thread on CPU 1 driving N keep-alive connections in a closed
//! loop (a connection sends its next request once the previous response was read to the end) or,
//! for W6, on a fixed schedule (each connection's requests due one period apart; a late one is
//! counted, and the ones after it go out at once until the schedule is caught up),
//! and what they saw (`Acc`): completions, latency/TTFT/token-gap samples inside the window,
//! errors by kind, open streams and connections. Its own CPU is reported (load side CPU, sharing
//! CPU 1 with the mock), so per request it only parses and counts: the request is one shared
//! `Bytes`, the read buffer is reused, samples go to preallocated vectors. Every wait is bounded
//! by the end of the window, so all its connections are closed when the window ends.
//!
//! TLS targets (`Spec::tls`): rustls's `ClientConnection` driven by hand over the same monoio
//! stream (ciphertext in and out of the socket with the same reads and writes, plaintext parsed
//! the same way), so a TLS run differs from a plaintext one only by the TLS work itself, on both
//! sides, and no extra hop or thread. Its client-side cost lands on CPU 1 (load side CPU).

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use llmproxy::http1::{BodyFraming, ChunkedDecoder};
use memchr::memmem;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};

use crate::http::{parse_head, TokenMatcher};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    Connect,
    Io,
    Closed,
    Status(u16),
    Protocol,
    Short,
    Timeout,
}

pub(crate) const FAILURE_KINDS: [&str; 7] = [
    "connect", "io", "closed", "status", "protocol", "short", "timeout",
];

impl Failure {
    pub(crate) fn index(self) -> usize {
        match self {
            Failure::Connect => 0,
            Failure::Io => 1,
            Failure::Closed => 2,
            Failure::Status(_) => 3,
            Failure::Protocol => 4,
            Failure::Short => 5,
            Failure::Timeout => 6,
        }
    }
}

pub(crate) struct Spec {
    pub(crate) addr: SocketAddr,
    pub(crate) conns: usize,
    pub(crate) request: Bytes,
    pub(crate) stream: bool,
    pub(crate) tokens: u32,
    pub(crate) record_gaps: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) ramp: Duration,
    pub(crate) t0: Instant,
    pub(crate) t1: Instant,
    pub(crate) finder: memmem::Finder<'static>,
    pub(crate) stop: Arc<AtomicBool>,
    /// Some: speak TLS to the target (verifying `localhost` against the bench's CA).
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    /// Open loop (W6): each connection's requests are due this far apart.
    pub(crate) period: Option<Duration>,
}

impl Spec {
    pub(crate) fn in_window(&self, t: Instant) -> bool {
        t >= self.t0 && t < self.t1
    }
}

/// What the clients saw; samples only for events inside the measurement window.
#[derive(Default)]
pub(crate) struct Acc {
    pub(crate) ok: u64,
    pub(crate) lat_us: Vec<u32>,
    pub(crate) ttft_us: Vec<u32>,
    pub(crate) gap_us: Vec<u32>,
    pub(crate) errors: [u64; 7],
    pub(crate) warmup_errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) tokens: u64,
    pub(crate) reconnects: u64,
    /// Streams that have had their first token and are still open.
    pub(crate) streaming: i64,
    pub(crate) streaming_at_end: i64,
    pub(crate) connections: i64,
    pub(crate) connections_at_end: i64,
    pub(crate) uring: bool,
    /// Client tasks still running 3 s after the window (their sockets may leak; should be 0).
    pub(crate) clients_left: usize,
    /// Open loop: requests due inside the window, and how many of them started more than
    /// `LATE` after they were due (the target did not keep up with the offered rate).
    pub(crate) due: u64,
    pub(crate) late: u64,
}

impl Acc {
    pub(crate) fn fail(&mut self, spec: &Spec, f: Failure, at: Instant) {
        if spec.in_window(at) {
            self.errors[f.index()] += 1;
        } else if at < spec.t0 {
            self.warmup_errors += 1;
        } else {
            return;
        }
        if self.first_error.is_none() {
            self.first_error = Some(match f {
                Failure::Status(s) => format!("status {s}"),
                other => FAILURE_KINDS[other.index()].to_string(),
            });
        }
    }
}

/// An open-loop request that starts later than this after it was due is late.
pub(crate) const LATE: Duration = Duration::from_millis(1);

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Read buffer per connection, allocated once: room for many W1 responses or a whole W2 stream.
const READ_BUF: usize = 32 * 1024;
/// Least room a read is given; below it the unread bytes move to the front first.
const MIN_ROOM: usize = 4096;

struct Conn {
    stream: monoio::net::TcpStream,
    /// Unread bytes (plaintext); what was parsed is consumed from the front.
    buf: BytesMut,
    acc: Rc<RefCell<Acc>>,
    tls: Option<Box<Tls>>,
}

/// A TLS client session and its ciphertext read buffer.
struct Tls {
    conn: rustls::ClientConnection,
    raw: Vec<u8>,
}

impl Conn {
    async fn open(spec: &Spec, acc: &Rc<RefCell<Acc>>) -> io::Result<Conn> {
        let stream = monoio::net::TcpStream::connect(spec.addr).await?;
        stream.set_nodelay(true)?;
        acc.borrow_mut().connections += 1;
        let tls = match &spec.tls {
            None => None,
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from("localhost")
                    .map_err(io::Error::other)?;
                let conn =
                    rustls::ClientConnection::new(cfg.clone(), name).map_err(io::Error::other)?;
                Some(Box::new(Tls {
                    conn,
                    raw: Vec::with_capacity(READ_BUF),
                }))
            }
        };
        let mut c = Conn {
            stream,
            buf: BytesMut::with_capacity(READ_BUF),
            acc: acc.clone(),
            tls,
        };
        if c.tls.is_some() {
            c.handshake()
                .await
                .map_err(|_| io::Error::other("TLS handshake"))?;
        }
        Ok(c)
    }

    async fn handshake(&mut self) -> Result<(), Failure> {
        loop {
            self.flush_tls().await?;
            let handshaking = self.tls.as_ref().is_some_and(|t| t.conn.is_handshaking());
            if !handshaking {
                return Ok(());
            }
            self.read_tls().await?;
        }
    }

    /// Writes whatever rustls has queued (handshake records, encrypted requests).
    async fn flush_tls(&mut self) -> Result<(), Failure> {
        let Some(t) = self.tls.as_mut() else {
            return Ok(());
        };
        if !t.conn.wants_write() {
            return Ok(());
        }
        let mut out = Vec::new();
        while t.conn.wants_write() {
            t.conn.write_tls(&mut out).map_err(|_| Failure::Io)?;
        }
        let (res, _) = self.stream.write_all(out).await;
        res.map(|_| ()).map_err(|_| Failure::Io)
    }

    /// One socket read of ciphertext into rustls.
    async fn read_tls(&mut self) -> Result<(), Failure> {
        let Some(t) = self.tls.as_mut() else {
            return Err(Failure::Protocol);
        };
        let raw = std::mem::take(&mut t.raw);
        let (res, mut raw) = self.stream.read(raw).await;
        let n = res.map_err(|_| Failure::Io)?;
        if n == 0 {
            return Err(Failure::Closed);
        }
        let t = self.tls.as_mut().ok_or(Failure::Protocol)?;
        let mut rd = &raw[..];
        while !rd.is_empty() {
            t.conn.read_tls(&mut rd).map_err(|_| Failure::Protocol)?;
            t.conn
                .process_new_packets()
                .map_err(|_| Failure::Protocol)?;
        }
        raw.clear();
        t.raw = raw;
        Ok(())
    }

    async fn send(&mut self, request: &Bytes) -> Result<(), Failure> {
        match self.tls.as_mut() {
            None => {
                let (res, _) = self.stream.write_all(request.clone()).await;
                res.map(|_| ()).map_err(|_| Failure::Io)
            }
            Some(t) => {
                use std::io::Write;
                t.conn
                    .writer()
                    .write_all(request)
                    .map_err(|_| Failure::Io)?;
                self.flush_tls().await
            }
        }
    }

    /// Read more bytes after the unread ones. `reserve` first moves the unread bytes (at most a
    /// partial head or chunk) to the front of the same allocation: when everything was consumed,
    /// or when less than `MIN_ROOM` is left. It allocates only if they would not fit in half.
    async fn fill(&mut self) -> Result<(), Failure> {
        if self.buf.is_empty() {
            self.buf.reserve(READ_BUF);
        } else if self.buf.capacity() - self.buf.len() < MIN_ROOM {
            self.buf.reserve(READ_BUF / 2);
        }
        if self.tls.is_some() {
            return self.fill_tls().await;
        }
        let buf = std::mem::take(&mut self.buf);
        let len = buf.len();
        let (res, slice) = self.stream.read(buf.slice_mut(len..)).await;
        self.buf = slice.into_inner();
        match res {
            Ok(0) => Err(Failure::Closed),
            Ok(_) => Ok(()),
            Err(_) => Err(Failure::Io),
        }
    }

    /// Plaintext from rustls into `buf`, reading ciphertext from the socket until there is some.
    async fn fill_tls(&mut self) -> Result<(), Failure> {
        loop {
            let t = self.tls.as_mut().ok_or(Failure::Protocol)?;
            // Through a stack buffer: only the bytes there are get copied (no zeroing of the
            // whole free room per read).
            let mut chunk = [0u8; 16 * 1024];
            match std::io::Read::read(&mut t.conn.reader(), &mut chunk) {
                Ok(0) => return Err(Failure::Closed),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(Failure::Protocol),
            }
            // Key updates or tickets may want an answer.
            self.flush_tls().await?;
            self.read_tls().await?;
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Ok(mut acc) = self.acc.try_borrow_mut() {
            acc.connections -= 1;
        }
    }
}

/// Counts a stream as open from its first token until it ends (or is dropped).
struct StreamGauge<'a> {
    acc: &'a RefCell<Acc>,
    on: bool,
}

impl StreamGauge<'_> {
    fn start(&mut self) {
        if !self.on {
            self.on = true;
            self.acc.borrow_mut().streaming += 1;
        }
    }
}

impl Drop for StreamGauge<'_> {
    fn drop(&mut self) {
        if self.on {
            if let Ok(mut acc) = self.acc.try_borrow_mut() {
                acc.streaming -= 1;
            }
        }
    }
}

/// One request/response on `c`; Ok(true) when the connection may be reused.
async fn exchange(
    c: &mut Conn,
    spec: &Spec,
    acc: &RefCell<Acc>,
    start: Instant,
) -> Result<bool, Failure> {
    c.send(&spec.request).await?;
    let head = loop {
        if let Some(h) = parse_head(&mut c.buf, "POST").map_err(|_| Failure::Protocol)? {
            break h;
        }
        c.fill().await?;
    };
    if head.status != 200 {
        return Err(Failure::Status(head.status));
    }
    let mut tokens = 0u32;
    let mut first: Option<Instant> = None;
    let mut last = start;
    let mut gauge = StreamGauge { acc, on: false };
    match head.framing {
        BodyFraming::Empty => {}
        BodyFraming::Length(n) => {
            let n = usize::try_from(n).map_err(|_| Failure::Protocol)?;
            while c.buf.len() < n {
                c.fill().await?;
            }
            c.buf.advance(n);
        }
        BodyFraming::Chunked => {
            let mut dec = ChunkedDecoder::new();
            let mut matcher = TokenMatcher::default();
            loop {
                let now = Instant::now();
                let mut found = 0u32;
                let used = dec
                    .decode(&c.buf, |d| {
                        if spec.stream {
                            found += matcher.count(&spec.finder, d);
                        }
                    })
                    .map_err(|_| Failure::Protocol)?;
                c.buf.advance(used);
                if found > 0 {
                    if first.is_none() {
                        first = Some(now);
                        gauge.start();
                    }
                    let mut a = acc.borrow_mut();
                    if spec.in_window(now) {
                        a.tokens += u64::from(found);
                        if spec.record_gaps {
                            let previous = if tokens == 0 { None } else { Some(last) };
                            if let Some(prev) = previous {
                                a.gap_us.push(micros(now - prev));
                            }
                            for _ in 1..found {
                                a.gap_us.push(0);
                            }
                        }
                    }
                    tokens += found;
                    last = now;
                }
                if dec.is_done() {
                    break;
                }
                c.fill().await?;
            }
        }
        BodyFraming::UntilClose => {
            while c.fill().await.is_ok() {}
            c.buf.clear();
        }
    }
    let end = Instant::now();
    if spec.stream && tokens != spec.tokens {
        return Err(Failure::Short);
    }
    if spec.in_window(end) {
        let mut a = acc.borrow_mut();
        a.ok += 1;
        a.lat_us.push(micros(end - start));
        if let Some(f) = first {
            a.ttft_us.push(micros(f - start));
        }
    }
    Ok(head.reusable)
}

/// Open loop: when one connection's requests are due, one period apart. The connections'
/// schedules are staggered evenly over one period, so that the requests arrive at an even rate,
/// not in waves. A request that starts late does not move the schedule: the ones after it go
/// out as soon as they can until it is caught up, so the offered rate stays what was asked.
pub(crate) struct Pace {
    due: Instant,
    period: Duration,
}

impl Pace {
    /// The schedule of connection `idx` of `conns`, starting at `start`.
    pub(crate) fn new(start: Instant, period: Duration, idx: usize, conns: usize) -> Pace {
        Pace {
            due: start + period.mul_f64(idx as f64 / conns.max(1) as f64),
            period,
        }
    }

    /// When the next request is due; the schedule moves on by one period.
    pub(crate) fn take(&mut self) -> Instant {
        let due = self.due;
        self.due += self.period;
        due
    }
}

/// `Pace`: staggered starts, one period apart, and a schedule that a late start does not move.
pub(crate) fn self_check() {
    let t = Instant::now();
    let ms = Duration::from_millis;
    let mut first = Pace::new(t, ms(20), 0, 4);
    let mut third = Pace::new(t, ms(20), 2, 4);
    assert_eq!(first.take(), t);
    assert_eq!(third.take(), t + ms(10));
    // However late the connection comes back, its next requests stay on the schedule.
    assert_eq!(third.take(), t + ms(30));
    assert_eq!(third.take(), t + ms(50));
    assert_eq!(first.take(), t + ms(20));
    eprintln!("load benchmark: client self-check passed");
}

/// Counts the client tasks still running (they end by themselves at the end of the window).
struct Live(Rc<Cell<usize>>);

impl Live {
    fn new(count: &Rc<Cell<usize>>) -> Live {
        count.set(count.get() + 1);
        Live(count.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// One client: a keep-alive connection, one request at a time, until the end of the window. Every
/// wait is bounded by the end of the window, so the task ends then and closes its connection
/// (dropping the runtime instead would leave sockets open and the backend streaming into them).
async fn client(idx: usize, spec: Rc<Spec>, acc: Rc<RefCell<Acc>>, live: Live) {
    let _live = live;
    if !spec.ramp.is_zero() {
        monoio::time::sleep(spec.ramp.mul_f64(idx as f64 / spec.conns as f64)).await;
    }
    let mut conn: Option<Conn> = None;
    let mut pace = spec
        .period
        .map(|p| Pace::new(Instant::now(), p, idx, spec.conns));
    loop {
        let now = Instant::now();
        if now >= spec.t1 {
            break;
        }
        let mut c = match conn.take() {
            Some(c) => c,
            None => match monoio::time::timeout(spec.t1 - now, Conn::open(&spec, &acc)).await {
                Err(_) => break,
                Ok(Ok(c)) => c,
                Ok(Err(_)) => {
                    acc.borrow_mut()
                        .fail(&spec, Failure::Connect, Instant::now());
                    monoio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if let Some(pace) = pace.as_mut() {
            let at = pace.take();
            let now = Instant::now();
            if now < at {
                monoio::time::sleep_until(monoio::time::Instant::from_std(at.min(spec.t1))).await;
                if Instant::now() >= spec.t1 {
                    break;
                }
            }
            if spec.in_window(at) {
                let mut a = acc.borrow_mut();
                a.due += 1;
                if now.saturating_duration_since(at) > LATE {
                    a.late += 1;
                }
            }
        }
        let start = Instant::now();
        let left = spec.t1.saturating_duration_since(start);
        let (limit, at_deadline) = match spec.timeout {
            Some(limit) if limit < left => (limit, false),
            _ => (left, true),
        };
        let result = match monoio::time::timeout(limit, exchange(&mut c, &spec, &acc, start)).await
        {
            Ok(result) => result,
            Err(_) if at_deadline => break,
            Err(_) => Err(Failure::Timeout),
        };
        match result {
            Ok(true) => conn = Some(c),
            Ok(false) => acc.borrow_mut().reconnects += 1,
            Err(f) => {
                acc.borrow_mut().fail(&spec, f, Instant::now());
                // The connection is dropped; a failing target is not hammered in a tight loop.
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

pub(crate) fn spawn_load(spec: Spec) -> std::thread::JoinHandle<Result<Acc, String>> {
    std::thread::Builder::new()
        .name("loadgen".into())
        .spawn(move || {
            let _ = monoio::utils::bind_to_cpu_set([1]);
            let entries = u32::try_from((spec.conns * 2).next_power_of_two())
                .unwrap_or(32768)
                .clamp(1024, 32768);
            let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .with_entries(entries)
                .enable_timer()
                .build()
                .map_err(|e| format!("load generator runtime: {e}"))?;
            let expected = (spec.t1 - spec.t0).as_secs_f64();
            let acc = Rc::new(RefCell::new(Acc {
                lat_us: Vec::with_capacity((expected * 60_000.0) as usize),
                ..Acc::default()
            }));
            let spec = Rc::new(spec);
            let live = Rc::new(std::cell::Cell::new(0usize));
            let result = rt.block_on(async {
                acc.borrow_mut().uring = !monoio::utils::is_legacy();
                for i in 0..spec.conns {
                    monoio::spawn(client(i, spec.clone(), acc.clone(), Live::new(&live)));
                }
                // Wake just before the end of the window to see how many streams are open
                // (the clients stop at its end).
                let snapshot = spec.t1 - (spec.t1 - spec.t0).min(Duration::from_millis(20));
                loop {
                    let now = Instant::now();
                    if now >= snapshot || spec.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    monoio::time::sleep((snapshot - now).min(Duration::from_millis(50))).await;
                }
                let mut result = {
                    let mut a = acc.borrow_mut();
                    a.streaming_at_end = a.streaming;
                    a.connections_at_end = a.connections;
                    std::mem::take(&mut *a)
                };
                // Let the clients see the deadline and close their connections.
                let give_up = Instant::now() + Duration::from_secs(3);
                while live.get() > 0 && Instant::now() < give_up {
                    monoio::time::sleep(Duration::from_millis(5)).await;
                }
                result.clients_left = live.get();
                result
            });
            drop(rt);
            Ok(result)
        })
        .expect("spawn load generator thread")
}
