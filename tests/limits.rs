//! Admission control over real sockets: per-key request and token rates (429 + Retry-After),
//! the process-wide connection limit, and per-backend `max_inflight` with its wait queue.

mod common;

use std::time::Duration;

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
