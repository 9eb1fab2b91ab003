//! `prefix_cache`'s pick: the cost of each candidate place (a backend, or one engine slot of a
//! backend with `slots`) and the reason the winner won. Only reads the balancer's index and
//! slot prompts; `Balancer::learn_slot` updates them once a pick is taken.

use super::{Balancer, Inputs, Pick, Reason};

/// One place `prefix_cache` may send a prompt: a backend, or one engine slot of it.
struct Candidate {
    backend: usize,
    slot: Option<usize>,
    cost: f64,
    /// The backend's in flight per unit of weight (engine slots only: a whole backend has its
    /// load in its cost).
    load: f64,
    /// When the engine slot was last given a prompt (0 = never; 0 for a whole backend).
    stamp: u64,
    matched: usize,
    busy: u32,
}

impl Candidate {
    /// Cheaper first; then the less loaded backend; then the engine slot least worth keeping
    /// (never used, then the least recently given a prompt). `Equal`: a tie, broken at random.
    fn order(&self, other: &Candidate) -> std::cmp::Ordering {
        self.cost
            .total_cmp(&other.cost)
            .then(self.load.total_cmp(&other.load))
            .then(self.stamp.cmp(&other.stamp))
    }
}

impl Balancer {
    /// Cost = `miss_cost` × the share of the prompt the backend probably lacks + its requests
    /// in flight (per unit of weight); the cheapest wins, ties at random (cores and misses
    /// spread out). A hot prefix therefore stays on its backend until that backend has
    /// `miss_cost` more in flight than an idle one, then spills, and the spill target learns
    /// the prefix too. The pick itself only reads the index; `learn` updates it once the pick
    /// is taken.
    ///
    /// A backend with `slots` is scored per engine slot instead: `miss_cost` × the share of the
    /// prompt the slot's last prompt lacks + the requests pinned to that slot. A warm slot that
    /// is busy therefore wins over an idle cold one (the request waits in the engine for one
    /// warm request rather than recomputing the prompt and evicting another), until `miss_cost`
    /// requests queue on it. Equal costs go to the backend with fewer requests in flight (misses
    /// spread over the servers), then to a slot that never held a prompt, then to the one whose
    /// prompt was pinned longest ago (the hot prompts are the recently used ones), then at
    /// random. A prompt without blocks (not JSON, no messages, shorter than a block) is not
    /// pinned: the backend is scored as one, by its in-flight count.
    pub(super) fn prefix_cache(
        &self,
        input: &Inputs<'_>,
        eligible: &impl Fn(usize) -> bool,
    ) -> Option<Pick> {
        let n = input.blocks.len();
        let miss_cost = self.params.get().miss_cost;
        let index = self.prefix.borrow();
        let engine = self.engine.borrow();
        let missing = |matched: usize| {
            if n == 0 {
                1.0
            } else {
                (n - matched) as f64 / n as f64
            }
        };
        let mut best: Option<Candidate> = None;
        let mut ties = 0u32;
        let mut most = 0usize;
        let mut consider = |c: Candidate| {
            most = most.max(c.matched);
            match best.as_ref().map(|b| c.order(b)) {
                None | Some(std::cmp::Ordering::Less) => {
                    best = Some(c);
                    ties = 1;
                }
                Some(std::cmp::Ordering::Equal) => {
                    ties += 1;
                    if fastrand::u32(..ties) == 0 {
                        best = Some(c);
                    }
                }
                Some(std::cmp::Ordering::Greater) => {}
            }
        };
        for b in 0..self.len() {
            if !eligible(b) {
                continue;
            }
            let load = f64::from(input.view.load(b)) / f64::from(self.weight(b));
            let slots = engine.slots(b);
            if slots > 0 && n > 0 {
                for k in 0..slots {
                    let v = engine.view(b, k, input.blocks);
                    consider(Candidate {
                        backend: b,
                        slot: Some(k),
                        cost: miss_cost * missing(v.matched) + f64::from(v.busy),
                        load,
                        stamp: v.stamp,
                        matched: v.matched,
                        busy: v.busy,
                    });
                }
                continue;
            }
            let matched = if n == 0 {
                0
            } else {
                index.matched(b, input.blocks)
            };
            consider(Candidate {
                backend: b,
                slot: None,
                cost: miss_cost * missing(matched) + load,
                // The load is in the cost already; equal costs stay a fair draw, as they were
                // before engine slots existed.
                load: 0.0,
                stamp: 0,
                matched,
                busy: 0,
            });
        }
        let c = best?;
        let reason = if most == 0 {
            Reason::CacheMiss
        } else if c.matched < most {
            Reason::LoadSpill
        } else if c.busy > 0 {
            Reason::SlotWait
        } else {
            Reason::CacheHit
        };
        Some(Pick {
            backend: c.backend,
            reason,
            slot: c.slot,
            share: (n > 0).then(|| c.matched as f64 / n as f64),
        })
    }
}
