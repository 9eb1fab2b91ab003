//! Token usage read off responses as they stream past, without holding the stream back.
//!
//! `Tap` sits between the upstream body decoder and the client framing: every piece of body data
//! goes through `feed`, which forwards it (via `emit`) and watches it for usage. For SSE it splits
//! events incrementally (an event may span reads, a read may hold many events; the search for an
//! event's end resumes where the last read left it, so the work is linear in the body) and takes
//! usage from any event that carries a non-null one — the last wins, because vLLM, TGI, SGLang
//! and llama.cpp differ in which chunk carries it, and because with running usage
//! (`continuous_usage_stats`) every chunk carries the cumulative count, so an aborted stream is
//! billed what the backend produced up to its last chunk. llama.cpp's `timings` (on every chunk)
//! stand in when no usage came; failing both, the content deltas relayed are counted.
//!
//! When the proxy asked for usage the client did not ask for, the tap removes it so the client
//! sees the stream it would have seen without the proxy: the usage-only event (`"choices": []`),
//! and the running `usage` member of every other chunk. Only then are partial events held until
//! complete, and never more than `max_event` bytes of one event: past that bound the event's
//! bytes go on to the client uninspected (a backend that never ends an event cannot make the
//! proxy buffer without bound or spend a core rescanning it). Events without a `"usage"` (or with
//! `"usage": null`) are never JSON-parsed, and a running usage is kept as raw text and parsed
//! only when asked for (once, when the request is accounted).
//!
//! Non-streaming JSON bodies are kept up to `MAX_JSON_BODY` and parsed once at the end; a larger
//! body is scanned structurally as it passes (`JsonScan`, linear, holding only the value of the
//! one top-level member it looks for), so the usage of an answer of any size is found.

/// Non-streaming bodies up to this size are kept and parsed once at the end (the fast path);
/// larger ones are scanned as they pass.
const MAX_JSON_BODY: usize = 8 << 20;

pub use crate::config::DEFAULT_MAX_EVENT_BYTES as DEFAULT_MAX_EVENT;

/// Most bytes of the one JSON value a `JsonScan` captures (a `usage` object is under 1 KiB).
const MAX_CAPTURE: usize = 64 * 1024;

/// What kind of response body the tap is looking at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Nothing to extract (errors, unknown endpoints).
    None,
    /// OpenAI-style JSON with a top-level `usage`.
    OpenAiJson,
    /// OpenAI-style SSE. `strip`: remove the usage-only event (the client did not ask for
    /// `include_usage`); `running`: remove the running `usage` of the other chunks (the client did
    /// not ask for `continuous_usage_stats`) — as `"usage":null` when the client asked for
    /// `include_usage` (OpenAI's shape for it), else by removing the member; `timings`: remove
    /// llama.cpp's `timings` from the chunks it only puts them on because the proxy asked for
    /// `timings_per_token` (every chunk but the finish and usage-only ones).
    OpenAiSse {
        strip: bool,
        running: bool,
        timings: bool,
    },
    /// TGI `/generate`: `details.generated_tokens` (and the `x-*-tokens` headers).
    TgiJson,
    /// TGI `/generate_stream`: one token per event, the final event's `details`.
    TgiSse,
}

impl Kind {
    /// The tap may hold back and change bytes, so the body's length is not known until it ends.
    pub(crate) fn holds_back(self) -> bool {
        matches!(self, Kind::OpenAiSse { strip, running, timings } if strip || running || timings)
    }
}

/// Where a tap forwards the bytes that go on to the client: a closure, or the relay's framing
/// writer (which frames what one read brings as one chunk, so an edited event's pieces need no
/// copy joining them).
pub trait Sink {
    fn put(&mut self, data: &[u8]);
}

impl<F: FnMut(&[u8])> Sink for F {
    fn put(&mut self, data: &[u8]) {
        self(data)
    }
}

type Emit<'a> = &'a mut dyn Sink;

