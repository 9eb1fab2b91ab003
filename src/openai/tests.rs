//! Request inspection, the body rewrites (include_usage, running usage, per-token timings,
//! model renames), error-body classification and response kinds.

use super::*;

fn info(body: &[u8]) -> RequestInfo {
    inspect("POST", "/v1/chat/completions", body, "user").unwrap()
}

#[test]
fn reads_model_stream_options_and_user() {
    let i = info(br#"{"model":"llama","messages":[{"role":"user","content":"hi \"x\""}],"stream":true,"user":"u1"}"#);
    assert_eq!(i.model.as_deref(), Some("llama"));
    assert!(i.stream && !i.include_usage && !i.has_stream_options);
    assert_eq!(i.user.as_deref(), Some("u1"));
    let i = info(br#"{"model":"a\u0062","stream":true,"stream_options":{"include_usage":true}}"#);
    assert_eq!(i.model.as_deref(), Some("ab"));
    assert!(i.include_usage);
    assert_eq!(
        info(br#"{"model":"","stream":false}"#).model.as_deref(),
        Some("")
    );
    assert_eq!(
        info(br#"{"model" : "q\"x\\"}"#).model.as_deref(),
        Some("q\"x\\")
    );
    for bad in [&br#"{"model":5}"#[..], br#"{"model":["m"]}"#] {
        let e = inspect("POST", "/v1/chat/completions", bad, "user");
        assert!(matches!(e, Err(ProxyError::BadRequest(_))), "{e:?}");
    }
    let i = inspect(
        "POST",
        "/v1/chat/completions",
        br#"{"model":"m","tenant":"t9"}"#,
        "tenant",
    )
    .unwrap();
    assert_eq!(i.user.as_deref(), Some("t9"));
}

fn keyed(body: &[u8], prefix: usize) -> RequestInfo {
    inspect_with("POST", "/v1/chat/completions", body, "user", prefix, None).unwrap()
}

#[test]
fn prefix_key_covers_only_the_first_messages() {
    let turn1 = br#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}"#;
    let turn2 = br#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},{"role":"assistant","content":"hello"},{"role":"user","content":"more"}],"model":"m"}"#;
    let other = br#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"bye"}]}"#;
    let k1 = keyed(turn1, 2).prefix_key;
    assert!(k1.is_some());
    assert_eq!(k1, keyed(turn2, 2).prefix_key);
    assert_ne!(k1, keyed(other, 2).prefix_key);
    // One message: only the (shared) system prompt.
    assert_eq!(keyed(turn1, 1).prefix_key, keyed(other, 1).prefix_key);
    // Not asked for: not computed.
    assert_eq!(keyed(turn1, 0).prefix_key, None);
    // Completions hash the start of the prompt.
    let p1 = keyed(br#"{"prompt":"once upon a time"}"#, 2).prefix_key;
    assert!(p1.is_some());
    assert_ne!(
        p1,
        keyed(br#"{"prompt":"twice upon a time"}"#, 2).prefix_key
    );
    // Odd `messages` shapes are the backend's to judge, not a reason to fail here.
    for odd in [
        &br#"{"messages":"text"}"#[..],
        br#"{"messages":{"a":[1]}}"#,
        br#"{"messages":[]}"#,
        br#"{"messages":null}"#,
        br#"{"messages":7}"#,
    ] {
        assert_eq!(keyed(odd, 2).prefix_key, None);
    }
    assert!(inspect_with(
        "POST",
        "/v1/chat/completions",
        br#"{"messages":[1,"#,
        "user",
        2,
        None
    )
    .is_err());
}

#[test]
fn prompt_blocks_cover_the_conversation_in_order() {
    let cut = Some(Blocks { bytes: 16, max: 64 });
    let chain = |body: &[u8]| {
        inspect_with("POST", "/v1/chat/completions", body, "user", 0, cut)
            .unwrap()
            .blocks
    };
    let system = "s".repeat(100);
    let t1 = format!(
        r#"{{"model":"m","messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"first question"}}]}}"#
    );
    let t2 = format!(
        r#"{{"messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"first question"}},{{"role":"assistant","content":"an answer"}},{{"role":"user","content":"and more"}}],"model":"m"}}"#
    );
    let other = format!(
        r#"{{"model":"m","messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"other"}}]}}"#
    );
    let (a, b, c) = (
        chain(t1.as_bytes()),
        chain(t2.as_bytes()),
        chain(other.as_bytes()),
    );
    // The next turn extends the conversation: it shares every full block of the first
    // (the last one ends inside `}`, `]` ... which the longer text has as `},{`).
    assert!(b.len() > a.len());
    let shared = a.iter().zip(&*b).take_while(|(x, y)| x == y).count();
    assert!(shared >= a.len() - 1, "{shared} of {}", a.len());
    // Same system prompt, another question: the system prompt's blocks only.
    let common = a.iter().zip(&*c).take_while(|(x, y)| x == y).count();
    assert!(common >= 100 / 16 && common < a.len(), "{common}");
    // Completions: the prompt string; no body text outside it counts.
    let p = |body: &[u8]| {
        inspect_with("POST", "/v1/completions", body, "user", 0, cut)
            .unwrap()
            .blocks
    };
    let long = "w".repeat(64);
    assert_eq!(
        p(format!(r#"{{"prompt":"{long}","max_tokens":1}}"#).as_bytes()),
        p(format!(r#"{{"max_tokens":99,"prompt":"{long}"}}"#).as_bytes())
    );
    // Not asked for, or nothing to cut: empty.
    assert!(inspect_with(
        "POST",
        "/v1/chat/completions",
        t1.as_bytes(),
        "user",
        0,
        None
    )
    .unwrap()
    .blocks
    .is_empty());
    assert!(chain(br#"{"messages":[]}"#).is_empty());
}

#[test]
fn user_key_and_model_span() {
    let body = br#"{"user":"alice", "model" : "llama-3","stream":false}"#;
    let i = keyed(body, 0);
    assert_eq!(i.user_key, Some(hash_bytes(b"alice")));
    assert_eq!(i.model.as_deref(), Some("llama-3"));
    let (a, b) = i.model_span.unwrap();
    assert_eq!(&body[a..b], br#""llama-3""#);
    assert_eq!(keyed(br#"{"model":null}"#, 0).model_span, None);
    assert!(inspect(
        "POST",
        "/v1/chat/completions",
        br#"{"model":["x"]}"#,
        "user"
    )
    .is_err());
}

#[test]
fn model_rewrite_is_a_splice() {
    let body = br#"{ "model" : "fast", "messages":[{"content":"model: fast"}]}"#;
    let i = keyed(body, 0);
    let out = rewrite_model(body, i.model_span.unwrap(), "llama \"3\"").unwrap();
    assert_eq!(
        out,
        br#"{ "model" : "llama \"3\"", "messages":[{"content":"model: fast"}]}"#
    );
    assert_eq!(rewrite_model(body, (5, 500), "x"), None);
}

#[test]
fn context_length_errors_of_each_engine() {
    for body in [
        &br#"{"object":"error","message":"This model's maximum context length is 4096 tokens. However, you requested 5000 tokens","type":"BadRequestError","code":400}"#[..],
        br#"{"error":"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4000 `inputs` tokens and 200 `max_new_tokens`","error_type":"validation"}"#,
        br#"{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error"}}"#,
        br#"{"error":{"message":"...","type":"invalid_request_error","code":"context_length_exceeded"}}"#,
        br#"{"object":"error","message":"The input (5000 tokens) is longer than the model's context length (4096 tokens)."}"#,
    ] {
        assert!(is_context_length_error(body), "{}", String::from_utf8_lossy(body));
    }
    assert!(!is_context_length_error(
        br#"{"error":{"message":"invalid temperature"}}"#
    ));
    assert!(may_be_context_error(422) && !may_be_context_error(500));
}

#[test]
fn rejects_non_json_on_json_routes_only() {
    // Invalid UTF-8 in a member the inspector skips was accepted before (found by fuzzing).
    let skipped = b"{\"model\":\"m\",\"messages\":[{\"content\":\"\xff\"}]}";
    for bad in [
        &b"not json"[..],
        b"[1,2]",
        b"[]",
        br#"["m",true]"#,
        br#"{"model":5}"#,
        b"\xff\xfe",
        skipped,
    ] {
        assert!(inspect("POST", "/v1/chat/completions", bad, "user").is_err());
    }
    assert!(inspect("POST", "/other", b"not json", "user").is_ok());
    assert!(inspect("POST", "/other", b"", "user").is_ok());
    assert!(inspect("GET", "/v1/models", b"", "user").is_ok());
    // An empty body is not a JSON object either (issue 20).
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/generate",
        "/generate_stream",
    ] {
        assert!(inspect("POST", path, b"", "user").is_err(), "{path}");
    }
    assert!(
        inspect("POST", "/generate_stream", br#"{"inputs":"x"}"#, "user")
            .unwrap()
            .stream
    );
}

#[test]
fn injection_splices_or_rewrites_and_stays_valid_json() {
    let body = br#"{"model":"m","stream":true,"messages":[]}"#;
    let out = inject_include_usage("/v1/chat/completions", body, &info(body)).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["stream_options"]["include_usage"], true);
    assert_eq!(v["model"], "m");
    let body = br#" { "stream": true, "stream_options": {"include_usage": false, "x": 1} }"#;
    let out = inject_include_usage("/v1/completions", body, &info(body)).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["stream_options"]["include_usage"], true);
    assert_eq!(v["stream_options"]["x"], 1);
    // Nothing to do: not streaming, already asked, or an endpoint without stream_options.
    // Found by the fuzzer: a `null` stream_options is rewritten, not shadowed by a splice.
    let body = br#"{"model":"m","stream":true,"stream_options":null}"#;
    let i = info(body);
    assert!(i.has_stream_options && !i.include_usage);
    let out = inject_include_usage("/v1/chat/completions", body, &i).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.matches("stream_options").count(), 1, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["stream_options"]["include_usage"], true);
    // Found by the fuzzer: members are copied as written, never re-rendered (a number
    // beyond u64 went through f64 and came out different).
    let body =
        br#"{"stream":true,"x":18446744073709574407370955,"y":1.10,"stream_options":{"z":1e400}}"#;
    let out = inject_include_usage("/v1/chat/completions", body, &info(body)).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains(r#""x":18446744073709574407370955"#), "{text}");
    assert!(text.contains(r#""y":1.10"#), "{text}");
    assert!(text.contains(r#""include_usage":true"#), "{text}");
    assert!(text.contains(r#""z":1e400"#), "{text}");
    let b = br#"{"stream":false}"#;
    assert!(inject_include_usage("/v1/chat/completions", b, &info(b)).is_none());
    let b =
        br#"{"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true}}"#;
    assert!(inject_include_usage("/v1/chat/completions", b, &info(b)).is_none());
    let b = br#"{"stream":true}"#;
    assert!(inject_include_usage("/v1/embeddings", b, &info(b)).is_none());
}

#[test]
fn running_usage_is_asked_for_and_can_be_taken_back() {
    // Nothing asked: both added by a splice; the tap removes both.
    let body = br#"{"model":"m","stream":true,"messages":[{"content":"x"}]}"#;
    let i = info(body);
    assert_eq!(usage_to_strip(&i), (true, true));
    let out = inject_include_usage("/v1/chat/completions", body, &i).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["stream_options"]["continuous_usage_stats"], true);
    let plain = without_running_usage(&out).unwrap();
    assert_eq!(
        plain,
        br#"{"stream_options":{"include_usage":true},"model":"m","stream":true,"messages":[{"content":"x"}]}"#
    );
    // The client asked for include_usage only: the running usage is added, and removed
    // from its stream, the final chunk stays.
    let body = br#"{"stream":true,"stream_options":{"include_usage":true}}"#;
    let i = info(body);
    assert!(i.include_usage && !i.continuous_usage);
    assert_eq!(usage_to_strip(&i), (false, true));
    let out = inject_include_usage("/v1/chat/completions", body, &i).unwrap();
    assert_eq!(
        out,
        br#"{"stream":true,"stream_options":{"continuous_usage_stats":true,"include_usage":true}}"#
    );
    assert_eq!(
        without_running_usage(&out).unwrap(),
        br#"{"stream":true,"stream_options":{"include_usage":true}}"#
    );
    // Both asked: the stream is the client's.
    let body =
        br#"{"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true}}"#;
    let i = info(body);
    assert_eq!(usage_to_strip(&i), (false, false));
    // continuous_usage_stats without include_usage gives nothing on vLLM: both removed.
    let body = br#"{"stream":true,"stream_options":{"continuous_usage_stats":true}}"#;
    assert_eq!(usage_to_strip(&info(body)), (true, true));
    // Only a member of the top-level stream_options is taken back.
    let nested = br#"{"tools":{"continuous_usage_stats":true},"stream_options":{}}"#;
    assert_eq!(without_running_usage(nested), None);
    assert!(rejects_running_usage(
        400,
        br#"{"error":{"message":"Unrecognized request argument supplied: stream_options.continuous_usage_stats"}}"#
    ));
    assert!(!rejects_running_usage(
        400,
        br#"{"error":"bad temperature"}"#
    ));
    assert!(!rejects_running_usage(500, b"continuous_usage_stats"));
}

#[test]
fn response_kinds() {
    assert_eq!(
        response_kind("/v1/chat/completions", 200, true, (true, true), false),
        Kind::OpenAiSse {
            strip: true,
            running: true,
            timings: false
        }
    );
    assert_eq!(
        response_kind("/v1/embeddings", 200, false, (false, false), false),
        Kind::OpenAiJson
    );
    assert_eq!(
        response_kind("/generate", 200, false, (false, false), false),
        Kind::TgiJson
    );
    assert_eq!(
        response_kind("/generate_stream", 200, true, (false, false), false),
        Kind::TgiSse
    );
    assert_eq!(
        response_kind("/v1/chat/completions", 500, false, (false, false), false),
        Kind::None
    );
}

#[test]
fn per_token_timings_are_asked_for_once() {
    let got = with_per_token_timings(br#" {"model":"m","stream":true}"#).unwrap();
    assert_eq!(
        got,
        br#" {"timings_per_token":true,"model":"m","stream":true}"#
    );
    assert_eq!(
        with_per_token_timings(b"{ }").unwrap(),
        br#"{"timings_per_token":true }"#
    );
    // The client asked itself (whatever the value): left alone, and nothing is removed.
    assert!(with_per_token_timings(br#"{"timings_per_token":false}"#).is_none());
    // A nested member of that name is not the top-level one.
    let nested = br#"{"x":{"timings_per_token":1}}"#;
    assert_eq!(
        with_per_token_timings(nested).unwrap(),
        br#"{"timings_per_token":true,"x":{"timings_per_token":1}}"#
    );
    assert!(with_per_token_timings(b"[1]").is_none());
    assert!(with_per_token_timings(b"").is_none());
}

#[test]
fn id_slot_pins_a_json_object_once() {
    let got = with_id_slot(br#" {"model":"m","messages":[]}"#, 3).unwrap();
    assert_eq!(got, br#" {"id_slot":3,"model":"m","messages":[]}"#);
    let v: serde_json::Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(v["id_slot"], 3);
    assert_eq!(with_id_slot(b"{}", 0).unwrap(), br#"{"id_slot":0}"#);
    // The client's own pin (whatever its value) is kept; a nested member is not it.
    assert!(with_id_slot(br#"{"id_slot":-1,"model":"m"}"#, 1).is_none());
    assert_eq!(
        with_id_slot(br#"{"x":{"id_slot":1}}"#, 2).unwrap(),
        br#"{"id_slot":2,"x":{"id_slot":1}}"#
    );
    // Not a JSON object: left alone.
    assert!(with_id_slot(b"[1]", 1).is_none());
    assert!(with_id_slot(b"", 1).is_none());
    assert!(with_id_slot(b"not json", 1).is_none());
}
