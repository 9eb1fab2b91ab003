//! A TLS connection driven by hand: rustls' `ConnectionCommon` (the state machine, no I/O) over
//! monoio's owned-buffer socket halves. Not `monoio-rustls`: its 0.4 (rustls 0.23, monoio 0.2)
//! has no cancellable read, which the client watch needs (a read is cancelled and awaited, so
//! a pipelined request is never lost), and a read or write future dropped mid-I/O (a timeout)
//! leaves its buffer taken, so the next read on that stream panics; implementing monoio's I/O
//! traits here would need `unsafe` (raw buffer pointers), and the crate forbids it. So: the
//! rustls session is shared by the two halves in an `Rc<RefCell>` that is only borrowed between
//! awaits, and each half owns monoio's safe `OwnedReadHalf`/`OwnedWriteHalf` of the socket.
//!
//! Invariants: plaintext is copied out of rustls only into the caller's buffer; ciphertext read
//! from the socket and not yet taken by rustls stays in `raw` (never dropped); a write encrypts
//! everything it is given before its one socket write (the send buffer limit is off), so a
//! write future dropped mid-flight loses that write only, and its connection is closed anyway.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::ops::{Deref, DerefMut};
use std::rc::Rc;

use bytes::{Buf, BytesMut};
use monoio::buf::SliceMut;
use monoio::io::{
    AsyncReadRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent, OwnedReadHalf,
    OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;
use rustls::{ConnectionCommon, SideData};

/// Ciphertext read size: a TLS record is at most 16 KiB + overhead; a page per read is what the
/// plaintext path uses too, and small reads only cost another read when a record is larger.
const RAW_RESERVE: usize = 4 * 1024;

/// The first byte of a TLS handshake record. Anything else as the very first byte on a TLS
/// listener is a client speaking plaintext (or not TLS at all).
const HANDSHAKE_RECORD: u8 = 0x16;

/// Why a handshake failed, kept apart so metrics and upstream errors can name the reason.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    Io(io::Error),
    /// The peer closed before the handshake finished.
    Eof,
    /// The first byte was not a TLS handshake record (a plaintext request on a TLS port).
    NotTls,
    /// rustls refused: bad certificate, unknown CA, name mismatch, alert from the peer, ...
    Tls(rustls::Error),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Io(e) => write!(f, "TLS handshake: {e}"),
            HandshakeError::Eof => f.write_str("TLS handshake: peer closed the connection"),
            HandshakeError::NotTls => f.write_str("not a TLS client (plaintext on a TLS port)"),
            HandshakeError::Tls(e) => write!(f, "TLS handshake: {e}"),
        }
    }
}

/// The read half of a TLS connection.
pub(crate) struct TlsRead<C> {
    io: OwnedReadHalf<TcpStream>,
    tls: Rc<RefCell<C>>,
    /// Ciphertext read from the socket that rustls has not taken yet.
    raw: BytesMut,
    /// The socket reached EOF (told to rustls once `raw` is drained).
    eof: bool,
}

/// The write half of a TLS connection.
pub(crate) struct TlsWrite<C> {
    io: OwnedWriteHalf<TcpStream>,
    tls: Rc<RefCell<C>>,
    /// Ciphertext staging buffer, kept between writes.
    spare: Vec<u8>,
}

/// Splits the socket, runs the handshake to completion and returns the two halves. `server`:
/// the first byte must start a TLS handshake record (else `NotTls`, without feeding rustls).
pub(crate) async fn handshake<C, SD>(
    io: TcpStream,
    conn: C,
    server: bool,
) -> Result<(TlsRead<C>, TlsWrite<C>), HandshakeError>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>>,
    SD: SideData,
{
    let (rd, wr) = io.into_split();
    let tls = Rc::new(RefCell::new(conn));
    tls.borrow_mut().set_buffer_limit(None);
    let mut r = TlsRead {
        io: rd,
        tls: tls.clone(),
        raw: BytesMut::new(),
        eof: false,
    };
    let mut w = TlsWrite {
        io: wr,
        tls,
        spare: Vec::new(),
    };
    let mut first = server;
    loop {
        w.flush().await.map_err(HandshakeError::Io)?;
        if !r.tls.borrow().is_handshaking() {
            return Ok((r, w));
        }
        if r.raw.is_empty() {
            let (res, _) = r.read_socket(None).await;
            match res {
                Ok(0) => return Err(HandshakeError::Eof),
                Ok(_) => {}
                Err(e) => return Err(HandshakeError::Io(e)),
            }
        }
        if first {
            first = false;
            if r.raw.first() != Some(&HANDSHAKE_RECORD) {
                return Err(HandshakeError::NotTls);
            }
        }
        if let Err(e) = r.feed() {
            // The alert rustls queued tells the peer why; best effort.
            let _ = w.flush().await;
            return Err(match e.into_inner() {
                Some(inner) => match inner.downcast::<rustls::Error>() {
                    Ok(tls) => HandshakeError::Tls(*tls),
                    Err(other) => HandshakeError::Io(io::Error::other(other)),
                },
                None => HandshakeError::Eof,
            });
        }
    }
}

