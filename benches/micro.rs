//! Micro-benchmarks of the per-request hot path (issue 6, item 2; issue 3's per-chunk figure):
//! request head parse, body inspection, `include_usage` injection, usage extraction from SSE
//! streams (per chunk) and JSON bodies, one balancer pick per strategy, metrics recording, and
//! the serialisation of one `UsageEvent` on the usage thread.
//!
//! ```sh
//! cargo bench --bench micro            # all, about a minute
//! cargo bench --bench micro -- usage/  # a subset, by name
//! ```
//!
//! Inputs are shaped like real traffic (an OpenAI SDK chat request, a vLLM stream) and built once
//! outside the timed loops. Every benchmark calls the library exactly as `proxy.rs` does, so a
//! figure here is a cost the proxy pays per request (or per chunk), not a lower bound. The one
//! exception is `usage_event/*/serde_*`: the serde derive that `UsageEvent::to_json` replaced,
//! kept here so that choice (see `usage/mod.rs`) can be re-checked.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde::Serialize;

use llmproxy::config::{Config, Strategy};
use llmproxy::http1::{Head, ParseStatus};
use llmproxy::openai::tap::{Kind, Tap, Usage};
use llmproxy::openai::{inject_include_usage, inspect};
use llmproxy::telemetry::metrics::{LocalMetrics, Metrics};
use llmproxy::usage::{new_event_id, UsageEvent};
use llmproxy::worker::balance::{block_chain, Balancer, Inputs, LoadView, Params};
use llmproxy::worker::engine::{EngineLoad, EngineView, Reading};

const CHAT_PATH: &str = "/v1/chat/completions";
const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
/// Token events in the streamed response (besides the role, finish, usage and `[DONE]` events).
const STREAM_TOKENS: usize = 64;
const BACKENDS: usize = 8;

/// What an OpenAI Python SDK sends for a chat completion, with a gateway's usual extras.
const REQUEST_HEAD: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\n\
Host: llm.internal.example.com\r\n\
Accept-Encoding: gzip, deflate\r\n\
Connection: keep-alive\r\n\
Accept: application/json\r\n\
Content-Type: application/json\r\n\
User-Agent: OpenAI/Python 1.54.3\r\n\
X-Stainless-Lang: python\r\n\
X-Stainless-Package-Version: 1.54.3\r\n\
X-Stainless-Runtime: CPython\r\n\
Authorization: Bearer sk-proj-3f9a1c2b7d4e5f60718293a4b5c6d7e8f9012345\r\n\
X-User-Id: tenant-4711\r\n\
Content-Length: 1024\r\n\r\n";

/// A streaming chat request of about 1 KiB, without `stream_options` (so injection applies).
fn chat_body() -> Vec<u8> {
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a concise assistant for a customer support team. Answer in at most three sentences, cite the relevant policy section when there is one, and never invent order numbers or prices."},
            {"role": "user", "content": "My order 88-1203 arrived with a cracked screen protector. The box was fine. Can I get a replacement without sending the whole phone back?"},
            {"role": "assistant", "content": "Yes. Under policy section 4.2 accessories damaged in transit are replaced on their own: reply with a photo of the protector and the packing slip and we ship a new one within two business days."},
            {"role": "user", "content": "Great, I attached the photo. Will the replacement include the installation kit, and can it go to my office address instead of home? Please also confirm whether I need to return the cracked one."},
        ],
        "stream": true,
        "max_tokens": 256,
        "temperature": 0.7,
        "top_p": 0.95,
        "user": "tenant-4711",
    });
    serde_json::to_vec(&body).expect("serialise request body")
}

/// One SSE event as vLLM writes it (`exclude_unset`: no `usage` key on token chunks).
fn sse(payload: &serde_json::Value) -> Vec<u8> {
    let mut e = b"data: ".to_vec();
    e.extend_from_slice(&serde_json::to_vec(payload).expect("serialise event"));
    e.extend_from_slice(b"\n\n");
    e
}

