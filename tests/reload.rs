//! Hot reload (SIGHUP, `POST /admin/reload`, `llmproxy reload`): a valid config swaps the
//! backend set under load without a failed request or a cut stream; an invalid one is refused and
//! the running config keeps serving.

mod common;

use std::process::Command;
use std::time::Duration;

use common::load::Load;
use common::*;

const SIGHUP: i32 = 1;

fn yaml(backends: &[(&Mock, u32)], extra: &str) -> String {
    let mut s = String::from(
        "listen: \"127.0.0.1:0\"\nworkers: 2\nstrategy: weighted_round_robin\nbackends:\n",
    );
    for (m, w) in backends {
        s.push_str(&format!("  - url: \"{}\"\n    weight: {w}\n", m.url()));
    }
    s.push_str("health_check: { interval: 300ms, path: /health, timeout: 300ms }\n");
    s.push_str(extra);
    s
}

/// `(url, weight-independent state)` of the active backends `/health` lists, sorted.
fn active(proxy: &Proxy) -> Vec<String> {
    let h = get(proxy.addr, "/health").json();
    let mut v: Vec<String> = h["backends"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|b| b["state"] == "active" && b["up"] == true)
        .filter_map(|b| b["url"].as_str().map(str::to_owned))
        .collect();
    v.sort();
    v
}

fn urls(mocks: &[&Mock]) -> Vec<String> {
    let mut v: Vec<String> = mocks.iter().map(|m| m.url()).collect();
    v.sort();
    v
}

fn write_config(proxy: &Proxy, yaml: &str) {
    std::fs::write(proxy.dir.join("config.yaml"), yaml).expect("rewrite config");
}

#[test]
fn reload_under_load_adds_removes_and_reweights_without_an_error() {
    let args = ["--token-delay-ms", "5"];
    let (a, b, c) = (
        Mock::start_with(&args),
        Mock::start_with(&args),
        Mock::start_with(&args),
    );
    let proxy = Proxy::start(&yaml(&[(&a, 1), (&b, 1)], ""), &[]);
    let plain = Load::start(proxy.addr, 2, false);
    let streams = Load::start(proxy.addr, 2, true);
    assert!(eventually(Duration::from_secs(10), || plain.ok() > 20
        && streams.ok() > 10));

    // Remove a, reweight b to 3, add c.
    write_config(&proxy, &yaml(&[(&b, 3), (&c, 1)], ""));
    proxy.proc.signal(SIGHUP);
    proxy
        .proc
        .wait_for_line("reload done", Duration::from_secs(10));
    assert!(
        eventually(Duration::from_secs(10), || active(&proxy)
            == urls(&[&b, &c])),
        "{:?}",
        active(&proxy)
    );
    // Requests a had already started finish there; then nothing new reaches it.
    assert!(eventually(Duration::from_secs(10), || a.stat("active") == 0));
    let a_done = a.stat("requests");
    let (b0, c0) = (b.stat("requests"), c.stat("requests"));
    assert!(eventually(Duration::from_secs(20), || c.stat("requests") >= c0 + 30));
    let (db, dc) = (b.stat("requests") - b0, c.stat("requests") - c0);
    assert!(db > 2 * dc, "weights 3:1 gave {db}:{dc}");
    assert_eq!(
        a.stat("requests"),
        a_done,
        "a removed backend got a new request"
    );
    // Without an admin listener the endpoint is on the main one; a reweight is an update.
    write_config(&proxy, &yaml(&[(&b, 1), (&c, 1)], ""));
    let r = post_json(proxy.addr, "/admin/reload", "", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["reload"]["updated"], serde_json::json!([b.url()]));
    assert_eq!(r.json()["reload"]["added"], serde_json::json!([]));
    plain.finish_clean(40);
    streams.finish_clean(20);
    // Forgotten once drained.
    assert!(eventually(Duration::from_secs(10), || {
        get(proxy.addr, "/health").json()["backends"]
            .as_array()
            .is_some_and(|l| l.len() == 2)
    }));
}

#[test]
fn invalid_configs_are_refused_and_the_old_one_keeps_serving() {
    let (a, b) = (Mock::start(), Mock::start());
    let proxy = Proxy::start(&yaml(&[(&a, 1)], "admin_listen: \"127.0.0.1:0\"\n"), &[]);
    let line = proxy
        .proc
        .wait_for_line("admin on ", Duration::from_secs(5));
    let admin = line
        .split("admin on ")
        .nth(1)
        .and_then(|s| {
            s.split(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
                .next()
        })
        .expect("admin address")
        .to_string();
    let admin_addr: std::net::SocketAddr = admin.parse().expect("admin addr");
    let load = Load::start(proxy.addr, 2, false);

    // Invalid: every problem named, nothing applied.
    write_config(
        &proxy,
        "listen: \"127.0.0.1:0\"\nbackends: [{ url: \"http://127.0.0.1:1\", weight: 0 }]\n",
    );
    let r = post_json(admin_addr, "/admin/reload", "", &[]);
    r.assert_error(400, "reload_failed");
    assert!(r.text().contains("backends[0].weight"), "{}", r.text());
    // Not even YAML: SIGHUP logs and keeps going.
    write_config(&proxy, "backends: [\n");
    proxy.proc.signal(SIGHUP);
    proxy
        .proc
        .wait_for_line("reload failed", Duration::from_secs(10));
    assert_eq!(active(&proxy), urls(&[&a]));
    let served = a.stat("requests");
    assert!(eventually(Duration::from_secs(10), || a.stat("requests") > served + 10));
    assert_eq!(b.stat("requests"), 0);

    // The admin action is not on the public listener when an admin listener exists.
    let r = post_json(proxy.addr, "/admin/reload", "", &[]);
    r.assert_error(404, "not_found");

    // A valid config through the CLI; a restart-only change is reported and not applied.
    let mut next = yaml(&[(&b, 1)], "admin_listen: \"127.0.0.1:0\"\n");
    next = next.replace("workers: 2", "workers: 3");
    write_config(&proxy, &next);
    let out = Command::new(BIN)
        .args(["reload", "--admin", &admin])
        .output()
        .expect("run llmproxy reload");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json answer");
    assert_eq!(v["status"], "reloaded");
    assert_eq!(v["reload"]["added"][0], b.url());
    assert_eq!(v["reload"]["removed"][0], a.url());
    assert!(v["reload"]["warnings"][0]
        .as_str()
        .unwrap_or("")
        .starts_with("workers changed"));
    let served = b.stat("requests");
    assert!(eventually(Duration::from_secs(10), || b.stat("requests") > served + 10));
    load.finish_clean(30);
    assert_eq!(proxy.proc.output().matches("core 2 running").count(), 0);
}
