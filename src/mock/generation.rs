//! One simulated generation in either dialect: the request body read into an `Ask` (by `openai`
//! or `tgi`), vLLM's context-length check, and the `Completion` that every body and SSE event is
//! built from. Whether it streams or answers once after the simulated time is decided here;
//! writing it is `answer`'s job.
//!
//! Bodies are checked, never trusted: a malformed field is a 400, and the completion length is
//! bounded so a non-streaming answer's size is too. The dialects' JSON shapes live in their own
//! modules; this one only dispatches on `Kind`.

use serde_json::Value;

use super::{
    exchange::{Action, Completion, Exchange, Kind},
    json::{parse_object, MAX_COMPLETION_TOKENS},
    state::Server,
    unix_millis,
    wire::Reply,
};

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
        running_usage: ask.running_usage,
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::mock::json::count_words;
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
            running_usage: false,
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
