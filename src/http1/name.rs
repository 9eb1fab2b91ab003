//! The header names the proxy itself acts on, recognised once when a head is parsed (see
//! `head`): a tag per header instead of case-insensitive name comparisons at every lookup.
//! Hand-written rather than `http::HeaderName::from_bytes`, which copies every name through a
//! lower-casing table and allocates for the names it does not know: here one match on length and
//! first letter, then at most one comparison eight bytes at a time, and nothing allocated.

use crate::swar;

/// The header names the proxy itself reads, drops or rewrites, recognised once per head
/// (`Name::of`, one name comparison per header at most) so that body framing, lookups and the
/// forwarding filter compare a tag instead of names: those ran ten to twenty case-insensitive
/// name comparisons per header and head, a few hundred instructions per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    /// Any other name: found by comparing the name itself.
    Other,
    Authorization,
    Connection,
    ContentLength,
    ContentType,
    Expect,
    Host,
    KeepAlive,
    ProxyAuthenticate,
    ProxyAuthorization,
    ProxyConnection,
    Te,
    Trailer,
    TransferEncoding,
    Upgrade,
    XApiKey,
    XForwardedFor,
    XLlmproxyPriority,
    XRequestId,
}

impl Name {
    /// The known name `name` is, compared without regard to case.
    pub fn of(name: &[u8]) -> Name {
        let first = name.first().map_or(0, u8::to_ascii_lowercase);
        // By length and first letter: at most one comparison of the whole name, and none for
        // most other names (Accept, Date, Server, User-Agent...).
        let candidate = match (name.len(), first) {
            (2, b't') => Name::Te,
            (4, b'h') => Name::Host,
            (6, b'e') => Name::Expect,
            (7, b't') => Name::Trailer,
            (7, b'u') => Name::Upgrade,
            (9, b'x') => Name::XApiKey,
            (10, b'c') => Name::Connection,
            (10, b'k') => Name::KeepAlive,
            (12, b'c') => Name::ContentType,
            (12, b'x') => Name::XRequestId,
            (13, b'a') => Name::Authorization,
            (14, b'c') => Name::ContentLength,
            (15, b'x') => Name::XForwardedFor,
            (16, b'p') => Name::ProxyConnection,
            (17, b't') => Name::TransferEncoding,
            (18, b'p') => Name::ProxyAuthenticate,
            (19, b'p') => Name::ProxyAuthorization,
            (19, b'x') => Name::XLlmproxyPriority,
            _ => return Name::Other,
        };
        if eq_lower(name, candidate.as_str().as_bytes()) {
            candidate
        } else {
            Name::Other
        }
    }

    /// The name in lower case ("" for `Other`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Name::Other => "",
            Name::Authorization => "authorization",
            Name::Connection => "connection",
            Name::ContentLength => "content-length",
            Name::ContentType => "content-type",
            Name::Expect => "expect",
            Name::Host => "host",
            Name::KeepAlive => "keep-alive",
            Name::ProxyAuthenticate => "proxy-authenticate",
            Name::ProxyAuthorization => "proxy-authorization",
            Name::ProxyConnection => "proxy-connection",
            Name::Te => "te",
            Name::Trailer => "trailer",
            Name::TransferEncoding => "transfer-encoding",
            Name::Upgrade => "upgrade",
            Name::XApiKey => "x-api-key",
            Name::XForwardedFor => "x-forwarded-for",
            Name::XLlmproxyPriority => "x-llmproxy-priority",
            Name::XRequestId => "x-request-id",
        }
    }

    /// How many names there are, `Other` included.
    pub const COUNT: usize = Name::XRequestId as usize + 1;

    /// This name's bit in a set of names (`u32`).
    pub const fn bit(self) -> u32 {
        1 << self as u32
    }

    /// The hop-by-hop names (RFC 9110 §7.6.1): they describe one connection, never forwarded.
    pub const HOP_BY_HOP: u32 = Name::Connection.bit()
        | Name::KeepAlive.bit()
        | Name::ProxyConnection.bit()
        | Name::Te.bit()
        | Name::Trailer.bit()
        | Name::TransferEncoding.bit()
        | Name::Upgrade.bit()
        | Name::ProxyAuthorization.bit()
        | Name::ProxyAuthenticate.bit();

    pub fn is_hop_by_hop(self) -> bool {
        Name::HOP_BY_HOP & self.bit() != 0
    }
}

