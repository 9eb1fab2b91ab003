//! Fault injection: backends that die mid-stream, stall, speak garbage, reset every other
//! connection, or all go down and come back. The client must always get an answer or a clean,
//! visibly incomplete end of stream (never a hang), the proxy must survive, and every request must
//! still produce its usage event with the right outcome.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::webhook::Webhook;
use common::*;

/// A proxy in front of `mocks` delivering usage events to a fresh webhook receiver.
fn metered(mocks: &[&Mock], extra: &str) -> (Webhook, Proxy) {
    let hook = Webhook::start();
    let urls: Vec<String> = mocks.iter().map(|m| m.url()).collect();
    let yaml = config(&urls, &format!("{extra}{}", hook.config_yaml()));
    (hook, Proxy::start(&yaml, &[]))
}

/// Sends a streaming chat request and returns the connection, its response head read.
fn open_stream(proxy: &Proxy, tokens: u32, headers: &[(&str, &str)]) -> Client {
    let mut c = Client::connect(proxy.addr);
    c.send(
        post_raw(
            "/v1/chat/completions",
            &chat_body(true, tokens),
            headers,
            false,
        )
        .as_bytes(),
    );
    c
}

/// A stream cut by a failure: the head and some tokens arrived, then an SSE error event, and
/// the body is visibly incomplete (no `[DONE]`, no last chunk) so no client takes it as whole.
fn assert_cut_stream(text: &str, code: &str) {
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.contains("[DONE]"),
        "a cut stream ended like a whole one"
    );
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a cut stream has the last chunk"
    );
    let error = text
        .split("\n\n")
        .filter_map(|e| e.split("data: ").nth(1))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d.trim()).ok())
        .find(|v| v.get("error").is_some())
        .unwrap_or_else(|| panic!("no SSE error event in {text}"));
    assert_eq!(error["error"]["code"], code, "{error}");
    assert!(error["error"]["message"].is_string());
}

fn event_for<'a>(events: &'a [serde_json::Value], request_id: &str) -> &'a serde_json::Value {
    events
        .iter()
        .find(|e| e["request_id"] == request_id)
        .unwrap_or_else(|| panic!("no usage event for {request_id}: {events:?}"))
}

#[test]
fn a_backend_killed_mid_stream_ends_the_stream_and_is_billed_as_upstream_error() {
    let mut mock = Mock::start_with(&["--token-delay-ms", "100"]);
    let (hook, proxy) = metered(&[&mock], "");
    let mut c = open_stream(&proxy, 50, &[("x-request-id", "killed-1")]);
    let mut first = [0u8; 1024];
    assert!(c.stream.read(&mut first).expect("first bytes") > 0);
    std::thread::sleep(Duration::from_millis(250));
    mock.proc.child.kill().expect("kill the backend");
    let _ = mock.proc.child.wait();
    let mut text = String::from_utf8_lossy(&first).into_owned();
    text.push_str(&c.read_until_closed(Duration::from_secs(5)));
    assert!(text.contains("tok0"), "{text}");
    assert_cut_stream(&text, "upstream_closed");
    let events = hook.wait_events_within(1, Duration::from_secs(10));
    let ev = event_for(&events, "killed-1");
    assert_eq!(ev["outcome"], "upstream_error", "{ev}");
    assert_eq!(ev["status"], 200);
    assert_eq!(ev["is_stream"], true);
    // The proxy lives on and says the backend is gone.
    assert!(eventually(Duration::from_secs(5), || {
        get(proxy.addr, "/health").status == 503
    }));
}

#[test]
fn a_backend_resetting_mid_stream_is_the_same_clean_cut() {
    let mock = Mock::start_with(&["--token-delay-ms", "20"]);
    let (hook, proxy) = metered(&[&mock], "");
    let mut c = open_stream(
        &proxy,
        20,
        &[("x-mock-reset-after", "3"), ("x-request-id", "reset-1")],
    );
    let text = c.read_until_closed(Duration::from_secs(5));
    assert!(text.contains("tok2") && !text.contains("tok3"), "{text}");
    assert_cut_stream(&text, "upstream_closed");
    let events = hook.wait_events_within(1, Duration::from_secs(10));
    assert_eq!(event_for(&events, "reset-1")["outcome"], "upstream_error");
    // The reset connection was not pooled: the next request works.
    let r = post_json(proxy.addr, "/v1/chat/completions", &chat_body(true, 3), &[]);
    assert_eq!(r.status, 200);
    assert!(r.text().contains("[DONE]"));
}

#[test]
fn stalls_give_504_before_the_head_and_cut_the_stream_after_it() {
    let mock = Mock::start();
    let (hook, proxy) = metered(
        &[&mock],
        "timeouts: { first_byte: 400ms, idle: 400ms }\nretry: { attempts: 0 }\n",
    );
    // No response head at all: 504 after first_byte.
    let start = Instant::now();
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(true, 5),
        &[("x-mock-stall", "head"), ("x-request-id", "stall-head")],
    );
    r.assert_error(504, "upstream_timeout");
    assert!(start.elapsed() < Duration::from_secs(3));

    // A head, then nothing before the first token; then a stall between tokens.
    for (id, hook_header, value) in [
        ("stall-ttft", "x-mock-ttft-ms", "60000"),
        ("stall-between", "x-mock-stall-after", "3"),
    ] {
        let start = Instant::now();
        let mut c = open_stream(&proxy, 10, &[(hook_header, value), ("x-request-id", id)]);
        let text = c.read_until_closed(Duration::from_secs(5));
        assert!(start.elapsed() >= Duration::from_millis(350), "{id}");
        assert_cut_stream(&text, "upstream_timeout");
        if id == "stall-between" {
            assert!(text.contains("tok2") && !text.contains("tok3"), "{text}");
        }
    }
    let events = hook.wait_events_within(3, Duration::from_secs(10));
    for id in ["stall-head", "stall-ttft", "stall-between"] {
        assert_eq!(event_for(&events, id)["outcome"], "timeout", "{id}");
    }
    // Each stalled upstream connection was dropped, not left hanging on the backend.
    assert!(eventually(Duration::from_secs(3), || mock.stat("active") == 0));
    assert_eq!(mock.stat("disconnects"), 3);
}

