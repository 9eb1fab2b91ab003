//! Token usage read off responses as they stream past, without holding the stream back.
//!
//! `Tap` sits between the upstream body decoder and the client framing: every piece of body data
//! goes through `feed`, which forwards it (via `emit`) and watches it for usage. For SSE it splits
//! events incrementally (an event may span reads, a read may hold many events) and takes usage
//! from any event that carries a non-null one — the last wins, because vLLM, TGI, SGLang and
//! llama.cpp differ in which chunk carries it. When the proxy injected `include_usage` itself, the
//! usage-only event (`"choices": []`) is removed so the client sees the stream it asked for; only
//! then are partial events held until complete. Non-streaming JSON bodies are parsed once at the
//! end. Events without a `"usage"` (or with `"usage": null`) are never JSON-parsed.

use std::sync::OnceLock;

use memchr::memmem::{Finder, FinderRev};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

/// Non-streaming bodies larger than this are relayed but not parsed for usage (an embeddings
/// response of that size is pathological; its usage is then reported as unknown, and logged).
const MAX_JSON_BODY: usize = 8 << 20;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
}

/// What kind of response body the tap is looking at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Nothing to extract (errors, unknown endpoints).
    None,
    /// OpenAI-style JSON with a top-level `usage`.
    OpenAiJson,
    /// OpenAI-style SSE; `strip` removes the usage-only event the proxy asked for.
    OpenAiSse { strip: bool },
    /// TGI `/generate`: `details.generated_tokens` (and the `x-*-tokens` headers).
    TgiJson,
    /// TGI `/generate_stream`: the final event's `details`.
    TgiSse,
}

impl Kind {
    /// The tap may hold back and remove bytes (the usage-only event the proxy asked for), so the
    /// body's length is not known until it ends.
    pub(crate) fn holds_back(self) -> bool {
        matches!(self, Kind::OpenAiSse { strip: true })
    }
}

#[derive(Deserialize)]
struct UsageJson {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default, alias = "input_tokens_details")]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default, alias = "output_tokens_details")]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl From<UsageJson> for Usage {
    fn from(u: UsageJson) -> Usage {
        let prompt = u.prompt_tokens.unwrap_or(0);
        let completion = u.completion_tokens.unwrap_or(0);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            // Counts come from the backend: an absurd one must not overflow (a panic in debug
            // builds, a wrapped total in release).
            total_tokens: u.total_tokens.unwrap_or(prompt.saturating_add(completion)),
            cached_tokens: u.prompt_tokens_details.and_then(|d| d.cached_tokens),
            reasoning_tokens: u.completion_tokens_details.and_then(|d| d.reasoning_tokens),
        }
    }
}

#[derive(Deserialize)]
struct OpenAiChunk {
    #[serde(default)]
    usage: Option<UsageJson>,
    #[serde(default)]
    choices: Option<Vec<IgnoredAny>>,
}

#[derive(Deserialize)]
struct TgiBody {
    #[serde(default)]
    details: Option<TgiDetails>,
}

#[derive(Deserialize)]
struct TgiDetails {
    #[serde(default)]
    generated_tokens: Option<u64>,
    #[serde(default)]
    input_length: Option<u64>,
    #[serde(default)]
    prefill: Option<Vec<IgnoredAny>>,
}

/// Where a tap forwards the bytes that go on to the client.
type Emit<'a> = &'a mut dyn FnMut(&[u8]);

pub struct Tap {
    kind: Kind,
    /// SSE: bytes of an event not yet complete. JSON: the body so far.
    pending: Vec<u8>,
    too_big: bool,
    usage: Option<Usage>,
    /// TGI's `x-prompt-tokens` / `x-generated-tokens` response headers.
    header_prompt: Option<u64>,
    header_completion: Option<u64>,
    /// Number of SSE events seen (for inter-token accounting by the caller).
    events: u64,
    /// Strip mode: the finish chunk, held until the next event shows whether a removed usage
    /// chunk carries fields (llama.cpp's `timings`) that belong on it.
    held: Option<Vec<u8>>,
}

