//! Routing simulation: how each strategy of `llmproxy::worker::balance` (the real code, through the
//! library crate) does in front of a small GPU cluster serving multi-turn chats. Deterministic:
//! the trace comes from a seeded RNG, the strategies' own randomness (`fastrand`) is seeded per
//! run, and time is simulated, so the table is the same on every machine.
//!
//! The model, stated plainly (it is a caricature of vLLM, not a measurement of one):
//! - `BACKENDS` identical GPUs. Each runs one operation at a time, prefill first: if a request
//!   is waiting, its batch has a free slot (`MAX_BATCH`) and its KV fits, it is prefilled;
//!   otherwise every running sequence decodes one token in one step.
//! - Prefill costs `PREFILL_FIXED` + `PREFILL_PER_TOKEN` × the prompt tokens not already in the
//!   backend's prefix cache. TTFT = arrival → end of its prefill (queueing included).
//! - A decode step costs `STEP_FIXED` + `STEP_PER_SEQ` × running sequences.
//! - KV cache of `KV_CAPACITY` tokens per GPU: running sequences hold prompt + generated tokens;
//!   a finished conversation stays cached (one entry per session, its whole history) until
//!   evicted, least recently used first, to make room. A new turn of a session reuses the cached
//!   history on that GPU only; there is no sharing between sessions.
//! - The proxy sees its exact in-flight counts; the engine metrics (`waiting`, `running`, KV use
//!   of running sequences) are "scraped" every `SCRAPE` into an `EngineView`, as the real scraper
//!   does. `consistent_hash` keys on the session id (a header such as `x-session-id`).
//! - Trace: `SESSIONS` chats arriving as a Poisson process (`SESSION_RATES`); each has 2-8 turns, its own system
//!   prompt (300-2000 tokens), user messages of 20-300 tokens, replies of 50-400 tokens, and
//!   an exponential think time (mean `THINK_MEAN`) between a reply and the next turn.
//!
//! Run: `cargo bench --bench routing_sim`. Not modelled: chunked prefill, preemption, prefix
//! sharing across sessions, network time, several proxy cores.
//!
//! A third table models `benches/prefix_llama.sh` (two llama.cpp servers, `--parallel 2
//! --cache-ram 0`) rather than a vLLM GPU: see `slots`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use llmproxy::config::Strategy;
use llmproxy::worker::balance::{hash_bytes, mix64, Balancer, Inputs, LoadView, Params};
use llmproxy::worker::engine::{EngineLoad, EngineView, Reading};

const SEED: u64 = 0x5eed_2026;
const BACKENDS: usize = 4;
const SESSIONS: usize = 800;
/// New chats per second: a moderate and a heavy load.
const SESSION_RATES: [f64; 2] = [1.5, 1.9];
const THINK_MEAN: f64 = 4.0; // seconds
const MAX_BATCH: usize = 32;
const KV_CAPACITY: u64 = 60_000; // tokens per GPU
const PREFILL_FIXED: f64 = 0.005; // seconds
const PREFILL_PER_TOKEN: f64 = 0.0001; // 10k prompt tokens/s
const STEP_FIXED: f64 = 0.015;
const STEP_PER_SEQ: f64 = 0.0002;
const SCRAPE: f64 = 0.25;

/// One chat turn as the trace fixes it.
#[derive(Clone, Copy)]
struct Turn {
    user: u64,
    reply: u64,
    /// Think time before this turn (after the previous reply).
    think: f64,
}

struct Session {
    start: f64,
    system: u64,
    turns: Vec<Turn>,
}

fn trace(rate: f64) -> Vec<Session> {
    let mut rng = fastrand::Rng::with_seed(SEED);
    let exp = |mean: f64, rng: &mut fastrand::Rng| -mean * (1.0 - rng.f64()).ln();
    let mut t = 0.0;
    (0..SESSIONS)
        .map(|_| {
            t += exp(1.0 / rate, &mut rng);
            let n = rng.usize(2..=8);
            Session {
                start: t,
                system: rng.u64(300..=2000),
                turns: (0..n)
                    .map(|_| Turn {
                        user: rng.u64(20..=300),
                        reply: rng.u64(50..=400),
                        think: exp(THINK_MEAN, &mut rng),
                    })
                    .collect(),
            }
        })
        .collect()
}

