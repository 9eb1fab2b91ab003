//! What the proxy has learnt about how each backend's engine answers, where it changes what the
//! proxy asks: a backend that rejects `stream_options.continuous_usage_stats`, and one that
//! reports llama.cpp's `timings` at a stream's end only (asked for `timings_per_token` from then
//! on). One request or stream on any core teaches it, and that core tells the others
//! (`ControlMsg::Trait`): with SO_REUSEPORT spreading connections over the cores, a trait learnt
//! per core would leave the other cores asking wrongly for as long as their own lesson takes,
//! and billing aborted streams from the proxy's count meanwhile.
//!
//! Kept by backend slot with the backend's id (as the breakers are), so the per-request read is
//! an index and a compare, and a backend that leaves its slot is learnt afresh. A backend that
//! goes down keeps what it taught: a restart is nearly always the same engine, and forgetting on
//! every health flap would bill the aborted streams of each flap from the proxy's count until
//! the next complete stream (the prefix index forgets, since a restart loses the KV cache).

use std::cell::RefCell;

pub(crate) use crate::control::Trait;

impl Trait {
    fn bit(self) -> u8 {
        match self {
            Trait::NoRunningUsage => 1,
            Trait::PerTokenTimings => 2,
        }
    }
}

/// One core's traits, by backend slot.
#[derive(Default)]
pub(crate) struct Traits {
    /// `(backend id, trait bits)`; id 0 holds nothing.
    slots: RefCell<Vec<(u64, u8)>>,
}

impl Traits {
    pub(crate) fn has(&self, slot: usize, id: u64, t: Trait) -> bool {
        self.slots
            .borrow()
            .get(slot)
            .is_some_and(|&(held, bits)| held == id && bits & t.bit() != 0)
    }

    /// Records `t` of backend `id` in `slot`; whether it is news to this core.
    pub(crate) fn learn(&self, slot: usize, id: u64, t: Trait) -> bool {
        let mut slots = self.slots.borrow_mut();
        if slots.len() <= slot {
            slots.resize(slot + 1, (0, 0));
        }
        let s = &mut slots[slot];
        if s.0 != id {
            *s = (id, 0);
        }
        let news = s.1 & t.bit() == 0;
        s.1 |= t.bit();
        news
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trait_belongs_to_the_backend_that_taught_it() {
        let t = Traits::default();
        assert!(!t.has(3, 7, Trait::PerTokenTimings));
        assert!(t.learn(3, 7, Trait::PerTokenTimings));
        assert!(!t.learn(3, 7, Trait::PerTokenTimings), "known already");
        assert!(t.has(3, 7, Trait::PerTokenTimings));
        assert!(!t.has(3, 7, Trait::NoRunningUsage));
        assert!(!t.has(2, 7, Trait::PerTokenTimings));
        // Another backend in the slot starts with nothing.
        assert!(!t.has(3, 8, Trait::PerTokenTimings));
        assert!(t.learn(3, 8, Trait::NoRunningUsage));
        assert!(!t.has(3, 7, Trait::PerTokenTimings));
        assert!(!t.has(3, 8, Trait::PerTokenTimings));
    }
}
