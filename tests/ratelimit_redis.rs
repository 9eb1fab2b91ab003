//! Per-key limits shared across replicas through a real `redis-server` (issue 19): several
//! llmproxy processes with the same config and one Redis enforce one key's `rpm` and `tpm` in
//! total, not per process; with Redis killed each `ratelimit.on_store_error` mode does what it
//! says within about one `sync_interval`, with no 5xx; with Redis back (empty) the limits are
//! shared again without a restart.

mod common;

use std::time::{Duration, Instant};

use common::redis::Redis;
use common::*;

const KEY: &str = "sk-shared-a-0123456789abcdef";
const KEY2: &str = "sk-shared-b-0123456789abcdef";
const KEY3: &str = "sk-shared-c-0123456789abcdef";
const OPEN: &str = "sk-shared-open-0123456789ab";

fn yaml(mock: &Mock, redis: &Redis, keys: &str, on_error: &str) -> String {
    config(
        &[mock.url()],
        &format!(
            "auth:\n  keys:\n{keys}    - {{ name: open, key: \"{OPEN}\" }}\n\
             ratelimit:\n  store: redis\n  redis_url: \"{}\"\n  sync_interval: 100ms\n  on_store_error: {on_error}\n",
            redis.url()
        ),
    )
}

fn replicas(n: usize, yaml: &str) -> Vec<Proxy> {
    (0..n).map(|_| Proxy::start(yaml, &[])).collect()
}

fn chat_as(proxy: &Proxy, key: &str, tokens: u32) -> Response {
    post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, tokens),
        &[("Authorization", &format!("Bearer {key}"))],
    )
}

/// Sends `n` requests round-robin over `proxies`, `gap` apart; returns (admitted per proxy,
/// tokens of the admitted ones). Every answer must be 200 or a 429 with Retry-After.
fn drive(proxies: &[Proxy], key: &str, n: usize, gap: Duration, tokens: u32) -> (Vec<u64>, u64) {
    let mut admitted = vec![0u64; proxies.len()];
    let mut used = 0;
    let start = Instant::now();
    for i in 0..n {
        let due = start + gap * i as u32;
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let p = i % proxies.len();
        let r = chat_as(&proxies[p], key, tokens);
        match r.status {
            200 => {
                admitted[p] += 1;
                used += r.json()["usage"]["total_tokens"].as_u64().unwrap_or(0);
            }
            429 => {
                assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
                assert!(r.header("retry-after").is_some(), "429 without Retry-After");
            }
            s => panic!("request {i}: status {s}: {}", r.text()),
        }
    }
    (admitted, used)
}

fn store_up(p: &Proxy) -> Option<f64> {
    metric(p, "llmproxy_ratelimit_store_up")
}

#[test]
fn two_processes_enforce_one_keys_rpm_in_total() {
    let Some(redis) = Redis::start() else { return };
    let mock = Mock::start();
    let keys = format!("    - {{ name: a, key: \"{KEY}\", rpm: 20 }}\n");
    let proxies = replicas(2, &yaml(&mock, &redis, &keys, "local"));
    // 60 requests in 3 s: a minute's allowance (20) plus 1 of refill; per-process buckets
    // would admit 40. Bound: (N-1) × (headroom + refill per sync) over, i.e. a request or two.
    let (admitted, _) = drive(&proxies, KEY, 60, Duration::from_millis(50), 1);
    let total: u64 = admitted.iter().sum();
    eprintln!("rpm 20, two replicas: admitted {admitted:?} = {total}");
    assert!((20..=24).contains(&total), "admitted {admitted:?}");
    assert!(admitted.iter().all(|&a| a > 0), "both replicas admitted");
    // The key's buckets are in Redis under the prefix and the key's name, with a TTL.
    let ttl = redis.command("PTTL llmproxy:ratelimit:a:rpm");
    let ms: i64 = ttl.trim().trim_start_matches(':').parse().unwrap_or(-9);
    assert!(ms > 0 && ms <= 3 * 60_000, "PTTL {ttl:?}");
    for p in &proxies {
        assert_eq!(store_up(p), Some(1.0));
        let count = metric(p, "llmproxy_ratelimit_sync_seconds_count").unwrap_or(0.0);
        assert!(count > 5.0, "syncs counted: {count}");
    }
}

#[test]
fn three_replicas_admit_a_minutes_allowance_plus_refill() {
    let Some(redis) = Redis::start() else { return };
    let mock = Mock::start();
    let keys = format!("    - {{ name: a, key: \"{KEY}\", rpm: 120 }}\n");
    let proxies = replicas(3, &yaml(&mock, &redis, &keys, "local"));
    // The figure: 10 requests per second for 30 s spread over three replicas: 120 of
    // burst + 60 refilled = 180, where per-process buckets admit all 300.
    let (admitted, _) = drive(&proxies, KEY, 300, Duration::from_millis(100), 1);
    let total: u64 = admitted.iter().sum();
    eprintln!("rpm 120, three replicas, 300 requests in 30 s: admitted {admitted:?} = {total}");
    assert!((162..=198).contains(&total), "admitted {admitted:?}");
}

