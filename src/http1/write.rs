//! Serialising heads and chunk framing into byte buffers. The proxy writes every response head
//! and every chunk header itself, so a token leaves in the same write that carries it.

use std::io::Write;

pub fn status_line(out: &mut Vec<u8>, status: u16, reason: &str) {
    let reason = if reason.is_empty() {
        http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Unknown")
    } else {
        reason
    };
    let _ = write!(out, "HTTP/1.1 {status} {reason}\r\n");
}

pub fn header(out: &mut Vec<u8>, name: impl AsRef<[u8]>, value: &[u8]) {
    out.extend_from_slice(name.as_ref());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

pub fn header_num(out: &mut Vec<u8>, name: &str, value: u64) {
    let _ = write!(out, "{name}: {value}\r\n");
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
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
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
    }
}
