//! A small mutation fuzzer that runs on stable Rust, with no instrumentation.
//!
//! Each target replays its committed corpus (`fuzz/corpus/<target>/`), then mutates inputs drawn
//! from a growing pool (byte flips, dictionary tokens, splices of two inputs, interesting numbers)
//! for a time budget. Without coverage feedback, the pool grows on *behaviour*: a target returns
//! a feature hash describing what an input did (which error, which framing, how many events), and
//! an input with a new feature joins the pool.
//!
//! A property violation is a panic: the input is written to `fuzz/artifacts/<target>/` and the test
//! fails naming that file (copy it into the corpus to keep it as a regression input). A watchdog
//! aborts the process if one input runs longer than `FUZZ_HANG_SECONDS` (default 10), after saving
//! the input the same way. Checks must be deterministic in their input: anything random a check
//! needs (where to split a stream) comes from `Rng::for_input`, so an artifact replays exactly.
//!
//! Knobs: `FUZZ_SECONDS` (per target; default 2), `FUZZ_SEED` (a number, or `clock` for a new
//! one each run). The default seed is fixed so that `cargo test` and CI fail only on a change in
//! the code, never by chance; hunting for new bugs is `FUZZ_SEED=clock FUZZ_SECONDS=600`.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use fastrand::Rng;

/// One fuzz target: what it checks and the vocabulary its mutations use.
pub struct Target {
    pub name: &'static str,
    /// Tokens worth inserting (keywords, delimiters, framing).
    pub dict: &'static [&'static [u8]],
    /// Inputs longer than this are truncated.
    pub max_len: usize,
    /// Panics when a property fails; returns a hash of what the input did.
    pub check: fn(&[u8]) -> u64,
}

/// Largest pool of inputs kept in memory.
const POOL_MAX: usize = 4096;

const INTERESTING_NUMBERS: &[&[u8]] = &[
    b"0",
    b"1",
    b"-1",
    b"255",
    b"65535",
    b"65536",
    b"4294967295",
    b"4294967296",
    b"9223372036854775807",
    b"18446744073709551615",
    b"18446744073709551616",
    b"ffffffffffffffff",
    b"fffffffffffffffff",
    b"1e999",
    b"0x10",
    b"00000000000000000000001",
];

/// The seed when `FUZZ_SEED` is not set: any fixed value will do.
const DEFAULT_SEED: u64 = 0x5eed_11a9;

pub fn run(target: &Target) {
    let seconds: f64 = env_or("FUZZ_SECONDS", 2.0);
    let hang = Duration::from_secs_f64(env_or("FUZZ_HANG_SECONDS", 10.0));
    let seed: u64 = match std::env::var("FUZZ_SEED") {
        Ok(v) if v.trim() == "clock" => clock_seed(),
        _ => env_or("FUZZ_SEED", DEFAULT_SEED),
    };
    let mut rng = Rng::with_seed(seed);
    let watchdog = Watchdog::start(target.name, hang);

    let corpus = load_corpus(target.name);
    assert!(
        !corpus.is_empty(),
        "{}: empty corpus in {}",
        target.name,
        corpus_dir(target.name).display()
    );
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut seen: HashSet<u64> = HashSet::new();
    for input in &corpus {
        let feature = execute(target, &watchdog, input, seed);
        seen.insert(feature);
        pool.push(input.clone());
    }

    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut execs = 0u64;
    while Instant::now() < deadline {
        let base = &pool[rng.usize(..pool.len())];
        let other = &pool[rng.usize(..pool.len())];
        let mut input = base.clone();
        for _ in 0..=rng.usize(..4) {
            mutate(&mut input, other, target.dict, &mut rng);
        }
        input.truncate(target.max_len);
        let feature = execute(target, &watchdog, &input, seed);
        execs += 1;
        if seen.insert(feature) && pool.len() < POOL_MAX {
            pool.push(input);
        }
    }
    watchdog.stop();
    eprintln!(
        "fuzz {}: seed {seed}, {} corpus inputs, {execs} mutated inputs in {seconds}s, \
         {} behaviours, pool {}",
        target.name,
        corpus.len(),
        seen.len(),
        pool.len()
    );
}

/// Runs one input under the watchdog; a panic saves the input and fails the test.
fn execute(target: &Target, watchdog: &Watchdog, input: &[u8], seed: u64) -> u64 {
    watchdog.begin(input);
    let result = catch_unwind(AssertUnwindSafe(|| (target.check)(input)));
    watchdog.end();
    match result {
        Ok(feature) => feature,
        Err(_) => {
            let path = save_artifact(target.name, "crash", input);
            panic!(
                "fuzz {}: property failed (see the panic above) on input {:?}\n\
                 saved to {} (seed {seed}); replay it by copying it into fuzz/corpus/{}/",
                target.name,
                String::from_utf8_lossy(&input[..input.len().min(2000)]),
                path.display(),
                target.name
            );
        }
    }
}

