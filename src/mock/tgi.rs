//! The TGI dialect (`/generate`, `/generate_stream`): `inputs` and `parameters` in the request,
//! `generated_text` and the token counts in response headers, and a stream whose last token
//! event carries the finish and the details instead of a `[DONE]` (the proxy's usage tap reads
//! usage from there).
//!
//! Shapes only: no I/O, no timing.

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::{
    exchange::{Ask, Completion, Kind},
    json::{bool_field, count_words, sse_event, token_limit},
    wire::Reply,
};

/// Reads a TGI request; `default_tokens` applies without `parameters.max_new_tokens`.
pub(super) fn ask(map: &Map<String, Value>, kind: Kind, default_tokens: u32) -> Result<Ask, Reply> {
    let prompt_tokens = map.get("inputs").map(count_words).unwrap_or(0);
    let (limit, details) = match map.get("parameters") {
        Some(Value::Object(p)) => (token_limit(p, "max_new_tokens")?, bool_field(p, "details")?),
        _ => (None, false),
    };
    let completion_tokens = limit.unwrap_or(default_tokens);
    if completion_tokens == 0 {
        return Err(Reply::error(400, "max_new_tokens must be greater than 0"));
    }
    Ok(Ask {
        prompt_tokens,
        completion_tokens,
        stream: kind == Kind::TgiStream,
        include_usage: false,
        running_usage: false,
        details,
    })
}

impl Completion {
    /// Non-streaming `/generate` answer, counts in headers as TGI sends them.
    pub(super) fn tgi_reply(&self, details: bool, took: Duration) -> Reply {
        let mut reply = Reply::json(200, &self.tgi_response(details));
        reply.headers = vec![
            ("x-prompt-tokens", self.prompt_tokens.to_string()),
            ("x-generated-tokens", self.completion_tokens.to_string()),
            ("x-total-time", took.as_millis().to_string()),
        ];
        reply
    }

    fn tgi_response(&self, details: bool) -> Value {
        let mut body = json!({"generated_text": self.full_text()});
        if details {
            body["details"] = json!({
                "finish_reason": "length",
                "generated_tokens": self.completion_tokens,
                "seed": null,
            });
        }
        body
    }

    pub(super) fn tgi_token(&self, i: u32) -> Vec<u8> {
        let last = i + 1 == self.completion_tokens;
        let (generated, details) = if last {
            (
                json!(self.full_text()),
                json!({
                    "finish_reason": "length",
                    "generated_tokens": self.completion_tokens,
                    "input_length": self.prompt_tokens,
                }),
            )
        } else {
            (Value::Null, Value::Null)
        };
        sse_event(
            "data:",
            &json!({
                "index": i,
                "token": {"id": i, "text": self.token_text(i), "logprob": 0.0, "special": false},
                "generated_text": generated,
                "details": details,
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::generation::tests::{completion, event_json};

    #[test]
    fn tgi_stream_last_event_carries_details() {
        let c = completion(Kind::TgiStream, 2, false);
        let first = c.token_event(0);
        assert!(first.starts_with(b"data:{"));
        let first = event_json(&first);
        assert_eq!(first["token"]["text"], "tok ");
        assert_eq!(first["generated_text"], Value::Null);
        let last = event_json(&c.token_event(1));
        assert_eq!(last["generated_text"], "tok tok ");
        assert_eq!(
            last["details"],
            json!({"finish_reason": "length", "generated_tokens": 2, "input_length": 3})
        );
        assert!(c.closing_events().is_empty());
    }

    #[test]
    fn non_streaming_bodies() {
        let tgi = completion(Kind::Tgi, 2, false);
        assert!(tgi.tgi_response(false).get("details").is_none());
        assert_eq!(tgi.tgi_response(true)["details"]["generated_tokens"], 2);
        let reply = tgi.tgi_reply(false, Duration::from_millis(40));
        assert!(reply.headers.contains(&("x-total-time", "40".to_string())));
    }
}
