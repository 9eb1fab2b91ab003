//! `prefix_cache`'s approximate picture of what each backend's KV cache holds: per backend slot,
//! the block-chain hashes (`hash::block_chain`) of the prompts recently sent to it, in a bounded
//! LRU. It owns nothing else and never reads a prompt: it is told chains (a pick of this core, or
//! another core's pick as a message) and answers "how many leading blocks of this chain does
//! backend b probably hold".
//!
//! Built as one hash set per backend plus an eviction queue with lazy deletion rather than a
//! radix tree: a chain value already names its whole prefix, so a lookup is a handful of hash
//! probes (a binary search along the chain, see `matched`), an update is `len` inserts, and no
//! pointer structure has to be kept consistent. Maps and queues are sized once for the
//! configured capacity, so the pick path does not allocate in steady state. Memory per backend
//! is bounded by `capacity` entries in the map and `2 × capacity + max chain` in the queue.
//!
//! A backend that declares `slots` (an engine whose every slot keeps a KV cache of its own and,
//! as llama.cpp's without a host prompt cache, only its last prompt) is pictured differently, in
//! [`SlotPrompts`]: per engine slot, the chain of the last prompt pinned to it. The LRU above would
//! say "this backend holds the prompt" while the slot holding it is busy; llama.cpp then gives the
//! request another, idle slot, which recomputes the prompt and evicts the one it held. Per slot the
//! pick can pin the request to the slot that holds its prompt and let it wait there
//! (`balance::Balancer::prefix_cache`). Like the index it is per core, learnt from this core's
//! picks and the other cores' messages; how busy each slot is is process-wide
//! (`backends::engine_slots`).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::backends::engine_slots::SlotBusy;

/// Keys are already 64-bit hashes: hashing them again would only cost time.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Set = HashMap<u64, u64, BuildHasherDefault<Identity>>;

/// One backend's recently sent blocks: block hash → stamp of its last use.
#[derive(Default)]
struct Tenancy {
    blocks: Set,
    /// (block, stamp) in use order; an entry whose stamp is no longer the block's is stale.
    order: VecDeque<(u64, u64)>,
}

pub(crate) struct PrefixIndex {
    backends: Vec<Tenancy>,
    /// Blocks remembered per backend.
    capacity: usize,
    stamp: u64,
}

impl PrefixIndex {
    pub(crate) fn new(capacity: usize) -> Self {
        PrefixIndex {
            backends: Vec::new(),
            capacity,
            stamp: 0,
        }
    }

    /// Follows the backend table (`n` slots); slots beyond it are forgotten.
    pub(crate) fn resize(&mut self, n: usize) {
        self.backends.resize_with(n, Tenancy::default);
    }

    /// A new capacity (reload): everything is forgotten, the picture rebuilds within a few
    /// requests per prefix.
    pub(crate) fn set_capacity(&mut self, capacity: usize) {
        if capacity != self.capacity {
            self.capacity = capacity;
            for b in 0..self.backends.len() {
                self.forget(b);
            }
        }
    }

    /// The backend left, restarted or lost its cache: it holds nothing any more.
    pub(crate) fn forget(&mut self, backend: usize) {
        if let Some(t) = self.backends.get_mut(backend) {
            t.blocks = Set::default();
            t.order = VecDeque::new();
        }
    }

