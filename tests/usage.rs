//! Usage metering end to end: every request becomes exactly one event with the right token
//! counts, streams are relayed as the client asked for them, the webhook receives signed batches,
//! and no event is lost when the webhook fails or the proxy is killed.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::webhook::{Reply, Webhook};
use common::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;

fn setup(hook_extra: &str) -> (Mock, Webhook, Proxy) {
    setup_with_flush("50ms", hook_extra)
}

fn setup_with_flush(flush_interval: &str, hook_extra: &str) -> (Mock, Webhook, Proxy) {
    let mock = Mock::start();
    let hook = Webhook::start();
    let yaml = config(
        &[mock.url()],
        &format!(
            "usage_hook:\n  enabled: true\n  url: \"{}\"\n  flush_interval: {flush_interval}\n{hook_extra}",
            hook.url()
        ),
    );
    let proxy = Proxy::start(&yaml, &[]);
    (mock, hook, proxy)
}

/// `n` non-streaming chats, one after another, with request ids `{prefix}-0`...; their ids.
fn chats(addr: std::net::SocketAddr, prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i}");
            let r = post_json(
                addr,
                "/v1/chat/completions",
                &chat_body(false, 1),
                &[("x-request-id", &id)],
            );
            assert_eq!(r.status, 200, "{id}");
            id
        })
        .collect()
}

fn data_events(body: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            let mut v: serde_json::Value = serde_json::from_str(d).expect("event JSON");
            // Ids and timestamps differ between two runs; everything else must not.
            if let Some(o) = v.as_object_mut() {
                o.remove("id");
                o.remove("created");
            }
            v
        })
        .collect()
}

#[test]
fn non_streaming_chat_gives_one_exact_event() {
    let (mock, hook, proxy) = setup("");
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 7),
        &[("x-request-id", "req-1"), ("x-user-id", "alice")],
    );
    assert_eq!(r.status, 200);
    let ev = hook.wait_events(1);
    assert_eq!(ev.len(), 1);
    let e = &ev[0];
    assert_eq!(e["request_id"], "req-1");
    assert_eq!(e["model"], "mock-model");
    assert_eq!(e["endpoint"], "/v1/chat/completions");
    assert_eq!(e["backend_url"], mock.url());
    assert_eq!(e["is_stream"], false);
    assert_eq!(e["prompt_tokens"], 3);
    assert_eq!(e["completion_tokens"], 7);
    assert_eq!(e["total_tokens"], 10);
    assert_eq!(e["status"], 200);
    assert_eq!(e["outcome"], "ok");
    assert_eq!(e["user_id"], "alice");
    assert_eq!(e["event_id"].as_str().unwrap().len(), 32);
    assert!(e["timestamp"].as_str().unwrap().ends_with('Z'));
    let post = &hook.posts()[0];
    assert!(post.header("idempotency-key").is_some());
}

#[test]
fn stream_without_include_usage_is_metered_and_relayed_unchanged() {
    let (mock, hook, proxy) = setup("");
    let r = post_json(proxy.addr, "/v1/chat/completions", &chat_body(true, 5), &[]);
    assert_eq!(r.status, 200);
    let through_proxy = data_events(&r.body);
    // What the backend sends for the client's own request: the proxy asked it for final and
    // running usage, and took both out again (tests/billing.rs compares the bytes).
    let direct = post_json(mock.addr, "/v1/chat/completions", &chat_body(true, 5), &[]);
    let expected = data_events(&direct.body);
    assert!(expected.iter().all(|e| e.get("usage").is_none()));
    assert_eq!(
        through_proxy, expected,
        "client stream = the backend's stream for the client's request"
    );
    assert!(r.text().ends_with("data: [DONE]\n\n"));
    let ev = hook.wait_events(1);
    assert_eq!(ev[0]["is_stream"], true);
    assert_eq!(ev[0]["completion_tokens"], 5);
    assert_eq!(ev[0]["prompt_tokens"], 3);
    assert!(ev[0]["ttft_ms"].is_u64());
}

