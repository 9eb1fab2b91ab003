//! Streams and upstream behaviour: SSE relayed chunk by chunk as produced, every body framing,
//! client disconnects cancelling the backend, upstream timeouts and the keep-alive pool.
//! The key cases run on both monoio drivers (io_uring and the epoll fallback).

mod common;

use std::io::Read;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

const DRIVERS: [&[(&str, &str)]; 2] = [&[], &[("MONOIO_FORCE_LEGACY_DRIVER", "1")]];

fn start(mock_args: &[&str], extra: &str, env: &[(&str, &str)]) -> (Mock, Proxy) {
    let mock = Mock::start_with(mock_args);
    let proxy = Proxy::start_env(&config(&[mock.url()], extra), &[], env);
    (mock, proxy)
}

fn events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| e.trim().to_string())
        .collect()
}

#[test]
fn sse_chunks_arrive_spaced_as_produced_on_both_drivers() {
    for env in DRIVERS {
        let (_mock, proxy) = start(&["--token-delay-ms", "100"], "", env);
        let expected = if env.is_empty() { "io_uring" } else { "epoll" };
        proxy
            .proc
            .wait_for_line(&format!("running on {expected}"), Duration::from_secs(5));
        let sent = Instant::now();
        let r = post_json(proxy.addr, "/v1/chat/completions", &chat_body(true, 6), &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        let ev = events(&r.body);
        assert_eq!(ev.last().map(String::as_str), Some("data: [DONE]"));
        assert!(
            ev.iter().any(|e| e.contains("\"timings\"")),
            "unknown fields pass through"
        );
        // Tokens arrive over time, not all at the end: the first data is on the client's socket
        // long before the last one is produced.
        let first = r.chunks.first().unwrap().0;
        let last = r.chunks.last().unwrap().0;
        assert!(
            r.chunks.len() >= 6,
            "one chunk per event, got {}",
            r.chunks.len()
        );
        assert!(
            first.duration_since(sent) < Duration::from_millis(400),
            "first token late"
        );
        assert!(
            last.duration_since(first) >= Duration::from_millis(400),
            "stream was buffered"
        );
        // Consecutive token chunks are spread out, none bunched with the next.
        let gaps: Vec<Duration> = r
            .chunks
            .windows(2)
            .map(|w| w[1].0.duration_since(w[0].0))
            .collect();
        assert!(
            gaps.iter()
                .filter(|g| **g >= Duration::from_millis(50))
                .count()
                >= 4,
            "{gaps:?}"
        );
    }
}

#[test]
fn events_split_across_upstream_reads_are_relayed_intact() {
    let (_mock, proxy) = start(&[], "", &[]);
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(true, 4),
        &[("x-mock-chunk-split", "1")],
    );
    assert_eq!(r.status, 200);
    let ev = events(&r.body);
    let data: Vec<&String> = ev.iter().filter(|e| e.starts_with("data: {")).collect();
    for e in &data {
        let json = e.trim_start_matches("data: ");
        serde_json::from_str::<serde_json::Value>(json).expect("each event is whole JSON");
    }
    assert!(data.len() >= 5);
}

