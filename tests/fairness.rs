//! Fair, priority-aware admission over real sockets (issue 18): two mock backends at
//! `max_inflight`, two workers, the same scenarios under `limits.scheduling: fair` and `fifo`.
//! Figures are printed (`cargo test --test fairness -- --nocapture`).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const HIGH: &str = "sk-fair-high-0123456789abcdef";
const NORMAL: &str = "sk-fair-normal-0123456789abcdef";
const LOW: &str = "sk-fair-low-0123456789abcdef";
const BIG: &str = "sk-fair-big-0123456789abcdef";
const SMALL: &str = "sk-fair-small-0123456789abcdef";
const HEAVY: &str = "sk-fair-heavy-0123456789abcdef";
const LIGHT: &str = "sk-fair-light-0123456789abcdef";

fn keys() -> String {
    format!(
        "auth:\n  keys:\n\
         \x20   - {{ name: high, key: \"{HIGH}\", priority: high }}\n\
         \x20   - {{ name: normal, key: \"{NORMAL}\" }}\n\
         \x20   - {{ name: low, key: \"{LOW}\", priority: low }}\n\
         \x20   - {{ name: big, key: \"{BIG}\" }}\n\
         \x20   - {{ name: small, key: \"{SMALL}\" }}\n\
         \x20   - {{ name: heavy, key: \"{HEAVY}\", weight: 2 }}\n\
         \x20   - {{ name: light, key: \"{LIGHT}\", weight: 1 }}\n"
    )
}

/// The issue's setup: each backend 300 ms to the first token, 40 tokens 20 ms apart, four at
/// once; two workers.
fn saturated(mocks: &[Mock], scheduling: &str) -> Proxy {
    let mut yaml = String::from("listen: \"127.0.0.1:0\"\nworkers: 2\nbackends:\n");
    for m in mocks {
        yaml.push_str(&format!(
            "  - {{ url: \"{}\", max_inflight: 4 }}\n",
            m.url()
        ));
    }
    yaml.push_str(&format!(
        "limits: {{ scheduling: {scheduling}, queue_size: 1024, queue_timeout: 60s }}\n{}",
        keys()
    ));
    Proxy::start(&yaml, &[])
}

fn gpu_mocks() -> Vec<Mock> {
    (0..2)
        .map(|_| Mock::start_with(&["--ttft-ms", "300", "--token-delay-ms", "20"]))
        .collect()
}

/// One streamed chat of 40 tokens: its status and time to the first event.
fn stream_chat(addr: SocketAddr, key: &str, extra: &[(&str, &str)]) -> (u16, Duration) {
    let body = chat_body(true, 40);
    let auth = format!("Bearer {key}");
    let mut headers = vec![("Authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    let raw = post_raw("/v1/chat/completions", &body, &headers, true);
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    s.write_all(raw.as_bytes()).expect("send");
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16384];
    let mut ttft = None;
    let mut status = 0;
    loop {
        let n = s.read(&mut tmp).unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&tmp[..n]);
        if status == 0 && buf.len() >= 12 {
            status = std::str::from_utf8(&buf[9..12])
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
        if ttft.is_none() {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                if buf[end..].windows(5).any(|w| w == b"data:") {
                    ttft = Some(start.elapsed());
                }
            }
        }
    }
    (status, ttft.unwrap_or_else(|| start.elapsed()))
}