/// What strip mode does with one event.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    /// A chunk with a finish_reason: hold it until the next event.
    HoldFinish,
    /// The usage-only chunk the proxy asked for: remove it, keeping these extra top-level members
    /// (raw `"name":value` text) for the held finish chunk.
    Strip(Vec<u8>),
}

/// Top-level members of an OpenAI chunk that are part of every chunk; anything else on the
/// usage-only chunk (llama.cpp moves `timings` there when usage is requested) is carried over.
const CHUNK_MEMBERS: &[&str] = &[
    "id",
    "object",
    "created",
    "model",
    "system_fingerprint",
    "service_tier",
    "choices",
    "usage",
    "obfuscation",
];

/// `,"name":value` for every non-standard member of `payload`, values as their raw JSON text.
fn extra_fields(payload: &[u8]) -> Vec<u8> {
    type Members<'a> = std::collections::BTreeMap<String, &'a serde_json::value::RawValue>;
    let Ok(members) = serde_json::from_slice::<Members<'_>>(payload) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, value) in members {
        if CHUNK_MEMBERS.contains(&name.as_str()) {
            continue;
        }
        out.push(b',');
        if let Ok(key) = serde_json::to_vec(&name) {
            out.extend_from_slice(&key);
        }
        out.push(b':');
        out.extend_from_slice(value.get().as_bytes());
    }
    out
}

/// Inserts `extra` (`,"name":value...`) before the closing brace of the event's JSON object.
fn append_members(event: &[u8], extra: &[u8]) -> Vec<u8> {
    match event.iter().rposition(|b| *b == b'}') {
        Some(close) => {
            let mut out = Vec::with_capacity(event.len() + extra.len());
            out.extend_from_slice(&event[..close]);
            out.extend_from_slice(extra);
            out.extend_from_slice(&event[close..]);
            out
        }
        None => event.to_vec(),
    }
}

impl Tap {
    pub fn new(kind: Kind) -> Tap {
        Tap {
            kind,
            pending: Vec::new(),
            too_big: false,
            usage: None,
            header_prompt: None,
            header_completion: None,
            events: 0,
            held: None,
        }
    }

    /// TGI reports token counts in response headers; they complete what the body says.
    pub(crate) fn set_header_counts(&mut self, prompt: Option<u64>, completion: Option<u64>) {
        self.header_prompt = prompt;
        self.header_completion = completion;
    }

    /// Whether this tap may hold bytes back (only when it removes events).
    pub(crate) fn holds_back(&self) -> bool {
        self.kind.holds_back()
    }

    pub fn events(&self) -> u64 {
        self.events
    }

    /// Forwards `data` through `emit` (possibly minus a removed event) and watches it for usage.
    pub fn feed(&mut self, data: &[u8], emit: &mut dyn FnMut(&[u8])) {
        match self.kind {
            Kind::None => emit(data),
            Kind::OpenAiJson | Kind::TgiJson => {
                emit(data);
                if !self.too_big {
                    if self.pending.len() + data.len() > MAX_JSON_BODY {
                        self.too_big = true;
                        self.pending = Vec::new();
                    } else {
                        self.pending.extend_from_slice(data);
                    }
                }
            }
            Kind::OpenAiSse { strip: true } => self.scan(data, Some(emit)),
            Kind::OpenAiSse { strip: false } | Kind::TgiSse => {
                emit(data);
                self.scan(data, None);
            }
        }
    }

    /// End of body: flushes anything held back and parses a JSON body.
    pub fn finish(&mut self, emit: &mut dyn FnMut(&[u8])) {
        match self.kind {
            Kind::OpenAiJson | Kind::TgiJson => {
                if self.too_big {
                    log::warn!("response body over {MAX_JSON_BODY} bytes: usage not extracted");
                } else {
                    let body = std::mem::take(&mut self.pending);
                    self.parse_json_body(&body);
                }
            }
            Kind::OpenAiSse { .. } | Kind::TgiSse => {
                // A final event without its blank line still counts (some servers end that way).
                let rest = std::mem::take(&mut self.pending);
                if !rest.is_empty() {
                    let verdict = self.on_event(&rest);
                    if self.holds_back() {
                        self.route(&rest, verdict, emit);
                    }
                }
                if let Some(held) = self.held.take() {
                    emit(&held);
                }
            }
            Kind::None => {}
        }
    }

