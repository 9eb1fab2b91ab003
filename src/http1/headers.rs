//! Which headers cross the proxy. Hop-by-hop headers (RFC 9110 §7.6.1) and any header the
//! sender named in `Connection` describe one TCP connection and are never forwarded, in either
//! direction. Framing headers are dropped too: the proxy always re-frames the bodies it sends.

use super::head::{Head, Name};

/// The headers of `head` that may be forwarded, with `skip` naming extra headers the caller
/// rewrites itself (e.g. `host`, `x-forwarded-for`). Content-Length and Expect are dropped
/// too: the proxy sets both itself.
pub fn forwardable<'a>(
    head: &'a Head,
    skip: &'a [Name],
) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
    // Tokens naming a hop-by-hop header (`keep-alive`, the common one) are dropped anyway, and
    // leaving them out keeps this list empty, unallocated, for most requests.
    let named: Vec<&[u8]> = head
        .fields()
        .filter(|(n, _, _)| *n == Name::Connection)
        .flat_map(|(_, _, v)| v.split(|b| *b == b','))
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty() && !Name::of(t).is_hop_by_hop())
        .collect();
    head.fields()
        .filter(move |(known, name, _)| {
            !known.is_hop_by_hop()
                && !matches!(known, Name::ContentLength | Name::Expect)
                && !skip.contains(known)
                && !named.iter().any(|t| t.eq_ignore_ascii_case(name))
        })
        .map(|(_, name, value)| (name, value))
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
        let names: Vec<&[u8]> = forwardable(&h, &[Name::Host]).map(|(n, _)| n).collect();
        assert_eq!(names, vec![&b"X-Keep"[..]]);
    }
}
