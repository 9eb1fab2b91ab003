//! Byte-level JSON and SSE scanning for the usage tap: where an event ends, the top-level
//! members a chunk carries (`usage`, `timings`, `choices` content), and the incremental scan that
//! finds a top-level member of a JSON body of any size. No parsing into values: a chunk is looked
//! at in place, and only the few bytes that matter are copied. Everything here reads bytes from a
//! backend, so every index is bounds-checked and malformed input is a `None`, never a panic.

use std::sync::OnceLock;

use memchr::memmem::{Finder, FinderRev};

use super::search::{BRACKET, NEWLINE, U, UNDERSCORE};
use super::*;

/// Keeps the last two bytes of `tail + data` in `tail`.
pub(super) fn keep_tail(tail: &mut Vec<u8>, data: &[u8]) {
    if data.len() >= 2 {
        tail.clear();
        tail.extend_from_slice(&data[data.len() - 2..]);
    } else {
        tail.extend_from_slice(data);
        let extra = tail.len().saturating_sub(2);
        tail.drain(..extra);
    }
}

/// Where in `data` the event whose last bytes were `tail` ends (just past its blank line).
pub(super) fn oversized_end(tail: &[u8], data: &[u8]) -> Option<usize> {
    // A blank line is at most 3 bytes: one straddling the read boundary shows in this window.
    let mut window = [0u8; 5];
    let head = &data[..data.len().min(3)];
    let n = tail.len() + head.len();
    window[..tail.len()].copy_from_slice(tail);
    window[tail.len()..n].copy_from_slice(head);
    if let Some(end) = event_end(&window[..n], 0) {
        if end > tail.len() {
            return Some(end - tail.len());
        }
    }
    event_end(data, 0)
}

/// Index just past the blank line that ends an event, looking at line ends from `from` on.
pub(super) fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    event_end_lines(buf, from).map(|(end, _)| end)
}

/// `event_end`, and the first line end it met (the index of its `\n`): when the search began at
/// the event's start, that is the end of the event's first line.
pub(super) fn event_end_lines(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    let mut first = None;
    // Nothing left (a read that ended with its last event): no search to set up.
    if i >= buf.len() {
        return None;
    }
    while let Some(p) = NEWLINE.find(&buf[i..]) {
        let nl = i + p;
        let first = *first.get_or_insert(nl);
        match buf.get(nl + 1) {
            Some(b'\n') => return Some((nl + 2, first)),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some((nl + 3, first)),
            Some(_) => i = nl + 1,
            None => return None,
        }
    }
    None
}

/// A chunk's `usage` member: where its key starts and its (non-null) value lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Member {
    pub(super) key_start: usize,
    pub(super) value_start: usize,
    pub(super) value_end: usize,
}

impl Member {
    /// The range that removes the member (with one comma next to it) or, for `null`, its value.
    pub(super) fn edit(self, payload: &[u8], null: bool) -> Edit {
        if null {
            return Edit {
                from: self.value_start,
                to: self.value_end,
                null: true,
            };
        }
        let before = payload[..self.key_start].trim_ascii_end();
        if before.last() == Some(&b',') {
            return Edit {
                from: before.len() - 1,
                to: self.value_end,
                null: false,
            };
        }
        // The first member: the comma after it goes.
        let after = &payload[self.value_end..];
        let trimmed = after.trim_ascii_start();
        let to = match trimmed.strip_prefix(b",") {
            Some(rest) => payload.len() - rest.trim_ascii_start().len(),
            None => self.value_end,
        };
        Edit {
            from: self.key_start,
            to,
            null: false,
        }
    }
}

impl Edit {
    /// The edit, if its range lies within an event of `len` bytes (it always should: a range
    /// that does not is dropped rather than trusted).
    pub(super) fn within(self, len: usize) -> Option<Edit> {
        (self.from <= self.to && self.to <= len).then_some(self)
    }

    pub(super) fn shift(self, by: usize) -> Edit {
        Edit {
            from: self.from + by,
            to: self.to + by,
            null: self.null,
        }
    }
}