struct Req {
    session: usize,
    turn: usize,
    /// The cache entry this request can reuse: its session's history, or a shared prefix.
    cache_id: u64,
    /// Shared prefix (hot-prefix scenario): its tokens stay cached (in use by many), and only
    /// `reusable` of the prompt can come from the cache.
    shared: bool,
    reusable: u64,
    prompt: u64,
    output: u64,
    generated: u64,
    arrival: f64,
}

struct Gpu {
    /// KV cache capacity in tokens.
    kv: u64,
    busy: bool,
    waiting: VecDeque<usize>,
    running: Vec<usize>,
    /// Tokens held by running sequences.
    active: u64,
    /// cache id → (cached tokens, last use), the prefix cache.
    cache: HashMap<u64, (u64, f64)>,
    cached: u64,
}

impl Gpu {
    fn new(kv: u64) -> Self {
        Gpu {
            kv,
            busy: false,
            waiting: VecDeque::new(),
            running: Vec::new(),
            active: 0,
            cache: HashMap::new(),
            cached: 0,
        }
    }

    fn evict_for(&mut self, need: u64) -> bool {
        while self.active + self.cached + need > self.kv {
            let Some((&s, _)) = self
                .cache
                .iter()
                .min_by(|a, b| a.1 .1.total_cmp(&b.1 .1).then(a.0.cmp(b.0)))
            else {
                return false;
            };
            if let Some((tokens, _)) = self.cache.remove(&s) {
                self.cached -= tokens;
            }
        }
        true
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrive {
        session: usize,
        turn: usize,
    },
    /// One request of the hot-prefix trace.
    One {
        req: usize,
    },
    GpuDone {
        backend: usize,
    },
    Scrape,
}

struct Sim<'a> {
    sessions: &'a [Session],
    gpus: Vec<Gpu>,
    reqs: Vec<Req>,
    /// (time in ns, sequence) ordered events.
    events: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    seq: u64,
    /// The GPU's current operation: a prefill of one request, or a decode step.
    op: Vec<Option<Option<usize>>>,
    ttft: Vec<f64>,
    prompt_tokens: u64,
    cached_tokens: u64,
    served: [u64; BACKENDS],
    /// Turns not yet finished.
    remaining: usize,
}

fn ns(t: f64) -> u64 {
    (t * 1e9) as u64
}