/// One chunk of a vLLM chat stream.
fn vllm_chunk(choices: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "id": "chatcmpl-6f1c0b8a2d3e4f5a9b7c8d9e0f1a2b3c",
        "object": "chat.completion.chunk",
        "created": 1_718_000_000u64,
        "model": MODEL,
        "choices": choices,
    })
}

/// A vLLM chat stream with `include_usage`: role event, token events, finish event, usage-only
/// event, `[DONE]` — one event per read, as vLLM flushes them. `running`: every chunk also
/// carries the cumulative `usage`, as when the proxy asks for `continuous_usage_stats` (the tap
/// removes it for a client that did not ask for it: the load benchmark's W2 and W5).
fn vllm_stream(running: bool) -> Vec<Vec<u8>> {
    let chunk = |choices: serde_json::Value, completion: usize| {
        let mut c = vllm_chunk(choices);
        if running {
            c["usage"] = serde_json::json!({"prompt_tokens": 187, "total_tokens": 187 + completion,
                                            "completion_tokens": completion});
        }
        sse(&c)
    };
    let mut events = vec![chunk(
        serde_json::json!([
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}
        ]),
        0,
    )];
    for i in 0..STREAM_TOKENS {
        events.push(chunk(
            serde_json::json!([
                {"index": 0, "delta": {"content": format!(" word{i}")}, "logprobs": null, "finish_reason": null}
            ]),
            i + 1,
        ));
    }
    events.push(chunk(
        serde_json::json!([
            {"index": 0, "delta": {"content": ""}, "logprobs": null, "finish_reason": "length", "stop_reason": null}
        ]),
        STREAM_TOKENS,
    ));
    let mut usage = vllm_chunk(serde_json::json!([]));
    usage["usage"] = serde_json::json!({
        "prompt_tokens": 187, "total_tokens": 251, "completion_tokens": STREAM_TOKENS,
        "prompt_tokens_details": null,
    });
    events.push(sse(&usage));
    events.push(b"data: [DONE]\n\n".to_vec());
    events
}

/// The same stream as reads that each end in the middle of an event (the worst case for the
/// SSE splitter: every event is joined from two reads).
fn split_reads(events: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let all: Vec<u8> = events.concat();
    let mut reads = Vec::with_capacity(events.len() * 2);
    let mut at = 0;
    for e in events {
        let half = at + e.len() / 2;
        reads.push(all[at..half].to_vec());
        at = half;
    }
    reads.push(all[at..].to_vec());
    reads.retain(|r| !r.is_empty());
    reads
}

/// A non-streaming chat completion body of the same size class as the stream above.
fn chat_response() -> Vec<u8> {
    let text: String = (0..STREAM_TOKENS).map(|i| format!(" word{i}")).collect();
    let body = serde_json::json!({
        "id": "chatcmpl-6f1c0b8a2d3e4f5a9b7c8d9e0f1a2b3c",
        "object": "chat.completion",
        "created": 1_718_000_000u64,
        "model": MODEL,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": null,
            "finish_reason": "length",
            "stop_reason": null,
        }],
        "usage": {
            "prompt_tokens": 187, "total_tokens": 251, "completion_tokens": STREAM_TOKENS,
            "prompt_tokens_details": {"cached_tokens": 128},
        },
        "prompt_logprobs": null,
    });
    serde_json::to_vec(&body).expect("serialise response body")
}