    /// Usage as known now (the final answer once the body ended).
    pub fn usage(&self) -> Option<Usage> {
        let mut u = self.usage;
        if self.header_prompt.is_some() || self.header_completion.is_some() {
            let base = u.unwrap_or_default();
            let prompt = self.header_prompt.unwrap_or(base.prompt_tokens);
            let completion = self.header_completion.unwrap_or(base.completion_tokens);
            u = Some(Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                total_tokens: prompt.saturating_add(completion),
                ..base
            });
        }
        u
    }

    /// Splits complete events out of `pending + data`; with `emit`, forwards all but removed
    /// events and keeps the incomplete tail; without, only watches.
    fn scan(&mut self, data: &[u8], mut emit: Option<Emit<'_>>) {
        // The pending buffer is taken out while events are looked at (they need `&mut self`) and
        // put back with its allocation, so steady streaming allocates nothing.
        let mut pending = std::mem::take(&mut self.pending);
        let joined = !pending.is_empty();
        if joined {
            pending.extend_from_slice(data);
        }
        let buf: &[u8] = if joined { &pending } else { data };
        let mut start = 0;
        let mut run_start = 0;
        while let Some(end) = event_end(buf, start) {
            let verdict = self.on_event(&buf[start..end]);
            if let Some(emit) = emit.as_deref_mut() {
                // Strip mode: everything before this event goes out first, in order.
                if verdict != Verdict::Pass || self.held.is_some() {
                    if run_start < start {
                        emit(&buf[run_start..start]);
                    }
                    run_start = end;
                    self.route(&buf[start..end], verdict, emit);
                }
            }
            start = end;
        }
        if let Some(emit) = emit {
            if run_start < start {
                emit(&buf[run_start..start]);
            }
        }
        if joined {
            pending.drain(..start);
        } else {
            pending.extend_from_slice(&data[start..]);
        }
        self.pending = pending;
    }

    /// Looks at one complete event and says what happens to it in strip mode.
    fn on_event(&mut self, event: &[u8]) -> Verdict {
        self.events += 1;
        // The usual event is one `data:` line: take it without walking the event line by line
        // (that walk was a quarter of a streamed request's CPU).
        if let Some(rest) = event.strip_prefix(b"data:") {
            if let Some(nl) = memchr::memchr(b'\n', rest) {
                if rest[nl..].iter().all(|b| matches!(b, b'\n' | b'\r')) {
                    let line = &rest[..nl];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    let payload = line.strip_prefix(b" ").unwrap_or(line);
                    return self.on_payload(payload);
                }
            }
        }
        let mut data_lines = event
            .split(|b| *b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter_map(|l| l.strip_prefix(b"data:"))
            .map(|l| l.strip_prefix(b" ").unwrap_or(l));
        let Some(first) = data_lines.next() else {
            return Verdict::Pass;
        };
        let joined;
        let payload: &[u8] = match data_lines.next() {
            None => first,
            Some(second) => {
                let mut v = first.to_vec();
                v.push(b'\n');
                v.extend_from_slice(second);
                for more in data_lines {
                    v.push(b'\n');
                    v.extend_from_slice(more);
                }
                joined = v;
                &joined
            }
        };
        self.on_payload(payload)
    }

    /// Looks at the data of one event (its `data:` lines joined).
    fn on_payload(&mut self, payload: &[u8]) -> Verdict {
        match self.kind {
            Kind::OpenAiSse { strip } => {
                if !has_non_null(payload, b"\"usage\"") {
                    if strip && has_non_null(payload, b"\"finish_reason\"") {
                        return Verdict::HoldFinish;
                    }
                    return Verdict::Pass;
                }
                let Ok(chunk) = serde_json::from_slice::<OpenAiChunk>(payload) else {
                    return Verdict::Pass;
                };
                let usage_only = chunk.choices.as_ref().is_some_and(Vec::is_empty);
                match chunk.usage {
                    Some(u) => {
                        self.usage = Some(u.into());
                        if strip && usage_only {
                            Verdict::Strip(extra_fields(payload))
                        } else {
                            Verdict::Pass
                        }
                    }
                    None => Verdict::Pass,
                }
            }
            Kind::TgiSse => {
                if has_non_null(payload, b"\"details\"") {
                    if let Ok(body) = serde_json::from_slice::<TgiBody>(payload) {
                        self.take_tgi(body);
                    }
                }
                Verdict::Pass
            }
            _ => Verdict::Pass,
        }
    }

    /// Strip mode: sends an event on, holds it, or removes it.
    fn route(&mut self, event: &[u8], verdict: Verdict, emit: &mut dyn FnMut(&[u8])) {
        match verdict {
            Verdict::Strip(extra) => {
                if let Some(held) = self.held.take() {
                    if extra.is_empty() {
                        emit(&held);
                    } else {
                        emit(&append_members(&held, &extra));
                    }
                }
            }
            Verdict::HoldFinish => {
                if let Some(prev) = self.held.take() {
                    emit(&prev);
                }
                self.held = Some(event.to_vec());
            }
            Verdict::Pass => {
                if let Some(prev) = self.held.take() {
                    emit(&prev);
                }
                emit(event);
            }
        }
    }

    fn parse_json_body(&mut self, body: &[u8]) {
        match self.kind {
            Kind::OpenAiJson => {
                // Only the `usage` object is deserialised: a full parse of the response (every
                // choice's text validated and skipped) was a tenth of a request's CPU.
                if let Some(u) = top_level::<Option<UsageJson>>(body, b"usage").flatten() {
                    self.usage = Some(u.into());
                }
            }
            Kind::TgiJson => {
                // TGI answers a list when given a list of inputs; take the first object's view.
                if let Ok(body) = serde_json::from_slice::<TgiBody>(body) {
                    self.take_tgi(body);
                } else if let Ok(mut list) = serde_json::from_slice::<Vec<TgiBody>>(body) {
                    if !list.is_empty() {
                        let first = list.swap_remove(0);
                        self.take_tgi(first);
                    }
                }
            }
            _ => {}
        }
    }

    fn take_tgi(&mut self, body: TgiBody) {
        if let Some(d) = body.details {
            let prompt = d
                .input_length
                .or_else(|| d.prefill.map(|p| p.len() as u64))
                .unwrap_or(0);
            let completion = d.generated_tokens.unwrap_or(0);
            self.usage = Some(Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                total_tokens: prompt.saturating_add(completion),
                cached_tokens: None,
                reasoning_tokens: None,
            });
        }
    }
}