/// `n` clients of `key` each sending streamed chats back to back until `stop`; counts answers
/// that finished between `from` and `stop`.
struct Crowd {
    stop: Arc<AtomicBool>,
    counted: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Crowd {
    fn start(addr: SocketAddr, key: &'static str, n: usize, window: Arc<Mutex<bool>>) -> Crowd {
        let stop = Arc::new(AtomicBool::new(false));
        let counted = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|_| {
                let (stop, counted, window) = (stop.clone(), counted.clone(), window.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let (status, _) = stream_chat(addr, key, &[]);
                        assert_eq!(status, 200, "{key}");
                        if *window.lock().unwrap() {
                            counted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Crowd {
            stop,
            counted,
            threads,
        }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.counted.load(Ordering::Relaxed)
    }
}

/// The scenarios measure latency on a shared machine: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The median and the largest of a dozen probes' times to first token. The largest is what the
/// scheduler bounds: a high request waits for at most one request of the crowd to finish (the
/// mocks' 300 ms to first token and 40 tokens 20 ms apart: about 1.1 s), then for its own first
/// token (0.3 s), so about 1.4 s; `HIGH_WAIT` leaves a slow machine room above that and stays
/// below what a queue of low requests takes (medians of 3 s and more). Ratios between two
/// schedulers are taken on the medians: the largest of twelve is one sample and moves with the
/// machine (a ratio of the largest failed once at 0.37 against 0.35).
#[derive(Debug, Clone, Copy)]
struct Ttfts {
    median: Duration,
    max: Duration,
}

const HIGH_WAIT: Duration = Duration::from_millis(2000);

impl Ttfts {
    fn of(mut v: Vec<Duration>) -> Ttfts {
        v.sort();
        Ttfts {
            median: v[v.len() / 2],
            max: v[v.len() - 1],
        }
    }
}

/// A low key keeps 24 requests going; a high key sends one every 0.6 s. Returns the high key's
/// times to first token and the mean in-flight count of the backends while it ran.
fn high_among_low(scheduling: &str) -> (Ttfts, f64) {
    let mocks = gpu_mocks();
    let proxy = saturated(&mocks, scheduling);
    let window = Arc::new(Mutex::new(true));
    let crowd = Crowd::start(proxy.addr, LOW, 24, window);
    // Let the queue fill.
    std::thread::sleep(Duration::from_secs(2));
    let mut ttfts = Vec::new();
    let mut busy = Vec::new();
    let addr = proxy.addr;
    let probes: Vec<_> = (0..12)
        .map(|i| {
            std::thread::sleep(Duration::from_millis(if i == 0 { 0 } else { 600 }));
            busy.push(mocks.iter().map(|m| m.stat("active")).sum::<u64>() as f64);
            std::thread::spawn(move || stream_chat(addr, HIGH, &[]))
        })
        .collect();
    for p in probes {
        let (status, ttft) = p.join().unwrap();
        assert_eq!(status, 200);
        ttfts.push(ttft);
    }
    crowd.finish();
    println!("{scheduling}: high key TTFTs {ttfts:?}");
    let mean_busy = busy.iter().sum::<f64>() / busy.len() as f64;
    (Ttfts::of(ttfts), mean_busy)
}

#[test]
fn a_high_key_is_not_held_up_by_a_low_keys_crowd() {
    let _serial = serial();
    let (fair, fair_busy) = high_among_low("fair");
    let (fifo, fifo_busy) = high_among_low("fifo");
    println!(
        "high key TTFT among 24 low clients: fair {fair:?} (backends busy {fair_busy:.1}/8), \
         fifo {fifo:?} (busy {fifo_busy:.1}/8)"
    );
    assert!(fair.max <= HIGH_WAIT, "fair {fair:?}");
    assert!(
        fair.median.as_secs_f64() <= 0.5 * fifo.median.as_secs_f64(),
        "fair {fair:?} vs fifo {fifo:?}"
    );
    // No idle capacity while anything waits.
    assert!(fair_busy >= 7.0, "slots idle under fair: {fair_busy}/8");
}

/// Two normal keys with 24 and 8 clients: the small key's share of the answers finished in a
/// measured window.
fn small_share(scheduling: &str) -> f64 {
    let mocks = gpu_mocks();
    let proxy = saturated(&mocks, scheduling);
    let window = Arc::new(Mutex::new(false));
    let big = Crowd::start(proxy.addr, BIG, 24, window.clone());
    let small = Crowd::start(proxy.addr, SMALL, 8, window.clone());
    std::thread::sleep(Duration::from_secs(3));
    *window.lock().unwrap() = true;
    std::thread::sleep(Duration::from_secs(8));
    *window.lock().unwrap() = false;
    let (b, s) = (big.finish(), small.finish());
    println!("{scheduling}: big key {b} answers, small key {s}");
    s as f64 / (b + s) as f64
}

#[test]
fn keys_get_equal_shares_under_fair_and_shares_by_connections_under_fifo() {
    let _serial = serial();
    let fair = small_share("fair");
    let fifo = small_share("fifo");
    println!("small key's share (8 vs 24 clients): fair {fair:.2}, fifo {fifo:.2}");
    assert!((0.42..=0.58).contains(&fair), "fair share {fair:.2}");
    assert!(fifo < 0.35, "fifo share {fifo:.2}");
}

#[test]
fn a_key_of_weight_two_gets_twice_the_share_of_a_key_of_weight_one() {
    let _serial = serial();
    let mocks = gpu_mocks();
    let proxy = saturated(&mocks, "fair");
    let window = Arc::new(Mutex::new(false));
    // As many clients each: both stay backlogged (32 clients for 8 slots).
    let heavy = Crowd::start(proxy.addr, HEAVY, 16, window.clone());
    let light = Crowd::start(proxy.addr, LIGHT, 16, window.clone());
    std::thread::sleep(Duration::from_secs(3));
    *window.lock().unwrap() = true;
    std::thread::sleep(Duration::from_secs(8));
    *window.lock().unwrap() = false;
    let (h, l) = (heavy.finish(), light.finish());
    let share = h as f64 / (h + l) as f64;
    println!("weights 2:1, 16 clients each: heavy {h} answers, light {l} (share {share:.2})");
    assert!((0.59..=0.75).contains(&share), "heavy share {share:.2}");
}

/// A proxy whose one backend serves one request at a time, with `limits` and the keys.
fn one_slot(mock: &Mock, limits: &str) -> Proxy {
    one_slot_on(mock, 2, limits)
}

fn one_slot_on(mock: &Mock, workers: usize, limits: &str) -> Proxy {
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nworkers: {workers}\nbackends:\n  - {{ url: \"{}\", max_inflight: 1 }}\n\
         limits: {limits}\n{}",
        mock.url(),
        keys()
    );
    Proxy::start(&yaml, &[])
}

/// Holds the one slot for `hold_ms`, then queues each `(key, headers)` in turn (200 ms apart,
/// so their arrival order is known) and returns the order in which they were answered.
fn served_order(proxy: &Proxy, mock: &Mock, hold_ms: u64, queued: &[(&str, &str)]) -> Vec<usize> {
    let addr = proxy.addr;
    let hold = hold_ms.to_string();
    let holder = std::thread::spawn(move || {
        post_json(
            addr,
            "/v1/chat/completions",
            &chat_body(false, 1),
            &[
                ("Authorization", &format!("Bearer {HIGH}")),
                ("x-mock-ttft-ms", &hold),
            ],
        )
        .status
    });
    assert!(eventually(Duration::from_secs(5), || mock.stat("active") == 1));
    let order = Arc::new(Mutex::new(Vec::new()));
    let waiters: Vec<_> = queued
        .iter()
        .enumerate()
        .map(|(i, &(key, class))| {
            std::thread::sleep(Duration::from_millis(200));
            let (key, class, order) = (key.to_string(), class.to_string(), order.clone());
            std::thread::spawn(move || {
                let auth = format!("Bearer {key}");
                let mut h = vec![("Authorization", auth.as_str()), ("x-mock-ttft-ms", "50")];
                if !class.is_empty() {
                    h.push(("x-llmproxy-priority", class.as_str()));
                }
                let r = post_json(addr, "/v1/chat/completions", &chat_body(false, 1), &h);
                assert_eq!(r.status, 200, "{}", r.text());
                order.lock().unwrap().push(i);
            })
        })
        .collect();
    assert_eq!(holder.join().unwrap(), 200);
    for w in waiters {
        w.join().unwrap();
    }
    let v = order.lock().unwrap().clone();
    v
}

#[test]
fn high_goes_before_normal_before_low() {
    let _serial = serial();
    let mock = Mock::start();
    let proxy = one_slot(&mock, "{ queue_timeout: 20s }");
    let order = served_order(
        &proxy,
        &mock,
        1600,
        &[(LOW, ""), (NORMAL, ""), (LOW, ""), (HIGH, ""), (NORMAL, "")],
    );
    assert_eq!(order, [3, 1, 4, 0, 2]);
    // Under fifo: arrival order (strictly so only within a core: one worker here).
    let proxy = one_slot_on(&mock, 1, "{ scheduling: fifo, queue_timeout: 20s }");
    let order = served_order(&proxy, &mock, 1200, &[(LOW, ""), (NORMAL, ""), (HIGH, "")]);
    assert_eq!(order, [0, 1, 2]);
}

#[test]
fn a_low_request_waiting_past_the_promotion_bound_goes_before_later_high_ones() {
    let _serial = serial();
    let mock = Mock::start();
    let queued = [(LOW, ""), (HIGH, ""), (HIGH, ""), (HIGH, "")];
    // Without promotion in reach, the low request is served last...
    let proxy = one_slot(&mock, "{ queue_timeout: 20s, promote_after: 60s }");
    assert_eq!(served_order(&proxy, &mock, 1800, &queued), [1, 2, 3, 0]);
    // ...with it, first: it has waited longer than 500 ms when the slot frees.
    let proxy = one_slot(&mock, "{ queue_timeout: 20s, promote_after: 500ms }");
    assert_eq!(served_order(&proxy, &mock, 1800, &queued), [0, 1, 2, 3]);
    let m = get(proxy.addr, "/metrics").text();
    assert!(m.contains("llmproxy_queue_promotions_total"), "{m}");
}

#[test]
fn the_priority_header_lowers_a_class_but_never_raises_it() {
    let _serial = serial();
    let mock = Mock::start();
    let proxy = one_slot(&mock, "{ queue_timeout: 20s }");
    // A low key asking for high stays low; a high key asking for low is low; a normal key
    // without the header goes first. The two low ones keep their arrival order.
    let order = served_order(
        &proxy,
        &mock,
        1200,
        &[(LOW, "high"), (HIGH, "low"), (NORMAL, "")],
    );
    assert_eq!(order, [2, 0, 1]);
    // The access line says which class each request waited as.
    let classes = || -> Vec<String> {
        proxy
            .access_lines()
            .iter()
            .filter(|l| l["status"] == 200)
            .map(|l| format!("{}:{}", l["key_id"], l["priority"]).replace('"', ""))
            .collect()
    };
    let want = ["high:high", "low:low", "high:low", "normal:normal"];
    let all_there = || want.iter().all(|w| classes().iter().any(|c| c == w));
    assert!(
        eventually(Duration::from_secs(5), all_there),
        "{:?}",
        classes()
    );
    // A class that does not exist is a client error, not a silent default.
    let r = post_json(
        proxy.addr,
        "/v1/chat/completions",
        &chat_body(false, 1),
        &[
            ("Authorization", &format!("Bearer {NORMAL}")),
            ("x-llmproxy-priority", "urgent"),
        ],
    );
    r.assert_error(400, "bad_request");
    assert!(r.text().contains("x-llmproxy-priority"), "{}", r.text());
}

// ---------------------------------------------------------------------------------------------
// `limits.saturation: engine_queue`: no max_inflight, the engines' own queues decide.

/// Two mock engines of the issue's speed whose batch holds 4 (the rest queue inside the engine
/// and show on its `/metrics`); `least_load`, scraped every 50 ms; no `max_inflight`.
fn engines(mocks: &[Mock], saturation: &str) -> Proxy {
    let mut yaml = String::from("listen: \"127.0.0.1:0\"\nworkers: 2\nbackends:\n");
    for m in mocks {
        m.control(r#"{"engine": {"max_running": 4}}"#);
        yaml.push_str(&format!("  - {{ url: \"{}\" }}\n", m.url()));
    }
    yaml.push_str(&format!(
        "strategy: least_load\nrouting: {{ metrics_interval: 50ms, metrics_stale_after: 500ms }}\n\
         limits: {{ saturation: {saturation}, queue_size: 1024, queue_timeout: 60s }}\n{}",
        keys()
    ));
    Proxy::start(&yaml, &[])
}

/// A low key keeps 24 requests going, a high key sends one every 0.6 s: the high key's times to
/// first token, and the engines' mean running count while it ran.
fn high_among_low_on_engines(saturation: &str) -> (Ttfts, f64) {
    let mocks = gpu_mocks();
    let proxy = engines(&mocks, saturation);
    let crowd = Crowd::start(proxy.addr, LOW, 24, Arc::new(Mutex::new(true)));
    // The first 24 reach the engines before any reading shows their queues (16 deep); let
    // them drain.
    std::thread::sleep(Duration::from_secs(3));
    let addr = proxy.addr;
    let mut busy = Vec::new();
    let probes: Vec<_> = (0..12)
        .map(|i| {
            std::thread::sleep(Duration::from_millis(if i == 0 { 0 } else { 600 }));
            busy.push(mocks.iter().map(|m| m.stat("active")).sum::<u64>() as f64);
            std::thread::spawn(move || stream_chat(addr, HIGH, &[]))
        })
        .collect();
    let mut ttfts = Vec::new();
    for p in probes {
        let (status, ttft) = p.join().unwrap();
        assert_eq!(status, 200);
        ttfts.push(ttft);
    }
    crowd.finish();
    println!("saturation {saturation}: high key TTFTs {ttfts:?}");
    (
        Ttfts::of(ttfts),
        busy.iter().sum::<f64>() / busy.len() as f64,
    )
}

#[test]
fn an_engine_queue_counts_as_saturation_so_priorities_work_without_max_inflight() {
    let _serial = serial();
    let (on, on_busy) = high_among_low_on_engines("engine_queue");
    let (off, off_busy) = high_among_low_on_engines("inflight");
    println!(
        "high key TTFT among 24 low clients, engines of batch 4, no max_inflight: \
         engine_queue {on:?} (requests at the engines {on_busy:.1}), inflight {off:?} \
         ({off_busy:.1})"
    );
    assert!(on.max <= HIGH_WAIT, "engine_queue {on:?}");
    assert!(
        on.median.as_secs_f64() <= 0.5 * off.median.as_secs_f64(),
        "engine_queue {on:?} vs inflight {off:?}"
    );
    // The batches stay full: the proxy holds back only what would have queued in the engines.
    assert!(
        on_busy >= 7.0,
        "engines short of work: {on_busy}/8 at the engines"
    );
}

/// `n` streamed chats at once on `key`: how long until all were answered.
fn burst(addr: SocketAddr, n: usize) -> Duration {
    let start = Instant::now();
    let all: Vec<_> = (0..n)
        .map(|_| std::thread::spawn(move || stream_chat(addr, NORMAL, &[])))
        .collect();
    for t in all {
        assert_eq!(t.join().unwrap().0, 200);
    }
    start.elapsed()
}

#[test]
fn an_engine_queue_never_stalls_admission_and_a_silent_one_stops_counting() {
    let _serial = serial();
    // An engine whose queue never empties (another tenant's requests, say): this proxy's
    // requests go one at a time, and all of them go.
    let mock = Mock::start_with(&["--ttft-ms", "300", "--token-delay-ms", "5"]);
    mock.control(r#"{"engine": {"waiting": 50}}"#);
    let proxy = Proxy::start(
        &format!(
            "listen: \"127.0.0.1:0\"\nworkers: 2\nbackends: [{{ url: \"{}\" }}]\n\
             strategy: least_load\nrouting: {{ metrics_interval: 50ms, metrics_stale_after: 400ms }}\n\
             limits: {{ saturation: engine_queue, queue_timeout: 30s }}\n{}",
            mock.url(),
            keys()
        ),
        &[],
    );
    // Let the first reading arrive.
    assert!(eventually(Duration::from_secs(5), || {
        metric(&proxy, "llmproxy_backend_engine_waiting").is_some_and(|v| v >= 50.0)
    }));
    let held = burst(proxy.addr, 4);
    println!("4 requests on an engine reporting a queue: {held:?}");
    assert!(
        held >= Duration::from_millis(1200),
        "not held back: {held:?}"
    );
    // Its /metrics goes silent: after metrics_stale_after the queue no longer counts.
    mock.control(r#"{"engine": {"hang": true}}"#);
    std::thread::sleep(Duration::from_millis(900));
    let free = burst(proxy.addr, 4);
    println!("4 requests once its metrics went silent: {free:?}");
    assert!(
        free < Duration::from_millis(1000),
        "still held back: {free:?}"
    );
    // It answers again: held again.
    mock.control(r#"{"engine": {"hang": false}}"#);
    std::thread::sleep(Duration::from_millis(900));
    let again = burst(proxy.addr, 4);
    assert!(
        again >= Duration::from_millis(1200),
        "not held back: {again:?}"
    );

    // A backend whose metrics_path serves nothing is never held back at all.
    let proxy = Proxy::start(
        &format!(
            "listen: \"127.0.0.1:0\"\nworkers: 2\n\
             backends: [{{ url: \"{}\", metrics_path: /no-metrics }}]\n\
             strategy: least_load\nrouting: {{ metrics_interval: 50ms, metrics_stale_after: 400ms }}\n\
             limits: {{ saturation: engine_queue }}\n{}",
            mock.url(),
            keys()
        ),
        &[],
    );
    std::thread::sleep(Duration::from_millis(300));
    let unscraped = burst(proxy.addr, 4);
    assert!(
        unscraped < Duration::from_millis(1000),
        "held back: {unscraped:?}"
    );
}

#[test]
fn a_client_leaving_the_engine_queue_wait_frees_its_place_at_once() {
    let _serial = serial();
    let mock = Mock::start();
    mock.control(r#"{"engine": {"waiting": 5}}"#);
    let proxy = Proxy::start(
        &format!(
            "listen: \"127.0.0.1:0\"\nworkers: 2\nbackends: [{{ url: \"{}\" }}]\n\
             strategy: least_load\nrouting: {{ metrics_interval: 50ms }}\n\
             limits: {{ saturation: engine_queue, queue_timeout: 30s }}\n{}",
            mock.url(),
            keys()
        ),
        &[],
    );
    assert!(eventually(Duration::from_secs(5), || {
        metric(&proxy, "llmproxy_backend_engine_waiting").is_some_and(|v| v >= 5.0)
    }));
    // One request holds the one place the queued engine leaves this proxy.
    let addr = proxy.addr;
    let holder = std::thread::spawn(move || {
        post_json(
            addr,
            "/v1/chat/completions",
            &chat_body(false, 1),
            &[
                ("Authorization", &format!("Bearer {NORMAL}")),
                ("x-mock-ttft-ms", "2000"),
            ],
        )
        .status
    });
    assert!(eventually(Duration::from_secs(5), || mock.stat("active") == 1));
    // Summed over the classes.
    let queued = || -> f64 {
        get(proxy.addr, "/metrics")
            .text()
            .lines()
            .filter(|l| l.starts_with("llmproxy_queue_waiting{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let mut waiter = Client::connect(addr);
    let raw = post_raw(
        "/v1/chat/completions",
        &chat_body(false, 1),
        &[("Authorization", &format!("Bearer {LOW}"))],
        false,
    );
    waiter.send(raw.as_bytes());
    assert!(eventually(Duration::from_secs(3), || queued() == 1.0));
    let requests = mock.stat("requests");
    drop(waiter);
    assert!(
        eventually(Duration::from_millis(300), || queued() == 0.0),
        "the place was not freed"
    );
    assert_eq!(holder.join().unwrap(), 200);
    assert_eq!(
        mock.stat("requests"),
        requests,
        "the gone request reached the engine"
    );
    // The next one is served once the holder is done.
    let r = post_json(
        addr,
        "/v1/chat/completions",
        &chat_body(false, 1),
        &[("Authorization", &format!("Bearer {HIGH}"))],
    );
    assert_eq!(r.status, 200, "{}", r.text());
}
