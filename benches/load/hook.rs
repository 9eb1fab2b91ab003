//! The billing side of the `llmproxy-hook` target: a webhook receiver in this process (so on CPU
//! 1, with the mock and the load generator: its cost is load side, as a billing system's would
//! be), answering every POST 200 on a keep-alive connection, as a production receiver should.
//!
//! It counts the usage events it receives (each one object with an `"event_id"`, however the
//! proxy batches them), so the run can say how many of the requests the proxy answered reached
//! billing and how long after the load stopped the last one did. It parses with llmproxy's own
//! head parser and reads bodies with the probes' reader (`http::read_framed_body`):
//! `Content-Length` (ureq's) or chunked, so a change of the sender's framing is counted, not
//! hung on.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use llmproxy::http1::{BodyFraming, Head, ParseStatus};
use memchr::memmem;

use crate::http::read_framed_body;

/// A head longer than this is not a usage POST.
const MAX_HEAD: usize = 64 * 1024;

/// What the receiver has seen so far.
#[derive(Default)]
pub(crate) struct Counts {
    pub(crate) events: AtomicU64,
    pub(crate) posts: AtomicU64,
    /// POSTs it could not read as HTTP/1.1 (their connection is closed).
    pub(crate) malformed: AtomicU64,
}

pub(crate) struct Receiver {
    pub(crate) addr: SocketAddr,
    pub(crate) counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    pub(crate) fn start() -> Result<Receiver, String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("webhook: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        // Accept polls so that the thread ends with the receiver.
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("webhook: {e}"))?;
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (counts.clone(), stop.clone());
        std::thread::Builder::new()
            .name("webhook-accept".into())
            .spawn(move || accept(listener, c, s))
            .map_err(|e| format!("webhook: {e}"))?;
        Ok(Receiver { addr, counts, stop })
    }

    pub(crate) fn events(&self) -> u64 {
        self.counts.events.load(Ordering::Relaxed)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn accept(listener: TcpListener, counts: Arc<Counts>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((sock, _)) => {
                let (c, s) = (counts.clone(), stop.clone());
                let spawned = std::thread::Builder::new()
                    .name("webhook-conn".into())
                    .spawn(move || {
                        if serve(sock, &c, &s).is_err() {
                            c.malformed.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                if let Err(e) = spawned {
                    eprintln!("webhook receiver: cannot start a thread: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                eprintln!("webhook receiver: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// One keep-alive connection: POSTs answered 200 until the sender closes it (Ok) or sends what
/// is not HTTP/1.1 (Err).
fn serve(mut sock: TcpStream, counts: &Counts, stop: &AtomicBool) -> Result<(), ()> {
    // Reads wake up now and then so that the thread sees the stop.
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|_| ())?;
    let _ = sock.set_nodelay(true);
    let finder = memmem::Finder::new(b"\"event_id\"");
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        let framing = loop {
            match Head::parse_request(&mut buf) {
                Ok(ParseStatus::Complete(head)) => break head.request_framing().map_err(|_| ())?,
                Ok(ParseStatus::Partial) if buf.len() > MAX_HEAD => return Err(()),
                Ok(ParseStatus::Partial) => {
                    if !fill(&mut sock, &mut buf, stop)? {
                        return Ok(());
                    }
                }
                Err(_) => return Err(()),
            }
        };
        // A request that runs until the close has no framing: not a POST this receiver reads.
        if framing == BodyFraming::UntilClose {
            return Err(());
        }
        let more = |buf: &mut BytesMut| match fill(&mut sock, buf, stop) {
            Ok(true) => Ok(()),
            _ => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
        };
        let body = read_framed_body(&mut buf, framing, more).map_err(|_| ())?;
        counts
            .events
            .fetch_add(finder.find_iter(&body).count() as u64, Ordering::Relaxed);
        counts.posts.fetch_add(1, Ordering::Relaxed);
        sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .map_err(|_| ())?;
    }
}

/// Reads more into `buf`: false at the sender's close (or the receiver's stop).
fn fill(sock: &mut TcpStream, buf: &mut BytesMut, stop: &AtomicBool) -> Result<bool, ()> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match sock.read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(true);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                if stop.load(Ordering::Relaxed) {
                    return Ok(false);
                }
            }
            Err(_) => return Err(()),
        }
    }
}

/// The requests the proxy answered (the sum of `llmproxy_requests_total`; every request of this
/// benchmark is a metered chat completion, so each owes one usage event), from its /metrics.
fn answered(proxy: SocketAddr) -> Option<u64> {
    let (200, body) = crate::http::get(proxy, "/metrics").ok()? else {
        return None;
    };
    let text = String::from_utf8_lossy(&body);
    let sum: f64 = text
        .lines()
        .filter(|l| l.starts_with("llmproxy_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Some(sum as u64)
}

/// After the load stopped: waits (at most `limit`) until the receiver holds one event for every
/// request the proxy answered, and says how that went. `stopped`: when the load stopped.
pub(crate) fn settle(
    receiver: &Receiver,
    proxy: SocketAddr,
    stopped: std::time::Instant,
    limit: Duration,
) -> Settled {
    let deadline = stopped + limit;
    let mut last = None;
    loop {
        let now = std::time::Instant::now();
        let answered = answered(proxy);
        let events = receiver.events();
        // Settled: the proxy's count held still between two reads and billing has them all.
        let still = answered.is_some() && answered == last;
        if (still && answered.is_some_and(|a| events >= a)) || now >= deadline {
            return Settled {
                answered,
                events,
                posts: receiver.counts.posts.load(Ordering::Relaxed),
                malformed: receiver.counts.malformed.load(Ordering::Relaxed),
                after: now.duration_since(stopped),
            };
        }
        last = answered;
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the receiver held once the proxy's usage settled.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settled {
    pub(crate) answered: Option<u64>,
    pub(crate) events: u64,
    pub(crate) posts: u64,
    pub(crate) malformed: u64,
    pub(crate) after: Duration,
}

impl Settled {
    /// Every request answered reached billing, once, and every POST was read.
    pub(crate) fn complete(&self) -> bool {
        self.answered == Some(self.events) && self.malformed == 0
    }

    pub(crate) fn note(&self) -> String {
        let Some(answered) = self.answered else {
            return format!(
                "usage hook: {} events received in {} POSTs; the proxy's request count was \
                 unreadable",
                self.events, self.posts
            );
        };
        let verdict = if self.complete() {
            "all delivered".to_string()
        } else if self.events < answered {
            format!("MISSING {}", answered - self.events)
        } else if self.events > answered {
            format!("{} DUPLICATES", self.events - answered)
        } else {
            format!("{} POSTS UNREADABLE", self.malformed)
        };
        format!(
            "usage hook: {} events for {answered} requests answered ({verdict}) in {} POSTs, \
             {:.1} s after the load stopped",
            self.events,
            self.posts,
            self.after.as_secs_f64()
        )
    }
}

fn post(body: &str, chunked: bool) -> Vec<u8> {
    let mut req = b"POST /usage HTTP/1.1\r\nhost: x\r\n".to_vec();
    if chunked {
        req.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
        let half = body.len() / 2;
        for part in [&body[..half], &body[half..]] {
            req.extend_from_slice(format!("{:x}\r\n{part}\r\n", part.len()).as_bytes());
        }
        req.extend_from_slice(b"0\r\n\r\n");
    } else {
        req.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
        req.extend_from_slice(body.as_bytes());
    }
    req
}

/// Sends `reqs` on one keep-alive connection and reads one 200 per request.
fn send(addr: SocketAddr, reqs: &[Vec<u8>]) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for r in reqs {
        s.write_all(r).unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 256];
        while !got.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut b).unwrap();
            assert!(n > 0, "receiver closed early");
            got.extend_from_slice(&b[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"), "{got:?}");
    }
}

fn counts_the_events_of_batches_and_single_posts_on_keep_alive() {
    let r = Receiver::start().unwrap();
    let batch = r#"{"events":[{"event_id":"a","model":"m"},{"event_id":"b"},{"event_id":"c"}]}"#;
    let single = r#"{"event_id":"d","request_id":"x"}"#;
    send(
        r.addr,
        &[post(batch, false), post(single, true), post(batch, true)],
    );
    assert_eq!(r.events(), 7);
    assert_eq!(r.counts.posts.load(Ordering::Relaxed), 3);
    assert_eq!(r.counts.malformed.load(Ordering::Relaxed), 0);
}

fn a_post_that_is_not_http_is_counted_and_its_connection_closed() {
    let r = Receiver::start().unwrap();
    let mut s = TcpStream::connect(r.addr).unwrap();
    s.write_all(b"\x00\x01 not http\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 16];
    assert_eq!(s.read(&mut b).unwrap_or(0), 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while r.counts.malformed.load(Ordering::Relaxed) == 0 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(r.events(), 0);
}

fn the_verdict_names_what_is_missing_or_extra() {
    let s = |answered, events, malformed| Settled {
        answered,
        events,
        posts: 2,
        malformed,
        after: Duration::from_millis(1500),
    };
    assert!(s(Some(10), 10, 0).complete());
    assert!(s(Some(10), 10, 0).note().contains("(all delivered)"));
    assert!(s(Some(10), 10, 0).note().contains("1.5 s after"));
    assert!(s(Some(10), 7, 0).note().contains("MISSING 3"));
    assert!(s(Some(10), 12, 0).note().contains("2 DUPLICATES"));
    assert!(!s(Some(10), 10, 1).complete());
    assert!(s(None, 10, 0).note().contains("unreadable"));
}

/// Run by `cargo test --benches` and `.ci/run` (the bench binary without `--bench`): the
/// receiver over real sockets (batches, a single event, chunked and sized bodies on one
/// keep-alive connection; a POST that is not HTTP) and the verdict's wording.
pub(crate) fn self_check() {
    counts_the_events_of_batches_and_single_posts_on_keep_alive();
    a_post_that_is_not_http_is_counted_and_its_connection_closed();
    the_verdict_names_what_is_missing_or_extra();
    eprintln!("load benchmark: webhook receiver self-check passed");
}
