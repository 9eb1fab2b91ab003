//! DNS discovery of backends (a Kubernetes headless Service, played by a DNS server the test
//! controls): replicas that appear get traffic, replicas that vanish drain without cutting a
//! stream, and a resolver outage keeps the last good set until `discovery.stale_after`.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::dns::{Answer, DnsServer};
use common::load::Load;
use common::*;

/// `n` mock replicas on 127.0.0.2, 127.0.0.3, ... sharing one port, as pods behind a Service.
fn replicas(n: u8, args: &[&str]) -> Vec<Mock> {
    let first = Mock::start_at("127.0.0.2", 0, args);
    let port = first.addr.port();
    let mut all = vec![first];
    for i in 1..n {
        all.push(Mock::start_at(&format!("127.0.0.{}", 2 + i), port, args));
    }
    all
}

fn ips(mocks: &[&Mock]) -> Answer {
    Answer::Addrs(
        mocks
            .iter()
            .map(|m| match m.addr.ip() {
                std::net::IpAddr::V4(ip) => ip,
                _ => Ipv4Addr::LOCALHOST,
            })
            .collect(),
    )
}

fn yaml(port: u16, dns: &DnsServer, extra: &str) -> String {
    format!(
        "listen: \"127.0.0.1:0\"\nworkers: 2\nbackends:\n  - url: \"http://pool.test:{port}\"\n    discover: dns\n    name: pool\ndiscovery: {{ interval: 300ms, resolver: \"{}\" }}\nhealth_check: {{ interval: 300ms, path: /health, timeout: 300ms }}\n{extra}",
        dns.addr
    )
}

/// `(name, state, up)` of every backend `/health` lists.
fn backends(proxy: &Proxy) -> Vec<(String, String, bool)> {
    let h = get(proxy.addr, "/health").json();
    h["backends"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap_or("").to_string(),
                b["state"].as_str().unwrap_or("").to_string(),
                b["up"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

/// Both replicas serve at least `n` more requests (under the running load) within 10 s.
fn both_get_traffic(a: &Mock, b: &Mock, n: u64) {
    let before = (a.stat("requests"), b.stat("requests"));
    assert!(
        eventually(Duration::from_secs(10), || {
            a.stat("requests") >= before.0 + n && b.stat("requests") >= before.1 + n
        }),
        "traffic did not reach both replicas"
    );
}

fn label(m: &Mock) -> String {
    format!("pool/{}", m.addr)
}

/// A metric's value, 0 while its series does not exist yet.
fn metric_or_zero(proxy: &Proxy, line_start: &str) -> f64 {
    metric(proxy, line_start).unwrap_or(0.0)
}

#[test]
fn an_address_added_under_load_gets_traffic_within_an_interval() {
    let mocks = replicas(2, &[]);
    let (a, b) = (&mocks[0], &mocks[1]);
    let dns = DnsServer::start(ips(&[a]));
    let proxy = Proxy::start(&yaml(a.addr.port(), &dns, ""), &[]);
    assert_eq!(backends(&proxy), vec![(label(a), "active".into(), true)]);

    let load = Load::start(proxy.addr, 3, false);
    assert!(eventually(Duration::from_secs(10), || load.ok() >= 20));
    assert_eq!(b.stat("requests"), 0);
    let changed = Instant::now();
    dns.set(ips(&[a, b]));
    assert!(
        eventually(Duration::from_secs(10), || b.stat("requests") > 0),
        "the new replica got no traffic; proxy output:\n{}",
        proxy.proc.output()
    );
    // One discovery interval plus one health probe, with generous slack for a loaded box.
    let took = changed.elapsed();
    eprintln!("new replica got its first request {took:?} after the DNS change");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    both_get_traffic(a, b, 10);
    load.finish_clean(40);

    let mut names = backends(&proxy);
    names.sort();
    assert_eq!(
        names,
        vec![
            (label(a), "active".into(), true),
            (label(b), "active".into(), true)
        ]
    );
    let m = get(proxy.addr, "/metrics").text();
    assert!(
        m.contains(&format!(
            "llmproxy_backend_up{{backend=\"{}\"}} 1",
            label(b)
        )),
        "{m}"
    );
    assert!(
        metric_or_zero(
            &proxy,
            "llmproxy_discovery_updates_total{result=\"changed\"}"
        ) >= 2.0
    );
}

#[test]
fn a_truncated_dns_answer_is_completed_over_tcp() {
    // The resolver's UDP answer holds one address and the truncation bit: taking it as the
    // whole set would drop the other replicas of a large Service.
    let mocks = replicas(3, &[]);
    let all: Vec<&Mock> = mocks.iter().collect();
    let Answer::Addrs(addrs) = ips(&all) else {
        unreachable!()
    };
    let dns = DnsServer::start(Answer::Truncated(addrs));
    let proxy = Proxy::start(&yaml(mocks[0].addr.port(), &dns, ""), &[]);
    let mut want: Vec<String> = mocks.iter().map(label).collect();
    want.sort();
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut names: Vec<String> = backends(&proxy).into_iter().map(|b| b.0).collect();
            names.sort();
            names == want
        }),
        "backends: {:?}; proxy output:\n{}",
        backends(&proxy),
        proxy.proc.output()
    );
}