    /// How many leading blocks of `chain` `backend` probably holds. A binary search: a chain is
    /// remembered as a whole, its leading blocks evicted last (see `record`), so what a backend
    /// holds of a chain is (nearly always) a prefix of it; at most log2(len) + 1 probes.
    pub(crate) fn matched(&self, backend: usize, chain: &[u64]) -> usize {
        let Some(t) = self.backends.get(backend) else {
            return 0;
        };
        if t.blocks.is_empty() {
            return 0;
        }
        // Invariant: chain[..lo] held, chain[hi..] not.
        let (mut lo, mut hi) = (0, chain.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if t.blocks.contains_key(&chain[mid]) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// `chain` was sent to `backend`: its blocks are the most recently used there, evicting the
    /// least recently used beyond the capacity.
    pub(crate) fn record(&mut self, backend: usize, chain: &[u64]) {
        let capacity = self.capacity;
        let Some(t) = self.backends.get_mut(backend) else {
            return;
        };
        if capacity == 0 || chain.is_empty() {
            return;
        }
        if t.blocks.capacity() == 0 {
            t.blocks.reserve(capacity + 1);
            t.order.reserve(2 * capacity + chain.len());
        }
        self.stamp += 1;
        let stamp = self.stamp;
        // Last block first: the queue is evicted from its front, so a chain's tail goes before
        // its head and what stays is a prefix (what `matched` assumes).
        for &h in chain[..chain.len().min(capacity)].iter().rev() {
            t.blocks.insert(h, stamp);
            t.order.push_back((h, stamp));
        }
        while t.blocks.len() > capacity {
            let Some((h, s)) = t.order.pop_front() else {
                break;
            };
            if t.blocks.get(&h) == Some(&s) {
                t.blocks.remove(&h);
            }
        }
        // Refreshed blocks leave stale queue entries behind: drop them before the queue
        // outgrows its bound (amortised: at most once per `capacity` inserts).
        if t.order.len() > 2 * capacity {
            let blocks = &t.blocks;
            t.order.retain(|(h, s)| blocks.get(h) == Some(s));
        }
    }

    /// Blocks remembered for `backend`.
    #[cfg(test)]
    fn len(&self, backend: usize) -> usize {
        self.backends.get(backend).map_or(0, |t| t.blocks.len())
    }

    #[cfg(test)]
    fn queued(&self, backend: usize) -> usize {
        self.backends.get(backend).map_or(0, |t| t.order.len())
    }
}

/// Per backend with `slots`: what each engine slot last held, and the process-wide board of
/// how many requests are pinned to each.
pub(crate) struct SlotPrompts {
    backends: Vec<Engine>,
    stamp: u64,
}

#[derive(Default)]
struct Engine {
    busy: Option<Arc<SlotBusy>>,
    held: Vec<Held>,
}

/// One engine slot's last prompt.
#[derive(Default)]
struct Held {
    chain: Vec<u64>,
    /// When it was pinned there (this core's order of picks and messages); 0 = never.
    stamp: u64,
}

/// One engine slot as a pick sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotView {
    /// Leading blocks of the prompt this slot holds.
    pub(crate) matched: usize,
    /// Requests pinned to it now, across all cores.
    pub(crate) busy: u32,
    /// When it was last given a prompt (0 = never: the slot to fill first).
    pub(crate) stamp: u64,
}

impl SlotPrompts {
    pub(crate) fn new() -> Self {
        SlotPrompts {
            backends: Vec::new(),
            stamp: 0,
        }
    }

    /// Follows the backend table (`n` table slots).
    pub(crate) fn resize(&mut self, n: usize) {
        self.backends.resize_with(n, Engine::default);
    }

    /// `backend`'s board (`None`: no slots declared). A different board (another backend, or
    /// another slot count) starts from nothing.
    pub(crate) fn set_board(&mut self, backend: usize, busy: Option<&Arc<SlotBusy>>) {
        let Some(e) = self.backends.get_mut(backend) else {
            return;
        };
        let same = match (&e.busy, busy) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            e.held.clear();
            e.held
                .resize_with(busy.map_or(0, |b| b.len()), Held::default);
            e.busy = busy.cloned();
        }
    }

    /// Engine slots of `backend` (0: not declared).
    pub(crate) fn slots(&self, backend: usize) -> usize {
        self.backends.get(backend).map_or(0, |e| e.held.len())
    }

    pub(crate) fn board(&self, backend: usize) -> Option<&Arc<SlotBusy>> {
        self.backends.get(backend)?.busy.as_ref()
    }

