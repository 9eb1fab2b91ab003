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

/// The hand reading of a usage value answers what serde answers, for the shapes it reads and
/// for every shape it leaves to serde; and so does the body lookup built on it.
#[test]
fn usage_read_by_hand_agrees_with_serde() {
    let cases: &[&str] = &[
        r#"{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}"#,
        r#" { "prompt_tokens" : 7 , "completion_tokens":2 }  "#,
        "{\n\t\"input_tokens\":\r 1,\"output_tokens\":0}",
        r#"{}"#,
        r#"null"#,
        r#"{"prompt_tokens":null,"total_tokens":18446744073709551615}"#,
        r#"{"prompt_tokens":18446744073709551616}"#,
        r#"{"prompt_tokens":1.0}"#,
        r#"{"prompt_tokens":1e3}"#,
        r#"{"prompt_tokens":-1}"#,
        r#"{"prompt_tokens":01}"#,
        r#"{"prompt_tokens":0,"completion_tokens":10}"#,
        r#"{"prompt_tokens":"7"}"#,
        r#"{"prompt_tokens":7,"prompt_tokens":8}"#,
        r#"{"prompt_tokens":7,"input_tokens":8}"#,
        r#"{"prompt_tokens":7,}"#,
        r#"{"prompt_tokens":7"#,
        r#"{"prompt_tokens":7}x"#,
        r#"{"prompt_tokens":7} "#,
        r#"{"prompt_tokens":nul}"#,
        r#"{"prompt_tokens":nullx}"#,
        r#"{"prompt_tokens":true}"#,
        r#"{"other":1.5,"prompt_tokens":3}"#,
        r#"{"other":[1],"prompt_tokens":3}"#,
        r#"{"other":{"a":1},"prompt_tokens":3}"#,
        r#"{"other":null,"other":2,"prompt_tokens":3}"#,
        r#"{"pr\u006fmpt_tokens":3}"#,
        "{\"prompt_tokens\u{e9}\":3}",
        r#"{"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":1}}"#,
        r#"{"input_tokens_details":{"cached_tokens":null},"output_tokens_details":null}"#,
        r#"{"prompt_tokens_details":{"cached_tokens":3,"cached_tokens":4}}"#,
        r#"{"prompt_tokens_details":{"cached_tokens":3},"input_tokens_details":{}}"#,
        r#"{"prompt_tokens_details":{},"completion_tokens_details":{"x":"y"}}"#,
        r#"{"prompt_tokens_details":[],"total_tokens":1}"#,
        r#"{"prompt_tokens_details":nul}"#,
        r#"[1,2]"#,
        "",
        "{\"prompt_tokens\":\u{c}1}",
        r#"{"prompt_tokensX":1,"total_tokens_details":2,"prompt_tokens_detail":3,"p":4,"":5}"#,
        r#"{"completion_tokens_details":{"reasoning_tokens":12345678901234567890}}"#,
        r#"{"total_tokens":1234567890123456789,"prompt_tokens":9999999999999999999}"#,
        "{\"a_long_unknown_key\u{7f}\":1,\"prompt_tokens\":2}",
        "{\"a_long_unknown_\u{e9}_key\":1,\"prompt_tokens\":2}",
        "{\"a_long_unknown_key_\\\"\":1,\"prompt_tokens\":2}",
        "{\"a_long_unknown_k\tey\":1,\"prompt_tokens\":2}",
    ];
    let serde = |v: &[u8]| {
        serde_json::from_slice::<Option<UsageJson>>(v)
            .ok()
            .flatten()
            .map(Usage::from)
    };
    // The usual shapes are read by hand, not handed on.
    for case in [cases[0], cases[1], cases[28], cases[29]] {
        assert!(UsageJson::scan(case.as_bytes(), 0).is_some(), "{case}");
    }
    for case in cases {
        let v = case.as_bytes();
        assert_eq!(
            UsageJson::from_slice(v).map(Usage::from),
            serde(v),
            "{case}"
        );
        for body in [
            format!(r#"{{"id":"x","choices":[{{"text":"usage"}}],"usage":{case}}}"#),
            format!(r#"{{"usage":{case},"model":"m"}}"#),
            format!(r#"{{"usage":{case}}} "#),
        ] {
            let b = body.as_bytes();
            let by_hand = |at| {
                UsageJson::scan(b, at)
                    .map(|(u, end)| (Some(u), end))
                    .or_else(|| serde_value_at::<Option<UsageJson>>(b, at))
            };
            assert_eq!(
                top_level_with(b, b"usage", by_hand)
                    .flatten()
                    .map(Usage::from),
                top_level::<Option<UsageJson>>(b, b"usage")
                    .flatten()
                    .map(Usage::from),
                "{body}"
            );
        }
    }
}

fn run(kind: Kind, parts: &[&[u8]]) -> (Vec<u8>, Option<Usage>) {
    let mut tap = Tap::new(kind);
    let mut out = Vec::new();
    for p in parts {
        tap.feed(p, &mut |d: &[u8]| out.extend_from_slice(d));
    }
    tap.finish(&mut |d: &[u8]| out.extend_from_slice(d));
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
        let (out, u) = run(
            Kind::OpenAiSse {
                strip: false,
                running: false,
                timings: false,
            },
            &[&b[..cut], &b[cut..]],
        );
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
    let (_, u) = run(
        Kind::OpenAiSse {
            strip: true,
            running: false,
            timings: false,
        },
        &[sse.as_bytes()],
    );
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
        let (out, u) = run(
            Kind::OpenAiSse {
                strip: true,
                running: false,
                timings: false,
            },
            &[&b[..cut], &b[cut..]],
        );
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&expected),
            "cut {cut}"
        );
        assert_eq!(u.unwrap().total_tokens, 9);
    }
    // Byte by byte too.
    let parts: Vec<&[u8]> = b.chunks(1).collect();
    let (out, _) = run(
        Kind::OpenAiSse {
            strip: true,
            running: false,
            timings: false,
        },
        &parts,
    );
    assert_eq!(out, expected);
}

