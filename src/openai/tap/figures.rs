//! The token counts a response reports and where they came from: the OpenAI `usage` object
//! (and its details), llama.cpp's `timings`, TGI's `details`, each turned into one `Usage`.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

/// Where an event's token counts came from.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The engine's own figures (final or running usage, llama.cpp's timings, TGI's details).
    #[default]
    Reported,
    /// The proxy counted the content deltas it relayed (the engine reported nothing).
    Counted,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Reported => "reported",
            Source::Counted => "counted",
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
    #[serde(skip)]
    pub source: Source,
}

#[derive(Deserialize)]
pub(super) struct UsageJson {
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
pub(super) struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
pub(super) struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

/// Reading a usage value by hand: serde's derive for `UsageJson` (aliases, options, a visitor
/// per details object, `IgnoredAny` for the rest) cost about 1,500 instructions per response, a
/// tenth of the proxy's own work on a non-streaming request. The shapes engines send — members
/// whose values are unsigned integers or `null`, the two details objects of the same kind — are
/// read here; anything else (strings, floats, arrays, escapes or non-ASCII bytes in keys, a
/// field given twice, a trailing comma) is left to serde, so every answer is serde's.
impl UsageJson {
    /// A whole value that is a usage object (`serde_json::from_slice::<Option<UsageJson>>`,
    /// `null` and errors alike `None`).
    pub(super) fn from_slice(v: &[u8]) -> Option<UsageJson> {
        match UsageJson::scan(v, 0) {
            Some((u, end)) if skip_ws(v, end) == v.len() => Some(u),
            _ => serde_json::from_slice::<Option<UsageJson>>(v)
                .ok()
                .flatten(),
        }
    }

    /// The object starting at `at` (after JSON whitespace) and the offset just past its `}`;
    /// `None`: not a shape read here (ask serde).
    pub(super) fn scan(b: &[u8], at: usize) -> Option<(UsageJson, usize)> {
        let mut u = UsageJson {
            prompt_tokens: None,
            completion_tokens: None,
            total_tokens: None,
            prompt_tokens_details: None,
            completion_tokens_details: None,
        };
        let mut seen = 0u8;
        let end = members(b, at, |key, i| {
            let Some(field) = usage_field(key) else {
                return uint(b, i).map(|(_, end)| end);
            };
            // serde refuses a field given twice (an alias counts as its field).
            if seen & (1 << field) != 0 {
                return None;
            }
            seen |= 1 << field;
            let end = match field {
                0..=2 => {
                    let (v, end) = uint(b, i)?;
                    match field {
                        0 => u.prompt_tokens = v,
                        1 => u.completion_tokens = v,
                        _ => u.total_tokens = v,
                    }
                    end
                }
                _ if b[i..].starts_with(b"null") => i + 4,
                3 => {
                    let (v, end) = details(b, i, b"cached_tokens")?;
                    u.prompt_tokens_details = Some(PromptDetails { cached_tokens: v });
                    end
                }
                _ => {
                    let (v, end) = details(b, i, b"reasoning_tokens")?;
                    u.completion_tokens_details = Some(CompletionDetails {
                        reasoning_tokens: v,
                    });
                    end
                }
            };
            Some(end)
        })?;
        Some((u, end))
    }
}

/// Which `UsageJson` field a key names (aliases included): the first byte picks the one name
/// it can be (a chain of slice comparisons cost a hundred instructions a key).
fn usage_field(key: &[u8]) -> Option<u8> {
    let (name, field): (&[u8], u8) = match key.first()? {
        b'p' => (b"prompt_tokens", 0),
        b'i' => (b"input_tokens", 0),
        b'c' => (b"completion_tokens", 1),
        b'o' => (b"output_tokens", 1),
        b't' => (b"total_tokens", 2),
        _ => return None,
    };
    let rest = key.strip_prefix(name)?;
    match rest {
        b"" => Some(field),
        b"_details" if field != 2 => Some(field + 3),
        _ => None,
    }
}

/// A details object: the count under `want` (once at most), other members integers or `null`.
fn details(b: &[u8], at: usize, want: &[u8]) -> Option<(Option<u64>, usize)> {
    let (mut v, mut seen) = (None, false);
    let end = members(b, at, |key, i| {
        let (n, end) = uint(b, i)?;
        if key == want {
            if seen {
                return None;
            }
            (v, seen) = (n, true);
        }
        Some(end)
    })?;
    Some((v, end))
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
        i += 1;
    }
    i
}

