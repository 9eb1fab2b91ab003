//! Client authentication over real sockets: keys in either header, 401 and 403 in OpenAI's shape,
//! the key's name as `key_id` in usage events and access lines, the raw key never logged nor sent
//! upstream (unless asked to), per-backend upstream credentials, and `auth.keys_file` reloads.

mod common;

use std::path::Path;
use std::time::Duration;

use common::webhook::Webhook;
use common::*;

const KEY_A: &str = "sk-team-a-0123456789abcdef";
const KEY_B: &str = "sk-team-b-0123456789abcdef";
const UPSTREAM_KEY: &str = "upstream-secret-0123456789";

fn sha256_hex(s: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn chat(proxy: &Proxy, headers: &[(&str, &str)]) -> Response {
    post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 3),
        headers,
    )
}

/// The request headers the mock backend received (its echo of them), as lower-cased pairs.
fn upstream_headers(r: &Response) -> Vec<(String, String)> {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["headers"]
        .as_array()
        .expect("echoed headers")
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap_or_default().to_ascii_lowercase(),
                p[1].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// Whether requests with `bearer` get through within a few seconds (a key file reload).
fn accepted_soon(proxy: &Proxy, bearer: &str) -> bool {
    eventually(Duration::from_secs(10), || {
        chat(proxy, &[("Authorization", bearer)]).status == 200
    })
}

#[test]
fn keys_gate_requests_and_name_the_caller() {
    let mock = Mock::start();
    let hook = Webhook::start();
    let yaml = format!(
        r#"listen: "127.0.0.1:0"
workers: 2
backends:
  - url: "{}"
    api_key: "${{UPSTREAM_KEY}}"
health_check: {{ interval: 1s, path: /health, timeout: 500ms }}
usage_hook: {{ enabled: true, url: "{}", flush_interval: 50ms }}
auth:
  keys:
    - {{ name: team-a, key: "${{TEAM_A_KEY}}" }}
    - {{ name: team-b, key_sha256: "{}", models: [other-model] }}
"#,
        mock.url(),
        hook.url(),
        sha256_hex(KEY_B)
    );
    let proxy = Proxy::start_env(
        &yaml,
        &[],
        &[("UPSTREAM_KEY", UPSTREAM_KEY), ("TEAM_A_KEY", KEY_A)],
    );

    // No key, a wrong key, a non-bearer scheme: 401 in OpenAI's shape.
    let r = chat(&proxy, &[]);
    r.assert_error(401, "missing_api_key");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    chat(
        &proxy,
        &[("Authorization", "Bearer sk-wrong-0123456789abcdef")],
    )
    .assert_error(401, "invalid_api_key");
    chat(&proxy, &[("x-api-key", "sk-wrong-0123456789abcdef")])
        .assert_error(401, "invalid_api_key");
    chat(&proxy, &[("Authorization", &format!("Basic {KEY_A}"))])
        .assert_error(401, "missing_api_key");

    // Good key, both header forms. The backend sees its own credential, never the client's.
    let bearer = format!("Bearer {KEY_A}");
    let echoed = chat(&proxy, &[("Authorization", &bearer), ("x-mock-echo", "1")]);
    let h = upstream_headers(&echoed);
    assert_eq!(
        header(&h, "authorization"),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
    assert!(
        !echoed.text().contains(KEY_A),
        "client key reached the backend"
    );
    let echoed = chat(&proxy, &[("x-api-key", KEY_A), ("x-mock-echo", "1")]);
    let h = upstream_headers(&echoed);
    assert_eq!(header(&h, "x-api-key"), None);
    assert!(
        !echoed.text().contains(KEY_A),
        "client key reached the backend"
    );
    let r = chat(&proxy, &[("x-api-key", KEY_A)]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);

    // team-b may only use other-model.
    chat(&proxy, &[("Authorization", &format!("Bearer {KEY_B}"))])
        .assert_error(403, "model_not_allowed");

    // Probes and scrapers need no key; the model list does (it is proxied here).
    assert_eq!(get(proxy.addr, "/health").status, 200);
    let metrics = get(proxy.addr, "/metrics");
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    assert!(
        text.contains("llmproxy_rejected_total{reason=\"invalid_key\"} 2"),
        "{text}"
    );
    assert!(text.contains("llmproxy_rejected_total{reason=\"model_not_allowed\"} 1"));
    get(proxy.addr, "/v1/models").assert_error(401, "missing_api_key");
    let r = request(
        proxy.addr,
        &format!("GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization: {bearer}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // Usage events: one per authenticated inference request (3 by team-a, the 403 by team-b),
    // none for the refused-at-the-door ones.
    let events = hook.wait_events(4);
    let mut ids: Vec<&str> = events.iter().filter_map(|e| e["key_id"].as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["team-a", "team-a", "team-a", "team-b"], "{events:#?}");
    assert_eq!(events.len(), 4);
    let billed = events
        .iter()
        .find(|e| e["status"] == 200 && e["completion_tokens"] == 3)
        .expect("the completed request's event");
    assert_eq!(billed["key_id"], "team-a");

    // Access lines name the key; the raw keys appear nowhere in the proxy's output.
    std::thread::sleep(Duration::from_millis(200));
    let lines = proxy.access_lines();
    assert!(lines
        .iter()
        .any(|l| l["key_id"] == "team-a" && l["status"] == 200));
    assert!(lines
        .iter()
        .any(|l| l["key_id"] == "team-b" && l["status"] == 403));
    assert!(lines
        .iter()
        .any(|l| l["status"] == 401 && l["key_id"].is_null()));
    let out = proxy.proc.output();
    for secret in [KEY_A, KEY_B, UPSTREAM_KEY, "sk-wrong-0123456789abcdef"] {
        assert!(!out.contains(secret), "{secret} was logged:\n{out}");
    }
    assert!(out.contains("rejected (invalid_key)"), "{out}");
}

#[test]
fn forward_client_key_sends_the_clients_headers_upstream() {
    let mock = Mock::start();
    let yaml = config(
        &[mock.url()],
        &format!("auth:\n  forward_client_key: true\n  keys: [{{ name: a, key: \"{KEY_A}\" }}]\n"),
    );
    let proxy = Proxy::start(&yaml, &[]);
    let bearer = format!("Bearer {KEY_A}");
    let h = upstream_headers(&chat(
        &proxy,
        &[("Authorization", &bearer), ("x-mock-echo", "1")],
    ));
    assert_eq!(header(&h, "authorization"), Some(bearer.as_str()));
    let h = upstream_headers(&chat(&proxy, &[("x-api-key", KEY_A), ("x-mock-echo", "1")]));
    assert_eq!(header(&h, "x-api-key"), Some(KEY_A));
}

#[test]
fn without_auth_client_headers_pass_and_key_id_is_a_hash() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&[mock.url()], ""), &[]);
    let bearer = format!("Bearer {KEY_A}");
    let h = upstream_headers(&chat(
        &proxy,
        &[("Authorization", &bearer), ("x-mock-echo", "1")],
    ));
    assert_eq!(header(&h, "authorization"), Some(bearer.as_str()));
    assert_eq!(chat(&proxy, &[("Authorization", &bearer)]).status, 200);
    std::thread::sleep(Duration::from_millis(200));
    let id = proxy
        .access_lines()
        .iter()
        .find_map(|l| l["key_id"].as_str().map(str::to_owned))
        .expect("a key_id in the access log");
    assert!(id.starts_with("key-") && !id.contains("team"), "{id}");
}

/// Points `link` at `target` atomically, the way Kubernetes updates a mounted Secret.
fn swap_symlink(dir: &Path, link: &Path, target: &Path) {
    let tmp = dir.join("..tmp-link");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).expect("symlink");
    std::fs::rename(&tmp, link).expect("rename symlink");
}

