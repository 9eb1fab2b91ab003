//! `benches/prefix_llama.sh` as a model, to see what any router can get out of it: two
//! llama.cpp servers with two slots each and no host prompt cache, six system prompts of 700
//! tokens (the hottest 40% of the requests, the others 12% each) plus a 15-token question,
//! 4 tokens out, closed-loop clients, an unmeasured warm-up of each prompt once.
//!
//! The engine, as llama.cpp's server behaves: a slot keeps its last prompt; a request takes the
//! idle slot holding its prompt, else the least recently used idle slot (evicting it); with no
//! idle slot it waits in the server and takes the next slot to free, whatever that slot held.
//! One thread computes every busy slot in one batch per step: a step costs `STEP` + `PER_TOKEN`
//! × the prompt tokens prefilled in it, so a request sharing a server with a cold prefill waits
//! for it (a cold prompt about 3 s, a warm one about 0.12 s, as measured on this machine).
//!
//! `static placement` is not a strategy: the hot prompt and one other on one server, the
//! other four on the second, whatever the load: what affinity chosen knowing the popularity
//! in advance gets here.
//!
//! `prefix_cache, slots: 2` is the strategy with the servers' slots declared: the balancer picks
//! an engine slot and the request is pinned to it (llama.cpp's `id_slot`): a pinned request whose
//! slot is busy waits in the server for that slot, and a slot that frees is taken first by a
//! request waiting for it (llama.cpp's `pop_deferred_task(id_slot)`), else by the oldest unpinned
//! one.

use super::*;

const SERVERS: usize = 2;
const SLOTS: usize = 2;
const PROMPTS: usize = 6;
const SYSTEM: u64 = 700;
const QUESTION: u64 = 15;
const OUTPUT: u32 = 4;
const STEP: f64 = 0.025;
const PER_TOKEN: f64 = 0.0042;
const REQUESTS: usize = 400;
/// The benchmark's `capacity_blocks`.
const CAPACITY: usize = 32;

#[derive(Clone, Copy, Default)]
struct Slot {
    prompt: Option<usize>,
    busy: Option<usize>,
    last: f64,
    prefill: u64,
    left: u32,
    /// Part of the step the server is computing.
    in_step: bool,
}

struct Server {
    slots: [Slot; SLOTS],
    deferred: VecDeque<usize>,
    stepping: bool,
}

struct Request {
    prompt: usize,
    sent: f64,
    done: f64,
    cached: u64,
    server: usize,
    measured: bool,
    /// The engine slot it is pinned to (`id_slot`).
    pin: Option<usize>,
}

pub(super) struct Outcome {
    pub reuse: f64,
    pub median: f64,
    pub p90: f64,
    pub shares: [u64; SERVERS],
}

/// The request plan: prompt per request, hottest 40%.
fn plan(seed: u64) -> Vec<usize> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..REQUESTS)
        .map(|_| {
            if rng.f64() < 0.4 {
                0
            } else {
                rng.usize(1..PROMPTS)
            }
        })
        .collect()
}

/// How requests are placed.
#[derive(Clone, Copy)]
enum Policy {
    Strategy(Strategy),
    /// Not a strategy: the hot prompt and one other on one server, the rest on the other.
    Static,
    /// Not built: a router that knows every slot's prompt (as `max_inflight` equal to the slots
    /// and the engine's `/slots` would tell it) and holds requests itself. A request goes to an
    /// idle slot holding its prompt; while a busy slot holds it, it waits for that slot (up to
    /// `MAX_WAIT`); else it takes the idle slot whose prompt is least wanted; else it waits.
    SlotAware,
    /// `prefix_cache` with `slots: 2` declared: requests pinned to the engine slot it picks.
    Pinned,
}

/// How long a slot-aware router holds a request for the slot that holds its prompt.
const MAX_WAIT: f64 = 2.0;