#[test]
fn two_processes_enforce_one_keys_tpm_in_total() {
    let Some(redis) = Redis::start() else { return };
    let mock = Mock::start();
    let keys = format!("    - {{ name: a, key: \"{KEY}\", tpm: 300 }}\n");
    let proxies = replicas(2, &yaml(&mock, &redis, &keys, "local"));
    let one = chat_as(&proxies[0], KEY, 30).json()["usage"]["total_tokens"]
        .as_u64()
        .unwrap_or(0);
    assert!(one > 0);
    // Requests are admitted while the shared bucket is not empty; tokens are charged when they
    // finish. Per-process buckets would let each replica spend 300 tokens.
    let (admitted, used) = drive(&proxies, KEY, 30, Duration::from_millis(150), 30);
    let used = used + one;
    eprintln!("tpm 300, two replicas: admitted {admitted:?}, {used} tokens ({one} per request)");
    assert!(used >= 300, "the bucket was not used up: {used}");
    // Admitted while not empty, so one request past the limit even alone; each replica may
    // admit one more before the other's last charge reaches it; 4.5 s refill 23 tokens.
    let bound = 300 + 23 + 3 * one;
    assert!(used <= bound, "{used} tokens, over the bound {bound}");
}

#[test]
fn redis_killed_local_mode_falls_back_to_per_process_limits_then_shares_again() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let mock = Mock::start();
    let keys: String = [("a", KEY), ("b", KEY2), ("c", KEY3)]
        .iter()
        .map(|(name, key)| format!("    - {{ name: {name}, key: \"{key}\", rpm: 5 }}\n"))
        .collect();
    let proxies = replicas(2, &yaml(&mock, &redis, &keys, "local"));
    // Shared: 10 requests over both, 5 admitted. A request is seen by the other replica within
    // two sync intervals (pushed at its own replica's tick, pulled at the other's), so 300 ms
    // apart none slips through; a sixth only if a loaded machine delays a sync past that.
    let (admitted, _) = drive(&proxies, KEY, 10, Duration::from_millis(300), 1);
    let total = admitted.iter().sum::<u64>();
    assert!((5..=6).contains(&total), "shared before: {admitted:?}");

    redis.kill();
    let killed = Instant::now();
    for p in &proxies {
        assert!(
            eventually(Duration::from_secs(2), || store_up(p) == Some(0.0)),
            "store_up never went to 0"
        );
        p.proc
            .wait_for_line("shared store failed", Duration::from_secs(2));
    }
    eprintln!("store_up 0 on both after {:?}", killed.elapsed());
    // Per-process now: key b gets 5 on each replica.
    let (admitted, _) = drive(&proxies, KEY2, 14, Duration::from_millis(20), 1);
    assert_eq!(admitted, vec![5, 5], "per-process while down");
    assert!(eventually(Duration::from_secs(5), || {
        metric(&proxies[0], "llmproxy_ratelimit_sync_errors_total").unwrap_or(0.0) >= 2.0
    }));

    // Back, empty: shared again within 2 s, without a restart.
    redis.restart();
    for p in &proxies {
        assert!(
            eventually(Duration::from_secs(2), || store_up(p) == Some(1.0)),
            "store_up never came back"
        );
        p.proc
            .wait_for_line("answers again", Duration::from_secs(2));
    }
    let (admitted, _) = drive(&proxies, KEY3, 10, Duration::from_millis(300), 1);
    let total = admitted.iter().sum::<u64>();
    assert!((5..=6).contains(&total), "shared after: {admitted:?}");
}

