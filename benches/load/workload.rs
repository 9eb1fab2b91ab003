//! The workloads W1..W4 (connections, streaming or not, tokens and their pace, timeout, ramp)
//! and the one request every client sends. Pure data: it never touches a socket. The request is
//! built once per run as `Bytes` and cloned per request, so the client pays nothing to build it.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;

/// The SSE bytes that mark one content token in an OpenAI chat stream (the mock's tokens are
/// `tok0 `, `tok1 `, ...; the role chunk carries `"content":""` and does not match).
pub(crate) const TOKEN_MARK: &[u8] = br#""content":"tok"#;
/// Tokens per generation (the mock's completion length for every workload but w4), as the
/// issues' targets are set; `LOAD_TOKENS` changes it for a run (see `tokens`).
pub(crate) const TOKENS: u32 = 16;

/// `LOAD_TOKENS`: tokens per generation for every workload but w4 (default `TOKENS`). Real
/// completions run to hundreds of tokens: a longer one shows a proxy's cost per token apart
/// from its cost per request, which 16 tokens mostly measure. The targets are judged at 16 only.
fn tokens() -> Result<u32, String> {
    tokens_from(std::env::var("LOAD_TOKENS").ok().as_deref())
}

fn tokens_from(v: Option<&str>) -> Result<u32, String> {
    let Some(v) = v else { return Ok(TOKENS) };
    let n = number("LOAD_TOKENS", v, 1.0, 4096.0, "tokens")?;
    if n.fract() != 0.0 {
        return Err(format!("LOAD_TOKENS: {v:?} is not a whole number"));
    }
    Ok(n as u32)
}

#[derive(Clone, Debug)]
pub(crate) struct Workload {
    pub(crate) id: &'static str,
    pub(crate) title: String,
    pub(crate) conns: usize,
    pub(crate) stream: bool,
    /// Completion tokens per request (`max_tokens`).
    pub(crate) tokens: u32,
    pub(crate) token_delay_ms: u64,
    /// The mock writes each stream at once (`mock-backend --burst`): the proxy reads all of a
    /// stream's events in one read, so its work per event shows instead of its work per read.
    pub(crate) burst: bool,
    /// A request not finished within this is an error (None: streams meant to outlive the run).
    pub(crate) timeout: Option<Duration>,
    /// Connections are opened spread over this time, before the warm-up.
    pub(crate) ramp: Duration,
    /// The shortest measured window this workload's figures stand on, whatever `LOAD_SECS` says
    /// (W3's: see `w3_min_secs`).
    pub(crate) min_secs: f64,
    /// Some: requests per second offered on a fixed schedule (open loop, W6), spread evenly over
    /// the connections; None: each connection sends its next request as soon as the last one
    /// ended (closed loop, at whatever rate the target sustains).
    pub(crate) rate: Option<f64>,
}

impl Workload {
    /// The measured window of a run: `LOAD_SECS`, or the workload's own minimum when longer.
    pub(crate) fn window_secs(&self, secs: f64) -> f64 {
        secs.max(self.min_secs)
    }
}

/// W3's minimum window, `LOAD_W3_SECS` (default 30 s, 0 = `LOAD_SECS` alone). W3 completes
/// about 780 requests per second, so an 8 s window gives its TTFT p99 about 60 samples above it,
/// and the added p99 (a difference of two such p99s) moved by milliseconds from round to round
/// (session 7: +2.07 to +5.40 ms on one binary). 30 s gives about 23,000 requests and 230
/// samples above the p99 on each side; the W1/W2/W5 rates need no more than `LOAD_SECS`.
fn w3_min_secs() -> Result<f64, String> {
    match std::env::var("LOAD_W3_SECS") {
        Ok(v) => seconds("LOAD_W3_SECS", &v, 0.0),
        Err(_) => Ok(30.0),
    }
}

/// A number of seconds from the environment or the command line, in `min..=3600` (here, with
/// `env_usize`, so that the options and the workloads parse alike without importing each other).
pub(crate) fn seconds(name: &str, v: &str, min: f64) -> Result<f64, String> {
    number(name, v, min, 3600.0, "seconds")
}

/// A number in `min..=max` from the environment or the command line; `what` names its unit in
/// the error.
fn number(name: &str, v: &str, min: f64, max: f64, what: &str) -> Result<f64, String> {
    match v.trim().parse::<f64>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(format!(
            "{name}: {v:?} must be a number of {what} in {min}..={max}"
        )),
    }
}