#[test]
fn only_the_first_choices_array_makes_a_chunk_usage_only() {
    // A chunk with text and running usage, and an extension member after its choices that
    // happens to hold an empty `choices`: it is a text chunk (its usage edited out), never the
    // usage-only chunk that strip mode removes whole.
    let stream = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}],",
        "\"ext\":{\"choices\": [ ]},\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n",
        "data: {\"choices\" : [ ],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n",
        "data: [DONE]\n\n"
    );
    let (out, u) = run(
        Kind::OpenAiSse {
            strip: true,
            running: true,
            timings: false,
        },
        &[stream.as_bytes()],
    );
    assert_eq!(
        String::from_utf8_lossy(&out),
        concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}],",
            "\"ext\":{\"choices\": [ ]}}\n\n",
            "data: [DONE]\n\n"
        )
    );
    assert_eq!(u.map(|u| u.completion_tokens), Some(1));
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
        let (out, u) = run(
            Kind::OpenAiSse {
                strip: true,
                running: false,
                timings: false,
            },
            &[&b[..cut], &b[cut..]],
        );
        assert_eq!(String::from_utf8_lossy(&out), expected, "cut {cut}");
        assert_eq!(u.unwrap().total_tokens, 4);
    }
    // A finish chunk with nothing after it is released at the end of the body.
    let only = "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
    let (out, _) = run(
        Kind::OpenAiSse {
            strip: true,
            running: false,
            timings: false,
        },
        &[only.as_bytes()],
    );
    assert_eq!(out, only.as_bytes());
}

#[test]
fn usage_on_a_chunk_with_choices_is_kept_and_counted() {
    // llama.cpp / some servers: usage on the finish chunk, which must not be removed.
    let s = "data: {\"choices\":[{\"index\":0,\"delta\":{}}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":5}}\r\n\r\ndata: [DONE]\r\n\r\n";
    let (out, u) = run(
        Kind::OpenAiSse {
            strip: true,
            running: false,
            timings: false,
        },
        &[s.as_bytes()],
    );
    assert_eq!(out, s.as_bytes());
    assert_eq!(u.unwrap().total_tokens, 6);
}

