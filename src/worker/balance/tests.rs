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
fn least_connections_breaks_ties_by_weight() {
    let view = LoadView::new(0, 1, 3);
    let b = Balancer::new(Strategy::LeastConnections, vec![1, 1, 1]);
    let mut seen = [0; 3];
    for _ in 0..300 {
        seen[b.pick(&view, |_| true).unwrap()] += 1;
    }
    assert_eq!(seen, [100, 100, 100]);
    // Sequential requests (all idle): 3:1 weights show as 3:1, not as a coin toss.
    let b = Balancer::new(Strategy::LeastConnections, vec![3, 1]);
    let mut seen = [0; 2];
    for _ in 0..400 {
        seen[b.pick(&view, |i| i < 2).unwrap()] += 1;
    }
    assert_eq!(seen, [300, 100]);
    // Only the least loaded take part in the rotation.
    view.add_own(0, 1);
    let mut seen = [0; 2];
    for _ in 0..40 {
        seen[b.pick(&view, |i| i < 2).unwrap()] += 1;
    }
    assert_eq!(
        seen,
        [0, 40],
        "1/3 in flight on backend 0 beats 0/1 on backend 1? no"
    );
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

use crate::worker::engine::{EngineLoad, EngineView, Reading};
use std::time::Duration;

fn engine(readings: &[Option<(f64, Option<f64>)>], at: Instant) -> EngineView {
    let e = EngineView::new(readings.len(), Duration::from_secs(2));
    for (b, r) in readings.iter().enumerate() {
        if let Some((waiting, kv_usage)) = *r {
            let load = EngineLoad {
                waiting,
                running: 0.0,
                kv_usage,
            };
            e.set(b, Reading { load, at });
        }
    }
    e
}

fn with_engine<'a>(view: &'a LoadView, e: &'a EngineView, now: Instant) -> Inputs<'a> {
    Inputs {
        view,
        engine: Some(e),
        key: None,
        blocks: &[],
        now,
    }
}

fn picks(b: &Balancer, input: &Inputs<'_>, n: usize) -> Vec<usize> {
    let mut seen = vec![0; b.len()];
    for _ in 0..n {
        seen[b.choose(input, |_| true).unwrap().backend] += 1;
    }
    seen
}

#[test]
fn least_load_follows_queue_kv_and_inflight() {
    let view = LoadView::new(0, 1, 3);
    let now = Instant::now();
    let e = engine(
        &[
            Some((5.0, Some(0.2))),
            Some((0.0, Some(0.5))),
            Some((1.0, Some(0.1))),
        ],
        now,
    );
    let b = Balancer::new(Strategy::LeastLoad, vec![1, 1, 1]);
    let input = with_engine(&view, &e, now);
    // Scores (queue 4, kv 8, inflight 1): 21.6, 4.0, 4.8.
    let p = b.choose(&input, |_| true).unwrap();
    assert_eq!((p.backend, p.reason), (1, Reason::EngineLoad));
    // In-flight counts move the decision between scrapes: +1 in flight on 1 → 5.0 > 4.8.
    view.set(0, 1, 2, 1);
    assert_eq!(b.choose(&input, |_| true).unwrap().backend, 2);
    assert_eq!(b.choose(&input, |i| i == 0).unwrap().backend, 0);
    assert_eq!(b.choose(&input, |_| false), None);
    // Weights divide the score: weight 8 on backend 0 makes 21.6 / 8 = 2.7 the lowest.
    let b = Balancer::new(Strategy::LeastLoad, vec![8, 1, 1]);
    assert_eq!(b.choose(&input, |_| true).unwrap().backend, 0);
}

#[test]
fn least_load_never_picks_a_saturated_cache_while_another_is_below() {
    let view = LoadView::new(0, 1, 3);
    let now = Instant::now();
    // Backend 0 idle but its KV cache is 95% full; 1 and 2 are busy but have room.
    let e = engine(
        &[
            Some((0.0, Some(0.95))),
            Some((9.0, Some(0.5))),
            Some((12.0, Some(0.6))),
        ],
        now,
    );
    view.set(0, 1, 2, 20);
    let b = Balancer::new(Strategy::LeastLoad, vec![1, 1, 1]);
    let input = with_engine(&view, &e, now);
    assert_eq!(picks(&b, &input, 50)[0], 0);
    // Only saturated candidates left: the least loaded of them, flagged.
    let p = b.choose(&input, |i| i == 0).unwrap();
    assert_eq!((p.backend, p.reason), (0, Reason::KvSaturated));
    // A backend without KV figures (TGI) or without metrics counts as having room.
    let e = engine(&[Some((0.0, Some(0.95))), Some((3.0, None)), None], now);
    let input = Inputs {
        engine: Some(&e),
        ..input
    };
    assert_eq!(picks(&b, &input, 50)[0], 0);
}

#[test]
fn least_load_falls_back_to_inflight_when_metrics_are_stale() {
    let view = LoadView::new(0, 1, 2);
    let t0 = Instant::now();
    // Backend 0 reported a deep queue; backend 1 a short one.
    let e = engine(&[Some((10.0, Some(0.1))), Some((1.0, Some(0.1)))], t0);
    view.set(0, 0, 1, 1);
    view.set(0, 1, 2, 3);
    let b = Balancer::new(Strategy::LeastLoad, vec![1, 1]);
    let fresh = with_engine(&view, &e, t0 + Duration::from_secs(1));
    assert_eq!(b.choose(&fresh, |_| true).unwrap().backend, 1);
    // 2 s later both readings are stale: in-flight alone decides (1 < 3).
    let stale = Inputs {
        now: t0 + Duration::from_millis(2500),
        ..fresh
    };
    let p = b.choose(&stale, |_| true).unwrap();
    assert_eq!((p.backend, p.reason), (0, Reason::StaleMetrics));
    // No engine view at all behaves the same.
    let none = Inputs {
        engine: None,
        ..fresh
    };
    assert_eq!(b.choose(&none, |_| true).unwrap().backend, 0);
    // Only backend 0 went silent: it is judged by in-flight (1), backend 1 by its
    // fresh reading (3 + 4×1 + 0.8), so the silent one wins and says why.
    let e2 = EngineView::new(2, Duration::from_secs(2));
    let load = |w| EngineLoad {
        waiting: w,
        running: 0.0,
        kv_usage: Some(0.1),
    };
    e2.set(
        0,
        Reading {
            load: load(10.0),
            at: t0,
        },
    );
    let t1 = t0 + Duration::from_millis(2500);
    e2.set(
        1,
        Reading {
            load: load(1.0),
            at: t1,
        },
    );
    let mixed = with_engine(&view, &e2, t1);
    let p = b.choose(&mixed, |_| true).unwrap();
    assert_eq!((p.backend, p.reason), (0, Reason::StaleMetrics));
}

#[test]
fn least_load_breaks_ties_randomly() {
    let view = LoadView::new(0, 1, 3);
    let b = Balancer::new(Strategy::LeastLoad, vec![1, 1, 1]);
    let seen = picks(&b, &Inputs::new(&view), 300);
    assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
}

#[test]
fn consistent_hash_is_sticky_spread_and_minimally_disrupted() {
    let view = LoadView::new(0, 1, 4);
    let b = Balancer::new(Strategy::ConsistentHash, vec![1, 1, 1, 1]);
    let with_key = |k: u64| Inputs {
        key: Some(k),
        ..Inputs::new(&view)
    };
    let mut per_backend = [0; 4];
    let mut moved = 0;
    for k in 0..2000u64 {
        let key = mix64(k);
        let p = b.choose(&with_key(key), |_| true).unwrap();
        assert_eq!(p.reason, Reason::AffinityHit);
        // Same key, same backend.
        assert_eq!(
            b.choose(&with_key(key), |_| true).unwrap().backend,
            p.backend
        );
        per_backend[p.backend] += 1;
        // Removing backend 3 moves only the keys that were on it.
        let q = b.choose(&with_key(key), |i| i != 3).unwrap().backend;
        if q != p.backend {
            assert_eq!(p.backend, 3);
            moved += 1;
        }
    }
    assert!(
        per_backend.iter().all(|&n| n > 380 && n < 620),
        "{per_backend:?}"
    );
    assert_eq!(moved, per_backend[3]);
    // Weights skew the share: 3:1.
    let b = Balancer::new(Strategy::ConsistentHash, vec![3, 1]);
    let view2 = LoadView::new(0, 1, 2);
    let heavy = (0..2000u64)
        .filter(|k| {
            let input = Inputs {
                key: Some(mix64(*k)),
                ..Inputs::new(&view2)
            };
            b.choose(&input, |_| true).unwrap().backend == 0
        })
        .count();
    assert!((1350..1650).contains(&heavy), "{heavy}");
}

#[test]
fn consistent_hash_guards_imbalance_and_handles_missing_keys() {
    let view = LoadView::new(0, 1, 3);
    let ids: Vec<u64> = ["a", "b", "c"]
        .iter()
        .map(|u| hash_bytes(u.as_bytes()))
        .collect();
    let params = Params {
        max_imbalance: 4,
        ..Params::default()
    };
    let b = Balancer::with(Strategy::ConsistentHash, vec![1, 1, 1], ids, params);
    let input = Inputs {
        key: Some(42),
        ..Inputs::new(&view)
    };
    let home = b.choose(&input, |_| true).unwrap().backend;
    let other = (home + 1) % 3;
    // Within the bound (home 5, least 1: gap 4): affinity holds.
    for i in 0..3 {
        view.set(0, i, i as u64 + 1, if i == home { 5 } else { 1 });
    }
    let p = b.choose(&input, |_| true).unwrap();
    assert_eq!((p.backend, p.reason), (home, Reason::AffinityHit));
    // Beyond it: the least loaded serves.
    view.set(0, other, other as u64 + 1, 0);
    let p = b.choose(&input, |_| true).unwrap();
    assert_eq!((p.backend, p.reason), (other, Reason::ImbalanceFallback));
    // No key: least loaded.
    let p = b.choose(&Inputs::new(&view), |_| true).unwrap();
    assert_eq!((p.backend, p.reason), (other, Reason::NoKey));
    assert_eq!(b.choose(&input, |_| false), None);
}

#[test]
fn update_resets_only_slots_whose_backend_or_weight_changed() {
    let view = LoadView::new(0, 1, 3);
    let m = |id, weight, key| Member {
        id,
        weight,
        key,
        busy: None,
    };
    let b = Balancer::new(Strategy::WeightedRoundRobin, Vec::new());
    let p = Params::default();
    b.update(Strategy::WeightedRoundRobin, p, &[m(1, 5, 11), m(2, 1, 22)]);
    b.pick(&view, |i| i < 2);
    b.pick(&view, |i| i < 2);
    let before = b.current.borrow().clone();
    // Slot 1 now holds another backend (same weight): its state starts over; slot 0 keeps.
    let members = [m(1, 5, 11), m(7, 1, 77), m(8, 2, 88)];
    b.update(Strategy::WeightedRoundRobin, p, &members);
    assert_eq!(*b.current.borrow(), vec![before[0], 0, 0]);
    assert_eq!(*b.keys.borrow(), vec![11, 77, 88]);
    // consistent_hash keys on the members' keys, not on slots: the same key set in another
    // slot order maps a request key to the same backend.
    let b1 = Balancer::new(Strategy::ConsistentHash, Vec::new());
    b1.update(
        Strategy::ConsistentHash,
        p,
        &[m(1, 1, 11), m(2, 1, 22), m(3, 1, 33)],
    );
    let b2 = Balancer::new(Strategy::ConsistentHash, Vec::new());
    b2.update(
        Strategy::ConsistentHash,
        p,
        &[m(3, 1, 33), m(1, 1, 11), m(2, 1, 22)],
    );
    for k in 0..200u64 {
        let input = Inputs {
            key: Some(mix64(k)),
            ..Inputs::new(&view)
        };
        let a = b1.choose(&input, |_| true).unwrap().backend;
        let c = b2.choose(&input, |_| true).unwrap().backend;
        assert_eq!(a, (c + 2) % 3, "key {k}");
    }
}

#[test]
fn stable_hash_is_fixed() {
    // Replicas and releases must agree on where a key goes.
    assert_eq!(hash_bytes(b""), hash_bytes(b""));
    assert_ne!(hash_bytes(b"session-1"), hash_bytes(b"session-2"));
    assert_ne!(hash_bytes(b"a\0"), hash_bytes(b"a"));
    assert_eq!(hash_bytes(b"session-1"), 0xfa31_a2c0_ad8b_5128_u64);
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

/// A prompt of `n` blocks whose first `shared` blocks belong to family `p`.
fn prompt(p: u64, shared: usize, n: usize, salt: u64) -> Vec<u64> {
    (0..n as u64)
        .map(|i| {
            if (i as usize) < shared {
                mix64(p << 32 | i)
            } else {
                mix64(salt << 40 | p << 32 | i)
            }
        })
        .collect()
}

fn prefix_balancer(n: usize, miss_cost: f64) -> Balancer {
    let params = Params::default().prefix_cache(1000, miss_cost);
    let keys = (0..n as u64).map(mix64).collect();
    Balancer::with(Strategy::PrefixCache, vec![1; n], keys, params)
}

fn on<'a>(view: &'a LoadView, blocks: &'a [u64]) -> Inputs<'a> {
    Inputs {
        blocks,
        ..Inputs::new(view)
    }
}

#[test]
fn prefix_cache_returns_a_prompt_to_the_backend_that_has_it() {
    fastrand::seed(7);
    let b = prefix_balancer(4, 4.0);
    let view = LoadView::new(0, 1, 4);
    let first = prompt(1, 10, 12, 0);
    let p = b.choose(&on(&view, &first), |_| true).unwrap();
    assert_eq!(p.reason, Reason::CacheMiss);
    b.learn(p.backend, &first);
    // Same system prompt, another question: same backend, whatever the others' load.
    for salt in 1..20 {
        let again = prompt(1, 10, 12, salt);
        let q = b.choose(&on(&view, &again), |_| true).unwrap();
        assert_eq!((q.backend, q.reason), (p.backend, Reason::CacheHit));
    }
    // Not eligible (down, tried): among those left, nobody has it.
    let q = b.choose(&on(&view, &first), |i| i != p.backend).unwrap();
    assert_ne!(q.backend, p.backend);
    assert_eq!(q.reason, Reason::CacheMiss);
    assert_eq!(b.cached_blocks(p.backend, &first), 12);
    // Another strategy learns nothing.
    let rr = Balancer::new(Strategy::RoundRobin, vec![1; 2]);
    rr.learn(0, &first);
    assert_eq!(rr.cached_blocks(0, &first), 0);
}

#[test]
fn prefix_cache_spreads_misses_even_at_low_concurrency() {
    fastrand::seed(11);
    let b = prefix_balancer(4, 4.0);
    let view = LoadView::new(0, 1, 4);
    let mut counts = [0u32; 4];
    // Sequential requests (nothing in flight), every prompt new: not all to one replica.
    for p in 0..400 {
        let blocks = prompt(p + 100, 8, 8, 0);
        let pick = b.choose(&on(&view, &blocks), |_| true).unwrap();
        assert_eq!(pick.reason, Reason::CacheMiss);
        b.learn(pick.backend, &blocks);
        counts[pick.backend] += 1;
    }
    assert!(counts.iter().all(|&c| c > 70), "{counts:?}");
    // Prompts shorter than a block are misses too, and go to the least loaded.
    view.add_own(0, 2);
    view.add_own(1, 1);
    view.add_own(3, 1);
    let p = b.choose(&on(&view, &[]), |_| true).unwrap();
    assert_eq!((p.backend, p.reason), (2, Reason::CacheMiss));
}

#[test]
fn a_hot_prefix_spills_from_a_busy_backend_and_is_then_known_on_both() {
    fastrand::seed(3);
    let b = prefix_balancer(2, 4.0);
    let view = LoadView::new(0, 1, 2);
    let hot = prompt(1, 20, 20, 0);
    b.learn(0, &hot);
    // Up to miss_cost more in flight, the prefix's backend keeps it.
    view.add_own(0, 3);
    assert_eq!(b.choose(&on(&view, &hot), |_| true).unwrap().backend, 0);
    // Beyond, the idle backend is cheaper than the queue.
    view.add_own(0, 2);
    let p = b.choose(&on(&view, &hot), |_| true).unwrap();
    assert_eq!((p.backend, p.reason), (1, Reason::LoadSpill));
    b.learn(1, &hot);
    // Both hold it now: the less loaded wins as a hit.
    let p = b.choose(&on(&view, &hot), |_| true).unwrap();
    assert_eq!((p.backend, p.reason), (1, Reason::CacheHit));
    // A partial match is worth its share: 10 of 20 blocks on 0 (load 5) vs nothing on an
    // idle 1 → 4 × 0.5 + 5 > 4 × 1 + 0: backend 1.
    let b = prefix_balancer(2, 4.0);
    b.learn(0, &prompt(1, 10, 10, 0));
    let half = prompt(1, 10, 20, 9);
    let p = b.choose(&on(&view, &half), |_| true).unwrap();
    assert_eq!((p.backend, p.reason), (1, Reason::LoadSpill));
    view.add_own(0, -4);
    let p = b.choose(&on(&view, &half), |_| true).unwrap();
    assert_eq!((p.backend, p.reason), (0, Reason::CacheHit));
}

#[test]
fn a_backend_that_leaves_or_restarts_loses_what_it_held() {
    let b = prefix_balancer(2, 4.0);
    let hot = prompt(1, 8, 8, 0);
    b.learn(0, &hot);
    b.learn(1, &hot);
    b.forget(1);
    assert_eq!(b.cached_blocks(1, &hot), 0);
    assert_eq!(b.cached_blocks(0, &hot), 8);
    // Slot 0 now holds another backend (reload, discovery): it starts empty; slot 1 kept.
    b.learn(1, &hot);
    let params = Params::default().prefix_cache(1000, 4.0);
    let members = [
        Member {
            id: 9,
            weight: 1,
            key: 9,
            busy: None,
        },
        Member {
            id: 2,
            weight: 1,
            key: mix64(1),
            busy: None,
        },
    ];
    b.update(Strategy::PrefixCache, params, &members);
    assert_eq!(b.cached_blocks(0, &hot), 0);
    assert_eq!(b.cached_blocks(1, &hot), 8);
}

/// Two servers with two engine slots each (llama.cpp `--parallel 2`), `miss_cost` 8.
fn slot_balancer() -> Balancer {
    let b = prefix_balancer(2, 8.0);
    b.set_engine_slots(0, 2);
    b.set_engine_slots(1, 2);
    b
}

/// Chooses and learns (as a taken pick does); the slot guard is the caller's to hold.
fn take(b: &Balancer, view: &LoadView, blocks: &[u64]) -> Pick {
    let p = b.choose(&on(view, blocks), |_| true).unwrap();
    b.learn_slot(p.backend, p.slot, blocks);
    p
}

#[test]
fn engine_slots_fill_empty_ones_first_spread_over_servers_and_come_back_warm() {
    fastrand::seed(5);
    let b = slot_balancer();
    let view = LoadView::new(0, 1, 2);
    // Four prompts, one after the other (nothing in flight): each takes a slot never used,
    // two per server.
    let prompts: Vec<Vec<u64>> = (1..=4).map(|p| prompt(p, 10, 11, 0)).collect();
    let mut placed = Vec::new();
    for p in &prompts {
        let pick = take(&b, &view, p);
        assert_eq!(pick.reason, Reason::CacheMiss);
        placed.push((pick.backend, pick.slot.unwrap()));
    }
    let mut sorted = placed.clone();
    sorted.sort();
    assert_eq!(sorted, [(0, 0), (0, 1), (1, 0), (1, 1)], "{placed:?}");
    // The same system prompt with another question goes back to its slot.
    for (i, p) in (1..=4).enumerate() {
        let again = prompt(p, 10, 11, 7);
        let pick = b.choose(&on(&view, &again), |_| true).unwrap();
        assert_eq!(
            (pick.backend, pick.slot.unwrap(), pick.reason),
            (placed[i].0, placed[i].1, Reason::CacheHit)
        );
    }
    // A fifth prompt evicts the slot given a prompt longest ago (prompt 1's), and prompt 1
    // then has no slot left.
    let fifth = take(&b, &view, &prompt(5, 10, 11, 0));
    assert_eq!((fifth.backend, fifth.slot.unwrap()), placed[0]);
    let p1 = b.choose(&on(&view, &prompts[0]), |_| true).unwrap();
    assert_eq!(p1.reason, Reason::CacheMiss);
}

#[test]
fn a_busy_warm_slot_is_waited_for_until_miss_cost_requests_queue_on_it() {
    fastrand::seed(9);
    let b = slot_balancer();
    let view = LoadView::new(0, 1, 2);
    let hot = prompt(1, 10, 11, 0);
    let first = take(&b, &view, &hot);
    let (s, k) = (first.backend, first.slot.unwrap());
    // Busy with one request: the next one with the same prompt waits for it rather than
    // taking an idle slot (which would recompute the prompt and evict another).
    let mut held = vec![b.occupy_slot(s, k).unwrap()];
    view.add_own(s, 1);
    let p = b
        .choose(&on(&view, &prompt(1, 10, 11, 3)), |_| true)
        .unwrap();
    assert_eq!(
        (p.backend, p.slot, p.reason),
        (s, Some(k), Reason::SlotWait)
    );
    // 1 block of 11 missing there (the question) and 7 queued: 8 × 1/11 + 7 < 8: still waits.
    for _ in 1..7 {
        held.push(b.occupy_slot(s, k).unwrap());
    }
    let p = b
        .choose(&on(&view, &prompt(1, 10, 11, 3)), |_| true)
        .unwrap();
    assert_eq!((p.backend, p.slot), (s, Some(k)));
    // One more queued: an idle slot is cheaper now; the prompt spills and is then in two slots.
    held.push(b.occupy_slot(s, k).unwrap());
    let p = take(&b, &view, &prompt(1, 10, 11, 3));
    assert_eq!(p.reason, Reason::LoadSpill);
    assert_ne!((p.backend, p.slot), (s, Some(k)));
    assert_ne!(
        p.backend, s,
        "the idle server, not the busy one's other slot"
    );
    drop(held);
    let p = b.choose(&on(&view, &hot), |_| true).unwrap();
    assert_eq!(p.reason, Reason::CacheHit);
}

#[test]
fn a_prompt_without_blocks_is_not_pinned_and_unslotted_backends_keep_todays_pick() {
    fastrand::seed(13);
    let b = prefix_balancer(3, 8.0);
    b.set_engine_slots(0, 2);
    let view = LoadView::new(0, 1, 3);
    view.add_own(1, 1);
    view.add_own(2, 1);
    // No blocks (not JSON, no messages, a short prompt): the least loaded backend, no slot.
    let p = b.choose(&on(&view, &[]), |_| true).unwrap();
    assert_eq!((p.backend, p.slot, p.reason), (0, None, Reason::CacheMiss));
    // A backend without slots is scored as a whole and learns in its LRU index.
    let hot = prompt(1, 10, 10, 0);
    b.learn(2, &hot);
    let p = b.choose(&on(&view, &hot), |_| true).unwrap();
    assert_eq!((p.backend, p.slot, p.reason), (2, None, Reason::CacheHit));
    // Only prefix_cache pins.
    let rr = Balancer::new(Strategy::RoundRobin, vec![1; 2]);
    rr.set_engine_slots(0, 2);
    assert_eq!(rr.choose(&on(&view, &hot), |_| true).unwrap().slot, None);
    // A restart forgets every slot's prompt.
    let s = slot_balancer();
    let p = take(&s, &view, &hot);
    s.forget(p.backend);
    assert_eq!(
        s.choose(&on(&view, &hot), |_| true).unwrap().reason,
        Reason::CacheMiss
    );
}