/// W6's offered rate, `LOAD_W6_RATE` requests per second (default 3,000: about half of what
/// the proxies sustain on W2 on the 2-core machine, so that no target falls behind and every
/// one is measured at the same work per second).
fn w6_rate() -> Result<f64, String> {
    match std::env::var("LOAD_W6_RATE") {
        Ok(v) => rate("LOAD_W6_RATE", &v),
        Err(_) => Ok(3000.0),
    }
}

/// A rate in requests per second, in `1..=1000000`.
fn rate(name: &str, v: &str) -> Result<f64, String> {
    number(name, v, 1.0, 1_000_000.0, "requests per second")
}

pub(crate) fn env_usize(name: &str, default: usize) -> Result<usize, String> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

pub(crate) fn workload(id: &str) -> Result<Workload, String> {
    let tokens = tokens()?;
    Ok(match id.trim().to_ascii_lowercase().as_str() {
        "w1" => {
            let conns = env_usize("LOAD_W1_CONNS", 64)?;
            Workload {
                id: "w1",
                title: if tokens == TOKENS {
                    format!("W1 non-streaming chat, {conns} connections")
                } else {
                    format!("W1 non-streaming chat, {tokens} tokens, {conns} connections")
                },
                conns,
                stream: false,
                tokens,
                token_delay_ms: 0,
                burst: false,
                timeout: Some(Duration::from_secs(5)),
                ramp: Duration::ZERO,
                min_secs: 0.0,
                rate: None,
            }
        }
        "w2" => {
            let conns = env_usize("LOAD_W2_CONNS", 64)?;
            Workload {
                id: "w2",
                title: format!(
                    "W2 streaming chat, {tokens} tokens at 0 ms/token, {conns} connections"
                ),
                conns,
                stream: true,
                tokens,
                token_delay_ms: 0,
                burst: false,
                timeout: Some(Duration::from_secs(5)),
                ramp: Duration::ZERO,
                min_secs: 0.0,
                rate: None,
            }
        }
        "w3" => {
            let conns = env_usize("LOAD_W3_STREAMS", 256)?;
            Workload {
                id: "w3",
                title: format!("W3 {conns} concurrent streams, {tokens} tokens at 20 ms/token"),
                conns,
                stream: true,
                tokens,
                token_delay_ms: 20,
                burst: false,
                // Twice the stream's own length when that is longer (LOAD_TOKENS).
                timeout: Some(
                    Duration::from_secs(5).max(Duration::from_millis(40 * u64::from(tokens))),
                ),
                ramp: Duration::ZERO,
                min_secs: w3_min_secs()?,
                rate: None,
            }
        }
        "w4" => {
            let conns = env_usize("LOAD_W4_STREAMS", 10_000)?;
            Workload {
                id: "w4",
                title: format!("W4 {conns} concurrent idle-ish streams, 1 token/s"),
                conns,
                stream: true,
                // Longer than any run: every stream stays open for the whole window.
                tokens: 100_000,
                token_delay_ms: 1000,
                burst: false,
                timeout: None,
                ramp: Duration::from_secs(3),
                min_secs: 0.0,
                rate: None,
            }
        }
        "w5" => {
            let conns = env_usize("LOAD_W5_CONNS", 64)?;
            Workload {
                id: "w5",
                title: format!(
                    "W5 streaming chat, {tokens} tokens written at once, {conns} connections"
                ),
                conns,
                stream: true,
                tokens,
                token_delay_ms: 0,
                burst: true,
                timeout: Some(Duration::from_secs(5)),
                ramp: Duration::ZERO,
                min_secs: 0.0,
                rate: None,
            }
        }
        "w6" => {
            let conns = env_usize("LOAD_W6_CONNS", 64)?;
            let rate = w6_rate()?;
            Workload {
                id: "w6",
                title: format!(
                    "W6 W2's streams at a fixed {rate:.0} requests/s (open loop), {tokens} tokens at \
                     0 ms/token, {conns} connections"
                ),
                conns,
                rate: Some(rate),
                // W2's streams, timeout and all.
                ..workload("w2")?
            }
        }
        other => {
            return Err(format!(
                "unknown workload {other:?} (w1, w2, w3, w4, w5, w6)"
            ))
        }
    })
}

