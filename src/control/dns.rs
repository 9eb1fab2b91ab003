//! A minimal DNS client: A and AAAA queries to one resolver, for `discovery.resolver`. It only
//! needs the addresses of one name (a Kubernetes headless Service), so it sends one question per
//! record type over UDP with EDNS0 (4 KiB answers: a few hundred replicas fit), and reads the A/AAAA
//! records of the answer section, following nothing (a recursive resolver has already followed
//! CNAMEs and put the addresses in the answer). An answer with the truncation bit set is not the
//! whole set — taking it would silently drop replicas of a large Service — so the question is
//! asked again over TCP (RFC 7766), where nothing is truncated.
//!
//! Hand-written rather than a resolver crate: the blocking resolvers on crates.io either follow
//! the system configuration only (no explicit server) or pull in an async runtime; this needs two
//! questions to one server, on a thread that may block.
//!
//! Everything it reads comes from the network: every length and offset is bounds-checked and
//! a malformed answer is an error, never a panic.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const TYPE_OPT: u16 = 41;
const UDP_PAYLOAD: u16 = 4096;

/// Why a lookup gave no answer. Discovery logs it after the entry's URL; the text carries the
/// cause, so no `source()` repeats it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DnsError {
    #[error("invalid DNS name \"{0}\"")]
    InvalidName(String),
    /// The local UDP socket could not be set up.
    #[error("udp socket: {0}")]
    Socket(std::io::Error),
    /// Connecting to, sending to or receiving from the resolver failed.
    #[error("resolver {server}: {error}")]
    Io {
        server: SocketAddr,
        error: std::io::Error,
    },
    #[error("resolver {server}: no answer within {after:?}")]
    Timeout { server: SocketAddr, after: Duration },
    #[error("resolver {server}: {why}")]
    BadAnswer { server: SocketAddr, why: BadAnswer },
}

/// What is wrong with a response to our query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadAnswer {
    #[error("server answered rcode {0}")]
    Rcode(u16),
    #[error("truncated message")]
    TruncatedMessage,
    #[error("truncated record")]
    TruncatedRecord,
    #[error("truncated name")]
    TruncatedName,
    #[error("bad label type")]
    BadLabelType,
    #[error("address record of the wrong length")]
    AddressLength,
    #[error("answer to another question")]
    OtherId,
}

/// Every IPv4 and IPv6 address of `name` (A and AAAA), sorted. NXDOMAIN and "no records" are an
/// empty list; a timeout, a server failure or a malformed answer is an error.
pub(crate) fn lookup(
    server: SocketAddr,
    name: &str,
    timeout: Duration,
) -> Result<Vec<IpAddr>, DnsError> {
    let bind: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let io = |error| DnsError::Io { server, error };
    let timed_out = || DnsError::Timeout {
        server,
        after: timeout,
    };
    let sock = UdpSocket::bind(bind).map_err(DnsError::Socket)?;
    sock.connect(server).map_err(io)?;
    let mut out = Vec::new();
    for qtype in [TYPE_A, TYPE_AAAA] {
        let id = fastrand::u16(..);
        let query = encode_query(id, name, qtype)?;
        sock.send(&query).map_err(io)?;
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; usize::from(UDP_PAYLOAD)];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            sock.set_read_timeout(Some(left))
                .map_err(DnsError::Socket)?;
            let n = match sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(timed_out())
                }
                Err(e) => return Err(io(e)),
            };
            match parse_response(id, &buf[..n]) {
                // A stray or late datagram for another query: keep waiting for ours.
                Err(Malformed::OtherId) => continue,
                Err(Malformed::Truncated) => {
                    out.extend(over_tcp(server, &query, id, deadline)?);
                    break;
                }
                Err(Malformed::Bad(why)) => return Err(DnsError::BadAnswer { server, why }),
                Ok(ips) => {
                    out.extend(ips);
                    break;
                }
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Asks `query` (message id `id`) again over TCP, for an answer that did not fit in UDP: a 2-byte
/// length before each message, both ways; everything within `deadline`.
fn over_tcp(
    server: SocketAddr,
    query: &[u8],
    id: u16,
    deadline: Instant,
) -> Result<Vec<IpAddr>, DnsError> {
    let io = |error| DnsError::Io { server, error };
    let left = || deadline.saturating_duration_since(Instant::now());
    let timed_out = || DnsError::Timeout {
        server,
        after: Duration::ZERO,
    };
    if left().is_zero() {
        return Err(timed_out());
    }
    let mut conn = TcpStream::connect_timeout(&server, left()).map_err(io)?;
    let len = u16::try_from(query.len()).map_err(|_| DnsError::InvalidName(String::new()))?;
    let mut framed = Vec::with_capacity(2 + query.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    conn.set_write_timeout(Some(left().max(Duration::from_millis(1))))
        .map_err(io)?;
    conn.write_all(&framed).map_err(io)?;
    let mut read = |buf: &mut [u8]| -> Result<(), DnsError> {
        let wait = left();
        if wait.is_zero() {
            return Err(timed_out());
        }
        conn.set_read_timeout(Some(wait)).map_err(io)?;
        conn.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => timed_out(),
            _ => io(e),
        })
    };
    let mut len = [0u8; 2];
    read(&mut len)?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    read(&mut msg)?;
    match parse_response(id, &msg) {
        Ok(ips) => Ok(ips),
        // Over TCP the whole answer arrived: a truncation bit there is the server's confusion,
        // and the records it did send are all there is.
        Err(Malformed::Truncated) => {
            parse_records(&msg).map_err(|why| DnsError::BadAnswer { server, why })
        }
        Err(Malformed::OtherId) => Err(DnsError::BadAnswer {
            server,
            why: BadAnswer::OtherId,
        }),
        Err(Malformed::Bad(why)) => Err(DnsError::BadAnswer { server, why }),
    }
}

