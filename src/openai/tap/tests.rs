use super::*;

#[test]
fn top_level_value_skips_strings_and_nested_objects() {
    let body = br#"{"choices":[{"message":{"content":"say \"usage\": 5 {"},"usage":{"x":1}}],"model":"m","usage" : {"prompt_tokens":3}}"#;
    let at = top_level_value(body, b"usage").unwrap();
    assert!(body[at..]
        .trim_ascii_start()
        .starts_with(br#"{"prompt_tokens":3}"#));
    assert_eq!(top_level_value(br#"{"a":{"usage":1}}"#, b"usage"), None);
    assert_eq!(top_level_value(br#"["usage",{"usage":1}]"#, b"usage"), None);
    assert_eq!(top_level_value(br#"{"usage"#, b"usage"), None);
    assert_eq!(top_level_value(br#"{"x":"\"#, b"usage"), None);
    assert_eq!(top_level_value(b"}}{", b"usage"), None);
    assert_eq!(top_level_value(br#"{"usage":null}"#, b"usage"), Some(9));
}

#[test]
fn top_level_takes_the_last_key_only_when_it_is_top_level() {
    let get = |b: &[u8]| top_level::<serde_json::Value>(b, b"usage");
    // Usual layout: usage last, found from the end.
    let b = br#"{"choices":[{"text":"a \"usage\": {}"}],"usage":{"n":1}}"#;
    assert_eq!(get(b), Some(serde_json::json!({"n": 1})));
    // A nested usage after the top-level one: the structural scan takes the right one.
    let b = br#"{"usage":{"n":2},"x":[{"usage":{"n":3}}]}"#;
    assert_eq!(get(b), Some(serde_json::json!({"n": 2})));
    // Only a nested one: none.
    assert_eq!(get(br#"{"x":{"usage":{"n":3}}}"#), None);
    // Keys after usage, blanks at the end.
    let b = b"{\"usage\": {\"n\":4} , \"z\": \"}\"}\n";
    assert_eq!(get(b), Some(serde_json::json!({"n": 4})));
    assert_eq!(
        get(br#"{"usage":{"n":5}"#),
        Some(serde_json::json!({"n": 5}))
    );
}

fn run(kind: Kind, parts: &[&[u8]]) -> (Vec<u8>, Option<Usage>) {
    let mut tap = Tap::new(kind);
    let mut out = Vec::new();
    for p in parts {
        tap.feed(p, &mut |d| out.extend_from_slice(d));
    }
    tap.finish(&mut |d| out.extend_from_slice(d));
    (out, tap.usage())
}

const STREAM: &str = concat!(
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}],\"usage\":null}\n\n",
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9,",
    "\"prompt_tokens_details\":{\"cached_tokens\":3},\"completion_tokens_details\":{\"reasoning_tokens\":1}}}\n\n",
    "data: [DONE]\n\n"
);

#[test]
fn sse_usage_at_every_split_point() {
    let b = STREAM.as_bytes();
    for cut in 0..b.len() {
        let (out, u) = run(Kind::OpenAiSse { strip: false }, &[&b[..cut], &b[cut..]]);
        assert_eq!(out, b, "observe mode forwards everything, cut {cut}");
        let u = u.expect("usage");
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (7, 2, 9)
        );
        assert_eq!(u.cached_tokens, Some(3));
        assert_eq!(u.reasoning_tokens, Some(1));
    }
}

#[test]
fn absurd_counts_saturate_instead_of_overflowing() {
    // Found by the fuzzer: prompt + completion overflowed (a panic in debug builds).
    let max = u64::MAX;
    let sse = format!(
        "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{max},\"completion_tokens\":1}}}}\n\n"
    );
    let (_, u) = run(Kind::OpenAiSse { strip: true }, &[sse.as_bytes()]);
    assert_eq!(u.expect("usage").total_tokens, max);
    let tgi = format!("{{\"details\":{{\"generated_tokens\":{max},\"input_length\":2}}}}");
    let (_, u) = run(Kind::TgiJson, &[tgi.as_bytes()]);
    assert_eq!(u.expect("usage").total_tokens, max);
    let mut tap = Tap::new(Kind::TgiJson);
    tap.set_header_counts(Some(max), Some(max));
    assert_eq!(tap.usage().expect("usage").total_tokens, max);
}

#[test]
fn strip_removes_only_the_usage_only_event() {
    let b = STREAM.as_bytes();
    let start = STREAM.find("data: {\"choices\":[],").unwrap();
    let end = STREAM.find("data: [DONE]").unwrap();
    let mut expected = b[..start].to_vec();
    expected.extend_from_slice(&b[end..]);
    for cut in 0..b.len() {
        let (out, u) = run(Kind::OpenAiSse { strip: true }, &[&b[..cut], &b[cut..]]);
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&expected),
            "cut {cut}"
        );
        assert_eq!(u.unwrap().total_tokens, 9);
    }
    // Byte by byte too.
    let parts: Vec<&[u8]> = b.chunks(1).collect();
    let (out, _) = run(Kind::OpenAiSse { strip: true }, &parts);
    assert_eq!(out, expected);
}

#[test]
fn fields_moved_onto_the_usage_chunk_go_back_to_the_finish_chunk() {
    // llama.cpp: without include_usage, `timings` rides on the finish chunk; with it, on the
    // usage-only chunk. The client must see the former.
    let with_usage = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1},\"timings\":{\"predicted_ms\":1.5,\"n\":[1,2]}}\n\n",
        "data: [DONE]\n\n"
    );
    let expected = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}],\"timings\":{\"predicted_ms\":1.5,\"n\":[1,2]}}\n\n",
        "data: [DONE]\n\n"
    );
    let b = with_usage.as_bytes();
    for cut in 0..b.len() {
        let (out, u) = run(Kind::OpenAiSse { strip: true }, &[&b[..cut], &b[cut..]]);
        assert_eq!(String::from_utf8_lossy(&out), expected, "cut {cut}");
        assert_eq!(u.unwrap().total_tokens, 4);
    }
    // A finish chunk with nothing after it is released at the end of the body.
    let only = "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
    let (out, _) = run(Kind::OpenAiSse { strip: true }, &[only.as_bytes()]);
    assert_eq!(out, only.as_bytes());
}

#[test]
fn usage_on_a_chunk_with_choices_is_kept_and_counted() {
    // llama.cpp / some servers: usage on the finish chunk, which must not be removed.
    let s = "data: {\"choices\":[{\"index\":0,\"delta\":{}}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":5}}\r\n\r\ndata: [DONE]\r\n\r\n";
    let (out, u) = run(Kind::OpenAiSse { strip: true }, &[s.as_bytes()]);
    assert_eq!(out, s.as_bytes());
    assert_eq!(u.unwrap().total_tokens, 6);
}

#[test]
fn last_usage_wins_and_null_is_skipped() {
    let s = "data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\ndata: {\"usage\": null}\n\ndata: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":4}}\n\n";
    let (_, u) = run(Kind::OpenAiSse { strip: false }, &[s.as_bytes()]);
    assert_eq!(u.unwrap().completion_tokens, 4);
    assert!(!has_non_null(b"{\"usage\" :  null}", b"\"usage\""));
    assert!(has_non_null(b"{\"usage\":{}}", b"\"usage\""));
    // A token chunk (finish_reason null) is never held back.
    assert!(!has_non_null(
        b"{\"finish_reason\":null}",
        b"\"finish_reason\""
    ));
    assert!(has_non_null(
        b"{\"finish_reason\":\"stop\"}",
        b"\"finish_reason\""
    ));
}

#[test]
fn json_bodies() {
    let body = br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":4,"completion_tokens":6,"total_tokens":10}}"#;
    let (out, u) = run(Kind::OpenAiJson, &[&body[..20], &body[20..]]);
    assert_eq!(out, body);
    assert_eq!(u.unwrap().total_tokens, 10);
    let responses = br#"{"usage":{"input_tokens":3,"output_tokens":2,"output_tokens_details":{"reasoning_tokens":1}}}"#;
    let (_, u) = run(Kind::OpenAiJson, &[responses]);
    let u = u.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (3, 2, 5)
    );
    assert_eq!(u.reasoning_tokens, Some(1));
    let (_, u) = run(Kind::OpenAiJson, &[b"not json"]);
    assert_eq!(u, None);
}

#[test]
fn tgi_bodies_events_and_headers() {
    let (_, u) = run(
        Kind::TgiJson,
        &[br#"{"generated_text":"x","details":{"finish_reason":"length","generated_tokens":5}}"#],
    );
    assert_eq!(u.unwrap().completion_tokens, 5);
    let mut tap = Tap::new(Kind::TgiJson);
    tap.set_header_counts(Some(9), Some(5));
    tap.feed(br#"{"generated_text":"x"}"#, &mut |_| {});
    tap.finish(&mut |_| {});
    let u = tap.usage().unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (9, 5, 14)
    );
    let s = "data:{\"index\":1,\"token\":{\"id\":1},\"generated_text\":null,\"details\":null}\n\ndata:{\"index\":2,\"token\":{\"id\":2},\"generated_text\":\"ab\",\"details\":{\"finish_reason\":\"length\",\"generated_tokens\":2,\"input_length\":3}}\n\n";
    let (out, u) = run(Kind::TgiSse, &[s.as_bytes()]);
    assert_eq!(out, s.as_bytes());
    let u = u.unwrap();
    assert_eq!((u.prompt_tokens, u.completion_tokens), (3, 2));
}