/// Index just past the blank line that ends the event starting at `from`, if complete.
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(p) = memchr::memchr(b'\n', &buf[i..]) {
        let nl = i + p;
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            Some(_) => i = nl + 1,
            None => return None,
        }
    }
    None
}

/// The value of `key` in the top-level JSON object of `body`, deserialised alone.
///
/// Servers put `usage` last or nearly so, so the last `"usage":` is tried first: it is the
/// top-level key exactly when, after its value, the first brace that closes more than it opens
/// is the body's final byte. Anything else (a nested `usage` later in the body, odd layouts) falls
/// back to a structural scan from the start.
pub(crate) fn top_level<T: serde::de::DeserializeOwned>(body: &[u8], key: &[u8]) -> Option<T> {
    let parse_at = |at: usize| -> Option<(T, usize)> {
        let mut values = serde_json::Deserializer::from_slice(&body[at..]).into_iter::<T>();
        let v = values.next()?.ok()?;
        Some((v, at + values.byte_offset()))
    };
    if let Some(at) = last_key_value(body, key) {
        if let Some((v, end)) = parse_at(at) {
            if closes_object_last(body, end) {
                return Some(v);
            }
        }
    }
    parse_at(top_level_value(body, key)?).map(|(v, _)| v)
}

/// Just past the colon of the last `"key":` in `body`.
fn last_key_value(body: &[u8], key: &[u8]) -> Option<usize> {
    // The searcher for the one key asked on every response is built once.
    static USAGE: OnceLock<FinderRev<'static>> = OnceLock::new();
    let owned;
    let finder = if key == b"usage" {
        USAGE.get_or_init(|| FinderRev::new(b"\"usage\""))
    } else {
        let mut quoted = Vec::with_capacity(key.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(key);
        quoted.push(b'"');
        owned = FinderRev::new(&quoted).into_owned();
        &owned
    };
    let quoted_len = key.len() + 2;
    let mut end = body.len();
    while let Some(at) = finder.rfind(&body[..end]) {
        let rest = body[at + quoted_len..].trim_ascii_start();
        if rest.first() == Some(&b':') {
            return Some(body.len() - rest.len() + 1);
        }
        end = at;
    }
    None
}

/// True when, scanning `body` from `from` (outside any string), the first `}` that closes an
/// object opened before `from` is the last non-blank byte of `body`.
fn closes_object_last(body: &[u8], from: usize) -> bool {
    let mut depth = 0usize;
    let mut i = from;
    while i < body.len() {
        match body[i] {
            b'"' => match string_end(body, i + 1) {
                Some(end) => i = end,
                None => return false,
            },
            b'{' => depth += 1,
            b'}' if depth == 0 => return body[i + 1..].trim_ascii().is_empty(),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    false
}

/// Where the value of `key` in the top-level JSON object starts (just after its colon), found by
/// a structural scan: strings are skipped (so a quoted `"usage":` inside a message is never taken
/// for the key) and only keys at brace depth 1 count. Arrays need no tracking: an object key
/// inside an array sits at brace depth 2 or more. Returns `None` for anything that is not a JSON
/// object or has no such key; the value itself is checked by whoever deserialises it.
pub(crate) fn top_level_value(body: &[u8], key: &[u8]) -> Option<usize> {
    if body.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(off) = memchr::memchr3(b'"', b'{', b'}', &body[i..]) {
        let at = i + off;
        match body[at] {
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return None;
                }
            }
            _ => {
                let end = string_end(body, at + 1)?;
                let after = end + 1;
                let rest = body[after..].trim_ascii_start();
                let is_key = rest.first() == Some(&b':');
                if depth == 1 && is_key && &body[at + 1..end] == key {
                    return Some(body.len() - rest.len() + 1);
                }
                i = after;
                continue;
            }
        }
        i = at + 1;
    }
    None
}

/// Index of the quote closing the JSON string whose contents start at `from`.
fn string_end(body: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let off = memchr::memchr2(b'"', b'\\', &body[from..])?;
        let at = from + off;
        if body[at] == b'"' {
            return Some(at);
        }
        from = at + 2;
        if from > body.len() {
            return None;
        }
    }
}