#[test]
fn last_usage_wins_and_null_is_skipped() {
    let s = "data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\ndata: {\"usage\": null}\n\ndata: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":4}}\n\n";
    let (_, u) = run(
        Kind::OpenAiSse {
            strip: false,
            running: false,
            timings: false,
        },
        &[s.as_bytes()],
    );
    assert_eq!(u.unwrap().completion_tokens, 4);
    assert!(usage_member(b"{\"usage\" :  null}").is_none());
    assert!(usage_member(b"{\"usage\":{}}").is_some());
    // A token chunk (finish_reason null) is never held back.
    assert!(!has_finish(b"{\"finish_reason\":null}"));
    assert!(has_finish(b"{\"finish_reason\":\"stop\"}"));
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
    tap.feed(br#"{"generated_text":"x"}"#, &mut |_: &[u8]| {});
    tap.finish(&mut |_: &[u8]| {});
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

/// vLLM with `continuous_usage_stats`: every chunk carries the usage so far.
const RUNNING: &str = concat!(
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":{\"prompt_tokens\":5,\"total_tokens\":5,\"completion_tokens\":0}}\n\n",
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}],\"usage\":{\"prompt_tokens\":5,\"total_tokens\":6,\"completion_tokens\":1}}\n\n",
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"},\"finish_reason\":\"length\"}],\"usage\":{\"prompt_tokens\":5,\"total_tokens\":7,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n",
    "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"total_tokens\":7,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n",
    "data: [DONE]\n\n"
);

fn without_usage(null: bool) -> String {
    let mut out = String::new();
    for event in RUNNING.split_inclusive("\n\n") {
        if event.contains("\"choices\":[]") {
            if null {
                out.push_str(event);
            }
            continue;
        }
        match event.find(",\"usage\":") {
            Some(at) => {
                let end = event.rfind("}\n\n").unwrap();
                out.push_str(&event[..at]);
                if null {
                    out.push_str(",\"usage\":null");
                }
                out.push_str(&event[end..]);
            }
            None => out.push_str(event),
        }
    }
    out
}

#[test]
fn running_usage_is_removed_as_the_client_would_have_seen_it() {
    let b = RUNNING.as_bytes();
    // (strip the usage-only chunk, strip running usage) → what the client sees.
    let cases = [
        ((true, true), without_usage(false)),
        ((false, true), without_usage(true)),
        ((false, false), RUNNING.to_string()),
    ];
    for ((strip, running), expected) in cases {
        for cut in 0..b.len() {
            let (out, u) = run(
                Kind::OpenAiSse {
                    strip,
                    running,
                    timings: false,
                },
                &[&b[..cut], &b[cut..]],
            );
            assert_eq!(
                String::from_utf8_lossy(&out),
                expected,
                "strip {strip} running {running} cut {cut}"
            );
            let u = u.unwrap();
            assert_eq!((u.prompt_tokens, u.completion_tokens), (5, 2));
            assert_eq!(u.cached_tokens, Some(4));
            assert_eq!(u.source, Source::Reported);
        }
    }
    // The member comes first: it goes with the comma after it.
    let first = "data: {\"usage\":{\"completion_tokens\":1}, \"choices\":[{\"delta\":{}}]}\n\n";
    let (out, _) = run(
        Kind::OpenAiSse {
            strip: true,
            running: true,
            timings: false,
        },
        &[first.as_bytes()],
    );
    assert_eq!(out, b"data: {\"choices\":[{\"delta\":{}}]}\n\n");
}