fn request_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_head_12_headers", |b| {
        b.iter_batched_ref(
            || BytesMut::from(REQUEST_HEAD),
            |buf| match Head::parse_request(buf) {
                Ok(ParseStatus::Complete(head)) => head,
                _ => panic!("benchmark head does not parse"),
            },
            BatchSize::SmallInput,
        )
    });
    let mut buf = BytesMut::from(REQUEST_HEAD);
    let Ok(ParseStatus::Complete(head)) = Head::parse_request(&mut buf) else {
        panic!("benchmark head does not parse");
    };
    // What the proxy asks of every head after parsing it.
    g.bench_function("framing_and_lookups", |b| {
        b.iter(|| {
            let h = black_box(&head);
            (
                h.request_framing(),
                h.keep_alive(),
                h.header("x-user-id").is_some(),
                h.header("authorization").is_some(),
            )
        })
    });

    let body = chat_body();
    assert!(
        (900..1200).contains(&body.len()),
        "chat body is {} bytes",
        body.len()
    );
    g.bench_function("inspect_1KiB_chat_body", |b| {
        b.iter(|| inspect("POST", CHAT_PATH, black_box(&body), "user"))
    });
    let info = inspect("POST", CHAT_PATH, &body, "user").expect("inspect benchmark body");
    assert!(info.stream && !info.has_stream_options);
    g.bench_function("inject_include_usage/splice", |b| {
        b.iter(|| inject_include_usage(CHAT_PATH, black_box(&body), &info))
    });
    // The rare shape: `stream_options` present without `include_usage: true` (re-serialises).
    let mut v: serde_json::Value = serde_json::from_slice(&body).expect("benchmark body");
    v["stream_options"] = serde_json::json!({"include_usage": false});
    let rewrite = serde_json::to_vec(&v).expect("serialise");
    let rewrite_info = inspect("POST", CHAT_PATH, &rewrite, "user").expect("inspect");
    g.bench_function("inject_include_usage/rewrite", |b| {
        b.iter(|| inject_include_usage(CHAT_PATH, black_box(&rewrite), &rewrite_info))
    });
    g.finish();
}

/// One whole stream per iteration: a fresh `Tap`, every read fed through it into the client's
/// output buffer (reused, as the proxy reuses its own), then `finish` and `usage`.
fn run_stream(kind: Kind, reads: &[Vec<u8>], out: &mut Vec<u8>) -> Option<Usage> {
    out.clear();
    let mut tap = Tap::new(kind);
    let mut emit = |d: &[u8]| out.extend_from_slice(d);
    for r in reads {
        tap.feed(black_box(r), &mut emit);
    }
    tap.finish(&mut emit);
    tap.usage()
}

fn usage_extraction(c: &mut Criterion) {
    let events = vllm_stream(false);
    let split = split_reads(&events);
    let stream_bytes: usize = events.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(stream_bytes);
    let observe = Kind::OpenAiSse {
        strip: false,
        running: false,
        timings: false,
    };
    let strip = Kind::OpenAiSse {
        strip: true,
        running: false,
        timings: false,
    };
    // Check once that each variant sees the usage and forwards what it should.
    for (kind, reads) in [(observe, &events), (strip, &events), (strip, &split)] {
        let u = run_stream(kind, reads, &mut out).expect("stream usage");
        assert_eq!(u.completion_tokens, STREAM_TOKENS as u64);
        let expected = if kind == strip {
            stream_bytes - events[events.len() - 2].len()
        } else {
            stream_bytes
        };
        assert_eq!(out.len(), expected);
    }

    // Throughput is per SSE event, so criterion's "elem/s" reads as chunks per second and
    // time / element as the cost of one chunk.
    let mut g = c.benchmark_group("usage/sse_vllm_stream");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("observe", |b| {
        b.iter(|| run_stream(observe, &events, &mut out))
    });
    g.bench_function("strip", |b| b.iter(|| run_stream(strip, &events, &mut out)));
    g.bench_function("observe_split_reads", |b| {
        b.iter(|| run_stream(observe, &split, &mut out))
    });
    g.bench_function("strip_split_reads", |b| {
        b.iter(|| run_stream(strip, &split, &mut out))
    });
    g.finish();

    // Running usage removed from every chunk: the stream as one read (W5: the backend wrote it
    // at once) and one event per read (W2).
    let running = vllm_stream(true);
    let burst = [running.concat()];
    let running_strip = Kind::OpenAiSse {
        strip: true,
        running: true,
        timings: false,
    };
    for reads in [&running[..], &burst[..]] {
        let u = run_stream(running_strip, reads, &mut out).expect("stream usage");
        assert_eq!(u.completion_tokens, STREAM_TOKENS as u64);
        assert!(
            !out.windows(7).any(|w| w == b"\"usage\""),
            "running usage left in"
        );
    }
    let mut g = c.benchmark_group("usage/sse_vllm_running");
    g.throughput(Throughput::Elements(running.len() as u64));
    g.bench_function("strip_event_reads", |b| {
        b.iter(|| run_stream(running_strip, &running, &mut out))
    });
    g.bench_function("strip_one_read", |b| {
        b.iter(|| run_stream(running_strip, &burst, &mut out))
    });
    g.finish();

    let body = chat_response();
    let mut g = c.benchmark_group("usage/json");
    g.throughput(Throughput::Elements(1));
    let json_reads = [body.clone()];
    assert_eq!(
        run_stream(Kind::OpenAiJson, &json_reads, &mut out).map(|u| u.cached_tokens),
        Some(Some(128))
    );
    g.bench_function("chat_completion_body", |b| {
        b.iter(|| run_stream(Kind::OpenAiJson, &json_reads, &mut out))
    });
    g.finish();
}

