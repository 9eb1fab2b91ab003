//! Serialising heads and chunk framing into byte buffers. The proxy writes every response head
//! and every chunk header itself, so a token leaves in the same write that carries it.

use crate::encode::{decimal, hex};

/// The reason phrase is bytes: a relayed one is written as it came (httparse checked it),
/// without a UTF-8 check per response.
pub fn status_line(out: &mut Vec<u8>, status: u16, reason: impl AsRef<[u8]>) {
    let reason = reason.as_ref();
    let reason = if reason.is_empty() {
        http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Unknown")
            .as_bytes()
    } else {
        reason
    };
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(decimal(u64::from(status), &mut [0; 20]));
    out.push(b' ');
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
}

pub fn header(out: &mut Vec<u8>, name: impl AsRef<[u8]>, value: &[u8]) {
    out.extend_from_slice(name.as_ref());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A header line kept whole from a parsed head (`Head::lines_except`): one copy.
pub fn line(out: &mut Vec<u8>, line: &[u8]) {
    out.extend_from_slice(line);
    out.extend_from_slice(b"\r\n");
}

pub fn header_num(out: &mut Vec<u8>, name: &str, value: u64) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(decimal(value, &mut [0; 20]));
    out.extend_from_slice(b"\r\n");
}

pub fn end_head(out: &mut Vec<u8>) {
    out.extend_from_slice(b"\r\n");
}

/// Appends one complete chunk (`size CRLF data CRLF`). Empty data is skipped: a zero-size
/// chunk would end the body.
pub fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(hex(data.len() as u64, &mut [0; 16]));
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Frames `out[start..]` as one chunk (its header moved in front of it): for a body whose
/// pieces are appended first and framed once their total is known. Nothing when it is empty.
/// One growth for both framings and one move of the data (`Vec::splice`, which did the same
/// through an iterator and its drop, cost about 200 instructions a chunk under callgrind).
pub fn frame_chunk_from(out: &mut Vec<u8>, start: usize) {
    let end = out.len();
    let len = end.saturating_sub(start);
    if len == 0 {
        return;
    }
    let mut digits = [0; 16];
    let size = hex(len as u64, &mut digits);
    let head = size.len() + 2;
    out.reserve(head + 2);
    out.resize(end + head, 0);
    out.copy_within(start..end, start + head);
    out[start..start + size.len()].copy_from_slice(size);
    out[start + size.len()..start + head].copy_from_slice(b"\r\n");
    out.extend_from_slice(b"\r\n");
}

pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        let mut v = Vec::new();
        status_line(&mut v, 404, "");
        header_num(&mut v, "content-length", 3);
        end_head(&mut v);
        chunk(&mut v, b"hello world, this is 26 b.");
        chunk(&mut v, b"");
        v.extend_from_slice(LAST_CHUNK);
        assert_eq!(
            String::from_utf8(v).unwrap(),
            "HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\n1a\r\nhello world, this is 26 b.\r\n0\r\n\r\n"
        );
        let mut v = Vec::new();
        status_line(&mut v, 200, "OK");
        header_num(&mut v, "x", u64::MAX);
        header_num(&mut v, "y", 0);
        chunk(&mut v, &[b'a'; 0x100]);
        let text = String::from_utf8(v).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nx: 18446744073709551615\r\ny: 0\r\n100\r\naa"));
    }

    #[test]
    fn a_chunk_framed_after_its_bytes() {
        let mut v = b"head".to_vec();
        v.extend_from_slice(&[b'x'; 300]);
        frame_chunk_from(&mut v, 4);
        let mut want = b"head12c\r\n".to_vec();
        want.extend_from_slice(&[b'x'; 300]);
        want.extend_from_slice(b"\r\n");
        assert_eq!(v, want);
        let mut v = b"head".to_vec();
        frame_chunk_from(&mut v, 4);
        assert_eq!(v, b"head");
        // The same bytes as `chunk` writes, at every size around a digit more, after any prefix
        // and whatever room the buffer had.
        for len in (1..=300).chain([4095, 4096, 4097, 65535, 65536]) {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for (prefix, room) in [(0, 0), (3, 0), (3, 2), (17, 64)] {
                let mut v = Vec::with_capacity(prefix + len + room);
                v.extend(std::iter::repeat_n(b'p', prefix));
                let mut want = v.clone();
                v.extend_from_slice(&data);
                frame_chunk_from(&mut v, prefix);
                chunk(&mut want, &data);
                assert_eq!(v, want, "len {len}, prefix {prefix}, room {room}");
            }
        }
    }
}
