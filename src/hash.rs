//! Stable 64-bit hashing for routing: affinity keys, prompt prefixes and backend identities must
//! map the same way on every core, process, replica and version, which `std`'s randomly seeded
//! hashers do not promise. A leaf: both the request inspection and the balancers use it.

/// A 64-bit mix (splitmix64's finaliser): spreads keys and backend ids over the whole range.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable hash of bytes (same on every core, process and version): keys and backend
/// identities must map the same way on every proxy replica.
pub fn hash_bytes(data: &[u8]) -> u64 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15 ^ data.len() as u64;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = mix64(h ^ u64::from_le_bytes(w));
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    mix64(h ^ u64::from_le_bytes(tail))
}

/// The rolling hash chain of `text` cut into `block`-byte blocks, at most `max` of them: block
/// `i`'s value hashes block `i` and everything before it, so two prompts share chain value `i`
/// exactly when (up to collisions) they share their first `i + 1` blocks. A partial last block
/// is left out: it would change as the prompt grows and never match again.
pub fn block_chain(text: &[u8], block: usize, max: usize, out: &mut Vec<u64>) {
    out.clear();
    if block == 0 {
        return;
    }
    let mut h = 0u64;
    for b in text.chunks_exact(block).take(max) {
        h = mix64(h.rotate_left(29) ^ hash_bytes(b));
        out.push(h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_chains_share_exactly_the_common_leading_blocks() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let base = "x".repeat(64) + &"y".repeat(64);
        block_chain(format!("{base}AAAA").as_bytes(), 32, 16, &mut a);
        block_chain(
            format!("{base}BBBB and more text here").as_bytes(),
            32,
            16,
            &mut b,
        );
        assert_eq!(a.len(), 4, "a partial last block is left out");
        assert_eq!(a[..4], b[..4]);
        // Equal blocks at different positions hash differently (the chain carries the past).
        assert_ne!(a[0], a[1]);
        block_chain(format!("z{base}").as_bytes(), 32, 16, &mut b);
        assert!(
            a.iter().zip(&b).all(|(x, y)| x != y),
            "one byte in front changes all"
        );
        block_chain(&[0u8; 1000], 10, 7, &mut b);
        assert_eq!(b.len(), 7, "capped");
        block_chain(&[0u8; 1000], 0, 7, &mut b);
        assert!(b.is_empty());
    }
}