#[test]
fn a_removed_address_finishes_its_stream_and_gets_nothing_new() {
    let mocks = replicas(2, &["--token-delay-ms", "40"]);
    let (a, b) = (&mocks[0], &mocks[1]);
    let dns = DnsServer::start(ips(&[a, b]));
    let proxy = Proxy::start(&yaml(a.addr.port(), &dns, ""), &[]);
    assert_eq!(backends(&proxy).len(), 2);

    let addr = proxy.addr;
    let stream = std::thread::spawn(move || {
        post_json(addr, "/v1/chat/completions", &chat_body(true, 50), &[])
    });
    assert!(eventually(Duration::from_secs(10), || {
        a.stat("active") + b.stat("active") == 1
    }));
    let (holder, other) = if a.stat("active") == 1 {
        (a, b)
    } else {
        (b, a)
    };
    dns.set(ips(&[other]));
    assert!(
        eventually(Duration::from_secs(10), || backends(&proxy)
            .iter()
            .any(|(n, s, _)| *n == label(holder) && s == "draining")),
        "{:?}",
        backends(&proxy)
    );
    let served = holder.stat("requests");
    chats_ok(proxy.addr, 20);
    assert_eq!(
        holder.stat("requests"),
        served,
        "a draining replica got a new request"
    );
    assert_eq!(holder.stat("active"), 1, "the stream was cut");

    let r = stream.join().expect("stream thread");
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.contains("[DONE]"), "stream did not complete: {text}");
    // The role chunk, then one chunk per token.
    assert_eq!(
        text.matches("\"delta\":{\"content\":").count(),
        51,
        "tokens missing from the stream"
    );
    // Drained on every core: the backend is forgotten.
    assert!(
        eventually(Duration::from_secs(10), || backends(&proxy)
            == vec![(label(other), "active".into(), true)]),
        "{:?}",
        backends(&proxy)
    );
    let m = get(proxy.addr, "/metrics").text();
    assert!(!m.contains(&format!(
        "llmproxy_backend_up{{backend=\"{}\"}}",
        label(holder)
    )));
}

