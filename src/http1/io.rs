//! Socket helpers shared by the downstream and upstream sides.

use bytes::{Buf, Bytes, BytesMut};
use monoio::buf::SliceMut;
use monoio::io::AsyncReadRent;

/// Grows the buffer so a read has room for a typical burst (an LLM response chunk or a request
/// head) without a second syscall. A page, like nginx's default proxy buffer: every connection
/// holds one, and with thousands of streams open, larger buffers were most of the memory.
const READ_RESERVE: usize = 4 * 1024;

/// Reads once, appending to `buf`. Returns the number of bytes read (0 = EOF).
pub async fn read_more<R: AsyncReadRent>(
    io: &mut R,
    mut buf: BytesMut,
) -> (std::io::Result<usize>, BytesMut) {
    if buf.capacity() - buf.len() < READ_RESERVE / 2 {
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