fn run_policy(policy: Policy, clients: usize, seed: u64) -> Outcome {
    let strategy = match policy {
        Policy::Strategy(s) => Some(s),
        Policy::Pinned => Some(Strategy::PrefixCache),
        _ => None,
    };
    fastrand::seed(seed);
    let ids: Vec<u64> = (0..SERVERS)
        .map(|i| hash_bytes(format!("http://127.0.0.1:{}", 9000 + i).as_bytes()))
        .collect();
    let params = Params::default().prefix_cache(CAPACITY, 8.0);
    let balancer = Balancer::with(
        strategy.unwrap_or(Strategy::RoundRobin),
        vec![1; SERVERS],
        ids,
        params,
    );
    let view = LoadView::new(0, 1, SERVERS);
    if matches!(policy, Policy::Pinned) {
        for s in 0..SERVERS {
            balancer.set_engine_slots(s, SLOTS);
        }
    }
    // The engine-slot counts each pinned request holds until it is done.
    let pinned = std::cell::RefCell::new(HashMap::new());
    let mut servers: Vec<Server> = (0..SERVERS)
        .map(|_| Server {
            slots: [Slot::default(); SLOTS],
            deferred: VecDeque::new(),
            stepping: false,
        })
        .collect();
    // Warm-up (one at a time, not measured), then the plan.
    let todo: Vec<usize> = (0..PROMPTS).chain(plan(seed)).collect();
    let mut next = 0usize;
    let mut reqs: Vec<Request> = Vec::new();
    // (time, seq, server): a step of `server` ends (or, at its first request, starts).
    let mut events: BinaryHeap<Reverse<(u64, u64, usize)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut now = 0.0f64;
    // Slot-aware: requests the router holds, in arrival order.
    let waiting: std::cell::RefCell<VecDeque<usize>> = Default::default();

    // Sends the next request of the plan (a client's turn), if any is left.
    let send = |now: f64,
                next: &mut usize,
                reqs: &mut Vec<Request>,
                servers: &mut Vec<Server>,
                events: &mut BinaryHeap<Reverse<(u64, u64, usize)>>,
                seq: &mut u64|
     -> bool {
        let Some(&prompt) = todo.get(*next) else {
            return false;
        };
        let r = *next;
        *next += 1;
        let shared = SYSTEM - SYSTEM % BLOCK_TOKENS;
        let blocks = chain(prompt as u64, shared, SYSTEM + QUESTION, r as u64);
        if matches!(policy, Policy::SlotAware) {
            reqs.push(Request {
                prompt,
                sent: now,
                done: 0.0,
                cached: 0,
                server: usize::MAX,
                measured: r >= PROMPTS,
                pin: None,
            });
            waiting.borrow_mut().push_back(r);
            return true;
        }
        let (server, pin) = match strategy {
            None => (usize::from(prompt >= 2), None),
            Some(_) => {
                let input = Inputs {
                    key: Some(mix64(prompt as u64)),
                    blocks: &blocks,
                    ..Inputs::new(&view)
                };
                let Some(pick) = balancer.choose(&input, |_| true) else {
                    return false;
                };
                if let Some(g) = pick
                    .slot
                    .and_then(|k| balancer.occupy_slot(pick.backend, k))
                {
                    pinned.borrow_mut().insert(r, g);
                }
                balancer.learn_slot(pick.backend, pick.slot, &blocks);
                (pick.backend, pick.slot)
            }
        };
        view.add_own(server, 1);
        reqs.push(Request {
            prompt,
            sent: now,
            done: 0.0,
            cached: 0,
            server,
            measured: r >= PROMPTS,
            pin,
        });
        start(server, r, reqs, servers, events, seq, now);
        true
    };

    send(
        now,
        &mut next,
        &mut reqs,
        &mut servers,
        &mut events,
        &mut seq,
    );
    if matches!(policy, Policy::SlotAware) {
        dispatch(
            &waiting,
            &mut reqs,
            &mut servers,
            &mut events,
            &mut seq,
            now,
        );
    }
    while let Some(Reverse((t, _, s))) = events.pop() {
        now = t as f64 / 1e9;
        if s == usize::MAX {
            // A held request's wait ran out.
            dispatch(
                &waiting,
                &mut reqs,
                &mut servers,
                &mut events,
                &mut seq,
                now,
            );
            continue;
        }
        // The server's step ends: the slots that were in it progress (a request that
        // arrived during the step waits for the next one).
        let mut finished = Vec::new();
        for (k, slot) in servers[s].slots.iter_mut().enumerate() {
            let Some(r) = slot.busy.filter(|_| slot.in_step) else {
                continue;
            };
            slot.prefill = 0;
            slot.left -= 1;
            if slot.left == 0 {
                slot.busy = None;
                slot.last = now;
                finished.push((r, k));
            }
        }
        for &(r, k) in &finished {
            reqs[r].done = now;
            if !matches!(policy, Policy::SlotAware) {
                view.add_own(s, -1);
            }
            pinned.borrow_mut().remove(&r);
            // The freed slot goes to a request pinned to it, else to the oldest unpinned one.
            let deferred = &mut servers[s].deferred;
            let next = deferred
                .iter()
                .position(|&d| reqs[d].pin == Some(k))
                .or_else(|| deferred.iter().position(|&d| reqs[d].pin.is_none()));
            if let Some(d) = next.and_then(|i| deferred.remove(i)) {
                assign(&mut servers[s], &mut reqs, d, now);
            }
        }
        let finished: Vec<usize> = finished.into_iter().map(|(r, _)| r).collect();
        // Each finished request frees its client. The warm-up runs one at a time; when its
        // last request is done, every client starts.
        for &r in &finished {
            let turns = if r + 1 == PROMPTS { clients } else { 1 };
            for _ in 0..turns {
                send(
                    now,
                    &mut next,
                    &mut reqs,
                    &mut servers,
                    &mut events,
                    &mut seq,
                );
            }
        }
        if matches!(policy, Policy::SlotAware) {
            dispatch(
                &waiting,
                &mut reqs,
                &mut servers,
                &mut events,
                &mut seq,
                now,
            );
        }
        // The next step: every busy slot, its prompt tokens priced.
        let server = &mut servers[s];
        let mut tokens = 0;
        for slot in server.slots.iter_mut() {
            slot.in_step = slot.busy.is_some();
            tokens += if slot.in_step { slot.prefill } else { 0 };
        }
        if server.slots.iter().any(|x| x.in_step) {
            seq += 1;
            let end = now + STEP + PER_TOKEN * tokens as f64;
            events.push(Reverse((ns(end), seq, s)));
        } else {
            server.stepping = false;
        }
    }
    let measured: Vec<&Request> = reqs.iter().filter(|r| r.measured).collect();
    assert_eq!(measured.len(), REQUESTS, "every request is served");
    let mut lat: Vec<f64> = measured.iter().map(|r| r.done - r.sent).collect();
    lat.sort_by(f64::total_cmp);
    let mut shares = [0; SERVERS];
    for r in &measured {
        shares[r.server] += 1;
    }
    let cached: u64 = measured.iter().map(|r| r.cached).sum();
    Outcome {
        reuse: cached as f64 / (measured.len() as u64 * (SYSTEM + QUESTION)) as f64,
        median: lat[lat.len() / 2],
        p90: lat[lat.len() * 9 / 10],
        shares,
    }
}

