//! Metrics and logs as an operator scrapes and reads them.

mod common;

use std::time::Duration;

use common::*;

fn scrape(addr: std::net::SocketAddr, needle: &str) -> String {
    let mut text = String::new();
    // Cores fold their local metrics into the registry on their 100 ms tick.
    eventually(Duration::from_secs(3), || {
        text = get(addr, "/metrics").text();
        text.contains(needle)
    });
    text
}

#[test]
fn admin_listener_takes_metrics_off_the_main_port() {
    let mock = Mock::start();
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let yaml = config(
        &[mock.url()],
        &format!("admin_listen: \"127.0.0.1:{admin_port}\"\n"),
    );
    let proxy = Proxy::start(&yaml, &[]);
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    get(proxy.addr, "/metrics").assert_error(404, "not_found");
    assert_eq!(mock.stat("requests"), 0);
    let m = get(admin, "/metrics");
    assert_eq!(m.status, 200);
    assert!(m.text().contains("llmproxy_build_info"));
    assert_eq!(get(admin, "/health").status, 200);
    // The admin port proxies nothing.
    let r = post_json(admin, "/v1/chat/completions", &chat_body(false, 1), &[]);
    r.assert_error(404, "not_found");
    // The main port still serves health checks.
    assert_eq!(get(proxy.addr, "/health").status, 200);
}

#[test]
fn stream_metrics_tokens_and_errors_are_exported() {
    let mock = Mock::start_with(&["--token-delay-ms", "20"]);
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nworkers: 1\nstrategy: round_robin\nbackends:\n  - url: \"{}\"\n    models: [\"mock-model\"]\n  - url: \"http://{dead}\"\n    models: [\"mock-model\"]\n",
        mock.url()
    );
    let proxy = Proxy::start(&yaml, &[]);
    for _ in 0..2 {
        let r = post_json(proxy.addr, "/v1/chat/completions", &chat_body(true, 4), &[]);
        assert_eq!(r.status, 200);
    }
    // An error relayed from the backend, and one the proxy makes itself.
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 1),
        &[("x-mock-status", "500")],
    );
    assert_eq!(r.status, 500);
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-x"}"#,
        &[],
    );
    assert_eq!(r.status, 404);
    let text = scrape(proxy.addr, "status=\"404\"");
    let b = mock.url();
    for needle in [
        format!("llmproxy_requests_total{{backend=\"{b}\",model=\"mock-model\",status=\"200\"}} 2"),
        format!("llmproxy_requests_total{{backend=\"{b}\",model=\"mock-model\",status=\"500\"}} 1"),
        "llmproxy_requests_total{backend=\"none\",model=\"other\",status=\"404\"} 1".to_string(),
        format!("llmproxy_latency_ms_count{{backend=\"{b}\",model=\"mock-model\"}} 3"),
        format!("llmproxy_request_duration_seconds_count{{backend=\"{b}\",model=\"mock-model\"}} 3"),
        format!("llmproxy_upstream_retries_total{{backend=\"http://{dead}\"}} 1"),
        format!("llmproxy_time_to_first_token_seconds_count{{backend=\"{b}\",model=\"mock-model\"}} 2"),
        "llmproxy_tokens_total{model=\"mock-model\",type=\"completion\"} 8".to_string(),
        "llmproxy_tokens_total{model=\"mock-model\",type=\"prompt\"} 6".to_string(),
        format!("llmproxy_upstream_errors_total{{backend=\"http://{dead}\",kind=\"upstream_connect_error\"}} 1"),
        "llmproxy_inter_token_latency_seconds_bucket".to_string(),
        "llmproxy_usage_events_total{outcome=\"dropped\"} 0".to_string(),
        "llmproxy_connections_active".to_string(),
    ] {
        assert!(text.contains(&needle), "missing {needle} in\n{text}");
    }
}

#[test]
fn access_log_lines_are_json_with_the_request_facts() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&[mock.url()], ""), &[]);
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(true, 3),
        &[("x-request-id", "log-1")],
    );
    assert_eq!(r.status, 200);
    assert!(eventually(Duration::from_secs(2), || {
        proxy
            .access_lines()
            .iter()
            .any(|l| l["request_id"] == "log-1")
    }));
    let lines = proxy.access_lines();
    let l = lines.iter().find(|l| l["request_id"] == "log-1").unwrap();
    assert_eq!(l["method"], "POST");
    assert_eq!(l["path"], "/v1/chat/completions");
    assert_eq!(l["model"], "mock-model");
    assert_eq!(l["backend"], mock.url());
    assert_eq!(l["status"], 200);
    assert_eq!(l["outcome"], "ok");
    assert_eq!(l["completion_tokens"], 3);
    assert!(l["duration_ms"].is_number());
    assert!(l["ttft_ms"].is_number());
    assert!(l["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(l["ts"].is_string());
    // Every other line is JSON too.
    for line in proxy.proc.lines.lock().unwrap().iter() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
}

#[test]
fn text_logs_and_rust_log_override() {
    let mock = Mock::start();
    let proxy = Proxy::start_env(
        &config(&[mock.url()], "logging: { format: text, level: warn }\n"),
        &[],
        &[("RUST_LOG", "debug")],
    );
    assert_eq!(get(proxy.addr, "/health").status, 200);
    // RUST_LOG=debug wins over level: warn, so info lines (like the listening line) appear.
    proxy.proc.wait_for_line(" INFO ", Duration::from_secs(3));
    assert!(serde_json::from_str::<serde_json::Value>(
        &proxy
            .proc
            .wait_for_line("listening on", Duration::from_secs(1))
    )
    .is_err());
}
