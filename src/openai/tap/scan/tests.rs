//! The byte scanners against plain references: value lengths, member walks, finish and
//! usage-only detection.

use super::*;

#[test]
fn json_value_len_matches_brackets_braces_and_strings() {
    let cases: [(&[u8], Option<usize>); 9] = [
        (br#"{"a":1},"b":2"#, Some(7)),
        (br#"[{"a":[1,2]},{"b":"]}"}] tail"#, Some(24)),
        (br#"{"s":"{[\"}]"}, more"#, Some(14)),
        (br#"{"x":[[[]]],"y":{"z":[]}}"#, Some(25)),
        (br#""str\"ing",1"#, Some(10)),
        (b"123,", Some(3)),
        (br#"{"open":[1,2"#, None),
        (br#"{"a":"unterminated}"#, None),
        (b"]", Some(0)),
    ];
    for (v, want) in cases {
        assert_eq!(json_value_len(v), want, "{}", String::from_utf8_lossy(v));
    }
    // Many strings and no bracket after the first: found, and in one pass.
    let mut big = b"{\"choices\":[".to_vec();
    for i in 0..2000 {
        big.extend_from_slice(format!("{{\"k{i}\":\"v{i}\"}},").as_bytes());
    }
    big.extend_from_slice(b"{}]}, \"usage\":null");
    assert_eq!(json_value_len(&big), Some(big.len() - 14));
}

/// The scalar walk hands over to the SIMD one at a fixed span: a value whose strings, escapes,
/// nesting or end fall on either side of it, at every offset, measures what serde_json says.
#[test]
fn json_value_len_agrees_with_serde_across_the_scalar_span() {
    for pad in 200..300 {
        for inner in [r#""a\"b{c}""#, r#"{"k":[1,{"x":"]"}]}"#, r#""\\""#, "[]"] {
            let value = format!(r#"{{"p":"{}","q":{inner},"r":[{inner}]}}"#, "x".repeat(pad));
            let text = format!("{value} ,\"after\":{{}}}}");
            let mut values =
                serde_json::Deserializer::from_str(&text).into_iter::<serde_json::Value>();
            assert!(values.next().is_some_and(|v| v.is_ok()));
            let want_len = values.byte_offset();
            assert_eq!(
                json_value_len(text.as_bytes()),
                Some(want_len),
                "pad {pad} inner {inner}"
            );
            // Cut anywhere inside: incomplete.
            for cut in [pad, pad + 5, want_len - 1] {
                assert_eq!(json_value_len(&text.as_bytes()[..cut]), None, "cut {cut}");
            }
        }
    }
}

#[test]
fn extra_members_keeps_unknown_top_level_members_raw_and_in_order() {
    let standard = CHUNK_MEMBERS;
    let payload = br#" {"id":"x","choices":[],"timings":{"prompt_n":3,"s":"}"}, "usage" : {"a":1},"z\"q":[1,2] ,"n":null} "#;
    assert_eq!(
        extra_members(payload, standard).as_deref(),
        Some(&br#","timings":{"prompt_n":3,"s":"}"},"z\"q":[1,2],"n":null"#[..])
    );
    assert_eq!(extra_members(b"{}", standard).as_deref(), Some(&b""[..]));
    assert_eq!(
        extra_members(br#"{"id":"x","usage":{}}"#, standard).as_deref(),
        Some(&b""[..])
    );
    for bad in [
        &br#"{"a":1"#[..],
        br#"{"a":}"#,
        br#"{"a" 1}"#,
        br#"["a"]"#,
        br#"{"a":1} trailing"#,
        br#"{a:1}"#,
        b"",
    ] {
        assert_eq!(
            extra_members(bad, standard),
            None,
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn has_finish_finds_a_non_null_finish_reason_in_any_choice() {
    let yes: [&[u8]; 4] = [
        br#"{"choices":[{"finish_reason":"stop"}]}"#,
        br#"{"choices":[{"finish_reason":null},{"finish_reason" : "length"}]}"#,
        br#"{"a_b":1,"choices":[{"delta":{"content":"x_y"},"finish_reason":"stop"}]}"#,
        br#"{"finish_reason":{"type":"stop"}}"#,
    ];
    let no: [&[u8]; 5] = [
        br#"{"choices":[{"finish_reason":null}]}"#,
        br#"{"choices":[{"finish_reason" :  null}],"usage":{"prompt_tokens":1}}"#,
        br#"{"choices":[{"delta":{"content":"finish_reason"}}]}"#,
        b"_finish_reason",
        b"",
    ];
    for p in yes {
        assert!(has_finish(p), "{}", String::from_utf8_lossy(p));
    }
    for p in no {
        assert!(!has_finish(p), "{}", String::from_utf8_lossy(p));
    }
}

#[test]
fn usage_only_wants_an_empty_choices_array() {
    let yes: [&[u8]; 3] = [
        br#"{"choices":[],"usage":{"prompt_tokens":1}}"#,
        br#"{"id":"x","choices" : [ ] ,"usage":{}}"#,
        br#"{"a":[1],"choices":[]}"#,
    ];
    let no: [&[u8]; 4] = [
        br#"{"choices":[{"delta":{}}],"usage":{}}"#,
        br#"{"choices":[{"logprobs":{"content":[]}}]}"#,
        br#"{"choices":[{"delta":{"content":"\"choices\":[]"}}]}"#,
        b"[]",
    ];
    for p in yes {
        assert!(usage_only(p), "{}", String::from_utf8_lossy(p));
    }
    for p in no {
        assert!(!usage_only(p), "{}", String::from_utf8_lossy(p));
    }
}

/// The plainest walk of a nested value, a byte at a time: what the fast walks must agree with.
fn reference_value_len(v: &[u8]) -> Option<usize> {
    let (mut depth, mut i) = (0usize, 0);
    while i < v.len() {
        match v[i] {
            b'"' => loop {
                i += 1;
                match v.get(i)? {
                    b'"' => break,
                    b'\\' => i += 1,
                    _ => {}
                }
            },
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

#[test]
fn quote_or_backslash_search_finds_the_first_at_every_offset() {
    for len in 0..40 {
        for at in 0..len {
            for b in [b'"', b'\\'] {
                for second in [None, Some(1), Some(3), Some(9)] {
                    let mut s = vec![b'a'; len];
                    s[at] = b;
                    if let Some(d) = second.filter(|d| at + d < len) {
                        s[at + d] = b'"';
                    }
                    let value = [b"{\"".as_slice(), &s, b"\"}"].concat();
                    assert_eq!(
                        json_value_len(&value),
                        reference_value_len(&value),
                        "{}",
                        String::from_utf8_lossy(&value)
                    );
                }
            }
        }
    }
}

/// The old walk alone, without `flat_len`'s shortcut.
fn walk_len(v: &[u8]) -> Option<usize> {
    match nested_len_scalar(v)? {
        Ok(len) => Some(len),
        Err(resume) => nested_len_simd(v, resume),
    }
}

/// The shortcut for flat values answers what the walk answers, on the shapes a tap meets (a
/// running usage, timings) and on what can go wrong in them: strings holding braces, brackets,
/// escaped quotes, backslashes, `|`, `#` after a quote, non-ASCII bytes; nesting; arrays; blanks;
/// every truncation; and every byte of each replaced by each byte that matters to either.
#[test]
fn flat_values_measure_what_the_walk_measures() {
    let shapes: &[&str] = &[
        r#"{"completion_tokens":16,"prompt_tokens":2,"total_tokens":18}"#,
        r#"{"prompt_tokens":5,"total_tokens":7,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":4}}"#,
        r#"{ "prompt_tokens" : 5 , "completion_tokens" : 2 }"#,
        "{\n\t\"prompt_tokens\":\r5}",
        r#"{"predicted_ms":1.0}"#,
        r#"{"cache_n":21,"prompt_n":5,"prompt_ms":79.1,"predicted_n":3,"predicted_ms":3.5}"#,
        r#"{}"#,
        r#"[]"#,
        r#"[1,2,3]"#,
        r#"["a","b}","c]"]"#,
        r#"{"s":"}"}"#,
        r#"{"s":"]","t":1}"#,
        r#"{"s":"{"}"#,
        r#"{"s":"a\"}b"}"#,
        r#"{"s":"\\"}"#,
        r#"{"s":"|"}"#,
        r##"{"s":"#","t":"#}"}"##,
        "{\"s\":\"\u{e9}}\u{1F600}\",\"n\":1}",
        r#"{"a":[1,{"b":"}"}],"c":2}"#,
        r#"{"a":null,"b":true,"c":false,"d":-1.5e3}"#,
        r#"{"a":1]"#,
        r#"[1}"#,
        r#"{"open":"#,
        r#"{"#,
        r#"{"a":1"#,
        r#"{"k":"v"}} , "more":{"x":1}}"#,
        r#"{"completion_tokens":16,"prompt_tokens":2,"total_tokens":18}}"#,
    ];
    let subs: &[u8] = b"\"\\{}[]|#: ,\n\x80\xff\x7b\x5c";
    let mut checked = 0;
    for shape in shapes {
        // The value followed by what a chunk has after it, padded past a word or two.
        for pad in ["", "}", ",\"id\":\"x\"}", "                }"] {
            let mut full = shape.as_bytes().to_vec();
            full.extend_from_slice(pad.as_bytes());
            for cut in 1..=full.len() {
                let t = &full[..cut];
                let text = String::from_utf8_lossy(t);
                assert_eq!(json_value_len(t), walk_len(t), "{text:?}");
                checked += 1;
            }
            for at in 1..full.len() {
                for &b in subs {
                    let mut t = full.clone();
                    t[at] = b;
                    let text = String::from_utf8_lossy(&t);
                    assert_eq!(json_value_len(&t), walk_len(&t), "{text:?}");
                    checked += 1;
                }
            }
        }
    }
    // Every byte value at every offset of a 40-byte flat object.
    for at in 1..39 {
        for b in 0..=255u8 {
            let mut t = br#"{"aaaaaaaaaaaaa":1,"bbbbbbbbbbbbbbb":22}"#.to_vec();
            t[at] = b;
            assert_eq!(json_value_len(&t), walk_len(&t), "{at} {b}");
            checked += 1;
        }
    }
    assert!(checked > 50_000, "{checked}");
}

/// The searchers built once find what `memchr` and `memrchr` find, at every length across the
/// vector widths and with the byte at every offset, once or twice.
#[test]
fn byte_searchers_find_what_memchr_finds() {
    for len in 0..140usize {
        for at in 0..=len {
            for also in [None, Some(at / 2), Some(len.saturating_sub(1))] {
                let mut s = vec![b'x'; len];
                for i in [Some(at), also].into_iter().flatten().filter(|&i| i < len) {
                    s[i] = b'_';
                }
                assert_eq!(UNDERSCORE.find(&s), memchr::memchr(b'_', &s), "{len} {at}");
                assert_eq!(
                    UNDERSCORE.rfind(&s),
                    memchr::memrchr(b'_', &s),
                    "{len} {at}"
                );
                assert_eq!(NEWLINE.find(&s), memchr::memchr(b'\n', &s), "{len} {at}");
            }
        }
    }
}