/// A fast engine's whole stream in one write (`x-mock-burst`): the proxy reads every event in
/// one read, takes the running usage out of each and the usage chunk out of the stream, and
/// bills the final count, as when the events come one read each.
#[test]
fn a_stream_read_in_one_piece_is_metered_and_relayed_unchanged() {
    let (mock, hook, proxy) = setup("");
    let burst = [("x-mock-burst", "1")];
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(true, 12),
        &burst,
    );
    assert_eq!(r.status, 200);
    let direct = post_json(
        mock.addr,
        "/v1/chat/completions",
        &chat_body(true, 12),
        &burst,
    );
    let expected = data_events(&direct.body);
    assert_eq!(expected.len(), 14, "role, 12 tokens, finish");
    assert_eq!(data_events(&r.body), expected);
    assert!(r.text().ends_with("data: [DONE]\n\n"));
    let ev = hook.wait_events(1);
    assert_eq!(ev[0]["completion_tokens"], 12);
    assert_eq!(ev[0]["prompt_tokens"], 3);
    assert_eq!(ev[0]["outcome"], "ok");
}

#[test]
fn stream_with_include_usage_reaches_the_client_unchanged() {
    let (_mock, hook, proxy) = setup("");
    let body = r#"{"model":"mock-model","stream":true,"max_tokens":4,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"a b"}]}"#;
    let r = post_json(proxy.addr, "/v1/chat/completions", body, &[]);
    let events = data_events(&r.body);
    let last = events.last().unwrap();
    assert_eq!(last["choices"], serde_json::json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 4);
    let ev = hook.wait_events(1);
    assert_eq!(ev[0]["completion_tokens"], 4);
    assert_eq!(ev[0]["prompt_tokens"], 2);
}

#[test]
fn injection_can_be_turned_off() {
    let (_mock, hook, proxy) = setup("usage:\n  inject_include_usage: false\n");
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(true, 3),
        &[("x-mock-echo", "1")],
    );
    let echo = r.json();
    assert!(!echo["body"].as_str().unwrap().contains("include_usage"));
    let ev = hook.wait_events(1);
    assert_eq!(
        ev[0]["completion_tokens"], 0,
        "no usage was streamed, none invented"
    );
}

#[test]
fn completions_embeddings_and_tgi_are_metered() {
    let (_mock, hook, proxy) = setup("");
    let r = post_json(
        proxy.addr,
        "/v1/completions",
        r#"{"model":"mock-model","prompt":"one two three four","max_tokens":6}"#,
        &[],
    );
    assert_eq!(r.status, 200);
    let r = post_json(
        proxy.addr,
        "/v1/completions",
        r#"{"model":"mock-model","prompt":"one two","max_tokens":2,"stream":true}"#,
        &[],
    );
    assert_eq!(r.status, 200);
    let r = post_json(
        proxy.addr,
        "/v1/embeddings",
        r#"{"model":"mock-model","input":["a b c","d e"]}"#,
        &[],
    );
    assert_eq!(r.status, 200);
    let r = post_json(
        proxy.addr,
        "/generate",
        r#"{"inputs":"x y z","parameters":{"max_new_tokens":3,"details":true}}"#,
        &[],
    );
    assert_eq!(r.status, 200);
    let r = post_json(
        proxy.addr,
        "/generate_stream",
        r#"{"inputs":"x y","parameters":{"max_new_tokens":4,"details":true}}"#,
        &[],
    );
    assert_eq!(r.status, 200);
    let ev = hook.wait_events(5);
    assert_eq!(ev.len(), 5);
    let by = |endpoint: &str, stream: bool| {
        ev.iter()
            .find(|e| e["endpoint"] == endpoint && e["is_stream"] == stream)
            .unwrap_or_else(|| panic!("no event for {endpoint}"))
            .clone()
    };
    let c = by("/v1/completions", false);
    assert_eq!(
        (c["prompt_tokens"].as_u64(), c["completion_tokens"].as_u64()),
        (Some(4), Some(6))
    );
    let c = by("/v1/completions", true);
    assert_eq!(
        (c["prompt_tokens"].as_u64(), c["completion_tokens"].as_u64()),
        (Some(2), Some(2))
    );
    let e = by("/v1/embeddings", false);
    assert_eq!(
        (e["prompt_tokens"].as_u64(), e["total_tokens"].as_u64()),
        (Some(5), Some(5))
    );
    let g = by("/generate", false);
    assert_eq!(
        (g["prompt_tokens"].as_u64(), g["completion_tokens"].as_u64()),
        (Some(3), Some(3))
    );
    let g = by("/generate_stream", true);
    assert_eq!(g["completion_tokens"], 4);
}