/// True when `key` occurs followed by a value other than `null` — the cheap test that spares
/// a JSON parse for the ordinary token chunk (`"usage": null` on vLLM/OpenAI chunks).
fn has_non_null(payload: &[u8], key: &[u8]) -> bool {
    // Searchers are built once: constructing one per event cost more than the search itself.
    static USAGE: OnceLock<Finder<'static>> = OnceLock::new();
    static DETAILS: OnceLock<Finder<'static>> = OnceLock::new();
    static FINISH: OnceLock<Finder<'static>> = OnceLock::new();
    let finder = match key {
        b"\"usage\"" => USAGE.get_or_init(|| Finder::new(b"\"usage\"")),
        b"\"details\"" => DETAILS.get_or_init(|| Finder::new(b"\"details\"")),
        b"\"finish_reason\"" => FINISH.get_or_init(|| Finder::new(b"\"finish_reason\"")),
        // Every key the tap asks about is listed above; an unknown one is never "present".
        _ => return false,
    };
    // `find` in a loop rather than `find_iter`: the iterator copies the searcher on creation,
    // which on a 200-byte chunk costs as much as the search.
    let mut from = 0;
    while let Some(pos) = finder.find(&payload[from..]) {
        from += pos + key.len();
        let rest = payload[from..].trim_ascii_start();
        if let Some(value) = rest.strip_prefix(b":") {
            if !value.trim_ascii_start().starts_with(b"null") {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests;
