//! HTTP/1.1 response reading for the load client and the blocking probes, on the proxy's own
//! framing (`llmproxy::http1`: `Head` parsed with httparse, `BodyFraming`, `ChunkedDecoder`), and
//! the SSE token counter. It only reads: it never writes a request, and it does not decide what a
//! bad response means (the client counts `Malformed` as a `protocol` error).
//!
//! Why llmproxy's parser rather than an independent one (this benchmark had its own until issue
//! 13), with the two measured side by side on the mock's real responses:
//! - Cost. The client's CPU per request is in the report (load side CPU, on CPU 1 with the mock).
//!   Per response (callgrind instructions; best of 7 on CPU 1): W1 1,335 → 2,227 (80 → 128 ns),
//!   a W2 stream in 20 reads 21,742 → 25,833 (1.32 → 1.49 µs), the head copied into its own
//!   `Bytes` with its header ranges as the proxy keeps it. Against 11 µs (W1) to 92 µs (W2) of
//!   load side CPU per request that is under 0.5%, below the run-to-run noise.
//! - Coupling. It is stricter than the old reader (Content-Length with Transfer-Encoding, a bad
//!   chunk size or a missing CRLF after chunk data are errors), so a framing bug in what a proxy
//!   writes shows up as errors instead of being read past. Whether a stream arrived whole is still
//!   judged outside any framing code: its content tokens are counted against what the mock sent.
//! - The read buffer stays the client's own (32 KiB per connection, unread bytes moved to the
//!   front), not `http1::io::read_more`'s page: reads per response are what they were.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use llmproxy::http1::{BodyFraming, ChunkedDecoder, Head, ParseStatus};
use memchr::memmem;

use crate::workload::TOKEN_MARK;

/// Longest response head accepted from any target; a longer one is broken, not slow.
const MAX_HEAD: usize = 64 * 1024;

/// A response that cannot be read as HTTP/1.1: malformed head, framing or chunked body.
#[derive(Debug)]
pub(crate) struct Malformed;

/// What the readers need from a response head (the head itself is not kept).
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) framing: BodyFraming,
    /// The connection may carry the next request: no `Connection: close`, no HTTP/1.0 without
    /// keep-alive, no body that runs until the close.
    pub(crate) reusable: bool,
}

/// Parses the response head at the front of `buf` and consumes it; Ok(None) until it is complete.
pub(crate) fn parse_head(buf: &mut BytesMut, method: &str) -> Result<Option<Reply>, Malformed> {
    match Head::parse_response(buf) {
        Ok(ParseStatus::Complete(head)) => {
            let framing = head.response_framing(method).map_err(|_| Malformed)?;
            Ok(Some(Reply {
                status: head.status,
                framing,
                reusable: head.keep_alive() && framing != BodyFraming::UntilClose,
            }))
        }
        Ok(ParseStatus::Partial) if buf.len() > MAX_HEAD => Err(Malformed),
        Ok(ParseStatus::Partial) => Ok(None),
        Err(_) => Err(Malformed),
    }
}

/// One request on a fresh blocking connection; returns the status and the (de-chunked) body.
pub(crate) fn blocking_request(
    addr: SocketAddr,
    req: &[u8],
    timeout: Duration,
) -> io::Result<(u16, Vec<u8>)> {
    blocking_request_tls(addr, req, timeout, None)
}

/// `blocking_request`, over TLS when `tls` is given (verifying `localhost`).
pub(crate) fn blocking_request_tls(
    addr: SocketAddr,
    req: &[u8],
    timeout: Duration,
    tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
) -> io::Result<(u16, Vec<u8>)> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    match tls {
        None => request_on(s, req),
        Some(cfg) => {
            let name =
                rustls::pki_types::ServerName::try_from("localhost").map_err(io::Error::other)?;
            let conn =
                rustls::ClientConnection::new(cfg.clone(), name).map_err(io::Error::other)?;
            request_on(rustls::StreamOwned::new(conn, s), req)
        }
    }
}

fn request_on(mut s: impl Read + Write, req: &[u8]) -> io::Result<(u16, Vec<u8>)> {
    s.write_all(req)?;
    s.flush()?;
    let method = req
        .iter()
        .position(|&b| b == b' ')
        .and_then(|n| std::str::from_utf8(&req[..n]).ok())
        .unwrap_or("GET");
    let mut buf = BytesMut::new();
    let mut tmp = [0u8; 16384];
    let mut fill = |buf: &mut BytesMut| -> io::Result<()> {
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
        Ok(())
    };
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let reply = loop {
        match parse_head(&mut buf, method) {
            Ok(Some(r)) => break r,
            Ok(None) => fill(&mut buf)?,
            Err(Malformed) => return Err(bad("malformed response head")),
        }
    };
    let body = read_framed_body(&mut buf, reply.framing, fill)?;
    Ok((reply.status, body))
}

