//! The value parsers on their own.

use super::*;

#[test]
fn cpu_list_parsing() {
    assert_eq!(parse_cpu_list("0-3,8"), Ok(vec![0, 1, 2, 3, 8]));
    assert_eq!(parse_cpu_list("7"), Ok(vec![7]));
    assert_eq!(parse_cpu_list(" 2 - 3 , 0 "), Ok(vec![2, 3, 0]));
    assert_eq!(parse_cpu_list("5-5"), Ok(vec![5]));
    for (s, needle) in [
        ("", "empty CPU list"),
        ("0,", "empty item"),
        (",0", "empty item"),
        ("a", "invalid CPU number \"a\""),
        ("+1", "invalid CPU number"),
        ("-1", "invalid CPU number \"\""),
        ("1-", "invalid CPU number \"\""),
        ("1-2-3", "invalid CPU number \"2-3\""),
        ("3-1", "reversed range \"3-1\""),
        ("0-2,1", "CPU 1 is listed twice"),
        ("1,1", "listed twice"),
        ("4096", "out of range"),
    ] {
        match parse_cpu_list(s) {
            Ok(v) => panic!("{s:?} parsed as {v:?}"),
            Err(e) => assert!(e.contains(needle), "{s:?}: {e:?} lacks {needle:?}"),
        }
    }
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
    assert!(parse_duration("10").unwrap_err().contains("needs a unit"));
    assert!(parse_duration("ten seconds")
        .unwrap_err()
        .contains("invalid duration"));
    assert!(parse_duration("").is_err());

    assert_error(
        &with_backend("timeouts: { connect: 5 }\n"),
        "timeouts.connect",
        "needs a unit",
    );
    assert_error(
        &with_backend("timeouts: { connect: \"5\" }\n"),
        "timeouts.connect",
        "needs a unit",
    );
    assert_error(
        &with_backend("timeouts: { connect: 1.5 }\n"),
        "timeouts.connect",
        "needs a unit",
    );
    assert_error(
        &with_backend("timeouts: { connect: -1 }\n"),
        "timeouts.connect",
        "needs a unit",
    );
    assert_error(
        &with_backend("shutdown_grace: soon\n"),
        "shutdown_grace",
        "invalid duration",
    );
    assert_error(
        &with_backend("pool: { idle_timeout: 5x }\n"),
        "pool.idle_timeout",
        "invalid duration",
    );
}

#[test]
fn durations_are_at_most_a_year() {
    assert_eq!(parse_duration("1y"), Ok(MAX_DURATION));
    assert_eq!(
        parse_duration("365d"),
        Ok(Duration::from_secs(365 * 86_400))
    );
    for too_long in ["366d", "1y 1s", "18446744073709551615s", "600000years"] {
        let e = parse_duration(too_long).unwrap_err();
        assert!(
            e.contains("longer than the limit of 1y (365.25 days)"),
            "{too_long}: {e}"
        );
    }
}

/// The bound is the duration parser's, so no duration key can miss it: each one, written as the
/// value from issue 20 (which panicked every connection task), is refused at its own path.
#[test]
fn every_duration_key_refuses_an_overflowing_value() {
    let keys = [
        "shutdown_grace",
        "routing.metrics_interval",
        "routing.metrics_stale_after",
        "health_check.interval",
        "health_check.timeout",
        "timeouts.connect",
        "timeouts.header",
        "timeouts.first_byte",
        "timeouts.idle",
        "timeouts.request",
        "timeouts.keepalive",
        "timeouts.write",
        "limits.queue_timeout",
        "breaker.cooldown",
        "breaker.max_cooldown",
        "pool.idle_timeout",
        "usage_hook.timeout",
        "usage_hook.flush_interval",
        "usage_hook.spool_fsync",
        "discovery.interval",
        "discovery.stale_after",
        "auth.keys_file_poll",
    ];
    for path in keys {
        let yaml = match path.split_once('.') {
            Some((section, key)) => format!("{section}: {{ {key}: 18446744073709551615s }}\n"),
            None => format!("{path}: 18446744073709551615s\n"),
        };
        assert_error(
            &with_backend(&yaml),
            path,
            "is longer than the limit of 1y (365.25 days)",
        );
    }
    // A year itself is a valid (if odd) value everywhere.
    ok(&with_backend(
        "timeouts: { header: 1y, first_byte: 1y, connect: 1y }\npool: { idle_timeout: 1y }\n",
    ));
}

#[test]
fn sizes() {
    assert_eq!(parse_size("512"), Ok(512));
    assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
    assert_eq!(parse_size("10MiB"), Ok(10 << 20));
    assert_eq!(parse_size("1GiB"), Ok(1 << 30));
    assert_eq!(parse_size("2KB"), Ok(2_000));
    assert_eq!(parse_size("3MB"), Ok(3_000_000));
    assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
    assert_eq!(parse_size("4K"), Ok(4096));
    assert_eq!(parse_size("2M"), Ok(2 << 20));
    assert_eq!(parse_size("1G"), Ok(1 << 30));
    assert_eq!(parse_size("16 kib"), Ok(16 << 10));
    assert_eq!(parse_size("100B"), Ok(100));
    assert!(parse_size("MiB").unwrap_err().contains("invalid size"));
    assert!(parse_size("10XB").unwrap_err().contains("unknown unit"));
    assert!(parse_size("1.5MiB").unwrap_err().contains("fractions"));
    assert!(parse_size("99999999999GiB")
        .unwrap_err()
        .contains("too large"));

    let c = ok(&with_backend(
        "limits: { max_body_bytes: 2048, max_header_bytes: \"1KiB\" }\n",
    ));
    assert_eq!(c.limits.max_body_bytes, 2048);
    assert_eq!(c.limits.max_header_bytes, 1024);
    assert_error(
        &with_backend("limits: { max_body_bytes: 10Mb/s }\n"),
        "limits.max_body_bytes",
        "unknown unit",
    );
    assert_error(
        &with_backend("limits: { max_header_bytes: -5 }\n"),
        "limits.max_header_bytes",
        "negative",
    );
    assert_error(
        &with_backend("limits: { max_body_bytes: 0.5 }\n"),
        "limits.max_body_bytes",
        "fractions",
    );
}
