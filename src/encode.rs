//! Text encodings written once per request on the hot path — JSON strings and numbers for usage
//! events and access-log lines, fixed-width hex for ids — without `core::fmt` or a
//! `serde_json::Value`. Profiles showed the generic routes (formatting machinery, a map per line,
//! byte-at-a-time escaping) costing more than the proxying they describe. Strings and integers
//! come out exactly as `serde_json` writes them (tests compare the two).

use std::fmt::Write as _;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends the lowest `digits` hex digits of `v` (zero-padded, lowercase).
pub(crate) fn push_hex(out: &mut String, v: u128, digits: usize) {
    for i in (0..digits).rev() {
        let nibble = ((v >> (i * 4)) & 0xf) as usize;
        out.push(char::from(HEX[nibble]));
    }
}

/// Appends `s` as a JSON string literal, quotes included.
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Most strings need no escaping at all: test 16 bytes at a time (vectorised) and skip.
        if let Some(chunk) = bytes.get(i..i + 16) {
            if !chunk.iter().fold(false, |acc, &b| acc | needs_escape(b)) {
                i += 16;
                continue;
            }
        }
        let b = bytes[i];
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
        i += 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
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
    for &d in decimal(v, &mut buf) {
        out.push(char::from(d));
    }
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

/// Appends `t` as RFC 3339 UTC with milliseconds (`2026-12-06T02:34:16.123Z`), exactly as
/// `humantime::format_rfc3339_millis` writes it, without `core::fmt`. Times before 1970 are
/// written as 1970-01-01T00:00:00.000Z.
pub(crate) fn push_rfc3339_millis(out: &mut String, t: std::time::SystemTime) {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
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
    let two = |out: &mut String, v: u64| {
        out.push(char::from(b'0' + (v / 10 % 10) as u8));
        out.push(char::from(b'0' + (v % 10) as u8));
    };
    two(out, year / 100);
    two(out, year % 100);
    out.push('-');
    two(out, month);
    out.push('-');
    two(out, day);
    out.push('T');
    two(out, rem / 3600);
    out.push(':');
    two(out, rem / 60 % 60);
    out.push(':');
    two(out, rem % 60);
    out.push('.');
    let ms = u64::from(d.subsec_millis());
    out.push(char::from(b'0' + (ms / 100) as u8));
    two(out, ms % 100);
    out.push('Z');
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