#[test]
fn resolver_failures_keep_the_last_set_until_stale() {
    let mocks = replicas(2, &[]);
    let (a, b) = (&mocks[0], &mocks[1]);
    // A name that does not resolve at start is not fatal: the proxy starts with no backend.
    let dns = DnsServer::start(Answer::ServFail);
    let proxy = Proxy::start(
        &yaml(a.addr.port(), &dns, "").replace(
            "interval: 300ms, resolver",
            "interval: 300ms, stale_after: 6s, resolver",
        ),
        &[],
    );
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 1),
        &[],
    );
    r.assert_error(503, "no_healthy_backend");
    dns.set(ips(&[a, b]));
    assert!(eventually(Duration::from_secs(10), || backends(&proxy)
        .len()
        == 2
        && backends(&proxy).iter().all(|(_, _, up)| *up)));

    // The resolver goes silent: traffic continues on the last good set.
    let load = Load::start(proxy.addr, 2, false);
    dns.set(Answer::Silent);
    let went_down = Instant::now();
    assert!(eventually(Duration::from_secs(10), || metric_or_zero(
        &proxy,
        "llmproxy_discovery_updates_total{result=\"error\"}"
    ) >= 2.0));
    both_get_traffic(a, b, 5);
    load.finish_clean(10);
    proxy
        .proc
        .wait_for_line("keeping the last 2 addresses", Duration::from_secs(3));

    // Past stale_after the set is dropped (an answer that old is no longer trusted)...
    if went_down.elapsed() < Duration::from_secs(6) {
        assert_eq!(backends(&proxy).len(), 2);
    }
    assert!(
        eventually(Duration::from_secs(20), || backends(&proxy).is_empty()),
        "{:?}",
        backends(&proxy)
    );
    assert!(
        metric_or_zero(
            &proxy,
            "llmproxy_discovery_updates_total{result=\"expired\"}"
        ) >= 1.0
    );
    // ...and a good answer brings it back.
    dns.set(ips(&[b]));
    assert!(eventually(Duration::from_secs(10), || {
        post_json(
            proxy.addr,
            "/v1/chat/completions",
            &chat_body(false, 1),
            &[],
        )
        .status
            == 200
    }));
    assert_eq!(backends(&proxy), vec![(label(b), "active".into(), true)]);
}

#[test]
fn least_load_scrapes_replicas_as_dns_adds_and_removes_them() {
    let mocks = replicas(2, &[]);
    let (a, b) = (&mocks[0], &mocks[1]);
    // a's engine has a deep queue; b, found later, is idle.
    a.control(r#"{"engine": {"waiting": 20, "kv_usage": 0.5}}"#);
    let dns = DnsServer::start(ips(&[a]));
    let extra = "strategy: least_load\nrouting: { metrics_interval: 100ms }\n";
    let proxy = Proxy::start(&yaml(a.addr.port(), &dns, extra), &[]);
    let up = |m: &Mock| {
        format!(
            "llmproxy_backend_engine_metrics_up{{backend=\"{}\"}}",
            label(m)
        )
    };
    assert!(eventually(Duration::from_secs(10), || metric_or_zero(
        &proxy,
        &up(a)
    ) == 1.0));

    dns.set(ips(&[a, b]));
    assert!(
        eventually(Duration::from_secs(10), || metric_or_zero(&proxy, &up(b))
            == 1.0),
        "the discovered replica was never scraped; proxy output:\n{}",
        proxy.proc.output()
    );
    // b joins once its health check passes; from then on its empty queue wins every pick.
    assert!(eventually(Duration::from_secs(10), || backends(&proxy)
        .iter()
        .all(|(_, _, up)| *up)));
    let before = a.stat("requests");
    chats_ok(proxy.addr, 10);
    assert_eq!(
        a.stat("requests"),
        before,
        "a's deep queue must keep it out"
    );
    assert_eq!(b.stat("requests"), 10);

    // b vanishes from DNS: once drained it is forgotten, engine series included, and a serves.
    dns.set(ips(&[a]));
    assert!(
        eventually(Duration::from_secs(10), || {
            let m = get(proxy.addr, "/metrics").text();
            !m.contains(&up(b))
                && !m.contains(&format!("llmproxy_backend_up{{backend=\"{}\"}}", label(b)))
                && !m.contains(&format!(
                    "llmproxy_backend_engine_waiting{{backend=\"{}\"}}",
                    label(b)
                ))
        }),
        "the removed replica's series stayed"
    );
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 1),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(a.stat("requests"), before + 1);
}