fn balancer(c: &mut Criterion) {
    let mut g = c.benchmark_group("balance/pick_8_backends");
    g.throughput(Throughput::Elements(1));
    // Two cores' worth of in-flight requests, uneven, one backend down, one not serving the model.
    let view = LoadView::new(0, 2, BACKENDS);
    for b in 0..BACKENDS {
        view.set(0, b, b as u64 + 1, (b as u32 * 7) % 5);
        view.set(1, b, b as u64 + 1, (b as u32 * 3) % 4);
    }
    view.set_up(5, 6, false);
    let mask: Vec<bool> = (0..BACKENDS).map(|b| b != 2).collect();
    for (name, strategy, weights) in [
        ("round_robin", Strategy::RoundRobin, vec![1; BACKENDS]),
        (
            "weighted_round_robin",
            Strategy::WeightedRoundRobin,
            vec![1, 2, 3, 4, 1, 2, 3, 4],
        ),
        (
            "least_connections",
            Strategy::LeastConnections,
            vec![1, 1, 2, 2, 1, 1, 2, 2],
        ),
    ] {
        let balancer = Balancer::new(strategy, weights);
        // The same eligibility test `proxy::forward` passes.
        g.bench_function(name, |b| {
            b.iter(|| balancer.pick(black_box(&view), |i| mask[i] && view.is_up(i)))
        });
    }
    // The LLM-aware strategies take engine readings and a request key per call.
    let engine = EngineView::new(BACKENDS, Duration::from_secs(2));
    let now = Instant::now();
    for b in 0..BACKENDS {
        let load = EngineLoad {
            waiting: b as f64,
            running: 4.0,
            kv_usage: Some(0.1 * b as f64),
        };
        engine.set(b, Reading { load, at: now });
    }
    for (name, strategy) in [
        ("power_of_two", Strategy::PowerOfTwo),
        ("least_load", Strategy::LeastLoad),
        ("consistent_hash", Strategy::ConsistentHash),
    ] {
        let balancer = Balancer::new(strategy, vec![1; BACKENDS]);
        let input = Inputs {
            view: &view,
            engine: Some(&engine),
            key: Some(0x5e55_10a1),
            blocks: &[],
            now,
        };
        g.bench_function(name, |b| {
            b.iter(|| balancer.choose(black_box(&input), |i| mask[i] && view.is_up(i)))
        });
    }
    // prefix_cache: decision plus index update for a 16 KiB prompt (64 blocks of 256 bytes)
    // over 8 backends, against an index warmed with 64 such prompts per backend.
    let prompt = |i: u64| -> Vec<u64> {
        let text: Vec<u8> = (0..16 * 1024u64)
            .map(|j| b'a' + ((i * 7 + j / 256 * 3 + j) % 26) as u8)
            .collect();
        let mut chain = Vec::new();
        block_chain(&text, 256, 128, &mut chain);
        chain
    };
    let params = Params::default().prefix_cache(8192, 8.0);
    let keys = (0..BACKENDS as u64).collect();
    let balancer = Balancer::with(Strategy::PrefixCache, vec![1; BACKENDS], keys, params);
    let prompts: Vec<Vec<u64>> = (0..BACKENDS as u64 * 64).map(prompt).collect();
    for (i, p) in prompts.iter().enumerate() {
        balancer.learn(i % BACKENDS, p);
    }
    let mut next = 0usize;
    g.bench_function("prefix_cache_pick_and_learn_16KiB", |b| {
        b.iter(|| {
            next = (next + 1) % prompts.len();
            let input = Inputs {
                blocks: &prompts[next],
                ..Inputs::new(&view)
            };
            let pick = balancer.choose(black_box(&input), |i| mask[i] && view.is_up(i));
            if let Some(p) = pick {
                balancer.learn(p.backend, &prompts[next]);
            }
            pick
        })
    });
    g.finish();
}

