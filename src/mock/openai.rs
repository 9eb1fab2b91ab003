//! The OpenAI dialect (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`): which body
//! fields a request may set, and the JSON and SSE events vLLM answers with, including the
//! `stream_options.include_usage` usage chunk and llama.cpp's `timings` (the proxy's usage tap
//! must ignore it).
//!
//! Shapes only: no I/O, no timing. The fields a proxy reads for usage and routing must stay
//! exactly where vLLM puts them; everything else is kept minimal.

use serde_json::{json, Map, Value};

use super::{
    exchange::{Ask, Completion, Exchange, Kind},
    json::{bool_field, count_words, parse_object, sse_event, token_limit},
    wire::Reply,
    MockOptions,
};

/// Length of the fake embedding vectors.
const EMBEDDING_DIMS: usize = 8;

/// Reads a chat or text completion request; `default_tokens` applies without `max_tokens` and
/// `max_completion_tokens`.
pub(super) fn ask(map: &Map<String, Value>, kind: Kind, default_tokens: u32) -> Result<Ask, Reply> {
    let prompt_tokens = if kind == Kind::Chat {
        chat_prompt_tokens(map.get("messages"))
    } else {
        map.get("prompt").map(count_words).unwrap_or(0)
    };
    let limit = match token_limit(map, "max_tokens")? {
        Some(n) => Some(n),
        None => token_limit(map, "max_completion_tokens")?,
    };
    let (include_usage, continuous) = match map.get("stream_options") {
        Some(Value::Object(o)) => (
            bool_field(o, "include_usage")?,
            bool_field(o, "continuous_usage_stats")?,
        ),
        _ => (false, false),
    };
    let stream = bool_field(map, "stream")?;
    Ok(Ask {
        prompt_tokens,
        completion_tokens: limit.unwrap_or(default_tokens),
        stream,
        include_usage,
        // vLLM: running usage only with include_usage as well.
        running_usage: include_usage && continuous,
        details: false,
    })
}

fn chat_prompt_tokens(messages: Option<&Value>) -> u64 {
    messages
        .and_then(Value::as_array)
        .map(|ms| {
            ms.iter()
                .filter_map(|m| m.get("content"))
                .map(count_words)
                .sum()
        })
        .unwrap_or(0)
}

pub(super) fn embeddings(ex: &Exchange, opts: &MockOptions) -> Reply {
    let map = match parse_object(&ex.body) {
        Ok(map) => map,
        Err(reply) => return reply,
    };
    let model = map
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(&opts.model);
    let tokens = map.get("input").map(count_words).unwrap_or(0);
    let vector: Vec<f64> = (0..EMBEDDING_DIMS)
        .map(|i| ((i as f64 + 1.0) * 0.125 + tokens as f64 * 0.001).fract())
        .collect();
    Reply::json(
        200,
        &json!({
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }),
    )
}