/// `name` in ASCII lower case is `lower` (which is lower case): eight bytes at a time from
/// eight letters on (the last word overlapping the one before), where the byte loop of
/// `eq_ignore_ascii_case` cost about six instructions a byte.
fn eq_lower(name: &[u8], lower: &[u8]) -> bool {
    let n = name.len();
    if n != lower.len() {
        return false;
    }
    if n < 8 {
        return name
            .iter()
            .zip(lower)
            .all(|(a, b)| a.to_ascii_lowercase() == *b);
    }
    let word_eq = |at: usize| {
        let word = |s: &[u8]| {
            s.get(at..at + 8)
                .and_then(|w| <[u8; 8]>::try_from(w).ok())
                .map(u64::from_le_bytes)
        };
        match (word(name), word(lower)) {
            (Some(a), Some(b)) => a | (swar::between(a, b'A' - 1, b'Z' + 1) >> 2) == b,
            _ => false,
        }
    };
    (0..n - 8).step_by(8).all(word_eq) && word_eq(n - 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: [Name; 18] = [
        Name::Authorization,
        Name::Connection,
        Name::ContentLength,
        Name::ContentType,
        Name::Expect,
        Name::Host,
        Name::KeepAlive,
        Name::ProxyAuthenticate,
        Name::ProxyAuthorization,
        Name::ProxyConnection,
        Name::Te,
        Name::Trailer,
        Name::TransferEncoding,
        Name::Upgrade,
        Name::XApiKey,
        Name::XForwardedFor,
        Name::XLlmproxyPriority,
        Name::XRequestId,
    ];

    #[test]
    fn every_known_name_is_recognised_in_any_case_and_nothing_else_is() {
        // `Name::COUNT` sizes a head's index and `bit` a u32 set: both must cover every name.
        assert_eq!(KNOWN.len() + 1, Name::COUNT);
        assert!(KNOWN
            .iter()
            .all(|k| (*k as usize) < Name::COUNT && Name::COUNT <= 32));
        for k in KNOWN {
            let lower = k.as_str();
            assert_eq!(Name::of(lower.as_bytes()), k);
            assert_eq!(Name::of(lower.to_ascii_uppercase().as_bytes()), k);
            let mixed: String = lower
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if i % 2 == 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect();
            assert_eq!(Name::of(mixed.as_bytes()), k, "{mixed}");
            // Same length, one letter off (first or last): another name.
            let mut off = lower.as_bytes().to_vec();
            let last = off.len() - 1;
            off[last] = if off[last] == b'z' { b'y' } else { b'z' };
            assert_eq!(Name::of(&off), Name::Other, "{off:?}");
            off = lower.as_bytes().to_vec();
            off[0] = b'q';
            assert_eq!(Name::of(&off), Name::Other, "{off:?}");
            // A prefix or an extension is not the name.
            assert_eq!(Name::of(&lower.as_bytes()[..last]), Name::Other);
            assert_eq!(Name::of(format!("{lower}s").as_bytes()), Name::Other);
        }
        for other in [
            "",
            "a",
            "accept",
            "user-agent",
            "x-custom",
            "te ",
            "hosts",
            "cookie",
        ] {
            assert_eq!(Name::of(other.as_bytes()), Name::Other, "{other}");
        }
        let hop: Vec<&str> = KNOWN
            .into_iter()
            .filter(|k| k.is_hop_by_hop())
            .map(Name::as_str)
            .collect();
        assert_eq!(
            hop,
            [
                "connection",
                "keep-alive",
                "proxy-authenticate",
                "proxy-authorization",
                "proxy-connection",
                "te",
                "trailer",
                "transfer-encoding",
                "upgrade"
            ]
        );
    }

    /// Every byte value at every position of names of every length up to 19: the word-wise
    /// comparison agrees with `eq_ignore_ascii_case`.
    #[test]
    fn eq_lower_agrees_with_the_byte_loop() {
        let base = b"x-llmproxy-priority";
        for n in 0..=base.len() {
            let lower = &base[..n];
            for at in 0..n {
                for b in 0..=255u8 {
                    let mut name = lower.to_vec();
                    name[at] = b;
                    assert_eq!(
                        eq_lower(&name, lower),
                        name.eq_ignore_ascii_case(lower),
                        "{name:?}"
                    );
                }
            }
            assert!(eq_lower(&lower.to_ascii_uppercase(), lower));
            assert!(!eq_lower(&base[..n.saturating_sub(1)], lower) || n == 0);
        }
    }
}
