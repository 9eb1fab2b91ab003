//! What a hostile review and careless configs found (issue 20), each pinned by a regression test:
//! `check` runs every validation startup runs; empty bodies on JSON routes and repeated `Host`
//! headers are refused; a second process cannot share a port in use; `/admin/reload` on the main
//! listener needs an admin key when auth is on; a connection that sends nothing is closed after
//! `timeouts.header`, not `timeouts.keepalive`.

mod common;

use std::io::{ErrorKind, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs the binary with `args` to completion (bounded); returns its exit code and output.
fn run(args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn llmproxy");
    let start = Instant::now();
    let code = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("llmproxy {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut s = stream;
        let _ = s.read_to_string(&mut out);
    }
    (code, out)
}

/// The config written to a fresh directory (kept until the returned guard drops).
fn write_config(tag: &str, yaml: &str) -> (TempDir, std::path::PathBuf) {
    let dir = temp_dir(tag);
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).expect("write config");
    (dir, path)
}

#[test]
fn check_refuses_a_spool_dir_that_startup_would_refuse() {
    let dir = temp_dir("spool-file");
    let file = dir.join("not-a-dir");
    std::fs::write(&file, "x").expect("write file");
    for (spool, why) in [
        (file.display().to_string(), "is not a directory"),
        (
            file.join("below").display().to_string(),
            "is not a directory",
        ),
    ] {
        let yaml = format!(
            "listen: \"127.0.0.1:0\"\nbackends: [{{ url: \"http://127.0.0.1:9\" }}]\n\
             usage_hook: {{ enabled: true, url: \"http://127.0.0.1:9/usage\", spool_dir: \"{spool}\" }}\n"
        );
        let (_dir, path) = write_config("spool-check", &yaml);
        let path = path.to_str().expect("utf-8 path");
        let (code, out) = run(&["check", "--config", path], Duration::from_secs(20));
        assert_eq!(code, Some(1), "check passed: {out}");
        assert!(
            out.contains("usage_hook.spool_dir") && out.contains(why),
            "unclear message: {out}"
        );
        // And startup refuses it the same way.
        let (code, out) = run(&["--config", path], Duration::from_secs(20));
        assert_eq!(code, Some(1), "started: {out}");
        assert!(out.contains("usage_hook.spool_dir"), "{out}");
    }
    // A directory that does not exist yet but can be created is fine for both.
    let ok = dir.join("spool").join("nested");
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nbackends: [{{ url: \"http://127.0.0.1:9\" }}]\n\
         usage_hook: {{ enabled: true, url: \"http://127.0.0.1:9/usage\", spool_dir: \"{}\" }}\n",
        ok.display()
    );
    let (_dir, path) = write_config("spool-ok", &yaml);
    let (code, out) = run(
        &["check", "--config", path.to_str().expect("utf-8 path")],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(!ok.exists(), "check must not create the spool directory");
}

#[test]
fn empty_bodies_on_json_routes_get_400_and_never_reach_a_backend() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&[mock.url()], ""), &[]);
    for raw in [
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
        "POST /v1/completions HTTP/1.1\r\nHost: t\r\n\r\n",
        "POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\r\n",
    ] {
        let r = request(proxy.addr, raw);
        r.assert_error(400, "bad_request");
        assert!(r.text().contains("JSON object"), "{}", r.text());
    }
    assert_eq!(mock.stat("requests"), 0);
    // A GET without a body still goes through.
    assert_eq!(get(proxy.addr, "/v1/models").status, 200);
}

#[test]
fn a_request_with_two_host_headers_is_refused() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&[mock.url()], ""), &[]);
    let body = r#"{"model":"mock-model","messages":[]}"#;
    for hosts in ["Host: a\r\nHost: b\r\n", "Host: a\r\nhost: a\r\n"] {
        let raw = format!(
            "POST /v1/chat/completions HTTP/1.1\r\n{hosts}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut c = Client::connect(proxy.addr);
        c.send(raw.as_bytes());
        let r = c.read_response();
        r.assert_error(400, "bad_request");
        assert!(r.text().contains("Host"), "{}", r.text());
        assert_eq!(r.header("connection"), Some("close"));
    }
    assert_eq!(mock.stat("requests"), 0);
}

#[test]
fn a_second_process_cannot_share_a_port_in_use() {
    let mock = Mock::start();
    let first = Proxy::start(&config(&[mock.url()], ""), &[]);
    let port = first.addr.port();
    let yaml = config(&[mock.url()], "").replace(
        "listen: \"127.0.0.1:0\"",
        &format!("listen: \"127.0.0.1:{port}\""),
    );
    let (_dir, path) = write_config("second", &yaml);
    let (code, out) = run(
        &["--config", path.to_str().expect("utf-8 path")],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(1), "the second process started: {out}");
    assert!(
        out.contains(&format!("port {port} is already in use")),
        "the error does not name the port: {out}"
    );
    // The first one is undisturbed: every request reaches it.
    chats_ok(first.addr, 20);
}

#[test]
fn admin_reload_on_the_main_listener_needs_an_admin_key_when_auth_is_on() {
    let mock = Mock::start();
    let extra = "auth:\n  keys:\n    - { name: team, key: \"sk-team-0123456789abcdef\" }\n    - { name: ops, key: \"sk-ops-0123456789abcdef\", admin: true }\n";
    let proxy = Proxy::start(&config(&[mock.url()], extra), &[]);
    let r = post_json(proxy.addr, "/admin/reload", "", &[]);
    r.assert_error(401, "missing_api_key");
    let bearer = |k: &str| format!("Bearer {k}");
    let team = bearer("sk-team-0123456789abcdef");
    let r = post_json(
        proxy.addr,
        "/admin/reload",
        "",
        &[("authorization", team.as_str())],
    );
    r.assert_error(403, "admin_key_required");
    let ops = bearer("sk-ops-0123456789abcdef");
    let r = post_json(
        proxy.addr,
        "/admin/reload",
        "",
        &[("authorization", ops.as_str())],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "reloaded");
    // Probes stay open.
    assert_eq!(get(proxy.addr, "/health").status, 200);
}

#[test]
fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
    let mock = Mock::start();
    let extra = "timeouts: { header: 1s, keepalive: 30s }\n";
    let proxy = Proxy::start(&config(&[mock.url()], extra), &[]);
    let mut silent = Client::connect(proxy.addr);
    silent
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let start = Instant::now();
    let mut tmp = [0u8; 64];
    match silent.stream.read(&mut tmp) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("{n} bytes for a request never sent"),
        Err(e) => panic!("still open after {:?}: {e}", start.elapsed()),
    }
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "closed after {waited:?}, not after timeouts.header (1s)"
    );
    // After a first request, the keep-alive timeout applies between requests.
    let mut c = Client::connect(proxy.addr);
    c.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().status, 200);
    c.stream
        .set_read_timeout(Some(Duration::from_millis(2500)))
        .expect("timeout");
    match c.stream.read(&mut tmp) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("a kept-alive connection was closed early: {other:?}"),
    }
}
