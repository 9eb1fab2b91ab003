//! Which headers cross the proxy. Hop-by-hop headers (RFC 9110 §7.6.1) and any header the
//! sender named in `Connection` describe one TCP connection and are never forwarded, in either
//! direction. Framing headers are dropped too: the proxy always re-frames the bodies it sends.

use super::head::Head;
use super::name::Name;

/// Never copied: hop-by-hop headers, and the framing ones the proxy sets itself.
const DROPPED: u32 = Name::HOP_BY_HOP | Name::ContentLength.bit() | Name::Expect.bit();

/// The header lines of `head` that may be forwarded ("Name: value" as the peer wrote it,
/// without the line end: one copy each), with `skip` naming extra headers the caller rewrites
/// itself (e.g. `host`, `x-forwarded-for`).
pub fn forwardable<'a>(head: &'a Head, skip: &[Name]) -> impl Iterator<Item = &'a [u8]> + 'a {
    // Tokens naming a hop-by-hop header (`keep-alive`, the common one) are dropped anyway, and
    // leaving them out keeps this list empty, unallocated, for most requests.
    let named: Vec<&[u8]> = head
        .values(Name::Connection)
        .flat_map(|v| v.split(|b| *b == b','))
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty() && !Name::of(t).is_hop_by_hop())
        .collect();
    let dropped = skip.iter().fold(DROPPED, |set, n| set | n.bit());
    head.lines_except(dropped).filter(move |line| {
        named.is_empty() || {
            let name = line.split(|b| *b == b':').next().unwrap_or_default();
            !named.iter().any(|t| t.eq_ignore_ascii_case(name))
        }
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
        let lines: Vec<&[u8]> = forwardable(&h, &[Name::Host]).collect();
        assert_eq!(lines, vec![&b"X-Keep: yes"[..]]);
    }

    /// A line copied whole says what the header said: parsed again, every forwarded line gives
    /// the name and value the original did, whatever the spacing around the value.
    #[test]
    fn forwarded_lines_parse_back_to_the_same_headers() {
        let head = "GET / HTTP/1.1\r\nHost: h\r\nX-None:v\r\nX-Tab:\tv w\r\nX-Spaces:   v  \r\n\
                    X-Empty:\r\nX-Blank:   \r\nX-Tail: v\t\r\nContent-Length: 0\r\n\r\n";
        let mut b = BytesMut::from(head.as_bytes());
        let ParseStatus::Complete(h) = Head::parse_request(&mut b).unwrap() else {
            panic!()
        };
        let mut again = b"GET / HTTP/1.1\r\n".to_vec();
        for line in forwardable(&h, &[Name::Host]) {
            again.extend_from_slice(line);
            again.extend_from_slice(b"\r\n");
        }
        again.extend_from_slice(b"\r\n");
        let mut b = BytesMut::from(&again[..]);
        let ParseStatus::Complete(h2) = Head::parse_request(&mut b).unwrap() else {
            panic!()
        };
        let want: Vec<(&[u8], &[u8])> = h
            .headers()
            .filter(|(n, _)| {
                !n.eq_ignore_ascii_case(b"host") && !n.eq_ignore_ascii_case(b"content-length")
            })
            .collect();
        assert_eq!(want.len(), 6);
        assert_eq!(h2.headers().collect::<Vec<_>>(), want);
        // An obsolete line folding is refused when parsed, so it never reaches a copy.
        let mut b = BytesMut::from(&b"GET / HTTP/1.1\r\nX-A: v\r\n w\r\n\r\n"[..]);
        assert!(Head::parse_request(&mut b).is_err());
    }
}