#[test]
fn keys_are_hashed_signatures_verify_and_no_raw_key_leaks() {
    let secret = "s3cret-hmac";
    let (_mock, hook, proxy) = setup(&format!(
        "  secret: \"{secret}\"\n  headers: {{ Authorization: \"Bearer billing-token\" }}\n"
    ));
    let raw_key = "sk-live-THIS-MUST-NOT-LEAK-42";
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        r#"{"model":"mock-model","max_tokens":2,"user":"bob","messages":[{"role":"user","content":"x"}]}"#,
        &[("Authorization", &format!("Bearer {raw_key}"))],
    );
    assert_eq!(r.status, 200);
    let ev = hook.wait_events(1);
    let key_id = ev[0]["key_id"].as_str().unwrap();
    assert!(key_id.starts_with("key-") && !key_id.contains("LEAK"));
    assert_eq!(ev[0]["user_id"], "bob", "body user field");
    let post = &hook.posts()[0];
    assert_eq!(post.header("authorization"), Some("Bearer billing-token"));
    let sig = post
        .header("x-llmproxy-signature")
        .expect("signature header");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&post.body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(sig, format!("sha256={expected}"));
    // Not in any event, not in any log line.
    for p in hook.posts() {
        assert!(!String::from_utf8_lossy(&p.body).contains(raw_key));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !proxy.proc.output().contains(raw_key),
        "raw key in the logs"
    );
    assert!(
        proxy.proc.output().contains(key_id),
        "the access log names the key by its id"
    );
}

#[test]
fn failed_and_aborted_requests_still_produce_events() {
    let (mock, hook, proxy) = setup("retry: { attempts: 0 }\n");
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        r#"{"model":"nope","messages":[]}"#,
        &[],
    );
    assert_eq!(
        r.status, 200,
        "no models configured: any model goes through"
    );
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 1),
        &[("x-mock-status", "500")],
    );
    assert_eq!(r.status, 500);
    let mut c = Client::connect(proxy.addr);
    c.send(
        post_raw(
            "/v1/chat/completions",
            &chat_body(true, 50),
            &[
                ("x-mock-token-delay-ms", "200"),
                ("x-request-id", "aborted-1"),
            ],
            false,
        )
        .as_bytes(),
    );
    let mut buf = [0u8; 2048];
    let _ = std::io::Read::read(&mut c.stream, &mut buf).unwrap();
    drop(c);
    assert!(eventually(Duration::from_secs(2), || mock
        .stat("disconnects")
        == 1));
    let ev = hook.wait_events(3);
    let aborted = ev
        .iter()
        .find(|e| e["request_id"] == "aborted-1")
        .expect("abort event");
    assert_eq!(aborted["outcome"], "client_aborted");
    assert_eq!(aborted["is_stream"], true);
    assert!(ev
        .iter()
        .any(|e| e["status"] == 500 && e["total_tokens"] == 0 && e["outcome"] == "upstream_error"));
}