/// The members of the object at `at` (after whitespace), each value read by `value(key, start)`
/// which returns where it ends; the offset just past the closing `}`.
fn members(
    b: &[u8],
    at: usize,
    mut value: impl FnMut(&[u8], usize) -> Option<usize>,
) -> Option<usize> {
    let mut i = skip_ws(b, at);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return Some(i + 1);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let start = i + 1;
        let len = key_len(b.get(start..)?)?;
        if b[start + len] != b'"' {
            return None;
        }
        i = skip_ws(b, start + len + 1);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, value(&b[start..start + len], skip_ws(b, i + 1))?);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => return Some(i + 1),
            _ => return None,
        }
    }
}

/// Bytes before the first `"`, `\\`, control or non-ASCII byte of `s` (where a plain key
/// ends), eight at a time.
fn key_len(s: &[u8]) -> Option<usize> {
    use crate::swar::{below, equal, first, non_ascii};
    first(
        s,
        |x| below(x, 0x20) | non_ascii(x) | equal(x, b'"') | equal(x, b'\\'),
        |c| c == b'"' || c == b'\\' || !(0x20..0x80).contains(&c),
    )
}

/// An unsigned integer that fits a u64 (`Some`) or `null` (`None`), and where it ends. What
/// follows is checked by `members` (a `,` or `}`), so `1.5`, `1e3` and `01` are never taken.
fn uint(b: &[u8], i: usize) -> Option<(Option<u64>, usize)> {
    if b.get(i..)?.starts_with(b"null") {
        return Some((None, i + 4));
    }
    let digits = b.get(i..)?;
    let len = digits.iter().take_while(|d| d.is_ascii_digit()).count();
    // Nineteen digits always fit a u64 (longer ones go to serde), and `01` is not JSON.
    if len == 0 || len > 19 || (len > 1 && digits[0] == b'0') {
        return None;
    }
    let n = digits[..len]
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some((Some(n), i + len))
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
            source: Source::Reported,
        }
    }
}

/// llama.cpp's per-chunk `timings`: `prompt_n` prompt tokens evaluated (the cached ones,
/// `cache_n`, are not among them), `predicted_n` tokens generated so far.
#[derive(Deserialize)]
pub(super) struct Timings {
    #[serde(default)]
    pub(super) prompt_n: Option<u64>,
    #[serde(default)]
    pub(super) predicted_n: Option<u64>,
    #[serde(default)]
    pub(super) cache_n: Option<u64>,
}

impl Timings {
    /// The counts in llama.cpp's raw `timings`, `None` when there are none (or it is not JSON).
    /// In an object without a backslash a key is its own bytes, so timings that name none of
    /// the three (`{"predicted_ms":1.0}` on every chunk of some servers) hold nothing to bill,
    /// and serde (about 550 instructions for that float, on every streamed request) is not
    /// asked. Anything else goes to serde (which reads a struct from an array too).
    pub(super) fn from_slice(raw: &[u8]) -> Option<Timings> {
        let named = match raw.first() {
            None => false,
            Some(b'{') => raw.contains(&b'\\') || raw.windows(3).any(|w| w == b"_n\""),
            Some(_) => true,
        };
        named
            .then(|| serde_json::from_slice::<Timings>(raw).ok())
            .flatten()
            .filter(|t| t.prompt_n.is_some() || t.predicted_n.is_some() || t.cache_n.is_some())
    }

    pub(super) fn usage(self) -> Option<Usage> {
        let completion = self.predicted_n?;
        let cached = self.cache_n;
        let prompt = self
            .prompt_n
            .unwrap_or(0)
            .saturating_add(cached.unwrap_or(0));
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
            cached_tokens: cached,
            reasoning_tokens: None,
            source: Source::Reported,
        })
    }
}

#[derive(Deserialize)]
pub(super) struct TgiBody {
    #[serde(default)]
    pub(super) details: Option<TgiDetails>,
}

#[derive(Deserialize)]
pub(super) struct TgiDetails {
    #[serde(default)]
    generated_tokens: Option<u64>,
    #[serde(default)]
    input_length: Option<u64>,
    #[serde(default)]
    prefill: Option<Vec<IgnoredAny>>,
}

impl TgiDetails {
    pub(super) fn usage(self) -> Usage {
        let prompt = self
            .input_length
            .or_else(|| self.prefill.map(|p| p.len() as u64))
            .unwrap_or(0);
        let completion = self.generated_tokens.unwrap_or(0);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
            cached_tokens: None,
            reasoning_tokens: None,
            source: Source::Reported,
        }
    }
}