#[test]
fn keys_file_reloads_on_change_and_keeps_old_keys_when_broken() {
    let mock = Mock::start();
    let dir = temp_dir("keys");
    let v1 = dir.join("v1");
    let v2 = dir.join("v2");
    let v3 = dir.join("v3");
    for d in [&v1, &v2, &v3] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(
        v1.join("keys.yaml"),
        format!("keys:\n  - {{ name: first, key: \"{KEY_A}\" }}\n"),
    )
    .unwrap();
    std::fs::write(
        v2.join("keys.yaml"),
        format!(
            r#"{{"keys": [{{"name": "second", "key_sha256": "{}"}}]}}"#,
            sha256_hex(KEY_B)
        ),
    )
    .unwrap();
    std::fs::write(v3.join("keys.yaml"), "keys: [ { name: broken").unwrap();
    let link = dir.join("keys.yaml");
    swap_symlink(&dir, &link, &v1.join("keys.yaml"));

    let yaml = config(
        &[mock.url()],
        &format!(
            "auth:\n  keys_file: \"{}\"\n  keys_file_poll: 100ms\n",
            link.display()
        ),
    );
    let proxy = Proxy::start(&yaml, &[]);
    let a = format!("Bearer {KEY_A}");
    let b = format!("Bearer {KEY_B}");
    assert_eq!(chat(&proxy, &[("Authorization", &a)]).status, 200);
    chat(&proxy, &[("Authorization", &b)]).assert_error(401, "invalid_api_key");
    // No backend credential and no forwarding: the client's key is simply removed.
    let h = upstream_headers(&chat(
        &proxy,
        &[("Authorization", &a), ("x-mock-echo", "1")],
    ));
    assert_eq!(header(&h, "authorization"), None);

    swap_symlink(&dir, &link, &v2.join("keys.yaml"));
    assert!(
        accepted_soon(&proxy, &b),
        "the new key was not picked up:\n{}",
        proxy.proc.output()
    );
    chat(&proxy, &[("Authorization", &a)]).assert_error(401, "invalid_api_key");

    swap_symlink(&dir, &link, &v3.join("keys.yaml"));
    proxy
        .proc
        .wait_for_line("keeping the previous keys", Duration::from_secs(10));
    assert_eq!(chat(&proxy, &[("Authorization", &b)]).status, 200);

    // An edit in place (same inode) is seen too.
    std::fs::write(
        v3.join("keys.yaml"),
        format!("keys:\n  - {{ name: third, key: \"{KEY_A}\" }}\n"),
    )
    .unwrap();
    assert!(
        accepted_soon(&proxy, &a),
        "the edited file was not picked up"
    );
    let out = proxy.proc.output();
    assert!(
        !out.contains(KEY_A) && !out.contains(KEY_B),
        "a key was logged"
    );
}

