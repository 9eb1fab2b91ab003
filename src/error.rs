//! The one error taxonomy of the request path. Every failure the proxy itself produces is a
//! `ProxyError`; its status, OpenAI-style body, whether another backend may be tried, and whether
//! the client connection must be closed are data here, not decisions scattered through the code.

use std::fmt::Write;

use crate::telemetry::reject::Reason;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    BadRequest(String),
    #[error("request head larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    #[error("timed out reading the request")]
    RequestReadTimeout,
    #[error("the model `{0}` does not exist")]
    UnknownModel(String),
    #[error("no route for {0}")]
    NotFound(String),
    #[error("no healthy backend available")]
    NoHealthyBackend,
    #[error("server is shutting down")]
    Draining,
    #[error("upstream connect failed: {0}")]
    UpstreamConnect(std::io::Error),
    #[error("upstream connect timed out")]
    UpstreamConnectTimeout,
    /// The backend's TLS certificate failed verification (unknown CA, another name, expired):
    /// the request was never sent.
    #[error("upstream TLS certificate rejected: {0}")]
    UpstreamTlsCertificate(String),
    /// The TLS handshake with the backend failed otherwise (an alert, such as our client
    /// certificate refused; a protocol error; the backend closed): the request was never sent.
    #[error("upstream TLS handshake failed: {0}")]
    UpstreamTlsHandshake(String),
    /// The connection failed before any response byte arrived (reset, EOF, write error).
    #[error("upstream closed the connection before responding: {0}")]
    UpstreamClosed(String),
    #[error("upstream did not respond within {0:?}")]
    FirstByteTimeout(std::time::Duration),
    /// A response started, then the upstream sent nothing for this long.
    #[error("upstream sent nothing for {0:?}")]
    IdleTimeout(std::time::Duration),
    #[error("upstream sent an invalid response: {0}")]
    UpstreamProtocol(String),
    /// The response had started (its head went to the client), then the upstream closed the
    /// connection before the body was complete.
    #[error("upstream closed the connection mid-body")]
    BodyClosed,
    /// The response had started, then reading the body from the upstream failed.
    #[error("upstream read failed mid-body: {0}")]
    BodyRead(std::io::Error),
    /// Every backend tried answered 502/503 and no other was left.
    #[error("upstream answered {0}")]
    UpstreamStatus(u16),
    #[error("request exceeded the total time limit")]
    RequestTimeout,
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{0}")]
    Unauthorized(AuthFailure),
    #[error("this API key may not use the model `{0}`")]
    ModelNotAllowed(String),
    /// An admin endpoint on the main listener, with a key not marked `admin: true`.
    #[error("this API key may not use admin endpoints (it needs `admin: true`)")]
    NotAdmin,
    #[error("{}", rate_message(*.limit, *.retry_after))]
    RateLimited { limit: Exceeded, retry_after: u64 },
    /// Every eligible backend is at `max_inflight` and the wait queue is full.
    #[error("all backends for this request are at capacity and the wait queue is full")]
    QueueFull,
    #[error("all backends for this request stayed at capacity for {0:?}")]
    QueueTimeout(std::time::Duration),
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Requests,
    Tokens,
    /// The shared rate-limit store is unreachable and `ratelimit.on_store_error` is `deny`.
    StoreDown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Invalid,
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthFailure::Missing => {
                "missing API key: send it as `Authorization: Bearer <key>` or `x-api-key: <key>`"
            }
            AuthFailure::Invalid => "invalid API key",
        })
    }
}

fn limit_name(e: Exceeded) -> &'static str {
    match e {
        Exceeded::Requests | Exceeded::StoreDown => "requests",
        Exceeded::Tokens => "tokens",
    }
}

fn rate_message(e: Exceeded, retry_after: u64) -> String {
    match e {
        Exceeded::StoreDown => format!(
            "the shared rate-limit store is unavailable and this proxy refuses rate-limited keys \
             meanwhile; retry after {retry_after} s"
        ),
        _ => format!(
            "rate limit reached for {} per minute on this API key; retry after {retry_after} s",
            limit_name(e)
        ),
    }
}

impl ProxyError {
    pub fn status(&self) -> u16 {
        use ProxyError::*;
        match self {
            BadRequest(_) => 400,
            HeadTooLarge(_) => 431,
            BodyTooLarge(_) => 413,
            RequestReadTimeout => 408,
            UnknownModel(_) | NotFound(_) => 404,
            NoHealthyBackend | Draining => 503,
            UpstreamConnect(_)
            | UpstreamClosed(_)
            | UpstreamProtocol(_)
            | UpstreamStatus(_)
            | BodyClosed
            | BodyRead(_)
            | UpstreamTlsCertificate(_)
            | UpstreamTlsHandshake(_) => 502,
            UpstreamConnectTimeout | FirstByteTimeout(_) | IdleTimeout(_) | RequestTimeout => 504,
            Internal(_) => 500,
            Unauthorized(_) => 401,
            ModelNotAllowed(_) | NotAdmin => 403,
            RateLimited { .. } => 429,
            // Capacity, not the client's quota: 503 + Retry-After is what load balancers and
            // SDKs treat as "try again shortly", and 429 stays reserved for a key's own rates.
            QueueFull | QueueTimeout(_) => 503,
        }
    }