/// Reads one message body framed as `framing` out of `buf`, consuming it (bytes after it stay
/// for the next message); `fill` reads more into `buf` and fails at the peer's close. Shared by
/// the blocking probes (responses) and the webhook receiver (requests).
pub(crate) fn read_framed_body(
    buf: &mut BytesMut,
    framing: BodyFraming,
    mut fill: impl FnMut(&mut BytesMut) -> io::Result<()>,
) -> io::Result<Vec<u8>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut body = Vec::new();
    match framing {
        BodyFraming::Empty => {}
        BodyFraming::Length(n) => {
            let n = usize::try_from(n).map_err(|_| bad("Content-Length too large"))?;
            while buf.len() < n {
                fill(buf)?;
            }
            body.extend_from_slice(&buf.split_to(n));
        }
        BodyFraming::Chunked => {
            let mut dec = ChunkedDecoder::new();
            loop {
                let used = dec
                    .decode(buf, |d| body.extend_from_slice(d))
                    .map_err(|_| bad("malformed chunked body"))?;
                buf.advance(used);
                if dec.is_done() {
                    break;
                }
                fill(buf)?;
            }
        }
        BodyFraming::UntilClose => {
            while fill(buf).is_ok() {}
            body.extend_from_slice(&buf.split());
        }
    }
    Ok(body)
}

pub(crate) fn get(addr: SocketAddr, path: &str) -> io::Result<(u16, Vec<u8>)> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    blocking_request(addr, req.as_bytes(), Duration::from_secs(5))
}

/// Counts `TOKEN_MARK` in a byte stream delivered in pieces (a mark may straddle two pieces).
#[derive(Default)]
pub(crate) struct TokenMatcher {
    pub(crate) tail: [u8; 16],
    pub(crate) tail_len: usize,
}

impl TokenMatcher {
    pub(crate) fn count(&mut self, finder: &memmem::Finder<'_>, data: &[u8]) -> u32 {
        let k = TOKEN_MARK.len() - 1;
        let mut n = 0u32;
        if self.tail_len > 0 {
            let mut joint = [0u8; 32];
            let head = data.len().min(k);
            joint[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
            joint[self.tail_len..self.tail_len + head].copy_from_slice(&data[..head]);
            let joint = &joint[..self.tail_len + head];
            // Marks starting in the tail end in `data` (the tail is shorter than a mark).
            n += finder
                .find_iter(joint)
                .filter(|&at| at < self.tail_len)
                .count() as u32;
        }
        n += finder.find_iter(data).count() as u32;
        if data.len() >= k {
            self.tail[..k].copy_from_slice(&data[data.len() - k..]);
            self.tail_len = k;
        } else {
            let mut joint = [0u8; 32];
            joint[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
            joint[self.tail_len..self.tail_len + data.len()].copy_from_slice(data);
            let total = self.tail_len + data.len();
            let keep = total.min(k);
            self.tail[..keep].copy_from_slice(&joint[total - keep..total]);
            self.tail_len = keep;
        }
        n
    }
}

/// Run when started without `--bench` (that is by `cargo test --benches` / `--all-targets`, as
/// criterion does): check the response reading quickly instead of starting a three-minute
/// benchmark.
pub(crate) fn self_check() {
    let event = |i: u32| format!("data: {{\"delta\":{{\"content\":\"tok{i} \"}}}}\n\n");
    let mut body = Vec::new();
    for i in 0..2 {
        let e = event(i);
        body.extend_from_slice(format!("{:x}\r\n{e}\r\n", e.len()).as_bytes());
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let finder = memmem::Finder::new(TOKEN_MARK);
    for step in 1..body.len() {
        let mut dec = ChunkedDecoder::new();
        let mut m = TokenMatcher::default();
        let mut buf = Vec::new();
        let mut pos = 0;
        let mut n = 0;
        for piece in body.chunks(step) {
            buf.extend_from_slice(piece);
            pos += dec
                .decode(&buf[pos..], |d| n += m.count(&finder, d))
                .expect("valid chunked body");
        }
        assert!(dec.is_done(), "pieces of {step}: body not complete");
        assert_eq!(n, 2, "pieces of {step}: tokens");
        assert_eq!(pos, body.len());
    }
    let mut head = BytesMut::from(
        &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello"[..],
    );
    let h = parse_head(&mut head, "POST")
        .expect("valid")
        .expect("complete");
    assert_eq!(
        (h.status, h.framing, h.reusable),
        (200, BodyFraming::Length(5), false)
    );
    assert_eq!(&head[..], b"hello");
    println!("load benchmark: parser self-check passed (run it with `cargo bench --bench load`)");
}