/// The last `"usage"` member of a chunk with a value other than `null`. A chunk's strings escape
/// their quotes, so a quoted `"usage"` followed by a colon is a key; chunks nest no other usage.
///
/// Searched backwards for its `u` (SIMD `memrchr`): the member is usually last, and a reverse
/// `memmem` search (two-way, a byte at a time) cost a few hundred instructions per chunk.
pub(super) fn usage_member(payload: &[u8]) -> Option<Member> {
    let mut end = payload.len();
    while let Some(u) = U.rfind(&payload[..end]) {
        end = u;
        let Some(at) = u.checked_sub(1) else {
            break;
        };
        if payload[at] != b'"' || !payload[u..].starts_with(b"usage\"") {
            continue;
        }
        let after = &payload[at + 7..];
        let Some(value) = after.trim_ascii_start().strip_prefix(b":") else {
            continue;
        };
        let value = value.trim_ascii_start();
        if value.is_empty() || value.starts_with(b"null") {
            return None;
        }
        let value_start = payload.len() - value.len();
        let value_end = value_start + json_value_len(value)?;
        return Some(Member {
            key_start: at,
            value_start,
            value_end,
        });
    }
    None
}

/// The first `"timings"` member of a chunk (llama.cpp's), when its value is not `null`.
pub(super) fn timings_member(payload: &[u8]) -> Option<Member> {
    static TIMINGS: OnceLock<Finder<'static>> = OnceLock::new();
    const KEY: &[u8] = b"\"timings\"";
    let finder = TIMINGS.get_or_init(|| Finder::new(KEY));
    let key_start = finder.find(payload)?;
    let value = payload[key_start + KEY.len()..]
        .trim_ascii_start()
        .strip_prefix(b":")?
        .trim_ascii_start();
    if value.starts_with(b"null") {
        return None;
    }
    let value_start = payload.len() - value.len();
    Some(Member {
        key_start,
        value_start,
        value_end: value_start + json_value_len(value)?,
    })
}

/// Length of the JSON value at the start of `v` (objects and arrays matched, strings skipped),
/// if it is complete.
pub(super) fn json_value_len(v: &[u8]) -> Option<usize> {
    match v.first()? {
        b'{' | b'[' => match flat_len(v).map_or_else(|| nested_len_scalar(v), |n| Some(Ok(n)))? {
            Ok(len) => Some(len),
            Err(resume) => nested_len_simd(v, resume),
        },
        b'"' => string_end(v, 1).map(|e| e + 1),
        _ => Some(
            v.iter()
                .position(|b| matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace())
                .unwrap_or(v.len()),
        ),
    }
}

/// The length of an object or array with nothing nested in it and no escape before its end (a
/// running `usage`, llama.cpp's `timings`), eight bytes at a time: its end is the first closing
/// brace or bracket with an even number of quotes before it. `None` when that shape does not hold
/// (the walks below decide); when it holds, they would answer the same. The walk below spent
/// about 470 instructions on a running usage, the longest part of a streamed chunk's inspection.
fn flat_len(v: &[u8]) -> Option<usize> {
    use crate::swar::{between, equal_exact};
    const FOLD: u64 = u64::from_ne_bytes([0x20; 8]);
    // Every quote before the stop byte, as bit 7 of its byte, folded into one word by XOR: its
    // parity is the parity of their number (there is no popcount in the baseline target).
    let mut quotes = 0u64;
    let mut words = v.get(1..)?.chunks_exact(8);
    let mut base = 1;
    for chunk in words.by_ref() {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        let w = u64::from_le_bytes(bytes);
        // Setting bit 5 folds `[`, `\\` and `]` onto `{`, `|` and `}` (no other byte lands on
        // them): one range test finds the six stop bytes (`|` among them, for the walk).
        let hits = between(w | FOLD, b'{' - 1, b'}' + 1);
        let q = equal_exact(w, b'"');
        if hits != 0 {
            // The first hit is exact; only the quotes before it count.
            let at = hits.trailing_zeros() / 8;
            quotes ^= q & ((1u64 << (at * 8)) - 1);
            return closes(chunk[at as usize], quotes).then_some(base + at as usize + 1);
        }
        quotes ^= q;
        base += 8;
    }
    for (o, &b) in words.remainder().iter().enumerate() {
        if matches!(b | 0x20, b'{'..=b'}') {
            return closes(b, quotes).then_some(base + o + 1);
        }
        if b == b'"' {
            quotes ^= 0x80;
        }
    }
    None
}

