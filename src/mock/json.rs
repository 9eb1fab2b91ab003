//! Reading generation request bodies and writing SSE events, shared by the dialects (`openai`,
//! `tgi`) and `generation`.

use serde_json::{Map, Value};

use super::wire::Reply;

/// Largest completion a request may ask for (bounds the memory of a non-streaming answer).
pub(super) const MAX_COMPLETION_TOKENS: u64 = 1_000_000;

pub(super) fn sse_event(prefix: &str, value: &Value) -> Vec<u8> {
    let mut out = prefix.as_bytes().to_vec();
    out.extend_from_slice(value.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
    out
}

/// Prompt size in "tokens": whitespace-separated words in strings (message contents, content
/// parts' `text`, prompts), one per number in a pre-tokenized prompt.
pub(super) fn count_words(value: &Value) -> u64 {
    match value {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Array(items) => items.iter().map(count_words).sum(),
        Value::Number(_) => 1,
        Value::Object(part) => part.get("text").map(count_words).unwrap_or(0),
        _ => 0,
    }
}

pub(super) fn parse_object(body: &[u8]) -> Result<Map<String, Value>, Reply> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Reply::error(400, "request body must be a JSON object")),
        Err(e) => Err(Reply::error(400, &format!("invalid JSON body: {e}"))),
    }
}

/// A token count field: absent/null → None, else a non-negative integer within bounds.
pub(super) fn token_limit(map: &Map<String, Value>, key: &str) -> Result<Option<u32>, Reply> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= MAX_COMPLETION_TOKENS => Ok(u32::try_from(n).ok()),
            _ => Err(Reply::error(
                400,
                &format!("{key} must be an integer in 0..={MAX_COMPLETION_TOKENS}"),
            )),
        },
    }
}

pub(super) fn bool_field(map: &Map<String, Value>, key: &str) -> Result<bool, Reply> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(Reply::error(400, &format!("{key} must be a boolean"))),
    }
}
