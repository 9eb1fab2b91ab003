//! Admission rules: rate-limit stores, saturation, key weights and priorities, scheduling.

use super::*;

#[test]
fn ratelimit_defaults_to_per_process_buckets() {
    let c = ok(MINIMAL);
    assert_eq!(c.ratelimit, RateLimit::default());
    assert_eq!(c.ratelimit.store, RateStore::Local);
    assert_eq!(c.ratelimit.sync_interval, Duration::from_millis(100));
    assert_eq!(c.ratelimit.on_store_error, OnStoreError::Local);
    assert_eq!(c.ratelimit.redis_url, None);
}

#[test]
fn ratelimit_redis_store_with_a_password_from_the_environment() {
    let c = ok(&with_backend(
        "ratelimit:\n  store: redis\n  redis_url: \"redis://:${REDIS_PASSWORD}@redis:6379/2\"\n  \
         sync_interval: 250ms\n  on_store_error: deny\n  key_prefix: \"prod:rl:\"\n",
    ));
    let r = &c.ratelimit;
    assert_eq!(r.store, RateStore::Redis);
    assert_eq!(
        r.redis_url.as_ref().map(Secret::expose),
        Some("redis://:s3cret@redis:6379/2")
    );
    // Never printed.
    assert!(!format!("{c:?}").contains("s3cret"));
    assert_eq!(r.sync_interval, Duration::from_millis(250));
    assert_eq!(r.on_store_error, OnStoreError::Deny);
    assert_eq!(r.key_prefix, "prod:rl:");
    let tls = ok(&with_backend(
        "ratelimit: { store: redis, redis_url: \"rediss://redis:6380\", on_store_error: allow }\n",
    ));
    assert_eq!(tls.ratelimit.on_store_error, OnStoreError::Allow);
}

#[test]
fn ratelimit_errors_name_their_path() {
    let rl = |body: &str| with_backend(&format!("ratelimit: {body}\n"));
    assert_error(
        &rl("{ store: redis }"),
        "ratelimit.redis_url",
        "is required when store is redis",
    );
    assert_error(
        &rl("{ store: redis, redis_url: \"http://redis:6379\" }"),
        "ratelimit.redis_url",
        "must be a redis:// or rediss:// URL",
    );
    // Checked with the local store too, and without echoing the URL (it may hold a password).
    let errs = errors(&rl("{ redis_url: \"redis://:pw@redis:99999/0\" }"));
    assert!(
        errs.iter()
            .any(|e| e.starts_with("ratelimit.redis_url: is not a valid Redis URL")),
        "{errs:?}"
    );
    assert!(!errs.iter().any(|e| e.contains("pw@")), "{errs:?}");
    assert_error(
        &rl("{ store: redis, redis_url: \"redis://r:6379/${NOPE}\" }"),
        "ratelimit.redis_url",
        "environment variable NOPE is not set",
    );
    assert_error(
        &rl("{ on_store_error: maybe }"),
        "ratelimit.on_store_error",
        "unknown variant",
    );
    assert_error(
        &rl("{ store: memcached }"),
        "ratelimit.store",
        "unknown variant",
    );
    assert_error(
        &rl("{ sync_interval: 5ms }"),
        "ratelimit.sync_interval",
        "between 10ms and 10s",
    );
    assert_error(
        &rl("{ sync_interval: 1m }"),
        "ratelimit.sync_interval",
        "between 10ms and 10s",
    );
    assert_error(
        &rl("{ key_prefix: \"\" }"),
        "ratelimit.key_prefix",
        "must not be empty",
    );
    assert_error(
        &rl("{ stor: redis }"),
        "ratelimit.stor",
        "unknown field `stor`",
    );
}

#[test]
fn saturation_by_engine_queue_needs_a_strategy_that_scrapes() {
    assert_eq!(ok(MINIMAL).limits.saturation, Saturation::Inflight);
    let c = ok(&with_backend(
        "strategy: least_load\nlimits: { saturation: engine_queue }\n",
    ));
    assert_eq!(c.limits.saturation, Saturation::EngineQueue);
    // A pool's least_load is enough: its backends are scraped.
    let c = ok(r#"
backends: [{ url: "http://a:1", models: [m] }]
models: { m: { strategy: least_load } }
limits: { saturation: engine_queue }
"#);
    assert_eq!(c.limits.saturation, Saturation::EngineQueue);
    assert_error(
        &with_backend("limits: { saturation: engine_queue }\n"),
        "limits.saturation",
        "scraped only under strategy least_load",
    );
    assert_error(
        &with_backend("strategy: least_load\nlimits: { saturation: queue }\n"),
        "limits.saturation",
        "unknown variant `queue`, expected `inflight` or `engine_queue`",
    );
}

#[test]
fn key_weights_default_to_one_and_are_bounded() {
    let c = ok(&with_backend(
        "auth: { keys: [{ name: a, key: \"0123456789abcdef\", weight: 3 }, \
         { name: b, key: \"0123456789abcdeg\" }] }\n",
    ));
    assert_eq!((c.auth.keys[0].weight, c.auth.keys[1].weight), (3, 1));
    for bad in ["0", "1001"] {
        assert_error(
            &with_backend(&format!(
                "auth: {{ keys: [{{ name: a, key: \"0123456789abcdef\", weight: {bad} }}] }}\n"
            )),
            "auth.keys[0].weight",
            "must be 1 to 1000",
        );
    }
    assert_error(
        &with_backend("auth: { keys: [{ name: a, key: \"0123456789abcdef\", weight: -1 }] }\n"),
        "auth.keys[0].weight",
        "",
    );
    let keys =
        parse_keys_file("keys:\n  - { name: x, key: \"0123456789abcdef\", weight: 2 }\n").unwrap();
    assert_eq!(keys[0].weight, 2);
    assert!(parse_keys_file("keys: [{ name: x, key: \"0123456789abcdef\", weight: 0 }]").is_err());
}

#[test]
fn scheduling_and_priorities() {
    let c = ok(MINIMAL);
    assert_eq!(c.limits.scheduling, Scheduling::Fair);
    assert_eq!(c.limits.promote_after, Duration::from_secs(5));
    let c = ok(&with_backend(
        "limits: { scheduling: fifo, promote_after: 750ms }\n\
         auth: { keys: [{ name: a, key: \"0123456789abcdef\", priority: low }, \
         { name: b, key: \"0123456789abcdeg\" }] }\n",
    ));
    assert_eq!(c.limits.scheduling, Scheduling::Fifo);
    assert_eq!(c.limits.promote_after, Duration::from_millis(750));
    assert_eq!(c.auth.keys[0].priority, Priority::Low);
    assert_eq!(c.auth.keys[1].priority, Priority::Normal);
    assert_error(
        &with_backend("limits: { scheduling: lifo }\n"),
        "limits.scheduling",
        "unknown variant `lifo`, expected `fair` or `fifo`",
    );
    assert_error(
        &with_backend("limits: { promote_after: 0s }\n"),
        "limits.promote_after",
        "greater than zero",
    );
    assert_error(
        &with_backend(
            "auth: { keys: [{ name: a, key: \"0123456789abcdef\", priority: urgent }] }\n",
        ),
        "auth.keys[0].priority",
        "unknown variant `urgent`, expected one of `high`, `normal`, `low`",
    );
    let keys =
        parse_keys_file("keys:\n  - { name: x, key: \"0123456789abcdef\", priority: high }\n")
            .unwrap();
    assert_eq!(keys[0].priority, Priority::High);
    assert!(
        parse_keys_file("keys: [{ name: x, key: \"0123456789abcdef\", priority: 1 }]").is_err()
    );
}