#[test]
fn an_unreadable_keys_file_stops_startup() {
    let mock = Mock::start();
    let dir = temp_dir("nokeys");
    let yaml = config(
        &[mock.url()],
        &format!(
            "auth:\n  keys_file: \"{}\"\n",
            dir.join("missing.yaml").display()
        ),
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = std::process::Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run check");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.keys_file"));
}

#[test]
fn the_local_model_list_needs_a_key_and_probes_do_not() {
    let mock = Mock::start();
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nworkers: 1\nadmin_listen: \"127.0.0.1:0\"\nbackends:\n  - {{ url: \"{}\", models: [mock-model] }}\nauth:\n  keys: [{{ name: a, key: \"{KEY_A}\" }}]\n",
        mock.url()
    );
    let proxy = Proxy::start(&yaml, &[]);
    get(proxy.addr, "/v1/models").assert_error(401, "missing_api_key");
    let r = request(
        proxy.addr,
        &format!(
            "GET /v1/models HTTP/1.1\r\nHost: t\r\nx-api-key: {KEY_A}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"][0]["id"], "mock-model");
    assert_eq!(get(proxy.addr, "/health").status, 200);
    // /metrics lives on the admin listener here: still no key needed there.
    let admin = proxy.proc.wait_for_line("admin on", Duration::from_secs(5));
    let port = admin
        .rsplit("127.0.0.1:")
        .next()
        .and_then(|p| p.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse::<u16>().ok())
        .expect("admin port in the log");
    let metrics = get(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        "/metrics",
    );
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .text()
        .contains("llmproxy_rejected_total{reason=\"missing_key\"} 1"));
}

#[test]
fn unauthenticated_requests_are_refused_before_their_body_is_read() {
    let mock = Mock::start();
    let yaml = config(
        &[mock.url()],
        &format!("auth:\n  keys: [{{ name: a, key: \"{KEY_A}\" }}]\n"),
    );
    let proxy = Proxy::start(&yaml, &[]);
    // A 5 MB body announced and never sent: the answer does not wait for it, and the connection
    // (whose unread body would follow) is closed.
    let mut c = Client::connect(proxy.addr);
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 5000000\r\n\r\n{\"model\":");
    let r = c.read_response();
    r.assert_error(401, "missing_api_key");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.is_closed(Duration::from_secs(5)));
    // Without a body the connection stays usable, for the same client with its key.
    let mut c = Client::connect(proxy.addr);
    let r = c.read_response_after(b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n");
    r.assert_error(401, "missing_api_key");
    let again = format!("GET /v1/models HTTP/1.1\r\nHost: t\r\nx-api-key: {KEY_A}\r\n\r\n");
    assert_eq!(c.read_response_after(again.as_bytes()).status, 200);
}
