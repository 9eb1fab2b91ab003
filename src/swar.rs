//! Byte searches eight bytes at a time in a plain `u64` (SWAR), for the short runs of JSON the
//! hot path scans — a usage object's keys, an event's strings — where a byte loop costs several
//! times as much and `memchr`'s set-up more than the search. `equal` and `below` are exact in
//! the lowest byte they flag (a borrow only runs upwards), which is the only one `first` uses;
//! `equal_exact` and `between` are exact in every byte, for callers that count hits.

const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);

/// The high bit of each byte of `w` equal to `b`.
pub(crate) fn equal(w: u64, b: u8) -> u64 {
    let x = w ^ (ONES * u64::from(b));
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// The high bit of each byte of `w` equal to `b`, exact in every byte (no borrow crosses bytes),
/// for callers that count or visit every hit of a word rather than take the first.
pub(crate) fn equal_exact(w: u64, b: u8) -> u64 {
    const LOWS: u64 = !HIGHS;
    let x = w ^ (ONES * u64::from(b));
    !((x & LOWS).wrapping_add(LOWS) | x | LOWS)
}

/// The high bit of each byte of `w` strictly between `m` and `n` (both ≤ 0x80), exact in every
/// byte: the arithmetic runs on each byte's low seven bits, so no carry crosses bytes.
pub(crate) fn between(w: u64, m: u8, n: u8) -> u64 {
    const LOWS: u64 = !HIGHS;
    let low = w & LOWS;
    (ONES * (127 + u64::from(n)) - low) & !w & (low + ONES * (127 - u64::from(m))) & HIGHS
}

/// The high bit of each byte of `w` below `n` (`n` ≤ 0x80).
pub(crate) fn below(w: u64, n: u8) -> u64 {
    w.wrapping_sub(ONES * u64::from(n)) & !w & HIGHS
}

/// The high bit of each byte of `w` at or above 0x80.
pub(crate) fn non_ascii(w: u64) -> u64 {
    w & HIGHS
}

/// The index of the first byte of `s` that `word` flags (eight at a time) or, in the tail of
/// fewer than eight bytes, that `byte` accepts. The two must agree byte for byte.
#[inline(always)]
pub(crate) fn first(
    s: &[u8],
    word: impl Fn(u64) -> u64,
    byte: impl Fn(u8) -> bool,
) -> Option<usize> {
    let mut words = s.chunks_exact(8);
    let mut base = 0;
    for chunk in words.by_ref() {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        let hits = word(u64::from_le_bytes(bytes));
        if hits != 0 {
            return Some(base + (hits.trailing_zeros() / 8) as usize);
        }
        base += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| byte(b))
        .map(|o| base + o)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte value at every offset, between neighbours of every kind that matters: the
    /// exact masks flag exactly the bytes they name (no carry or borrow crosses a byte).
    #[test]
    fn exact_masks_flag_every_byte_they_name_and_no_other() {
        for at in 0..8 {
            for b in 0..=255u8 {
                for n in [
                    0u8,
                    1,
                    b'"' - 1,
                    b'"',
                    b'"' + 1,
                    0x7a,
                    0x7b,
                    0x7e,
                    0x7f,
                    0x80,
                    0xff,
                ] {
                    let mut bytes = [n; 8];
                    bytes[at] = b;
                    let w = u64::from_le_bytes(bytes);
                    let want = |f: &dyn Fn(u8) -> bool| {
                        (0..8)
                            .filter(|&i| f(bytes[i]))
                            .fold(0u64, |m, i| m | 0x80 << (8 * i))
                    };
                    assert_eq!(equal_exact(w, b'"'), want(&|c| c == b'"'), "{at} {b} {n}");
                    assert_eq!(
                        between(w, 0x7a, 0x7e),
                        want(&|c| (0x7b..=0x7d).contains(&c)),
                        "{at} {b} {n}"
                    );
                }
            }
        }
    }

    /// Every byte value at every offset of every length up to 20: the word masks and the byte
    /// test find the same first byte as a plain loop.
    #[test]
    fn first_agrees_with_a_byte_loop() {
        let word = |w: u64| equal(w, b'"') | below(w, 0x20) | non_ascii(w);
        let byte = |b: u8| b == b'"' || !(0x20..0x80).contains(&b);
        for len in 0..20 {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut s = vec![b'a'; len];
                    s[at] = b;
                    let want = s.iter().position(|&c| byte(c));
                    assert_eq!(first(&s, word, byte), want, "{len} {at} {b}");
                }
            }
        }
    }
}
