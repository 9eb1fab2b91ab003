//! Connections to backends: a per-core keep-alive pool, connect with timeout, sending a request
//! and reading the response head under the first-byte timeout. A connection goes back to the
//! pool only when its response was read completely and nothing went wrong; anything that timed
//! out or failed is dropped, which also tells the backend to stop generating.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use monoio::io::Splitable;
use monoio::net::TcpStream;
use rustls::ClientConnection;

use crate::alarm::Alarm;
use crate::error::ProxyError;
use crate::http1::head::{Head, ParseStatus};
use crate::http1::name::Name;
use crate::tls::io::{BackendReader, BackendWriter, Reader, Writer};
use crate::tls::stream::{handshake, HandshakeError};
use crate::tls::ClientTls;

/// Upper bound for a response head from a backend; real ones are a few hundred bytes.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// What a read from a backend first makes room for: a page, like nginx's proxy buffer (with
/// thousands of streams open, larger buffers were most of the memory).
const FIRST_READ: usize = 4 * 1024;

/// The most a read grows to once reads fill the buffer (HAProxy's default buffer size). A fast
/// engine's events arrive together; read in 4 KiB, a 6 KB burst became two reads and two writes
/// to the client, the second a segment and a wake-up of its own on both sides.
const MAX_READ: usize = 16 * 1024;

pub(crate) struct UpConn {
    pub(crate) rd: BackendReader,
    pub(crate) wr: BackendWriter,
    /// Bytes read from the backend and not yet relayed.
    pub(crate) buf: BytesMut,
    /// Came from the pool (so a failure before the first byte may just mean it went stale).
    pub(crate) reused: bool,
    /// The backend's own `Keep-Alive: timeout=N`, if it announced one.
    pub(crate) keepalive_hint: Option<Duration>,
    /// Room the next read gets.
    room: ReadRoom,
}

/// How much room a read from a backend gets: `FIRST_READ`, doubled up to `MAX_READ` each time a
/// read fills the buffer (more was waiting in the socket: a backend that bursts keeps
/// bursting, and the room stays with the pooled connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadRoom(usize);

impl ReadRoom {
    pub(crate) const fn new() -> ReadRoom {
        ReadRoom(FIRST_READ)
    }

    /// Before a read: room for the whole size, when the buffer is smaller than that or less than
    /// half of it is left.
    pub(crate) fn make(self, buf: &mut BytesMut) {
        if buf.capacity() < self.0 || buf.capacity() - buf.len() < self.0 / 2 {
            buf.reserve(self.0);
        }
    }

    /// After a read of `n` bytes into `buf`.
    pub(crate) fn after(&mut self, buf: &BytesMut, n: usize) {
        if n > 0 && buf.len() == buf.capacity() {
            self.0 = (self.0 * 2).min(MAX_READ);
        }
    }
}

struct Idle {
    conn: UpConn,
    expires: Instant,
}

/// Idle connections per backend slot, owned by one core.
pub(crate) struct Pool {
    idle: RefCell<Vec<Vec<Idle>>>,
    /// Per slot: false for free and draining backends, whose connections are not kept.
    open: RefCell<Vec<bool>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub(crate) fn new(backends: usize, max_idle: usize, idle_timeout: Duration) -> Self {
        Pool {
            idle: RefCell::new((0..backends).map(|_| Vec::new()).collect()),
            open: RefCell::new(vec![true; backends]),
            max_idle,
            idle_timeout,
        }
    }

    /// Follows the backend table: `open[slot]` says whether the slot's backend takes new
    /// requests. Connections of slots that closed are dropped (a draining backend gets no new
    /// requests, and a reused slot must not hand out connections to its previous backend).
    pub(crate) fn set_slots(&self, open: &[bool]) {
        let mut idle = self.idle.borrow_mut();
        idle.resize_with(open.len(), Vec::new);
        for (list, &o) in idle.iter_mut().zip(open) {
            if !o {
                list.clear();
            }
        }
        *self.open.borrow_mut() = open.to_vec();
    }

    /// Drops the idle connections of one slot (its backend left it).
    pub(crate) fn clear(&self, slot: usize) {
        if let Some(list) = self.idle.borrow_mut().get_mut(slot) {
            list.clear();
        }
    }

