//! LLM-aware routing end to end: `least_load` on the mocks' engine metrics (and its fallback to
//! in-flight counts when a metrics endpoint goes silent), `consistent_hash` affinity,
//! `prefix_cache` (a hot prefix stays, then spills; misses spread), model pools with aliases and
//! fallbacks.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn requests(m: &Mock) -> u64 {
    m.stat("requests")
}

fn post_chat(proxy: &Proxy, body: &str, headers: &[(&str, &str)]) -> Response {
    post_json(proxy.addr, "/v1/chat/completions", body, headers)
}

/// One small chat completion through the proxy, which must succeed.
fn chat(proxy: &Proxy, headers: &[(&str, &str)]) {
    let r = post_chat(proxy, &chat_body(false, 1), headers);
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Asserts that `llmproxy_routing_decisions_total{strategy, reason}` reaches `n` (cores flush
/// their counts on their tick, so it may take a moment).
#[track_caller]
fn assert_decisions(proxy: &Proxy, strategy: &str, reason: &str, n: f64) {
    let series =
        format!("llmproxy_routing_decisions_total{{reason=\"{reason}\",strategy=\"{strategy}\"}}");
    let mut last = None;
    let ok = eventually(Duration::from_secs(3), || {
        last = metric(proxy, &series);
        last.unwrap_or(0.0) >= n
    });
    assert!(ok, "{series} = {last:?}, expected at least {n}");
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
                    chat(proxy, &[("x-mock-ttft-ms", ttft)]);
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
    assert_decisions(&proxy, "least_load", "engine_load", 96.0);

    // a's metrics endpoint hangs: within the 2 s staleness bound a is judged by its in-flight
    // count alone (0), which beats b's and c's fresh scores, so it takes traffic again.
    a.control(r#"{"engine": {"hang": true}}"#);
    let silent = Instant::now();
    let switched = eventually(Duration::from_secs(8), || {
        chat(&proxy, &[]);
        requests(&a) > 0
    });
    let took = silent.elapsed();
    assert!(switched, "a never served after its metrics went silent");
    eprintln!("fell back to in-flight counts {took:?} after the metrics went silent");
    // 2 s staleness + scrape interval + tick; generous for a loaded box.
    assert!(took < Duration::from_secs(6), "{took:?}");
    assert_decisions(&proxy, "least_load", "stale_metrics", 1.0);
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
    assert_decisions(&proxy, "least_load", "kv_saturated", 5.0);
}

/// The port of the mock that served a request (the mock echoes it).
fn served_by(proxy: &Proxy, body: &str, headers: &[(&str, &str)]) -> u64 {
    let mut h = headers.to_vec();
    h.push(("x-mock-echo", "1"));
    let r = post_chat(proxy, body, &h);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["port"].as_u64().unwrap_or(0)
}

fn hash_config(mocks: &[&Mock], routing: &str) -> String {
    let urls: Vec<String> = mocks.iter().map(|m| m.url()).collect();
    config(
        &urls,
        &format!("strategy: consistent_hash\nrouting: {{ {routing} }}\n"),
    )
}

#[test]
fn consistent_hash_keeps_sessions_on_one_backend_and_spreads_them() {
    let mocks = [Mock::start(), Mock::start(), Mock::start()];
    let refs: Vec<&Mock> = mocks.iter().collect();
    let proxy = Proxy::start(
        &hash_config(
            &refs,
            "hash_key: \"header:x-session-id,body:user,prefix:2\"",
        ),
        &["--workers", "2"],
    );
    let body = chat_body(false, 1);
    let mut ports = std::collections::HashSet::new();
    for s in 0..30 {
        let session = format!("session-{s}");
        let h = [("x-session-id", session.as_str())];
        let first = served_by(&proxy, &body, &h);
        for _ in 0..3 {
            assert_eq!(served_by(&proxy, &body, &h), first, "{session} moved");
        }
        ports.insert(first);
    }
    assert_eq!(ports.len(), 3, "30 sessions should reach all 3 backends");

    // No header: the body's user, then the conversation's first two messages.
    let user = |u: &str| {
        format!(r#"{{"model":"m","user":"{u}","messages":[{{"role":"user","content":"x"}}]}}"#)
    };
    let home = served_by(&proxy, &user("alice"), &[]);
    for _ in 0..5 {
        assert_eq!(served_by(&proxy, &user("alice"), &[]), home);
    }
    let chat = |turns: &[&str]| {
        let msgs: Vec<String> = turns
            .iter()
            .map(|t| format!(r#"{{"role":"user","content":"{t}"}}"#))
            .collect();
        format!(r#"{{"model":"m","messages":[{}]}}"#, msgs.join(","))
    };
    for start in ["tell me about cats", "tell me about dogs", "and birds?"] {
        let home = served_by(&proxy, &chat(&["sys", start]), &[]);
        assert_eq!(
            served_by(&proxy, &chat(&["sys", start, "reply", "more"]), &[]),
            home
        );
        assert_eq!(
            served_by(
                &proxy,
                &chat(&["sys", start, "reply", "more", "r2", "again"]),
                &[]
            ),
            home
        );
    }
    assert_decisions(&proxy, "consistent_hash", "affinity_hit", 100.0);
}

#[test]
fn consistent_hash_gives_up_affinity_beyond_max_imbalance() {
    let a = Mock::start();
    let b = Mock::start();
    let proxy = Proxy::start(&hash_config(&[&a, &b], "max_imbalance: 2"), &[]);
    // Eight requests of one session at once, each held 600 ms: its home backend takes three
    // (in flight 0, 1, 2 against 0), then the guard sends the rest to the other one.
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                chat(
                    &proxy,
                    &[("x-session-id", "hot"), ("x-mock-ttft-ms", "600")],
                );
            });
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let (na, nb) = (requests(&a), requests(&b));
    assert_eq!(na + nb, 8);
    assert!(na >= 2 && nb >= 2, "both must serve: a={na} b={nb}");
    assert_decisions(&proxy, "consistent_hash", "imbalance_fallback", 1.0);
    // Without a key: least loaded, counted as such.
    chat(&proxy, &[]);
    assert_decisions(&proxy, "consistent_hash", "no_key", 1.0);
}

/// Two mocks, `small` on a and `big` on b, as model pools: `small` (alias `fast`, renamed
/// upstream, round robin) falls back to `big`.
/// Backends `small` serving pool small (aliases `small_aliases`) and `b` serving big.
fn pools_yaml(small: &[&Mock], b: &Mock, small_aliases: &str) -> String {
    let mut yaml = String::from("listen: \"127.0.0.1:0\"\nworkers: 1\nbackends:\n");
    for m in small {
        yaml.push_str(&format!(
            "  - {{ url: \"{}\", models: [small] }}\n",
            m.url()
        ));
    }
    yaml.push_str(&format!(
        "  - {{ url: \"{}\", models: [big] }}\n\
         health_check: {{ interval: 200ms, path: /health, timeout: 200ms }}\n\
         models:\n  small: {{ aliases: [{small_aliases}], rewrite: true, strategy: round_robin, fallbacks: [big] }}\n  \
         big: {{ aliases: [large] }}\n",
        b.url()
    ));
    yaml
}

fn pools(a: &Mock, b: &Mock) -> Proxy {
    Proxy::start(&pools_yaml(&[a], b, "fast"), &[])
}

fn chat_for(model: &str, words: usize) -> String {
    let text = vec!["word"; words].join(" ");
    format!(
        r#"{{"model" : "{model}","max_tokens":2,"messages":[{{"role":"user","content":"{text}"}}]}}"#
    )
}

#[test]
fn model_pools_route_aliases_and_rename_them_upstream() {
    let a = Mock::start();
    let b = Mock::start();
    let proxy = pools(&a, &b);
    // The alias reaches a with the pool's name spliced in; nothing else changes.
    let r = post_chat(&proxy, &chat_for("fast", 3), &[("x-mock-echo", "1")]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["port"].as_u64(), Some(u64::from(a.addr.port())));
    assert_eq!(
        r.json()["body"].as_str(),
        Some(chat_for("small", 3).as_str())
    );
    // Without `rewrite`, an alias goes upstream as the client wrote it.
    let r = post_chat(&proxy, &chat_for("large", 3), &[("x-mock-echo", "1")]);
    assert_eq!(r.json()["port"].as_u64(), Some(u64::from(b.addr.port())));
    assert_eq!(
        r.json()["body"].as_str(),
        Some(chat_for("large", 3).as_str())
    );
    // The pool's own strategy decides (round robin here, least_connections at the top).
    assert_decisions(&proxy, "round_robin", "balanced", 1.0);
    // /v1/models lists pools and aliases.
    let models = get(proxy.addr, "/v1/models").json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["big", "fast", "large", "small"]);
}

#[test]
fn model_pools_fall_back_on_context_length_errors_and_missing_backends() {
    let a = Mock::start();
    let b = Mock::start();
    let proxy = pools(&a, &b);
    a.control(r#"{"context_limit": 20}"#);
    // Short prompt: small serves it.
    let r = post_chat(&proxy, &chat_for("small", 5), &[]);
    assert_eq!((r.status, r.json()["model"].as_str()), (200, Some("small")));
    // Too long for small: its 400 is not relayed; big serves it, under its own name.
    for stream in [false, true] {
        let body = chat_for("fast", 40).replace(
            "\"max_tokens\"",
            &format!("\"stream\":{stream},\"max_tokens\""),
        );
        let r = post_chat(&proxy, &body, &[]);
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("\"model\":\"big\""), "{}", r.text());
    }
    assert_eq!(b.stat("requests"), 2);
    assert_decisions(&proxy, "least_connections", "fallback_model", 2.0);
    // Other 400s are the client's answer, relayed as they are.
    let r = post_chat(&proxy, &chat_for("small", 5), &[("x-mock-status", "400")]);
    assert_eq!(r.status, 400);
    assert_eq!(b.stat("requests"), 2);
    // Where no fallback is left, the context error reaches the client unchanged.
    b.control(r#"{"context_limit": 20}"#);
    let r = post_chat(&proxy, &chat_for("big", 40), &[]);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("maximum context length"), "{}", r.text());

    // small's only backend goes down: big serves small's requests.
    a.control(r#"{"health_status": 503}"#);
    let down = eventually(Duration::from_secs(10), || {
        get(proxy.addr, "/health").json()["backends"][0]["up"] == false
    });
    assert!(down, "a never marked down");
    let r = post_chat(&proxy, &chat_for("small", 5), &[]);
    assert_eq!((r.status, r.json()["model"].as_str()), (200, Some("big")));
}

fn port(m: &Mock) -> u64 {
    m.url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

fn reload(proxy: &Proxy, yaml: &str) {
    std::fs::write(proxy.dir.join("config.yaml"), yaml).expect("rewrite config");
    let r = post_json(proxy.addr, "/admin/reload", "", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn least_load_and_consistent_hash_follow_a_reload_that_adds_a_backend() {
    // a has a deep queue; c, added by a reload, is idle. The scraper must pick c up (a new
    // backend in a new slot) and least_load must then send everything to it.
    let a = Mock::start();
    let c = Mock::start();
    let d = Mock::start();
    a.control(r#"{"engine": {"waiting": 20, "kv_usage": 0.5}}"#);
    let proxy = Proxy::start(&least_load_config(&[&a]), &["--workers", "2"]);
    wait_for_scrapes(&proxy, &[&a]);
    chat(&proxy, &[]);
    assert_eq!(requests(&a), 1);

    reload(&proxy, &least_load_config(&[&a, &c]));
    wait_for_scrapes(&proxy, &[&c]);
    for _ in 0..20 {
        chat(&proxy, &[]);
    }
    assert_eq!(requests(&a), 1, "a's deep queue must keep it out");
    assert_eq!(requests(&c), 20);
    assert_decisions(&proxy, "least_load", "engine_load", 21.0);

    // Now consistent_hash over a and c, then a reload adds d: sessions either stay where they
    // were or move to d (rendezvous keys on the URL, not on the slot).
    let hashed = |mocks: &[&Mock]| hash_config(mocks, "hash_key: \"header:x-session-id\"");
    reload(&proxy, &hashed(&[&a, &c]));
    let body = chat_body(false, 1);
    let sessions: Vec<String> = (0..30).map(|s| format!("session-{s}")).collect();
    let homes: Vec<u64> = sessions
        .iter()
        .map(|s| served_by(&proxy, &body, &[("x-session-id", s)]))
        .collect();
    reload(&proxy, &hashed(&[&a, &c, &d]));
    let mut moved = 0;
    for (s, home) in sessions.iter().zip(&homes) {
        let now = served_by(&proxy, &body, &[("x-session-id", s)]);
        if now != *home {
            assert_eq!(
                now,
                port(&d),
                "{s} moved from {home} to another old backend"
            );
            moved += 1;
        }
    }
    assert!(moved > 0 && moved < 30, "{moved} of 30 sessions moved to d");
}

#[test]
fn model_pools_follow_a_reload() {
    let (a, b, c) = (Mock::start(), Mock::start(), Mock::start());
    let proxy = pools(&a, &b);
    let port_of = |body: &str| {
        let r = post_chat(&proxy, body, &[("x-mock-echo", "1")]);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json()["body"].as_str(),
            Some(chat_for("small", 1).as_str())
        );
        r.json()["port"].as_u64().unwrap_or(0)
    };
    assert_eq!(port_of(&chat_for("fast", 1)), port(&a));
    // The alias is renamed and the pool gains a backend: the new pool takes both, round robin.
    reload(&proxy, &pools_yaml(&[&a, &c], &b, "quick"));
    let r = post_chat(&proxy, &chat_for("fast", 1), &[]);
    r.assert_error(404, "model_not_found");
    let served: std::collections::HashSet<u64> =
        (0..4).map(|_| port_of(&chat_for("quick", 1))).collect();
    assert_eq!(served, [port(&a), port(&c)].into_iter().collect());
}

fn prefix_config(mocks: &[&Mock], routing: &str) -> String {
    let urls: Vec<String> = mocks.iter().map(|m| m.url()).collect();
    config(
        &urls,
        &format!("strategy: prefix_cache\nrouting: {{ prefix_cache: {{ {routing} }} }}\n"),
    )
}

/// A chat whose system prompt `system` (about 2 KiB: 8 blocks of 256 bytes) is followed by a
/// short question of its own.
fn prefix_chat(system: usize, question: usize) -> String {
    let words: String = (0..300)
        .map(|i| format!("w{}-{} ", system, i % 17))
        .collect();
    format!(
        r#"{{"model":"m","messages":[{{"role":"system","content":"Profile {system}: {words}"}},{{"role":"user","content":"Question {question}?"}}]}}"#
    )
}

#[test]
fn prefix_cache_keeps_a_hot_prefix_and_spills_it_when_its_backend_is_much_busier() {
    let a = Mock::start();
    let b = Mock::start();
    // A whole-prompt miss is worth 2 requests in flight: the hot prefix's backend keeps it up
    // to about 2 more in flight than the other, then the next one spills.
    let proxy = Proxy::start(&prefix_config(&[&a, &b], "miss_cost: 2"), &[]);
    let home = served_by(&proxy, &prefix_chat(1, 0), &[]);
    for q in 1..6 {
        assert_eq!(
            served_by(&proxy, &prefix_chat(1, q), &[]),
            home,
            "question {q}"
        );
    }
    let (home_mock, other_mock) = if home == port(&a) { (&a, &b) } else { (&b, &a) };
    let (home_before, other_before) = (requests(home_mock), requests(other_mock));
    assert_eq!(
        other_before, 0,
        "a known prefix never went to the other backend"
    );
    // A burst of the hot prefix, each held 1.5 s, started 50 ms apart: the home takes the first
    // two, then it is much busier than the idle one and the rest spill (and the second copy is
    // then used as well).
    std::thread::scope(|s| {
        for q in 0..6 {
            let proxy = &proxy;
            s.spawn(move || {
                let r = post_chat(
                    proxy,
                    &prefix_chat(1, 100 + q),
                    &[("x-mock-ttft-ms", "1500")],
                );
                assert_eq!(r.status, 200, "{}", r.text());
            });
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let (at_home, spilled) = (
        requests(home_mock) - home_before,
        requests(other_mock) - other_before,
    );
    assert_eq!(at_home + spilled, 6);
    assert!(
        at_home >= 2,
        "the home keeps the prefix while only a little busier: {at_home}"
    );
    assert!(spilled >= 2, "a much busier home spills: {spilled}");
    assert_decisions(&proxy, "prefix_cache", "load_spill", 1.0);
    assert_decisions(&proxy, "prefix_cache", "cache_hit", 7.0);
    // Both hold it now: sequential requests of the prefix are hits wherever they go.
    let hits = metric(
        &proxy,
        "llmproxy_routing_decisions_total{reason=\"cache_hit\",strategy=\"prefix_cache\"}",
    )
    .unwrap_or(0.0);
    for q in 0..4 {
        served_by(&proxy, &prefix_chat(1, 200 + q), &[]);
    }
    assert_decisions(&proxy, "prefix_cache", "cache_hit", hits + 4.0);
}

#[test]
fn prefix_cache_spreads_misses_and_returns_each_prompt_to_its_backend() {
    let mocks = [Mock::start(), Mock::start(), Mock::start()];
    let refs: Vec<&Mock> = mocks.iter().collect();
    let proxy = Proxy::start(&prefix_config(&refs, ""), &["--workers", "2"]);
    // One request at a time, every system prompt new: nothing in flight anywhere, so every
    // backend ties and the misses must spread (not all to the first backend).
    let homes: Vec<u64> = (0..30)
        .map(|p| served_by(&proxy, &prefix_chat(p, 0), &[]))
        .collect();
    for m in &mocks {
        let n = homes.iter().filter(|&&h| h == port(m)).count();
        assert!(n >= 3, "30 misses should reach every backend: {homes:?}");
    }
    assert_decisions(&proxy, "prefix_cache", "cache_miss", 30.0);
    // Each prompt again with another question, on whichever core accepts the connection (the
    // cores tell each other their picks): back to the backend that has it.
    std::thread::sleep(Duration::from_millis(100));
    for (p, &home) in homes.iter().enumerate() {
        assert_eq!(
            served_by(&proxy, &prefix_chat(p, 1), &[]),
            home,
            "prompt {p} left its backend"
        );
    }
    assert_decisions(&proxy, "prefix_cache", "cache_hit", 30.0);
}

#[test]
fn prefix_cache_reports_how_much_of_each_prompt_its_pick_held() {
    let a = Mock::start();
    let b = Mock::start();
    let proxy = Proxy::start(&prefix_config(&[&a, &b], ""), &[]);
    // A new prompt (nothing of it held anywhere), the same system prompt with another question
    // (all of it held: only whole blocks are hashed, and the question's text falls in the last,
    // partial one), and a body shorter than a block (not counted).
    served_by(&proxy, &prefix_chat(7, 0), &[]);
    served_by(&proxy, &prefix_chat(7, 1), &[]);
    chat(&proxy, &[]);
    let count = "llmproxy_prefix_cache_matched_share_count";
    assert!(
        eventually(Duration::from_secs(3), || metric(&proxy, count)
            == Some(2.0)),
        "{count} = {:?}",
        metric(&proxy, count)
    );
    let bucket = |le: &str| {
        metric(
            &proxy,
            &format!("llmproxy_prefix_cache_matched_share_bucket{{le=\"{le}\"}}"),
        )
    };
    assert_eq!(bucket("0"), Some(1.0), "the miss held nothing");
    assert_eq!(bucket("0.99"), Some(1.0), "the hit held all of its prompt");
    assert_eq!(bucket("+Inf"), Some(2.0));
}

/// The body a backend received for `body` sent through the proxy to `path` (the mock echoes
/// it), and which mock it was.
fn upstream_body(proxy: &Proxy, path: &str, body: &str) -> (u64, String) {
    let r = post_json(proxy.addr, path, body, &[("x-mock-echo", "1")]);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    (
        v["port"].as_u64().unwrap_or(0),
        v["body"].as_str().unwrap_or_default().to_string(),
    )
}

/// The `id_slot` llama.cpp would read in an upstream body (`None`: not pinned).
fn id_slot(body: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get("id_slot")?.as_u64()
}

#[test]
fn prefix_cache_pins_each_prompt_to_its_own_engine_slot_with_id_slot() {
    let a = Mock::start();
    let b = Mock::start();
    // `a` declares two engine slots (llama.cpp `--parallel 2`); `b` declares none (one shared
    // cache, as vLLM's) and is down to start with, so `a` takes every pick first.
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nworkers: 2\nbackends:\n  - {{ url: \"{}\", slots: 2 }}\n  - {{ url: \"{}\" }}\n\
         health_check: {{ interval: 1s, path: /health, timeout: 500ms }}\nstrategy: prefix_cache\n",
        a.url(),
        b.url()
    );
    b.control(r#"{"health_status": 503}"#);
    let proxy = Proxy::start(&yaml, &["--workers", "2"]);
    assert!(eventually(Duration::from_secs(5), || {
        metric(
            &proxy,
            &format!("llmproxy_backend_up{{backend=\"{}\"}}", b.url()),
        ) == Some(0.0)
    }));
    // Two system prompts, one after the other: each takes an engine slot of its own, and keeps
    // coming back to it with every new question, whichever core takes the connection.
    let (pa, first) = upstream_body(&proxy, "/v1/chat/completions", &prefix_chat(1, 0));
    let (pb, second) = upstream_body(&proxy, "/v1/chat/completions", &prefix_chat(2, 0));
    assert_eq!((pa, pb), (port(&a), port(&a)));
    let (sa, sb) = (id_slot(&first), id_slot(&second));
    assert!(sa.is_some() && sb.is_some() && sa != sb, "{sa:?} {sb:?}");
    // The rest of the body is what the client sent.
    let v: serde_json::Value = serde_json::from_str(&first).unwrap();
    let sent: serde_json::Value = serde_json::from_str(&prefix_chat(1, 0)).unwrap();
    assert_eq!(v["messages"], sent["messages"]);
    std::thread::sleep(Duration::from_millis(100));
    for q in 1..6 {
        let (_, body) = upstream_body(&proxy, "/v1/chat/completions", &prefix_chat(1, q));
        assert_eq!(id_slot(&body), sa, "prompt 1, question {q}");
        let (_, body) = upstream_body(&proxy, "/v1/chat/completions", &prefix_chat(2, q));
        assert_eq!(id_slot(&body), sb, "prompt 2, question {q}");
    }
    assert_decisions(&proxy, "prefix_cache", "cache_hit", 10.0);
    // Bodies without a prompt to place are forwarded as sent, not pinned, and nothing breaks:
    // no messages; messages that are not an array; a prompt shorter than a block; a body that
    // is not JSON on a route the proxy does not read (llama.cpp's own `/completion`).
    for (path, body) in [
        ("/v1/chat/completions", r#"{"model":"m"}"#),
        ("/v1/chat/completions", r#"{"model":"m","messages":"hi"}"#),
        ("/v1/completions", r#"{"model":"m","prompt":"short"}"#),
        ("/completion", "prompt=not json at all"),
    ] {
        let (_, got) = upstream_body(&proxy, path, body);
        assert_eq!(got, body, "{path}: forwarded unchanged");
    }
    // A client's own id_slot is kept as it is.
    let own = prefix_chat(1, 50).replacen('{', r#"{"id_slot":7,"#, 1);
    let (_, got) = upstream_body(&proxy, "/v1/chat/completions", &own);
    assert_eq!(got, own);
    // Not JSON on a JSON route: the client's error, as ever; the proxy goes on pinning.
    let r = post_json(proxy.addr, "/v1/chat/completions", "{not json", &[]);
    r.assert_error(400, "bad_request");
    let (_, body) = upstream_body(&proxy, "/v1/chat/completions", &prefix_chat(2, 99));
    assert_eq!(id_slot(&body), sb);
    // The backend without slots, once up, is scored as a whole: never pinned.
    b.control(r#"{"health_status": 200}"#);
    a.control(r#"{"health_status": 503}"#);
    assert!(eventually(Duration::from_secs(5), || {
        metric(
            &proxy,
            &format!("llmproxy_backend_up{{backend=\"{}\"}}", a.url()),
        ) == Some(0.0)
    }));
    let (p, body) = upstream_body(&proxy, "/v1/chat/completions", &prefix_chat(1, 60));
    assert_eq!((p, id_slot(&body)), (port(&b), None));
}
