//! The HTTP/1.1 head parser (`http1::head`): requests, and responses when the input starts with
//! `HTTP/`. Properties: no panic; a complete head is exactly the bytes consumed and the rest is
//! left untouched; a partial head consumes nothing; the header limit holds; the parser agrees with
//! itself when the same bytes arrive in pieces (as the server's read loop feeds it); body framing
//! is never ambiguous (Content-Length with Transfer-Encoding, conflicting lengths, codings other
//! than a single `chunked`, chunked in HTTP/1.0 are all errors).

use bytes::BytesMut;
use llmproxy::http1::head::{BodyFraming, Head, HeadError, ParseStatus, MAX_HEADERS};

use crate::engine::{cuts, feature, pieces, rng_for, Target};

pub const TARGET: Target = Target {
    name: "http_head",
    dict: &[
        b"\r\n",
        b"\r\n\r\n",
        b"\n",
        b": ",
        b"GET / HTTP/1.1\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.0 ",
        b"Host: a\r\n",
        b"Content-Length: ",
        b"Content-Length: 5\r\n",
        b"content-length: 0\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: ",
        b"transfer-encoding: gzip, chunked\r\n",
        b"chunked",
        b", ",
        b"Connection: close\r\n",
        b"Connection: keep-alive\r\n",
        b"Expect: 100-continue\r\n",
        b" folded\r\n",
        b"\t",
        b"X-A: 1\r\n",
    ],
    max_len: 16 * 1024,
    check,
};

/// What parsing some bytes gave, in a comparable form.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Partial,
    Err(HeadError),
    /// Head length, header count, framing verdict.
    Complete(usize, usize, Result<BodyFraming, HeadError>),
}

fn is_response(input: &[u8]) -> bool {
    input.starts_with(b"HTTP/")
}

fn parse(bytes: &[u8], response: bool) -> (Parsed, BytesMut, Option<Head>) {
    let mut buf = BytesMut::from(bytes);
    let result = if response {
        Head::parse_response(&mut buf)
    } else {
        Head::parse_request(&mut buf)
    };
    match result {
        Ok(ParseStatus::Partial) => (Parsed::Partial, buf, None),
        Err(e) => (Parsed::Err(e), buf, None),
        Ok(ParseStatus::Complete(head)) => {
            let framing = if response {
                head.response_framing("GET")
            } else {
                head.request_framing()
            };
            let parsed = Parsed::Complete(head.raw_len(), head.header_count(), framing);
            (parsed, buf, Some(head))
        }
    }
}

fn check(input: &[u8]) -> u64 {
    let response = is_response(input);
    let (whole, rest, head) = parse(input, response);
    match (&whole, &head) {
        (Parsed::Partial, _) => assert_eq!(&rest[..], input, "a partial head consumes nothing"),
        (Parsed::Complete(len, count, framing), Some(head)) => {
            assert_eq!(&rest[..], &input[*len..], "the rest follows the head");
            assert!(*count <= MAX_HEADERS);
            check_head(head, response, framing);
        }
        _ => {}
    }

    // The server parses after every read: the first verdict that is not Partial must be the
    // verdict on the whole input.
    let mut rng = rng_for(input);
    let mut fed = 0;
    let mut incremental = Parsed::Partial;
    for piece in pieces(input, &cuts(input.len(), &mut rng)) {
        fed += piece.len();
        let (p, _, _) = parse(&input[..fed], response);
        if p != Parsed::Partial {
            incremental = p;
            break;
        }
    }
    assert_eq!(
        incremental, whole,
        "verdict depends on how the bytes arrived"
    );

    feature((
        response,
        match &whole {
            // The framing kind, not the length: one behaviour per kind keeps the pool useful.
            Parsed::Complete(_, n, Ok(BodyFraming::Length(_))) => format!("{} length", n.min(&8)),
            Parsed::Complete(_, n, f) => format!("{} {f:?}", n.min(&8)),
            other => format!("{other:?}"),
        },
    ))
}

fn check_head(head: &Head, response: bool, framing: &Result<BodyFraming, HeadError>) {
    // Accessors never panic, whatever bytes the head holds.
    let _ = (head.method(), head.target(), head.path(), head.reason());
    let _ = (head.keep_alive(), head.header_str("host"));
    if response {
        let _ = head.response_framing("HEAD");
    }
    let named = |name: &[u8]| -> Vec<&[u8]> {
        head.headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    };
    let lengths = named(b"content-length");
    let codings = named(b"transfer-encoding");
    // Empty list elements ("chunked, ") are allowed by the list syntax and ignored.
    let coding_list = |v: &[u8]| -> Vec<Vec<u8>> {
        v.split(|b| *b == b',')
            .map(|t| t.trim_ascii().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    };
    let only_chunked = |v: &&[u8]| coding_list(v) == [b"chunked".to_vec()];
    let length_values: Vec<Option<u64>> = lengths
        .iter()
        .flat_map(|v| v.split(|b| *b == b','))
        .map(|p| {
            let p = p.trim_ascii();
            // More than 19 digits (even zero-padded) is refused as a matter of policy.
            (!p.is_empty() && p.len() <= 19 && p.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(p).ok()?.parse().ok())
                .flatten()
        })
        .collect();
    let bodiless = response && matches!(head.status, 100..=199 | 204 | 304);
    match framing {
        Ok(BodyFraming::Chunked) => {
            assert!(lengths.is_empty(), "chunked with a Content-Length");
            assert_eq!(
                codings.len(),
                1,
                "chunked needs exactly one Transfer-Encoding"
            );
            assert!(only_chunked(&codings[0]), "{:?}", codings[0]);
            assert_eq!(head.version, 1, "chunked in HTTP/1.0");
        }
        Ok(BodyFraming::Length(n)) => {
            assert!(*n > 0 && codings.is_empty());
            assert!(!length_values.is_empty());
            assert!(length_values.iter().all(|v| *v == Some(*n)), "{lengths:?}");
        }
        Ok(BodyFraming::Empty) if bodiless => {}
        Ok(BodyFraming::Empty) => {
            assert!(codings.is_empty());
            assert!(length_values.iter().all(|v| *v == Some(0)));
        }
        Ok(BodyFraming::UntilClose) => {
            assert!(response && lengths.is_empty() && codings.is_empty());
        }
        Err(_) => {
            let ambiguous = (!lengths.is_empty() && !codings.is_empty())
                || codings.len() > 1
                || length_values.iter().any(Option::is_none)
                || length_values.windows(2).any(|w| w[0] != w[1])
                || !codings.iter().all(only_chunked)
                || (!codings.is_empty() && head.version == 0);
            assert!(ambiguous, "framing rejected without a reason");
        }
    }
}