#[test]
fn redis_killed_deny_mode_refuses_limited_keys_within_a_sync_then_recovers() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let mock = Mock::start();
    let keys = format!("    - {{ name: a, key: \"{KEY}\", rpm: 1000 }}\n");
    let proxies = replicas(1, &yaml(&mock, &redis, &keys, "deny"));
    let p = &proxies[0];
    assert_eq!(chat_as(p, KEY, 1).status, 200);

    redis.kill();
    let killed = Instant::now();
    let mut first = None;
    while killed.elapsed() < Duration::from_secs(3) {
        let r = chat_as(p, KEY, 1);
        assert!(r.status == 200 || r.status == 429, "status {}", r.status);
        if r.status == 429 {
            r.assert_error(429, "rate_limit_exceeded");
            assert_eq!(r.header("retry-after"), Some("1"));
            assert!(r.text().contains("store"), "{}", r.text());
            first = Some(killed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let first = first.expect("deny never applied");
    eprintln!("deny applied {first:?} after redis-server was killed (sync_interval 100ms)");
    assert!(first < Duration::from_millis(500), "took {first:?}");
    assert_eq!(store_up(p), Some(0.0));
    // Keys without limits do not depend on the store.
    assert_eq!(chat_as(p, OPEN, 1).status, 200);
    p.proc
        .wait_for_line("rejected (rate_limit_store_down)", Duration::from_secs(2));

    redis.restart();
    assert!(
        eventually(Duration::from_secs(2), || chat_as(p, KEY, 1).status == 200),
        "still refused after redis-server came back"
    );
    assert_eq!(store_up(p), Some(1.0));
}

#[test]
fn a_hung_redis_counts_as_down_within_two_sync_intervals() {
    let Some(redis) = Redis::start() else { return };
    let mock = Mock::start();
    let keys = format!("    - {{ name: a, key: \"{KEY}\", rpm: 1000 }}\n");
    let proxies = replicas(1, &yaml(&mock, &redis, &keys, "deny"));
    let p = &proxies[0];
    assert_eq!(chat_as(p, KEY, 1).status, 200);
    // Frozen: connections hang instead of failing; each exchange times out after one interval.
    redis.freeze(true);
    let frozen = Instant::now();
    assert!(
        eventually(Duration::from_secs(3), || chat_as(p, KEY, 1).status == 429),
        "a hung store was never declared down"
    );
    let took = frozen.elapsed();
    eprintln!("deny applied {took:?} after redis-server was frozen (sync_interval 100ms)");
    assert!(took < Duration::from_millis(600), "took {took:?}");
    assert_eq!(store_up(p), Some(0.0));
    redis.freeze(false);
    assert!(
        eventually(Duration::from_secs(2), || chat_as(p, KEY, 1).status == 200),
        "still refused after redis-server thawed"
    );
}

#[test]
fn redis_killed_allow_mode_admits_past_the_limit() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let mock = Mock::start();
    let keys = format!("    - {{ name: a, key: \"{KEY}\", rpm: 2 }}\n");
    let proxies = replicas(1, &yaml(&mock, &redis, &keys, "allow"));
    let p = &proxies[0];
    let (admitted, _) = drive(&proxies, KEY, 4, Duration::ZERO, 1);
    assert_eq!(admitted, vec![2]);
    redis.kill();
    assert!(eventually(Duration::from_secs(2), || store_up(p) == Some(0.0)));
    let (admitted, _) = drive(&proxies, KEY, 5, Duration::ZERO, 1);
    assert_eq!(
        admitted,
        vec![5],
        "allow admits everything while the store is down"
    );
    redis.restart();
    assert!(eventually(Duration::from_secs(2), || store_up(p) == Some(1.0)));
}

#[test]
fn rediss_urls_share_limits_over_tls() {
    let dir = temp_dir("redis-tls");
    let Some(redis) = Redis::start_tls(&dir) else {
        return;
    };
    let mock = Mock::start();
    let keys = format!("    - {{ name: a, key: \"{KEY}\", rpm: 4 }}\n");
    // A TLS handshake in a debug build on a loaded machine may take most of 100 ms: a longer
    // interval (also the exchange's timeout) keeps this test about TLS, not about load.
    let yaml =
        yaml(&mock, &redis, &keys, "local").replace("sync_interval: 100ms", "sync_interval: 300ms");
    assert!(yaml.contains("rediss://"));
    // The server's CA is trusted through SSL_CERT_FILE (rustls-native-certs reads it).
    let ca = dir.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let proxies: Vec<Proxy> = (0..2)
        .map(|_| Proxy::start_env(&yaml, &[], &[("SSL_CERT_FILE", ca)]))
        .collect();
    let (admitted, _) = drive(&proxies, KEY, 8, Duration::from_millis(700), 1);
    let total = admitted.iter().sum::<u64>();
    assert!((4..=5).contains(&total), "admitted {admitted:?}");
    for p in &proxies {
        assert_eq!(store_up(p), Some(1.0));
        assert_eq!(metric(p, "llmproxy_ratelimit_sync_errors_total"), Some(0.0));
    }
}

#[test]
fn check_names_the_path_of_bad_ratelimit_settings() {
    let dir = temp_dir("ratelimit-check");
    for (body, needles) in [
        (
            "ratelimit: { store: redis, redis_url: \"http://redis:6379\" }\n",
            &["ratelimit.redis_url: must be a redis:// or rediss:// URL"][..],
        ),
        (
            "ratelimit: { store: redis, redis_url: \"redis://redis:notaport/0\" }\n",
            &["ratelimit.redis_url: is not a valid Redis URL"][..],
        ),
        (
            "ratelimit: { store: redis }\n",
            &["ratelimit.redis_url: is required when store is redis"][..],
        ),
        (
            "ratelimit: { store: redis, redis_url: \"redis://r:6379\", on_store_error: maybe }\n",
            &["ratelimit.on_store_error: unknown variant `maybe`"][..],
        ),
        (
            "ratelimit: { store: memcached }\n",
            &["ratelimit.store: unknown variant `memcached`"][..],
        ),
        (
            "ratelimit: { sync_interval: 1ms, key_prefix: \"\" }\n",
            &[
                "ratelimit.sync_interval: must be between 10ms and 10s",
                "ratelimit.key_prefix: must not be empty",
            ][..],
        ),
    ] {
        let path = dir.join("c.yaml");
        std::fs::write(
            &path,
            format!("backends:\n  - url: \"http://127.0.0.1:8000\"\n{body}"),
        )
        .unwrap();
        let out = std::process::Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{body} was accepted");
        for n in needles {
            assert!(err.contains(n), "{body}: no {n:?} in:\n{err}");
        }
    }
}
