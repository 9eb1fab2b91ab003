//! `plan_response` table: framing, reframing, what the tap removes, keep-alive, for each kind of
//! client and upstream head; `Body::drain` at every read size; the slow stream's buffer; the
//! client watch.

use bytes::BytesMut;

use super::*;
use crate::http1::ParseStatus;

fn upstream(raw: &str) -> Head {
    let mut buf = BytesMut::from(raw);
    match Head::parse_response(&mut buf) {
        Ok(ParseStatus::Complete(head)) => head,
        _ => panic!("not a complete response head: {raw:?}"),
    }
}

fn client<'a>(method: &'a str, http11: bool) -> ClientSide<'a> {
    ClientSide {
        method,
        path: "/v1/chat/completions",
        http11,
        request_id: "rid-1",
        strip: (false, false),
        timings: false,
        close: false,
    }
}

const SSE_CHUNKED: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
const SSE_LENGTH: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 120\r\n\r\n";
const JSON_LENGTH: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 42\r\nx-request-id: theirs\r\n\r\n";

/// One row: what the client is, what the backend answered, and what the client must get.
struct Row {
    name: &'static str,
    client: ClientSide<'static>,
    upstream: &'static str,
    framing: BodyFraming,
    reframe: bool,
    close: bool,
    reusable: bool,
    /// Header lines the client's head must carry, and must not.
    has: &'static [&'static str],
    lacks: &'static [&'static str],
}

#[test]
fn response_heads_follow_the_framing_rules() {
    let strip = ClientSide {
        strip: (true, true),
        ..client("POST", true)
    };
    let strip_10 = ClientSide {
        strip: (true, true),
        ..client("POST", false)
    };
    let draining = ClientSide {
        close: true,
        ..client("POST", true)
    };
    let rows = [
        Row {
            name: "HEAD keeps the length it would have had, sends no body",
            client: client("HEAD", true),
            upstream: "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            framing: BodyFraming::Empty,
            reframe: false,
            close: false,
            reusable: true,
            has: &["content-length: 5"],
            lacks: &["transfer-encoding"],
        },
        Row {
            name: "204 carries no length",
            client: client("POST", true),
            upstream: "HTTP/1.1 204 No Content\r\n\r\n",
            framing: BodyFraming::Empty,
            reframe: false,
            close: false,
            reusable: true,
            has: &["HTTP/1.1 204"],
            lacks: &["content-length", "transfer-encoding"],
        },
        Row {
            name: "304 carries no length",
            client: client("GET", true),
            upstream: "HTTP/1.1 304 Not Modified\r\n\r\n",
            framing: BodyFraming::Empty,
            reframe: false,
            close: false,
            reusable: true,
            has: &["HTTP/1.1 304"],
            lacks: &["content-length", "transfer-encoding"],
        },
        Row {
            name: "1xx carries no length",
            client: client("POST", true),
            upstream: "HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n",
            framing: BodyFraming::Empty,
            reframe: false,
            close: false,
            reusable: true,
            has: &["HTTP/1.1 103", "link: </x>"],
            lacks: &["content-length"],
        },
        Row {
            name: "an empty 200 says so",
            client: client("POST", true),
            upstream: "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            framing: BodyFraming::Empty,
            reframe: false,
            close: false,
            reusable: true,
            has: &["content-length: 0"],
            lacks: &["transfer-encoding"],
        },
        Row {
            name: "a fixed length is relayed as it is, our request id replaces theirs",
            client: client("POST", true),
            upstream: JSON_LENGTH,
            framing: BodyFraming::Length(42),
            reframe: false,
            close: false,
            reusable: true,
            has: &["content-length: 42", "x-request-id: rid-1"],
            lacks: &["theirs", "transfer-encoding", "connection:"],
        },
        Row {
            name: "HTTP/1.1 client behind a chunked stream gets our chunks",
            client: client("POST", true),
            upstream: SSE_CHUNKED,
            framing: BodyFraming::Chunked,
            reframe: true,
            close: false,
            reusable: true,
            has: &["transfer-encoding: chunked"],
            lacks: &["content-length", "connection:"],
        },
        Row {
            name: "HTTP/1.0 client behind a chunked stream: the close ends its body",
            client: client("POST", false),
            upstream: SSE_CHUNKED,
            framing: BodyFraming::Chunked,
            reframe: false,
            close: true,
            reusable: true,
            has: &["connection: close"],
            lacks: &["transfer-encoding", "content-length"],
        },
        Row {
            name: "HTTP/1.0 client with a fixed length is kept alive explicitly",
            client: client("POST", false),
            upstream: JSON_LENGTH,
            framing: BodyFraming::Length(42),
            reframe: false,
            close: false,
            reusable: true,
            has: &["content-length: 42", "connection: keep-alive"],
            lacks: &["transfer-encoding"],
        },
        Row {
            name: "stripping the usage event makes a fixed length unknowable: chunks",
            client: strip,
            upstream: SSE_LENGTH,
            framing: BodyFraming::Length(120),
            reframe: true,
            close: false,
            reusable: true,
            has: &["transfer-encoding: chunked"],
            lacks: &["content-length"],
        },
        Row {
            name: "HTTP/1.0 client with a fixed length: nothing is stripped",
            client: strip_10,
            upstream: SSE_LENGTH,
            framing: BodyFraming::Length(120),
            reframe: false,
            close: false,
            reusable: true,
            has: &["content-length: 120", "connection: keep-alive"],
            lacks: &["transfer-encoding"],
        },
        Row {
            name: "a body delimited by the upstream's close: chunks, never pooled",
            client: client("POST", true),
            upstream: "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n",
            framing: BodyFraming::UntilClose,
            reframe: true,
            close: false,
            reusable: false,
            has: &["transfer-encoding: chunked"],
            lacks: &["content-length"],
        },
        Row {
            name: "draining (or a client that asked) closes after this response",
            client: draining,
            upstream: JSON_LENGTH,
            framing: BodyFraming::Length(42),
            reframe: false,
            close: true,
            reusable: true,
            has: &["connection: close", "content-length: 42"],
            lacks: &["keep-alive"],
        },
        Row {
            name: "an upstream that will close cannot be pooled",
            client: client("POST", true),
            upstream: "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n",
            framing: BodyFraming::Length(2),
            reframe: false,
            close: false,
            reusable: false,
            has: &["content-length: 2"],
            lacks: &["connection"],
        },
    ];
    for row in rows {
        let plan = plan_response(&row.client, &upstream(row.upstream), 0).unwrap();
        let head = String::from_utf8(plan.head.clone())
            .unwrap()
            .to_ascii_lowercase();
        let name = row.name;
        assert_eq!(plan.framing, row.framing, "{name}");
        assert_eq!(plan.reframe, row.reframe, "{name}");
        assert_eq!(plan.close, row.close, "{name}");
        assert_eq!(plan.reusable, row.reusable, "{name}");
        assert!(head.ends_with("\r\n\r\n"), "{name}: {head}");
        for h in row.has {
            assert!(
                head.contains(&h.to_ascii_lowercase()),
                "{name}: no {h:?} in {head}"
            );
        }
        for h in row.lacks {
            assert!(
                !head.contains(&h.to_ascii_lowercase()),
                "{name}: {h:?} in {head}"
            );
        }
    }
}