/// The slot-aware router places what it holds: first every request whose prompt an idle slot
/// holds, then in arrival order each request no busy slot can serve soon, on the server whose
/// idle slot (the one llama.cpp would take: least recently used) holds the least wanted prompt.
fn dispatch(
    waiting: &std::cell::RefCell<VecDeque<usize>>,
    reqs: &mut [Request],
    servers: &mut [Server],
    events: &mut BinaryHeap<Reverse<(u64, u64, usize)>>,
    seq: &mut u64,
    now: f64,
) {
    let mut waiting = waiting.borrow_mut();
    let idle_with = |servers: &[Server], p: usize| {
        (0..SERVERS).find(|&s| {
            servers[s]
                .slots
                .iter()
                .any(|x| x.busy.is_none() && x.prompt == Some(p))
        })
    };
    // Pass 1: exact slot matches.
    let mut i = 0;
    while i < waiting.len() {
        let r = waiting[i];
        if let Some(s) = idle_with(servers, reqs[r].prompt) {
            waiting.remove(i);
            reqs[r].server = s;
            start(s, r, reqs, servers, events, seq, now);
        } else {
            i += 1;
        }
    }
    // Pass 2: the rest, oldest first.
    let mut i = 0;
    while i < waiting.len() {
        let r = waiting[i];
        let p = reqs[r].prompt;
        let held_busy = servers.iter().any(|s| {
            s.slots
                .iter()
                .any(|x| x.busy.is_some() && x.prompt == Some(p))
        });
        if held_busy && now - reqs[r].sent < MAX_WAIT - 1e-6 {
            i += 1;
            continue;
        }
        // The idle slot llama.cpp would take on each server, and how much its prompt is wanted
        // (the hot prompt most; a prompt another slot also holds least).
        let worth = |s: usize| -> Option<(u32, f64)> {
            let slots = &servers[s].slots;
            let j = (0..SLOTS)
                .filter(|&j| slots[j].busy.is_none())
                .min_by(|&a, &b| slots[a].last.total_cmp(&slots[b].last))?;
            let Some(q) = slots[j].prompt else {
                return Some((0, 0.0));
            };
            let copies = servers
                .iter()
                .flat_map(|x| x.slots.iter())
                .filter(|x| x.prompt == Some(q))
                .count();
            let want = if copies > 1 {
                1
            } else if q == 0 {
                3
            } else {
                2
            };
            Some((want, slots[j].last))
        };
        let best = (0..SERVERS)
            .filter_map(|s| worth(s).map(|w| (w, s)))
            .min_by(|a, b| a.0 .0.cmp(&b.0 .0).then(a.0 .1.total_cmp(&b.0 .1)));
        match best {
            Some((_, s)) => {
                waiting.remove(i);
                reqs[r].server = s;
                start(s, r, reqs, servers, events, seq, now);
            }
            None => break,
        }
    }
    // Wake up when the oldest held request's wait runs out.
    if let Some(&r) = waiting.front() {
        let at = reqs[r].sent + MAX_WAIT;
        // (Time is kept in whole nanoseconds: an event due now must not be set again.)
        if at > now + 1e-6 {
            *seq += 1;
            events.push(Reverse((ns(at), *seq, usize::MAX)));
        }
    }
}

