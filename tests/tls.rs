//! TLS both ways over real sockets, with certificates made at test time: client TLS on
//! `listen` (and mTLS), https backends (and mTLS to them, name checks), rotation on SIGHUP
//! under an open stream, startup errors that name the file.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::tls::{connect, peer_cert, Ca, Forwarder};
use common::*;

fn yaml_path(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// The proxy with `tls:` on listen (cert for 127.0.0.1/localhost), in front of `backends`.
fn tls_proxy(ca: &Ca, backends: &[String], client_ca: bool, extra: &str) -> Proxy {
    let dir = temp_dir("tls");
    let (cert, key) = ca
        .leaf(&["localhost", "127.0.0.1"], 30)
        .write(&dir, "server");
    let mut tls = format!(
        "tls:\n  cert_file: \"{}\"\n  key_file: \"{}\"\n",
        yaml_path(&cert),
        yaml_path(&key)
    );
    if client_ca {
        let ca_path = ca.write(&dir, "ca.crt");
        tls.push_str(&format!("  client_ca_file: \"{}\"\n", yaml_path(&ca_path)));
    }
    let mut proxy = Proxy::start(&config(backends, &format!("{tls}{extra}")), &[]);
    proxy.keep.push(dir);
    proxy
}

fn chat_request(stream: bool, tokens: u32) -> Vec<u8> {
    let body = chat_body(stream, tokens);
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads until EOF, noting when each read arrived.
fn read_timed(s: &mut impl Read) -> (Vec<u8>, Vec<Instant>) {
    let mut out = Vec::new();
    let mut at = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                at.push(Instant::now());
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read: {e}"),
        }
    }
    (out, at)
}

#[test]
fn a_stream_over_tls_arrives_chunk_by_chunk() {
    let ca = Ca::new("test ca");
    let mock = Mock::start_with(&["--token-delay-ms", "100"]);
    let proxy = tls_proxy(&ca, &[mock.url()], false, "");
    let mut s = connect(proxy.addr, &ca.pem, "localhost", None).unwrap();
    assert_eq!(s.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    s.write_all(&chat_request(true, 6)).unwrap();
    s.flush().unwrap();
    let (body, at) = read_timed(&mut s);
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("data: [DONE]"), "{text}");
    // Six tokens 100 ms apart: they must not arrive in one read at the end.
    assert!(at.len() >= 4, "only {} reads: buffered? {text}", at.len());
    let spread = *at.last().unwrap() - at[0];
    assert!(spread >= Duration::from_millis(300), "spread {spread:?}");
    let m = tls_metrics(&proxy, &ca);
    assert!(
        m.contains("llmproxy_tls_handshakes_total{result=\"ok\",side=\"client\"} 2"),
        "{m}"
    );
    assert!(m.contains("llmproxy_tls_certificate_expiry_timestamp_seconds{certificate=\"listen\"}"));
}

#[test]
fn a_plaintext_request_on_the_tls_port_is_closed_without_an_answer_and_counted() {
    let ca = Ca::new("test ca");
    let mock = Mock::start();
    let proxy = tls_proxy(&ca, &[mock.url()], false, "");
    let mut c = Client::connect(proxy.addr);
    c.send(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n");
    let got = c.read_until_closed(Duration::from_secs(5));
    assert!(got.is_empty(), "answered plaintext: {got:?}");
    let m = tls_metrics(&proxy, &ca);
    assert!(
        m.contains("llmproxy_tls_handshakes_total{result=\"plaintext\",side=\"client\"} 1"),
        "{m}"
    );
}

#[test]
fn a_client_without_a_required_certificate_is_refused() {
    let ca = Ca::new("test ca");
    let mock = Mock::start();
    let proxy = tls_proxy(&ca, &[mock.url()], true, "");
    // Without a certificate: the handshake (or, in TLS 1.3, the first read) fails.
    let refused = match connect(proxy.addr, &ca.pem, "localhost", None) {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.write_all(&chat_request(false, 2));
            let mut buf = [0u8; 64];
            !matches!(s.read(&mut buf), Ok(n) if n > 0)
        }
    };
    assert!(refused, "a client without a certificate got an answer");
    // With one signed by the CA: served.
    let client = ca.leaf(&["client-a"], 30);
    let mut s = connect(proxy.addr, &ca.pem, "localhost", Some(&client)).unwrap();
    s.write_all(&chat_request(false, 2)).unwrap();
    let (body, _) = read_timed(&mut s);
    assert!(String::from_utf8_lossy(&body).starts_with("HTTP/1.1 200"));
    assert_eq!(mock.stat("requests"), 1);
}