fn metrics(c: &mut Criterion) {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let urls: Vec<String> = (0..BACKENDS)
        .map(|i| format!("http://10.0.0.{}:8000", i + 1))
        .collect();
    let mut cfg = Config::with_backends(listen, &urls).expect("benchmark config");
    for (i, b) in cfg.backends.iter_mut().enumerate() {
        b.models = Some(vec![MODEL.to_string(), format!("model-{i}")]);
    }
    let global = Arc::new(Metrics::new(&cfg, 1, "io_uring").expect("metrics"));
    let local = LocalMetrics::new(global, &cfg);
    // Prompt, completion, cached, reasoning.
    let usage = [187, 64, 128, 0];
    let mut g = c.benchmark_group("metrics");
    g.throughput(Throughput::Elements(1));
    // What `proxy::account` records for one finished streaming request.
    let mut n = 0usize;
    g.bench_function("request_and_tokens", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let model = local.model_index(Some(black_box(MODEL)));
            local.request(
                200,
                Some(n % BACKENDS),
                model,
                Duration::from_micros(1_850_000),
                Some(Duration::from_micros(42_000)),
            );
            local.tokens(model, usage);
        })
    });
    g.finish();
}

/// A finished streaming chat request as `proxy::account` reports it: every string field set, one
/// optional count absent. `escaped` puts quotes, backslashes and control characters into the
/// client-supplied strings (request id, user id), the worst case for the string writer.
fn usage_event(escaped: bool) -> UsageEvent {
    let (request_id, user_id) = if escaped {
        ("req \"7f3a\" \\ retry\t2", "tenant\n4711 \u{1} \"ü\"")
    } else {
        ("7f3a9c2e1b4d5a60000c", "tenant-4711")
    };
    UsageEvent {
        event_id: new_event_id(),
        request_id: request_id.into(),
        timestamp: "2025-06-01T12:00:00.000Z".into(),
        model: Some(MODEL.into()),
        endpoint: CHAT_PATH.into(),
        backend_url: Some("http://10.0.0.3:8000".into()),
        is_stream: true,
        prompt_tokens: 187,
        completion_tokens: 64,
        total_tokens: 251,
        cached_tokens: Some(128),
        reasoning_tokens: None,
        status: 200,
        outcome: "ok".into(),
        latency_ms: 1850,
        ttft_ms: Some(42),
        user_id: Some(user_id.into()),
        key_id: Some(llmproxy::auth::key_id(
            "sk-proj-3f9a1c2b7d4e5f60718293a4b5c6d7e8",
        )),
        usage_source: "reported",
        served_model: Some(MODEL.into()),
        priority: None,
    }
}