/// `flat_len`'s stop byte `b` ends the value: a closer after an even number of quotes (`quotes`:
/// their bits XOR-folded into one word).
fn closes(b: u8, quotes: u64) -> bool {
    let x = quotes ^ (quotes >> 32);
    let x = x ^ (x >> 16);
    matches!(b, b'}' | b']') && (x ^ (x >> 8)) & 0x80 == 0
}

/// Bytes a nested value is walked one at a time before the SIMD searches take over.
const SCALAR_SPAN: usize = 256;

/// Where a scalar walk stopped without reaching the value's end: the next byte to look at, not
/// inside a string, at this nesting depth.
#[derive(Debug, Clone, Copy)]
struct Resume {
    at: usize,
    depth: usize,
}

/// The first `SCALAR_SPAN` bytes of an object or array, a byte at a time. The values the tap
/// measures per chunk (a running `usage`, llama.cpp's `timings`) are under 200 bytes with a few
/// short keys: there every `memchr` call's set-up cost more than the bytes it skipped (about 900
/// instructions for a 60-byte usage object, a sixth of a streamed request).
/// `Ok(len)`: the value ends there; `Err(resume)`: go on from `resume`; `None`: malformed.
fn nested_len_scalar(v: &[u8]) -> Option<Result<usize, Resume>> {
    let span = &v[..v.len().min(SCALAR_SPAN)];
    let whole = span.len() == v.len();
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(off) = span[i..]
        .iter()
        .position(|b| matches!(b, b'"' | b'{' | b'}' | b'[' | b']'))
    {
        let at = i + off;
        match span[at] {
            b'"' => {
                let mut j = at + 1;
                loop {
                    // A string that runs past the span goes to the SIMD walk from its quote.
                    let Some(o) = span.get(j..).and_then(quote_or_backslash) else {
                        return (!whole).then_some(Err(Resume { at, depth }));
                    };
                    if span[j + o] == b'"' {
                        i = j + o + 1;
                        break;
                    }
                    j += o + 2;
                }
            }
            b'{' | b'[' => {
                depth += 1;
                i = at + 1;
            }
            _ => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(Ok(at + 1));
                }
                i = at + 1;
            }
        }
    }
    (!whole).then_some(Err(Resume {
        at: span.len(),
        depth,
    }))
}

/// The first `"` or `\\` in `s`, eight bytes at a time: keys of a usage object are a dozen
/// bytes or more, where a byte loop costs four times as much and `memchr`'s set-up more.
fn quote_or_backslash(s: &[u8]) -> Option<usize> {
    use crate::swar::{equal, first};
    first(
        s,
        |w| equal(w, b'"') | equal(w, b'\\'),
        |b| b == b'"' || b == b'\\',
    )
}

/// The rest of a long nested value: jumps between quotes, braces and brackets with SIMD searches.
fn nested_len_simd(v: &[u8], resume: Resume) -> Option<usize> {
    let Resume {
        at: mut i,
        mut depth,
    } = resume;
    // Each search's next hit is remembered until passed: searching the rest of the value for a
    // `[`/`]` at every quote and brace made a chunk's `choices` (many strings, no bracket after
    // the first) quadratic, a thousand instructions per chunk.
    let mut quote_or_brace_cache: Option<Option<usize>> = None;
    let mut bracket_cache: Option<Option<usize>> = None;
    let next =
        |cache: &mut Option<Option<usize>>, i: usize, find: &dyn Fn(&[u8]) -> Option<usize>| {
            match *cache {
                Some(Some(at)) if at >= i => Some(at),
                Some(None) => None,
                _ => {
                    let at = find(&v[i..]).map(|o| i + o);
                    *cache = Some(at);
                    at
                }
            }
        };
    loop {
        let quote_or_brace = next(&mut quote_or_brace_cache, i, &|s| {
            memchr::memchr3(b'"', b'{', b'}', s)
        });
        let next_bracket = next(&mut bracket_cache, i, &|s| memchr::memchr2(b'[', b']', s));
        let at = match (quote_or_brace, next_bracket) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        match v[at] {
            b'"' => {
                i = string_end(v, at + 1)? + 1;
                continue;
            }
            b'{' | b'[' => depth += 1,
            _ => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(at + 1);
                }
            }
        }
        i = at + 1;
    }
}