#[test]
fn webhook_outage_loses_nothing() {
    // The webhook's port, reserved but closed: connection refused first.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mock = Mock::start();
    let dir = temp_dir("spool");
    let yaml = config(
        &[mock.url()],
        &format!(
            "usage_hook:\n  enabled: true\n  url: \"http://{port}/usage\"\n  flush_interval: 50ms\n  timeout: 300ms\n  retry: 1\n  batch_max: 50\n  spool_dir: \"{}\"\n",
            dir.display()
        ),
    );
    let proxy = Proxy::start(&yaml, &[]);
    let n = 300;
    let send = |k: usize| {
        for i in 0..k {
            let r = post_json(
                proxy.addr,
                "/v1/chat/completions",
                &chat_body(i % 3 == 0, 2),
                &[],
            );
            assert_eq!(r.status, 200);
        }
    };
    send(n / 3);
    // Then the webhook answers 500s, then hangs past the timeout.
    let hook = Webhook::start_on(port);
    hook.reply(Reply::Status(500));
    send(n / 3);
    hook.reply(Reply::Hang(Duration::from_secs(2)));
    send(n / 3);
    std::thread::sleep(Duration::from_millis(500));
    assert!(hook.events().is_empty());
    hook.reply(Reply::Status(200));
    let ev = hook.wait_events(n);
    let ids: HashSet<String> = ev
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), n, "every event arrived");
    // Re-sent batches are whole and keep their key: same key, same body.
    let mut by_key: std::collections::HashMap<String, Vec<u8>> = Default::default();
    for p in hook.posts() {
        let key = p.header("idempotency-key").expect("key").to_string();
        match by_key.get(&key) {
            Some(body) => assert_eq!(body, &p.body, "key {key} reused for another batch"),
            None => {
                by_key.insert(key, p.body.clone());
            }
        }
    }
    // Across distinct accepted batches, no event is delivered twice.
    let accepted_keys: HashSet<&str> = hook
        .posts()
        .iter()
        .filter(|p| p.accepted)
        .map(|p| p.header("idempotency-key").unwrap().to_string())
        .collect::<Vec<_>>()
        .iter()
        .map(|k| by_key.get_key_value(k).unwrap().0.as_str())
        .collect();
    let distinct: usize = accepted_keys
        .iter()
        .map(|k| {
            serde_json::from_slice::<serde_json::Value>(&by_key[*k]).unwrap()["events"]
                .as_array()
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(distinct, n, "accepted batches partition the events");
    let m = get(proxy.addr, "/metrics").text();
    assert!(
        m.contains("llmproxy_usage_events_total{outcome=\"retried\"}"),
        "{m}"
    );
    assert!(
        m.contains("llmproxy_usage_events_total{outcome=\"dropped\"} 0"),
        "{m}"
    );
}

#[test]
fn permanent_rejections_are_dead_lettered_and_delivery_continues() {
    let mock = Mock::start();
    let hook = Webhook::start();
    let dir = temp_dir("dead");
    let yaml = config(
        &[mock.url()],
        &format!(
            "usage_hook:\n  enabled: true\n  url: \"{}\"\n  flush_interval: 50ms\n  spool_dir: \"{}\"\n",
            hook.url(),
            dir.display()
        ),
    );
    let proxy = Proxy::start(&yaml, &[]);
    hook.reply(Reply::Status(422));
    assert_eq!(
        post_json(
            proxy.addr,
            "/v1/chat/completions",
            &chat_body(false, 1),
            &[("x-request-id", "dead-1")]
        )
        .status,
        200
    );
    assert!(eventually(Duration::from_secs(5), || dir
        .join("dead-letter.jsonl")
        .exists()));
    let dead = std::fs::read_to_string(dir.join("dead-letter.jsonl")).unwrap();
    assert!(dead.contains("dead-1"));
    hook.reply(Reply::Status(200));
    assert_eq!(
        post_json(
            proxy.addr,
            "/v1/chat/completions",
            &chat_body(false, 1),
            &[("x-request-id", "live-1")]
        )
        .status,
        200
    );
    let ev = hook.wait_events(1);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["request_id"], "live-1");
}

/// A proxy's configuration with a disk spool (synced every 10 ms) and a webhook on a port
/// nothing listens on yet (`Webhook::start_on` it later), for tests that kill and restart.
fn killable(tag: &str) -> (Mock, std::net::SocketAddr, TempDir, String) {
    let mock = Mock::start();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = temp_dir(tag);
    let yaml = config(
        &[mock.url()],
        &format!(
            "usage_hook:\n  enabled: true\n  url: \"http://{port}/usage\"\n  flush_interval: 50ms\n  timeout: 300ms\n  spool_dir: \"{}\"\n  spool_fsync: 10ms\n",
            dir.display()
        ),
    );
    (mock, port, dir, yaml)
}

#[test]
fn sigkill_and_restart_replays_the_spool() {
    let (_mock, port, _dir, yaml) = killable("kill");
    let mut ids = Vec::new();
    {
        let proxy = Proxy::start(&yaml, &[]);
        ids.extend(chats(proxy.addr, "k", 60));
        // Past the fsync interval, then SIGKILL (no graceful flush).
        std::thread::sleep(Duration::from_millis(300));
        proxy.proc.signal(libc::SIGKILL);
        let mut proxy = proxy;
        proxy.proc.wait_exit(Duration::from_secs(5));
    }
    let hook = Webhook::start_on(port);
    let _proxy = Proxy::start(&yaml, &[]);
    let ev = hook.wait_events(60);
    let got: HashSet<String> = ev
        .iter()
        .map(|e| e["request_id"].as_str().unwrap().to_string())
        .collect();
    for id in &ids {
        assert!(got.contains(id), "event for {id} lost");
    }
}

