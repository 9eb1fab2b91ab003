//! Graceful drain under load: SIGTERM while many clients stream back to back. Every request of a
//! client that was already connected completes (none fails, none is cut), `/health` turns 503 at
//! once so a load balancer stops sending, the proxy exits 0, and every request's usage event
//! reaches the webhook, and its access line stderr, before it does. (tests/lifecycle.rs covers
//! one stream through a drain.)

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::webhook::Webhook;
use common::*;

const CLIENTS: usize = 24;

#[test]
fn sigterm_under_streaming_load_fails_no_connected_client() {
    let mock = Mock::start_with(&["--token-delay-ms", "10"]);
    let hook = Webhook::start();
    let yaml = config(
        &[mock.url()],
        &format!("workers: 2\nshutdown_grace: 20s\n{}", hook.config_yaml()),
    )
    .replace("workers: 1\n", "");
    let mut proxy = Proxy::start(&yaml, &[]);
    let addr = proxy.addr;
    let mut probe = Client::connect(addr);
    probe.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(probe.read_response().status, 200);

    let served = Arc::new(AtomicUsize::new(0));
    let signalled = Arc::new(AtomicBool::new(false));
    let after_signal = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (served, signalled, after_signal) =
                (served.clone(), signalled.clone(), after_signal.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                // Back to back on one keep-alive connection until the proxy says close.
                for n in 0.. {
                    let stream = (i + n) % 4 != 0;
                    let body = chat_body(stream, 30);
                    c.send(post_raw("/v1/chat/completions", &body, &[], false).as_bytes());
                    let r = c.read_response();
                    assert_eq!(r.status, 200, "client {i} request {n}: {}", r.text());
                    if stream {
                        assert!(r.text().contains("[DONE]"), "client {i} request {n} cut");
                    } else {
                        assert_eq!(r.json()["usage"]["completion_tokens"], 30);
                    }
                    served.fetch_add(1, Ordering::SeqCst);
                    if signalled.load(Ordering::SeqCst) {
                        after_signal.fetch_add(1, Ordering::SeqCst);
                    }
                    if r.header("connection") == Some("close") {
                        break;
                    }
                }
            })
        })
        .collect();

    // Full load first: every client has finished at least one request.
    assert!(eventually(Duration::from_secs(20), || served
        .load(Ordering::SeqCst)
        >= CLIENTS));
    signalled.store(true, Ordering::SeqCst);
    proxy.proc.signal(libc::SIGTERM);
    let t0 = Instant::now();
    let mut health = 200;
    while t0.elapsed() < Duration::from_secs(2) {
        health = probe
            .read_response_after(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            .status;
        if health == 503 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(health, 503, "/health did not turn 503 during the drain");

    let failed = clients
        .into_iter()
        .map(|c| c.join())
        .filter(Result::is_err)
        .count();
    assert_eq!(failed, 0, "clients failed during the drain");
    assert!(after_signal.load(Ordering::SeqCst) >= CLIENTS);
    assert_eq!(proxy.proc.wait_exit(Duration::from_secs(20)), Some(0));
    proxy
        .proc
        .wait_for_line("drained; exiting", Duration::from_secs(5));
    // Every request that was answered was also billed, before the process went away.
    let n = served.load(Ordering::SeqCst);
    // ... and logged: the access lines a core still held when the drain ended were handed over.
    let chats = || {
        proxy
            .access_lines()
            .iter()
            .filter(|l| l["path"] == "/v1/chat/completions")
            .count()
    };
    assert!(eventually(Duration::from_secs(5), || chats() >= n));
    assert_eq!(chats(), n);
    let events = hook.wait_events_within(n, Duration::from_secs(5));
    assert_eq!(events.len(), n);
    assert!(events
        .iter()
        .all(|e| e["outcome"] == "ok" && e["status"] == 200));
}

#[test]
fn a_response_that_starts_during_the_drain_announces_the_close() {
    let mock = Mock::start();
    let mut proxy = Proxy::start(&config(&[mock.url()], "shutdown_grace: 10s\n"), &[]);
    let mut c = Client::connect(proxy.addr);
    // Sent before the signal, answered after it: the backend takes 800 ms to respond.
    c.send(
        post_raw(
            "/v1/chat/completions",
            &chat_body(false, 2),
            &[("x-mock-ttft-ms", "800")],
            false,
        )
        .as_bytes(),
    );
    assert!(eventually(Duration::from_secs(2), || mock.stat("active") == 1));
    proxy.proc.signal(libc::SIGTERM);
    let r = c.read_response();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.is_closed(Duration::from_secs(2)));
    assert_eq!(proxy.proc.wait_exit(Duration::from_secs(10)), Some(0));
}