#[test]
fn garbage_from_a_backend_is_a_502_or_a_cut_stream_and_is_never_pooled() {
    let mock = Mock::start();
    let (hook, proxy) = metered(&[&mock], "");
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 2),
        &[("x-mock-garbage", "head"), ("x-request-id", "garbage-head")],
    );
    r.assert_error(502, "upstream_protocol_error");
    let mut c = open_stream(
        &proxy,
        5,
        &[
            ("x-mock-garbage", "chunk"),
            ("x-mock-token-delay-ms", "100"),
            ("x-request-id", "garbage-chunk"),
        ],
    );
    let text = c.read_until_closed(Duration::from_secs(5));
    assert!(text.contains("tok0"), "{text}");
    assert_cut_stream(&text, "upstream_protocol_error");
    let events = hook.wait_events_within(2, Duration::from_secs(10));
    assert_eq!(event_for(&events, "garbage-head")["status"], 502);
    for id in ["garbage-head", "garbage-chunk"] {
        assert_eq!(event_for(&events, id)["outcome"], "upstream_error", "{id}");
    }
    for _ in 0..3 {
        let r = post_json(
            proxy.addr,
            "/v1/chat/completions",
            &chat_body(false, 2),
            &[],
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(get(proxy.addr, "/health").status, 200);
}

#[test]
fn a_backend_resetting_every_other_connection_is_hidden_by_retries() {
    let flaky = Mock::start();
    let steady = Mock::start();
    let (hook, proxy) = metered(&[&flaky, &steady], "strategy: round_robin\n");
    flaky.control(r#"{"reset_every": 2}"#);
    // `x-mock-close` makes every request open a new upstream connection.
    let n = 20;
    for i in 0..n {
        let stream = i % 2 == 0;
        let r = post_json(
            proxy.addr,
            "/v1/chat/completions",
            &chat_body(stream, 3),
            &[("x-mock-close", "1")],
        );
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        if stream {
            assert!(r.text().contains("[DONE]"));
        }
    }
    assert!(
        flaky.stat("requests") >= 4,
        "the flaky backend was not exercised"
    );
    let events = hook.wait_events_within(n, Duration::from_secs(10));
    assert_eq!(events.len(), n, "one usage event per request");
    assert!(events.iter().all(|e| e["outcome"] == "ok"), "{events:?}");

    // Alone, the same backend fails every other request: fast, in the error shape.
    let (_hook, alone) = metered(&[&flaky], "retry: { attempts: 0 }\n");
    flaky.control(r#"{"reset_every": 2}"#);
    let statuses: Vec<u16> = (0..6)
        .map(|_| {
            let r = post_json(
                alone.addr,
                "/v1/chat/completions",
                &chat_body(false, 1),
                &[("x-mock-close", "1")],
            );
            if r.status != 200 {
                r.assert_error(502, "upstream_closed");
            }
            r.status
        })
        .collect();
    assert_eq!(statuses, [200, 502, 200, 502, 200, 502]);
}

#[test]
fn all_backends_down_gives_503s_then_recovers_within_a_health_interval() {
    let mut a = Mock::start();
    let mut b = Mock::start();
    let (ports, urls) = ([a.addr.port(), b.addr.port()], [a.url(), b.url()]);
    let yaml = config(
        &urls,
        "health_check: { interval: 500ms, path: /health, timeout: 300ms }\n",
    )
    .replace(
        "health_check: { interval: 1s, path: /health, timeout: 500ms }\n",
        "",
    );
    let proxy = Proxy::start(&yaml, &[]);
    let ok = || {
        post_json(
            proxy.addr,
            "/v1/chat/completions",
            &chat_body(false, 1),
            &[],
        )
    };
    assert_eq!(ok().status, 200);
    for m in [&mut a, &mut b] {
        m.proc.child.kill().expect("kill");
        let _ = m.proc.child.wait();
    }
    // During the outage every request is answered at once: 502 while the proxy learns, then 503.
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let start = Instant::now();
        let r = ok();
        assert!(start.elapsed() < Duration::from_secs(3), "slow failure");
        assert!(matches!(r.status, 502 | 503), "{}", r.text());
        statuses.push(r.status);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(statuses.last(), Some(&503), "{statuses:?}");
    let r = ok();
    r.assert_error(503, "no_healthy_backend");
    assert_eq!(get(proxy.addr, "/health").status, 503);

    // Both come back on their ports: traffic flows again within about one health interval.
    let back: Vec<Mock> = ports.iter().map(|p| Mock::start_on(*p, &[])).collect();
    let start = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || ok().status == 200),
        "no recovery"
    );
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "recovery took {took:?}");
    assert_eq!(get(proxy.addr, "/health").status, 200);
    drop(back);
}