    /// Engine slot `k` of `backend` against a prompt with this chain.
    pub(crate) fn view(&self, backend: usize, k: usize, chain: &[u64]) -> SlotView {
        let Some(e) = self.backends.get(backend) else {
            return SlotView {
                matched: 0,
                busy: 0,
                stamp: 0,
            };
        };
        let held = e.held.get(k);
        SlotView {
            matched: held.map_or(0, |h| common_prefix(&h.chain, chain)),
            busy: e.busy.as_ref().map_or(0, |b| b.busy(k)),
            stamp: held.map_or(0, |h| h.stamp),
        }
    }

    /// A prompt with this chain was pinned to engine slot `k` of `backend`: the slot now holds
    /// it (and nothing it held before).
    pub(crate) fn record(&mut self, backend: usize, k: usize, chain: &[u64]) {
        self.stamp += 1;
        let stamp = self.stamp;
        let Some(h) = self
            .backends
            .get_mut(backend)
            .and_then(|e| e.held.get_mut(k))
        else {
            return;
        };
        h.chain.clear();
        h.chain.extend_from_slice(chain);
        h.stamp = stamp;
    }

    /// The backend restarted or left: its slots hold nothing.
    pub(crate) fn forget(&mut self, backend: usize) {
        if let Some(e) = self.backends.get_mut(backend) {
            for h in &mut e.held {
                *h = Held::default();
            }
        }
    }
}