/// `,"name":value` for every top-level member of the object `payload` whose name is not in
/// `standard`, each as its raw text. A walk over the members (strings skipped, values measured
/// by `json_value_len`): deserialising the chunk into a map for this cost 6,000 instructions per
/// streamed request. `None` when `payload` is not one complete object.
pub(super) fn extra_members(payload: &[u8], standard: &[&str]) -> Option<Vec<u8>> {
    let mut rest = payload.trim_ascii().strip_prefix(b"{")?;
    let mut out = Vec::new();
    if rest.trim_ascii_start() == b"}" {
        return Some(out);
    }
    loop {
        rest = rest.trim_ascii_start();
        if rest.first() != Some(&b'"') {
            return None;
        }
        let key_end = string_end(rest, 1)?;
        let after = rest[key_end + 1..]
            .trim_ascii_start()
            .strip_prefix(b":")?
            .trim_ascii_start();
        let len = json_value_len(after).filter(|n| *n > 0)?;
        let name = &rest[1..key_end];
        if !standard.iter().any(|s| s.as_bytes() == name) {
            out.push(b',');
            out.extend_from_slice(&rest[..=key_end]);
            out.push(b':');
            out.extend_from_slice(&after[..len]);
        }
        rest = after[len..].trim_ascii_start();
        match rest.split_first() {
            Some((b',', more)) => rest = more,
            Some((b'}', more)) if more.trim_ascii().is_empty() => return Some(out),
            _ => return None,
        }
    }
}

/// A choice of the chunk has a non-null `finish_reason`. Found through the key's underscore with
/// `memchr` (a chunk has a handful of underscores): a `memmem` search for the key cost about 400
/// instructions on every streamed chunk.
pub(super) fn has_finish(payload: &[u8]) -> bool {
    const KEY: &[u8] = b"\"finish_reason\"";
    let mut from = 0;
    while let Some(off) = UNDERSCORE.find(&payload[from..]) {
        let at = from + off;
        from = at + 1;
        let Some(start) = at.checked_sub(7) else {
            continue;
        };
        if !payload[start..].starts_with(KEY) {
            continue;
        }
        let rest = payload[start + KEY.len()..].trim_ascii_start();
        if let Some(value) = rest.strip_prefix(b":") {
            if !value.trim_ascii_start().starts_with(b"null") {
                return true;
            }
        }
    }
    false
}

/// A usage-only chunk: `"choices"` is an empty array. Found from the chunk's few `[` (a `memmem`
/// search for the key cost twice as much on every streamed chunk); the first `"choices"` array
/// decides, so a chunk with choices costs one search that stops there, not one to its end (and
/// an empty `choices` nested further on cannot make a chunk with text look usage-only).
pub(super) fn usage_only(payload: &[u8]) -> bool {
    let mut from = 0;
    while let Some(off) = BRACKET.find(&payload[from..]) {
        let at = from + off;
        from = at + 1;
        let key = payload[..at]
            .trim_ascii_end()
            .strip_suffix(b":")
            .map(<[u8]>::trim_ascii_end);
        if key.is_some_and(|k| k.ends_with(b"\"choices\"")) {
            return payload[at + 1..].trim_ascii_start().starts_with(b"]");
        }
    }
    false
}