#[test]
fn an_https_backend_requiring_a_client_certificate_is_reached() {
    let ca = Ca::new("backend ca");
    let mock = Mock::start();
    let fwd = Forwarder::start(&ca.leaf(&["vllm.test"], 30), Some(&ca.pem), mock.addr);
    let dir = temp_dir("tls-backend");
    let ca_path = ca.write(&dir, "ca.crt");
    let (cert, key) = ca.leaf(&["llmproxy"], 30).write(&dir, "client");
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nworkers: 1\nbackends:\n  - url: \"https://{}\"\n    tls:\n      ca_file: \"{}\"\n      cert_file: \"{}\"\n      key_file: \"{}\"\n      server_name: vllm.test\nhealth_check: {{ interval: 200ms, path: /health, timeout: 500ms }}\n",
        fwd.addr,
        yaml_path(&ca_path),
        yaml_path(&cert),
        yaml_path(&key)
    );
    let proxy = Proxy::start(&yaml, &[]);
    for _ in 0..3 {
        let r = post_json(
            proxy.addr,
            "/v1/chat/completions",
            &chat_body(false, 2),
            &[],
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = post_json(proxy.addr, "/v1/chat/completions", &chat_body(true, 3), &[]);
    assert_eq!(r.status, 200);
    assert!(r.text().contains("[DONE]"));
    assert_eq!(mock.stat("requests"), 4);
    // Health checks over the same TLS settings keep it up.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(metric(&proxy, "llmproxy_backend_up"), Some(1.0));
    assert!(
        metric(&proxy, "llmproxy_tls_certificate_expiry_timestamp_seconds").is_some(),
        "client certificate expiry gauge"
    );
}

#[test]
fn backend_connections_after_the_first_resume_the_tls_session() {
    // No idle pool: every request opens a backend connection, so each pays a handshake; after
    // the first, they resume the session (the proxy keeps a session cache per backend entry).
    let ca = Ca::new("backend ca");
    let mock = Mock::start();
    let fwd = Forwarder::start(&ca.leaf(&["vllm.test"], 30), None, mock.addr);
    let dir = temp_dir("tls-resume");
    let ca_path = ca.write(&dir, "ca.crt");
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nworkers: 1\nbackends:\n  - url: \"https://{}\"\n    tls: {{ ca_file: \"{}\", server_name: vllm.test }}\npool: {{ max_idle_per_backend: 0 }}\nhealth_check: {{ interval: 1h, path: /health, timeout: 1s }}\n",
        fwd.addr,
        yaml_path(&ca_path),
    );
    let proxy = Proxy::start(&yaml, &[]);
    for _ in 0..4 {
        let r = post_json(
            proxy.addr,
            "/v1/chat/completions",
            &chat_body(false, 2),
            &[],
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let (all, resumed) = (
        fwd.handshakes.load(std::sync::atomic::Ordering::SeqCst),
        fwd.resumed.load(std::sync::atomic::Ordering::SeqCst),
    );
    assert!(all >= 4, "{all} handshakes");
    assert!(resumed >= 3, "{resumed} of {all} handshakes resumed");
}

#[test]
fn insecure_skip_verify_reaches_a_backend_with_an_unknown_certificate_and_warns() {
    let unknown = Ca::new("nobody trusts this");
    let mock = Mock::start();
    let fwd = Forwarder::start(&unknown.leaf(&["elsewhere.test"], 30), None, mock.addr);
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nworkers: 1\nbackends:\n  - url: \"https://{}\"\n    tls: {{ insecure_skip_verify: true }}\nhealth_check: {{ interval: 200ms, path: /health, timeout: 500ms }}\n",
        fwd.addr
    );
    let proxy = Proxy::start(&yaml, &[]);
    proxy.proc.wait_for_line("INSECURE", Duration::from_secs(5));
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 2),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mock.stat("requests"), 1);
    // Health checks skip verification too.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(metric(&proxy, "llmproxy_backend_up"), Some(1.0));
}