#[test]
fn usage_kinds_follow_the_endpoint_and_status() {
    let strip = ClientSide {
        strip: (true, true),
        ..client("POST", true)
    };
    let kind = |c: &ClientSide<'_>, raw: &str| plan_response(c, &upstream(raw), 0).unwrap().kind;
    assert_eq!(
        kind(&strip, SSE_CHUNKED),
        UsageKind::OpenAiSse {
            strip: true,
            running: true,
            timings: false
        }
    );
    assert_eq!(
        kind(&client("POST", true), SSE_CHUNKED),
        UsageKind::OpenAiSse {
            strip: false,
            running: false,
            timings: false
        }
    );
    assert_eq!(
        kind(&client("POST", true), JSON_LENGTH),
        UsageKind::OpenAiJson
    );
    let error = "HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n";
    assert_eq!(kind(&client("POST", true), error), UsageKind::None);
    assert!(
        plan_response(&client("POST", true), &upstream(SSE_CHUNKED), 0)
            .unwrap()
            .event_stream
    );
}

#[test]
fn a_smuggling_shaped_upstream_head_is_a_protocol_error() {
    let raw = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n";
    let e = plan_response(&client("POST", true), &upstream(raw), 0).unwrap_err();
    assert_eq!(e.upstream_kind(), Some("upstream_protocol_error"));
}

#[test]
fn a_slow_stream_waits_in_a_small_read_buffer() {
    // A page with nothing in it: swapped for a small buffer.
    let mut buf = BytesMut::with_capacity(4096);
    small_read_buf(&mut buf);
    assert_eq!(buf.capacity(), SLOW_READ_BUF);
    // The end of a chunk left over: kept, in a small buffer.
    let mut buf = BytesMut::with_capacity(4096);
    buf.extend_from_slice(b"x\r\n");
    let _ = buf.split_to(1);
    small_read_buf(&mut buf);
    assert_eq!((&buf[..], buf.capacity()), (&b"\r\n"[..], SLOW_READ_BUF));
    // A small buffer whose front was consumed has little room left: a fresh small one
    // instead of a page.
    let mut buf = BytesMut::with_capacity(SLOW_READ_BUF);
    buf.extend_from_slice(&[b'a'; SLOW_READ_BUF - 100]);
    let _ = buf.split_to(SLOW_READ_BUF - 110);
    small_read_buf(&mut buf);
    assert_eq!((buf.len(), buf.capacity()), (10, SLOW_READ_BUF));
    // A small buffer with room is left alone; so is a large leftover (a burst).
    let mut buf = BytesMut::with_capacity(SLOW_READ_BUF);
    buf.extend_from_slice(b"abc");
    let ptr = buf.as_ptr();
    small_read_buf(&mut buf);
    assert_eq!(buf.as_ptr(), ptr);
    let mut buf = BytesMut::with_capacity(8192);
    buf.extend_from_slice(&[b'a'; 2000]);
    small_read_buf(&mut buf);
    assert_eq!((buf.len(), buf.capacity()), (2000, 8192));
}