#[test]
fn an_aborted_stream_is_billed_its_last_running_usage() {
    let b = RUNNING.as_bytes();
    let cut = RUNNING
        .find("data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"}")
        .unwrap();
    let mut tap = Tap::new(Kind::OpenAiSse {
        strip: true,
        running: true,
        timings: false,
    });
    // The next event is half there: not counted, not sent.
    tap.feed(&b[..cut + 30], &mut |_: &[u8]| {});
    let u = tap.usage().unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (5, 1, 6)
    );
    assert_eq!(u.source, Source::Reported);
}

#[test]
fn usage_on_the_finish_chunk_alone_is_not_running_usage() {
    // llama.cpp and others put the final usage on the finish chunk: it stays.
    let s = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
    let (out, u) = run(
        Kind::OpenAiSse {
            strip: true,
            running: true,
            timings: false,
        },
        &[s.as_bytes()],
    );
    assert_eq!(String::from_utf8_lossy(&out), s);
    assert_eq!(u.unwrap().total_tokens, 2);
}

#[test]
fn llama_cpp_timings_stand_in_for_usage() {
    let s = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"timings\":{\"cache_n\":3,\"prompt_n\":2,\"predicted_n\":1,\"predicted_ms\":1.5}}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"timings\":{\"cache_n\":3,\"prompt_n\":2,\"predicted_n\":2}}\n\n",
    );
    let (out, u) = run(
        Kind::OpenAiSse {
            strip: true,
            running: true,
            timings: false,
        },
        &[s.as_bytes()],
    );
    assert_eq!(out, s.as_bytes());
    let u = u.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
        (5, 2, Some(3))
    );
    assert_eq!(u.source, Source::Reported);
}

#[test]
fn without_any_usage_the_relayed_deltas_are_counted() {
    let s = concat!(
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"hm\"}}]}\n\n",
        "data: {\"choices\":[{\"text\": \"c\"}]}\n\n",
        "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: [DONE]\n\n",
    );
    let (out, u) = run(
        Kind::OpenAiSse {
            strip: true,
            running: true,
            timings: false,
        },
        &[s.as_bytes()],
    );
    assert_eq!(out, s.as_bytes());
    let u = u.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (0, 3, 3)
    );
    assert_eq!(u.source, Source::Counted);
    // TGI without details: one token per event.
    let t = "data:{\"token\":{\"id\":1,\"text\":\"a\"},\"details\":null}\n\ndata:{\"token\":{\"id\":2,\"text\":\"b\"},\"details\":null}\n\n";
    let (_, u) = run(Kind::TgiSse, &[t.as_bytes()]);
    let u = u.unwrap();
    assert_eq!((u.completion_tokens, u.source), (2, Source::Counted));
}

#[test]
fn an_endless_event_is_relayed_uninspected_within_the_bound() {
    for (strip, running) in [(true, true), (false, false)] {
        let mut tap = Tap::with_max_event(
            Kind::OpenAiSse {
                strip,
                running,
                timings: false,
            },
            1000,
        );
        let mut out = Vec::new();
        let head = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"x\":\"";
        tap.feed(head, &mut |d: &[u8]| out.extend_from_slice(d));
        let filler = [b'x'; 300];
        let mut sent = head.len();
        for _ in 0..100 {
            tap.feed(&filler, &mut |d: &[u8]| out.extend_from_slice(d));
            sent += filler.len();
            assert!(tap.held_bytes() <= 1000, "held {}", tap.held_bytes());
        }
        // Everything went on (in strip mode too), the end of the event is found across reads,
        // and the events after it are inspected again.
        assert_eq!(out.len(), sent);
        let rest = b"\"}\n";
        let after = b"\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":9}}\n\ndata: [DONE]\n\n";
        tap.feed(rest, &mut |d: &[u8]| out.extend_from_slice(d));
        tap.feed(after, &mut |d: &[u8]| out.extend_from_slice(d));
        tap.finish(&mut |d: &[u8]| out.extend_from_slice(d));
        assert_eq!(tap.oversized_events(), 1);
        assert_eq!(tap.usage().unwrap().completion_tokens, 9);
        let expected_len = sent + rest.len() + after.len()
            - if strip {
                after.len() - "\n".len() - "data: [DONE]\n\n".len()
            } else {
                0
            };
        assert_eq!(out.len(), expected_len, "strip {strip}");
    }
}