#[test]
fn a_discovered_https_backend_is_verified_against_the_entrys_host_name() {
    // `discover: dns` with an https URL: each address found is reached over TLS and its
    // certificate checked against the entry's host (pool.test), not the address.
    let ca = Ca::new("pool ca");
    let dir = temp_dir("tls-dns");
    let ca_path = ca.write(&dir, "ca.crt");
    let dns = common::dns::DnsServer::start(common::dns::Answer::Addrs(vec![
        std::net::Ipv4Addr::LOCALHOST,
    ]));
    let proxy_for = |fwd: &Forwarder| {
        Proxy::start(
            &format!(
                "listen: \"127.0.0.1:0\"\nworkers: 1\nbackends:\n  - url: \"https://pool.test:{}\"\n    discover: dns\n    name: pool\n    tls: {{ ca_file: \"{}\" }}\ndiscovery: {{ interval: 300ms, resolver: \"{}\" }}\nhealth_check: {{ interval: 1h, path: /health, timeout: 1s }}\n",
                fwd.addr.port(),
                yaml_path(&ca_path),
                dns.addr
            ),
            &[],
        )
    };
    let mock = Mock::start();
    let good = Forwarder::start(&ca.leaf(&["pool.test"], 30), None, mock.addr);
    let proxy = proxy_for(&good);
    let mut status = 0;
    assert!(
        eventually(Duration::from_secs(5), || {
            status = post_json(
                proxy.addr,
                "/v1/chat/completions",
                &chat_body(false, 2),
                &[],
            )
            .status;
            status == 200
        }),
        "last status {status}"
    );
    drop(proxy);

    // The same address with a certificate for another name: 502, never forwarded.
    let other = Forwarder::start(&ca.leaf(&["other.test"], 30), None, mock.addr);
    let before = mock.stat("requests");
    let proxy = proxy_for(&other);
    std::thread::sleep(Duration::from_millis(700));
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 2),
        &[],
    );
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().contains("upstream_tls_certificate"),
        "{}",
        r.text()
    );
    assert_eq!(mock.stat("requests"), before);
}

#[test]
fn a_backend_certificate_for_another_name_gives_502_and_the_backend_never_sees_the_request() {
    let ca = Ca::new("backend ca");
    let mock = Mock::start();
    let fwd = Forwarder::start(&ca.leaf(&["other.test"], 30), None, mock.addr);
    let dir = temp_dir("tls-name");
    let ca_path = ca.write(&dir, "ca.crt");
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nworkers: 1\nbackends:\n  - url: \"https://{}\"\n    tls: {{ ca_file: \"{}\", server_name: vllm.test }}\nhealth_check: {{ interval: 60s, path: /health, timeout: 500ms }}\nretry: {{ attempts: 0 }}\n",
        fwd.addr,
        yaml_path(&ca_path)
    );
    let proxy = Proxy::start(&yaml, &[]);
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 2),
        &[],
    );
    r.assert_error(502, "upstream_tls_certificate");
    assert_eq!(mock.stat("requests"), 0);
    assert_eq!(fwd.handshakes.load(std::sync::atomic::Ordering::SeqCst), 0);
    proxy
        .proc
        .wait_for_line("upstream TLS certificate rejected", Duration::from_secs(5));
    assert!(metric(&proxy, "llmproxy_upstream_errors_total{backend=").is_some());
    let text = get(proxy.addr, "/metrics").text();
    assert!(text.contains("kind=\"upstream_tls_certificate\""), "{text}");
    assert!(
        text.contains("llmproxy_tls_handshakes_total{result=\"certificate\",side=\"backend\"} 1")
    );
}

