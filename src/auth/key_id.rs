//! Naming a client's key without revealing it: the key a request presents, and the short,
//! non-reversible `key_id` that usage events and access lines carry when auth is off.

use std::cell::RefCell;

use sha2::{Digest, Sha256};

use crate::encode;
use crate::http1::head::Head;
use crate::http1::name::Name;

/// A short, stable, non-reversible name for an API key: `key-` + 16 hex digits of SHA-256.
pub fn key_id(raw_key: &str) -> String {
    let digest = Sha256::digest(raw_key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let mut s = String::with_capacity(20);
    s.push_str("key-");
    encode::push_hex(&mut s, u128::from(u64::from_be_bytes(first)), 16);
    s
}

/// The last client key a connection presented and its `key_id`. A client sends the same key on
/// every request of a keep-alive connection, and hashing it each time was 7% of the CPU of a
/// small request. The raw key lives as long as the connection, like the heads that carry it.
#[derive(Default)]
pub(crate) struct KeyIdCache(RefCell<Option<(Box<str>, String)>>);

impl KeyIdCache {
    pub fn key_id(&self, raw_key: &str) -> String {
        let mut last = self.0.borrow_mut();
        match &*last {
            Some((key, id)) if **key == *raw_key => id.clone(),
            _ => {
                let id = key_id(raw_key);
                *last = Some((raw_key.into(), id.clone()));
                id
            }
        }
    }
}

/// The API key a client presented (`Authorization: Bearer …` or `x-api-key`).
pub(crate) fn client_key(head: &Head) -> Option<&str> {
    if let Some(v) = head.get_str(Name::Authorization) {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some(v[7..].trim());
        }
    }
    head.get_str(Name::XApiKey).map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_cache_answers_like_key_id() {
        let c = KeyIdCache::default();
        assert_eq!(c.key_id("a"), key_id("a"));
        assert_eq!(c.key_id("a"), key_id("a"));
        assert_eq!(c.key_id("b"), key_id("b"));
        assert_eq!(c.key_id("a"), key_id("a"));
    }

    #[test]
    fn key_ids_are_stable_and_do_not_contain_the_key() {
        let a = key_id("sk-secret-123");
        assert_eq!(a, key_id("sk-secret-123"));
        assert_ne!(a, key_id("sk-secret-124"));
        assert!(!a.contains("secret"));
        assert_eq!(a.len(), 20);
    }
}
