//! Passive outlier detection: a backend that keeps answering 500 is taken out of rotation by its
//! circuit breaker, probed after the cool-down and put back once it heals; backpressure (429,
//! 503) and client errors never open it. State is checked in /health and /metrics.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Two workers, so that trips, probes and recoveries have to cross cores.
fn yaml(backends: &[&Mock], breaker: &str) -> String {
    let mut s = String::from("listen: \"127.0.0.1:0\"\nworkers: 2\nstrategy: round_robin\n");
    s.push_str("backends:\n");
    for m in backends {
        s.push_str(&format!("  - url: \"{}\"\n", m.url()));
    }
    s.push_str("health_check: { interval: 500ms, path: /health, timeout: 300ms }\n");
    s.push_str(breaker);
    s
}

/// A proxy in front of `m` alone, without retries (the default `timeouts.first_byte` is 60 s).
fn alone(m: &Mock, extra: &str) -> Proxy {
    Proxy::start(
        &format!("{}retry: {{ attempts: 0 }}\n{extra}", yaml(&[m], "")),
        &[],
    )
}

fn chat(proxy: &Proxy, headers: &[(&str, &str)]) -> Response {
    post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 1),
        headers,
    )
}

/// The breaker state /health reports for `m`.
fn breaker(proxy: &Proxy, m: &Mock) -> String {
    let h = get(proxy.addr, "/health").json();
    let url = m.url();
    h["backends"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["url"] == url.as_str()))
        .map(|b| b["breaker"].as_str().unwrap_or("?").to_string())
        .unwrap_or_default()
}

/// The series of `llmproxy_breaker_transitions_total` for `m` and `to`.
fn transitions(m: &Mock, to: &str) -> String {
    format!(
        "llmproxy_breaker_transitions_total{{backend=\"{}\",to=\"{to}\"}}",
        m.url()
    )
}