/// The request body. `usage`: a stream asks for usage itself, running usage in every chunk
/// included (`LOAD_CLIENT_USAGE=running`), as llmproxy asks its backend when the client does not:
/// then every target's backend does the same work and sends the same bytes, and llmproxy relays
/// them as they are instead of removing what the client did not ask for.
pub(crate) fn chat_body(stream: bool, tokens: u32, usage: bool) -> String {
    format!(
        r#"{{"model":"mock-model","messages":[{{"role":"system","content":"You are a helpful assistant."}},{{"role":"user","content":"Write a short poem about load balancers."}}],"max_tokens":{tokens},"temperature":0.7{}{}}}"#,
        if stream { r#","stream":true"# } else { "" },
        if stream && usage {
            r#","stream_options":{"include_usage":true,"continuous_usage_stats":true}"#
        } else {
            ""
        }
    )
}

/// What the OpenAI Python SDK (1.x) sends besides the six headers every request has
/// (`LOAD_CLIENT_HEADERS=sdk`): real clients carry about three times the benchmark's headers.
const SDK_HEADERS: &str = "Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n\
    X-Stainless-Lang: python\r\nX-Stainless-Package-Version: 1.54.4\r\nX-Stainless-OS: Linux\r\n\
    X-Stainless-Arch: x64\r\nX-Stainless-Runtime: CPython\r\nX-Stainless-Runtime-Version: 3.11.2\r\n\
    X-Stainless-Async: false\r\nx-stainless-retry-count: 0\r\nx-stainless-read-timeout: 600\r\n";

/// The request every client sends (an OpenAI SDK-like set of headers, with an API key so the
/// proxy's key hashing runs too; with `sdk`, the SDK's whole set; `usage`: see `chat_body`).
pub(crate) fn chat_request(
    addr: SocketAddr,
    stream: bool,
    tokens: u32,
    sdk: bool,
    usage: bool,
) -> Bytes {
    let body = chat_body(stream, tokens, usage);
    let accept = if stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    Bytes::from(format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: llmproxy-load/1\r\n\
         Accept: {accept}\r\nAuthorization: Bearer sk-bench-0123456789abcdef\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{body}",
        body.len(),
        if sdk { SDK_HEADERS } else { "" }
    ))
}

/// The request the clients send, with either header set: a whole head of six or seventeen
/// `Name: value` lines, then exactly the body its Content-Length announces.
pub(crate) fn self_check() {
    let addr: SocketAddr = ([127, 0, 0, 1], 8080).into();
    for ((sdk, headers), usage) in [(false, 6), (true, 17)].into_iter().zip([false, true]) {
        for stream in [false, true] {
            let req = chat_request(addr, stream, 16, sdk, usage);
            let text = String::from_utf8_lossy(&req);
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
            let lines: Vec<&str> = head.split("\r\n").skip(1).collect();
            assert_eq!(lines.len(), headers, "{head}");
            assert!(lines.iter().all(|l| l.split_once(": ").is_some()), "{head}");
            let length = lines
                .iter()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|n| n.parse::<usize>().ok());
            assert_eq!(length, Some(body.len()), "{head}");
            // Only a stream asks for usage, and only when told to.
            assert_eq!(
                body.contains("continuous_usage_stats"),
                stream && usage,
                "{body}"
            );
            assert!(
                serde_json::from_str::<serde_json::Value>(body).is_ok(),
                "{body}"
            );
        }
    }
    // W6 is W2's stream on a schedule; every other workload is a closed loop.
    let ok = |id| workload(id).unwrap_or_else(|e| panic!("{e}"));
    let (w2, w6) = (ok("w2"), ok("w6"));
    assert!(w6.rate.is_some() && w6.stream && w6.tokens == w2.tokens && w6.timeout == w2.timeout);
    assert!(["w1", "w2", "w3", "w4", "w5"]
        .iter()
        .all(|id| ok(id).rate.is_none()));
    assert_eq!(tokens_from(None), Ok(TOKENS));
    assert_eq!(tokens_from(Some(" 256 ")), Ok(256));
    for bad in ["0", "4097", "1.5", "many", ""] {
        assert!(tokens_from(Some(bad)).is_err(), "{bad:?}");
    }
    // W3 at 16 tokens keeps its 5 s request timeout.
    assert_eq!(ok("w3").timeout, Some(Duration::from_secs(5)));
    assert_eq!(rate("R", " 2500 "), Ok(2500.0));
    for bad in ["0", "-5", "fast", "", "2e6"] {
        assert!(rate("R", bad).is_err(), "{bad:?}");
    }
    eprintln!("load benchmark: workload self-check passed");
}
