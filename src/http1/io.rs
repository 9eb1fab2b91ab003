//! Socket helpers shared by the downstream and upstream sides.

use bytes::{Buf, Bytes, BytesMut};
use monoio::buf::SliceMut;
use monoio::io::AsyncReadRent;

/// Grows the buffer so a read has room for a typical burst (an LLM response chunk or a request
/// head) without a second syscall. A page, like nginx's default proxy buffer: every connection
/// holds one, and with thousands of streams open, larger buffers were most of the memory.
const READ_RESERVE: usize = 4 * 1024;

/// `read_more` grows the buffer first when it has less room than this.
pub(crate) const READ_ROOM: usize = READ_RESERVE / 2;

/// Reads once, appending to `buf`. Returns the number of bytes read (0 = EOF). (A plain fn
/// returning the inner future: an `async fn` wrapper would add its own state to every future
/// that awaits it.)
pub fn read_more<R: AsyncReadRent>(
    io: &mut R,
    buf: BytesMut,
) -> impl std::future::Future<Output = (std::io::Result<usize>, BytesMut)> + '_ {
    read_with_room(io, buf, READ_ROOM)
}

/// Reads once into `buf`'s spare room, appending; the buffer grows by a page first only when
/// that room is below `min_room`. A small `min_room` lets a caller wait in a small buffer it
/// chose (a slow stream waiting for its next token), where `read_more` would grow it to a page.
pub async fn read_with_room<R: AsyncReadRent>(
    io: &mut R,
    mut buf: BytesMut,
    min_room: usize,
) -> (std::io::Result<usize>, BytesMut) {
    if buf.capacity() - buf.len() < min_room.max(1) {
        buf.reserve(READ_RESERVE);
    }
    let len = buf.len();
    let cap = buf.capacity();
    let (res, slice) = io.read(SliceMut::new(buf, len, cap)).await;
    (res, slice.into_inner())
}

/// The first `n` bytes of `buf` as their own allocation, consumed from `buf`. A copy, not a
/// split: a split shares the read buffer's allocation for as long as the part lives (a head or
/// body lives for the whole request or stream), so the next read needed a fresh buffer — a
/// second page per open stream on each side, and a page allocated per request.
pub fn take_copy(buf: &mut BytesMut, n: usize) -> Bytes {
    let part = Bytes::copy_from_slice(&buf[..n]);
    buf.advance(n);
    part
}