impl<C, SD> TlsRead<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>>,
    SD: SideData,
{
    /// Reads once from the socket into `raw` (cancellable through `cancel`).
    async fn read_socket(&mut self, cancel: Option<CancelHandle>) -> (io::Result<usize>, ()) {
        let mut raw = std::mem::take(&mut self.raw);
        if raw.capacity() - raw.len() < RAW_RESERVE / 2 {
            raw.reserve(RAW_RESERVE);
        }
        let (len, cap) = (raw.len(), raw.capacity());
        let slice = SliceMut::new(raw, len, cap);
        let (res, slice) = match cancel {
            Some(h) => self.io.cancelable_read(slice, h).await,
            None => self.io.read(slice).await,
        };
        self.raw = slice.into_inner();
        if let Ok(0) = res {
            self.eof = true;
        }
        (res, ())
    }

    /// Hands buffered ciphertext (and a seen EOF) to rustls and decrypts what it can. Stops
    /// early when rustls' plaintext buffer is full; the rest stays in `raw`.
    fn feed(&mut self) -> io::Result<()> {
        let mut tls = self.tls.borrow_mut();
        loop {
            if self.raw.is_empty() {
                if self.eof {
                    // A zero-length read tells rustls the peer closed.
                    let _ = tls.read_tls(&mut io::empty());
                    tls.process_new_packets().map_err(io::Error::other)?;
                }
                return Ok(());
            }
            let mut src: &[u8] = &self.raw;
            let n = match tls.read_tls(&mut src) {
                Ok(n) => n,
                // Plaintext buffer full: take plaintext first, feed the rest later.
                Err(_) if !self.raw.is_empty() => return Ok(()),
                Err(e) => return Err(e),
            };
            self.raw.advance(n);
            tls.process_new_packets().map_err(io::Error::other)?;
            if n == 0 {
                return Ok(());
            }
        }
    }

    /// Moves decrypted bytes into `buf`; `None` when rustls has none yet. EOF (with or without
    /// the peer's close_notify) reads as 0, like a plain socket.
    fn take_plaintext(&mut self, buf: &mut BytesMut) -> io::Result<Option<usize>> {
        let mut tls = self.tls.borrow_mut();
        if buf.capacity() == buf.len() {
            buf.reserve(RAW_RESERVE);
        }
        let start = buf.len();
        buf.resize(buf.capacity(), 0);
        let res = tls.reader().read(&mut buf[start..]);
        match res {
            Ok(n) => {
                buf.truncate(start + n);
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                buf.truncate(start);
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                buf.truncate(start);
                Ok(Some(0))
            }
            Err(e) => {
                buf.truncate(start);
                Err(e)
            }
        }
    }

    /// Reads once, appending plaintext to `buf` (0 = EOF), like `http1::io::read_more`.
    pub(crate) async fn read_more(&mut self, buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        self.read_with_room(buf, RAW_RESERVE / 2).await
    }

    /// `read_more` that grows `buf` only when it has less room than `min_room`, like
    /// `http1::io::read_with_room` (a slow stream's small buffer stays small).
    pub(crate) async fn read_with_room(
        &mut self,
        mut buf: BytesMut,
        min_room: usize,
    ) -> (io::Result<usize>, BytesMut) {
        if buf.capacity() - buf.len() < min_room.max(1) {
            buf.reserve(RAW_RESERVE);
        }
        self.read_inner(buf, None).await
    }

    /// `read_more` whose socket read `cancel` can cancel; ciphertext that arrived before the
    /// cancellation is kept (decrypted into `buf` if a whole record came).
    pub(crate) async fn cancelable_read_more(
        &mut self,
        buf: BytesMut,
        cancel: CancelHandle,
    ) -> (io::Result<usize>, BytesMut) {
        self.read_inner(buf, Some(cancel)).await
    }

    async fn read_inner(
        &mut self,
        mut buf: BytesMut,
        cancel: Option<CancelHandle>,
    ) -> (io::Result<usize>, BytesMut) {
        loop {
            match self.take_plaintext(&mut buf) {
                Ok(Some(n)) => return (Ok(n), buf),
                Ok(None) => {}
                Err(e) => return (Err(e), buf),
            }
            if !self.raw.is_empty() {
                let before = self.raw.len();
                if let Err(e) = self.feed() {
                    return (Err(e), buf);
                }
                if self.raw.len() != before {
                    continue;
                }
            }
            if self.eof {
                // rustls was told; no plaintext will come.
                return (Ok(0), buf);
            }
            let (res, ()) = self.read_socket(cancel.clone()).await;
            if let Err(e) = res {
                return (Err(e), buf);
            }
            if let Err(e) = self.feed() {
                return (Err(e), buf);
            }
        }
    }
}

impl<C, SD> TlsWrite<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>>,
    SD: SideData,
{
    /// Sends whatever rustls has queued (handshake messages, alerts, records).
    async fn flush(&mut self) -> io::Result<()> {
        let mut out = std::mem::take(&mut self.spare);
        {
            let mut tls = self.tls.borrow_mut();
            while tls.wants_write() {
                tls.write_tls(&mut out)?;
            }
        }
        if out.is_empty() {
            self.spare = out;
            return Ok(());
        }
        let (res, mut out) = self.io.write_all(out).await;
        out.clear();
        self.spare = out;
        res.map(|_| ())
    }

    /// Encrypts all of `data` and writes it; the buffer is handed back like monoio's.
    pub(crate) async fn write_all<B: AsRef<[u8]>>(&mut self, data: B) -> (io::Result<usize>, B) {
        let len = data.as_ref().len();
        if let Err(e) = self.tls.borrow_mut().writer().write_all(data.as_ref()) {
            return (Err(e), data);
        }
        (self.flush().await.map(|_| len), data)
    }
}
