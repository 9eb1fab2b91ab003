//! The binary as an operator meets it: CLI, config checking, workers and drivers, metrics,
//! graceful shutdown and the embedded demo.

mod common;

use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn help_and_version() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--config",
        "--workers",
        "--cpus",
        "check",
        "demo",
        "mock-backend",
    ] {
        assert!(help.contains(word), "--help mentions {word}");
    }
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn check_validates_and_names_the_path() {
    let dir = temp_dir("check");
    let good = dir.join("good.yaml");
    std::fs::write(
        &good,
        "listen: \":8080\"\nbackends:\n  - url: \"http://vllm-0:8000\"\n    weight: 5\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "listen: \":8080\"\nbackends:\n  - url: \"http://a:8000\"\n  - url: \"ftp://b\"\n    weight: 0\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("backends[1].url"), "{err}");
    assert!(err.contains("backends[1].weight"), "{err}");

    let typo = dir.join("typo.yaml");
    std::fs::write(
        &typo,
        "listen: \":8080\"\nbackends:\n  - url: \"http://a:8000\"\n    wieght: 2\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&typo)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("backends[0]") && err.contains("wieght"),
        "{err}"
    );

    let empty = dir.join("empty.yaml");
    std::fs::write(&empty, "listen: \":8080\"\nbackends: []\n").unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&empty)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("backends"));

    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/llmproxy.example.yaml");
    let out = Command::new(BIN)
        .args(["check", "--config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the example config is valid: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 20: `timeouts.header: 18446744073709551615s` used to pass `check`, then panic every
/// connection task when added to an `Instant`. Durations are now bounded at one year.
#[test]
fn check_refuses_a_duration_that_would_overflow_the_clock() {
    let dir = temp_dir("check-duration");
    let cfg = dir.join("c.yaml");
    std::fs::write(
        &cfg,
        "listen: \":8080\"\nbackends:\n  - url: \"http://vllm-0:8000\"\ntimeouts:\n  header: 18446744073709551615s\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("timeouts.header: duration \"18446744073709551615s\" is longer than the limit of 1y (365.25 days)"),
        "{err}"
    );
}

#[test]
fn invalid_cpu_list_is_a_startup_error() {
    let dir = temp_dir("cpus");
    let cfg = dir.join("c.yaml");
    std::fs::write(
        &cfg,
        "listen: \"127.0.0.1:0\"\nbackends:\n  - url: \"http://127.0.0.1:9\"\n",
    )
    .unwrap();
    for cpus in ["9999", "1-0", "x"] {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .args(["--cpus", cpus])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--cpus {cpus} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cpu") || err.contains("CPU"), "{err}");
    }
}

#[test]
fn workers_are_pinned_and_each_logs_its_driver() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&[mock.url()], ""), &["--workers", "2"]);
    proxy
        .proc
        .wait_for_line("core 0 running on io_uring", Duration::from_secs(5));
    proxy
        .proc
        .wait_for_line("core 1 running on io_uring", Duration::from_secs(5));
    drop(proxy);
    let proxy = Proxy::start(&config(&[mock.url()], ""), &["--cpus", "0"]);
    proxy
        .proc
        .wait_for_line("pinned to CPU 0", Duration::from_secs(5));
    let proxy = Proxy::start_env(
        &config(&[mock.url()], ""),
        &[],
        &[("MONOIO_FORCE_LEGACY_DRIVER", "1")],
    );
    proxy
        .proc
        .wait_for_line("core 0 running on epoll", Duration::from_secs(5));
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
fn io_driver_selects_epoll_or_insists_on_io_uring() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&[mock.url()], "io_driver: epoll\n"), &[]);
    proxy
        .proc
        .wait_for_line("core 0 running on epoll", Duration::from_secs(5));
    let r = post_json(proxy.addr, "/v1/chat/completions", &chat_body(true, 3), &[]);
    assert_eq!(r.status, 200);
    assert!(r.text().contains("tok2"), "{}", r.text());
    let metrics = get(proxy.addr, "/metrics").text();
    assert!(metrics.contains(r#"driver="epoll""#), "{metrics}");
    drop(proxy);

    // Asked for io_uring where the runtime cannot have it: a startup error, not a silent epoll.
    let dir = temp_dir("io-driver");
    let cfg = dir.join("c.yaml");
    std::fs::write(
        &cfg,
        "listen: \"127.0.0.1:0\"\nio_driver: io_uring\nbackends:\n  - url: \"http://127.0.0.1:9\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .env("MONOIO_FORCE_LEGACY_DRIVER", "1")
        .output()
        .unwrap();
    assert!(!out.status.success(), "io_uring refused must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("io_driver is io_uring"), "{err}");
    // An unknown driver is a config error naming the key.
    std::fs::write(
        &cfg,
        "listen: \"127.0.0.1:0\"\nio_driver: kqueue\nbackends:\n  - url: \"http://127.0.0.1:9\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("io_driver"), "{err}");
}

#[test]
fn metrics_count_requests_with_bounded_labels() {
    let mock = Mock::start();
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nworkers: 2\nbackends:\n  - url: \"{}\"\n    models: [\"mock-model\"]\n",
        mock.url()
    );
    let proxy = Proxy::start(&yaml, &[]);
    for _ in 0..3 {
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
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        r#"{"model":"random-client-junk"}"#,
        &[],
    );
    assert_eq!(r.status, 404);
    // Local metrics are flushed on each core's tick.
    std::thread::sleep(Duration::from_millis(300));
    let m = get(proxy.addr, "/metrics");
    assert_eq!(m.status, 200);
    let text = m.text();
    let line = format!(
        "llmproxy_requests_total{{backend=\"{}\",model=\"mock-model\",status=\"200\"}} 3",
        mock.url()
    );
    assert!(text.contains(&line), "missing {line} in\n{text}");
    assert!(text.contains("model=\"other\",status=\"404\""), "{text}");
    assert!(!text.contains("random-client-junk"));
    assert!(text.contains("llmproxy_latency_ms_bucket"));
    assert!(text.contains("llmproxy_backend_up"));
    assert!(text.contains("llmproxy_build_info"));
}

#[test]
fn sigterm_drains_running_streams_then_exits_zero() {
    let mock = Mock::start_with(&["--token-delay-ms", "100"]);
    let mut proxy = Proxy::start(&config(&[mock.url()], "shutdown_grace: 10s\n"), &[]);
    // A keep-alive connection opened before the signal, to ask /health during the drain.
    let mut probe = Client::connect(proxy.addr);
    probe.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(probe.read_response().status, 200);

    let mut stream = Client::connect(proxy.addr);
    stream.send(post_raw("/v1/chat/completions", &chat_body(true, 10), &[], false).as_bytes());
    let mut first = [0u8; 512];
    assert!(stream.stream.read(&mut first).unwrap() > 0);
    let t0 = Instant::now();
    proxy.proc.signal(libc::SIGTERM);
    // The signal reaches the main thread asynchronously; ask until the drain shows.
    let mut h = probe.read_response_after(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    for _ in 0..100 {
        if h.status == 503 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        h = probe.read_response_after(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    }
    assert_eq!(h.status, 503);
    assert_eq!(h.json()["status"], "draining");
    // The stream finishes completely.
    let mut rest = Vec::new();
    stream.stream.read_to_end(&mut rest).unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("[DONE]"), "stream completed: {text}");
    assert!(text.ends_with("0\r\n\r\n"));
    assert_eq!(proxy.proc.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(5));
    proxy.proc.wait_for_line("drained", Duration::from_secs(3));
}

#[test]
fn demo_runs_with_nothing_else() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(BIN);
    cmd.args(["demo", "--port", &port.to_string()]);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let demo = DemoGuard(child);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(eventually(Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).is_ok()
    }));
    let r = post_json(addr, "/v1/chat/completions", &chat_body(true, 3), &[]);
    assert_eq!(r.status, 200);
    assert!(r.text().contains("[DONE]"));
    assert_eq!(get(addr, "/health").status, 200);
    // Each core folds its counters into the registry on its 100 ms tick.
    assert!(eventually(Duration::from_secs(2), || get(addr, "/metrics")
        .text()
        .contains("llmproxy_requests_total{")));
    drop(demo);
}

/// Issue 21 item 9: the demo shows metering too: each usage event is printed, with its
/// event_id, once the in-process receiver has it. `--port 0` picks a free port and the demo
/// prints the real one.
#[test]
fn demo_prints_each_usage_event_when_delivered() {
    let mut cmd = Command::new(BIN);
    cmd.args(["demo", "--port", "0", "--workers", "1"]);
    let demo = Proc::spawn(cmd);
    let line = demo.wait_for_line("proxy on http://", Duration::from_secs(10));
    let addr = parse_addr(&line);
    assert_ne!(addr.port(), 0, "{line}");
    let r = post_json(addr, "/v1/chat/completions", &chat_body(true, 3), &[]);
    assert_eq!(r.status, 200);
    let request_id = r.header("x-request-id").map(str::to_string);
    let line = demo.wait_for_line("usage event: {", Duration::from_secs(10));
    let event: serde_json::Value =
        serde_json::from_str(line.trim_start_matches("usage event: ")).expect("event JSON");
    assert_eq!(
        event["event_id"].as_str().map(str::len),
        Some(32),
        "{event}"
    );
    assert_eq!(event["completion_tokens"], 3, "{event}");
    assert_eq!(event["is_stream"], true, "{event}");
    assert_eq!(event["model"], "mock-model", "{event}");
    if let Some(id) = request_id {
        assert_eq!(event["request_id"], id.as_str(), "{event}");
    }
    // One request, one event.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(demo.output().matches("usage event: {").count(), 1);
}

struct DemoGuard(std::process::Child);
impl Drop for DemoGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Issue 21 item 7: beside "listening on", one line says what an operator checks first.
#[test]
fn startup_banner_lists_backends_strategy_auth_hook_driver_and_admin() {
    let mock = Mock::start();
    let hook = webhook::Webhook::start();
    let yaml = config(
        &[mock.url()],
        &format!(
            "strategy: power_of_two\nadmin_listen: \"127.0.0.1:0\"\nauth: {{ keys: [{{ name: team-a, key: sk-banner-0123456789 }}] }}\n{}",
            hook.config_yaml()
        ),
    );
    let proxy = Proxy::start(&yaml, &[]);
    let line = proxy
        .proc
        .wait_for_line("config: 1 backends", Duration::from_secs(5));
    for part in [
        format!("[{}]", mock.url()),
        "strategy power_of_two".into(),
        "auth on (1 keys)".into(),
        format!("usage hook {}", hook.url()),
        "io_driver ".into(),
        "admin listener 127.0.0.1:".into(),
    ] {
        assert!(line.contains(&part), "{part:?} missing from {line}");
    }
    assert!(!line.contains("sk-banner"), "{line}");
}

fn run_cli(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Issue 21 item 11: each message once, in the user's words.
#[test]
fn cli_messages_name_things_once_and_in_the_users_words() {
    // A missing file: the path once, the error once.
    let (code, _, err) = run_cli(&["--config", "/nonexistent.yaml"]);
    assert_eq!(code, Some(1));
    assert_eq!(
        err.trim(),
        "llmproxy: /nonexistent.yaml: No such file or directory (os error 2)"
    );
    let (code, _, err) = run_cli(&["check", "/nonexistent.yaml"]);
    assert_eq!(code, Some(1));
    assert_eq!(
        err.trim(),
        "/nonexistent.yaml: No such file or directory (os error 2)"
    );

    // `check` takes the path as an argument too, and says what it checked in words.
    let dir = temp_dir("cli");
    let good = dir.join("good.yaml");
    std::fs::write(
        &good,
        "listen: \":8080\"\nbackends:\n  - url: \"http://127.0.0.1:8000\"\n",
    )
    .unwrap();
    let good = good.to_str().unwrap();
    for args in [vec!["check", good], vec!["check", "--config", good]] {
        let (code, out, err) = run_cli(&args);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(
            out.trim(),
            format!("{good}: ok (1 backend, strategy least_connections)")
        );
    }

    // Several problems, one a type error: all reported, none in Rust's words.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "listen: \":8080\"\nworkers: many\nbackends:\n  - url: \"ftp://b\"\n    weight: x\nretry: { attempts: -1 }\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check", bad.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    for line in [
        "invalid configuration:",
        "  workers: invalid type: string \"many\", expected a whole number (0 or more)",
        "  backends[0].weight: invalid type: string \"x\", expected a whole number (0 or more)",
        "  retry.attempts: invalid value: integer `-1`, expected a whole number (0 or more)",
        "  backends[0].url: unsupported scheme \"ftp\"",
    ] {
        assert!(err.contains(line), "{line:?} missing from:\n{err}");
    }
    assert!(!err.contains("u32") && !err.contains("usize"), "{err}");

    // `reload` with neither target names both; `--admin` also takes a URL.
    let (code, _, err) = run_cli(&["reload"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--config <PATH>|--admin <HOST:PORT>"), "{err}");
    let (code, _, err) = run_cli(&["reload", "--admin", "http://127.0.0.1:1/"]);
    assert_eq!(code, Some(1));
    assert!(!err.contains("http://http"), "{err}");
    assert_eq!(
        err.matches("http://127.0.0.1:1/admin/reload").count(),
        1,
        "{err}"
    );
}

/// Issue 21 item 11: an error after logging started is one log line, not a log line and a
/// plain copy.
#[test]
fn a_startup_error_after_logging_started_is_printed_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = temp_dir("twice");
    let cfg = dir.join("c.yaml");
    std::fs::write(
        &cfg,
        format!("listen: \"127.0.0.1:{port}\"\nbackends:\n  - url: \"http://127.0.0.1:9\"\n"),
    )
    .unwrap();
    let (code, _, err) = run_cli(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert_eq!(err.matches("already in use").count(), 1, "{err}");
    let line: serde_json::Value =
        serde_json::from_str(err.trim()).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!(line["level"], "ERROR", "{err}");
}

/// Issue 21 item 8: a static backend whose name does not resolve (the vLLM Service not created
/// yet, a typo) is a warning for `check` and a backend down for the proxy, which starts and
/// serves with the others.
#[test]
fn an_unresolvable_backend_name_is_a_warning_not_a_crash() {
    let mock = Mock::start();
    let yaml = config(
        &[mock.url(), "http://vllm.invalid:8000".into()],
        "discovery: { interval: 300ms }\n",
    );
    let dir = temp_dir("unresolved");
    let path = dir.join("c.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let (code, out, err) = run_cli(&["check", path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(": ok (2 backends"), "{out}");
    assert!(
        err.contains("warning: backends[1].url: cannot resolve vllm.invalid")
            && err.contains("starts with this backend down"),
        "{err}"
    );

    let proxy = Proxy::start(&yaml, &[]);
    proxy.proc.wait_for_line(
        "backends[1].url: cannot resolve vllm.invalid",
        Duration::from_secs(5),
    );
    chats_ok(proxy.addr, 5);
    assert_eq!(mock.stat("requests"), 5);
    let health = get(proxy.addr, "/health").json();
    assert_eq!(
        health["backends"].as_array().map(Vec::len),
        Some(1),
        "{health}"
    );
    // Retried every discovery.interval (quietly: one warning a minute), and still alive.
    std::thread::sleep(Duration::from_millis(800));
    chats_ok(proxy.addr, 2);
}

/// Issue 21 item 10: `/ready` (the readiness probe) is 200 while the process serves, even with
/// every backend down and with auth on (no key needed, like `/health`), and 503 once draining;
/// `/health` (for load balancers) stays 503 while no backend is up.
#[test]
fn ready_is_up_without_backends_and_down_while_draining() {
    let mock = Mock::start_with(&["--ttft-ms", "1500"]);
    let dead = "http://127.0.0.1:9".to_string();
    let yaml = config(
        &[dead],
        "shutdown_grace: 10s\nauth: { keys: [{ name: a, key: sk-ready-0123456789 }] }\n",
    );
    let mut proxy = Proxy::start(&yaml, &[]);
    assert!(eventually(Duration::from_secs(5), || get(
        proxy.addr, "/health"
    )
    .status
        == 503));
    let r = get(proxy.addr, "/ready");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ready");

    // Draining: a slow stream keeps the process alive, a connection opened before asks.
    let yaml = config(
        &[mock.url()],
        "shutdown_grace: 10s\nauth: { keys: [{ name: a, key: sk-ready-0123456789 }] }\n",
    );
    proxy = Proxy::start(&yaml, &[]);
    let addr = proxy.addr;
    let mut probe = Client::connect(addr);
    probe.send(b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(probe.read_response().status, 200);
    let slow = std::thread::spawn(move || {
        post_json(
            addr,
            "/v1/chat/completions",
            &chat_body(true, 2),
            &[("authorization", "Bearer sk-ready-0123456789")],
        )
        .status
    });
    std::thread::sleep(Duration::from_millis(300));
    proxy.proc.signal(libc::SIGTERM);
    let mut status = 200;
    assert!(
        eventually(Duration::from_secs(2), || {
            let r = probe.read_response_after(b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n");
            status = r.status;
            status == 503 && r.json()["status"] == "draining"
        }),
        "last /ready status {status}"
    );
    assert_eq!(slow.join().unwrap(), 200);
    assert_eq!(proxy.proc.wait_exit(Duration::from_secs(10)), Some(0));
}
