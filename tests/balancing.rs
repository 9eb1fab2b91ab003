//! Load balancing across backends and cores, health checks (active and passive), retries.

mod common;

use std::io::Read;
use std::time::Duration;

use common::*;

fn yaml(backends: &[(&Mock, u32, Option<&str>)], extra: &str, workers: usize) -> String {
    let mut s = format!("listen: \"127.0.0.1:0\"\nworkers: {workers}\nbackends:\n");
    for (m, w, models) in backends {
        s.push_str(&format!("  - url: \"{}\"\n    weight: {w}\n", m.url()));
        if let Some(models) = models {
            s.push_str(&format!("    models: [{models}]\n"));
        }
    }
    s.push_str("health_check: { interval: 500ms, path: /health, timeout: 300ms }\n");
    s.push_str(extra);
    s
}

#[test]
fn weighted_round_robin_is_exact_and_interleaved() {
    let a = Mock::start();
    let b = Mock::start();
    let proxy = Proxy::start(
        &yaml(
            &[(&a, 5, None), (&b, 1, None)],
            "strategy: weighted_round_robin\n",
            1,
        ),
        &[],
    );
    let mut c = Client::connect(proxy.addr);
    let mut order = Vec::new();
    for _ in 0..60 {
        c.send(
            post_raw(
                "/v1/chat/completions",
                &chat_body(false, 1),
                &[("x-mock-echo", "1")],
                false,
            )
            .as_bytes(),
        );
        let r = c.read_response();
        assert_eq!(r.status, 200);
        order.push(r.json()["port"].as_u64().unwrap_or(0));
    }
    assert_eq!(a.stat("requests"), 50);
    assert_eq!(b.stat("requests"), 10);
    // Smooth: never more than 5 of `a` in a row.
    let b_port = u64::from(b.addr.port());
    let mut run = 0;
    for p in order {
        if p == b_port {
            run = 0;
        } else {
            run += 1;
            assert!(run <= 5, "burst of {run}");
        }
    }
}

#[test]
fn least_connections_shows_weights_with_sequential_requests() {
    // Every pick sees both backends idle: the tie is broken by weight (3:1), not at random.
    let a = Mock::start();
    let b = Mock::start();
    let proxy = Proxy::start(
        &yaml(
            &[(&a, 3, None), (&b, 1, None)],
            "strategy: least_connections\n",
            1,
        ),
        &[],
    );
    chats_ok(proxy.addr, 40);
    assert_eq!((a.stat("requests"), b.stat("requests")), (30, 10));
}

#[test]
fn round_robin_alternates() {
    let a = Mock::start();
    let b = Mock::start();
    let proxy = Proxy::start(
        &yaml(
            &[(&a, 1, None), (&b, 1, None)],
            "strategy: round_robin\n",
            1,
        ),
        &[],
    );
    for _ in 0..10 {
        assert_eq!(
            post_json(
                proxy.addr,
                "/v1/chat/completions",
                &chat_body(false, 1),
                &[]
            )
            .status,
            200
        );
    }
    assert_eq!(a.stat("requests"), 5);
    assert_eq!(b.stat("requests"), 5);
}

#[test]
fn least_connections_avoids_a_backend_holding_long_streams_across_cores() {
    for strategy in ["least_connections", "power_of_two"] {
        load_aware_strategy_avoids_busy_backend(strategy);
    }
}

fn load_aware_strategy_avoids_busy_backend(strategy: &str) {
    let a = Mock::start();
    let b = Mock::start();
    // "long" only lives on a; "m" on both.
    let proxy = Proxy::start(
        &yaml(
            &[(&a, 1, Some("\"long\", \"m\"")), (&b, 1, Some("\"m\""))],
            &format!("strategy: {strategy}\n"),
            2,
        ),
        &[],
    );
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = Client::connect(proxy.addr);
        c.send(
            post_raw(
                "/v1/chat/completions",
                r#"{"model":"long","stream":true,"messages":[{"role":"user","content":"x"}]}"#,
                &[("x-mock-stall-after", "1")],
                false,
            )
            .as_bytes(),
        );
        let mut buf = [0u8; 1024];
        assert!(c.stream.read(&mut buf).unwrap() > 0);
        held.push(c);
    }
    assert_eq!(a.stat("active"), 4);
    // Both cores must know about a's 4 streams (each core only holds some of them itself).
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..12 {
        let r = post_json(
            proxy.addr,
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
            &[],
        );
        assert_eq!(r.status, 200);
    }
    assert_eq!(b.stat("requests"), 12, "new work went to the idle backend");
    assert_eq!(a.stat("requests"), 4);
    drop(held);
}

