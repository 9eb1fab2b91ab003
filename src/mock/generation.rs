//! One simulated generation in either dialect: the request body read into an `Ask` (by `openai`
//! or `tgi`), vLLM's context-length check, and the `Completion` that every body and SSE event is
//! built from. Whether it streams or answers once after the simulated time is decided here;
//! writing it is `answer`'s job.
//!
//! Bodies are checked, never trusted: a malformed field is a 400, and the completion length is
//! bounded so a non-streaming answer's size is too. The dialects' JSON shapes live in their own
//! modules; this one only dispatches on `Kind`.

use serde_json::{Map, Value};

use super::{conn::Exchange, route::Action, server::Server, unix_millis, wire::Reply};

/// Largest completion a request may ask for (bounds the memory of a non-streaming answer).
pub(super) const MAX_COMPLETION_TOKENS: u64 = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Text,
    /// TGI `/generate`
    Tgi,
    /// TGI `/generate_stream`
    TgiStream,
}

/// What a generation request asks for, read from its body by its dialect.
pub(super) struct Ask {
    pub(super) prompt_tokens: u64,
    pub(super) completion_tokens: u32,
    pub(super) stream: bool,
    /// OpenAI `stream_options.include_usage`.
    pub(super) include_usage: bool,
    /// TGI `parameters.details`.
    pub(super) details: bool,
}

/// One simulated generation; builds the non-streaming body and every SSE event.
#[derive(Debug, Clone)]
pub(super) struct Completion {
    pub(super) kind: Kind,
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) prompt_tokens: u64,
    pub(super) completion_tokens: u32,
    pub(super) include_usage: bool,
}

pub(super) fn generation(ex: &Exchange, server: &Server, kind: Kind) -> Action {
    match plan_generation(ex, server, kind) {
        Ok(action) => action,
        Err(reply) => Action::Reply(reply),
    }
}

fn plan_generation(ex: &Exchange, server: &Server, kind: Kind) -> Result<Action, Reply> {
    let map = parse_object(&ex.body)?;
    let hooks = &ex.hooks;
    let model = map
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(&server.opts.model)
        .to_string();
    let ask = match kind {
        Kind::Chat | Kind::Text => super::openai::ask(&map, kind, hooks.tokens)?,
        Kind::Tgi | Kind::TgiStream => super::tgi::ask(&map, kind, hooks.tokens)?,
    };
    let (prompt_tokens, completion_tokens) = (ask.prompt_tokens, ask.completion_tokens);
    if u64::from(completion_tokens) > MAX_COMPLETION_TOKENS {
        return Err(Reply::error(400, "too many completion tokens requested"));
    }
    let wanted = prompt_tokens + u64::from(completion_tokens);
    if let Some(limit) = server.context_limit.get().filter(|l| wanted > *l) {
        // vLLM's wording (a 400 before any byte of a stream).
        return Err(Reply::error(
            400,
            &format!(
                "This model's maximum context length is {limit} tokens. However, you requested \
                 {wanted} tokens ({prompt_tokens} in the messages, {completion_tokens} in the \
                 completion). Please reduce the length of the messages or completion."
            ),
        ));
    }
    let completion = Completion {
        kind,
        id: match kind {
            Kind::Chat => format!("chatcmpl-mock-{}", server.next_id()),
            _ => format!("cmpl-mock-{}", server.next_id()),
        },
        created: unix_millis() / 1000,
        model,
        prompt_tokens,
        completion_tokens,
        include_usage: ask.include_usage,
    };
    if ask.stream {
        return Ok(Action::Stream(completion));
    }
    let wait = hooks
        .ttft
        .saturating_add(hooks.token_delay.saturating_mul(completion_tokens));
    let reply = match kind {
        Kind::Tgi | Kind::TgiStream => completion.tgi_reply(ask.details, wait),
        Kind::Chat | Kind::Text => Reply::json(200, &completion.response()),
    };
    Ok(Action::Delayed { reply, wait })
}

impl Completion {
    pub(super) fn token_text(&self, i: u32) -> String {
        match self.kind {
            Kind::Tgi | Kind::TgiStream => "tok ".to_string(),
            Kind::Chat | Kind::Text => format!("tok{i} "),
        }
    }

    pub(super) fn full_text(&self) -> String {
        (0..self.completion_tokens)
            .map(|i| self.token_text(i))
            .collect()
    }

    /// The events sent before the first token.
    pub(super) fn opening_events(&self) -> Vec<Vec<u8>> {
        match self.kind {
            Kind::Chat | Kind::Text => self.openai_opening(),
            Kind::Tgi | Kind::TgiStream => Vec::new(),
        }
    }

    pub(super) fn token_event(&self, i: u32) -> Vec<u8> {
        match self.kind {
            Kind::Chat | Kind::Text => self.openai_token(i),
            Kind::Tgi | Kind::TgiStream => self.tgi_token(i),
        }
    }

    /// The events after the last token.
    pub(super) fn closing_events(&self) -> Vec<Vec<u8>> {
        match self.kind {
            Kind::Chat | Kind::Text => self.openai_closing(),
            // TGI's last token event carries the finish; there is no `[DONE]`.
            Kind::Tgi | Kind::TgiStream => Vec::new(),
        }
    }
}

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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use serde_json::json;

    pub(in crate::mock) fn completion(kind: Kind, n: u32, include_usage: bool) -> Completion {
        Completion {
            kind,
            id: "id-1".to_string(),
            created: 7,
            model: "m".to_string(),
            prompt_tokens: 3,
            completion_tokens: n,
            include_usage,
        }
    }

    /// Parse `data: {json}\n\n` (or TGI's `data:{json}\n\n`).
    pub(in crate::mock) fn event_json(event: &[u8]) -> Value {
        let text = std::str::from_utf8(event).expect("utf8");
        assert!(
            text.ends_with("\n\n"),
            "event must end with a blank line: {text:?}"
        );
        let payload = text
            .strip_prefix("data: ")
            .or_else(|| text.strip_prefix("data:"))
            .expect("data prefix");
        serde_json::from_str(payload.trim_end()).expect("json")
    }

    #[test]
    fn counts_words_in_prompts() {
        assert_eq!(count_words(&json!("  hello   big world ")), 3);
        assert_eq!(count_words(&json!(["a b", "c"])), 3);
        assert_eq!(count_words(&json!([1, 2, 3])), 3);
        assert_eq!(count_words(&json!(null)), 0);
    }
}
