//! Backend selection. `LoadView` is one core's picture of every backend (its own exact in-flight
//! counts, the latest counts other cores reported, health); `Balancer` applies the configured
//! strategy to it. Both are per-core and never shared: other cores' counts arrive as messages.

use std::cell::{Cell, RefCell};

use crate::config::Strategy;

pub struct LoadView {
    core: usize,
    cores: usize,
    slots: RefCell<Slots>,
}

/// Per backend slot; grows and is reset as the backend table changes (`backends`).
struct Slots {
    /// `counts[slot * cores + core]`: in-flight requests of `core` on the backend in `slot`.
    counts: Vec<u32>,
    totals: Vec<u32>,
    up: Vec<bool>,
    /// The backend id each slot holds (0 = free); messages about another id are stale.
    ids: Vec<u64>,
}

impl LoadView {
    /// A view of `backends` slots holding ids `1..=backends`, all up (for tests and benches).
    pub fn new(core: usize, cores: usize, backends: usize) -> Self {
        let view = LoadView {
            core,
            cores,
            slots: RefCell::new(Slots {
                counts: Vec::new(),
                totals: Vec::new(),
                up: Vec::new(),
                ids: Vec::new(),
            }),
        };
        view.resize(backends);
        for b in 0..backends {
            view.reset(b, b as u64 + 1, true);
        }
        view
    }

    pub fn backends(&self) -> usize {
        self.slots.borrow().totals.len()
    }

    /// Grows or shrinks to `n` slots; new slots are free (id 0, down).
    pub fn resize(&self, n: usize) {
        let mut s = self.slots.borrow_mut();
        s.counts.resize(n * self.cores, 0);
        s.totals.resize(n, 0);
        s.up.resize(n, false);
        s.ids.resize(n, 0);
    }

    /// `slot` now holds backend `id` (0 = free): counts start at zero.
    pub fn reset(&self, slot: usize, id: u64, up: bool) {
        let mut s = self.slots.borrow_mut();
        if slot >= s.totals.len() {
            return;
        }
        let cores = self.cores;
        s.counts[slot * cores..(slot + 1) * cores].fill(0);
        s.totals[slot] = 0;
        s.up[slot] = up;
        s.ids[slot] = id;
    }

    pub fn id(&self, slot: usize) -> u64 {
        self.slots.borrow().ids.get(slot).copied().unwrap_or(0)
    }

    /// In-flight requests on `backend` across all cores, as far as this core knows.
    pub fn load(&self, backend: usize) -> u32 {
        self.slots
            .borrow()
            .totals
            .get(backend)
            .copied()
            .unwrap_or(0)
    }

    pub fn own(&self, backend: usize) -> u32 {
        self.slots
            .borrow()
            .counts
            .get(backend * self.cores + self.core)
            .copied()
            .unwrap_or(0)
    }

    /// This core's count on every slot, with the id it is about.
    pub fn own_counts(&self) -> Vec<(u64, u32)> {
        (0..self.backends())
            .map(|b| (self.id(b), self.own(b)))
            .collect()
    }

    pub fn is_up(&self, backend: usize) -> bool {
        self.slots
            .borrow()
            .up
            .get(backend)
            .copied()
            .unwrap_or(false)
    }

    /// Sets health of `backend` if it still holds backend `id`.
    pub fn set_up(&self, backend: usize, id: u64, up: bool) {
        let mut s = self.slots.borrow_mut();
        if s.ids.get(backend) == Some(&id) {
            s.up[backend] = up;
        }
    }

    /// Records `core`'s absolute count for `backend` (holding `id`); returns false for an unknown
    /// index or a backend that has left the slot.
    pub fn set(&self, core: usize, backend: usize, id: u64, in_flight: u32) -> bool {
        let mut s = self.slots.borrow_mut();
        if core >= self.cores || backend >= s.totals.len() || s.ids[backend] != id {
            return false;
        }
        let i = backend * self.cores + core;
        s.totals[backend] = s.totals[backend] - s.counts[i] + in_flight;
        s.counts[i] = in_flight;
        true
    }

    /// Adjusts this core's own count and returns the new value (to broadcast).
    pub fn add_own(&self, backend: usize, delta: i32) -> u32 {
        let v = self.own(backend).saturating_add_signed(delta);
        self.set(self.core, backend, self.id(backend), v);
        v
    }
}