/// The client watch's rule, seen through what it reads: a pipelined request's bytes sit in the
/// client socket from the start. An exchange that writes to its client every 1 ms for 30 ms is
/// never watched (the bytes are still in the socket when it ends); one that writes nothing is
/// watched after `WATCH_AFTER` (the watch read them into `buf`, kept for the next request).
#[test]
fn only_an_exchange_that_stops_writing_is_watched() {
    use crate::tls::io::Reader;
    use crate::worker::testing::block_on;
    use monoio::io::Splitable;
    use monoio::net::TcpListener;
    use std::io::Write;

    for writes in [true, false] {
        block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let connect = std::thread::spawn(move || {
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                c.write_all(b"GET /next HTTP/1.1\r\n\r\n").unwrap();
                c
            });
            let (stream, _) = listener.accept().await.unwrap();
            let _client = connect.join().unwrap();
            let (rd, _wr) = stream.into_split();
            let mut rd: ClientReader = Reader::Plain(rd);
            let mut buf = BytesMut::new();
            let last_write = Cell::new(None);
            let started = Instant::now();
            let exchange = async {
                while started.elapsed() < Duration::from_millis(30) {
                    monoio::time::sleep(Duration::from_millis(1)).await;
                    if writes {
                        last_write.set(Some(Instant::now()));
                    }
                }
                7
            };
            let deadline = started + Duration::from_secs(5);
            let out = watch_client(&mut rd, &mut buf, started, deadline, &last_write, exchange);
            assert_eq!(out.await, Some(Ok(7)));
            if writes {
                assert!(buf.is_empty(), "watched while writing: read {buf:?}");
            } else {
                assert_eq!(&buf[..], b"GET /next HTTP/1.1\r\n\r\n");
            }
        });
    }
}

/// Drains `wire` through `Body::drain` in reads of `step` bytes (a plain tap, no usage to look
/// at): what the client gets, whether the body finished, and what stayed in the read buffer.
fn drain_in_reads(
    framing: BodyFraming,
    wire: &[u8],
    step: usize,
    reframe: bool,
) -> (Vec<u8>, bool, Vec<u8>) {
    let mut body = Body::new(framing);
    let mut tap = Tap::new(UsageKind::None);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in wire.chunks(step) {
        buf.extend_from_slice(piece);
        if let Err(e) = body.drain(&mut buf, &mut tap, &mut out, reframe) {
            panic!("{framing:?} in reads of {step}: {e}");
        }
        // As the relay makes room before its next read: what a drain took must already be
        // gone from the buffer, or it would be relayed twice.
        buf.reserve(64);
    }
    (out, body.finished, buf.to_vec())
}

/// Every framing drains the same at every read size: the body's bytes out (re-chunked when
/// asked), what follows a fixed-length body left in the buffer, and the end seen where it is.
#[test]
fn a_body_drains_the_same_whatever_its_reads() {
    let text = b"data: {\"choices\":[{\"delta\":{\"content\":\"tok\"}}]}\n\n".repeat(3);
    let mut chunked = Vec::new();
    for part in text.chunks(40) {
        write::chunk(&mut chunked, part);
    }
    chunked.extend_from_slice(write::LAST_CHUNK);
    for step in [1, 2, 7, 40, 41, 1000] {
        // A fixed length, with the start of a next response behind it.
        let mut wire = text.clone();
        wire.extend_from_slice(b"HTTP/1.1");
        let (out, done, left) =
            drain_in_reads(BodyFraming::Length(text.len() as u64), &wire, step, false);
        assert_eq!((out, done), (text.clone(), true), "length, reads of {step}");
        assert_eq!(left, b"HTTP/1.1".to_vec(), "length, reads of {step}");
        // Chunked in, unframed by the decoder, the same bytes out.
        let (out, done, left) = drain_in_reads(BodyFraming::Chunked, &chunked, step, false);
        assert_eq!(
            (out, done, left),
            (text.clone(), true, Vec::new()),
            "chunked, reads of {step}"
        );
        // Chunked in and out: each drain one chunk, then the last one.
        let (out, done, _) = drain_in_reads(BodyFraming::Chunked, &chunked, step, true);
        let mut dec = ChunkedDecoder::new();
        let mut back = Vec::new();
        let used = dec.decode(&out, |d| back.extend_from_slice(d));
        assert_eq!(used.ok(), Some(out.len()), "reframed, reads of {step}");
        assert!(done && dec.is_done(), "reframed, reads of {step}");
        assert_eq!(back, text, "reframed, reads of {step}");
        // Until the connection closes: everything read goes on, nothing stays.
        let (out, done, left) = drain_in_reads(BodyFraming::UntilClose, &text, step, false);
        assert_eq!(
            (out, done, left),
            (text.clone(), false, Vec::new()),
            "until close, reads of {step}"
        );
    }
}
