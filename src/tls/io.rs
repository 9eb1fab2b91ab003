//! A connection's two halves, plaintext or TLS, as the request path uses them (`read_more`, a
//! cancellable read for the client watch, `write_all`).
//!
//! An enum, not generics over the stream type: the request path (conn, forward, relay, answer)
//! stays one copy of code. The TLS futures are boxed, so the plaintext arm's futures, which are
//! inlined into every connection's future, keep their size: the TLS arm costs an allocation per
//! read or write, small next to the record's encryption. The methods return an `Either` of the
//! two futures rather than being `async fn`s: an `async fn` wrapper keeps its own copy of the
//! buffer and a state tag beside the inner future, at every level that awaits it, which made
//! every connection's future 128 bytes larger.

use std::future::Future;
use std::io;

use futures_util::future::Either;
use futures_util::FutureExt;

use bytes::BytesMut;
use monoio::buf::SliceMut;
use monoio::io::{
    AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent, OwnedReadHalf, OwnedWriteHalf,
};
use monoio::net::TcpStream;
use std::ops::{Deref, DerefMut};

use rustls::{ClientConnection, ConnectionCommon, ServerConnection, SideData};

use super::stream::{TlsRead, TlsWrite};
use crate::http1::io::{read_more, read_with_room};

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
    C: DerefMut + Deref<Target = ConnectionCommon<SD>> + 'static,
    SD: SideData + 'static,
{
    /// Reads once, appending to `buf` (0 = EOF).
    pub(crate) fn read_more(
        &mut self,
        buf: BytesMut,
    ) -> impl Future<Output = (io::Result<usize>, BytesMut)> + '_ {
        match self {
            Reader::Plain(r) => Either::Left(read_more(r, buf)),
            Reader::Tls(t) => Either::Right(Box::pin(t.read_more(buf))),
        }
    }

    /// Reads once into the room `buf` already has when it is at least `min_room` (else it grows
    /// by a page first, as `read_more` does). Over TLS this is the plaintext buffer (the socket
    /// read goes to the ciphertext buffer, which keeps its size).
    pub(crate) fn read_with_room(
        &mut self,
        buf: BytesMut,
        min_room: usize,
    ) -> impl Future<Output = (io::Result<usize>, BytesMut)> + '_ {
        match self {
            Reader::Plain(r) => Either::Left(read_with_room(r, buf, min_room)),
            Reader::Tls(t) => Either::Right(Box::pin(t.read_with_room(buf, min_room))),
        }
    }

    /// One read that `cancel` can cancel; bytes that arrived before are kept in `buf`.
    pub(crate) fn cancelable_read_more(
        &mut self,
        buf: BytesMut,
        cancel: CancelHandle,
    ) -> impl Future<Output = (io::Result<usize>, BytesMut)> + '_ {
        match self {
            Reader::Plain(r) => {
                let (len, cap) = (buf.len(), buf.capacity());
                let read = r.cancelable_read(SliceMut::new(buf, len, cap), cancel);
                Either::Left(read.map(|(res, slice)| (res, slice.into_inner())))
            }
            Reader::Tls(t) => Either::Right(Box::pin(t.cancelable_read_more(buf, cancel))),
        }
    }
}

impl<C, SD> Writer<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>> + 'static,
    SD: SideData + 'static,
{
    /// Writes all of `buf`, handing it back.
    pub(crate) fn write_all<B>(
        &mut self,
        buf: B,
    ) -> impl Future<Output = (io::Result<usize>, B)> + '_
    where
        B: monoio::buf::IoBuf + AsRef<[u8]> + 'static,
    {
        match self {
            Writer::Plain(w) => Either::Left(w.write_all(buf)),
            Writer::Tls(t) => Either::Right(Box::pin(t.write_all(buf))),
        }
    }
}
