//! LLM-aware routing end to end: `least_load` on the mocks' engine metrics (and its fallback to
//! in-flight counts when a metrics endpoint goes silent), `consistent_hash` affinity, model
//! pools with aliases and fallbacks.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn requests(m: &Mock) -> u64 {
    m.stat("requests")
}

/// The value of the first line of the proxy's `/metrics` that starts with `prefix`.
fn metric(proxy: &Proxy, prefix: &str) -> Option<f64> {
    let text = get(proxy.addr, "/metrics").text();
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits until the proxy has read engine metrics from every mock.
fn wait_for_scrapes(proxy: &Proxy, mocks: &[&Mock]) {
    for m in mocks {
        let series = format!(
            "llmproxy_backend_engine_metrics_up{{backend=\"{}\"}}",
            m.url()
        );
        assert!(
            eventually(Duration::from_secs(10), || metric(proxy, &series)
                == Some(1.0)),
            "no engine metrics scraped from {}",
            m.url()
        );
    }
}

/// `n` requests from each of `clients` threads at once, each held `ttft_ms` by the mock.
fn concurrent_chats(proxy: &Proxy, clients: usize, n: usize, ttft_ms: u32) {
    let ttft = ttft_ms.to_string();
    std::thread::scope(|s| {
        for _ in 0..clients {
            let ttft = ttft.as_str();
            s.spawn(move || {
                for _ in 0..n {
                    let r = post_json(
                        proxy.addr,
                        "/v1/chat/completions",
                        &chat_body(false, 1),
                        &[("x-mock-ttft-ms", ttft)],
                    );
                    assert_eq!(r.status, 200, "{}", r.text());
                }
            });
        }
    });
}

fn least_load_config(mocks: &[&Mock]) -> String {
    let urls: Vec<String> = mocks.iter().map(|m| m.url()).collect();
    config(
        &urls,
        "strategy: least_load\nrouting: { metrics_interval: 100ms }\n",
    )
}

#[test]
fn least_load_follows_engine_metrics_and_falls_back_when_they_go_silent() {
    // Scores with the default weights (queue 4, KV 8, in-flight 1): a = 84, b = 4.8, c = 8.8
    // plus in flight. So b takes the traffic until it holds 4 more requests than c; a, with its
    // deep queue, gets nothing.
    let a = Mock::start();
    let b = Mock::start();
    let c = Mock::start();
    a.control(r#"{"engine": {"waiting": 20, "kv_usage": 0.5}}"#);
    b.control(r#"{"engine": {"waiting": 1, "kv_usage": 0.1}}"#);
    c.control(r#"{"engine": {"waiting": 2, "kv_usage": 0.1}}"#);
    let proxy = Proxy::start(&least_load_config(&[&a, &b, &c]), &[]);
    wait_for_scrapes(&proxy, &[&a, &b, &c]);

    concurrent_chats(&proxy, 12, 8, 150);
    let (na, nb, nc) = (requests(&a), requests(&b), requests(&c));
    assert_eq!(na + nb + nc, 96);
    assert_eq!(na, 0, "a reports a deep queue: a={na} b={nb} c={nc}");
    assert!(
        nb > nc && nc > 0,
        "share must follow the scores: b={nb} c={nc}"
    );
    assert!(
        metric(
            &proxy,
            "llmproxy_routing_decisions_total{reason=\"engine_load\",strategy=\"least_load\"}"
        )
        .unwrap_or(0.0)
            >= 96.0
    );

    // a's metrics endpoint hangs: within the 2 s staleness bound a is judged by its in-flight
    // count alone (0), which beats b's and c's fresh scores, so it takes traffic again.
    a.control(r#"{"engine": {"hang": true}}"#);
    let silent = Instant::now();
    let switched = eventually(Duration::from_secs(8), || {
        let r = post_json(
            proxy.addr,
            "/v1/chat/completions",
            &chat_body(false, 1),
            &[],
        );
        assert_eq!(r.status, 200);
        requests(&a) > 0
    });
    let took = silent.elapsed();
    assert!(switched, "a never served after its metrics went silent");
    eprintln!("fell back to in-flight counts {took:?} after the metrics went silent");
    // 2 s staleness + scrape interval + tick; generous for a loaded box.
    assert!(took < Duration::from_secs(6), "{took:?}");
    assert!(
        metric(
            &proxy,
            "llmproxy_routing_decisions_total{reason=\"stale_metrics\",strategy=\"least_load\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    let up = format!(
        "llmproxy_backend_engine_metrics_up{{backend=\"{}\"}}",
        a.url()
    );
    assert!(eventually(Duration::from_secs(5), || metric(&proxy, &up) == Some(0.0)));

    // It answers again: its deep queue is seen once more and it stops getting traffic.
    a.control(r#"{"engine": {"hang": false}}"#);
    wait_for_scrapes(&proxy, &[&a]);
    std::thread::sleep(Duration::from_millis(300));
    let before = requests(&a);
    concurrent_chats(&proxy, 4, 5, 20);
    assert_eq!(requests(&a), before);
}

#[test]
fn least_load_avoids_a_full_kv_cache_while_another_has_room() {
    // a is idle but its KV cache is 97% full; b has a queue but room.
    let a = Mock::start();
    let b = Mock::start();
    a.control(r#"{"engine": {"waiting": 0, "kv_usage": 0.97}}"#);
    b.control(r#"{"engine": {"waiting": 6, "kv_usage": 0.4}}"#);
    let proxy = Proxy::start(&least_load_config(&[&a, &b]), &[]);
    wait_for_scrapes(&proxy, &[&a, &b]);
    concurrent_chats(&proxy, 4, 5, 20);
    assert_eq!(requests(&a), 0);
    assert_eq!(requests(&b), 20);
    // Both full: the lower score wins again, and the decision says why.
    b.control(r#"{"engine": {"kv_usage": 0.99}}"#);
    std::thread::sleep(Duration::from_millis(500));
    concurrent_chats(&proxy, 1, 5, 0);
    assert_eq!(requests(&a), 5);
    assert!(
        metric(
            &proxy,
            "llmproxy_routing_decisions_total{reason=\"kv_saturated\",strategy=\"least_load\"}"
        )
        .unwrap_or(0.0)
            >= 5.0
    );
}