    /// The most recently used live connection (LIFO keeps few connections warm).
    pub(crate) fn take(&self, backend: usize) -> Option<UpConn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(backend)?;
        let now = Instant::now();
        while let Some(i) = list.pop() {
            if i.expires > now {
                let mut conn = i.conn;
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    }

    pub(crate) fn put(&self, backend: usize, mut conn: UpConn) {
        if self.max_idle == 0
            || !conn.buf.is_empty()
            || !self.open.borrow().get(backend).copied().unwrap_or(false)
        {
            return;
        }
        // Expire a second before the backend would, so we never send into its close.
        let ttl = match conn.keepalive_hint {
            Some(h) => self
                .idle_timeout
                .min(h.saturating_sub(Duration::from_secs(1))),
            None => self.idle_timeout,
        };
        if ttl.is_zero() {
            return;
        }
        conn.buf.clear();
        let mut idle = self.idle.borrow_mut();
        let Some(list) = idle.get_mut(backend) else {
            return;
        };
        if list.len() >= self.max_idle {
            list.remove(0);
        }
        list.push(Idle {
            conn,
            expires: crate::clock::deadline(ttl),
        });
    }

    /// Drops expired connections; called on the core's tick.
    pub(crate) fn prune(&self) {
        let now = Instant::now();
        for list in self.idle.borrow_mut().iter_mut() {
            list.retain(|i| i.expires > now);
        }
    }
}

/// Connects (and for an https backend, completes the TLS handshake), all under `timeout`. A
/// TLS failure is its own error: the request is never sent on such a connection.
pub(crate) async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&ClientTls>,
) -> Result<UpConn, ProxyError> {
    match monoio::time::timeout(timeout, open(addr, tls)).await {
        Ok(r) => r,
        Err(_) => Err(ProxyError::UpstreamConnectTimeout),
    }
}

async fn open(addr: SocketAddr, tls: Option<&ClientTls>) -> Result<UpConn, ProxyError> {
    let io = TcpStream::connect_addr(addr)
        .await
        .map_err(ProxyError::UpstreamConnect)?;
    // Tokens are tiny writes; Nagle would hold them back.
    let _ = io.set_nodelay(true);
    let (rd, wr) = match tls {
        None => {
            let (rd, wr) = io.into_split();
            (Reader::Plain(rd), Writer::Plain(wr))
        }
        Some(tls) => {
            let conn = ClientConnection::new(tls.config.clone(), tls.server_name.clone())
                .map_err(|e| ProxyError::UpstreamTlsHandshake(e.to_string()))?;
            let (rd, wr) = handshake(io, conn, false)
                .await
                .map_err(upstream_tls_error)?;
            (Reader::Tls(Box::new(rd)), Writer::Tls(Box::new(wr)))
        }
    };
    Ok(UpConn {
        rd,
        wr,
        buf: BytesMut::with_capacity(FIRST_READ),
        reused: false,
        keepalive_hint: None,
        room: ReadRoom::new(),
    })
}

impl UpConn {
    /// Writes the whole request, then waits for the response head. Informational (1xx) heads
    /// other than 101 are skipped.
    /// The request buffer is handed back so a retry can resend it without rebuilding it.
    pub(crate) async fn exchange(
        &mut self,
        request: Vec<u8>,
        first_byte: Duration,
        alarm: &mut Alarm,
    ) -> (Result<Head, ProxyError>, Vec<u8>) {
        let (res, request) = self.wr.write_all(request).await;
        if let Err(e) = res {
            return (Err(ProxyError::UpstreamClosed(e.to_string())), request);
        }
        let head = match alarm
            .within(Instant::now(), first_byte, self.read_head())
            .await
        {
            Ok(r) => r,
            Err(_) => Err(ProxyError::FirstByteTimeout(first_byte)),
        };
        (head, request)
    }

    async fn read_head(&mut self) -> Result<Head, ProxyError> {
        let mut received_any = false;
        loop {
            if !self.buf.is_empty() {
                match Head::parse_response(&mut self.buf) {
                    Ok(ParseStatus::Complete(head)) => {
                        if (100..200).contains(&head.status) && head.status != 101 {
                            continue;
                        }
                        self.keepalive_hint = keepalive_timeout(&head);
                        return Ok(head);
                    }
                    Ok(ParseStatus::Partial) => {
                        if self.buf.len() > MAX_RESPONSE_HEAD {
                            return Err(ProxyError::UpstreamProtocol(
                                "response head too large".into(),
                            ));
                        }
                    }
                    Err(e) => return Err(ProxyError::UpstreamProtocol(e.to_string())),
                }
            }
            self.make_room();
            let buf = std::mem::take(&mut self.buf);
            let (res, buf) = self.rd.read_more(buf).await;
            self.buf = buf;
            if let Ok(n) = res {
                self.after_read(n);
            }
            match res {
                Ok(0) if !received_any => {
                    return Err(ProxyError::UpstreamClosed("connection closed".into()))
                }
                Ok(0) => {
                    return Err(ProxyError::UpstreamProtocol(
                        "connection closed inside the response head".into(),
                    ))
                }
                Ok(_) => received_any = true,
                Err(e) if !received_any => return Err(ProxyError::UpstreamClosed(e.to_string())),
                Err(e) => return Err(ProxyError::UpstreamProtocol(e.to_string())),
            }
        }
    }
}