pub struct Balancer {
    strategy: Cell<Strategy>,
    /// By backend slot; free and draining slots keep a placeholder (they are never eligible).
    weights: RefCell<Vec<u32>>,
    next: Cell<usize>,
    /// Smooth weighted round robin state (nginx's `current_weight`).
    current: RefCell<Vec<i64>>,
}

impl Balancer {
    pub fn new(strategy: Strategy, weights: Vec<u32>) -> Self {
        let n = weights.len();
        Balancer {
            strategy: Cell::new(strategy),
            weights: RefCell::new(weights),
            // Cores start at different offsets so they don't all hit backend 0 first.
            next: Cell::new(fastrand::usize(..n.max(1))),
            current: RefCell::new(vec![0; n]),
        }
    }

    /// The backend table or the strategy changed (reload, discovery). Smooth-weighted state is
    /// kept for slots that keep their weight, so a reload does not reset the interleaving.
    pub fn update(&self, strategy: Strategy, weights: Vec<u32>) {
        self.strategy.set(strategy);
        let mut current = self.current.borrow_mut();
        let old = self.weights.replace(weights);
        let new = self.weights.borrow();
        current.resize(new.len(), 0);
        for (i, c) in current.iter_mut().enumerate() {
            if old.get(i) != new.get(i) {
                *c = 0;
            }
        }
    }

    /// Picks one backend among those for which `eligible` is true.
    pub fn pick(&self, view: &LoadView, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        match self.strategy.get() {
            Strategy::RoundRobin => self.round_robin(&eligible),
            Strategy::WeightedRoundRobin => self.smooth_weighted(&eligible),
            Strategy::LeastConnections => self.least_connections(view, &eligible),
            Strategy::PowerOfTwo => self.power_of_two(view, &eligible),
        }
    }

    fn round_robin(&self, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.weights.borrow().len();
        let start = self.next.get();
        for i in 0..n {
            let b = (start + i) % n;
            if eligible(b) {
                self.next.set((b + 1) % n);
                return Some(b);
            }
        }
        None
    }

    /// Each pick adds every eligible backend's weight to its current value, takes the largest and
    /// subtracts the total from it: weights 5:1 give a a a b a a ... interleaved, never bursts.
    fn smooth_weighted(&self, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
        let mut current = self.current.borrow_mut();
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (b, w) in self.weights.borrow().iter().enumerate() {
            if !eligible(b) {
                continue;
            }
            let w = i64::from(*w);
            current[b] += w;
            total += w;
            if best.is_none_or(|x| current[b] > current[x]) {
                best = Some(b);
            }
        }
        let b = best?;
        current[b] -= total;
        Some(b)
    }

    /// Two distinct eligible backends drawn at random; the one with the lower in-flight/weight
    /// (across all cores) wins. Unlike a global minimum, many cores picking at once with slightly
    /// stale views do not all pile onto the same backend.
    fn power_of_two(&self, view: &LoadView, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
        let weights = self.weights.borrow();
        let n = weights.len();
        let count = (0..n).filter(|&b| eligible(b)).count();
        let nth = |k: usize| (0..n).filter(|&b| eligible(b)).nth(k);
        match count {
            0 => None,
            1 => nth(0),
            _ => {
                let i = fastrand::usize(..count);
                let mut j = fastrand::usize(..count - 1);
                if j >= i {
                    j += 1;
                }
                let (a, b) = (nth(i)?, nth(j)?);
                // a beats b when load_a / w_a <= load_b / w_b.
                let (la, lb) = (u64::from(view.load(a)), u64::from(view.load(b)));
                let (wa, wb) = (u64::from(weights[a].max(1)), u64::from(weights[b].max(1)));
                Some(if la * wb <= lb * wa { a } else { b })
            }
        }
    }

