//! Admission control over real sockets: per-key request and token rates (429 + Retry-After),
//! the process-wide connection limit, and per-backend `max_inflight` with its wait queue.

mod common;

use std::time::{Duration, Instant};

use common::*;

const KEY_A: &str = "sk-limits-a-0123456789abcdef";
const KEY_B: &str = "sk-limits-b-0123456789abcdef";

fn chat_as(proxy: &Proxy, key: &str, tokens: u32) -> Response {
    post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, tokens),
        &[("Authorization", &format!("Bearer {key}"))],
    )
}

fn retry_after(r: &Response) -> u64 {
    r.header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric Retry-After: {:?}", r.headers))
}

#[test]
fn requests_per_minute_are_shared_by_all_cores() {
    let mock = Mock::start();
    let yaml = config(
        &[mock.url()],
        &format!(
            "auth:\n  keys:\n    - {{ name: a, key: \"{KEY_A}\", rpm: 3 }}\n    - {{ name: b, key: \"{KEY_B}\" }}\n"
        ),
    )
    .replace("workers: 1", "workers: 2");
    let proxy = Proxy::start(&yaml, &[]);
    // Fresh connections land on either core; the three requests of the minute are the key's, not
    // each core's.
    for i in 0..3 {
        let r = chat_as(&proxy, KEY_A, 2);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    let r = chat_as(&proxy, KEY_A, 2);
    r.assert_error(429, "rate_limit_exceeded");
    assert_eq!(r.json()["error"]["type"], "requests");
    let wait = retry_after(&r);
    assert!((1..=20).contains(&wait), "Retry-After {wait}");
    // Another key is not affected.
    assert_eq!(chat_as(&proxy, KEY_B, 2).status, 200);
    let metrics = get(proxy.addr, "/metrics").text();
    assert!(
        metrics.contains("llmproxy_rejected_total{reason=\"rate_limit_requests\"} 1"),
        "{metrics}"
    );
}

#[test]
fn tokens_per_minute_are_charged_from_usage() {
    let mock = Mock::start();
    let yaml = config(
        &[mock.url()],
        &format!("auth:\n  keys:\n    - {{ name: a, key: \"{KEY_A}\", tpm: 10 }}\n"),
    );
    let proxy = Proxy::start(&yaml, &[]);
    // The first request is admitted (the bucket is not empty) and uses far more than 10 tokens.
    let r = chat_as(&proxy, KEY_A, 20);
    assert_eq!(r.status, 200, "{}", r.text());
    let used = r.json()["usage"]["total_tokens"].as_u64().unwrap_or(0);
    assert!(used > 20, "usage {used}");
    let r = chat_as(&proxy, KEY_A, 1);
    r.assert_error(429, "rate_limit_exceeded");
    assert_eq!(r.json()["error"]["type"], "tokens");
    // `used` tokens at 10 per minute: the debt beyond one minute's bucket is paid back in
    // (used - 10) * 6 seconds.
    let wait = retry_after(&r);
    let expected = (used - 10) * 6;
    assert!(
        wait <= expected + 1 && wait + 10 >= expected,
        "Retry-After {wait}, expected about {expected}"
    );
    proxy
        .proc
        .wait_for_line("rejected (rate_limit_tokens)", Duration::from_secs(5));
}

/// One request on a fresh connection; `None` when the proxy closed it without an answer.
fn try_get(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[test]
fn connections_beyond_the_limit_are_closed_and_the_others_served() {
    let mock = Mock::start();
    let yaml = config(&[mock.url()], "limits: { max_connections: 2 }\n")
        .replace("workers: 1", "workers: 2");
    let proxy = Proxy::start(&yaml, &[]);
    let health = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut c1 = Client::connect(proxy.addr);
    let mut c2 = Client::connect(proxy.addr);
    assert_eq!(c1.read_response_after(health).status, 200);
    assert_eq!(c2.read_response_after(health).status, 200);

    // The third is accepted by the kernel and closed by the proxy without an answer.
    assert_eq!(try_get(proxy.addr, "/health"), None);
    let mut c3 = Client::connect(proxy.addr);
    assert!(c3.is_closed(Duration::from_secs(5)));
    // The open ones keep being served.
    assert_eq!(c1.read_response_after(health).status, 200);
    assert_eq!(c2.read_response_after(health).status, 200);

    // A closed connection frees its place.
    drop(c1);
    let mut status = None;
    assert!(eventually(Duration::from_secs(5), || {
        status = try_get(proxy.addr, "/health");
        status.is_some()
    }));
    assert_eq!(status, Some(200));
    let metrics = c2
        .read_response_after(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        .text();
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("llmproxy_rejected_total{reason=\"max_connections\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(refused >= 2, "{metrics}");
    proxy
        .proc
        .wait_for_line("rejected (max_connections)", Duration::from_secs(5));
}

/// A non-streaming chat request whose backend takes `ms` before answering.
fn slow_chat(addr: std::net::SocketAddr, ms: u64) -> Response {
    post_json(
        addr,
        "/v1/chat/completions",
        &chat_body(false, 2),
        &[("x-mock-ttft-ms", &ms.to_string())],
    )
}

/// A proxy whose only backend takes one request at a time.
fn one_slot_proxy(mock: &Mock, workers: usize, limits: &str) -> Proxy {
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nworkers: {workers}\nbackends:\n  - {{ url: \"{}\", max_inflight: 1 }}\nlimits: {limits}\n",
        mock.url()
    );
    Proxy::start(&yaml, &[])
}

#[test]
fn a_queued_request_is_served_when_a_slot_frees_on_another_core() {
    let mock = Mock::start();
    let proxy = one_slot_proxy(&mock, 2, "{ queue_size: 4, queue_timeout: 20s }");
    let addr = proxy.addr;
    let first = std::thread::spawn(move || {
        let r = slow_chat(addr, 800);
        (r.status, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(200));
    // Several waiters, on either core; each is served in turn by the one slot.
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                let r = slow_chat(addr, 50);
                (r.status, Instant::now())
            })
        })
        .collect();
    let (status, first_done) = first.join().unwrap();
    assert_eq!(status, 200);
    for w in waiters {
        let (status, done) = w.join().unwrap();
        assert_eq!(status, 200);
        assert!(done > first_done, "a waiter finished before the slot freed");
    }
    assert_eq!(mock.stat("requests"), 4);
}

#[test]
fn a_full_queue_and_a_queue_timeout_answer_503_with_retry_after() {
    let mock = Mock::start();
    let proxy = one_slot_proxy(&mock, 1, "{ queue_size: 1, queue_timeout: 2s }");
    let addr = proxy.addr;
    let holder = std::thread::spawn(move || slow_chat(addr, 4000).status);
    std::thread::sleep(Duration::from_millis(300));
    let queued = std::thread::spawn(move || slow_chat(addr, 10));
    std::thread::sleep(Duration::from_millis(300));
    // The queue's one place is taken: refused at once.
    let full = slow_chat(addr, 10);
    full.assert_error(503, "queue_full");
    assert_eq!(full.header("retry-after"), Some("1"));
    let metrics = get(addr, "/metrics").text();
    assert!(metrics.contains("llmproxy_requests_queued 1"), "{metrics}");
    let timed_out = queued.join().unwrap();
    // The waiter gave up after queue_timeout, long before the slot freed.
    timed_out.assert_error(503, "queue_timeout");
    assert_eq!(timed_out.header("retry-after"), Some("1"));
    assert_eq!(holder.join().unwrap(), 200);
    assert_eq!(mock.stat("requests"), 1);
    let metrics = get(addr, "/metrics").text();
    for reason in ["queue_full", "queue_timeout"] {
        assert!(
            metrics.contains(&format!("llmproxy_rejected_total{{reason=\"{reason}\"}} 1")),
            "{metrics}"
        );
    }
    // The slot is free again.
    assert_eq!(slow_chat(addr, 10).status, 200);
}

#[test]
fn a_waiter_whose_client_leaves_gives_its_place_back() {
    let mock = Mock::start();
    let proxy = one_slot_proxy(&mock, 1, "{ queue_size: 1, queue_timeout: 30s }");
    let addr = proxy.addr;
    let holder = std::thread::spawn(move || slow_chat(addr, 1500).status);
    std::thread::sleep(Duration::from_millis(300));
    let queued_now = || {
        get(addr, "/metrics")
            .text()
            .lines()
            .find_map(|l| l.strip_prefix("llmproxy_requests_queued "))
            .map(|v| v.trim().to_string())
    };
    {
        let mut waiter = Client::connect(addr);
        waiter.send(post_raw("/v1/chat/completions", &chat_body(false, 2), &[], false).as_bytes());
        assert!(eventually(Duration::from_secs(5), || queued_now()
            .as_deref()
            == Some("1")));
    }
    // The client is gone: its place in the queue is free again long before queue_timeout.
    assert!(
        eventually(Duration::from_secs(5), || queued_now().as_deref()
            == Some("0")),
        "the abandoned waiter still holds its place"
    );
    assert_eq!(holder.join().unwrap(), 200);
    assert_eq!(slow_chat(addr, 10).status, 200);
    assert_eq!(mock.stat("requests"), 2);
}

#[test]
fn max_inflight_and_the_queue_apply_to_model_pool_picks() {
    let mock = Mock::start();
    // The request's model is an alias of a pool with its own strategy: its pick goes through
    // the same admission as any other.
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nworkers: 1\nbackends:\n  - {{ url: \"{}\", max_inflight: 1, models: [m] }}\n\
         models:\n  m: {{ aliases: [mock-model], strategy: consistent_hash }}\n\
         limits: {{ queue_size: 1, queue_timeout: 300ms }}\n",
        mock.url()
    );
    let proxy = Proxy::start(&yaml, &[]);
    let addr = proxy.addr;
    let holder = std::thread::spawn(move || slow_chat(addr, 2000).status);
    assert!(eventually(Duration::from_secs(5), || mock.stat("active") == 1));
    slow_chat(addr, 10).assert_error(503, "queue_timeout");
    assert_eq!(holder.join().unwrap(), 200);
    assert_eq!(slow_chat(addr, 10).status, 200);
    assert_eq!(mock.stat("requests"), 2);
}
