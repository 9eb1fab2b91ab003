//! Hostile and broken clients: slowloris heads and bodies, readers that stop reading a stream,
//! request smuggling shapes, absurd header counts and bodies that are not JSON. Each must get the
//! right status in the OpenAI error shape (or a cut connection), never reach a backend, and never
//! disturb the clients around it. (tests/http.rs covers the basic shape of each rejection.)

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::webhook::Webhook;
use common::*;

fn proxy_with(extra: &str) -> (Mock, Proxy) {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&[mock.url()], extra), &[]);
    (mock, proxy)
}

/// Sends `raw` on a fresh connection; asserts a 400 in the error shape and a closed connection,
/// and that nothing after the rejected head is ever answered (no smuggled second request).
fn assert_refused(proxy: &Proxy, raw: &[u8]) {
    let mut c = Client::connect(proxy.addr);
    c.send(raw);
    let r = c.read_response();
    assert_eq!(
        r.status,
        400,
        "{:?}: {}",
        String::from_utf8_lossy(raw),
        r.text()
    );
    r.assert_error(400, "bad_request");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(
        c.is_closed(Duration::from_secs(2)),
        "connection left open after {:?}",
        String::from_utf8_lossy(raw)
    );
}

#[test]
fn smuggling_shapes_are_refused_and_nothing_behind_them_is_served() {
    let (mock, proxy) = proxy_with("");
    let smuggled = "GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n";
    let post = "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n";
    let cases: Vec<String> = vec![
        // CL.TE and TE.CL with a request hidden in the body.
        format!("{post}Content-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        format!("{post}Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n{smuggled}\r\n0\r\n\r\n"),
        // Duplicate and malformed lengths.
        format!("{post}Content-Length: 2\r\nContent-Length: 40\r\n\r\n{{}}{smuggled}"),
        format!("{post}Content-Length: 2, 40\r\n\r\n{{}}{smuggled}"),
        format!("{post}Content-Length: +2\r\n\r\n{{}}"),
        format!("{post}Content-Length: -1\r\n\r\n"),
        format!("{post}Content-Length: 0x10\r\n\r\n"),
        format!("{post}Content-Length: 99999999999999999999999\r\n\r\n"),
        format!("{post}Content-Length : 2\r\n\r\n{{}}"),
        // Transfer codings other than one `chunked`.
        format!("{post}Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        format!("{post}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
        format!("{post}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        format!("{post}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
        "POST /v1/chat/completions HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            .to_string(),
        // Bad chunk sizes and framing.
        format!("{post}Transfer-Encoding: chunked\r\n\r\n-2\r\n{{}}\r\n0\r\n\r\n"),
        format!("{post}Transfer-Encoding: chunked\r\n\r\n0x2\r\n{{}}\r\n0\r\n\r\n"),
        format!("{post}Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n{{}}\r\n0\r\n\r\n"),
        format!("{post}Transfer-Encoding: chunked\r\n\r\n2\r\n{{}}XX0\r\n\r\n"),
        format!("{post}Transfer-Encoding: chunked\r\n\r\n2\n{{}}\n0\n\n"),
        format!(
            "{post}Transfer-Encoding: chunked\r\n\r\n2;{}\r\n{{}}\r\n0\r\n\r\n",
            "x".repeat(2000)
        ),
        // obs-fold, bare CR, NUL and space-before-colon in the head.
        format!("{post}Content-Length: 2\r\nX-A: 1\r\n\tfolded\r\n\r\n{{}}"),
        format!("{post}X-A: a\rb\r\nContent-Length: 2\r\n\r\n{{}}"),
        format!("{post}X-A: a\0b\r\nContent-Length: 2\r\n\r\n{{}}"),
    ];
    for raw in &cases {
        assert_refused(&proxy, raw.as_bytes());
    }
    assert_eq!(
        mock.stat("requests"),
        0,
        "a refused request reached the backend"
    );
    assert_eq!(get(proxy.addr, "/health").status, 200);
}

#[test]
fn absurd_header_counts_get_431_and_a_closed_connection() {
    let (mock, proxy) = proxy_with("");
    for count in [101, 5_000, 50_000] {
        let mut raw = String::from("POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n");
        for i in 0..count {
            raw.push_str(&format!("X-{i}: y\r\n"));
        }
        raw.push_str("Content-Length: 2\r\n\r\n{}");
        let mut c = Client::connect(proxy.addr);
        // The proxy may answer and close before all of it is written.
        let _ = c.stream.write_all(raw.as_bytes());
        let r = c.read_response();
        r.assert_error(431, "headers_too_large");
        assert!(c.is_closed(Duration::from_secs(2)), "{count} headers");
    }
    assert_eq!(mock.stat("requests"), 0);
    assert_eq!(get(proxy.addr, "/health").status, 200);
}

#[test]
fn bodies_that_are_not_json_objects_get_400_in_the_error_shape() {
    let (mock, proxy) = proxy_with("");
    let bodies: [&[u8]; 7] = [
        b"\xff\xfe\x00{",
        b"{\"model\":\"mock-model\",\"messages\":[{\"role\":\"user\",\"content\":\"\xc3\x28\"}]}",
        b"[\"mock-model\", true]",
        b"null",
        b"{\"model\":\"mock-model\",\"stream\":tru",
        b"{\"model\":[1]}",
        b"{\"model\":\"a\",\"model\":\"b\"}",
    ];
    for body in bodies {
        let mut raw = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        raw.extend_from_slice(body);
        let mut c = Client::connect(proxy.addr);
        c.send(&raw);
        let r = c.read_response();
        r.assert_error(400, "bad_request");
        assert!(c.is_closed(Duration::from_secs(2)));
    }
    assert_eq!(mock.stat("requests"), 0);
    proxy
        .proc
        .wait_for_line("not valid UTF-8", Duration::from_secs(5));
}

#[test]
fn slowloris_connections_are_cut_and_do_not_starve_others() {
    let (_mock, proxy) = proxy_with("timeouts: { header: 500ms }\n");
    let mut lorises: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = TcpStream::connect(proxy.addr).expect("connect");
            s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHo")
                .expect("write");
            s
        })
        .collect();
    let start = Instant::now();
    // While they trickle, real requests are served at once.
    let mut tick = 0;
    while start.elapsed() < Duration::from_millis(400) {
        for s in &mut lorises {
            let _ = s.write_all(b"s");
        }
        let t = Instant::now();
        let r = post_json(
            proxy.addr,
            "/v1/chat/completions",
            &chat_body(false, 1),
            &[],
        );
        assert_eq!(r.status, 200);
        assert!(t.elapsed() < Duration::from_secs(2), "starved by slowloris");
        tick += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(tick > 0);
    // Then every one of them is cut by the header deadline (with a 408), trickling or not.
    for mut s in lorises {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert!(start.elapsed() < Duration::from_secs(8));
}

#[test]
fn a_body_trickled_byte_by_byte_is_cut_by_the_header_timeout() {
    let (mock, proxy) = proxy_with("timeouts: { header: 600ms }\n");
    let body = chat_body(false, 1);
    let mut c = Client::connect(proxy.addr);
    c.send(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let start = Instant::now();
    // One byte every 200 ms: each read is within the timeout, the whole body is not.
    for b in body.as_bytes() {
        if c.stream.write_all(&[*b]).is_err() || start.elapsed() > Duration::from_secs(6) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = c.read_response();
    r.assert_error(408, "request_timeout");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "cut after {:?}",
        start.elapsed()
    );
    assert_eq!(mock.stat("requests"), 0);
}

#[test]
fn a_reader_that_stops_reading_a_stream_is_cut_and_the_upstream_cancelled() {
    let mock = Mock::start();
    let hook = Webhook::start();
    let proxy = Proxy::start(
        &config(
            &[mock.url()],
            &format!("timeouts: {{ write: 500ms }}\n{}", hook.config_yaml()),
        ),
        &[],
    );
    // A tiny receive window, and then no reading at all: the proxy's writes stall once the
    // socket buffers are full.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&proxy.addr.into()).unwrap();
    let mut stream: TcpStream = socket.into();
    let body = chat_body(true, 200_000);
    stream
        .write_all(
            post_raw(
                "/v1/chat/completions",
                &body,
                &[("x-request-id", "slow-reader")],
                false,
            )
            .as_bytes(),
        )
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || mock.stat("disconnects") == 1),
        "the backend never saw the stream cancelled: {}",
        mock.stats()
    );
    assert!(mock.stat("completed") == 0, "the stream ran to its end");
    let events = hook.wait_events_within(1, Duration::from_secs(10));
    let ev = events
        .iter()
        .find(|e| e["request_id"] == "slow-reader")
        .expect("usage event of the slow reader");
    assert_eq!(ev["outcome"], "client_aborted", "{ev}");
    assert!(eventually(Duration::from_secs(2), || {
        get(proxy.addr, "/health").json()["backends"][0]["inflight"] == 0
    }));
    drop(stream);
}

#[test]
fn a_client_that_never_reads_local_answers_is_cut_by_the_write_timeout() {
    let (_mock, proxy) = proxy_with("timeouts: { write: 300ms }\n");
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&proxy.addr.into()).unwrap();
    let mut stream: TcpStream = socket.into();
    // Hundreds of pipelined requests for answers the proxy makes itself, never read: its
    // writes stall once the socket buffers are full.
    let flood = "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n".repeat(3000);
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let _ = stream.write_all(flood.as_bytes());
    let connections = || {
        get(proxy.addr, "/metrics")
            .text()
            .lines()
            .find(|l| l.starts_with("llmproxy_connections_active"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    // Only the scrape's own connection is left once the stalled one is dropped.
    assert!(
        eventually(Duration::from_secs(10), || connections() == Some(1.0)),
        "a connection that never reads is held: {:?}",
        connections()
    );
    drop(stream);
}