/// What `#[derive(Serialize)]` on `UsageEvent` wrote, the serialiser `UsageEvent::to_json`
/// replaced: same fields in the same order with the same attributes. It borrows the event's
/// strings, which serde writes exactly as it writes a `String`, so serialising it costs what
/// the derive on the event itself cost.
#[derive(Serialize)]
struct DerivedEvent<'a> {
    event_id: &'a str,
    request_id: &'a str,
    timestamp: &'a str,
    model: Option<&'a str>,
    endpoint: &'a str,
    backend_url: Option<&'a str>,
    is_stream: bool,
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cached_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_tokens: Option<u64>,
    status: u16,
    outcome: &'a str,
    latency_ms: u64,
    ttft_ms: Option<u64>,
    user_id: Option<&'a str>,
    key_id: Option<&'a str>,
    usage_source: &'a str,
    served_model: Option<&'a str>,
    priority: Option<&'a str>,
}

impl<'a> DerivedEvent<'a> {
    fn of(ev: &'a UsageEvent) -> Self {
        // No `..`: a field added to the event fails to compile here rather than being left out
        // of the comparison.
        let UsageEvent {
            event_id,
            request_id,
            timestamp,
            model,
            endpoint,
            backend_url,
            is_stream,
            prompt_tokens,
            completion_tokens,
            total_tokens,
            cached_tokens,
            reasoning_tokens,
            status,
            outcome,
            latency_ms,
            ttft_ms,
            user_id,
            key_id,
            usage_source,
            served_model,
            priority,
        } = ev;
        DerivedEvent {
            event_id,
            request_id,
            timestamp,
            model: model.as_deref(),
            endpoint,
            backend_url: backend_url.as_deref(),
            is_stream: *is_stream,
            prompt_tokens: *prompt_tokens,
            completion_tokens: *completion_tokens,
            total_tokens: *total_tokens,
            cached_tokens: *cached_tokens,
            reasoning_tokens: *reasoning_tokens,
            status: *status,
            outcome,
            latency_ms: *latency_ms,
            ttft_ms: *ttft_ms,
            user_id: user_id.as_deref(),
            key_id: key_id.as_deref(),
            usage_source,
            served_model: served_model.as_deref(),
            priority: *priority,
        }
    }
}

/// One event into one JSON line, as the usage intake thread does for every event it spools:
/// the hand-written `to_json` against the serde derive. `serde_to_string` is the like-for-like
/// alternative (the intake keeps one `String` per line); `serde_to_writer_reused_vec` is the
/// derive's best case, a buffer reused across events. Both must write what `to_json` writes.
fn usage_event_json(c: &mut Criterion) {
    let mut g = c.benchmark_group("usage_event");
    g.throughput(Throughput::Elements(1));
    for (name, escaped) in [("plain", false), ("escaped", true)] {
        let ev = usage_event(escaped);
        let derived = DerivedEvent::of(&ev);
        assert_eq!(
            ev.to_json(),
            serde_json::to_string(&derived).expect("serialise event")
        );
        g.bench_function(format!("{name}/to_json"), |b| {
            b.iter(|| black_box(&ev).to_json())
        });
        g.bench_function(format!("{name}/serde_to_string"), |b| {
            b.iter(|| serde_json::to_string(black_box(&derived)).expect("serialise event"))
        });
        let mut buf = Vec::with_capacity(512);
        g.bench_function(format!("{name}/serde_to_writer_reused_vec"), |b| {
            b.iter(|| {
                buf.clear();
                serde_json::to_writer(&mut buf, black_box(&derived)).expect("serialise event");
                buf.len()
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .without_plots()
}

criterion_group! {
    name = hot_path;
    config = config();
    targets = request_path, usage_extraction, balancer, metrics, usage_event_json
}
criterion_main!(hot_path);