/// A chunk that relays generated text: a non-empty `content`, `text` or `reasoning_content`
/// string (what the proxy counts when the engine reports no usage).
pub(super) fn has_content(payload: &[u8]) -> bool {
    static CONTENT: OnceLock<Finder<'static>> = OnceLock::new();
    static TEXT: OnceLock<Finder<'static>> = OnceLock::new();
    static REASONING: OnceLock<Finder<'static>> = OnceLock::new();
    let finders = [
        CONTENT.get_or_init(|| Finder::new(b"\"content\"")),
        TEXT.get_or_init(|| Finder::new(b"\"text\"")),
        REASONING.get_or_init(|| Finder::new(b"\"reasoning_content\"")),
    ];
    finders.iter().any(|f| {
        let mut from = 0;
        while let Some(pos) = f.find(&payload[from..]) {
            from += pos + f.needle().len();
            let rest = payload[from..].trim_ascii_start();
            if let Some(value) = rest.strip_prefix(b":") {
                let value = value.trim_ascii_start();
                if value.starts_with(b"\"") && !value.starts_with(b"\"\"") {
                    return true;
                }
            }
        }
        false
    })
}

/// A structural scan of a JSON body too large to keep: finds the top-level member `key` as the
/// bytes pass (strings skipped, nesting tracked across reads) and keeps only its value. Linear,
/// and holds at most `MAX_CAPTURE` bytes.
pub(super) struct JsonScan {
    pub(super) key: &'static [u8],
    pub(super) seen: u64,
    /// Nesting of objects and arrays.
    pub(super) depth: u32,
    /// The body is an object (only then are depth-1 strings keys).
    pub(super) object: Option<bool>,
    pub(super) in_str: bool,
    pub(super) escaped: bool,
    pub(super) state: ScanState,
    /// Key bytes matched by the current depth-1 string (`None`: it differs).
    pub(super) matched: Option<usize>,
    pub(super) value: Vec<u8>,
    pub(super) found: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ScanState {
    Idle,
    /// In a depth-1 string that may be the key.
    Key,
    /// After the key's closing quote, before its colon.
    AfterKey,
    /// In the key's value.
    Value,
}

impl JsonScan {
    pub(super) fn new(key: &'static [u8]) -> JsonScan {
        JsonScan {
            key,
            seen: 0,
            depth: 0,
            object: None,
            in_str: false,
            escaped: false,
            state: ScanState::Idle,
            matched: None,
            value: Vec::new(),
            found: None,
        }
    }