#[test]
fn rotating_the_files_and_sighup_under_an_open_stream() {
    let ca = Ca::new("test ca");
    let mock = Mock::start_with(&["--token-delay-ms", "150"]);
    let dir = temp_dir("tls-rotate");
    let (cert, key) = ca.leaf(&["localhost"], 30).write(&dir, "server");
    let yaml = config(
        &[mock.url()],
        &format!(
            "tls: {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
            yaml_path(&cert),
            yaml_path(&key)
        ),
    );
    let proxy = Proxy::start(&yaml, &[]);
    let mut old = connect(proxy.addr, &ca.pem, "localhost", None).unwrap();
    let first = peer_cert(&old);
    old.write_all(&chat_request(true, 10)).unwrap();
    let mut buf = [0u8; 1024];
    assert!(old.read(&mut buf).unwrap() > 0, "stream started");
    // New pair in place, then SIGHUP while the stream runs.
    ca.leaf(&["localhost"], 60).write(&dir, "server");
    proxy.proc.signal(libc::SIGHUP);
    proxy
        .proc
        .wait_for_line("configuration reloaded", Duration::from_secs(5));
    // The new config reaches the core on its next tick.
    let mut fresh = None;
    assert!(
        eventually(Duration::from_secs(3), || {
            let s = connect(proxy.addr, &ca.pem, "localhost", None).unwrap();
            let new = peer_cert(&s) != first;
            fresh = Some(s);
            new
        }),
        "a new connection still got the old certificate"
    );
    let fresh = fresh.unwrap();
    let (rest, _) = read_timed(&mut old);
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.contains("data: [DONE]"),
        "the open stream did not complete: {text}"
    );
    // A bad pair is refused and the running certificate keeps serving.
    std::fs::write(&key, ca.leaf(&["localhost"], 30).key).unwrap();
    proxy.proc.signal(libc::SIGHUP);
    proxy
        .proc
        .wait_for_line("reload rejected", Duration::from_secs(5));
    let again = connect(proxy.addr, &ca.pem, "localhost", None).unwrap();
    assert_eq!(peer_cert(&again), peer_cert(&fresh));
}

/// Starts a 10-token stream (150 ms apart) on a fresh TLS connection; returns it once the first
/// bytes arrived, with the certificate it was served.
fn open_stream(proxy: &Proxy, ca: &Ca) -> (common::tls::TlsStream, Vec<u8>) {
    let mut s = connect(proxy.addr, &ca.pem, "localhost", None).unwrap();
    let cert = peer_cert(&s);
    s.write_all(&chat_request(true, 10)).unwrap();
    let mut buf = [0u8; 1024];
    assert!(s.read(&mut buf).unwrap() > 0, "stream started");
    (s, cert)
}

/// Waits (bounded) until a new connection is served a certificate other than `old`.
fn new_cert_within(proxy: &Proxy, ca: &Ca, old: &[u8], within: Duration) -> Vec<u8> {
    let mut got = old.to_vec();
    let changed = eventually(within, || {
        got = peer_cert(&connect(proxy.addr, &ca.pem, "localhost", None).unwrap());
        got != old
    });
    assert!(changed, "a new connection still got the old certificate");
    got
}

fn finishes(mut s: common::tls::TlsStream) {
    let (rest, _) = read_timed(&mut s);
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.contains("data: [DONE]"),
        "the open stream did not complete: {text}"
    );
}