impl<'a> Sim<'a> {
    fn push(&mut self, t: f64, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse((ns(t), self.seq, ev)));
    }

    /// Starts the GPU's next operation if it is idle.
    fn kick(&mut self, b: usize, now: f64) {
        if self.gpus[b].busy {
            return;
        }
        let g = &mut self.gpus[b];
        if let Some(&r) = g.waiting.front() {
            let req = &self.reqs[r];
            if req.shared {
                // A shared prefix stays in the cache for every request using it; a miss
                // computes it and caches it at once (the GPU runs one prefill at a time, so
                // the next request on it sees it).
                let hit = g.cache.get(&req.cache_id).map_or(0, |(t, _)| *t);
                let unique = req.prompt - req.reusable;
                let fits = g.running.len() < MAX_BATCH
                    && if hit > 0 {
                        g.cache.insert(req.cache_id, (hit, now));
                        g.evict_for(unique)
                    } else {
                        g.evict_for(req.prompt)
                            .then(|| {
                                g.cache.insert(req.cache_id, (req.reusable, now));
                                g.cached += req.reusable;
                            })
                            .is_some()
                    };
                if fits {
                    g.waiting.pop_front();
                    g.active += unique;
                    g.busy = true;
                    self.prompt_tokens += req.prompt;
                    self.cached_tokens += hit;
                    let cost = PREFILL_FIXED + PREFILL_PER_TOKEN * (req.prompt - hit) as f64;
                    self.op[b] = Some(Some(r));
                    self.push(now + cost, Ev::GpuDone { backend: b });
                    return;
                }
            }
        }
        if let Some(&r) = g.waiting.front().filter(|&&r| !self.reqs[r].shared) {
            let req = &self.reqs[r];
            let hit = g
                .cache
                .get(&req.cache_id)
                .map_or(0, |(t, _)| *t)
                .min(req.prompt);
            // The cached history becomes this sequence's own KV; the rest is computed.
            let fits = g.running.len() < MAX_BATCH && {
                if let Some((tokens, _)) = g.cache.remove(&req.cache_id) {
                    g.cached -= tokens;
                    g.active += hit;
                    g.evict_for(req.prompt - hit)
                } else {
                    g.evict_for(req.prompt)
                }
            };
            if fits {
                g.waiting.pop_front();
                g.active += req.prompt - hit;
                g.busy = true;
                self.prompt_tokens += req.prompt;
                self.cached_tokens += hit;
                let cost = PREFILL_FIXED + PREFILL_PER_TOKEN * (req.prompt - hit) as f64;
                self.op[b] = Some(Some(r));
                self.push(now + cost, Ev::GpuDone { backend: b });
                return;
            }
            if hit > 0 {
                // Not admitted yet: its history goes back to the cache.
                g.active -= hit;
                g.cache.insert(req.cache_id, (hit, now));
                g.cached += hit;
            }
        }
        if !g.running.is_empty() {
            g.busy = true;
            let cost = STEP_FIXED + STEP_PER_SEQ * g.running.len() as f64;
            self.op[b] = Some(None);
            self.push(now + cost, Ev::GpuDone { backend: b });
        }
    }

    fn gpu_done(&mut self, b: usize, now: f64, view: &LoadView) -> Vec<(usize, usize)> {
        self.gpus[b].busy = false;
        let mut next_turns = Vec::new();
        match self.op[b].take() {
            Some(Some(r)) => {
                self.ttft.push(now - self.reqs[r].arrival);
                self.gpus[b].running.push(r);
            }
            Some(None) => {
                let running = std::mem::take(&mut self.gpus[b].running);
                let mut still = Vec::with_capacity(running.len());
                for r in running {
                    let req = &mut self.reqs[r];
                    req.generated += 1;
                    self.gpus[b].active += 1;
                    if req.generated < req.output {
                        still.push(r);
                        continue;
                    }
                    let g = &mut self.gpus[b];
                    view.add_own(b, -1);
                    self.remaining -= 1;
                    if req.shared {
                        g.active -= req.prompt - req.reusable + req.generated;
                        continue;
                    }
                    // Finished: the whole conversation so far stays cached.
                    let total = req.prompt + req.generated;
                    g.active -= total;
                    if let Some((old, _)) = g.cache.insert(req.cache_id, (total, now)) {
                        g.cached -= old;
                    }
                    g.cached += total;
                    g.evict_for(0);
                    let (s, turn) = (req.session, req.turn);
                    if turn + 1 < self.sessions[s].turns.len() {
                        next_turns.push((s, turn + 1));
                    }
                }
                self.gpus[b].running = still;
            }
            None => {}
        }
        next_turns
    }

    fn prompt_of(&self, s: usize, turn: usize) -> u64 {
        let sess = &self.sessions[s];
        sess.system
            + sess.turns[..turn]
                .iter()
                .map(|t| t.user + t.reply)
                .sum::<u64>()
            + sess.turns[turn].user
    }
}

struct Outcome {
    mean_ttft: f64,
    p99_ttft: f64,
    hit_rate: f64,
    shares: [u64; BACKENDS],
    requests: usize,
}

/// Tokens per prefix-cache block, as `prefix_cache` sees prompts (256 bytes ≈ 64 tokens).
const BLOCK_TOKENS: u64 = 64;
/// Blocks hashed per request at most (the proxy's `max_blocks` default).
const MAX_BLOCKS: u64 = 128;

/// The hot-prefix scenario: many independent requests (no session), each a long shared system
/// prompt of Zipf-distributed popularity plus a short question of its own.
const HOT_PREFIXES: usize = 32;
const HOT_PREFIX_TOKENS: u64 = 4_000;
const HOT_REQUESTS: usize = 4_000;
/// Requests per second: moderate and heavy.
const HOT_RATES: [f64; 2] = [6.0, 9.0];
/// KV per GPU so that all prefixes together need about 70% of the cluster's KV.
const HOT_KV: u64 = 46_000;

struct HotReq {
    at: f64,
    prefix: usize,
    user: u64,
    reply: u64,
}