/// Leading entries two block chains share. A chain entry hashes its whole prefix, so equal
/// entries at `i` mean equal entries before it: a binary search.
fn common_prefix(a: &[u64], b: &[u64]) -> usize {
    let (mut lo, mut hi) = (0, a.len().min(b.len()));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if a[mid] == b[mid] {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::mix64;

    /// A chain of `n` blocks for prompt family `p` (prompts of one family share their start).
    fn chain(p: u64, n: usize) -> Vec<u64> {
        (0..n as u64).map(|i| mix64(p << 32 | i)).collect()
    }

    #[test]
    fn a_recorded_chain_matches_its_prefixes_and_nothing_else() {
        let mut ix = PrefixIndex::new(100);
        ix.resize(2);
        ix.record(0, &chain(1, 10));
        assert_eq!(ix.matched(0, &chain(1, 10)), 10);
        assert_eq!(ix.matched(0, &chain(1, 4)), 4);
        // A longer prompt of the same family: its first 10 blocks are known.
        assert_eq!(ix.matched(0, &chain(1, 30)), 10);
        assert_eq!(ix.matched(0, &chain(2, 10)), 0);
        assert_eq!(ix.matched(1, &chain(1, 10)), 0, "per backend");
        assert_eq!(ix.matched(7, &chain(1, 10)), 0, "no such slot");
        assert_eq!(ix.matched(0, &[]), 0);
    }

    #[test]
    fn eviction_is_least_recently_used_and_keeps_leading_blocks() {
        let mut ix = PrefixIndex::new(20);
        ix.resize(1);
        ix.record(0, &chain(1, 10));
        ix.record(0, &chain(2, 10));
        ix.record(0, &chain(1, 10)); // 1 is now the most recent
        ix.record(0, &chain(3, 5)); // 25 > 20: five blocks of 2 go
        assert_eq!(ix.len(0), 20, "capacity bound");
        assert_eq!(ix.matched(0, &chain(1, 10)), 10);
        assert_eq!(ix.matched(0, &chain(3, 5)), 5);
        assert_eq!(
            ix.matched(0, &chain(2, 10)),
            5,
            "the tail of the oldest chain went first, its head stays"
        );
        ix.record(0, &chain(4, 20));
        assert_eq!(ix.matched(0, &chain(1, 10)), 0);
        assert_eq!(ix.matched(0, &chain(4, 20)), 20);
    }

    #[test]
    fn memory_stays_bounded_under_endless_traffic() {
        let mut ix = PrefixIndex::new(64);
        ix.resize(1);
        for i in 0..10_000u64 {
            // Hot prefixes refreshed over and over, cold ones streaming through.
            ix.record(0, &chain(i % 3, 8));
            ix.record(0, &chain(1000 + i, 16));
            assert!(ix.len(0) <= 64);
            assert!(ix.queued(0) <= 2 * 64 + 16, "queue {}", ix.queued(0));
        }
        // A chain longer than the capacity keeps its head.
        ix.record(0, &chain(9, 500));
        assert_eq!(ix.matched(0, &chain(9, 500)), 64);
    }

    #[test]
    fn a_forgotten_backend_matches_nothing_and_capacity_changes_start_over() {
        let mut ix = PrefixIndex::new(50);
        ix.resize(2);
        ix.record(0, &chain(1, 10));
        ix.record(1, &chain(1, 10));
        ix.forget(0);
        assert_eq!(ix.matched(0, &chain(1, 10)), 0);
        assert_eq!(ix.matched(1, &chain(1, 10)), 10);
        ix.set_capacity(50);
        assert_eq!(ix.matched(1, &chain(1, 10)), 10, "same capacity: kept");
        ix.set_capacity(10);
        assert_eq!(ix.len(1), 0);
        ix.resize(1);
        ix.record(1, &chain(1, 10)); // a slot that is gone: ignored
        assert_eq!(ix.matched(1, &chain(1, 10)), 0);
        let mut zero = PrefixIndex::new(0);
        zero.resize(1);
        zero.record(0, &chain(1, 10));
        assert_eq!(zero.len(0), 0);
    }

    #[test]
    fn an_engine_slot_holds_its_last_prompt_only() {
        let board = SlotBusy::new(2);
        let mut sp = SlotPrompts::new();
        sp.resize(2);
        sp.set_board(0, Some(&board));
        assert_eq!((sp.slots(0), sp.slots(1)), (2, 0));
        let v = sp.view(0, 0, &chain(1, 10));
        assert_eq!((v.matched, v.busy, v.stamp), (0, 0, 0));
        sp.record(0, 0, &chain(1, 10));
        assert_eq!(sp.view(0, 0, &chain(1, 10)).matched, 10);
        assert_eq!(sp.view(0, 0, &chain(1, 4)).matched, 4);
        assert_eq!(sp.view(0, 0, &chain(1, 30)).matched, 10);
        assert_eq!(sp.view(0, 1, &chain(1, 10)).matched, 0, "per slot");
        // A different question after the same system prompt: the shared blocks match.
        let mut other = chain(1, 8);
        other.extend(chain(7, 3));
        assert_eq!(sp.view(0, 0, &other).matched, 8);
        sp.record(0, 0, &chain(2, 10));
        assert_eq!(sp.view(0, 0, &chain(1, 10)).matched, 0, "evicted");
        let _g = board.occupy(0).unwrap();
        assert_eq!(sp.view(0, 0, &chain(2, 10)).busy, 1);
        assert!(sp.view(0, 0, &[]).stamp > 0);
        // Out of range: ignored.
        sp.record(0, 5, &chain(1, 10));
        sp.record(9, 0, &chain(1, 10));
        assert_eq!(sp.view(9, 0, &chain(1, 10)).matched, 0);
        sp.forget(0);
        assert_eq!(sp.view(0, 0, &chain(2, 10)).matched, 0);
        // The same board keeps what is known; another one (a new slot count) starts over.
        sp.record(0, 1, &chain(3, 10));
        sp.set_board(0, Some(&board));
        assert_eq!(sp.view(0, 1, &chain(3, 10)).matched, 10);
        sp.set_board(0, Some(&SlotBusy::new(3)));
        assert_eq!(sp.slots(0), 3);
        assert_eq!(sp.view(0, 1, &chain(3, 10)).matched, 0);
        sp.set_board(0, None);
        assert_eq!(sp.slots(0), 0);
    }
}
