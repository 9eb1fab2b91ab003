//! What the proxy needs to know about OpenAI-style (and TGI) requests: the `model` that routes
//! them, whether they stream, whether the client asked for streamed usage and who the caller is;
//! and the one rewrite it makes — adding `stream_options.include_usage` so a backend reports
//! usage for a stream whose client did not ask for it. The body is scanned once and, except for
//! that injection, never re-serialised.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ProxyError;
use crate::usage::Kind;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    pub model: Option<String>,
    pub stream: bool,
    /// `stream_options.include_usage` was present (true or false) / was true.
    pub has_stream_options: bool,
    pub include_usage: bool,
    /// The body's user field (as configured by `usage.identity.user_body_field`).
    pub user: Option<String>,
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    /// Outer `Some` whenever the key is present, `null` included: splicing a second
    /// `stream_options` next to a client's `null` would leave a duplicate key that the backend's
    /// parser (last one wins) reads as `null`, and the stream would carry no usage.
    #[serde(default, deserialize_with = "present")]
    stream_options: Option<Option<StreamOptions>>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Routes whose bodies must be JSON objects (and whose requests produce usage events).
pub fn is_json_route(method: &str, path: &str) -> bool {
    method.eq_ignore_ascii_case("POST")
        && (path.starts_with("/v1/") || path == "/generate" || path == "/generate_stream")
}

/// Reads what routing and metering need from a JSON body. An empty body has nothing; a body
/// that is not a JSON object (or has a non-string `model`) is the client's error.
pub fn inspect(
    method: &str,
    path: &str,
    body: &[u8],
    user_field: &str,
) -> Result<RequestInfo, ProxyError> {
    if body.is_empty() || !is_json_route(method, path) {
        return Ok(RequestInfo {
            stream: path == "/generate_stream",
            ..RequestInfo::default()
        });
    }
    // Validated up front: the parser does not check the strings it skips, and a JSON route's
    // body must be JSON text (UTF-8) as a whole, not just in the members routing reads.
    let text = std::str::from_utf8(body)
        .map_err(|e| ProxyError::BadRequest(format!("request body is not valid UTF-8: {e}")))?;
    // A derived struct also accepts a JSON array (fields by position): `["m", true]` is not a
    // request body.
    if !text.trim_start().starts_with('{') {
        return Err(ProxyError::BadRequest(
            "request body must be a JSON object".into(),
        ));
    }
    let peek: Peek = serde_json::from_str(text).map_err(|e| {
        ProxyError::BadRequest(format!("request body is not a valid JSON object: {e}"))
    })?;
    let user = match user_field {
        "" => None,
        "user" => peek.user.map(Cow::into_owned),
        // A non-standard field: a second, rarer parse.
        other => serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
            .ok()
            .and_then(|m| m.get(other).and_then(|v| v.as_str()).map(str::to_owned)),
    };
    Ok(RequestInfo {
        model: peek.model.map(Cow::into_owned),
        stream: peek.stream.unwrap_or(false) || path == "/generate_stream",
        has_stream_options: peek.stream_options.is_some(),
        include_usage: peek
            .stream_options
            .flatten()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        user,
    })
}

/// Endpoints whose streams can be asked for usage with `stream_options`.
fn takes_stream_options(path: &str) -> bool {
    path == "/v1/chat/completions" || path == "/v1/completions"
}

/// The body to send upstream when the proxy must ask for streamed usage itself, or `None`
/// when the client's body goes upstream unchanged.
pub fn inject_include_usage(path: &str, body: &[u8], info: &RequestInfo) -> Option<Vec<u8>> {
    if !info.stream || info.include_usage || !takes_stream_options(path) {
        return None;
    }
    if !info.has_stream_options {
        // Common case: splice the member in after the opening brace; the body is known to be
        // a JSON object with at least `stream`, so a comma always follows correctly.
        let open = body.iter().position(|b| *b == b'{')?;
        let mut out = Vec::with_capacity(body.len() + 40);
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
        out.extend_from_slice(&body[open + 1..]);
        return Some(out);
    }
    // stream_options present without include_usage: true — rewrite that object (rare). Members
    // are carried over as their raw text: a round trip through `Value` would turn an integer
    // beyond u64 into an f64 and change what the client sent (found by fuzzing).
    let mut top: BTreeMap<String, &RawValue> = serde_json::from_slice(body).ok()?;
    let mut opts: BTreeMap<String, &RawValue> = top
        .get("stream_options")
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
        .unwrap_or_default();
    let yes = RawValue::from_string("true".to_owned()).ok()?;
    opts.insert("include_usage".to_owned(), &yes);
    let opts = serde_json::value::to_raw_value(&opts).ok()?;
    top.insert("stream_options".to_owned(), &opts);
    serde_json::to_vec(&top).ok()
}

/// How to read usage off a response.
pub fn response_kind(path: &str, status: u16, event_stream: bool, injected: bool) -> Kind {
    if !(200..300).contains(&status) {
        return Kind::None;
    }
    match path {
        "/generate" => Kind::TgiJson,
        "/generate_stream" => Kind::TgiSse,
        p if p.starts_with("/v1/") && event_stream => Kind::OpenAiSse { strip: injected },
        p if p.starts_with("/v1/") => Kind::OpenAiJson,
        _ => Kind::None,
    }
}

#[cfg(test)]
mod tests {
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
        let i =
            info(br#"{"model":"a\u0062","stream":true,"stream_options":{"include_usage":true}}"#);
        assert_eq!(i.model.as_deref(), Some("ab"));
        assert!(i.include_usage);
        let i = inspect(
            "POST",
            "/v1/chat/completions",
            br#"{"model":"m","tenant":"t9"}"#,
            "tenant",
        )
        .unwrap();
        assert_eq!(i.user.as_deref(), Some("t9"));
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
        assert!(
            inspect("POST", "/generate_stream", b"", "user")
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
        let body = br#"{"stream":true,"x":18446744073709574407370955,"y":1.10,"stream_options":{"z":1e400}}"#;
        let out = inject_include_usage("/v1/chat/completions", body, &info(body)).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r#""x":18446744073709574407370955"#), "{text}");
        assert!(text.contains(r#""y":1.10"#), "{text}");
        assert!(text.contains(r#""include_usage":true"#), "{text}");
        assert!(text.contains(r#""z":1e400"#), "{text}");
        let b = br#"{"stream":false}"#;
        assert!(inject_include_usage("/v1/chat/completions", b, &info(b)).is_none());
        let b = br#"{"stream":true,"stream_options":{"include_usage":true}}"#;
        assert!(inject_include_usage("/v1/chat/completions", b, &info(b)).is_none());
        let b = br#"{"stream":true}"#;
        assert!(inject_include_usage("/v1/embeddings", b, &info(b)).is_none());
    }

    #[test]
    fn response_kinds() {
        assert_eq!(
            response_kind("/v1/chat/completions", 200, true, true),
            Kind::OpenAiSse { strip: true }
        );
        assert_eq!(
            response_kind("/v1/embeddings", 200, false, false),
            Kind::OpenAiJson
        );
        assert_eq!(response_kind("/generate", 200, false, false), Kind::TgiJson);
        assert_eq!(
            response_kind("/generate_stream", 200, true, false),
            Kind::TgiSse
        );
        assert_eq!(
            response_kind("/v1/chat/completions", 500, false, false),
            Kind::None
        );
    }
}