pub struct Tap {
    kind: Kind,
    /// Most bytes of one SSE event held for inspection.
    max_event: usize,
    /// SSE: bytes of an event not yet complete. JSON: the body so far (up to `MAX_JSON_BODY`).
    pending: Vec<u8>,
    /// SSE: where the search for the pending event's end resumes (what was searched already,
    /// less the two bytes a blank line may start with).
    searched: usize,
    /// SSE: inside an event longer than `max_event`, whose bytes pass uninspected until it ends;
    /// its last bytes (an event's end may straddle reads).
    oversized: Option<Vec<u8>>,
    oversized_events: u64,
    /// JSON bodies over `MAX_JSON_BODY`: scanned as they pass.
    json_scan: Option<Box<JsonScan>>,
    /// Final figures from a JSON body or TGI's `details`.
    usage: Option<Usage>,
    /// OpenAI SSE: the raw JSON of the last non-null `usage` seen (parsed when asked for).
    last_usage: Vec<u8>,
    /// llama.cpp: the raw JSON of the last `timings` seen.
    last_timings: Vec<u8>,
    /// `timings` came on a chunk that neither finishes nor is the usage-only one (llama.cpp
    /// asked for `timings_per_token`, or a server that always sends them).
    timings_midway: bool,
    /// `timings` came on the finish or the usage-only chunk.
    timings_at_end: bool,
    /// A chunk with choices carried a usage before its finish chunk: the engine sends running
    /// usage (so a finish chunk's usage is running usage too, not one it always sends).
    running_seen: bool,
    /// Content deltas (OpenAI) or token events (TGI) relayed.
    counted: u64,
    /// TGI's `x-prompt-tokens` / `x-generated-tokens` response headers.
    header_prompt: Option<u64>,
    header_completion: Option<u64>,
    /// Number of SSE events seen (for inter-token accounting by the caller).
    events: u64,
    /// Strip mode: the finish chunk, held until the next event shows whether a removed usage
    /// chunk carries fields (llama.cpp's `timings`) that belong on it.
    held: Option<Vec<u8>>,
    /// The current event's running usage to remove: its byte range in the event, and whether
    /// `null` takes its place.
    edit: Option<Edit>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Edit {
    from: usize,
    to: usize,
    null: bool,
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

/// `,"name":value` for every non-standard member of `payload`, values as their raw JSON text,
/// in the order they came (nothing for a payload that is not one well-formed object).
fn extra_fields(payload: &[u8]) -> Vec<u8> {
    extra_members(payload, CHUNK_MEMBERS).unwrap_or_default()
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
        Tap::with_max_event(kind, DEFAULT_MAX_EVENT)
    }

    /// A tap that holds at most `max_event` bytes of one SSE event.
    pub fn with_max_event(kind: Kind, max_event: usize) -> Tap {
        Tap {
            kind,
            max_event: max_event.max(1),
            pending: Vec::new(),
            searched: 0,
            oversized: None,
            oversized_events: 0,
            json_scan: None,
            usage: None,
            last_usage: Vec::new(),
            last_timings: Vec::new(),
            timings_midway: false,
            timings_at_end: false,
            running_seen: false,
            counted: 0,
            header_prompt: None,
            header_completion: None,
            events: 0,
            held: None,
            edit: None,
        }
    }

    /// Starts over as `Tap::with_max_event(kind, max_event)` would, keeping the allocations of
    /// its buffers (emptied): a core hands its taps from one exchange to the next
    /// (`worker::spare::Taps`). Every other field is the fresh tap's, so nothing of the last
    /// exchange's figures can leak into the next.
    pub fn reset(&mut self, kind: Kind, max_event: usize) {
        let kept = |b: &mut Vec<u8>| {
            let mut b = std::mem::take(b);
            b.clear();
            b
        };
        let (pending, last_usage, last_timings) = (
            kept(&mut self.pending),
            kept(&mut self.last_usage),
            kept(&mut self.last_timings),
        );
        *self = Tap {
            pending,
            last_usage,
            last_timings,
            ..Tap::with_max_event(kind, max_event)
        };
    }

    /// Bytes the tap's kept buffers hold allocated (what keeping it for a later exchange costs).
    pub fn kept_bytes(&self) -> usize {
        self.pending.capacity() + self.last_usage.capacity() + self.last_timings.capacity()
    }

    /// TGI reports token counts in response headers; they complete what the body says.
    pub(crate) fn set_header_counts(&mut self, prompt: Option<u64>, completion: Option<u64>) {
        self.header_prompt = prompt;
        self.header_completion = completion;
    }

    /// Whether this tap may hold bytes back (only when it removes or changes events).
    pub(crate) fn holds_back(&self) -> bool {
        self.kind.holds_back()
    }

    /// The stream came from a server that reports llama.cpp's `timings` at its end only, with
    /// no running usage: asked for `timings_per_token`, it would report them on every chunk, so
    /// that an aborted stream is billed the server's own counts.
    pub(crate) fn timings_at_end_only(&self) -> bool {
        self.timings_at_end && !self.timings_midway && !self.running_seen
    }

    pub fn events(&self) -> u64 {
        self.events
    }

    /// SSE events that outgrew the bound and went on uninspected.
    pub fn oversized_events(&self) -> u64 {
        self.oversized_events
    }

    /// Bytes held back now (bounded by the maximum event size, plus one held finish chunk).
    pub fn held_bytes(&self) -> usize {
        self.pending.len() + self.held.as_ref().map_or(0, Vec::len)
    }

    /// Forwards `data` through `emit` (possibly minus a removed event) and watches it for usage.
    pub fn feed(&mut self, data: &[u8], emit: &mut dyn Sink) {
        match self.kind {
            Kind::None => emit.put(data),
            Kind::OpenAiJson | Kind::TgiJson => {
                emit.put(data);
                if let Some(scan) = self.json_scan.as_mut() {
                    scan.feed(data);
                } else if self.pending.len() + data.len() > MAX_JSON_BODY {
                    // Too big to keep: from here on the body is scanned as it passes, starting
                    // with what was kept (once).
                    let key: &'static [u8] = if self.kind == Kind::OpenAiJson {
                        b"usage"
                    } else {
                        b"details"
                    };
                    let mut scan = Box::new(JsonScan::new(key));
                    scan.feed(&self.pending);
                    scan.feed(data);
                    self.pending = Vec::new();
                    self.json_scan = Some(scan);
                } else {
                    self.pending.extend_from_slice(data);
                }
            }
            Kind::OpenAiSse {
                strip,
                running,
                timings,
            } if strip || running || timings => self.scan(data, Some(emit)),
            Kind::OpenAiSse { .. } | Kind::TgiSse => {
                emit.put(data);
                self.scan(data, None);
            }
        }
    }