fn mutate(input: &mut Vec<u8>, other: &[u8], dict: &[&[u8]], rng: &mut Rng) {
    let pos = |rng: &mut Rng, len: usize| rng.usize(..=len);
    match rng.u8(..10) {
        0 if !input.is_empty() => {
            let i = rng.usize(..input.len());
            input[i] ^= 1 << rng.u8(..8);
        }
        1 if !input.is_empty() => {
            let i = rng.usize(..input.len());
            input[i] = *pick(
                rng,
                &[
                    0u8, 0xff, b'\r', b'\n', b' ', b'\t', b':', b',', b'"', b'0', b'a', 0x80,
                ],
            );
        }
        2 | 3 if !dict.is_empty() => {
            let at = pos(rng, input.len());
            let token = *pick(rng, dict);
            input.splice(at..at, token.iter().copied());
        }
        4 if !input.is_empty() => {
            let start = rng.usize(..input.len());
            let end = (start + 1 + rng.usize(..16)).min(input.len());
            input.drain(start..end);
        }
        5 if !input.is_empty() => {
            // Repeat a slice: long lines, many headers, many events.
            let start = rng.usize(..input.len());
            let end = (start + 1 + rng.usize(..64)).min(input.len());
            let piece = input[start..end].to_vec();
            let at = pos(rng, input.len());
            for _ in 0..=rng.usize(..8) {
                input.splice(at..at, piece.iter().copied());
            }
        }
        6 if !other.is_empty() => {
            // Cross-over: the front of this input with the back of another.
            let cut = pos(rng, input.len());
            let from = rng.usize(..other.len());
            input.truncate(cut);
            input.extend_from_slice(&other[from..]);
        }
        7 => {
            // Replace a run of digits (or insert) with an interesting number.
            let number = *pick(rng, INTERESTING_NUMBERS);
            match input.iter().position(|b| b.is_ascii_digit()) {
                Some(start) if rng.bool() => {
                    let end = input[start..]
                        .iter()
                        .position(|b| !b.is_ascii_hexdigit())
                        .map_or(input.len(), |n| start + n);
                    input.splice(start..end, number.iter().copied());
                }
                _ => {
                    let at = pos(rng, input.len());
                    input.splice(at..at, number.iter().copied());
                }
            }
        }
        8 if !input.is_empty() => {
            let cut = rng.usize(..input.len());
            input.truncate(cut);
        }
        _ => {
            let at = pos(rng, input.len());
            input.insert(at, rng.u8(..));
        }
    }
}

fn pick<'a, T>(rng: &mut Rng, items: &'a [T]) -> &'a T {
    &items[rng.usize(..items.len())]
}

/// Deterministic randomness derived from the input, for checks (so a saved input replays).
pub fn rng_for(input: &[u8]) -> Rng {
    Rng::with_seed(fnv(input))
}

/// Cut points for feeding `len` bytes in pieces: sometimes byte by byte, usually a few random
/// cuts. Always sorted, within `1..len`.
pub fn cuts(len: usize, rng: &mut Rng) -> Vec<usize> {
    if len < 2 {
        return Vec::new();
    }
    if len <= 512 && rng.u8(..4) == 0 {
        return (1..len).collect();
    }
    let mut v: Vec<usize> = (0..rng.usize(1..8)).map(|_| rng.usize(1..len)).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// `input` split at `cuts`.
pub fn pieces<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for &c in cuts {
        out.push(&input[start..c]);
        start = c;
    }
    out.push(&input[start..]);
    out
}

pub fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A feature hash from anything debug-printable.
pub fn feature(what: impl std::fmt::Debug) -> u64 {
    fnv(format!("{what:?}").as_bytes())
}

fn corpus_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name)
}

fn load_corpus(name: &str) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(corpus_dir(name)) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    files
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

fn save_artifact(name: &str, kind: &str, input: &[u8]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/artifacts")
        .join(name);
    let path = dir.join(format!("{kind}-{:016x}", fnv(input)));
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(&path, input);
    path
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn clock_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// Aborts the process when one input runs too long (a hang cannot be caught like a panic).
struct Watchdog {
    /// Milliseconds since `epoch` when the current input started; 0 when idle.
    started: Arc<AtomicU64>,
    current: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    epoch: Instant,
}

impl Watchdog {
    fn start(name: &'static str, limit: Duration) -> Watchdog {
        let w = Watchdog {
            started: Arc::new(AtomicU64::new(0)),
            current: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
            epoch: Instant::now(),
        };
        let (started, current, stop, epoch) = (
            w.started.clone(),
            w.current.clone(),
            w.stop.clone(),
            w.epoch,
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let at = started.load(Ordering::Relaxed);
                let now = epoch.elapsed().as_millis() as u64;
                if at != 0 && now.saturating_sub(at) > limit.as_millis() as u64 {
                    let input = current.lock().map(|i| i.clone()).unwrap_or_default();
                    let path = save_artifact(name, "hang", &input);
                    eprintln!(
                        "fuzz {name}: one input ran for more than {limit:?}: saved to {}",
                        path.display()
                    );
                    std::process::abort();
                }
            }
        });
        w
    }

    fn begin(&self, input: &[u8]) {
        if let Ok(mut cur) = self.current.lock() {
            cur.clear();
            cur.extend_from_slice(input);
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        self.started.store(now.max(1), Ordering::Relaxed);
    }

    fn end(&self) {
        self.started.store(0, Ordering::Relaxed);
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