impl Completion {
    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + u64::from(self.completion_tokens),
        })
    }

    /// Non-streaming OpenAI body.
    pub(super) fn response(&self) -> Value {
        let (object, choice) = match self.kind {
            Kind::Chat => (
                "chat.completion",
                json!({"index": 0, "message": {"role": "assistant", "content": self.full_text()},
                       "logprobs": null, "finish_reason": "length"}),
            ),
            _ => (
                "text_completion",
                json!({"index": 0, "text": self.full_text(), "logprobs": null, "finish_reason": "length"}),
            ),
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": self.usage(),
        })
    }

    /// An OpenAI stream chunk around one choice (`None` = the usage chunk); `done`: tokens
    /// generated up to and including this chunk.
    fn openai_chunk(&self, choice: Option<Value>, done: u32) -> Vec<u8> {
        let object = if self.kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut chunk = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
        });
        match choice {
            Some(choice) => {
                chunk["choices"] = json!([choice]);
                chunk["timings"] = json!({"predicted_ms": 1.0});
                if self.running_usage {
                    chunk["usage"] = json!({
                        "prompt_tokens": self.prompt_tokens,
                        "completion_tokens": done,
                        "total_tokens": self.prompt_tokens + u64::from(done),
                    });
                } else if self.include_usage {
                    chunk["usage"] = Value::Null;
                }
            }
            None => {
                chunk["choices"] = json!([]);
                chunk["usage"] = self.usage();
            }
        }
        sse_event("data: ", &chunk)
    }

    /// The chat role delta; text completions open with their first token.
    pub(super) fn openai_opening(&self) -> Vec<Vec<u8>> {
        match self.kind {
            Kind::Chat => vec![self.openai_chunk(
                Some(json!({
                    "index": 0, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null,
                })),
                0,
            )],
            _ => Vec::new(),
        }
    }

    pub(super) fn openai_token(&self, i: u32) -> Vec<u8> {
        let text = self.token_text(i);
        match self.kind {
            Kind::Chat => self.openai_chunk(
                Some(json!({
                    "index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null,
                })),
                i + 1,
            ),
            _ => self.openai_chunk(
                Some(json!({
                    "index": 0, "text": text, "logprobs": null, "finish_reason": null,
                })),
                i + 1,
            ),
        }
    }

    /// Finish chunk, usage chunk (if asked), `[DONE]`.
    pub(super) fn openai_closing(&self) -> Vec<Vec<u8>> {
        let finish = match self.kind {
            Kind::Chat => {
                json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"})
            }
            _ => json!({"index": 0, "text": "", "logprobs": null, "finish_reason": "length"}),
        };
        let n = self.completion_tokens;
        let mut events = vec![self.openai_chunk(Some(finish), n)];
        if self.include_usage {
            events.push(self.openai_chunk(None, n));
        }
        events.push(b"data: [DONE]\n\n".to_vec());
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::generation::tests::{completion, event_json};

    #[test]
    fn counts_words_in_messages() {
        let messages = json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "one two three"},
                                         {"type": "image_url", "image_url": {"url": "x y"}}]},
            {"role": "assistant", "content": null},
        ]);
        assert_eq!(chat_prompt_tokens(Some(&messages)), 5);
        assert_eq!(chat_prompt_tokens(None), 0);
    }

    #[test]
    fn chat_stream_events_with_usage() {
        let c = completion(Kind::Chat, 2, true);
        let opening = c.opening_events();
        assert_eq!(opening.len(), 1);
        let first = event_json(&opening[0]);
        assert_eq!(
            first["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(first["usage"], Value::Null);
        assert!(first.as_object().expect("object").contains_key("usage"));
        assert_eq!(first["timings"]["predicted_ms"], json!(1.0));

        let token = event_json(&c.token_event(1));
        assert_eq!(token["object"], "chat.completion.chunk");
        assert_eq!(token["choices"][0]["delta"]["content"], "tok1 ");

        let closing = c.closing_events();
        assert_eq!(closing.len(), 3);
        let finish = event_json(&closing[0]);
        assert_eq!(finish["choices"][0]["finish_reason"], "length");
        assert_eq!(finish["choices"][0]["delta"], json!({}));
        let usage = event_json(&closing[1]);
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
        );
        assert!(usage.get("timings").is_none());
        assert_eq!(closing[2], b"data: [DONE]\n\n");
    }

    #[test]
    fn stream_without_include_usage_has_no_usage_key() {
        let c = completion(Kind::Text, 1, false);
        assert!(c.opening_events().is_empty());
        let token = event_json(&c.token_event(0));
        assert_eq!(token["choices"][0]["text"], "tok0 ");
        assert!(token.get("usage").is_none());
        let closing = c.closing_events();
        assert_eq!(closing.len(), 2);
        assert_eq!(closing[1], b"data: [DONE]\n\n");
    }

    #[test]
    fn running_usage_like_vllm() {
        let mut c = completion(Kind::Chat, 2, true);
        c.running_usage = true;
        let first = event_json(&c.opening_events()[0]);
        assert_eq!(first["usage"]["completion_tokens"], 0);
        let second = event_json(&c.token_event(1));
        assert_eq!(second["usage"]["completion_tokens"], 2);
        assert_eq!(second["usage"]["prompt_tokens"], 3);
        let closing = c.closing_events();
        assert_eq!(event_json(&closing[0])["usage"]["completion_tokens"], 2);
        assert_eq!(event_json(&closing[1])["choices"], serde_json::json!([]));
    }

    #[test]
    fn non_streaming_body() {
        let c = completion(Kind::Chat, 3, false);
        let body = c.response();
        assert_eq!(body["choices"][0]["message"]["content"], "tok0 tok1 tok2 ");
        assert_eq!(body["usage"]["total_tokens"], 6);
    }
}