    /// End of body: flushes anything held back and parses a JSON body.
    pub fn finish(&mut self, emit: &mut dyn Sink) {
        match self.kind {
            Kind::OpenAiJson | Kind::TgiJson => {
                if let Some(scan) = self.json_scan.take() {
                    match scan.found {
                        Some(value) => self.parse_member(&value),
                        None => log::warn!(
                            "response body of {} bytes: no top-level {} found",
                            scan.seen,
                            String::from_utf8_lossy(scan.key)
                        ),
                    }
                } else {
                    let mut body = std::mem::take(&mut self.pending);
                    self.parse_json_body(&body);
                    // Kept for the next exchange (`reset`), emptied.
                    body.clear();
                    self.pending = body;
                }
            }
            Kind::OpenAiSse { .. } | Kind::TgiSse => {
                // A final event without its blank line still counts (some servers end that way).
                let mut rest = std::mem::take(&mut self.pending);
                if !rest.is_empty() {
                    let verdict = self.on_event(&rest, None);
                    if self.holds_back() {
                        self.route(&rest, verdict, emit);
                    }
                }
                rest.clear();
                self.pending = rest;
                self.edit = None;
                if let Some(held) = self.held.take() {
                    emit.put(&held);
                }
            }
            Kind::None => {}
        }
    }