/// A batch in flight when the proxy was killed is re-sent whole after a restart, read up to its
/// recorded end. When every line of it was damaged on disk meanwhile, delivery steps past them
/// (each skipped with a warning) and goes on with the events after it; before, every later read
/// stopped at the same damaged range and nothing was delivered again.
#[test]
fn a_replayed_batch_that_is_all_damage_is_stepped_over() {
    let (_mock, port, dir, yaml) = killable("damaged");
    {
        // Nothing listens on `port`: the batch is begun (the cursor records its end) and fails.
        let mut proxy = Proxy::start(&yaml, &[]);
        chats(proxy.addr, "lost", 3);
        std::thread::sleep(Duration::from_millis(400));
        proxy.proc.signal(libc::SIGKILL);
        proxy.proc.wait_exit(Duration::from_secs(5));
    }
    // Every byte of the first run's segment but its newlines made not UTF-8.
    let segments: Vec<_> = std::fs::read_dir(&*dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seg-"))
        })
        .collect();
    assert_eq!(segments.len(), 1, "{segments:?}");
    let bytes = std::fs::read(&segments[0]).unwrap();
    assert_eq!(bytes.iter().filter(|b| **b == b'\n').count(), 3);
    let damaged: Vec<u8> = bytes
        .iter()
        .map(|&b| if b == b'\n' { b } else { 0xff })
        .collect();
    std::fs::write(&segments[0], damaged).unwrap();
    let hook = Webhook::start_on(port);
    let proxy = Proxy::start(&yaml, &[]);
    let ids = chats(proxy.addr, "after", 2);
    let got = hook.wait_events_within(2, Duration::from_secs(5));
    let got: HashSet<&str> = got
        .iter()
        .filter_map(|e| e["request_id"].as_str())
        .collect();
    for id in &ids {
        assert!(
            got.contains(id.as_str()),
            "event for {id} not delivered: {got:?}"
        );
    }
    proxy
        .proc
        .wait_for_line("skipping an unreadable line", Duration::from_secs(1));
}

/// Under load a POST carries `batch_max` events; what is left over waits for more events or for
/// its own `flush_interval`, rather than going out at once as a small POST after every full one.
#[test]
fn full_batches_and_a_remainder_that_waits_its_flush_interval() {
    let (_mock, hook, proxy) = setup_with_flush("1s", "  batch_max: 4\n");
    chats(proxy.addr, "rem", 6);
    assert_eq!(hook.wait_events(4).len(), 4);
    std::thread::sleep(Duration::from_millis(300));
    let posts = hook.posts();
    assert_eq!(posts.len(), 1, "the remainder of two waits: {posts:?}");
    assert_eq!(events_in(&posts[0]), 4, "a full batch first");
    let all = hook.wait_events_within(6, Duration::from_secs(5));
    assert_eq!(
        all.len(),
        6,
        "the remainder is sent when its interval is up"
    );
    let posts = hook.posts();
    assert_eq!(posts.len(), 2);
    assert_eq!(events_in(&posts[1]), 2);
}

fn events_in(post: &common::webhook::Post) -> usize {
    let v: serde_json::Value = serde_json::from_slice(&post.body).expect("batch JSON");
    v["events"].as_array().map_or(0, Vec::len)
}

#[test]
fn sigterm_flushes_pending_events_before_exit() {
    let mock = Mock::start();
    let hook = Webhook::start();
    let yaml = config(
        &[mock.url()],
        // A long flush interval: only the shutdown flush can deliver these in time.
        &format!(
            "usage_hook:\n  enabled: true\n  url: \"{}\"\n  flush_interval: 1h\n  batch_max: 1000\n",
            hook.url()
        ),
    );
    let mut proxy = Proxy::start(&yaml, &[]);
    chats(proxy.addr, "flush", 25);
    assert!(hook.events().is_empty(), "nothing due before shutdown");
    proxy.proc.signal(libc::SIGTERM);
    assert_eq!(proxy.proc.wait_exit(Duration::from_secs(10)), Some(0));
    let got: HashSet<String> = hook
        .events()
        .iter()
        .map(|e| e["request_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got.len(), 25, "all events delivered by the shutdown flush");
}

#[test]
fn with_the_hook_disabled_events_can_still_be_logged() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&[mock.url()], "usage: { log: true }\n"), &[]);
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 4),
        &[("x-request-id", "logged-1")],
    );
    assert_eq!(r.status, 200);
    let line = proxy
        .proc
        .wait_for_line("logged-1\\\",\\\"timestamp", Duration::from_secs(3));
    let outer: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
    assert_eq!(outer["target"], "usage");
    let event: serde_json::Value = serde_json::from_str(outer["msg"].as_str().unwrap()).unwrap();
    assert_eq!(event["request_id"], "logged-1");
    assert_eq!(event["completion_tokens"], 4);
}