#[test]
fn a_backend_killed_mid_run_fails_no_later_request() {
    let a = Mock::start();
    let mut b = Mock::start();
    let proxy = Proxy::start(
        &yaml(
            &[(&a, 1, None), (&b, 1, None)],
            "strategy: round_robin\n",
            1,
        ),
        &[],
    );
    for _ in 0..10 {
        assert_eq!(
            post_json(
                proxy.addr,
                "/v1/chat/completions",
                &chat_body(false, 1),
                &[]
            )
            .status,
            200
        );
    }
    b.proc.child.kill().unwrap();
    b.proc.child.wait().unwrap();
    chats_ok(proxy.addr, 30);
    assert!(eventually(Duration::from_secs(3), || {
        get(proxy.addr, "/health").json()["backends"][1]["up"] == false
    }));
    proxy.proc.wait_for_line("is down", Duration::from_secs(3));
}

#[test]
fn health_checks_take_backends_out_and_back_and_503_when_none() {
    let a = Mock::start();
    let b = Mock::start();
    let proxy = Proxy::start(
        &yaml(
            &[(&a, 1, None), (&b, 1, None)],
            "strategy: round_robin\n",
            2,
        ),
        &[],
    );
    let h = get(proxy.addr, "/health");
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    a.control(r#"{"health_status": 503}"#);
    assert!(eventually(Duration::from_secs(4), || get(
        proxy.addr, "/health"
    )
    .json()["backends"][0]["up"]
        == false));
    let before = a.stat("requests");
    for _ in 0..10 {
        assert_eq!(
            post_json(
                proxy.addr,
                "/v1/chat/completions",
                &chat_body(false, 1),
                &[]
            )
            .status,
            200
        );
    }
    assert_eq!(a.stat("requests"), before, "a down backend gets no traffic");
    b.control(r#"{"health_status": 503}"#);
    assert!(eventually(Duration::from_secs(4), || get(
        proxy.addr, "/health"
    )
    .status
        == 503));
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 1),
        &[],
    );
    r.assert_error(503, "no_healthy_backend");
    a.control(r#"{"health_status": null}"#);
    assert!(eventually(Duration::from_secs(4), || get(
        proxy.addr, "/health"
    )
    .status
        == 200));
    assert_eq!(
        post_json(
            proxy.addr,
            "/v1/chat/completions",
            &chat_body(false, 1),
            &[]
        )
        .status,
        200
    );
}

#[test]
fn backend_503_is_retried_on_another_backend_but_4xx_is_not() {
    let a = Mock::start();
    let b = Mock::start();
    let proxy = Proxy::start(
        &yaml(
            &[(&a, 1, None), (&b, 1, None)],
            "strategy: round_robin\n",
            1,
        ),
        &[],
    );
    a.control(r#"{"fail_status": 503}"#);
    chats_ok(proxy.addr, 6);
    a.control(r#"{"fail_status": 400}"#);
    let statuses: Vec<u16> = (0..4)
        .map(|_| {
            post_json(
                proxy.addr,
                "/v1/chat/completions",
                &chat_body(false, 1),
                &[],
            )
            .status
        })
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 400).count(),
        2,
        "{statuses:?}"
    );
    let m = get(proxy.addr, "/metrics").text();
    assert!(m.contains("llmproxy_upstream_retries_total"), "{m}");
}

#[test]
fn all_backends_unreachable_gives_502_then_503() {
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(&config(&[format!("http://{dead}")], ""), &[]);
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 1),
        &[],
    );
    r.assert_error(502, "upstream_connect_error");
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 1),
        &[],
    );
    r.assert_error(503, "no_healthy_backend");
    assert_eq!(get(proxy.addr, "/health").status, 503);
}