    /// Usage as known now (the final answer once the body ended): the engine's last reported
    /// figures, else llama.cpp's last timings, else (streams) what the proxy counted.
    pub fn usage(&self) -> Option<Usage> {
        let mut u = self.usage;
        if u.is_none() && !self.last_usage.is_empty() {
            u = UsageJson::from_slice(&self.last_usage).map(Usage::from);
        }
        let timings = || Timings::from_slice(&self.last_timings);
        match u.as_mut() {
            None => u = timings().and_then(Timings::usage),
            Some(u) if u.cached_tokens.is_none() => {
                u.cached_tokens = timings().and_then(|t| t.cache_n);
            }
            Some(_) => {}
        }
        let streams = matches!(self.kind, Kind::OpenAiSse { .. } | Kind::TgiSse);
        if u.is_none() && streams && self.events > 0 {
            u = Some(Usage {
                completion_tokens: self.counted,
                total_tokens: self.counted,
                source: Source::Counted,
                ..Usage::default()
            });
        }
        if self.header_prompt.is_some() || self.header_completion.is_some() {
            let base = u.unwrap_or_default();
            let prompt = self.header_prompt.unwrap_or(base.prompt_tokens);
            let completion = self.header_completion.unwrap_or(base.completion_tokens);
            u = Some(Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                total_tokens: prompt.saturating_add(completion),
                source: Source::Reported,
                ..base
            });
        }
        u
    }

    /// Splits complete events out of `pending + data`; with `emit`, forwards all but removed
    /// events (edited ones changed) and keeps the incomplete tail; without, only watches.
    fn scan(&mut self, data: &[u8], mut emit: Option<Emit<'_>>) {
        let mut data = data;
        if let Some(tail) = self.oversized.as_mut() {
            // Inside an event past the bound: only its end is looked for.
            let end = oversized_end(tail, data);
            let pass = &data[..end.unwrap_or(data.len())];
            if let Some(emit) = emit.as_deref_mut() {
                if !pass.is_empty() {
                    emit.put(pass);
                }
            }
            match end {
                Some(end) => {
                    self.oversized = None;
                    data = &data[end..];
                }
                None => {
                    keep_tail(tail, data);
                    return;
                }
            }
        }
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
        // Only what was not searched before is searched (a long event arriving in small reads
        // stays linear).
        let mut from = if joined {
            self.searched.min(buf.len())
        } else {
            0
        };
        while let Some((end, first_nl)) = event_end_lines(buf, from) {
            // The search met the event's first line end only if it began at the event's start.
            let first_nl = (from == start).then_some(first_nl - start);
            // An event past the bound is never inspected, whether or not it arrived in one read
            // (so what the client gets does not depend on how the body was split).
            let verdict = if end - start > self.max_event {
                self.note_oversized();
                Verdict::Pass
            } else {
                self.on_event(&buf[start..end], first_nl)
            };
            if let Some(emit) = emit.as_deref_mut() {
                // The usual edit (a running usage out of a chunk that goes on): the bytes before
                // it go out with what precedes the event, and the bytes after it join what
                // follows, so a burst of edited events costs one copy each, not three.
                let edit = self.edit.and_then(|e| e.within(end - start));
                if let (Verdict::Pass, None, Some(e)) = (&verdict, &self.held, edit) {
                    if run_start < start + e.from {
                        emit.put(&buf[run_start..start + e.from]);
                    }
                    if e.null {
                        emit.put(b"null");
                    }
                    run_start = start + e.to;
                } else if verdict != Verdict::Pass || self.held.is_some() || self.edit.is_some() {
                    // Strip mode: everything before this event goes out first, in order.
                    if run_start < start {
                        emit.put(&buf[run_start..start]);
                    }
                    run_start = end;
                    self.route(&buf[start..end], verdict, emit);
                }
            }
            self.edit = None;
            start = end;
            from = end;
        }
        let rest_len = buf.len() - start;
        if rest_len > self.max_event {
            // An event past the bound: what is held goes out as it is, and so does the rest of
            // the event as it arrives, uninspected.
            if let Some(emit) = emit.as_deref_mut() {
                if run_start < start {
                    emit.put(&buf[run_start..start]);
                }
                if let Some(held) = self.held.take() {
                    emit.put(&held);
                }
                emit.put(&buf[start..]);
            }
            let mut tail = Vec::with_capacity(2);
            keep_tail(&mut tail, &buf[start..]);
            self.oversized = Some(tail);
            self.note_oversized();
            pending.clear();
            self.searched = 0;
        } else {
            if let Some(emit) = emit {
                if run_start < start {
                    emit.put(&buf[run_start..start]);
                }
            }
            if joined {
                pending.drain(..start);
            } else {
                pending.extend_from_slice(&data[start..]);
            }
            self.searched = pending.len().saturating_sub(2);
        }
        self.pending = pending;
    }

    fn note_oversized(&mut self) {
        if self.oversized_events == 0 {
            log::warn!(
                "SSE event over {} bytes: relayed without inspecting it for usage",
                self.max_event
            );
        }
        self.oversized_events += 1;
    }

    /// Looks at one complete event and says what happens to it in strip mode.
    /// `first_nl`: where the event's first line ends (its `\n`), when the search for the
    /// event's end already found it.
    fn on_event(&mut self, event: &[u8], first_nl: Option<usize>) -> Verdict {
        self.events += 1;
        // The usual event is one `data:` line: take it without walking the event line by line
        // (that walk was a quarter of a streamed request's CPU), and without searching again for
        // the line end the event's own search met (a `memchr` call per event).
        if let Some(rest) = event.strip_prefix(b"data:") {
            let nl = match first_nl {
                Some(nl) => nl.checked_sub(5),
                None => memchr::memchr(b'\n', rest),
            };
            if let Some(nl) = nl {
                if rest[nl..].iter().all(|b| matches!(b, b'\n' | b'\r')) {
                    let line = &rest[..nl];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    let payload = line.strip_prefix(b" ").unwrap_or(line);
                    let at = event.len() - rest.len() + (line.len() - payload.len());
                    return self.on_payload(payload, Some(at));
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
        match data_lines.next() {
            None => {
                // One data line among other fields: still a slice of the event, so editable.
                let at = (first.as_ptr() as usize).wrapping_sub(event.as_ptr() as usize);
                let at = (at <= event.len()).then_some(at);
                self.on_payload(first, at)
            }
            Some(second) => {
                let mut v = first.to_vec();
                v.push(b'\n');
                v.extend_from_slice(second);
                for more in data_lines {
                    v.push(b'\n');
                    v.extend_from_slice(more);
                }
                // Joined lines are not the event's bytes: nothing in them can be edited.
                self.on_payload(&v, None)
            }
        }
    }

    /// Looks at the data of one event (its `data:` lines joined); `at`: where the payload sits
    /// in the event, when it is a slice of it.
    fn on_payload(&mut self, payload: &[u8], at: Option<usize>) -> Verdict {
        match self.kind {
            Kind::OpenAiSse {
                strip,
                running,
                timings,
            } => {
                let usage = usage_member(payload);
                // The usage object never holds a finish reason: only the rest is searched.
                let finish_known = strip || running || timings;
                let finish = finish_known
                    && match usage {
                        Some(m) => {
                            let tail = &payload[m.value_end..];
                            has_finish(&payload[..m.key_start])
                                || (tail.len() > 16 && has_finish(tail))
                        }
                        None => has_finish(payload),
                    };
                let Some(m) = usage else {
                    if self.last_usage.is_empty() && has_content(payload) {
                        self.counted += 1;
                    }
                    if let Some(t) = timings_member(payload) {
                        self.keep_timings(payload, &t);
                        // Known already when anything is removed; else looked for only here.
                        let finish = finish || (!finish_known && has_finish(payload));
                        if finish {
                            self.timings_at_end = true;
                        } else {
                            self.timings_midway = true;
                            if let (true, Some(at)) = (timings, at) {
                                self.edit = Some(t.edit(payload, false).shift(at));
                            }
                        }
                    }
                    return if strip && finish {
                        Verdict::HoldFinish
                    } else {
                        Verdict::Pass
                    };
                };
                self.last_usage.clear();
                self.last_usage
                    .extend_from_slice(&payload[m.value_start..m.value_end]);
                if usage_only(payload) {
                    // llama.cpp puts its final timings here when usage was asked for.
                    self.end_timings(payload);
                    return if strip {
                        Verdict::Strip(extra_fields(payload))
                    } else {
                        Verdict::Pass
                    };
                }
                if !finish {
                    self.running_seen = true;
                } else {
                    // llama.cpp's `/v1/completions` ends with usage and timings on one chunk.
                    self.end_timings(payload);
                }
                // A finish chunk's usage is running usage only when earlier chunks had it too
                // (some servers always put the final usage there: that stays).
                if running && self.running_seen {
                    if let Some(at) = at {
                        self.edit = Some(m.edit(payload, !strip).shift(at));
                    }
                }
                if strip && finish {
                    Verdict::HoldFinish
                } else {
                    Verdict::Pass
                }
            }
            Kind::TgiSse => {
                if has_non_null(payload, b"\"token\"") {
                    self.counted += 1;
                }
                if has_non_null(payload, b"\"details\"") {
                    if let Ok(body) = serde_json::from_slice::<TgiBody>(payload) {
                        if let Some(d) = body.details {
                            self.usage = Some(d.usage());
                        }
                    }
                }
                Verdict::Pass
            }
            _ => Verdict::Pass,
        }
    }

    /// Keeps `payload`'s `timings` value (member `t`) as the last seen.
    fn keep_timings(&mut self, payload: &[u8], t: &Member) {
        self.last_timings.clear();
        self.last_timings
            .extend_from_slice(&payload[t.value_start..t.value_end]);
    }

    /// A chunk that ends the stream (the usage-only one, or a finish chunk with usage): its
    /// `timings`, if it has any, are the final ones.
    fn end_timings(&mut self, payload: &[u8]) {
        if let Some(t) = timings_member(payload) {
            self.keep_timings(payload, &t);
            self.timings_at_end = true;
        }
    }

    /// Strip mode: sends an event on (edited if need be), holds it, or removes it.
    fn route(&mut self, event: &[u8], verdict: Verdict, emit: &mut dyn Sink) {
        // An edited event is its bytes around the removed usage (and `null` in its place).
        let edit = self.edit.take().and_then(|e| e.within(event.len()));
        let parts: [&[u8]; 3] = match edit {
            Some(e) => [
                &event[..e.from],
                if e.null { b"null" } else { b"" },
                &event[e.to..],
            ],
            None => [event, b"", b""],
        };
        match verdict {
            Verdict::Strip(extra) => {
                if let Some(held) = self.held.take() {
                    if extra.is_empty() {
                        emit.put(&held);
                    } else {
                        emit.put(&append_members(&held, &extra));
                    }
                }
            }
            Verdict::HoldFinish => {
                if let Some(prev) = self.held.take() {
                    emit.put(&prev);
                }
                self.held = Some(parts.concat());
            }
            Verdict::Pass => {
                if let Some(prev) = self.held.take() {
                    emit.put(&prev);
                }
                for part in parts.iter().filter(|p| !p.is_empty()) {
                    emit.put(part);
                }
            }
        }
    }

    fn parse_json_body(&mut self, body: &[u8]) {
        match self.kind {
            Kind::OpenAiJson => {
                // Only the `usage` object is deserialised: a full parse of the response (every
                // choice's text validated and skipped) was a tenth of a request's CPU.
                let parse_at = |at| {
                    UsageJson::scan(body, at)
                        .map(|(u, end)| (Some(u), end))
                        .or_else(|| serde_value_at::<Option<UsageJson>>(body, at))
                };
                if let Some(u) = top_level_with(body, b"usage", parse_at).flatten() {
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

    /// The value of the member a `JsonScan` found in a large body.
    fn parse_member(&mut self, value: &[u8]) {
        match self.kind {
            Kind::OpenAiJson => {
                if let Some(u) = UsageJson::from_slice(value) {
                    self.usage = Some(u.into());
                }
            }
            Kind::TgiJson => {
                if let Ok(Some(d)) = serde_json::from_slice::<Option<TgiDetails>>(value) {
                    self.usage = Some(d.usage());
                }
            }
            _ => {}
        }
    }

    fn take_tgi(&mut self, body: TgiBody) {
        if let Some(d) = body.details {
            self.usage = Some(d.usage());
        }
    }
}

mod figures;
mod scan;
mod search;

pub use figures::{Source, Usage};
use figures::{TgiBody, TgiDetails, Timings, UsageJson};

pub(crate) use scan::top_level_value;
use scan::*;

#[cfg(test)]
mod tests;