    pub(super) fn feed(&mut self, data: &[u8]) {
        self.seen += data.len() as u64;
        let mut i = 0;
        while i < data.len() {
            if self.in_str && !self.escaped && self.state == ScanState::Idle {
                // The bulk of a body is text: jump to the next quote or backslash.
                match memchr::memchr2(b'"', b'\\', &data[i..]) {
                    Some(off) => i += off,
                    None => return,
                }
            }
            let b = data[i];
            i += 1;
            if self.state == ScanState::Value {
                if !self.in_str && self.depth == 1 && matches!(b, b',' | b'}') {
                    self.found = Some(std::mem::take(&mut self.value));
                    self.state = ScanState::Idle;
                } else if self.value.len() < MAX_CAPTURE {
                    self.value.push(b);
                } else {
                    // Not a usage object: give up on it, keep scanning.
                    self.value = Vec::new();
                    self.state = ScanState::Idle;
                }
            }
            if self.in_str {
                if self.escaped {
                    self.escaped = false;
                    self.matched = None;
                } else if b == b'\\' {
                    self.escaped = true;
                    self.matched = None;
                } else if b == b'"' {
                    self.in_str = false;
                    if self.state == ScanState::Key {
                        self.state = if self.matched == Some(self.key.len()) {
                            ScanState::AfterKey
                        } else {
                            ScanState::Idle
                        };
                    }
                } else if self.state == ScanState::Key {
                    self.matched = self
                        .matched
                        .filter(|&m| self.key.get(m) == Some(&b))
                        .map(|m| m + 1);
                }
                continue;
            }
            match b {
                b'"' => {
                    self.in_str = true;
                    if self.state == ScanState::AfterKey {
                        self.state = ScanState::Idle;
                    }
                    if self.state == ScanState::Idle && self.depth == 1 && self.object == Some(true)
                    {
                        self.state = ScanState::Key;
                        self.matched = Some(0);
                    }
                }
                b'{' | b'[' => {
                    if self.object.is_none() {
                        self.object = Some(b == b'{');
                    }
                    if self.state == ScanState::AfterKey {
                        self.state = ScanState::Idle;
                    }
                    self.depth = self.depth.saturating_add(1);
                }
                b'}' | b']' => {
                    if self.state == ScanState::AfterKey {
                        self.state = ScanState::Idle;
                    }
                    self.depth = self.depth.saturating_sub(1);
                }
                b':' if self.state == ScanState::AfterKey => {
                    self.state = ScanState::Value;
                    self.value.clear();
                }
                b' ' | b'\t' | b'\r' | b'\n' => {}
                _ => {
                    if self.state == ScanState::AfterKey {
                        self.state = ScanState::Idle;
                    }
                }
            }
        }
    }
}

/// The value of `key` in the top-level JSON object of `body`, deserialised alone.
///
/// Servers put `usage` last or nearly so, so the last `"usage":` is tried first: it is the
/// top-level key exactly when, after its value, the first brace that closes more than it opens
/// is the body's final byte. Anything else (a nested `usage` later in the body, odd layouts) falls
/// back to a structural scan from the start.
#[cfg(test)]
pub(crate) fn top_level<T: serde::de::DeserializeOwned>(body: &[u8], key: &[u8]) -> Option<T> {
    top_level_with(body, key, |at| serde_value_at(body, at))
}

/// The value of type `T` that starts at `at` and the offset just past it, as serde reads it.
pub(super) fn serde_value_at<T: serde::de::DeserializeOwned>(
    body: &[u8],
    at: usize,
) -> Option<(T, usize)> {
    let mut values = serde_json::Deserializer::from_slice(&body[at..]).into_iter::<T>();
    let v = values.next()?.ok()?;
    Some((v, at + values.byte_offset()))
}

/// `top_level` with the value read by `parse_at(at)` (its value and where it ends).
pub(super) fn top_level_with<T>(
    body: &[u8],
    key: &[u8],
    parse_at: impl Fn(usize) -> Option<(T, usize)>,
) -> Option<T> {
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
pub(super) fn last_key_value(body: &[u8], key: &[u8]) -> Option<usize> {
    let quoted_len = key.len() + 2;
    let colon_after = |at: usize| {
        let rest = body[at + quoted_len..].trim_ascii_start();
        (rest.first() == Some(&b':')).then(|| body.len() - rest.len() + 1)
    };
    if key == b"usage" {
        // The key asked on every response: its `g` is rare in what follows `usage` in a body,
        // and a vectorised search for one byte from the end beats the two-way `rfind` (about
        // 450 instructions a response). Candidates are taken as `rfind` would find them: each
        // ends before the previous one starts.
        let mut end = body.len();
        for g in memchr::memrchr_iter(b'g', body) {
            let Some(at) = g.checked_sub(4) else { break };
            if at + quoted_len > end || &body[at..at + quoted_len] != b"\"usage\"" {
                continue;
            }
            if let Some(v) = colon_after(at) {
                return Some(v);
            }
            end = at;
        }
        return None;
    }
    let mut quoted = Vec::with_capacity(key.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(key);
    quoted.push(b'"');
    let finder = FinderRev::new(&quoted);
    let mut end = body.len();
    while let Some(at) = finder.rfind(&body[..end]) {
        if let Some(v) = colon_after(at) {
            return Some(v);
        }
        end = at;
    }
    None
}

/// True when, scanning `body` from `from` (outside any string), the first `}` that closes an
/// object opened before `from` is the last non-blank byte of `body`.
pub(super) fn closes_object_last(body: &[u8], from: usize) -> bool {
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
pub(super) fn string_end(body: &[u8], mut from: usize) -> Option<usize> {
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

/// True when `key` (TGI's `"token"` or `"details"`) occurs followed by a value other than
/// `null` — the cheap test that spares a JSON parse of the ordinary token event.
pub(super) fn has_non_null(payload: &[u8], key: &[u8]) -> bool {
    // Searchers are built once: constructing one per event cost more than the search itself.
    static DETAILS: OnceLock<Finder<'static>> = OnceLock::new();
    static TOKEN: OnceLock<Finder<'static>> = OnceLock::new();
    let finder = match key {
        b"\"details\"" => DETAILS.get_or_init(|| Finder::new(b"\"details\"")),
        b"\"token\"" => TOKEN.get_or_init(|| Finder::new(b"\"token\"")),
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