/// For the fuzz target: `msg` read as the answer to its own id. `None`: not an answer, or
/// truncated (the TC bit); `Some(Err)`: malformed; `Some(Ok)`: its addresses.
pub fn fuzz_answer(msg: &[u8]) -> Option<Result<Vec<IpAddr>, String>> {
    let id = u16::from_be_bytes([*msg.first()?, *msg.get(1)?]);
    match parse_response(id, msg) {
        Ok(ips) => Some(Ok(ips)),
        Err(Malformed::Bad(why)) => Some(Err(why.to_string())),
        Err(Malformed::OtherId | Malformed::Truncated) => None,
    }
}

/// A recursion-desired question for `name` with an EDNS0 OPT record.
pub(crate) fn encode_query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, DnsError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let invalid = || DnsError::InvalidName(name.to_string());
    if name.is_empty() || name.len() > 253 {
        return Err(invalid());
    }
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    q.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    q.extend_from_slice(&0u16.to_be_bytes()); // ANCOUNT
    q.extend_from_slice(&0u16.to_be_bytes()); // NSCOUNT
    q.extend_from_slice(&1u16.to_be_bytes()); // ARCOUNT (OPT)
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(invalid());
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    // OPT: root name, type, class = UDP payload size, extended rcode/flags 0, no data.
    q.push(0);
    q.extend_from_slice(&TYPE_OPT.to_be_bytes());
    q.extend_from_slice(&UDP_PAYLOAD.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    Ok(q)
}

#[derive(Debug, PartialEq)]
pub(crate) enum Malformed {
    /// Not an answer to the query we sent.
    OtherId,
    /// The answer did not fit (the TC bit): ask again over TCP.
    Truncated,
    Bad(BadAnswer),
}

impl From<BadAnswer> for Malformed {
    fn from(why: BadAnswer) -> Malformed {
        Malformed::Bad(why)
    }
}

/// The A and AAAA addresses in the answer section of the response to query `id`.
pub(crate) fn parse_response(id: u16, msg: &[u8]) -> Result<Vec<IpAddr>, Malformed> {
    let u16_at = |at: usize| -> Result<u16, Malformed> {
        msg.get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or(BadAnswer::TruncatedMessage.into())
    };
    if u16_at(0)? != id {
        return Err(Malformed::OtherId);
    }
    let flags = u16_at(2)?;
    if flags & 0x8000 == 0 {
        return Err(Malformed::OtherId);
    }
    match flags & 0x000f {
        0 => {}
        3 => return Ok(Vec::new()), // NXDOMAIN: the name has no records at all
        rcode => return Err(BadAnswer::Rcode(rcode).into()),
    }
    if flags & 0x0200 != 0 {
        return Err(Malformed::Truncated);
    }
    Ok(parse_records(msg)?)
}

