use super::*;

/// The shortcut past serde for timings that name no count answers what serde answers, counted
/// the way `usage` uses it (no counts at all is no timings).
#[test]
fn timings_without_counts_read_as_serde_reads_them() {
    let cases: &[&[u8]] = &[
        b"",
        br#"{"predicted_ms":1.0}"#,
        br#"{"predicted_ms":1.0,"prompt_ms":2}"#,
        br#"{"cache_n":3}"#,
        br#"{"prompt_n":2,"predicted_n":1}"#,
        br#"{"predicted_n":null}"#,
        br#"{"cache\u005fn":4}"#,
        br#"{"x":"_n\""}"#,
        br#"{"predicted_n":1"#,
        br#"not json"#,
        br#"{"predicted_n":"1"}"#,
        br#"{"predicted_n":1,"predicted_n":2}"#,
        br#"[1]"#,
        br#"[]"#,
        br#"{}"#,
        br#" {"cache_n":1}"#,
    ];
    for raw in cases {
        let by_serde = serde_json::from_slice::<Timings>(raw)
            .ok()
            .filter(|t| t.prompt_n.is_some() || t.predicted_n.is_some() || t.cache_n.is_some());
        let got = Timings::from_slice(raw);
        assert_eq!(
            got.as_ref().map(|t| (t.prompt_n, t.predicted_n, t.cache_n)),
            by_serde
                .as_ref()
                .map(|t| (t.prompt_n, t.predicted_n, t.cache_n)),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
}

/// Running usage of every shape the measuring meets (flat, blanks, nested details, strings with
/// braces, brackets and escaped quotes, unknown members), after content that quotes `usage`,
/// on `\n` and `\r\n` events: removed to the byte, billed from the last chunk, however the
/// stream is split into reads.
#[test]
fn running_usage_of_every_shape_is_removed_exactly_however_the_stream_is_split() {
    let contents = [
        r#""a""#,
        r#""say \"usage\": {\"prompt_tokens\":99}""#,
        r#""}]{[|\\""#,
        "\"\u{e9}\"",
        r#""""#,
    ];
    let usages = |n: u64| {
        [
            format!(
                r#"{{"prompt_tokens":5,"completion_tokens":{n},"total_tokens":{}}}"#,
                5 + n
            ),
            format!(r#"{{ "prompt_tokens" : 5 , "completion_tokens" : {n} }}"#),
            format!(
                r#"{{"prompt_tokens":5,"completion_tokens":{n},"prompt_tokens_details":{{"cached_tokens":4}}}}"#
            ),
            format!(r#"{{"prompt_tokens":5,"note":"}}]\"{{[","completion_tokens":{n}}}"#),
            format!(r#"{{"completion_tokens":{n},"x":[1,{{"y":null}}],"prompt_tokens":5}}"#),
        ]
    };
    for eol in ["\n", "\r\n"] {
        let mut stream = String::new();
        let mut stripped = String::new();
        let mut nulled = String::new();
        let mut n = 0;
        for content in contents {
            for usage in usages(n + 1) {
                n += 1;
                let head =
                    format!(r#"{{"choices":[{{"index":0,"delta":{{"content":{content}}}}}]"#);
                stream.push_str(&format!("data: {head},\"usage\":{usage}}}{eol}{eol}"));
                stripped.push_str(&format!("data: {head}}}{eol}{eol}"));
                nulled.push_str(&format!("data: {head},\"usage\":null}}{eol}{eol}"));
            }
        }
        let last = &usages(n)[0];
        let finish = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]"#;
        stream.push_str(&format!("data: {finish},\"usage\":{last}}}{eol}{eol}"));
        stripped.push_str(&format!("data: {finish}}}{eol}{eol}"));
        nulled.push_str(&format!("data: {finish},\"usage\":null}}{eol}{eol}"));
        let only = format!("data: {{\"choices\":[],\"usage\":{last}}}{eol}{eol}");
        stream.push_str(&only);
        nulled.push_str(&only);
        for s in [&mut stream, &mut stripped, &mut nulled] {
            s.push_str(&format!("data: [DONE]{eol}{eol}"));
        }
        let b = stream.as_bytes();
        for (strip, want) in [(true, &stripped), (false, &nulled)] {
            let kind = Kind::OpenAiSse {
                strip,
                running: true,
                timings: false,
            };
            let check = |parts: &[&[u8]], what: &str| {
                let (out, u) = run(kind, parts);
                assert_eq!(
                    String::from_utf8_lossy(&out),
                    **want,
                    "strip {strip} {what}"
                );
                let u = u.expect("usage");
                assert_eq!((u.prompt_tokens, u.completion_tokens), (5, n), "{what}");
                assert_eq!(u.source, Source::Reported);
            };
            check(&[b], "whole");
            for cut in 0..b.len() {
                check(&[&b[..cut], &b[cut..]], &format!("cut {cut}"));
            }
            check(&b.chunks(1).collect::<Vec<_>>(), "byte by byte");
            check(&b.chunks(7).collect::<Vec<_>>(), "7-byte reads");
        }
    }
}
