//! The mock's response framing, written with `crate::http1::write` (the proxy's own head and
//! chunk writer) so that the crate holds one copy of HTTP/1.1 framing. What this module adds is
//! only what a test backend says and the proxy never does: `keep-alive: timeout=S`, the explicit
//! `connection: keep-alive` of HTTP/1.0 and bodies delimited by closing the connection.
//!
//! It never builds broken framing: the bytes that are deliberately not HTTP live with the faults
//! that send them (`hooks`, cut off in `answer`). It must not allocate per chunk: a response owns
//! one `Out` buffer that every write of it reuses (the load benchmark streams tens of thousands
//! of events a second through the mock).

use std::time::Duration;

use http::Version;
use monoio::{
    io::{AsyncWriteRentExt, OwnedWriteHalf},
    net::TcpStream,
};
use serde_json::{json, Value};

use crate::http1::{write as h1, BodyFraming};

pub(super) type Writer = OwnedWriteHalf<TcpStream>;

/// A write failed: the client is gone.
pub(super) struct PeerGone;

/// Room for a head or one SSE event with its chunk frame, so a stream allocates once.
const OUT_CAPACITY: usize = 512;

/// The output of one response: bytes are framed into `buf`, written by `flush`, and the buffer
/// comes back empty for the next write.
pub(super) struct Out<'w> {
    writer: &'w mut Writer,
    pub(super) buf: Vec<u8>,
}

impl<'w> Out<'w> {
    pub(super) fn new(writer: &'w mut Writer) -> Self {
        Self {
            writer,
            buf: Vec::with_capacity(OUT_CAPACITY),
        }
    }

    /// Writes all of `buf` in one `write_all`; each flush is one write the client can observe.
    pub(super) async fn flush(&mut self) -> Result<(), PeerGone> {
        let (result, mut buf) = self.writer.write_all(std::mem::take(&mut self.buf)).await;
        buf.clear();
        self.buf = buf;
        result.map(|_| ()).map_err(|_| PeerGone)
    }
}

/// A complete, immediately known response.
#[derive(Debug, Clone)]
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) content_type: &'static str,
    pub(super) headers: Vec<(&'static str, String)>,
    pub(super) body: Vec<u8>,
}

impl Reply {
    pub(super) fn json(status: u16, value: &Value) -> Self {
        Self {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body: value.to_string().into_bytes(),
        }
    }

    /// An OpenAI-shaped error.
    pub(super) fn error(status: u16, message: &str) -> Self {
        Self::json(status, &error_body(status, message))
    }

    /// Head and body with `Content-Length` (or no body where the status forbids one).
    pub(super) fn encode(&self, out: &mut Vec<u8>, head_only: bool, conn: ConnHeader) {
        let framing = if has_no_body(self.status) {
            BodyFraming::Empty
        } else {
            BodyFraming::Length(self.body.len() as u64)
        };
        response_head(
            out,
            self.status,
            self.content_type,
            &self.headers,
            framing,
            conn,
        );
        if !head_only && framing != BodyFraming::Empty {
            out.extend_from_slice(&self.body);
        }
    }
}

fn error_body(status: u16, message: &str) -> Value {
    let kind = if (400..500).contains(&status) {
        "invalid_request_error"
    } else {
        "server_error"
    };
    json!({"error": {"message": message, "type": kind, "param": null, "code": status}})
}

pub(super) fn has_no_body(status: u16) -> bool {
    status == 204 || status == 304 || status < 200
}

/// Appends a response head. `content-type` is left out when there is no body.
pub(super) fn response_head(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    extra: &[(&'static str, String)],
    framing: BodyFraming,
    conn: ConnHeader,
) {
    h1::status_line(out, status, "");
    if framing != BodyFraming::Empty {
        h1::header(out, "content-type", content_type.as_bytes());
    }
    match framing {
        BodyFraming::Empty | BodyFraming::UntilClose => {}
        BodyFraming::Length(n) => h1::header_num(out, "content-length", n),
        BodyFraming::Chunked => h1::header(out, "transfer-encoding", b"chunked"),
    }
    for (name, value) in extra {
        h1::header(out, name, value.as_bytes());
    }
    match conn {
        _ if framing == BodyFraming::UntilClose => h1::header(out, "connection", b"close"),
        ConnHeader::Close => h1::header(out, "connection", b"close"),
        ConnHeader::KeepAlive { explicit, timeout } => {
            if explicit || timeout.is_some() {
                h1::header(out, "connection", b"keep-alive");
            }
            if let Some(limit) = timeout {
                // Only under `x-mock-keepalive-timeout-ms`: not worth a formatter of its own.
                let value = format!("timeout={}", limit.as_secs());
                h1::header(out, "keep-alive", value.as_bytes());
            }
        }
    }
    h1::end_head(out);
}

/// What a response head says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnHeader {
    Close,
    /// `explicit`: say `connection: keep-alive` (HTTP/1.0 clients need it); `timeout`: advertise
    /// `keep-alive: timeout=S` (`x-mock-keepalive-timeout-ms`).
    KeepAlive {
        explicit: bool,
        timeout: Option<Duration>,
    },
}

impl ConnHeader {
    pub(super) fn for_request(version: Version, close: bool, timeout: Option<Duration>) -> Self {
        if close {
            Self::Close
        } else {
            Self::KeepAlive {
                explicit: version == Version::HTTP_10,
                timeout,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(reply: &Reply, head_only: bool, conn: ConnHeader) -> String {
        let mut out = Vec::new();
        reply.encode(&mut out, head_only, conn);
        String::from_utf8(out).expect("utf8")
    }

    #[test]
    fn heads() {
        let mut head = Vec::new();
        response_head(
            &mut head,
            200,
            "text/event-stream",
            &[],
            BodyFraming::Chunked,
            ConnHeader::for_request(Version::HTTP_11, false, Some(Duration::from_millis(5500))),
        );
        let head = String::from_utf8(head).expect("utf8");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(head.contains("transfer-encoding: chunked\r\n"));
        assert!(head.contains("keep-alive: timeout=5\r\n"));
        assert!(head.ends_with("\r\n\r\n"));

        let wire = encoded(&Reply::error(503, "down"), false, ConnHeader::Close);
        assert!(wire.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(wire.contains("connection: close\r\n"));
        let body = wire.split("\r\n\r\n").nth(1).expect("body");
        let v: Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["error"]["code"], 503);
        assert_eq!(v["error"]["type"], "server_error");

        let implicit = ConnHeader::for_request(Version::HTTP_11, false, None);
        let wire = encoded(&Reply::json(200, &json!({})), false, implicit);
        assert!(!wire.contains("connection:"), "{wire}");
        let http10 = ConnHeader::for_request(Version::HTTP_10, false, None);
        let wire = encoded(&Reply::json(200, &json!({})), true, http10);
        assert!(wire.contains("connection: keep-alive\r\n") && wire.ends_with("\r\n\r\n"));

        let no_body = encoded(
            &Reply::error(204, "x"),
            false,
            ConnHeader::for_request(Version::HTTP_11, false, None),
        );
        assert_eq!(no_body, "HTTP/1.1 204 No Content\r\n\r\n");
    }

    #[test]
    fn extra_headers_and_exact_length() {
        let mut reply = Reply::json(200, &json!({"a": 1}));
        reply.headers = vec![("x-generated-tokens", "2".to_string())];
        let wire = encoded(&reply, false, ConnHeader::Close);
        assert_eq!(
            wire,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\
             x-generated-tokens: 2\r\nconnection: close\r\n\r\n{\"a\":1}"
        );
    }
}
