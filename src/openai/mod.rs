//! What the proxy needs to know about OpenAI-style (and TGI) requests: the `model` that routes
//! them (and where it sits in the body), whether they stream, whether the client asked for
//! streamed usage, who the caller is, and the affinity keys (`user`, the first messages); the
//! rewrites it makes — adding `stream_options.include_usage` so a backend reports usage for a
//! stream whose client did not ask for it, and renaming the model for a pool's alias or fallback;
//! and how engines word a context-length error. The body is scanned once and never
//! re-serialised, except to add `include_usage` to an existing `stream_options` (rare).

pub mod tap;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::error::ProxyError;
use crate::hash::{block_chain, hash_bytes};
use crate::openai::tap::{top_level_value, Kind};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    pub model: Option<String>,
    pub stream: bool,
    /// `stream_options.include_usage` was present (true or false) / was true.
    pub has_stream_options: bool,
    pub include_usage: bool,
    /// `stream_options.continuous_usage_stats` was true (running usage in every chunk).
    pub continuous_usage: bool,
    /// The body's user field (as configured by `usage.identity.user_body_field`).
    pub user: Option<String>,
    /// Byte range of the `model` string token (quotes included) in the body, for a rewrite.
    pub model_span: Option<(usize, usize)>,
    /// Affinity keys: a hash of the body's top-level `user`, and of the conversation's start
    /// (the first `prefix` messages, or the start of `prompt`) when asked for.
    pub user_key: Option<u64>,
    pub prefix_key: Option<u64>,
    /// `prefix_cache`'s block chain (`hash::block_chain`) of the prompt as the engine will see
    /// it: the chat messages in order (first to last, raw JSON) or the completion `prompt`.
    /// Empty unless asked for. Boxed: it lives in every connection's future.
    pub blocks: Box<[u64]>,
}

/// How `inspect_with` cuts a prompt into blocks for `prefix_cache`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Blocks {
    pub(crate) bytes: usize,
    pub(crate) max: usize,
}

/// How much of each message (or of a completions `prompt`) the prefix key hashes: bounds the
/// work per request when system prompts are huge (their length is mixed in as well).
const PREFIX_HASH_BYTES: usize = 4096;
/// Most messages a prefix key may cover.
pub(crate) const MAX_PREFIX_MESSAGES: usize = 4;

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<FirstMessages<'a>>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    /// Outer `Some` whenever the key is present, `null` included: splicing a second
    /// `stream_options` next to a client's `null` would leave a duplicate key that the backend's
    /// parser (last one wins) reads as `null`, and the stream would carry no usage.
    #[serde(default, deserialize_with = "present")]
    stream_options: Option<Option<StreamOptions>>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
}

/// The raw text of the first few elements of `messages`, captured while the body is scanned
/// anyway (no allocation, no second parse). Anything that is not an array captures nothing;
/// validating messages is the backend's business.
#[derive(Default)]
struct FirstMessages<'a>(
    [Option<&'a RawValue>; MAX_PREFIX_MESSAGES],
    /// The last message: with the first it spans the whole conversation.
    Option<&'a RawValue>,
);

impl<'de: 'a, 'a> Deserialize<'de> for FirstMessages<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = FirstMessages<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = FirstMessages::default();
                for slot in out.0.iter_mut() {
                    match seq.next_element::<&'de RawValue>()? {
                        Some(m) => {
                            *slot = Some(m);
                            out.1 = Some(m);
                        }
                        None => return Ok(out),
                    }
                }
                // Borrowed raw text: no allocation, only the position is kept.
                while let Some(m) = seq.next_element::<&'de RawValue>()? {
                    out.1 = Some(m);
                }
                Ok(out)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(FirstMessages::default())
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(FirstMessages::default())
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(FirstMessages::default())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(FirstMessages::default())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(FirstMessages::default())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(FirstMessages::default())
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
    #[serde(default)]
    continuous_usage_stats: Option<bool>,
}

fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Routes whose bodies must be JSON objects (and whose requests produce usage events).
pub(crate) fn is_json_route(method: &str, path: &str) -> bool {
    method.eq_ignore_ascii_case("POST")
        && (path.starts_with("/v1/") || path == "/generate" || path == "/generate_stream")
}

/// Reads what routing and metering need from a JSON body. An empty body has nothing; a body
/// that is not a JSON object (or has a non-string `model`) is the client's error.
pub fn inspect(
    method: &str,
    path: &str,
    body: &[u8],
    user_field: &str,
) -> Result<RequestInfo, ProxyError> {
    inspect_with(method, path, body, user_field, 0, None)
}

