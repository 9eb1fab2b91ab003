//! Value parsers: the text forms an operator writes (durations, sizes, CPU lists, listen
//! addresses, URLs, hash-key sources) and the serde adapters that apply them to YAML values.
//!
//! Each returns a one-line reason on failure, without a path: the caller knows where the value
//! sat and prefixes it. They are pure except `parse_listen`, which resolves a host name (the only
//! network access config makes, so `llmproxy check` stays usable on any machine).

use std::fmt;
use std::net::{Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::HashKey;

/// serde's reason with Rust's type names put in the user's words: `expected u32` becomes
/// `expected a whole number (0 or more)`, `unit value` an empty value, and so on. Reasons from
/// our own parsers already are, and pass through.
pub(super) fn in_users_words(reason: &str) -> String {
    let reason = reason.replacen(
        "invalid type: unit value",
        "invalid type: an empty value",
        1,
    );
    let Some((head, expected)) = reason.rsplit_once(", expected ") else {
        return reason;
    };
    let words = match expected {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number (0 or more)",
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "a boolean" => "true or false",
        "a sequence" => "a list",
        "a map" => "a mapping",
        "a string" => "text (a string)",
        _ => return reason,
    };
    format!("{head}, expected {words}")
}

/// `":PORT"` (all interfaces), `"HOST:PORT"`, `"[v6]:PORT"`; a host name resolves to its first
/// address.
pub(super) fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("must not be empty; use \":PORT\" or \"HOST:PORT\"".to_string());
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("\"{s}\" has no port; use \":PORT\" or \"HOST:PORT\""))?;
    let port = parse_digits(port)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| format!("invalid port \"{port}\" in \"{s}\" (0-65535)"))?;
    if host.is_empty() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if host.starts_with('[') {
        return Err(format!("invalid IPv6 address in \"{s}\""));
    }
    if host.contains(':') {
        return Err(format!(
            "IPv6 addresses must be in brackets, e.g. \"[::1]:{port}\""
        ));
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve \"{host}\": {e}"))?
        .next()
        .ok_or_else(|| format!("\"{host}\" resolved to no address"))
}

#[derive(Clone, Copy, PartialEq)]
pub(super) enum UrlUse {
    Backend,
    Webhook,
}

pub(super) struct HttpUrl {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) authority: String,
    pub(super) base_path: String,
    pub(super) https: bool,
}

pub(super) fn parse_http_url(s: &str, usage: UrlUse) -> Result<HttpUrl, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("is required (e.g. \"http://10.0.0.5:8000\")".to_string());
    }
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| format!("\"{s}\" has no scheme; expected http://HOST[:PORT][/PATH]"))?;
    let https = scheme.eq_ignore_ascii_case("https");
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => {
            return Err(format!(
                "unsupported scheme \"{scheme}\"; only http:// and https:// are supported"
            ))
        }
    };
    if rest.contains('#') {
        return Err("fragments (#...) are not allowed".to_string());
    }
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let path = match tail.split_once('?') {
        Some(_) if usage == UrlUse::Backend => {
            return Err("query strings (?...) are not allowed in a backend URL".to_string());
        }
        Some((path, _)) => path,
        None => tail,
    };
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("path must not contain whitespace".to_string());
    }
    if authority.contains('@') {
        return Err("credentials in the URL are not supported".to_string());
    }

    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (h, after) = bracketed
            .split_once(']')
            .ok_or_else(|| "unclosed '[' in host".to_string())?;
        if h.parse::<Ipv6Addr>().is_err() {
            return Err(format!("invalid IPv6 address \"{h}\""));
        }
        let port = match after {
            "" => None,
            a => Some(
                a.strip_prefix(':')
                    .ok_or_else(|| format!("unexpected \"{a}\" after IPv6 address"))?,
            ),
        };
        (h.to_ascii_lowercase(), port)
    } else {
        let (h, port) = match authority.split_once(':') {
            Some((_, p)) if p.contains(':') => {
                return Err("IPv6 addresses must be in brackets, e.g. http://[::1]:8000".into())
            }
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if h.is_empty() {
            return Err("missing host".to_string());
        }
        if !h
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Err(format!("invalid host \"{h}\""));
        }
        (h.to_ascii_lowercase(), port)
    };
    let port = match port {
        None => default_port,
        Some(p) => parse_digits(p)
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&n| n != 0)
            .ok_or_else(|| format!("invalid port \"{p}\" (1-65535)"))?,
    };
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok(HttpUrl {
        host,
        port,
        authority,
        base_path: path.trim_end_matches('/').to_string(),
        https,
    })
}