#[test]
fn every_body_framing_is_relayed() {
    let (_mock, proxy) = start(&[], "", &[]);
    let body = chat_body(false, 3);
    for framing in ["length", "chunked", "close"] {
        let r = post_json(
            proxy.addr,
            "/v1/chat/completions",
            &body,
            &[("x-mock-framing", framing)],
        );
        assert_eq!(r.status, 200, "{framing}");
        assert_eq!(r.json()["usage"]["completion_tokens"], 3, "{framing}");
        match framing {
            "length" => assert!(r.header("content-length").is_some()),
            _ => assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{framing}"),
        }
    }
    // The connection stays usable after a close-delimited upstream body.
    let mut c = Client::connect(proxy.addr);
    for _ in 0..2 {
        c.send(
            post_raw(
                "/v1/chat/completions",
                &body,
                &[("x-mock-framing", "close")],
                false,
            )
            .as_bytes(),
        );
        assert_eq!(c.read_response().status, 200);
    }
    // HEAD: headers only.
    let mut c = Client::connect(proxy.addr);
    c.send(b"HEAD /health HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response_for(true);
    assert_eq!(r.status, 200);
    c.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(
        c.read_response().status,
        200,
        "HEAD left the connection in sync"
    );
}

#[test]
fn http10_client_gets_a_close_delimited_stream() {
    let (_mock, proxy) = start(&[], "", &[]);
    let body = chat_body(true, 3);
    let mut c = Client::connect(proxy.addr);
    c.send(
        format!(
            "POST /v1/chat/completions HTTP/1.0\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), None);
    assert!(r.text().contains("[DONE]"));
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The client closes its connection mid-stream: the backend sees its connection dropped within
/// 100 ms, and the proxy releases the request's in-flight count.
fn vanish(c: Client, mock: &Mock, proxy: &Proxy) {
    let closed_at = now_ms();
    drop(c);
    assert!(
        eventually(Duration::from_secs(2), || mock.stat("disconnects") == 1),
        "backend never saw the disconnect"
    );
    let seen = mock.stat("last_disconnect_unix_ms");
    assert!(
        seen >= closed_at && seen - closed_at <= 100,
        "took {} ms",
        seen.saturating_sub(closed_at)
    );
    assert!(eventually(Duration::from_secs(2), || {
        get(proxy.addr, "/health").json()["backends"][0]["inflight"] == 0
    }));
}

#[test]
fn client_disconnect_mid_stream_is_seen_by_the_backend_within_100ms() {
    for env in DRIVERS {
        let (mock, proxy) = start(&["--token-delay-ms", "1000"], "", env);
        let mut c = Client::connect(proxy.addr);
        c.send(post_raw("/v1/chat/completions", &chat_body(true, 50), &[], false).as_bytes());
        // Wait for the head and the first event, then vanish.
        let mut buf = [0u8; 4096];
        let n = c.stream.read(&mut buf).unwrap();
        assert!(n > 0);
        assert!(eventually(Duration::from_secs(2), || mock.stat("active") == 1));
        vanish(c, &mock, &proxy);
    }
}

/// Tokens written less than the client watch's start apart (`relay::WATCH_AFTER`, 5 ms): the
/// proxy does not watch the client socket while it writes to it, so the next write is what finds
/// the client gone, and the backend hears of it as soon.
#[test]
fn client_disconnect_mid_fast_stream_is_seen_by_the_backend_within_100ms() {
    for env in DRIVERS {
        let (mock, proxy) = start(&["--token-delay-ms", "2"], "", env);
        let mut c = Client::connect(proxy.addr);
        c.send(post_raw("/v1/chat/completions", &chat_body(true, 5000), &[], false).as_bytes());
        // Take events for a while (the stream is well past its first milliseconds), then vanish.
        let mut buf = [0u8; 4096];
        let mut events = 0;
        let reading = Instant::now();
        while reading.elapsed() < Duration::from_millis(100) {
            let n = c.stream.read(&mut buf).unwrap();
            assert!(n > 0, "the stream ended early");
            events += buf[..n].windows(5).filter(|w| w == b"data:").count();
        }
        assert!(events >= 10, "only {events} events in 100 ms");
        assert_eq!(mock.stat("active"), 1);
        vanish(c, &mock, &proxy);
    }
}

#[test]
fn client_disconnect_while_waiting_for_the_first_token_cancels_too() {
    for env in DRIVERS {
        let (mock, proxy) = start(&["--ttft-ms", "10000"], "", env);
        let mut c = Client::connect(proxy.addr);
        c.send(post_raw("/v1/chat/completions", &chat_body(true, 5), &[], false).as_bytes());
        assert!(eventually(Duration::from_secs(2), || mock.stat("active") == 1));
        let closed_at = now_ms();
        drop(c);
        assert!(eventually(Duration::from_secs(2), || mock
            .stat("disconnects")
            == 1));
        let seen = mock.stat("last_disconnect_unix_ms");
        assert!(seen - closed_at <= 100, "took {} ms", seen - closed_at);
    }
}

#[test]
fn first_byte_timeout_gives_504_and_idle_timeout_cuts_the_stream() {
    let (mock, proxy) = start(
        &[],
        "timeouts: { first_byte: 300ms, idle: 300ms }\nretry: { attempts: 0 }\n",
        &[],
    );
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 1),
        &[("x-mock-stall", "head")],
    );
    r.assert_error(504, "upstream_timeout");
    // The stalled upstream connection was dropped, so the backend sees the disconnect.
    assert!(eventually(Duration::from_secs(2), || mock
        .stat("disconnects")
        >= 1));

    let mut c = Client::connect(proxy.addr);
    c.send(
        post_raw(
            "/v1/chat/completions",
            &chat_body(true, 10),
            &[("x-mock-stall-after", "2")],
            false,
        )
        .as_bytes(),
    );
    let start = Instant::now();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200"));
    assert!(
        !text.contains("0\r\n\r\n"),
        "a cut stream must not look complete"
    );
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn total_request_timeout_applies() {
    // 2 ms: a deadline shorter than the wait before the client socket is watched (5 ms) ends
    // the exchange at the deadline, not at the watch.
    for request in ["400ms", "2ms"] {
        let (_mock, proxy) = start(
            &[],
            &format!("timeouts: {{ request: {request} }}\nretry: {{ attempts: 0 }}\n"),
            &[],
        );
        let sent = Instant::now();
        let r = post_json(
            proxy.addr,
            "/v1/chat/completions",
            &chat_body(false, 1),
            &[("x-mock-ttft-ms", "3000")],
        );
        r.assert_error(504, "request_timeout");
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "{request}: {:?}",
            sent.elapsed()
        );
    }
}

#[test]
fn stale_pooled_connections_are_retried_transparently() {
    let (mock, proxy) = start(&[], "", &[]);
    let body = chat_body(false, 2);
    // The backend closes idle connections after 150 ms without announcing it, so the proxy's
    // pooled connection is dead when reused: the retry on a fresh one must hide that.
    for _ in 0..5 {
        let r = post_json(
            proxy.addr,
            "/v1/chat/completions",
            &body,
            &[("x-mock-idle-close-ms", "150")],
        );
        assert_eq!(r.status, 200, "{}", r.text());
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(mock.stat("requests"), 5);
}

#[test]
fn upstream_connections_are_reused() {
    let mock = Mock::start();
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nworkers: 1\nbackends:\n  - url: \"{}\"\nhealth_check: {{ interval: 1h }}\n",
        mock.url()
    );
    let proxy = Proxy::start(&yaml, &[]);
    let body = chat_body(false, 1);
    assert_eq!(
        post_json(proxy.addr, "/v1/chat/completions", &body, &[]).status,
        200
    );
    // Let the health thread's startup probe (its own connection) land before counting.
    std::thread::sleep(Duration::from_millis(300));
    let before = mock.stat("connections");
    for _ in 0..20 {
        assert_eq!(
            post_json(proxy.addr, "/v1/chat/completions", &body, &[]).status,
            200
        );
    }
    // The second stats query is itself one new connection.
    let opened = mock.stat("connections") - before - 1;
    assert_eq!(
        opened, 0,
        "20 sequential requests reuse the pooled connection"
    );
}

#[test]
fn backend_errors_are_relayed_and_resets_abort_the_stream() {
    let (_mock, proxy) = start(&[], "retry: { attempts: 0 }\n", &[]);
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 1),
        &[("x-mock-status", "429")],
    );
    assert_eq!(r.status, 429, "4xx passes through untouched");
    assert!(r.json()["error"].is_object());
    let mut c = Client::connect(proxy.addr);
    c.send(
        post_raw(
            "/v1/chat/completions",
            &chat_body(true, 10),
            &[("x-mock-reset-after", "2")],
            false,
        )
        .as_bytes(),
    );
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200"));
    assert!(!text.contains("[DONE]"));
    assert!(!text.ends_with("0\r\n\r\n"));
    assert_eq!(get(proxy.addr, "/health").status, 200, "the core survived");
}

#[test]
fn connect_timeout_applies_when_a_backend_does_not_answer_syns() {
    // A listener that never accepts, with its tiny queue filled: further SYNs are dropped, so
    // connecting hangs exactly like a blackholed host.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(s);
        }
    }
    let proxy = Proxy::start(
        &config(
            &[format!("http://{addr}")],
            "timeouts: { connect: 300ms }\nretry: { attempts: 0 }\n",
        ),
        &[],
    );
    let start = Instant::now();
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 1),
        &[],
    );
    r.assert_error(504, "upstream_connect_timeout");
    assert!(start.elapsed() < Duration::from_secs(3));
    drop(fillers);
}