    /// OpenAI's `error.type`.
    pub(crate) fn kind(&self) -> &'static str {
        use ProxyError::*;
        match self {
            BadRequest(_) | HeadTooLarge(_) | BodyTooLarge(_) | RequestReadTimeout
            | UnknownModel(_) | NotFound(_) | Unauthorized(_) | ModelNotAllowed(_) | NotAdmin => {
                "invalid_request_error"
            }
            // OpenAI names the exhausted limit in `type`.
            RateLimited { limit, .. } => limit_name(*limit),
            NoHealthyBackend | Draining | QueueFull | QueueTimeout(_) => "service_unavailable",
            _ => "server_error",
        }
    }

    /// OpenAI's `error.code`, stable for clients and tests.
    pub(crate) fn code(&self) -> &'static str {
        use ProxyError::*;
        match self {
            BadRequest(_) => "bad_request",
            HeadTooLarge(_) => "headers_too_large",
            BodyTooLarge(_) => "body_too_large",
            RequestReadTimeout => "request_timeout",
            UnknownModel(_) => "model_not_found",
            NotFound(_) => "not_found",
            NoHealthyBackend => "no_healthy_backend",
            Draining => "shutting_down",
            UpstreamConnect(_) => "upstream_connect_error",
            UpstreamConnectTimeout => "upstream_connect_timeout",
            UpstreamTlsCertificate(_) => "upstream_tls_certificate",
            UpstreamTlsHandshake(_) => "upstream_tls_error",
            UpstreamClosed(_) | BodyClosed | BodyRead(_) => "upstream_closed",
            FirstByteTimeout(_) | IdleTimeout(_) => "upstream_timeout",
            UpstreamProtocol(_) => "upstream_protocol_error",
            UpstreamStatus(_) => "upstream_unavailable",
            RequestTimeout => "request_timeout",
            Internal(_) => "internal_error",
            Unauthorized(AuthFailure::Missing) => "missing_api_key",
            Unauthorized(AuthFailure::Invalid) => "invalid_api_key",
            ModelNotAllowed(_) => "model_not_allowed",
            NotAdmin => "admin_key_required",
            RateLimited { .. } => "rate_limit_exceeded",
            QueueFull => "queue_full",
            QueueTimeout(_) => "queue_timeout",
        }
    }

    /// May the request be sent to another backend? Only failures where the backend cannot have
    /// started work we would bill twice for, or that tell us it is not working at all.
    pub(crate) fn retryable(&self) -> bool {
        matches!(
            self,
            ProxyError::UpstreamConnect(_)
                | ProxyError::UpstreamConnectTimeout
                | ProxyError::UpstreamClosed(_)
                | ProxyError::UpstreamTlsCertificate(_)
                | ProxyError::UpstreamTlsHandshake(_)
        )
    }

    /// Does this error mean the backend is unreachable (passive health signal)?
    pub(crate) fn backend_unreachable(&self) -> bool {
        matches!(
            self,
            ProxyError::UpstreamConnect(_) | ProxyError::UpstreamConnectTimeout
        )
    }

    /// A time limit ran out (the usage event's outcome is `timeout`, not `upstream_error`).
    pub(crate) fn is_timeout(&self) -> bool {
        matches!(
            self,
            ProxyError::UpstreamConnectTimeout
                | ProxyError::FirstByteTimeout(_)
                | ProxyError::IdleTimeout(_)
                | ProxyError::RequestTimeout
        )
    }

    /// Errors in the request framing leave the connection in an unknown state: close it.
    pub(crate) fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::HeadTooLarge(_)
                | ProxyError::BodyTooLarge(_)
                | ProxyError::RequestReadTimeout
        )
    }

    /// A header the response must carry besides the body.
    pub(crate) fn extra_header(&self) -> Option<(&'static str, String)> {
        use ProxyError::*;
        match self {
            Unauthorized(_) => Some(("www-authenticate", "Bearer".to_string())),
            RateLimited { retry_after, .. } => Some(("retry-after", retry_after.to_string())),
            // A slot frees when any request on the backend ends; a second is a fair guess.
            QueueFull | QueueTimeout(_) => Some(("retry-after", "1".to_string())),
            _ => None,
        }
    }

    /// Refusals on purpose (counted and logged under a budget) rather than failures.
    pub(crate) fn rejection(&self) -> Option<Reason> {
        use ProxyError::*;
        match self {
            Unauthorized(AuthFailure::Missing) => Some(Reason::MissingKey),
            Unauthorized(AuthFailure::Invalid) => Some(Reason::InvalidKey),
            ModelNotAllowed(_) => Some(Reason::ModelNotAllowed),
            RateLimited {
                limit: Exceeded::Requests,
                ..
            } => Some(Reason::RequestRate),
            RateLimited {
                limit: Exceeded::Tokens,
                ..
            } => Some(Reason::TokenRate),
            RateLimited {
                limit: Exceeded::StoreDown,
                ..
            } => Some(Reason::RateStoreDown),
            QueueFull => Some(Reason::QueueFull),
            QueueTimeout(_) => Some(Reason::QueueTimeout),
            _ => None,
        }
    }

    /// What this failure says about the backend, for its circuit breaker; `None` when it says
    /// nothing (the client's doing, our own limits, a stream that paused longer than
    /// `timeouts.idle`, which a working engine may do).
    pub(crate) fn verdict(&self) -> Option<Verdict> {
        use ProxyError::*;
        match self {
            UpstreamConnect(_)
            | UpstreamConnectTimeout
            | UpstreamClosed(_)
            | FirstByteTimeout(_)
            | UpstreamProtocol(_)
            | UpstreamTlsCertificate(_)
            | UpstreamTlsHandshake(_)
            | BodyClosed
            | BodyRead(_) => Some(Verdict::Fault),
            UpstreamStatus(s) => Some(Verdict::of_status(*s)),
            _ => None,
        }
    }

    /// The `kind` label of `llmproxy_upstream_errors_total`; `None` for failures that are not
    /// the upstream's. Before the response head it is the client-facing code; after it, the
    /// label says that the response was cut, since the client saw a 200 and not this code.
    pub(crate) fn upstream_kind(&self) -> Option<&'static str> {
        use ProxyError::*;
        match self {
            BodyClosed => Some("upstream_closed_mid_body"),
            BodyRead(_) => Some("upstream_read_error"),
            IdleTimeout(_) => Some("upstream_idle_timeout"),
            UpstreamConnect(_)
            | UpstreamConnectTimeout
            | UpstreamClosed(_)
            | FirstByteTimeout(_)
            | UpstreamProtocol(_)
            | UpstreamTlsCertificate(_)
            | UpstreamTlsHandshake(_)
            | UpstreamStatus(_) => Some(self.code()),
            _ => None,
        }
    }

    /// How a request that failed this way ends in its usage event and access line.
    pub(crate) fn outcome(&self) -> Outcome {
        if self.is_timeout() {
            Outcome::Timeout
        } else {
            Outcome::UpstreamError
        }
    }

    /// `{"error": {"message", "type", "code"}}`.
    pub(crate) fn body(&self) -> Vec<u8> {
        error_body(&self.to_string(), self.kind(), self.code())
    }
}