#[test]
fn a_long_event_in_small_reads_is_scanned_in_linear_time() {
    // 4 MiB in 64-byte reads: rescanning from the start on every read took minutes.
    let mut tap = Tap::with_max_event(
        Kind::OpenAiSse {
            strip: true,
            running: true,
            timings: false,
        },
        8 << 20,
    );
    let started = std::time::Instant::now();
    let mut n = 0usize;
    tap.feed(b"data: {\"a\":\"", &mut |d: &[u8]| n += d.len());
    for _ in 0..(4 << 20) / 64 {
        tap.feed(&[b'y'; 64], &mut |d: &[u8]| n += d.len());
    }
    tap.feed(b"\"}\n\n", &mut |d: &[u8]| n += d.len());
    assert_eq!(n, 12 + (4 << 20) + 4);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn usage_of_a_json_body_of_any_size() {
    let mut body = br#"{"object":"list","data":[{"embedding":["#.to_vec();
    while body.len() < 20 << 20 {
        body.extend_from_slice(b"0.125,\"usage\",{\"usage\":1},");
    }
    body.extend_from_slice(
        br#"0]}],"model":"m","usage":{"prompt_tokens":7,"total_tokens":7},"x":"\"}"}"#,
    );
    for read in [65536, 1 << 20, 7 << 20] {
        let mut tap = Tap::new(Kind::OpenAiJson);
        let mut n = 0;
        for part in body.chunks(read) {
            tap.feed(part, &mut |d: &[u8]| n += d.len());
        }
        tap.finish(&mut |_: &[u8]| {});
        assert_eq!(n, body.len());
        let u = tap.usage().expect("usage of a 20 MiB body");
        assert_eq!((u.prompt_tokens, u.total_tokens), (7, 7));
    }
    // The scanner itself at every split of a small body: nested and quoted usages are not it.
    let small = br#"{"a":{"usage":{"prompt_tokens":1}},"b":"\"usage\":{\"prompt_tokens\":2}","usage" : {"prompt_tokens":3,"completion_tokens":4},"c":[1]}"#;
    for cut in 0..small.len() {
        let mut s = JsonScan::new(b"usage");
        s.feed(&small[..cut]);
        s.feed(&small[cut..]);
        let v: serde_json::Value = serde_json::from_slice(&s.found.unwrap()).unwrap();
        assert_eq!(v["prompt_tokens"], 3, "cut {cut}");
    }
}

/// llama.cpp asked for `include_usage` and `timings_per_token` (by the proxy), as it streams:
/// the role chunk, content chunks each with the running `timings`, the finish chunk, and the
/// usage-only chunk with the final `usage` and `timings`.
fn llama_stream(tokens: usize) -> Vec<String> {
    let head = r#""created":1,"id":"c","model":"m","system_fingerprint":"b1","object":"chat.completion.chunk""#;
    let timings = |n: usize| {
        format!(
            r#""timings":{{"cache_n":21,"prompt_n":5,"prompt_ms":79.1,"predicted_n":{n},"predicted_ms":3.5}}"#
        )
    };
    let mut events = vec![format!(
        r#"data: {{"choices":[{{"finish_reason":null,"index":0,"delta":{{"role":"assistant","content":null}}}}],{head}}}"#
    )];
    for i in 1..=tokens {
        events.push(format!(
            r#"data: {{"choices":[{{"finish_reason":null,"index":0,"delta":{{"content":"t{i}"}}}}],{head},{}}}"#,
            timings(i)
        ));
    }
    events.push(format!(
        r#"data: {{"choices":[{{"finish_reason":"length","index":0,"delta":{{}}}}],{head}}}"#
    ));
    events.push(format!(
        r#"data: {{"choices":[],{head},"usage":{{"completion_tokens":{tokens},"prompt_tokens":26,"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":21}}}},{}}}"#,
        tokens + 26,
        timings(tokens)
    ));
    events.push("data: [DONE]".into());
    events.into_iter().map(|e| e + "\n\n").collect()
}

#[test]
fn per_token_timings_the_proxy_asked_for_are_removed_and_bill_an_aborted_stream() {
    let llama = Kind::OpenAiSse {
        strip: true,
        running: true,
        timings: true,
    };
    let events = llama_stream(3);
    let all = events.concat();
    let (out, u) = run(llama, &[all.as_bytes()]);
    let out = String::from_utf8(out).unwrap();
    // What llama.cpp sends a client that asked for nothing: no timings until the finish chunk,
    // which carries the final ones; no usage chunk.
    assert_eq!(out.matches("\"timings\"").count(), 1, "{out}");
    let finish = out.lines().find(|l| l.contains("\"length\"")).unwrap();
    assert!(finish.contains(r#""predicted_n":3"#), "{finish}");
    assert!(!out.contains("\"usage\""), "{out}");
    let want_content: Vec<&str> = out.lines().filter(|l| l.contains("\"t2\"")).collect();
    assert_eq!(
        want_content,
        [
            r#"data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"t2"}}],"created":1,"id":"c","model":"m","system_fingerprint":"b1","object":"chat.completion.chunk"}"#
        ]
    );
    for l in out.lines().filter(|l| l.starts_with("data: {")) {
        serde_json::from_str::<serde_json::Value>(&l[6..]).unwrap();
    }
    let u = u.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
        (26, 3, Some(21))
    );
    assert_eq!(u.source, Source::Reported);

    // Aborted after two content chunks: the last timings received are the bill.
    let mut tap = Tap::new(llama);
    let mut seen = Vec::new();
    for e in &events[..3] {
        tap.feed(e.as_bytes(), &mut |d: &[u8]| seen.extend_from_slice(d));
    }
    let u = tap.usage().unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
        (26, 2, Some(21))
    );
    assert_eq!(u.source, Source::Reported);
    assert!(!String::from_utf8(seen).unwrap().contains("timings"));
}

#[test]
fn a_stream_with_timings_at_its_end_only_is_recognised() {
    let plain = Kind::OpenAiSse {
        strip: true,
        running: true,
        timings: false,
    };
    // llama.cpp without `timings_per_token`: timings on the usage-only chunk alone.
    let events: Vec<String> = llama_stream(3)
        .into_iter()
        .map(|e| {
            if e.contains(r#""content":"t"#) {
                let cut = e.find(r#","timings""#).unwrap();
                format!("{}}}\n\n", &e[..cut])
            } else {
                e
            }
        })
        .collect();
    let mut tap = Tap::new(plain);
    tap.feed(events.concat().as_bytes(), &mut |_: &[u8]| {});
    tap.finish(&mut |_: &[u8]| {});
    assert!(tap.timings_at_end_only());
    // With them on every chunk (asked for, or a server that always sends them): not again.
    let mut tap = Tap::new(plain);
    tap.feed(llama_stream(3).concat().as_bytes(), &mut |_: &[u8]| {});
    assert!(!tap.timings_at_end_only());
    // vLLM-style running usage: never.
    let mut tap = Tap::new(plain);
    tap.feed(STREAM.as_bytes(), &mut |_: &[u8]| {});
    assert!(!tap.timings_at_end_only());
    // llama.cpp's `/v1/completions` (as it streams it): usage and timings on the finish chunk.
    let completion = concat!(
        "data: {\"choices\":[{\"text\":\" I\",\"index\":0,\"finish_reason\":null}],",
        "\"object\":\"text_completion\"}\n\n",
        "data: {\"choices\":[{\"text\":\"\",\"index\":0,\"finish_reason\":\"length\"}],",
        "\"object\":\"text_completion\",\"usage\":{\"completion_tokens\":1,",
        "\"prompt_tokens\":3,\"total_tokens\":4,\"prompt_tokens_details\":{\"cached_tokens\":0}},",
        "\"timings\":{\"cache_n\":0,\"prompt_n\":3,\"predicted_n\":1}}\n\n",
        "data: [DONE]\n\n",
    );
    let mut tap = Tap::new(plain);
    tap.feed(completion.as_bytes(), &mut |_: &[u8]| {});
    tap.finish(&mut |_: &[u8]| {});
    assert!(tap.timings_at_end_only());
}

/// Events whose first line end the search for their end already met (a read that starts at an
/// event) and events it did not (a read that resumes inside one) come out the same: one-line
/// events with `\n` and `\r\n` endings, a multi-line one, a comment line first.
#[test]
fn an_event_reads_the_same_however_its_bytes_arrive() {
    let stream = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":null}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\r\n\r\n",
        ": keep-alive\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"},\"finish_reason\":null}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n",
        "data: {\"choices\":[{\"delta\":{},\ndata: \"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\r\n\r\n",
        "data:[DONE]\n\n",
    )
    .as_bytes();
    let kind = Kind::OpenAiSse {
        strip: true,
        running: true,
        timings: false,
    };
    let whole = run(kind, &[stream]);
    assert!(whole.1.is_some());
    for cut in 0..stream.len() {
        assert_eq!(
            run(kind, &[&stream[..cut], &stream[cut..]]),
            whole,
            "cut {cut}"
        );
    }
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(run(kind, &bytes), whole);
}

