//! What a new user meets in the first hour (issue 21): a usage hook that cannot silently idle,
//! probes that are not traffic, refusals that say so in the access log, access lines a human can
//! read in `logging.format: text`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn a_usage_hook_url_without_enabled_is_warned_about_in_check_and_at_startup() {
    let mock = Mock::start();
    let yaml = config(
        &[mock.url()],
        "usage_hook: { url: \"http://127.0.0.1:9/usage\" }\n",
    );
    let dir = temp_dir("idle-hook");
    let path = dir.join("config.yaml");
    std::fs::write(&path, &yaml).expect("write config");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run check");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "check failed: {text}");
    assert!(
        text.contains("warning: usage_hook.url is set but usage_hook.enabled is false"),
        "no warning: {text}"
    );
    let proxy = Proxy::start(&yaml, &[]);
    proxy
        .proc
        .wait_for_line("usage_hook.enabled is false", Duration::from_secs(5));
}

#[test]
fn probes_are_not_counted_as_traffic_and_every_counted_request_has_a_latency() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&[mock.url()], ""), &[]);
    for _ in 0..5 {
        assert_eq!(get(proxy.addr, "/health").status, 200);
        assert_eq!(get(proxy.addr, "/metrics").status, 200);
    }
    chats_ok(proxy.addr, 2);
    // A request the proxy refuses itself is counted (and timed) too.
    let r = post_json(proxy.addr, "/v1/chat/completions", "[1]", &[]);
    assert_eq!(r.status, 400);
    let text = get(proxy.addr, "/metrics").text();
    let sum = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        sum("llmproxy_requests_total{"),
        3.0,
        "probes counted:\n{text}"
    );
    assert_eq!(sum("llmproxy_latency_ms_count{"), 3.0, "{text}");
    assert_eq!(
        sum("llmproxy_request_duration_seconds_count{"),
        3.0,
        "{text}"
    );
    // Probes still leave an access line.
    assert!(eventually(Duration::from_secs(2), || proxy
        .access_lines()
        .iter()
        .any(|l| l["path"] == "/health")));
}

#[test]
fn refusals_have_their_own_outcome_and_durations_are_rounded() {
    let mock = Mock::start();
    let proxy = Proxy::start(
        &config(
            &[mock.url()],
            "auth: { keys: [{ name: team, key: \"sk-team-0123456789abcdef\" }] }\n",
        ),
        &[],
    );
    let ok_key = [("authorization", "Bearer sk-team-0123456789abcdef")];
    assert_eq!(
        post_json(proxy.addr, "/v1/chat/completions", "{}", &[]).status,
        401
    );
    assert_eq!(
        post_json(proxy.addr, "/v1/chat/completions", "[1]", &ok_key).status,
        400
    );
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 1),
        &ok_key,
    );
    assert_eq!(r.status, 200);
    assert!(eventually(Duration::from_secs(2), || proxy
        .access_lines()
        .len()
        >= 3));
    let lines = proxy.access_lines();
    let outcomes: Vec<(u64, String)> = lines
        .iter()
        .map(|l| {
            (
                l["status"].as_u64().unwrap_or(0),
                l["outcome"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(outcomes.contains(&(401, "refused".into())), "{outcomes:?}");
    assert!(outcomes.contains(&(400, "refused".into())), "{outcomes:?}");
    assert!(outcomes.contains(&(200, "ok".into())), "{outcomes:?}");
    for l in &lines {
        let ms = l["duration_ms"].to_string();
        let decimals = ms.split('.').nth(1).map_or(0, str::len);
        assert!(decimals <= 3, "duration_ms {ms} in {l}");
    }
}

#[test]
fn text_format_access_lines_are_key_value_pairs() {
    let mock = Mock::start();
    let proxy = Proxy::start(
        &config(
            &[mock.url()],
            "logging: { format: text, access_log: true }\n",
        ),
        &[],
    );
    chats_ok(proxy.addr, 1);
    let line = proxy.proc.wait_for_line(" access ", Duration::from_secs(5));
    assert!(
        line.contains("method=POST")
            && line.contains("path=/v1/chat/completions")
            && line.contains("status=200"),
        "{line}"
    );
    assert!(!line.contains("{\""), "still JSON: {line}");
}
