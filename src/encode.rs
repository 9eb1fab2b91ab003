//! Text encodings written once per request on the hot path — JSON strings and numbers for usage
//! events and access-log lines, fixed-width hex for ids — without `core::fmt` or a
//! `serde_json::Value`. Profiles showed the generic routes (formatting machinery, a map per line,
//! byte-at-a-time escaping) costing more than the proxying they describe. Strings and integers
//! come out exactly as `serde_json` writes them (tests compare the two).

use std::fmt::Write as _;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends the lowest `digits` hex digits of `v` (zero-padded, lowercase; at most 32).
pub(crate) fn push_hex(out: &mut String, v: u128, digits: usize) {
    let mut buf = [0u8; 32];
    buf[..16].copy_from_slice(&hex16((v >> 64) as u64));
    buf[16..].copy_from_slice(&hex16(v as u64));
    push_ascii(out, &buf[32 - digits.min(32)..]);
}

/// `v` as 16 lowercase hex digits, most significant first: every nibble spread into a byte of
/// its own and turned into its digit eight at a time (a table lookup per nibble cost a request
/// id and an event id about 600 instructions).
pub(crate) fn hex16(v: u64) -> [u8; 16] {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let digits = |x: u32| {
        let x = u64::from(x);
        let x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
        let x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
        // Byte k holds nibble k, counted from the least significant.
        let x = (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
        // 1 in the bytes whose nibble is 10 or more: those become letters.
        let letters = ((x + ONES * 6) >> 4) & ONES;
        (x + ONES * u64::from(b'0') + letters * u64::from(b'a' - b'0' - 10)).to_be_bytes()
    };
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&digits((v >> 32) as u32));
    out[8..].copy_from_slice(&digits(v as u32));
    out
}

/// Appends bytes known to be ASCII (digits, hex): a few (most numbers) a char at a time, more
/// in one copy (checking them as UTF-8 first costs about forty instructions whatever the length).
#[inline]
fn push_ascii(out: &mut String, ascii: &[u8]) {
    if ascii.len() <= 8 {
        out.extend(ascii.iter().map(|&b| char::from(b)));
    } else if let Ok(s) = std::str::from_utf8(ascii) {
        out.push_str(s);
    }
}

/// Appends `s` as a JSON string literal, quotes included. Most strings need no escaping at all:
/// they are tested eight bytes at a time and copied whole, inlined where they are written, and
/// the escaping loop is a call of its own, so that the common case does not save and restore
/// the registers the loop needs (about forty instructions a call, fifteen calls a request with
/// the access log on).
#[inline]
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    if any_escape(s.as_bytes()) {
        return push_json_escaped(out, s);
    }
    out.reserve(s.len() + 2);
    out.push('"');
    out.push_str(s);
    out.push('"');
}

#[cold]
#[inline(never)]
fn push_json_escaped(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if needs_escape(b) {
            out.push_str(&s[start..i]);
            match b {
                b'"' => out.push_str("\\\""),
                b'\\' => out.push_str("\\\\"),
                b'\n' => out.push_str("\\n"),
                b'\r' => out.push_str("\\r"),
                b'\t' => out.push_str("\\t"),
                0x08 => out.push_str("\\b"),
                0x0c => out.push_str("\\f"),
                _ => {
                    out.push_str("\\u00");
                    push_hex(out, u128::from(b), 2);
                }
            }
            start = i + 1;
        }
    }
    out.push_str(&s[start..]);
    out.push('"');
}

fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Whether any byte is a control character, `"` or `\`, eight bytes per step.
fn any_escape(bytes: &[u8]) -> bool {
    use crate::swar::{below, equal, first};
    first(
        bytes,
        |x| below(x, 0x20) | equal(x, b'"') | equal(x, b'\\'),
        needs_escape,
    )
    .is_some()
}

/// Appends an optional string as a JSON string or `null`.
pub(crate) fn push_json_opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(out, s),
        None => out.push_str("null"),
    }
}

/// Appends an integer in decimal.
pub(crate) fn push_u64(out: &mut String, v: u64) {
    let mut buf = [0u8; 20];
    push_ascii(out, decimal(v, &mut buf));
}

/// `v` in decimal ASCII, written at the end of `buf` (20 bytes hold any u64).
pub(crate) fn decimal(v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut n = v;
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[at..]
}

/// `v` in lowercase hex ASCII without leading zeros, written at the end of `buf` (HTTP chunk
/// sizes).
pub(crate) fn hex(v: u64, buf: &mut [u8; 16]) -> &[u8] {
    let mut n = v;
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = HEX[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    &buf[at..]
}

/// Appends an optional integer or `null`.
pub(crate) fn push_opt_u64(out: &mut String, v: Option<u64>) {
    match v {
        Some(v) => push_u64(out, v),
        None => out.push_str("null"),
    }
}

/// The reference for `push_millis`: a float as a JSON number (Rust's shortest round-trip form, never an exponent);
/// non-finite values, which JSON cannot carry, become `null`.
#[cfg(test)]
fn push_f64(out: &mut String, v: f64) {
    if v.is_finite() {
        let _ = write!(out, "{v}");
    } else {
        out.push_str("null");
    }
}

/// Appends a socket address as `Display` writes it (`127.0.0.1:5`, `[::1]:5`); IPv4, the common
/// case, without `core::fmt`.
pub(crate) fn push_socket_addr(out: &mut String, addr: &std::net::SocketAddr) {
    match addr {
        std::net::SocketAddr::V4(a) => {
            for (i, o) in a.ip().octets().iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_u64(out, u64::from(*o));
            }
            out.push(':');
            push_u64(out, u64::from(a.port()));
        }
        std::net::SocketAddr::V6(a) => {
            let _ = write!(out, "{a}");
        }
    }
}

/// Appends milliseconds given in microseconds (`141.339`, `2`, `0.05`): the shortest form that
/// reads back as `micros as f64 / 1000.0`, as `push_f64` writes that float.
pub(crate) fn push_millis(out: &mut String, micros: u64) {
    push_u64(out, micros / 1000);
    let frac = micros % 1000;
    if frac != 0 {
        let digits = [
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ];
        let len = if frac.is_multiple_of(100) {
            1
        } else if frac.is_multiple_of(10) {
            2
        } else {
            3
        };
        out.push('.');
        for &d in &digits[..len] {
            out.push(char::from(d));
        }
    }
}

/// Appends `t` as RFC 3339 UTC with milliseconds (`Rfc3339Millis`).
#[cfg(test)]
pub(crate) fn push_rfc3339_millis(out: &mut String, t: std::time::SystemTime) {
    Rfc3339Millis::new(t).push(out);
}

/// A time as RFC 3339 UTC with milliseconds (`2026-12-06T02:34:16.123Z`), exactly as
/// `humantime::format_rfc3339_millis` writes it, without `core::fmt`; formatted once per request
/// and copied into both its access line and its usage event. Times before 1970 are written as
/// 1970-01-01T00:00:00.000Z.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc3339Millis([u8; 24]);

impl Rfc3339Millis {
    pub fn new(t: std::time::SystemTime) -> Self {
        thread_local! {
            /// The last second formatted on this thread: requests finishing within the same
            /// second only write their milliseconds (the civil date's divisions cost more than
            /// the rest of the line).
            static LAST: std::cell::Cell<(u64, Rfc3339Millis)> =
                const { std::cell::Cell::new((u64::MAX, Rfc3339Millis([0; 24]))) };
        }
        let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let secs = d.as_secs();
        let ms = u64::from(d.subsec_millis());
        LAST.with(|last| {
            let (at, mut stamp) = last.get();
            if at != secs {
                stamp = Rfc3339Millis::of_second(secs);
                last.set((secs, stamp));
            }
            stamp.0[20] = b'0' + (ms / 100) as u8;
            stamp.0[21] = b'0' + (ms / 10 % 10) as u8;
            stamp.0[22] = b'0' + (ms % 10) as u8;
            stamp
        })
    }

    /// The whole second `secs` (since 1970) with `.000` milliseconds.
    fn of_second(secs: u64) -> Self {
        let (days, rem) = (secs / 86_400, secs % 86_400);
        // Civil date from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z % 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + u64::from(month <= 2);
        let mut b = *b"0000-00-00T00:00:00.000Z";
        let two = |b: &mut [u8; 24], at: usize, v: u64| {
            b[at] = b'0' + (v / 10 % 10) as u8;
            b[at + 1] = b'0' + (v % 10) as u8;
        };
        two(&mut b, 0, year / 100);
        two(&mut b, 2, year % 100);
        two(&mut b, 5, month);
        two(&mut b, 8, day);
        two(&mut b, 11, rem / 3600);
        two(&mut b, 14, rem / 60 % 60);
        two(&mut b, 17, rem % 60);
        Rfc3339Millis(b)
    }

    pub(crate) fn push(&self, out: &mut String) {
        push_ascii(out, &self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_match_serde_json_exactly() {
        let mut samples: Vec<String> = vec![
            String::new(),
            "plain ascii that is longer than sixteen bytes".into(),
            "quote \" backslash \\ newline \n tab \t cr \r".into(),
            "controls \u{0} \u{1f} \u{8} \u{c} \u{7f} end".into(),
            "unicode é 漢字 🙂 and an escape at the very end\"".into(),
            "x".repeat(15) + "\"",
            "x".repeat(16) + "\\" + &"y".repeat(17),
        ];
        for n in 0..=255u8 {
            if let Ok(s) = std::str::from_utf8(&[b'a', n, b'b']) {
                samples.push(s.to_string());
            }
        }
        for s in &samples {
            let mut out = String::new();
            push_json_str(&mut out, s);
            assert_eq!(out, serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn the_escape_test_is_exact_at_every_position() {
        for len in 0..=24 {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut v = vec![b'a'; len];
                    v[at] = b;
                    assert_eq!(any_escape(&v), needs_escape(b), "{len} {at} {b}");
                }
            }
        }
    }

    #[test]
    fn hex_digits_match_core_fmt() {
        let mut values = vec![0u64, 1, 9, 10, 15, 16, 0xabcdef, u64::MAX, 1 << 63];
        values.extend((0..200).map(|_| fastrand::u64(..)));
        for v in values {
            assert_eq!(&hex16(v), format!("{v:016x}").as_bytes(), "{v}");
            let wide = u128::from(v) << 64 | u128::from(v.rotate_left(7));
            for digits in [0, 2, 4, 8, 16, 20, 32] {
                let mut out = String::new();
                push_hex(&mut out, wide, digits);
                let all = format!("{wide:032x}");
                assert_eq!(out, all[32 - digits..], "{wide} {digits}");
            }
        }
    }

    #[test]
    fn numbers_and_hex() {
        for v in [0u64, 7, 10, 99, 12345, u64::MAX] {
            let mut out = String::new();
            push_u64(&mut out, v);
            assert_eq!(out, v.to_string());
        }
        for v in [0.0, 1.0, 0.5, 1.0349, 123456.789, 1e-7, 1e300] {
            let mut out = String::new();
            push_f64(&mut out, v);
            assert_eq!(serde_json::from_str::<f64>(&out).unwrap(), v, "{out}");
        }
        for us in [
            0u64,
            1,
            10,
            100,
            120,
            1000,
            1001,
            1010,
            1100,
            141_339,
            2_000_000,
            987_654_321,
        ] {
            let (mut a, mut b) = (String::new(), String::new());
            push_millis(&mut a, us);
            push_f64(&mut b, us as f64 / 1000.0);
            assert_eq!(a, b, "{us}");
        }
        let mut out = String::new();
        push_f64(&mut out, f64::NAN);
        assert_eq!(out, "null");
        let mut out = String::new();
        push_hex(&mut out, 0xabc, 6);
        assert_eq!(out, "000abc");
        out.clear();
        push_hex(&mut out, u128::MAX, 32);
        assert_eq!(out, "f".repeat(32));
    }

    #[test]
    fn socket_addrs_match_display() {
        for a in [
            "127.0.0.1:5",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.0.20.3:8080",
            "[::1]:5",
        ] {
            let a: std::net::SocketAddr = a.parse().unwrap();
            let mut out = String::new();
            push_socket_addr(&mut out, &a);
            assert_eq!(out, a.to_string());
        }
    }

    #[test]
    fn timestamps_match_humantime() {
        use std::time::{Duration, UNIX_EPOCH};
        let mut secs: Vec<u64> = vec![
            0,
            59,
            86_399,
            86_400,
            951_782_400,
            951_868_799,
            4_102_444_800,
        ];
        // A day every ~37 days for 200 years, at varying times of day (leap years, month ends).
        secs.extend((0..2000u64).map(|i| i * 3_196_877 + i * 7919 % 86_400));
        for s in secs {
            for ms in [0u32, 7, 42, 999] {
                let t = UNIX_EPOCH + Duration::new(s, ms * 1_000_000 + 123);
                let mut out = String::new();
                push_rfc3339_millis(&mut out, t);
                assert_eq!(out, humantime::format_rfc3339_millis(t).to_string());
            }
        }
    }
}