/// Whole-tap checks over many shapes of timings and running usage.
mod shapes;

/// A core hands its taps from one exchange to the next (`worker::spare::Taps`): a reset tap
/// answers every exchange exactly as a fresh one does, whatever the last one left behind (an
/// SSE stream cut mid-event with a finish chunk held, a JSON body, nothing at all).
#[test]
fn a_reset_tap_answers_as_a_fresh_one() {
    let strip = Kind::OpenAiSse {
        strip: true,
        running: false,
        timings: false,
    };
    let observe = Kind::OpenAiSse {
        strip: false,
        running: false,
        timings: false,
    };
    let json = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":6,"total_tokens":10}}"#;
    let stream = STREAM.as_bytes();
    // (kind, body, whether the exchange ends with `finish` or is cut off)
    let exchanges: [(Kind, &[u8], bool); 6] = [
        (strip, &stream[..150], false),
        (Kind::OpenAiJson, json, true),
        (observe, stream, true),
        (strip, stream, true),
        (Kind::OpenAiJson, &json[..30], false),
        (Kind::None, b"plain", true),
    ];
    let mut reused = Tap::new(Kind::None);
    for round in 0..2 {
        for (i, &(kind, body, ends)) in exchanges.iter().enumerate() {
            let fresh = Tap::with_max_event(kind, 4096);
            reused.reset(kind, 4096);
            let mut results = Vec::new();
            for mut tap in [fresh, std::mem::replace(&mut reused, Tap::new(Kind::None))] {
                let mut out = Vec::new();
                tap.feed(&body[..body.len() / 2], &mut |d: &[u8]| {
                    out.extend_from_slice(d)
                });
                tap.feed(&body[body.len() / 2..], &mut |d: &[u8]| {
                    out.extend_from_slice(d)
                });
                if ends {
                    tap.finish(&mut |d: &[u8]| out.extend_from_slice(d));
                }
                results.push((
                    out,
                    tap.usage(),
                    tap.events(),
                    tap.held_bytes(),
                    tap.oversized_events(),
                    tap.timings_at_end_only(),
                ));
                reused = tap;
            }
            assert_eq!(results[0], results[1], "round {round}, exchange {i}");
        }
    }
    // The buffers stay allocated across exchanges (what keeping the tap is for).
    reused.reset(Kind::OpenAiJson, 4096);
    assert!(reused.kept_bytes() > 0);
    assert_eq!(reused.held_bytes(), 0);
}