fn hot_trace(rate: f64) -> Vec<HotReq> {
    let mut rng = fastrand::Rng::with_seed(SEED ^ 0x407);
    let exp = |mean: f64, rng: &mut fastrand::Rng| -mean * (1.0 - rng.f64()).ln();
    // Zipf(1.0): prefix k drawn with weight 1 / (k + 1).
    let weights: Vec<f64> = (0..HOT_PREFIXES).map(|k| 1.0 / (k + 1) as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut t = 0.0;
    (0..HOT_REQUESTS)
        .map(|_| {
            t += exp(1.0 / rate, &mut rng);
            let mut x = rng.f64() * total;
            let prefix = weights
                .iter()
                .position(|w| {
                    x -= w;
                    x < 0.0
                })
                .unwrap_or(HOT_PREFIXES - 1);
            HotReq {
                at: t,
                prefix,
                user: rng.u64(50..=300),
                reply: rng.u64(50..=250),
            }
        })
        .collect()
}

enum Workload<'a> {
    /// Multi-turn chats; `consistent_hash` keys on the session.
    Chats(&'a [Session]),
    /// Independent requests on hot prefixes; `consistent_hash` keys on the prefix (`prefix:1`).
    Hot(&'a [HotReq]),
}

/// The block chain `prefix_cache` would compute: `shared` tokens of content `id` (stable), then
/// the rest unique to request `uid`.
fn chain(id: u64, shared: u64, prompt: u64, uid: u64) -> Vec<u64> {
    (0..(prompt / BLOCK_TOKENS).min(MAX_BLOCKS))
        .map(|i| {
            if (i + 1) * BLOCK_TOKENS <= shared {
                mix64(mix64(id) ^ i)
            } else {
                mix64(mix64(uid ^ 0xdead_beef) ^ i)
            }
        })
        .collect()
}

fn run(strategy: Strategy, work: &Workload<'_>) -> Outcome {
    fastrand::seed(SEED);
    let ids: Vec<u64> = (0..BACKENDS)
        .map(|i| llmproxy::worker::balance::hash_bytes(format!("http://gpu-{i}:8000").as_bytes()))
        .collect();
    let (sessions, hot, kv): (&[Session], &[HotReq], u64) = match work {
        Workload::Chats(s) => (s, &[], KV_CAPACITY),
        Workload::Hot(h) => (&[], h, HOT_KV),
    };
    // The index remembers about as many blocks as the GPU's KV holds.
    let params = Params::default().prefix_cache((kv / BLOCK_TOKENS) as usize, 8.0);
    let balancer = Balancer::with(strategy, vec![1; BACKENDS], ids, params);
    let view = LoadView::new(0, 1, BACKENDS);
    let engine = EngineView::new(BACKENDS, Duration::from_secs(2));
    let base = Instant::now();
    let at = |t: f64| base + Duration::from_secs_f64(t);

    let mut sim = Sim {
        sessions,
        gpus: (0..BACKENDS).map(|_| Gpu::new(kv)).collect(),
        reqs: Vec::new(),
        events: BinaryHeap::new(),
        seq: 0,
        op: vec![None; BACKENDS],
        ttft: Vec::new(),
        prompt_tokens: 0,
        cached_tokens: 0,
        served: [0; BACKENDS],
        remaining: sessions.iter().map(|s| s.turns.len()).sum::<usize>() + hot.len(),
    };
    for (s, sess) in sessions.iter().enumerate() {
        sim.push(
            sess.start,
            Ev::Arrive {
                session: s,
                turn: 0,
            },
        );
    }
    for (i, h) in hot.iter().enumerate() {
        sim.push(h.at, Ev::One { req: i });
    }
    sim.push(0.0, Ev::Scrape);
    while let Some(Reverse((t, _, ev))) = sim.events.pop() {
        let now = t as f64 / 1e9;
        let req = match ev {
            Ev::Arrive { session, turn } => {
                let prompt = sim.prompt_of(session, turn);
                Req {
                    session,
                    turn,
                    cache_id: session as u64,
                    shared: false,
                    reusable: prompt,
                    prompt,
                    output: sessions[session].turns[turn].reply,
                    generated: 0,
                    arrival: now,
                }
            }
            Ev::One { req } => {
                let h = &hot[req];
                Req {
                    session: req,
                    turn: 0,
                    cache_id: 1 << 40 | h.prefix as u64,
                    shared: true,
                    reusable: HOT_PREFIX_TOKENS,
                    prompt: HOT_PREFIX_TOKENS + h.user,
                    output: h.reply,
                    generated: 0,
                    arrival: now,
                }
            }
            Ev::GpuDone { backend } => {
                for (s, turn) in sim.gpu_done(backend, now, &view) {
                    let think = sessions[s].turns[turn].think;
                    sim.push(now + think, Ev::Arrive { session: s, turn });
                }
                sim.kick(backend, now);
                continue;
            }
            Ev::Scrape => {
                for (b, g) in sim.gpus.iter().enumerate() {
                    let load = EngineLoad {
                        waiting: g.waiting.len() as f64,
                        running: g.running.len() as f64,
                        kv_usage: Some(g.active as f64 / g.kv as f64),
                    };
                    engine.set(b, Reading { load, at: at(now) });
                }
                if sim.remaining > 0 {
                    sim.push(now + SCRAPE, Ev::Scrape);
                }
                continue;
            }
        };
        let uid = sim.reqs.len() as u64;
        let blocks = chain(req.cache_id, req.reusable, req.prompt, uid);
        let input = Inputs {
            view: &view,
            engine: Some(&engine),
            key: Some(mix64(req.cache_id)),
            blocks: &blocks,
            now: at(now),
        };
        let Some(pick) = balancer.choose(&input, |_| true) else {
            continue;
        };
        let b = pick.backend;
        balancer.learn(b, &blocks);
        view.add_own(b, 1);
        sim.served[b] += 1;
        sim.reqs.push(req);
        let r = sim.reqs.len() - 1;
        sim.gpus[b].waiting.push_back(r);
        sim.kick(b, now);
    }
    let mut ttft = std::mem::take(&mut sim.ttft);
    ttft.sort_by(f64::total_cmp);
    let p99 = ttft[((ttft.len() as f64 * 0.99) as usize).min(ttft.len() - 1)];
    Outcome {
        mean_ttft: ttft.iter().sum::<f64>() / ttft.len() as f64,
        p99_ttft: p99,
        hit_rate: sim.cached_tokens as f64 / sim.prompt_tokens as f64,
        shares: sim.served,
        requests: ttft.len(),
    }
}

const STRATEGIES: [Strategy; 6] = [
    Strategy::RoundRobin,
    Strategy::LeastConnections,
    Strategy::PowerOfTwo,
    Strategy::LeastLoad,
    Strategy::ConsistentHash,
    Strategy::PrefixCache,
];

fn main() {
    let started = Instant::now();
    println!("routing_sim: {BACKENDS} GPUs, seed {SEED:#x}\n");
    println!(
        "Multi-turn chats ({SESSIONS} sessions; consistent_hash keys on the session header, \
         prefix_cache sees only the prompt):\n"
    );
    header("load");
    for rate in SESSION_RATES {
        let sessions = trace(rate);
        let turns: usize = sessions.iter().map(|s| s.turns.len()).sum();
        table(
            &format!("{rate} chats/s"),
            &Workload::Chats(&sessions),
            turns,
        );
    }
    println!(
        "\nHot prefixes ({HOT_PREFIXES} system prompts of {HOT_PREFIX_TOKENS} tokens, Zipf(1.0), \
         {HOT_REQUESTS} requests, no session; KV {HOT_KV} tokens per GPU; consistent_hash keys \
         on the system prompt, prefix:1):\n"
    );
    header("load");
    for rate in HOT_RATES {
        let reqs = hot_trace(rate);
        table(&format!("{rate} req/s"), &Workload::Hot(&reqs), reqs.len());
    }
    slots::tables();
    println!("\n(simulated in {:.1?})", started.elapsed());
}

fn header(load: &str) {
    println!(
        "| {load} | strategy | mean TTFT (ms) | p99 TTFT (ms) | prefix cache hit rate | requests per GPU |"
    );
    println!("|---|---|---:|---:|---:|---|");
}

fn table(load: &str, work: &Workload<'_>, expected: usize) {
    for strategy in STRATEGIES {
        let o = run(strategy, work);
        assert_eq!(o.requests, expected, "every request is served");
        println!(
            "| {load} | {} | {:.0} | {:.0} | {:.1}% | {:?} |",
            strategy.as_str(),
            o.mean_ttft * 1000.0,
            o.p99_ttft * 1000.0,
            o.hit_rate * 100.0,
            o.shares
        );
    }
}

/// The llama.cpp slot model (`benches/prefix_llama.sh` as a simulation).
#[path = "routing_sim/slots.rs"]
mod slots;
