//! Which headers cross the proxy. Hop-by-hop headers (RFC 9110 §7.6.1) and any header the
//! sender named in `Connection` describe one TCP connection and are never forwarded, in either
//! direction. Framing headers are dropped too: the proxy always re-frames the bodies it sends.

use super::head::Head;

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Headers that the proxy sets itself and therefore never copies.
const REFRAMED: &[&str] = &["content-length", "expect"];

pub fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| h.as_bytes().eq_ignore_ascii_case(name))
}

/// The headers of `head` that may be forwarded, with `skip` naming extra headers the caller
/// rewrites itself (e.g. `host`, `x-forwarded-for`).
pub fn forwardable<'a>(
    head: &'a Head,
    skip: &'a [&'a str],
) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
    let named: Vec<&[u8]> = head
        .headers()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
        .flat_map(|(_, v)| v.split(|b| *b == b','))
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
        .collect();
    head.headers().filter(move |(name, _)| {
        !is_hop_by_hop(name)
            && !REFRAMED
                .iter()
                .any(|h| h.as_bytes().eq_ignore_ascii_case(name))
            && !skip.iter().any(|h| h.as_bytes().eq_ignore_ascii_case(name))
            && !named.iter().any(|t| t.eq_ignore_ascii_case(name))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::head::ParseStatus;
    use bytes::BytesMut;

    #[test]
    fn drops_hop_by_hop_and_connection_named() {
        let mut b = BytesMut::from(
            &b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\nContent-Length: 0\r\nX-Keep: yes\r\n\r\n"[..],
        );
        let ParseStatus::Complete(h) = Head::parse_request(&mut b).unwrap() else {
            panic!()
        };
        let names: Vec<&[u8]> = forwardable(&h, &["host"]).map(|(n, _)| n).collect();
        assert_eq!(names, vec![&b"X-Keep"[..]]);
    }
}