/// `inspect`, also hashing the first `prefix_messages` messages (0: none) into `prefix_key`.
pub(crate) fn inspect_with(
    method: &str,
    path: &str,
    body: &[u8],
    user_field: &str,
    prefix_messages: usize,
    blocks: Option<Blocks>,
) -> Result<RequestInfo, ProxyError> {
    if !is_json_route(method, path) {
        return Ok(RequestInfo {
            stream: path == "/generate_stream",
            ..RequestInfo::default()
        });
    }
    // Validated up front: the parser does not check the strings it skips, and a JSON route's
    // body must be JSON text (UTF-8) as a whole, not just in the members routing reads.
    if body.is_empty() {
        return Err(ProxyError::BadRequest(
            "request body must be a JSON object (it is empty)".into(),
        ));
    }
    let text = std::str::from_utf8(body)
        .map_err(|e| ProxyError::BadRequest(format!("request body is not valid UTF-8: {e}")))?;
    // A derived struct also accepts a JSON array (fields by position): `["m", true]` is not a
    // request body.
    if !text.trim_start().starts_with('{') {
        return Err(ProxyError::BadRequest(
            "request body must be a JSON object".into(),
        ));
    }
    let peek: Peek = serde_json::from_str(text).map_err(|e| {
        ProxyError::BadRequest(format!("request body is not a valid JSON object: {e}"))
    })?;
    let (model, model_span) = match peek.model {
        Some(raw) => {
            // A string token the parser already checked: without escapes its text is its value.
            let plain = raw
                .get()
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .filter(|t| !t.contains('\\'));
            let name: String = match plain {
                Some(t) => t.to_owned(),
                None => serde_json::from_str(raw.get()).map_err(|_| {
                    ProxyError::BadRequest(format!("model must be a string, got {}", raw.get()))
                })?,
            };
            // `raw` borrows from `body`: its offset is the token's position.
            let start = (raw.get().as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
            let span =
                (start + raw.get().len() <= body.len()).then_some((start, start + raw.get().len()));
            (Some(name), span)
        }
        None => (None, None),
    };
    let prefix_key = match (prefix_messages, &peek.messages, peek.prompt) {
        (0, _, _) => None,
        (n, Some(first), _) if first.0[0].is_some() => {
            let mut h = 0u64;
            for m in first.0.iter().take(n.min(MAX_PREFIX_MESSAGES)).flatten() {
                h = prefix_hash(m.get().as_bytes()) ^ h.rotate_left(17);
            }
            Some(h)
        }
        (_, _, Some(prompt)) => {
            let text = prompt.get().as_bytes();
            // A growing prompt keeps its start: no length mixed in here.
            Some(hash_bytes(&text[..text.len().min(PREFIX_HASH_BYTES)]))
        }
        _ => None,
    };
    // Raw values borrow from `body`: their pointers give their positions.
    let offset =
        |raw: &RawValue| (raw.get().as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
    let prompt_span = match (&peek.messages, peek.prompt) {
        (Some(FirstMessages([Some(first), ..], Some(last))), _) => {
            Some((offset(first), offset(last) + last.get().len()))
        }
        (_, Some(prompt)) => Some((offset(prompt), offset(prompt) + prompt.get().len())),
        _ => None,
    }
    .filter(|&(a, b)| a <= b && b <= body.len());
    let blocks = match (blocks, prompt_span) {
        (Some(cut), Some((a, b))) => {
            let mut chain = Vec::new();
            block_chain(&body[a..b], cut.bytes, cut.max, &mut chain);
            chain.into_boxed_slice()
        }
        _ => Box::default(),
    };
    let user_key = peek.user.as_deref().map(|u| hash_bytes(u.as_bytes()));
    let user = match user_field {
        "" => None,
        "user" => peek.user.map(Cow::into_owned),
        // A non-standard field: a second, rarer parse.
        other => serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
            .ok()
            .and_then(|m| m.get(other).and_then(|v| v.as_str()).map(str::to_owned)),
    };
    Ok(RequestInfo {
        model,
        model_span,
        user_key,
        prefix_key,
        blocks,
        stream: peek.stream.unwrap_or(false) || path == "/generate_stream",
        has_stream_options: peek.stream_options.is_some(),
        include_usage: peek
            .stream_options
            .as_ref()
            .and_then(|o| o.as_ref())
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        continuous_usage: peek
            .stream_options
            .flatten()
            .and_then(|o| o.continuous_usage_stats)
            .unwrap_or(false),
        user,
    })
}

/// One message's contribution to the prefix key.
fn prefix_hash(text: &[u8]) -> u64 {
    hash_bytes(&text[..text.len().min(PREFIX_HASH_BYTES)]) ^ text.len() as u64
}

/// Endpoints whose streams can be asked for usage with `stream_options`.
fn takes_stream_options(path: &str) -> bool {
    path == "/v1/chat/completions" || path == "/v1/completions"
}

/// The member the proxy adds to ask for running usage; engines that do not know it ignore it
/// (vLLM and SGLang then put the cumulative usage in every chunk), a few reject it.
pub const RUNNING_USAGE: &str = "continuous_usage_stats";

/// The body to send upstream when the proxy must ask for streamed usage itself —
/// `stream_options: {include_usage: true, continuous_usage_stats: true}`, so that the final
/// usage arrives and, on engines that support it, every chunk carries the usage so far (an
/// aborted stream is then billed what was generated) — or `None` when the client's body goes
/// upstream unchanged (not a stream, or the client asked for both itself).
pub fn inject_include_usage(path: &str, body: &[u8], info: &RequestInfo) -> Option<Vec<u8>> {
    if !info.stream || (info.include_usage && info.continuous_usage) || !takes_stream_options(path)
    {
        return None;
    }
    if !info.has_stream_options {
        // Common case: splice the member in after the opening brace; the body is known to be
        // a JSON object with at least `stream`, so a comma always follows correctly.
        let open = body.iter().position(|b| *b == b'{')?;
        let mut out = Vec::with_capacity(body.len() + 72);
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(
            br#""stream_options":{"include_usage":true,"continuous_usage_stats":true},"#,
        );
        out.extend_from_slice(&body[open + 1..]);
        return Some(out);
    }
    // stream_options present without both set — rewrite that object (rare). Members are carried
    // over as their raw text: a round trip through `Value` would turn an integer beyond u64 into
    // an f64 and change what the client sent (found by fuzzing).
    let mut top: BTreeMap<String, &RawValue> = serde_json::from_slice(body).ok()?;
    let mut opts: BTreeMap<String, &RawValue> = top
        .get("stream_options")
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
        .unwrap_or_default();
    let yes = RawValue::from_string("true".to_owned()).ok()?;
    opts.insert("include_usage".to_owned(), &yes);
    opts.insert(RUNNING_USAGE.to_owned(), &yes);
    let opts = serde_json::value::to_raw_value(&opts).ok()?;
    top.insert("stream_options".to_owned(), &opts);
    serde_json::to_vec(&top).ok()
}

/// What the client did not ask for and the tap must remove: (the usage-only chunk, the running
/// usage of every other chunk). vLLM sends running usage only with `include_usage` too.
pub(crate) fn usage_to_strip(info: &RequestInfo) -> (bool, bool) {
    (
        !info.include_usage,
        !(info.include_usage && info.continuous_usage),
    )
}

/// `body` (as `inject_include_usage` made it) without the `continuous_usage_stats` member it
/// added, for a backend that rejects it. `None` when there is no such member.
pub fn without_running_usage(body: &[u8]) -> Option<Vec<u8>> {
    const KEY: &[u8] = br#""continuous_usage_stats""#;
    // The member of the top-level `stream_options` object, not a key of the same name nested
    // anywhere (inside it or elsewhere); the proxy wrote it as `"continuous_usage_stats":true`.
    let opts = top_level_value(body, b"stream_options")?;
    let opts = opts + body[opts..].iter().position(|b| !b.is_ascii_whitespace())?;
    let value = opts + top_level_value(&body[opts..], b"continuous_usage_stats")?;
    let at = memchr::memmem::rfind(&body[..value], KEY)?;
    if !body[value..].starts_with(b"true") {
        return None;
    }
    let mut from = at;
    let mut to = value + 4;
    if body.get(to) == Some(&b',') {
        to += 1;
    } else if from > 0 && body[from - 1] == b',' {
        from -= 1;
    }
    let mut out = Vec::with_capacity(body.len());
    out.extend_from_slice(&body[..from]);
    out.extend_from_slice(&body[to..]);
    Some(out)
}

/// llama.cpp's request member for `timings` on every streamed chunk (it sends them on the last
/// one only otherwise).
pub(crate) const PER_TOKEN_TIMINGS: &str = "timings_per_token";

/// `body` with `"timings_per_token":true` added as its first member, for a llama.cpp server whose
/// streams otherwise report their counts only at the end. `None` when the body already has the
/// member (the client asked itself: nothing to remove then) or is not a JSON object.
pub(crate) fn with_per_token_timings(body: &[u8]) -> Option<Vec<u8>> {
    with_first_member(body, PER_TOKEN_TIMINGS, "true")
}

/// `body` with `"key":value` added as the object's first member; `None` when the body already
/// has a top-level `key` or is not a JSON object. `value` is JSON text.
fn with_first_member(body: &[u8], key: &str, value: &str) -> Option<Vec<u8>> {
    if top_level_value(body, key.as_bytes()).is_some() {
        return None;
    }
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let rest = &body[open + 1..];
    let empty = rest.trim_ascii_start().starts_with(b"}");
    let mut out = Vec::with_capacity(body.len() + key.len() + value.len() + 4);
    out.extend_from_slice(&body[..=open]);
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    out.extend_from_slice(value.as_bytes());
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Some(out)
}

/// llama.cpp's request member naming the slot that must serve it; a task pinned to a busy slot
/// waits in the server until that slot frees (and is the first to take it).
pub(crate) const ID_SLOT: &str = "id_slot";

/// `body` with `"id_slot":K` added as its first member, pinning the request to engine slot `slot`
/// (`prefix_cache` on a backend with `slots`). `None` when the body is not a JSON object or
/// already names a slot (the client's own pin is kept; the proxy's picture of that slot may then
/// be wrong until it is next pinned).
pub(crate) fn with_id_slot(body: &[u8], slot: usize) -> Option<Vec<u8>> {
    with_first_member(body, ID_SLOT, &slot.to_string())
}

/// Whether a 4xx body says the backend does not accept `continuous_usage_stats`.
pub(crate) fn rejects_running_usage(status: u16, body: &[u8]) -> bool {
    matches!(status, 400 | 422) && memchr::memmem::find(body, RUNNING_USAGE.as_bytes()).is_some()
}

/// `body` with the `model` token at `span` replaced by `model` (JSON-escaped): a splice, the
/// rest of the body stays byte for byte what the client sent.
pub(crate) fn rewrite_model(body: &[u8], span: (usize, usize), model: &str) -> Option<Vec<u8>> {
    let (a, b) = span;
    if a > b || b > body.len() {
        return None;
    }
    let name = serde_json::to_string(model).ok()?;
    let mut out = Vec::with_capacity(body.len() + name.len());
    out.extend_from_slice(&body[..a]);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&body[b..]);
    Some(out)
}

/// Statuses under which engines report a prompt longer than their context.
pub(crate) fn may_be_context_error(status: u16) -> bool {
    matches!(status, 400 | 413 | 422)
}

/// Whether an error body says the prompt (plus completion) exceeds the model's context: vLLM
/// ("maximum context length is N tokens"), SGLang, TGI (422 "`inputs` tokens + `max_new_tokens`
/// must be <= N", "must have less than N tokens"), llama.cpp (`exceed_context_size_error`),
/// OpenAI (`context_length_exceeded`).
pub(crate) fn is_context_length_error(body: &[u8]) -> bool {
    const MARKERS: &[&[u8]] = &[
        b"context_length_exceeded",
        b"exceed_context_size",
        b"exceeds the available context size",
        b"maximum context length",
        b"context length",
        b"maximum model length",
        b"`max_new_tokens` must be <=",
        b"must have less than",
    ];
    let lower = body.to_ascii_lowercase();
    MARKERS
        .iter()
        .any(|m| memchr::memmem::find(&lower, &m.to_ascii_lowercase()).is_some())
}

/// How to read usage off a response.
/// `strip`: what of the usage the tap removes (see `usage_to_strip`), `(false, false)` when the
/// proxy asked for nothing.
pub(crate) fn response_kind(
    path: &str,
    status: u16,
    event_stream: bool,
    strip: (bool, bool),
    timings: bool,
) -> Kind {
    if !(200..300).contains(&status) {
        return Kind::None;
    }
    match path {
        "/generate" => Kind::TgiJson,
        "/generate_stream" => Kind::TgiSse,
        p if p.starts_with("/v1/") && event_stream => Kind::OpenAiSse {
            strip: strip.0,
            running: strip.1,
            timings,
        },
        p if p.starts_with("/v1/") => Kind::OpenAiJson,
        _ => Kind::None,
    }
}

#[cfg(test)]
mod tests;
