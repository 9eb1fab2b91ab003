//! The request inspector and the `include_usage` rewriter (`openai`). The first input byte picks
//! the route, the rest is the body. Properties: no panic; what `inspect` reports agrees with the
//! JSON; when the rewriter changes a body, the result is valid JSON with exactly the same content
//! plus `stream_options.include_usage: true` (other `stream_options` members kept) and no
//! duplicate top-level key the client did not send; when it leaves a body alone, there was
//! nothing to do.

use std::collections::HashSet;
use std::fmt;

use llmproxy::openai::{inject_include_usage, inspect, without_running_usage};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

use crate::engine::{feature, Target};

pub const TARGET: Target = Target {
    name: "include_usage",
    dict: &[
        b"{",
        b"}",
        b",",
        b":",
        b"\"stream\":true",
        b"\"stream\":false",
        b"\"stream\":null",
        b"\"stream_options\":",
        b"\"stream_options\":null",
        b"\"stream_options\":{}",
        b"{\"include_usage\":false}",
        b"{\"include_usage\":true}",
        b"\"continuous_usage_stats\":true",
        b"\"continuous_usage_stats\":false",
        b"{\"a\":{\"continuous_usage_stats\":true}}",
        b"\"include_usage\":null",
        b"\"model\":\"m\"",
        b"\"user\":\"u\"",
        b"\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]",
        b"\\u0073",
        b"\\\"",
        b" ",
        b"\n",
        b"[",
        b"]",
        b"\xef\xbb\xbf",
    ],
    max_len: 8 * 1024,
    check,
};

const PATHS: [&str; 5] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/generate_stream",
    "/other",
];

fn takes_stream_options(path: &str) -> bool {
    path == "/v1/chat/completions" || path == "/v1/completions"
}

fn check(input: &[u8]) -> u64 {
    let Some((&selector, body)) = input.split_first() else {
        return 0;
    };
    let path = PATHS[usize::from(selector) % PATHS.len()];
    let info = match inspect("POST", path, body, "user") {
        Ok(info) => info,
        Err(e) => return feature(("rejected", e.status())),
    };
    let parsed: Option<Value> = match serde_json::from_slice(body) {
        Ok(v) => Some(v),
        // Members the inspector skips are not range-checked (`1e999`); the rewrite then leaves
        // such a body alone, which is all it can do.
        Err(e) if e.to_string().contains("number out of range") => {
            return feature(("lenient", inject_include_usage(path, body, &info).is_some()))
        }
        Err(_) => None,
    };
    if path != "/other" && !body.is_empty() {
        let v = parsed
            .as_ref()
            .expect("inspect accepted a body that is not JSON");
        assert!(
            v.is_object(),
            "inspect accepted a body that is not an object"
        );
        assert_eq!(
            info.stream,
            v["stream"] == true || path == "/generate_stream"
        );
        assert_eq!(info.model.as_deref(), v["model"].as_str());
        assert_eq!(
            info.include_usage,
            v["stream_options"]["include_usage"] == true
        );
        assert_eq!(
            info.continuous_usage,
            v["stream_options"]["continuous_usage_stats"] == true
        );
    }

    let rewritten = inject_include_usage(path, body, &info);
    let needed =
        info.stream && !(info.include_usage && info.continuous_usage) && takes_stream_options(path);
    let Some(out) = rewritten else {
        assert!(!needed, "a stream without include_usage was left alone");
        return feature(("unchanged", info.stream, info.include_usage));
    };
    assert!(needed, "a body was rewritten with nothing to do");
    let before = parsed.expect("rewritten body was JSON");
    let after: Value = serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!(
            "rewritten body is not JSON ({e}): {}",
            String::from_utf8_lossy(&out)
        )
    });
    assert_eq!(
        after["stream_options"]["include_usage"],
        true,
        "rewritten body: {}",
        String::from_utf8_lossy(&out)
    );
    if !has_duplicate_keys(body) {
        assert!(
            !has_duplicate_keys(&out),
            "the rewrite added a duplicate key: {}",
            String::from_utf8_lossy(&out)
        );
    }
    // Same content apart from the one member.
    let (mut b, mut a) = (before.clone(), after.clone());
    let opts_before = b.as_object_mut().and_then(|m| m.remove("stream_options"));
    let opts_after = a.as_object_mut().and_then(|m| m.remove("stream_options"));
    assert_eq!(a, b, "the rewrite changed other members");
    if let (Some(Value::Object(mut ob)), Some(Value::Object(mut oa))) = (opts_before, opts_after) {
        for k in ["include_usage", "continuous_usage_stats"] {
            ob.remove(k);
            oa.remove(k);
        }
        assert_eq!(oa, ob, "the rewrite lost stream_options members");
    }
    // Asked for running usage; a backend that rejects it gets the same body without that member.
    assert_eq!(after["stream_options"]["continuous_usage_stats"], true);
    let plain = without_running_usage(&out).expect("the running-usage member can be taken back");
    let plain: Value = serde_json::from_slice(&plain).unwrap_or_else(|e| {
        panic!(
            "body without running usage is not JSON ({e}): {}",
            String::from_utf8_lossy(&out)
        )
    });
    let mut expected = after.clone();
    if let Some(Value::Object(o)) = expected.get_mut("stream_options") {
        o.remove("continuous_usage_stats");
    }
    assert_eq!(plain, expected, "taking running usage back changed more");
    feature((
        "rewritten",
        before.get("stream_options").map(Value::is_object),
    ))
}

/// True when the top-level object repeats a key (serde_json's `Value` would keep the last).
fn has_duplicate_keys(body: &[u8]) -> bool {
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let mut seen = HashSet::new();
            let mut dup = false;
            while let Some(key) = map.next_key::<String>()? {
                dup |= !seen.insert(key);
                map.next_value::<IgnoredAny>()?;
            }
            Ok(dup)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    de.deserialize_map(Keys).unwrap_or(false)
}