/// A failed handshake with a backend, as the error the client's 502 and the metrics name.
fn upstream_tls_error(e: HandshakeError) -> ProxyError {
    match e {
        HandshakeError::Tls(rustls::Error::InvalidCertificate(c)) => {
            ProxyError::UpstreamTlsCertificate(format!("{c:?}"))
        }
        HandshakeError::Io(e) => ProxyError::UpstreamTlsHandshake(e.to_string()),
        other => ProxyError::UpstreamTlsHandshake(other.to_string()),
    }
}

/// `Keep-Alive: timeout=5, max=100` → 5 s.
fn keepalive_timeout(head: &Head) -> Option<Duration> {
    let v = head.get_str(Name::KeepAlive)?;
    v.split(',').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        if k.trim().eq_ignore_ascii_case("timeout") {
            v.trim().parse::<u64>().ok().map(Duration::from_secs)
        } else {
            None
        }
    })
}

impl UpConn {
    /// Before a read: room for it (`ReadRoom`).
    pub(crate) fn make_room(&mut self) {
        self.room.make(&mut self.buf);
    }

    /// After a read of `n` bytes: a read that filled the buffer widens the next ones. (Not
    /// called for a slow stream's reads: its small buffer filling up says nothing of bursts.)
    pub(crate) fn after_read(&mut self, n: usize) {
        self.room.after(&self.buf, n);
    }

    /// Reads until the first `len` body bytes are buffered (an error response the proxy must
    /// look at before relaying it); they stay in `buf`, where relaying picks them up.
    pub(crate) async fn buffer_body(
        &mut self,
        len: usize,
        timeout: Duration,
    ) -> Result<&[u8], ProxyError> {
        while self.buf.len() < len {
            let buf = std::mem::take(&mut self.buf);
            match monoio::time::timeout(timeout, self.rd.read_more(buf)).await {
                Ok((Ok(n), buf)) => {
                    self.buf = buf;
                    if n == 0 {
                        return Err(ProxyError::UpstreamClosed("closed mid-body".into()));
                    }
                }
                Ok((Err(e), buf)) => {
                    self.buf = buf;
                    return Err(ProxyError::UpstreamClosed(e.to_string()));
                }
                Err(_) => return Err(ProxyError::FirstByteTimeout(timeout)),
            }
        }
        Ok(&self.buf[..len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `n` bytes into `buf` as a socket would (into its spare room), then tells `room`.
    fn read(room: &mut ReadRoom, buf: &mut BytesMut, n: usize) -> usize {
        room.make(buf);
        let n = n.min(buf.capacity() - buf.len());
        buf.extend_from_slice(&vec![b'x'; n]);
        room.after(buf, n);
        n
    }

    #[test]
    fn reads_widen_only_while_they_fill_the_buffer() {
        let mut room = ReadRoom::new();
        let mut buf = BytesMut::with_capacity(FIRST_READ);
        // A 6 KB burst: the first read fills a page and leaves the rest waiting.
        assert_eq!(read(&mut room, &mut buf, 6000), FIRST_READ);
        assert_eq!(room, ReadRoom(2 * FIRST_READ));
        buf.clear();
        // The next burst of the same size is read whole, and the room stays as it is.
        assert_eq!(read(&mut room, &mut buf, 6000), 6000);
        assert_eq!(room, ReadRoom(2 * FIRST_READ));
        // Bursts that keep filling it widen it up to MAX_READ, and no further.
        for _ in 0..6 {
            buf.clear();
            read(&mut room, &mut buf, 1 << 20);
        }
        assert_eq!(room, ReadRoom(MAX_READ));
        assert!(buf.capacity() <= 2 * MAX_READ, "{}", buf.capacity());
        // Small reads leave a fresh connection's page as it is.
        let mut room = ReadRoom::new();
        let mut buf = BytesMut::with_capacity(FIRST_READ);
        for _ in 0..4 {
            buf.clear();
            read(&mut room, &mut buf, 300);
        }
        assert_eq!(room, ReadRoom::new());
        assert_eq!(buf.capacity(), FIRST_READ);
    }
}