    /// Lowest in-flight/weight across all cores; ties broken uniformly at random so that cores
    /// picking at the same moment spread out instead of herding onto one backend.
    fn least_connections(
        &self,
        view: &LoadView,
        eligible: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let mut best: Option<(usize, u64, u64)> = None; // (backend, load, weight)
        let mut ties = 0u32;
        for (b, w) in self.weights.borrow().iter().enumerate() {
            if !eligible(b) {
                continue;
            }
            let load = u64::from(view.load(b));
            let w = u64::from(*w).max(1);
            match best {
                None => {
                    best = Some((b, load, w));
                    ties = 1;
                }
                Some((_, bl, bw)) => {
                    // load/w < bl/bw without division.
                    let lhs = load * bw;
                    let rhs = bl * w;
                    if lhs < rhs {
                        best = Some((b, load, w));
                        ties = 1;
                    } else if lhs == rhs {
                        ties += 1;
                        if fastrand::u32(..ties) == 0 {
                            best = Some((b, load, w));
                        }
                    }
                }
            }
        }
        best.map(|(b, _, _)| b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_weighted_interleaves_exactly() {
        let b = Balancer::new(Strategy::WeightedRoundRobin, vec![5, 1]);
        let view = LoadView::new(0, 1, 2);
        let picks: Vec<usize> = (0..12).map(|_| b.pick(&view, |_| true).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 10);
        // Never more than 5 in a row for the heavy one, and the light one is spread out.
        assert_eq!(picks[..6].iter().filter(|&&p| p == 1).count(), 1);
        assert_eq!(picks[6..].iter().filter(|&&p| p == 1).count(), 1);
    }

    #[test]
    fn round_robin_skips_ineligible() {
        let b = Balancer::new(Strategy::RoundRobin, vec![1, 1, 1]);
        let view = LoadView::new(0, 1, 3);
        let picks: Vec<usize> = (0..6).map(|_| b.pick(&view, |i| i != 1).unwrap()).collect();
        assert!(!picks.contains(&1));
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 3);
        assert_eq!(b.pick(&view, |_| false), None);
    }

    #[test]
    fn least_connections_uses_all_cores_and_weights() {
        let view = LoadView::new(0, 2, 2);
        view.set(1, 0, 1, 3); // another core holds 3 on backend 0
        view.add_own(1, 1);
        let b = Balancer::new(Strategy::LeastConnections, vec![1, 1]);
        for _ in 0..10 {
            assert_eq!(b.pick(&view, |_| true), Some(1));
        }
        // With weight 4, backend 0 at 3 in flight (0.75) beats backend 1 at 1 (1.0).
        let b = Balancer::new(Strategy::LeastConnections, vec![4, 1]);
        assert_eq!(b.pick(&view, |_| true), Some(0));
    }

    #[test]
    fn least_connections_breaks_ties_randomly() {
        let view = LoadView::new(0, 1, 3);
        let b = Balancer::new(Strategy::LeastConnections, vec![1, 1, 1]);
        let mut seen = [0; 3];
        for _ in 0..300 {
            seen[b.pick(&view, |_| true).unwrap()] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn power_of_two_prefers_the_less_loaded_of_two_and_skips_ineligible() {
        let view = LoadView::new(0, 1, 3);
        view.set(0, 0, 1, 10);
        view.set(0, 1, 2, 0);
        view.set(0, 2, 3, 5);
        let b = Balancer::new(Strategy::PowerOfTwo, vec![1, 1, 1]);
        let mut seen = [0; 3];
        for _ in 0..600 {
            seen[b.pick(&view, |_| true).unwrap()] += 1;
        }
        // Backend 0 (heaviest) can never win a pair; 1 (idle) wins every pair it is in.
        assert_eq!(seen[0], 0, "{seen:?}");
        assert!(seen[1] > seen[2], "{seen:?}");
        assert_eq!(b.pick(&view, |i| i == 2), Some(2));
        assert_eq!(b.pick(&view, |_| false), None);
        for _ in 0..50 {
            assert_ne!(b.pick(&view, |i| i != 1), Some(1));
        }
    }

    #[test]
    fn load_view_totals_follow_absolute_updates() {
        let view = LoadView::new(0, 3, 1);
        view.set(1, 0, 1, 5);
        view.set(2, 0, 1, 2);
        view.add_own(0, 1);
        assert_eq!(view.load(0), 8);
        view.set(1, 0, 1, 0);
        assert_eq!(view.load(0), 3);
        view.add_own(0, -1);
        assert_eq!(view.load(0), 2);
        assert!(!view.set(7, 0, 1, 1));
    }
}
