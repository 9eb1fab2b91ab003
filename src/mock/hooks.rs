//! Fault injection: the per-request `x-mock-*` headers, read once into `Hooks` with the mock's
//! defaults filled in, and the bytes the garbage faults send.
//!
//! A malformed hook header is the client's mistake, answered with a 400 (never a panic, never
//! ignored: a test that misspells a fault must not pass by accident). The garbage bytes are
//! written raw on purpose, not through `crate::http1`: they exist to be what no HTTP writer
//! produces.

use std::{str::FromStr, time::Duration};

use http::HeaderMap;

use super::MockOptions;

/// Longest delay a hook header may ask for (keeps timer arithmetic far from overflow).
pub(super) const MAX_HOOK_DELAY: Duration = Duration::from_secs(24 * 60 * 60);
/// Where `x-mock-garbage` breaks the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Garbage {
    /// Not an HTTP response at all.
    Head,
    /// A valid head and first token, then (after the token delay) an invalid chunk size line.
    Chunk,
}

/// What `x-mock-garbage: head` answers: binary junk of another protocol.
pub(super) const GARBAGE_HEAD: &[u8] =
    b"\x00\xffSSH-2.0-OpenSSH_9.6\r\n\x16\x03\x01\x02\x00garbage\r\n\r\n";
/// What `x-mock-garbage: chunk` sends after the first token instead of a chunk.
pub(super) const GARBAGE_CHUNK: &[u8] = b"zz-not-a-size\r\ngarbage\r\n";

/// How a non-streaming body is delimited (`x-mock-framing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    Length,
    Chunked,
    Close,
}

/// The per-request `x-mock-*` knobs, with the options' defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Hooks {
    pub(super) echo: bool,
    pub(super) status: Option<u16>,
    pub(super) ttft: Duration,
    pub(super) token_delay: Duration,
    /// `x-mock-burst` (or the `burst` option): a stream without delays leaves in one write.
    pub(super) burst: bool,
    pub(super) tokens: u32,
    pub(super) reset_after: Option<u32>,
    pub(super) stall_head: bool,
    pub(super) stall_after: Option<u32>,
    pub(super) close: bool,
    pub(super) framing: Framing,
    pub(super) chunk_split: bool,
    /// `x-mock-garbage`: bytes that are not HTTP instead of a response, or a stream whose
    /// chunk framing breaks after the first token.
    pub(super) garbage: Option<Garbage>,
    pub(super) keepalive_timeout: Option<Duration>,
    /// Close after this idle time without announcing it (`x-mock-idle-close-ms`): the race a
    /// proxy's pool must survive when a server's keep-alive limit is unknown to it.
    pub(super) idle_close: Option<Duration>,
}

impl Hooks {
    pub(super) fn parse(headers: &HeaderMap, opts: &MockOptions) -> Result<Self, String> {
        let text = |name: &str| -> Result<Option<String>, String> {
            match headers.get(name) {
                None => Ok(None),
                Some(v) => v
                    .to_str()
                    .map(|s| Some(s.trim().to_ascii_lowercase()))
                    .map_err(|_| format!("invalid {name} header")),
            }
        };
        fn number<T: FromStr>(name: &str, value: Option<String>) -> Result<Option<T>, String> {
            value
                .map(|v| {
                    v.parse::<T>()
                        .map_err(|_| format!("invalid {name} header: {v:?}"))
                })
                .transpose()
        }
        let flag = |name: &str| -> Result<bool, String> {
            Ok(matches!(text(name)?.as_deref(), Some("1" | "true" | "yes")))
        };
        let millis = |name: &str| -> Result<Option<Duration>, String> {
            match number::<u64>(name, text(name)?)?.map(Duration::from_millis) {
                Some(d) if d > MAX_HOOK_DELAY => Err(format!("{name} must be at most 1 day")),
                d => Ok(d),
            }
        };

        let status = number::<u16>("x-mock-status", text("x-mock-status")?)?;
        if let Some(code) = status {
            if !(200..=599).contains(&code) {
                return Err(format!("x-mock-status must be 200..=599, got {code}"));
            }
        }
        let stall_head = match text("x-mock-stall")?.as_deref() {
            None => false,
            Some("head") => true,
            Some(other) => return Err(format!("x-mock-stall must be \"head\", got {other:?}")),
        };
        let framing = match text("x-mock-framing")?.as_deref() {
            None | Some("length") => Framing::Length,
            Some("chunked") => Framing::Chunked,
            Some("close") => Framing::Close,
            Some(other) => {
                return Err(format!(
                    "x-mock-framing must be length, chunked or close, got {other:?}"
                ))
            }
        };
        let garbage = match text("x-mock-garbage")?.as_deref() {
            None => None,
            Some("head") => Some(Garbage::Head),
            Some("chunk") => Some(Garbage::Chunk),
            Some(other) => {
                return Err(format!(
                    "x-mock-garbage must be head or chunk, got {other:?}"
                ))
            }
        };
        Ok(Self {
            garbage,
            echo: flag("x-mock-echo")?,
            status,
            ttft: millis("x-mock-ttft-ms")?.unwrap_or(opts.ttft),
            token_delay: millis("x-mock-token-delay-ms")?.unwrap_or(opts.token_delay),
            burst: opts.burst || flag("x-mock-burst")?,
            tokens: number("x-mock-tokens", text("x-mock-tokens")?)?.unwrap_or(opts.tokens),
            reset_after: number("x-mock-reset-after", text("x-mock-reset-after")?)?,
            stall_head,
            stall_after: number("x-mock-stall-after", text("x-mock-stall-after")?)?,
            close: flag("x-mock-close")?,
            framing,
            chunk_split: flag("x-mock-chunk-split")?,
            keepalive_timeout: millis("x-mock-keepalive-timeout-ms")?,
            idle_close: millis("x-mock-idle-close-ms")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hooks_parse_and_reject() {
        let opts = MockOptions::default();
        let defaults = Hooks::parse(&HeaderMap::new(), &opts).expect("defaults");
        assert_eq!(defaults.tokens, 16);
        assert_eq!(defaults.framing, Framing::Length);

        let mut h = HeaderMap::new();
        h.insert("x-mock-ttft-ms", HeaderValue::from_static("250"));
        h.insert("x-mock-tokens", HeaderValue::from_static("4"));
        h.insert("x-mock-framing", HeaderValue::from_static("Chunked"));
        h.insert("x-mock-stall", HeaderValue::from_static("head"));
        h.insert("x-mock-echo", HeaderValue::from_static("1"));
        h.insert("x-mock-garbage", HeaderValue::from_static("Chunk"));
        let hooks = Hooks::parse(&h, &opts).expect("hooks");
        assert_eq!(hooks.garbage, Some(Garbage::Chunk));
        assert_eq!(hooks.ttft, Duration::from_millis(250));
        assert_eq!(hooks.tokens, 4);
        assert_eq!(hooks.framing, Framing::Chunked);
        assert!(hooks.stall_head && hooks.echo);

        for (name, value) in [
            ("x-mock-status", "99"),
            ("x-mock-status", "abc"),
            ("x-mock-framing", "gzip"),
            ("x-mock-stall", "body"),
            ("x-mock-garbage", "tail"),
            ("x-mock-tokens", "-1"),
            ("x-mock-ttft-ms", "86400001"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static(value));
            assert!(Hooks::parse(&h, &opts).is_err(), "{name}: {value}");
        }
    }
}