/// Digits only: `str::parse` would also take a leading `+`, which no config value means.
fn parse_digits(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The longest duration any config key accepts: one year as the duration syntax counts it
/// (`1y` = 365.25 days), so `1y` and `365d` are accepted and `366d` is not. Every duration is
/// added to an `Instant` somewhere (deadlines, cool-downs, poll times), and a value near
/// `u64::MAX` seconds overflows that addition and panics every task that makes it; a year is
/// longer than any timeout or interval an operator means, and far from the clock's limit.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(31_557_600);
/// [`MAX_DURATION`] as error messages state it.
const MAX_DURATION_TEXT: &str = "1y (365.25 days)";

/// A human duration (`250ms`, `10s`, `30m`, `1h`) of at most [`MAX_DURATION`]; a bare number is
/// refused because its unit would be a guess.
pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "duration \"{t}\" needs a unit, e.g. \"{t}s\" or \"{t}ms\""
        ));
    }
    let d = humantime::parse_duration(t).map_err(|e| {
        // humantime's own words ("expected number at 0") point into the string; say what to write.
        let why = match e {
            humantime::DurationError::UnknownUnit { unit, .. } => {
                format!("unknown unit \"{unit}\"")
            }
            humantime::DurationError::NumberOverflow => "the number is too large".to_string(),
            _ => "expected a number with a unit".to_string(),
        };
        format!("invalid duration \"{t}\": {why} (e.g. \"250ms\", \"10s\", \"30m\", \"1h\")")
    })?;
    if d > MAX_DURATION {
        return Err(format!(
            "duration \"{t}\" is longer than the limit of {MAX_DURATION_TEXT}"
        ));
    }
    Ok(d)
}

/// Bytes with an optional unit: `KiB`/`MiB`/`GiB` and `K`/`M`/`G` are binary, `KB`/`MB`/`GB`
/// decimal (units are case-insensitive).
pub(super) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let usage = "expected bytes with an optional unit, e.g. 512, \"64KiB\", \"10MiB\", \"1GiB\"";
    if num.is_empty() {
        return Err(format!("invalid size \"{t}\": {usage}"));
    }
    if unit.starts_with('.') {
        return Err(format!(
            "invalid size \"{t}\": fractions are not supported; use a smaller unit"
        ));
    }
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => {
            return Err(format!(
                "invalid size \"{t}\": unknown unit \"{other}\"; {usage}"
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("size \"{t}\" is too large"))
}

pub(super) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a duration with a unit, e.g. \"10s\" or \"250ms\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            self.visit_str(&v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "duration {v} needs a unit and must not be negative"
            )))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "duration {v} needs a unit, e.g. \"{v}s\" → \"1500ms\""
            )))
        }
    }
    d.deserialize_any(V)
}

pub(super) fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a size such as 512, \"64KiB\" or \"10MiB\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("size {v} must not be negative")))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
            Err(E::custom(format!(
                "size {v}: fractions are not supported; use a smaller unit"
            )))
        }
    }
    d.deserialize_any(V)
}

pub(super) fn de_size_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = de_size(d)?;
    usize::try_from(n).map_err(|_| de::Error::custom(format!("size {n} is too large")))
}

pub(super) fn de_level<'de, D: Deserializer<'de>>(d: D) -> Result<log::LevelFilter, D::Error> {
    let s = String::deserialize(d)?;
    s.trim().parse().map_err(|_| {
        de::Error::custom(format!(
            "unknown log level \"{s}\", expected one of off, error, warn, info, debug, trace"
        ))
    })
}

/// `"0-3,8"` -> `[0, 1, 2, 3, 8]`, in the order given.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    // libc's cpu_set_t holds this many CPUs; pinning beyond it would index out of bounds.
    const MAX_CPUS: usize = 1024;
    if s.trim().is_empty() {
        return Err("empty CPU list".to_string());
    }
    let number = |t: &str| -> Result<usize, String> {
        let t = t.trim();
        let n = parse_digits(t).ok_or_else(|| format!("invalid CPU number \"{t}\""))?;
        if n >= MAX_CPUS {
            return Err(format!("CPU {n} is out of range (0-{})", MAX_CPUS - 1));
        }
        Ok(n)
    };
    let mut cpus = Vec::new();
    for item in s.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(format!("empty item in CPU list \"{s}\""));
        }
        let (lo, hi) = match item.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let n = number(item)?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(format!("reversed range \"{item}\""));
        }
        for cpu in lo..=hi {
            if cpus.contains(&cpu) {
                return Err(format!("CPU {cpu} is listed twice"));
            }
            cpus.push(cpu);
        }
    }
    Ok(cpus)
}
/// `"header:x-session-id,body:user,prefix:2"` → the sources in order.
pub(super) fn parse_hash_key(s: &str) -> Result<Vec<HashKey>, String> {
    let mut keys = Vec::new();
    for item in s.split(',').map(str::trim) {
        let key = match item.split_once(':') {
            Some(("header", name)) if valid_header_name(name) => {
                HashKey::Header(name.to_ascii_lowercase())
            }
            Some(("header", name)) => return Err(format!("invalid header name \"{name}\"")),
            Some(("body", "user")) => HashKey::BodyUser,
            Some(("prefix", n)) => match parse_digits(n) {
                Some(n @ 1..=4) => HashKey::Prefix(n),
                _ => return Err(format!("prefix takes 1 to 4 messages, got \"{n}\"")),
            },
            None if item == "prefix" => HashKey::Prefix(2),
            _ => {
                return Err(format!(
                    "unknown key source \"{item}\"; expected header:NAME, body:user or prefix[:N]"
                ))
            }
        };
        keys.push(key);
    }
    Ok(keys)
}

pub(super) fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
}

/// `cpus: 3` is as natural to write as `cpus: "3"`; both mean CPU 3.
pub(super) struct CpuSpec(pub(super) String);

impl<'de> Deserialize<'de> for CpuSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = CpuSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a CPU list such as \"0-3,8\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CpuSpec, E> {
                Ok(CpuSpec(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<CpuSpec, E> {
                Ok(CpuSpec(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}