/// The A and AAAA addresses of a response's answer section (header already checked).
fn parse_records(msg: &[u8]) -> Result<Vec<IpAddr>, BadAnswer> {
    let u16_at = |at: usize| -> Result<u16, BadAnswer> {
        msg.get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or(BadAnswer::TruncatedMessage)
    };
    let qdcount = u16_at(4)?;
    let ancount = u16_at(6)?;
    let mut at = 12;
    for _ in 0..qdcount {
        at = skip_name(msg, at)? + 4;
    }
    let mut ips = Vec::new();
    for _ in 0..ancount {
        at = skip_name(msg, at)?;
        let rtype = u16_at(at)?;
        let class = u16_at(at + 2)?;
        let len = usize::from(u16_at(at + 8)?);
        let data = msg
            .get(at + 10..at + 10 + len)
            .ok_or(BadAnswer::TruncatedRecord)?;
        at += 10 + len;
        if class != CLASS_IN {
            continue;
        }
        match (rtype, data.len()) {
            (TYPE_A, 4) => ips.push(IpAddr::from([data[0], data[1], data[2], data[3]])),
            (TYPE_AAAA, 16) => {
                let mut b = [0u8; 16];
                b.copy_from_slice(data);
                ips.push(IpAddr::from(b));
            }
            (TYPE_A | TYPE_AAAA, _) => return Err(BadAnswer::AddressLength),
            _ => {} // CNAME and friends: the addresses follow in the same answer
        }
    }
    Ok(ips)
}

