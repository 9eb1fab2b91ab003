//! A request's affinity key for `consistent_hash`: the first of the configured sources
//! (`routing.hash_key`) that the request carries — a header, the body's `user`, or the start of
//! the conversation — hashed to 64 bits. Requests of one session (or sharing a prompt prefix)
//! get the same key, so they return to the replica whose KV cache already holds their prefix.

use crate::config::HashKey;
use crate::hash::hash_bytes;
use crate::http1::head::Head;
use crate::openai::RequestInfo;

/// The key, or `None` when no configured source is present.
pub(crate) fn key(sources: &[HashKey], head: &Head, info: &RequestInfo) -> Option<u64> {
    sources.iter().find_map(|s| match s {
        HashKey::Header(name) => head.header(name).filter(|v| !v.is_empty()).map(hash_bytes),
        HashKey::BodyUser => info.user_key,
        HashKey::Prefix(_) => info.prefix_key,
    })
}

/// How many leading messages the prefix key must cover (0: no prefix source configured).
pub(crate) fn prefix_messages(sources: &[HashKey]) -> usize {
    sources
        .iter()
        .find_map(|s| match s {
            HashKey::Prefix(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0)
}