/// The value of the metric line starting with `prefix` (name and labels), if present.
#[test]
fn a_failing_backend_is_cut_off_then_probed_back_in() {
    let bad = Mock::start();
    let good = Mock::start();
    let proxy = Proxy::start(
        &yaml(
            &[&bad, &good],
            "breaker: { consecutive_failures: 3, cooldown: 1s, max_cooldown: 2s }\n",
        ),
        &[],
    );
    let state = format!(
        "llmproxy_backend_breaker_state{{backend=\"{}\"}}",
        bad.url()
    );
    let opened = transitions(&bad, "open");
    assert_eq!(breaker(&proxy, &bad), "closed");
    assert_eq!(metric(&proxy, &state), Some(0.0));
    assert_eq!(metric(&proxy, &opened), Some(0.0));

    bad.control(r#"{"fail_status": 500}"#);
    // Each core trips after 3 faults in a row; then the health thread opens it everywhere.
    let mut errors = 0;
    let tripped = eventually(Duration::from_secs(20), || {
        if chat(&proxy, &[]).status == 500 {
            errors += 1;
        }
        breaker(&proxy, &bad) != "closed"
    });
    assert!(tripped, "breaker never opened after {errors} errors");
    // Never more than the two cores' streaks (3 + 3) plus probes.
    assert!(errors <= 10, "{errors} errors before the breaker opened");
    // Open is not down: health checks still pass.
    let h = get(proxy.addr, "/health");
    assert_eq!(h.status, 200);
    let backends = h.json()["backends"].clone();
    assert!(backends.as_array().unwrap().iter().all(|b| b["up"] == true));
    // The core that answered may have tripped on its own; the health thread follows at once.
    let counted = eventually(Duration::from_secs(10), || {
        metric(&proxy, &opened).unwrap_or(0.0) >= 1.0
            && matches!(metric(&proxy, &state), Some(s) if s == 1.0 || s == 2.0)
    });
    assert!(counted, "breaker metrics missing the opening");

    // While open, traffic goes to the good backend; the bad one sees at most one probe per
    // cool-down (1 s, doubling to 2 s after a failed probe).
    let before = bad.stat("requests");
    let start = Instant::now();
    let mut failed = 0;
    for _ in 0..30 {
        if chat(&proxy, &[]).status != 200 {
            failed += 1;
        }
    }
    let probes = bad.stat("requests") - before;
    let allowed = 4 + start.elapsed().as_secs();
    assert!(
        probes <= allowed,
        "{probes} requests reached the open backend in {:?}",
        start.elapsed()
    );
    assert_eq!(failed, probes, "only probes may fail");

    // Healed: the next probe succeeds and closes the breaker; traffic returns.
    bad.control(r#"{"fail_status": null}"#);
    let closed = eventually(Duration::from_secs(30), || {
        chat(&proxy, &[]);
        breaker(&proxy, &bad) == "closed"
    });
    assert!(closed, "breaker never closed after the backend healed");
    let before = bad.stat("requests");
    for _ in 0..20 {
        assert_eq!(chat(&proxy, &[]).status, 200);
    }
    assert!(
        bad.stat("requests") - before >= 5,
        "healed backend gets no traffic"
    );
    assert_eq!(metric(&proxy, &state), Some(0.0));
    let closes = transitions(&bad, "closed");
    assert!(metric(&proxy, &closes).unwrap_or(0.0) >= 1.0);
    let half = transitions(&bad, "half_open");
    assert!(metric(&proxy, &half).unwrap_or(0.0) >= 1.0);
}

#[test]
fn backpressure_and_client_errors_never_open_it() {
    let a = Mock::start();
    let b = Mock::start();
    let proxy = Proxy::start(
        &yaml(&[&a, &b], "breaker: { consecutive_failures: 2 }\n"),
        &[],
    );
    // 503 from `a`: retried on `b`, never counted against `a`.
    a.control(r#"{"fail_status": 503}"#);
    for _ in 0..20 {
        assert_eq!(chat(&proxy, &[]).status, 200);
    }
    a.control(r#"{"fail_status": null}"#);
    // 429 and 4xx from both, many in a row.
    for status in ["429", "400", "404"] {
        for _ in 0..10 {
            let r = chat(&proxy, &[("x-mock-status", status)]);
            assert_eq!(r.status.to_string(), status);
        }
    }
    for m in [&a, &b] {
        assert_eq!(breaker(&proxy, m), "closed");
        let opened = transitions(m, "open");
        assert_eq!(metric(&proxy, &opened), Some(0.0));
    }
    // Both still take traffic.
    let (ra, rb) = (a.stat("requests"), b.stat("requests"));
    for _ in 0..10 {
        assert_eq!(chat(&proxy, &[]).status, 200);
    }
    assert!(a.stat("requests") > ra && b.stat("requests") > rb);
}

#[test]
fn disabled_breaker_keeps_sending_to_a_failing_backend() {
    let bad = Mock::start();
    let good = Mock::start();
    let proxy = Proxy::start(
        &yaml(
            &[&bad, &good],
            "breaker: { enabled: false, consecutive_failures: 1 }\n",
        ),
        &[],
    );
    bad.control(r#"{"fail_status": 500}"#);
    let mut errors = 0;
    for _ in 0..20 {
        if chat(&proxy, &[]).status == 500 {
            errors += 1;
        }
    }
    // Round robin over two backends: about half the requests keep failing.
    assert!(
        errors >= 8,
        "only {errors} of 20 requests reached the failing backend"
    );
    assert_eq!(breaker(&proxy, &bad), "closed");
}

/// Sends one request on a fresh connection and reads whatever comes back until the proxy closes
/// it (a reset stream ends abnormally, so no response parsing).
fn send_and_drain(proxy: &Proxy, headers: &[(&str, &str)]) -> String {
    use std::io::{Read, Write};
    let raw = post_raw("/v1/chat/completions", &chat_body(true, 10), headers, true);
    let mut s = std::net::TcpStream::connect(proxy.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(raw.as_bytes()).expect("send");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn resets_and_first_byte_timeouts_are_faults() {
    let m = Mock::start();
    let settings =
        "timeouts: { first_byte: 300ms }\nbreaker: { consecutive_failures: 1, cooldown: 1m }\n";
    // A stream reset by the backend after two events: an upstream read error.
    let proxy = alone(&m, settings);
    let out = send_and_drain(&proxy, &[("x-mock-reset-after", "2")]);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // Counted by the health thread, which has then told every core.
    let opened = transitions(&m, "open");
    let counted = || metric(&proxy, &opened) == Some(1.0);
    assert!(eventually(Duration::from_secs(10), counted));
    assert_eq!(breaker(&proxy, &m), "open");
    // The only backend is cut off although its health checks pass.
    chat(&proxy, &[]).assert_error(503, "no_healthy_backend");
    let h = get(proxy.addr, "/health");
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["backends"][0]["up"], true);
    drop(proxy);
    // No response head within timeouts.first_byte.
    let proxy = alone(&m, settings);
    assert_eq!(breaker(&proxy, &m), "closed");
    let r = chat(&proxy, &[("x-mock-stall", "head")]);
    r.assert_error(504, "upstream_timeout");
    assert!(eventually(Duration::from_secs(10), || breaker(&proxy, &m) == "open"));
}

#[test]
fn a_probe_whose_client_leaves_is_handed_back_at_once() {
    let m = Mock::start();
    let proxy = alone(
        &m,
        "breaker: { consecutive_failures: 1, cooldown: 500ms, max_cooldown: 500ms }\n",
    );
    m.control(r#"{"fail_status": 500}"#);
    let opened = eventually(Duration::from_secs(10), || {
        chat(&proxy, &[]);
        breaker(&proxy, &m) != "closed"
    });
    assert!(opened);
    m.control(r#"{"fail_status": null}"#);
    assert!(eventually(Duration::from_secs(10), || breaker(&proxy, &m)
        == "half_open"));
    // The probe stalls before its response head, and its client gives up.
    let mut c = Client::connect(proxy.addr);
    let raw = post_raw(
        "/v1/chat/completions",
        &chat_body(false, 1),
        &[("x-mock-stall", "head")],
        false,
    );
    c.send(raw.as_bytes());
    assert!(eventually(Duration::from_secs(10), || m.stat("active") == 1));
    drop(c);
    // Without the hand-back the probe would stay taken for first_byte (60 s).
    let closed = eventually(Duration::from_secs(15), || {
        chat(&proxy, &[]);
        breaker(&proxy, &m) == "closed"
    });
    assert!(closed, "the abandoned probe was not handed back");
}

#[test]
fn a_reload_that_disables_the_breaker_closes_it() {
    let m = Mock::start();
    let on = "breaker: { consecutive_failures: 1, cooldown: 10m, max_cooldown: 10m }\n";
    let proxy = alone(&m, on);
    m.control(r#"{"fail_status": 500}"#);
    assert_eq!(chat(&proxy, &[]).status, 500);
    let counted = || metric(&proxy, &transitions(&m, "open")) == Some(1.0);
    assert!(eventually(Duration::from_secs(10), counted));
    chat(&proxy, &[]).assert_error(503, "no_healthy_backend");
    // Cut off for 10 minutes, unless the breaker is turned off.
    m.control(r#"{"fail_status": null}"#);
    let path = proxy.dir.join("config.yaml");
    let off = std::fs::read_to_string(&path)
        .unwrap()
        .replace(on, "breaker: { enabled: false }\n");
    std::fs::write(&path, off).unwrap();
    let r = post_json(proxy.addr, "/admin/reload", "", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let closed = || metric(&proxy, &transitions(&m, "closed")) == Some(1.0);
    assert!(eventually(Duration::from_secs(10), closed));
    assert_eq!(breaker(&proxy, &m), "closed");
    assert_eq!(chat(&proxy, &[]).status, 200);
}
