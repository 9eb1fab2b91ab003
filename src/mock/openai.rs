//! The OpenAI dialect (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`): which body
//! fields a request may set, and the JSON and SSE events vLLM answers with, including the
//! `stream_options.include_usage` usage chunk and llama.cpp's `timings` (the proxy's usage tap
//! must ignore it).
//!
//! Shapes only: no I/O, no timing. The fields a proxy reads for usage and routing must stay
//! exactly where vLLM puts them; everything else is kept minimal.

use serde_json::{json, Map, Value};

use crate::encode::decimal;

use super::{
    exchange::{Ask, Completion, Exchange, Kind},
    json::{bool_field, count_words, parse_object, token_limit},
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
    /// generated up to and including this chunk. Written directly, in the order and shape
    /// `serde_json` gives the same object (`value_chunk` in the tests, compared on every shape):
    /// built as a `Value`, the chunks of a fast stream were most of the mock's CPU, which the
    /// load benchmark's clients share.
    fn openai_chunk(&self, choice: Option<Choice<'_>>, done: u32) -> Vec<u8> {
        let mut o = Vec::with_capacity(320);
        o.extend_from_slice(b"data: {\"choices\":[");
        if let Some(choice) = choice {
            self.write_choice(&mut o, choice);
        }
        o.extend_from_slice(b"],\"created\":");
        o.extend_from_slice(decimal(self.created, &mut [0; 20]));
        o.extend_from_slice(b",\"id\":");
        json_str(&mut o, &self.id);
        o.extend_from_slice(b",\"model\":");
        json_str(&mut o, &self.model);
        o.extend_from_slice(b",\"object\":\"");
        o.extend_from_slice(match self.kind {
            Kind::Chat => b"chat.completion.chunk\"".as_slice(),
            _ => b"text_completion\"".as_slice(),
        });
        match choice {
            Some(_) => {
                o.extend_from_slice(br#","timings":{"predicted_ms":1.0}"#);
                if self.running_usage {
                    self.write_usage(&mut o, done);
                } else if self.include_usage {
                    o.extend_from_slice(br#","usage":null"#);
                }
            }
            None => self.write_usage(&mut o, self.completion_tokens),
        }
        o.extend_from_slice(b"}\n\n");
        o
    }

    fn write_choice(&self, o: &mut Vec<u8>, choice: Choice<'_>) {
        match (self.kind, choice) {
            (Kind::Chat, Choice::Opening) => o.extend_from_slice(
                br#"{"delta":{"content":"","role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}"#,
            ),
            (Kind::Chat, Choice::Token(text)) => {
                o.extend_from_slice(br#"{"delta":{"content":"#);
                json_str(o, text);
                o.extend_from_slice(br#"},"finish_reason":null,"index":0,"logprobs":null}"#);
            }
            (Kind::Chat, Choice::Finish) => o.extend_from_slice(
                br#"{"delta":{},"finish_reason":"length","index":0,"logprobs":null}"#,
            ),
            (_, Choice::Opening | Choice::Token(_)) => {
                let text = match choice {
                    Choice::Token(text) => text,
                    _ => "",
                };
                o.extend_from_slice(br#"{"finish_reason":null,"index":0,"logprobs":null,"text":"#);
                json_str(o, text);
                o.push(b'}');
            }
            (_, Choice::Finish) => o.extend_from_slice(
                br#"{"finish_reason":"length","index":0,"logprobs":null,"text":""}"#,
            ),
        }
    }

    /// `,"usage":{...}` with `done` completion tokens.
    fn write_usage(&self, o: &mut Vec<u8>, done: u32) {
        let mut digits = [0; 20];
        o.extend_from_slice(br#","usage":{"completion_tokens":"#);
        o.extend_from_slice(decimal(u64::from(done), &mut digits));
        o.extend_from_slice(br#","prompt_tokens":"#);
        o.extend_from_slice(decimal(self.prompt_tokens, &mut digits));
        o.extend_from_slice(br#","total_tokens":"#);
        let total = self.prompt_tokens.saturating_add(u64::from(done));
        o.extend_from_slice(decimal(total, &mut digits));
        o.push(b'}');
    }

    /// The chat role delta; text completions open with their first token.
    pub(super) fn openai_opening(&self) -> Vec<Vec<u8>> {
        match self.kind {
            Kind::Chat => vec![self.openai_chunk(Some(Choice::Opening), 0)],
            _ => Vec::new(),
        }
    }

    pub(super) fn openai_token(&self, i: u32) -> Vec<u8> {
        let text = self.token_text(i);
        self.openai_chunk(Some(Choice::Token(&text)), i + 1)
    }

    /// Finish chunk, usage chunk (if asked), `[DONE]`.
    pub(super) fn openai_closing(&self) -> Vec<Vec<u8>> {
        let n = self.completion_tokens;
        let mut events = vec![self.openai_chunk(Some(Choice::Finish), n)];
        if self.include_usage {
            events.push(self.openai_chunk(None, n));
        }
        events.push(b"data: [DONE]\n\n".to_vec());
        events
    }
}

/// The choice a stream chunk carries.
#[derive(Debug, Clone, Copy)]
enum Choice<'a> {
    /// Chat's role delta.
    Opening,
    Token(&'a str),
    Finish,
}

/// `s` as a JSON string (serde_json's escaping).
fn json_str(o: &mut Vec<u8>, s: &str) {
    // Writing to a Vec cannot fail; the string is pushed unescaped only if it somehow did.
    if serde_json::to_writer(&mut *o, s).is_err() {
        o.extend_from_slice(s.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::generation::tests::{completion, event_json};

    /// The chunk as the mock built it before it wrote chunks directly: a `serde_json::Value`
    /// (keys in `serde_json`'s order), serialised.
    fn value_chunk(c: &Completion, choice: Option<Choice<'_>>, done: u32) -> Vec<u8> {
        let choice = choice.map(|ch| {
            let (delta, text, finish) = match ch {
                Choice::Opening => (json!({"role": "assistant", "content": ""}), "", Value::Null),
                Choice::Token(t) => (json!({ "content": t }), t, Value::Null),
                Choice::Finish => (json!({}), "", json!("length")),
            };
            match c.kind {
                Kind::Chat => {
                    json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
                }
                _ => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
            }
        });
        let object = match c.kind {
            Kind::Chat => "chat.completion.chunk",
            _ => "text_completion",
        };
        let mut chunk =
            json!({"id": c.id, "object": object, "created": c.created, "model": c.model});
        let usage = |done: u32| {
            json!({"prompt_tokens": c.prompt_tokens, "completion_tokens": done,
                   "total_tokens": c.prompt_tokens + u64::from(done)})
        };
        match choice {
            Some(choice) => {
                chunk["choices"] = json!([choice]);
                chunk["timings"] = json!({"predicted_ms": 1.0});
                if c.running_usage {
                    chunk["usage"] = usage(done);
                } else if c.include_usage {
                    chunk["usage"] = Value::Null;
                }
            }
            None => {
                chunk["choices"] = json!([]);
                chunk["usage"] = usage(c.completion_tokens);
            }
        }
        format!("data: {chunk}\n\n").into_bytes()
    }

    #[test]
    fn chunks_are_what_serde_json_writes_for_them() {
        for kind in [Kind::Chat, Kind::Text] {
            for (include, running) in [(false, false), (true, false), (true, true)] {
                let mut c = completion(kind, 3, include);
                c.running_usage = running;
                c.id = "chatcmpl-\"odd\\id\u{1}é".to_string();
                c.model = "org/model \"quoted\"".to_string();
                c.created = 1_796_552_103;
                let choices = [
                    Some(Choice::Opening),
                    Some(Choice::Token("tok0 ")),
                    Some(Choice::Token("a \"quote\", a \\ and \n\t\u{7f}ü")),
                    Some(Choice::Finish),
                    None,
                ];
                for choice in choices {
                    if kind == Kind::Text && matches!(choice, Some(Choice::Opening)) {
                        continue;
                    }
                    for done in [0, 2, 3] {
                        assert_eq!(
                            String::from_utf8(c.openai_chunk(choice, done)).unwrap(),
                            String::from_utf8(value_chunk(&c, choice, done)).unwrap(),
                            "{kind:?} include {include} running {running} {choice:?} {done}"
                        );
                    }
                }
            }
        }
    }

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
