//! A connection's two halves, plaintext or TLS, as the request path uses them (`read_more`, a
//! cancellable read for the client watch, `write_all`).
//!
//! An enum, not generics over the stream type: the request path (conn, forward, relay, answer)
//! stays one copy of code. The TLS futures are boxed, so the plaintext arm's futures, which are
//! inlined into every connection's future, keep their size: the TLS arm costs an allocation per
//! read or write, small next to the record's encryption.

use std::io;

use bytes::BytesMut;
use monoio::buf::SliceMut;
use monoio::io::{
    AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent, OwnedReadHalf, OwnedWriteHalf,
};
use monoio::net::TcpStream;
use std::ops::{Deref, DerefMut};

use rustls::{ClientConnection, ConnectionCommon, ServerConnection, SideData};

use super::stream::{TlsRead, TlsWrite};
use crate::http1::io::read_more;

pub(crate) enum Reader<C> {
    Plain(OwnedReadHalf<TcpStream>),
    Tls(Box<TlsRead<C>>),
}

pub(crate) enum Writer<C> {
    Plain(OwnedWriteHalf<TcpStream>),
    Tls(Box<TlsWrite<C>>),
}

/// The client side of a downstream connection.
pub(crate) type ClientReader = Reader<ServerConnection>;
pub(crate) type ClientWriter = Writer<ServerConnection>;
/// A connection to a backend.
pub(crate) type BackendReader = Reader<ClientConnection>;
pub(crate) type BackendWriter = Writer<ClientConnection>;

impl<C, SD> Reader<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>>,
    SD: SideData,
{
    /// Reads once, appending to `buf` (0 = EOF).
    pub(crate) async fn read_more(&mut self, buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        match self {
            Reader::Plain(r) => read_more(r, buf).await,
            Reader::Tls(t) => Box::pin(t.read_more(buf)).await,
        }
    }

    /// One read that `cancel` can cancel; bytes that arrived before are kept in `buf`.
    pub(crate) async fn cancelable_read_more(
        &mut self,
        buf: BytesMut,
        cancel: CancelHandle,
    ) -> (io::Result<usize>, BytesMut) {
        match self {
            Reader::Plain(r) => {
                let (len, cap) = (buf.len(), buf.capacity());
                let (res, slice) = r
                    .cancelable_read(SliceMut::new(buf, len, cap), cancel)
                    .await;
                (res, slice.into_inner())
            }
            Reader::Tls(t) => Box::pin(t.cancelable_read_more(buf, cancel)).await,
        }
    }
}

impl<C, SD> Writer<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>>,
    SD: SideData,
{
    /// Writes all of `buf`, handing it back.
    pub(crate) async fn write_all<B>(&mut self, buf: B) -> (io::Result<usize>, B)
    where
        B: monoio::buf::IoBuf + AsRef<[u8]>,
    {
        match self {
            Writer::Plain(w) => w.write_all(buf).await,
            Writer::Tls(t) => Box::pin(t.write_all(buf)).await,
        }
    }
}