fn count_lines(proxy: &Proxy, needle: &str) -> usize {
    proxy
        .proc
        .output()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[test]
fn rewriting_the_files_without_sighup_rotates_and_a_broken_pair_keeps_the_old_one() {
    let ca = Ca::new("test ca");
    let mock = Mock::start_with(&["--token-delay-ms", "150"]);
    let dir = temp_dir("tls-watch");
    let (cert, key) = ca.leaf(&["localhost"], 30).write(&dir, "server");
    let yaml = config(
        &[mock.url()],
        &format!(
            "tls: {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
            yaml_path(&cert),
            yaml_path(&key)
        ),
    );
    let proxy = Proxy::start(&yaml, &[]);
    let (old, first) = open_stream(&proxy, &ca);
    // Rewritten in place, the certificate first and the key after it (so the watcher may see a
    // mismatched pair in between: refused, then taken once the key is there too). No SIGHUP.
    ca.leaf(&["localhost"], 60).write(&dir, "server");
    let second = new_cert_within(&proxy, &ca, &first, Duration::from_secs(5));
    proxy
        .proc
        .wait_for_line("tls: certificate files changed", Duration::from_secs(1));
    finishes(old);

    // A broken certificate: refused with a log line, the running one keeps serving.
    let refused = count_lines(&proxy, "changed certificate files are refused");
    std::fs::write(&cert, "not a certificate\n").unwrap();
    assert!(
        eventually(Duration::from_secs(5), || count_lines(
            &proxy,
            "changed certificate files are refused"
        ) > refused),
        "no refusal logged: {}",
        proxy.proc.output()
    );
    let line = proxy
        .proc
        .output()
        .lines()
        .rfind(|l| l.contains("changed certificate files are refused"))
        .unwrap()
        .to_string();
    assert!(line.contains("server.crt"), "{line}");
    let again = connect(proxy.addr, &ca.pem, "localhost", None).unwrap();
    assert_eq!(peer_cert(&again), second);
    // Still serving requests, and a good pair after the broken one is taken.
    ca.leaf(&["localhost"], 90).write(&dir, "server");
    new_cert_within(&proxy, &ca, &second, Duration::from_secs(5));
}

#[test]
fn a_secret_update_that_swaps_a_symlink_rotates_under_an_open_stream() {
    // The layout a Kubernetes Secret volume has: tls.crt -> ..data/tls.crt, ..data -> a
    // timestamped directory; an update writes a new directory and renames a new ..data link
    // over the old one (atomic), so the files' paths never change but what they point at does.
    let ca = Ca::new("test ca");
    let mock = Mock::start_with(&["--token-delay-ms", "150"]);
    let dir = temp_dir("tls-secret");
    let v1 = dir.join("..v1");
    std::fs::create_dir(&v1).unwrap();
    let l1 = ca.leaf(&["localhost"], 30);
    std::fs::write(v1.join("tls.crt"), &l1.cert).unwrap();
    std::fs::write(v1.join("tls.key"), &l1.key).unwrap();
    std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", dir.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", dir.join("tls.key")).unwrap();
    let yaml = config(
        &[mock.url()],
        &format!(
            "tls: {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
            yaml_path(&dir.join("tls.crt")),
            yaml_path(&dir.join("tls.key"))
        ),
    );
    let proxy = Proxy::start(&yaml, &[]);
    let (old, first) = open_stream(&proxy, &ca);
    let v2 = dir.join("..v2");
    std::fs::create_dir(&v2).unwrap();
    let l2 = ca.leaf(&["localhost"], 60);
    std::fs::write(v2.join("tls.crt"), &l2.cert).unwrap();
    std::fs::write(v2.join("tls.key"), &l2.key).unwrap();
    std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();
    let second = new_cert_within(&proxy, &ca, &first, Duration::from_secs(5));
    use rustls::pki_types::pem::PemObject;
    let want = rustls::pki_types::CertificateDer::pem_slice_iter(l2.cert.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(second, want.as_ref());
    finishes(old);
    assert!(!proxy
        .proc
        .output()
        .contains("changed certificate files are refused"));
}

#[test]
fn an_expired_or_mismatched_pair_at_startup_is_an_error_naming_the_file() {
    let ca = Ca::new("test ca");
    let dir = temp_dir("tls-bad");
    let (cert, key) = ca.leaf(&["localhost"], -1).write(&dir, "expired");
    let yaml = config(
        &["http://127.0.0.1:1".to_string()],
        &format!(
            "tls: {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
            yaml_path(&cert),
            yaml_path(&key)
        ),
    );
    let out = check(&yaml);
    assert!(
        out.contains("expired") && out.contains("expired.crt"),
        "{out}"
    );

    let (cert, _) = ca.leaf(&["localhost"], 30).write(&dir, "a");
    let (_, other_key) = ca.leaf(&["localhost"], 30).write(&dir, "b");
    let yaml = config(
        &["http://127.0.0.1:1".to_string()],
        &format!(
            "tls: {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
            yaml_path(&cert),
            yaml_path(&other_key)
        ),
    );
    let out = check(&yaml);
    assert!(out.contains("b.key") && out.contains("a.crt"), "{out}");
}

/// GET /metrics over TLS (the listener speaks nothing else).
fn tls_metrics(proxy: &Proxy, ca: &Ca) -> String {
    let mut s = connect(proxy.addr, &ca.pem, "localhost", None).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let (body, _) = read_timed(&mut s);
    String::from_utf8_lossy(&body).into_owned()
}

/// Starts the proxy on a config that must fail; returns its output.
fn check(yaml: &str) -> String {
    let dir = temp_dir("tls-check");
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmproxy"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "started with a bad pair");
    String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
}