/// Offset just past the (possibly compressed) name starting at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Result<usize, BadAnswer> {
    loop {
        let len = *msg.get(at).ok_or(BadAnswer::TruncatedName)?;
        match len {
            0 => return Ok(at + 1),
            l if l & 0xc0 == 0xc0 => {
                // A pointer ends the name here (what it points to is not needed).
                return if at + 2 <= msg.len() {
                    Ok(at + 2)
                } else {
                    Err(BadAnswer::TruncatedName)
                };
            }
            l if l & 0xc0 != 0 => return Err(BadAnswer::BadLabelType),
            l => at += 1 + usize::from(l),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer as a server would build it: the question, then records pointing back at it.
    fn answer(query: &[u8], rcode: u16, records: &[(u16, &[u8])]) -> Vec<u8> {
        let mut r = query[..2].to_vec();
        r.extend_from_slice(&(0x8180u16 | rcode).to_be_bytes());
        r.extend_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&(records.len() as u16).to_be_bytes());
        r.extend_from_slice(&[0, 0, 0, 0]);
        let qend = skip_name(query, 12).unwrap() + 4;
        r.extend_from_slice(&query[12..qend]);
        for (t, data) in records {
            r.extend_from_slice(&[0xc0, 12]);
            r.extend_from_slice(&t.to_be_bytes());
            r.extend_from_slice(&CLASS_IN.to_be_bytes());
            r.extend_from_slice(&30u32.to_be_bytes());
            r.extend_from_slice(&(data.len() as u16).to_be_bytes());
            r.extend_from_slice(data);
        }
        r
    }

    #[test]
    fn query_encoding() {
        let q = encode_query(0x1234, "vllm.llm.svc.", TYPE_A).unwrap();
        assert_eq!(&q[..2], &[0x12, 0x34]);
        assert_eq!(&q[12..26], b"\x04vllm\x03llm\x03svc\x00");
        assert_eq!(&q[26..30], &[0, 1, 0, 1]);
        assert_eq!(q.len(), 30 + 11);
        assert!(encode_query(1, "", TYPE_A).is_err());
        assert!(encode_query(1, "a..b", TYPE_A).is_err());
        assert!(encode_query(1, &"x".repeat(64), TYPE_A).is_err());
    }

    #[test]
    fn answers_give_their_addresses() {
        let q = encode_query(7, "vllm", TYPE_A).unwrap();
        let cname: &[u8] = b"\x03foo\x00";
        let r = answer(
            &q,
            0,
            &[
                (5, cname),
                (TYPE_A, &[10, 0, 0, 1]),
                (TYPE_A, &[10, 0, 0, 2]),
            ],
        );
        assert_eq!(
            parse_response(7, &r).unwrap(),
            vec![IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2])]
        );
        let v6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let r = answer(&q, 0, &[(TYPE_AAAA, &v6)]);
        assert_eq!(parse_response(7, &r).unwrap(), vec![IpAddr::from(v6)]);
    }

    #[test]
    fn nxdomain_is_empty_and_failures_are_errors() {
        let q = encode_query(9, "gone", TYPE_A).unwrap();
        assert!(parse_response(9, &answer(&q, 3, &[])).unwrap().is_empty());
        assert_eq!(
            parse_response(9, &answer(&q, 2, &[])),
            Err(Malformed::Bad(BadAnswer::Rcode(2)))
        );
        assert_eq!(
            parse_response(8, &answer(&q, 0, &[])),
            Err(Malformed::OtherId)
        );
        // Our own query echoed back (QR not set) is not an answer.
        assert_eq!(parse_response(9, &q), Err(Malformed::OtherId));
    }

    #[test]
    fn malformed_answers_never_panic() {
        let q = encode_query(5, "vllm", TYPE_A).unwrap();
        let r = answer(&q, 0, &[(TYPE_A, &[10, 0, 0, 1])]);
        for cut in 0..r.len() {
            let _ = parse_response(5, &r[..cut]);
        }
        assert_eq!(
            parse_response(5, &r[..r.len() - 1]),
            Err(Malformed::Bad(BadAnswer::TruncatedRecord))
        );
        let mut wrong_len = answer(&q, 0, &[(TYPE_A, &[10, 0, 0])]);
        assert_eq!(
            parse_response(5, &wrong_len),
            Err(Malformed::Bad(BadAnswer::AddressLength))
        );
        wrong_len[12] = 0x80; // reserved label type
        assert_eq!(
            parse_response(5, &wrong_len),
            Err(Malformed::Bad(BadAnswer::BadLabelType))
        );
        for _ in 0..2000 {
            let mut junk = r.clone();
            let i = fastrand::usize(2..junk.len());
            junk[i] = fastrand::u8(..);
            let _ = parse_response(5, &junk);
        }
    }

    /// A resolver on one port, UDP and TCP: over UDP it sends the first address with the
    /// truncation bit set, over TCP all of them (AAAA: none).
    fn truncating_resolver(addrs: Vec<[u8; 4]>) -> SocketAddr {
        use std::net::TcpListener;
        // The UDP port the kernel picks may be held on the TCP side (another test's outgoing
        // connection, say): try fresh ports until one is free on both, a bounded number of times.
        let (udp, tcp) = (0..50)
            .find_map(|_| {
                let udp = UdpSocket::bind("127.0.0.1:0").ok()?;
                let tcp = TcpListener::bind(udp.local_addr().ok()?).ok()?;
                Some((udp, tcp))
            })
            .expect("a port free for both UDP and TCP");
        let server = udp.local_addr().unwrap();
        let records = move |q: &[u8], all: bool| {
            let qtype = u16::from_be_bytes([q[q.len() - 15], q[q.len() - 14]]);
            let recs: Vec<(u16, &[u8])> = match qtype {
                TYPE_A if all => addrs.iter().map(|a| (TYPE_A, &a[..])).collect(),
                TYPE_A => addrs.iter().take(1).map(|a| (TYPE_A, &a[..])).collect(),
                _ => Vec::new(),
            };
            let mut r = answer(q, 0, &recs);
            if !all && qtype == TYPE_A {
                r[2] |= 0x02; // TC
            }
            r
        };
        let for_udp = records.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            for _ in 0..2 {
                let Ok((n, peer)) = udp.recv_from(&mut buf) else {
                    return;
                };
                let _ = udp.send_to(&for_udp(&buf[..n], false), peer);
            }
        });
        std::thread::spawn(move || {
            if let Ok((mut conn, _)) = tcp.accept() {
                let mut len = [0u8; 2];
                conn.read_exact(&mut len).unwrap();
                let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                conn.read_exact(&mut q).unwrap();
                let r = records(&q, true);
                conn.write_all(&(r.len() as u16).to_be_bytes()).unwrap();
                conn.write_all(&r).unwrap();
            }
        });
        server
    }

    #[test]
    fn a_truncated_answer_is_asked_again_over_tcp() {
        let q = encode_query(3, "vllm", TYPE_A).unwrap();
        let mut r = answer(&q, 0, &[(TYPE_A, &[10, 0, 0, 1])]);
        r[2] |= 0x02;
        assert_eq!(parse_response(3, &r), Err(Malformed::Truncated));
        let all: Vec<[u8; 4]> = (1..=40).map(|i| [10, 0, 1, i]).collect();
        let server = truncating_resolver(all.clone());
        let got = lookup(server, "vllm.llm.svc", Duration::from_secs(5)).unwrap();
        let want: Vec<IpAddr> = all.into_iter().map(IpAddr::from).collect();
        assert_eq!(got, want, "the UDP answer alone had one address");
    }
}
