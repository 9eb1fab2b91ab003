//! What the proxy needs to know about OpenAI-style (and TGI) requests: the `model` that routes
//! the request and whether it streams. The body is scanned once; it is never re-serialised here.

use std::borrow::Cow;

use serde::Deserialize;

use crate::error::ProxyError;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    pub model: Option<String>,
    pub stream: bool,
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
}

/// Routes whose bodies must be JSON objects.
pub fn is_json_route(method: &str, path: &str) -> bool {
    method.eq_ignore_ascii_case("POST")
        && (path.starts_with("/v1/") || path == "/generate" || path == "/generate_stream")
}

/// Reads `model` and `stream` from a JSON body. An empty body has neither; a body that is not a
/// JSON object (or has a non-string `model`) is the client's error.
pub fn inspect(method: &str, path: &str, body: &[u8]) -> Result<RequestInfo, ProxyError> {
    if body.is_empty() || !is_json_route(method, path) {
        return Ok(RequestInfo {
            model: None,
            stream: path == "/generate_stream",
        });
    }
    let peek: Peek = serde_json::from_slice(body).map_err(|e| {
        ProxyError::BadRequest(format!("request body is not a valid JSON object: {e}"))
    })?;
    Ok(RequestInfo {
        model: peek.model.map(Cow::into_owned),
        stream: peek.stream.unwrap_or(false) || path == "/generate_stream",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_and_stream() {
        let i = inspect(
            "POST",
            "/v1/chat/completions",
            br#"{"model":"llama","messages":[{"role":"user","content":"hi \"x\""}],"stream":true}"#,
        )
        .unwrap();
        assert_eq!(i.model.as_deref(), Some("llama"));
        assert!(i.stream);
        let i = inspect("POST", "/v1/completions", br#"{"model":"a\u0062"}"#).unwrap();
        assert_eq!(i.model.as_deref(), Some("ab"));
        assert!(!i.stream);
    }

    #[test]
    fn rejects_non_json_on_json_routes_only() {
        assert!(inspect("POST", "/v1/chat/completions", b"not json").is_err());
        assert!(inspect("POST", "/v1/chat/completions", b"[1,2]").is_err());
        assert!(inspect("POST", "/v1/chat/completions", br#"{"model":5}"#).is_err());
        assert!(inspect("POST", "/v1/chat/completions", b"\xff\xfe").is_err());
        assert!(inspect("POST", "/other", b"not json").is_ok());
        assert!(inspect("POST", "/generate_stream", b"").unwrap().stream);
    }
}