/// How a proxied exchange ended, for logs, metrics and usage events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The proxy answered with an error before any backend was asked (a bad request, a
    /// missing key, a limit, an unknown model).
    Refused,
    ClientAborted,
    UpstreamError,
    Timeout,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::ClientAborted => "client_aborted",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Timeout => "timeout",
        }
    }
}

/// What one upstream exchange says about the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It answered (any status below 500, or a 5xx the breaker ignores).
    Ok,
    /// 429 or 503: working but overloaded; neither a fault nor a success for the streak.
    Backpressure,
    /// Connect error, reset, read error, timeout before the first byte, 5xx.
    Fault,
}

impl Verdict {
    pub(crate) fn of_status(status: u16) -> Verdict {
        match status {
            429 | 503 => Verdict::Backpressure,
            500..=599 => Verdict::Fault,
            _ => Verdict::Ok,
        }
    }
}

pub(crate) fn error_body(message: &str, kind: &str, code: &str) -> Vec<u8> {
    let v = serde_json::json!({
        "error": { "message": message, "type": kind, "code": code, "param": null }
    });
    let mut s = v.to_string();
    let _ = s.write_char('\n');
    s.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_openai_shaped_and_escaped() {
        let e = ProxyError::UnknownModel("x\"y".into());
        assert_eq!(e.status(), 404);
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("x\"y"));
    }

    #[test]
    fn refusals_carry_their_headers() {
        let e = ProxyError::RateLimited {
            limit: Exceeded::Tokens,
            retry_after: 7,
        };
        assert_eq!(
            (e.status(), e.kind(), e.code()),
            (429, "tokens", "rate_limit_exceeded")
        );
        assert_eq!(e.extra_header(), Some(("retry-after", "7".to_string())));
        assert_eq!(e.rejection(), Some(Reason::TokenRate));
        let e = ProxyError::Unauthorized(AuthFailure::Missing);
        assert_eq!((e.status(), e.code()), (401, "missing_api_key"));
        assert_eq!(ProxyError::ModelNotAllowed("m".into()).status(), 403);
        assert_eq!(ProxyError::QueueFull.status(), 503);
        assert!(ProxyError::QueueFull.extra_header().is_some());
        assert_eq!(ProxyError::NoHealthyBackend.rejection(), None);
    }

    #[test]
    fn retry_rules() {
        assert!(ProxyError::UpstreamConnectTimeout.retryable());
        assert!(!ProxyError::FirstByteTimeout(std::time::Duration::from_secs(1)).retryable());
        assert!(!ProxyError::BadRequest("x".into()).retryable());
    }

    #[test]
    fn verdicts_count_faults_not_client_errors_or_backpressure() {
        for s in [500, 501, 502, 504, 599] {
            assert_eq!(Verdict::of_status(s), Verdict::Fault, "{s}");
        }
        for s in [429, 503] {
            assert_eq!(Verdict::of_status(s), Verdict::Backpressure, "{s}");
        }
        for s in [200, 204, 301, 400, 401, 404, 413, 422] {
            assert_eq!(Verdict::of_status(s), Verdict::Ok, "{s}");
        }
        let timeout = ProxyError::FirstByteTimeout(std::time::Duration::from_secs(1));
        assert_eq!(timeout.verdict(), Some(Verdict::Fault));
        let reset = ProxyError::UpstreamClosed("reset".into());
        assert_eq!(reset.verdict(), Some(Verdict::Fault));
        assert_eq!(
            ProxyError::UpstreamConnectTimeout.verdict(),
            Some(Verdict::Fault)
        );
        assert_eq!(
            ProxyError::UpstreamStatus(503).verdict(),
            Some(Verdict::Backpressure)
        );
        assert_eq!(ProxyError::QueueFull.verdict(), None);
        assert_eq!(
            ProxyError::IdleTimeout(std::time::Duration::from_secs(1)).verdict(),
            None
        );
        assert_eq!(ProxyError::BodyClosed.verdict(), Some(Verdict::Fault));
    }

    /// Every `llmproxy_upstream_errors_total{kind}` value comes from here, and each is the
    /// upstream's fault (counts toward its breaker) except a stream that went quiet.
    #[test]
    fn upstream_error_kinds_are_one_vocabulary() {
        use std::time::Duration;
        let io = || std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let table: [(ProxyError, &str, Option<Verdict>, bool); 10] = [
            (
                ProxyError::UpstreamConnect(io()),
                "upstream_connect_error",
                Some(Verdict::Fault),
                true,
            ),
            (
                ProxyError::UpstreamConnectTimeout,
                "upstream_connect_timeout",
                Some(Verdict::Fault),
                true,
            ),
            (
                ProxyError::UpstreamClosed("eof".into()),
                "upstream_closed",
                Some(Verdict::Fault),
                true,
            ),
            (
                ProxyError::FirstByteTimeout(Duration::from_secs(1)),
                "upstream_timeout",
                Some(Verdict::Fault),
                false,
            ),
            (
                ProxyError::UpstreamProtocol("x".into()),
                "upstream_protocol_error",
                Some(Verdict::Fault),
                false,
            ),
            (
                ProxyError::UpstreamStatus(503),
                "upstream_unavailable",
                Some(Verdict::Backpressure),
                false,
            ),
            (
                ProxyError::UpstreamStatus(502),
                "upstream_unavailable",
                Some(Verdict::Fault),
                false,
            ),
            (
                ProxyError::BodyClosed,
                "upstream_closed_mid_body",
                Some(Verdict::Fault),
                false,
            ),
            (
                ProxyError::BodyRead(io()),
                "upstream_read_error",
                Some(Verdict::Fault),
                false,
            ),
            (
                ProxyError::IdleTimeout(Duration::from_secs(1)),
                "upstream_idle_timeout",
                None,
                false,
            ),
        ];
        for (e, kind, verdict, retryable) in table {
            assert_eq!(e.upstream_kind(), Some(kind), "{e}");
            assert_eq!(e.verdict(), verdict, "{e}");
            assert_eq!(e.retryable(), retryable, "{e}");
            assert!(e.status() >= 500, "{e}");
        }
        for e in [
            ProxyError::QueueFull,
            ProxyError::NoHealthyBackend,
            ProxyError::RequestTimeout,
            ProxyError::BadRequest("x".into()),
        ] {
            assert_eq!((e.upstream_kind(), e.verdict()), (None, None), "{e}");
        }
        assert_eq!(ProxyError::BodyClosed.code(), "upstream_closed");
        assert_eq!(
            ProxyError::IdleTimeout(Duration::from_secs(1)).outcome(),
            Outcome::Timeout
        );
        assert_eq!(ProxyError::BodyClosed.outcome(), Outcome::UpstreamError);
    }
}