/// Request `r` goes to `server`, which starts stepping if it was idle.
fn start(
    server: usize,
    r: usize,
    reqs: &mut [Request],
    servers: &mut [Server],
    events: &mut BinaryHeap<Reverse<(u64, u64, usize)>>,
    seq: &mut u64,
    now: f64,
) {
    assign(&mut servers[server], reqs, r, now);
    if !servers[server].stepping {
        servers[server].stepping = true;
        *seq += 1;
        events.push(Reverse((ns(now), *seq, server)));
    }
}

/// Request `r` arrives at `server`: pinned, its slot if idle (else it waits for that slot);
/// unpinned, an idle slot holding its prompt, else the least recently used idle slot, else it
/// waits for the next slot to free.
fn assign(server: &mut Server, reqs: &mut [Request], r: usize, now: f64) {
    let prompt = reqs[r].prompt;
    let idle = |x: &Slot| x.busy.is_none();
    let pick = match reqs[r].pin {
        Some(k) => Some(k).filter(|&k| idle(&server.slots[k])),
        None => server
            .slots
            .iter()
            .position(|x| idle(x) && x.prompt == Some(prompt))
            .or_else(|| {
                (0..SLOTS)
                    .filter(|&i| idle(&server.slots[i]))
                    .min_by(|&a, &b| server.slots[a].last.total_cmp(&server.slots[b].last))
            }),
    };
    let Some(i) = pick else {
        server.deferred.push_back(r);
        return;
    };
    let slot = &mut server.slots[i];
    let cached = if slot.prompt == Some(prompt) {
        SYSTEM
    } else {
        0
    };
    reqs[r].cached = cached;
    *slot = Slot {
        prompt: Some(prompt),
        busy: Some(r),
        last: now,
        prefill: SYSTEM + QUESTION - cached,
        left: OUTPUT,
        in_step: false,
    };
}

pub(super) fn tables() {
    let seeds = [15u64, 16, 17, 18, 19];
    println!(
        "\nTwo llama.cpp servers (the model of benches/prefix_llama.sh: {SLOTS} slots each, \
         {PROMPTS} system prompts of {SYSTEM} tokens, hottest 40%, {REQUESTS} requests after a \
         warm-up, mean of {} seeds; consistent_hash keys on the system prompt):\n",
        seeds.len()
    );
    println!(
        "| clients | strategy | prefix reuse | median latency (s) | p90 latency (s) | requests per server |"
    );
    println!("|---|---|---:|---:|---:|---|");
    for clients in [2, 4] {
        let rows = [
            Policy::Strategy(Strategy::RoundRobin),
            Policy::Strategy(Strategy::LeastConnections),
            Policy::Strategy(Strategy::ConsistentHash),
            Policy::Strategy(Strategy::PrefixCache),
            Policy::Static,
            Policy::SlotAware,
            Policy::Pinned,
        ];
        for policy in rows {
            let runs: Vec<Outcome> = seeds
                .iter()
                .map(|&s| run_policy(policy, clients, s))
                .collect();
            let mean = |f: fn(&Outcome) -> f64| runs.iter().map(f).sum::<f64>() / runs.len() as f64;
            let mut shares = [0u64; SERVERS];
            for o in &runs {
                for (t, s) in shares.iter_mut().zip(o.shares) {
                    *t += s;
                }
            }
            println!(
                "| {clients} | {} | {:.2} | {:.2} | {:.2} | {:?} |",
                match policy {
                    Policy::Strategy(s) => s.as_str(),
                    Policy::Static => "static placement",
                    Policy::SlotAware => "slot-aware router holding requests (model)",
                    Policy::Pinned => "prefix_cache, slots: 2 (id_slot)",
                },
                mean(|o| o.reuse),
                mean(|o| o.median),
                mean(|o| o.p90),
                shares.map(|s| s / runs.len() as u64)
            );
        }
    }
}
