//! The downstream HTTP/1.1 surface: keep-alive, pipelining, request bodies, limits, timeouts,
//! header rules and the error shape of everything the proxy rejects.

mod common;

use std::time::Duration;

use common::*;

fn proxy_with(extra: &str) -> (Mock, Proxy) {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&[mock.url()], extra), &[]);
    (mock, proxy)
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let (_mock, proxy) = proxy_with("");
    let mut c = Client::connect(proxy.addr);
    for _ in 0..5 {
        c.send(post_raw("/v1/chat/completions", &chat_body(false, 3), &[], false).as_bytes());
        let r = c.read_response();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["usage"]["completion_tokens"], 3);
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (_mock, proxy) = proxy_with("");
    let mut c = Client::connect(proxy.addr);
    let mut raw = String::new();
    for i in 1..=3 {
        raw.push_str(&post_raw(
            "/v1/chat/completions",
            &chat_body(false, i),
            &[("x-request-id", &format!("pipe-{i}"))],
            false,
        ));
    }
    c.send(raw.as_bytes());
    for i in 1..=3 {
        let r = c.read_response();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-request-id"), Some(format!("pipe-{i}").as_str()));
        assert_eq!(r.json()["usage"]["completion_tokens"], i);
    }
}

#[test]
fn chunked_request_body_and_expect_continue() {
    let (_mock, proxy) = proxy_with("");
    let body = chat_body(false, 2);
    let (a, b) = body.split_at(10);
    let mut c = Client::connect(proxy.addr);
    c.send(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nx-mock-echo: 1\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        )
        .as_bytes(),
    );
    let r = c.read_response();
    assert_eq!(r.status, 200, "{}", r.text());
    let echo = r.json();
    assert_eq!(echo["body"], body, "body re-framed with a length upstream");
    let headers = echo["headers"].as_array().unwrap();
    assert!(headers.iter().any(|h| h[0] == "content-length"));
    assert!(!headers.iter().any(|h| h[0] == "transfer-encoding"));

    // Expect: 100-continue gets an interim 100 before the body is sent.
    let mut c = Client::connect(proxy.addr);
    let body = chat_body(false, 1);
    c.send(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let interim = c.read_response();
    assert_eq!(interim.status, 100);
    c.send(body.as_bytes());
    let r = c.read_response();
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn oversized_body_is_refused_with_413_without_reading_it() {
    let (mock, proxy) = proxy_with("limits: { max_body_bytes: 1KiB }\n");
    let mut c = Client::connect(proxy.addr);
    // Announce 10 MB but send nothing: the answer must come anyway.
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n");
    let r = c.read_response();
    r.assert_error(413, "body_too_large");
    assert!(c.is_closed(Duration::from_secs(2)));
    // Chunked bodies are bounded while decoding.
    let big = "x".repeat(2000);
    let mut c = Client::connect(proxy.addr);
    c.send(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    );
    c.read_response().assert_error(413, "body_too_large");
    assert_eq!(mock.stat("requests"), 0, "nothing reached the backend");
}

#[test]
fn oversized_head_gets_431_and_too_many_headers_too() {
    let (_mock, proxy) = proxy_with("limits: { max_header_bytes: 2KiB }\n");
    let mut c = Client::connect(proxy.addr);
    c.send(
        format!(
            "GET /v1/models HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
            "a".repeat(4000)
        )
        .as_bytes(),
    );
    c.read_response().assert_error(431, "headers_too_large");
    assert!(c.is_closed(Duration::from_secs(2)));

    let mut raw = String::from("GET /v1/models HTTP/1.1\r\nHost: t\r\n");
    for i in 0..150 {
        raw.push_str(&format!("X-{i}: 1\r\n"));
    }
    raw.push_str("\r\n");
    let (_mock2, proxy2) = proxy_with("");
    request(proxy2.addr, &raw).assert_error(431, "headers_too_large");
}

#[test]
fn malformed_and_smuggling_requests_get_400_and_close() {
    let (mock, proxy) = proxy_with("");
    let cases = [
        "GARBAGE\r\n\r\n",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n folded\r\n\r\n",
        "GET http://evil/ HTTP/1.1\r\nHost: t\r\n\r\n",
    ];
    for raw in cases {
        let mut c = Client::connect(proxy.addr);
        c.send(raw.as_bytes());
        let r = c.read_response();
        r.assert_error(400, "bad_request");
        assert!(c.is_closed(Duration::from_secs(2)), "closed after {raw:?}");
    }
    // Not JSON on a JSON route.
    let r = post_json(proxy.addr, "/v1/chat/completions", "{not json", &[]);
    r.assert_error(400, "bad_request");
    let r = post_json(proxy.addr, "/v1/chat/completions", r#"{"model": 42}"#, &[]);
    r.assert_error(400, "bad_request");
    assert_eq!(mock.stat("requests"), 0);
    // The worker is still alive and serving.
    assert_eq!(get(proxy.addr, "/health").status, 200);
    // Log lines reach stderr through the log writer thread, which batches them (up to a few ms
    // after the answer): wait for the line instead of reading the output once.
    let logged = |out: &str| out.contains("bad_request") || out.contains("malformed");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !logged(&proxy.proc.output()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(logged(&proxy.proc.output()), "{}", proxy.proc.output());
}

#[test]
fn a_panic_in_one_request_does_not_take_down_the_core() {
    let (_mock, proxy) = proxy_with("");
    let mut held = Client::connect(proxy.addr);
    held.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(held.read_response().status, 200);
    let mut c = Client::connect(proxy.addr);
    c.send(b"GET /health HTTP/1.1\r\nHost: t\r\nx-llmproxy-debug-panic: 1\r\n\r\n");
    assert!(
        c.is_closed(Duration::from_secs(5)),
        "the panicking connection is closed"
    );
    // The same (only) core still serves new and existing connections.
    assert_eq!(get(proxy.addr, "/health").status, 200);
    held.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(held.read_response().status, 200);
    proxy.proc.wait_for_line("panicked", Duration::from_secs(2));
}

#[test]
fn head_requests_are_proxied_without_a_body() {
    let (_mock, proxy) = proxy_with("");
    let mut c = Client::connect(proxy.addr);
    c.send(b"HEAD /v1/models HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response_for(true);
    assert!(r.status > 0);
    c.send(b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 200, "connection still in sync after HEAD");
    assert_eq!(r.json()["data"][0]["id"], "mock-model");
}

#[test]
fn slowloris_head_is_cut_by_the_header_timeout() {
    let (_mock, proxy) = proxy_with("timeouts: { header: 300ms }\n");
    let mut c = Client::connect(proxy.addr);
    c.send(b"GET /health HTTP/1.1\r\nHo");
    let start = std::time::Instant::now();
    // Trickle a byte now and then: the deadline is for the whole head, not per byte.
    for b in b"st: x\r\nX" {
        std::thread::sleep(Duration::from_millis(80));
        if c.stream.write_all_ok(&[*b]).is_err() {
            break;
        }
    }
    let r = c.read_response();
    r.assert_error(408, "request_timeout");
    assert!(c.is_closed(Duration::from_secs(2)));
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn idle_keep_alive_connections_are_closed() {
    let (_mock, proxy) = proxy_with("timeouts: { keepalive: 300ms }\n");
    let mut c = Client::connect(proxy.addr);
    c.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().status, 200);
    assert!(c.is_closed(Duration::from_secs(3)));
}

#[test]
fn request_ids_forwarded_for_and_hop_by_hop_headers() {
    let (_mock, proxy) = proxy_with("");
    let body = chat_body(false, 1);
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &body,
        &[
            ("x-mock-echo", "1"),
            ("x-request-id", "client-id-1"),
            ("x-forwarded-for", "10.0.0.1"),
            ("Connection", "X-Private"),
            ("X-Private", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("X-Custom", "kept"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-request-id"), Some("client-id-1"));
    let echo = r.json();
    let headers: Vec<(String, String)> = echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h[0].as_str().unwrap().to_string(),
                h[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    assert_eq!(get("x-request-id").as_deref(), Some("client-id-1"));
    assert_eq!(
        get("x-forwarded-for").as_deref(),
        Some("10.0.0.1, 127.0.0.1")
    );
    assert_eq!(get("x-custom").as_deref(), Some("kept"));
    for hop in ["x-private", "keep-alive", "te", "connection"] {
        assert_eq!(get(hop), None, "{hop} must not be forwarded");
    }
    // Without an id the proxy generates one, and it is forwarded too.
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &body,
        &[("x-mock-echo", "1")],
    );
    let id = r.header("x-request-id").expect("generated id").to_string();
    assert!(id.len() >= 16);
    let fwd = r.json()["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == "x-request-id")
        .map(|h| h[1].as_str().unwrap().to_string());
    assert_eq!(fwd.as_deref(), Some(id.as_str()));
    // Hop-by-hop headers from the backend are not relayed either.
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &body,
        &[("x-mock-keepalive-timeout-ms", "5000")],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("keep-alive"), None);
}

#[test]
fn unknown_model_is_404_and_model_list_is_the_union() {
    let a = Mock::start();
    let b = Mock::start();
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nworkers: 1\nbackends:\n  - url: \"{}\"\n    models: [\"llama-3-8b\"]\n  - url: \"{}\"\n    models: [\"qwen-7b\", \"llama-3-8b\"]\n",
        a.url(),
        b.url()
    );
    let proxy = Proxy::start(&yaml, &[]);
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-9","messages":[]}"#,
        &[],
    );
    r.assert_error(404, "model_not_found");
    let r = get(proxy.addr, "/v1/models");
    assert_eq!(r.status, 200);
    let ids: Vec<String> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec!["llama-3-8b", "qwen-7b"]);
    // qwen only goes to b.
    for _ in 0..4 {
        let r = post_json(
            proxy.addr,
            "/v1/chat/completions",
            r#"{"model":"qwen-7b","messages":[{"role":"user","content":"x"}]}"#,
            &[],
        );
        assert_eq!(r.status, 200);
    }
    assert_eq!(a.stat("requests"), 0);
    assert_eq!(b.stat("requests"), 4);
}

#[test]
fn v1_models_passes_through_when_models_are_not_configured() {
    let (_mock, proxy) = proxy_with("");
    let r = get(proxy.addr, "/v1/models");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"][0]["id"], "mock-model");
}

#[test]
fn other_paths_are_proxied() {
    let (mock, proxy) = proxy_with("");
    let r = post_json(
        proxy.addr,
        "/v1/embeddings",
        r#"{"model":"m","input":"a b c"}"#,
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["prompt_tokens"], 3);
    let r = post_json(
        proxy.addr,
        "/generate",
        r#"{"inputs":"a b","parameters":{"max_new_tokens":4,"details":true}}"#,
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-generated-tokens"), Some("4"));
    let r = get(proxy.addr, "/nope");
    assert_eq!(r.status, 404, "the backend's own 404 is relayed");
    assert_eq!(mock.stat("requests"), 2);
}

trait WriteOk {
    fn write_all_ok(&mut self, b: &[u8]) -> std::io::Result<()>;
}
impl WriteOk for std::net::TcpStream {
    fn write_all_ok(&mut self, b: &[u8]) -> std::io::Result<()> {
        std::io::Write::write_all(self, b)
    }
}
