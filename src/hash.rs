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
