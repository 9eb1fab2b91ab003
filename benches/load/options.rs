//! Command line and environment of the benchmark: which workloads and targets, how long, where
//! the binaries are. It only reads and validates; it must never start anything. Every option is
//! also an environment variable because `cargo bench` makes passing arguments awkward.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::targets::TargetKind;
use crate::workload::{seconds, workload, Workload};

pub(crate) const HELP: &str = "\
load benchmark: llmproxy vs nginx vs HAProxy vs direct (see BENCHMARKS.md)

  cargo build --release && cargo bench --bench load [-- OPTIONS]

Options (each also settable by the environment variable in brackets):
  --secs S          measured seconds per run             [LOAD_SECS, default 10]
  --warmup S        unmeasured seconds before each run   [LOAD_WARMUP_SECS, default 1]
  --workloads LIST  w1,w2,w3 and the opt-ins w4 (10,000 streams at 1 token/s), w5
                    (w2 with each stream written by the mock at once) and w6 (w2's streams
                    at a fixed rate, LOAD_W6_RATE requests/s, default 3000: open loop)
                                                         [LOAD_WORKLOADS, default w1,w2,w3]
  --targets LIST    direct,llmproxy,llmproxy-log,llmproxy-hook,nginx,haproxy,llmproxy-2w,
                    llmproxy-epoll,llmproxy-tls
                    (llmproxy-hook: usage events delivered to a webhook receiver in this process,
                    through a spool, as README's first snippet configures it)
                    and the opt-in llmproxy-keys, llmproxy-redis (the clients' key rate-limited,
                    ratelimit.store local / redis; the latter starts a redis-server) and
                    llmproxy-base (llmproxy's configuration on the binary LOAD_BASE_BIN),
                    llmproxy-noinject (usage.inject_include_usage: false: the backend is not
                    asked for usage, so what exact billing costs shows against llmproxy),
                    nginx-ids (nginx adding the X-Forwarded-For and X-Request-Id headers llmproxy adds)
                                                         [LOAD_TARGETS, default all but opt-ins]
  --startup-runs N  timed starts for the startup figure  [LOAD_STARTUP_RUNS, default 5; 0 = skip]
  --rounds N        run every workload's targets N times in turn; each round gets its table,
                    then a table of the medians, on which the targets are judged, and llmproxy's
                    CPU per request against the cheaper C proxy round by round
                                                         [LOAD_ROUNDS, default 1]
  --out PATH        also write the report (Markdown)     [LOAD_OUT]
  --keep-tmp        keep configs and logs                [LOAD_KEEP_TMP=1]
  --perf DIR        record `perf record -e cpu-clock -g` of each proxy during its window into
                    DIR/perf-<workload>-<target>.data (figures of those runs include perf's cost);
                    each round's table is followed by where the CPU went, in µs per request, by
                    the operation the samples ran under (send, recv, io_uring, epoll, user space)
                                                         [LOAD_PERF]
  --perf-stat       with --perf: count instead of sample (`perf stat`: io_uring submissions,
                    completions, polls armed, task work runs, system calls) into
                    DIR/perf-stat-<workload>-<target>.txt; the notes give them per request
                                                         [LOAD_PERF_STAT=1]
Environment only:
  LLMPROXY_BIN      llmproxy binary (default $CARGO_TARGET_DIR/release/llmproxy, then
                    target/release/llmproxy in the crate)
  LOAD_NGINX        nginx binary (default: `nginx` on PATH or /usr/sbin/nginx; `off` skips nginx)
  LOAD_BASE_BIN     the llmproxy-base target's binary (an older build, to compare in one run)
  LOAD_BASE_HOOK=1  llmproxy-base runs llmproxy-hook's configuration instead of llmproxy's
  LOAD_HAPROXY      haproxy binary (default: `haproxy` on PATH or /usr/sbin/haproxy; `off` skips it)
  LOAD_W1_CONNS=64 LOAD_W2_CONNS=64 LOAD_W3_STREAMS=256 LOAD_W4_STREAMS=10000 LOAD_W5_CONNS=64
  LOAD_W6_CONNS=64 LOAD_W6_RATE=3000
  LOAD_CLIENT_HEADERS  `six` (default: Host, User-Agent, Accept, Authorization, Content-Type,
                    Content-Length) or `sdk` (the seventeen the OpenAI Python SDK sends: eleven
                    more, Accept-Encoding, Connection and the X-Stainless-* set)
  LOAD_CLIENT_USAGE `none` (default) or `running`: streams ask for usage themselves
                    (stream_options include_usage and continuous_usage_stats), so that every
                    target's backend sends the same chunks llmproxy asks for on its own
  LOAD_TOKENS       tokens a generation for every workload but w4 (default 16, up to 4096):
                    a longer one shows the cost per token apart from the cost per request;
                    the targets are only judged at 16
  LOAD_W3_SECS      W3's shortest window, used when longer than LOAD_SECS (default 30: its TTFT
                    p99 needs the samples; 0 = LOAD_SECS)
";

pub(crate) struct Options {
    pub(crate) bin: PathBuf,
    pub(crate) base_bin: Option<PathBuf>,
    /// `LOAD_BASE_HOOK`: the base binary runs with the usage hook (against `llmproxy-hook`).
    pub(crate) base_hook: bool,
    pub(crate) nginx: Option<PathBuf>,
    pub(crate) haproxy: Option<PathBuf>,
    pub(crate) secs: f64,
    pub(crate) warmup: f64,
    pub(crate) workloads: Vec<Workload>,
    pub(crate) targets: Vec<TargetKind>,
    pub(crate) startup_runs: usize,
    /// Rounds per workload (every target once per round, in turn).
    pub(crate) rounds: usize,
    pub(crate) out: Option<PathBuf>,
    pub(crate) keep_tmp: bool,
    pub(crate) perf: Option<PathBuf>,
    /// `perf stat` counts instead of `perf record` samples.
    pub(crate) perf_stat: bool,
    /// `LOAD_CLIENT_HEADERS=sdk`: requests carry the OpenAI Python SDK's headers.
    pub(crate) sdk_headers: bool,
    /// `LOAD_CLIENT_USAGE=running`: streams ask for usage themselves, running usage included.
    pub(crate) client_usage: bool,
}

impl Options {
    pub(crate) fn parse() -> Result<Options, String> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let mut secs = env("LOAD_SECS").unwrap_or_else(|| "10".into());
        let mut warmup = env("LOAD_WARMUP_SECS").unwrap_or_else(|| "1".into());
        let mut workloads = env("LOAD_WORKLOADS").unwrap_or_else(|| "w1,w2,w3".into());
        let mut targets = env("LOAD_TARGETS").unwrap_or_else(|| {
            "direct,llmproxy,llmproxy-log,llmproxy-hook,nginx,haproxy,llmproxy-2w,llmproxy-epoll"
                .into()
        });
        let mut startup = env("LOAD_STARTUP_RUNS").unwrap_or_else(|| "5".into());
        let mut rounds = env("LOAD_ROUNDS").unwrap_or_else(|| "1".into());
        let mut out = env("LOAD_OUT").map(PathBuf::from);
        let mut keep_tmp = env("LOAD_KEEP_TMP").is_some_and(|v| v != "0");
        let mut perf = env("LOAD_PERF").map(PathBuf::from);
        let mut perf_stat = env("LOAD_PERF_STAT").is_some_and(|v| v != "0");

        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .ok_or_else(|| format!("{name} needs a value\n\n{HELP}"))
            };
            match arg.as_str() {
                // cargo bench passes --bench to harness = false benchmarks.
                "--bench" => {}
                "-h" | "--help" => {
                    print!("{HELP}");
                    std::process::exit(0);
                }
                "--secs" => secs = value("--secs")?,
                "--warmup" => warmup = value("--warmup")?,
                "--workloads" => workloads = value("--workloads")?,
                "--targets" => targets = value("--targets")?,
                "--startup-runs" => startup = value("--startup-runs")?,
                "--rounds" => rounds = value("--rounds")?,
                "--out" => out = Some(PathBuf::from(value("--out")?)),
                "--keep-tmp" => keep_tmp = true,
                "--perf" => perf = Some(PathBuf::from(value("--perf")?)),
                "--perf-stat" => perf_stat = true,
                other => return Err(format!("unknown argument {other:?}\n\n{HELP}")),
            }
        }
        let secs = seconds("LOAD_SECS", &secs, 0.5)?;
        let warmup = seconds("LOAD_WARMUP_SECS", &warmup, 0.0)?;
        let workloads = workloads
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(workload)
            .collect::<Result<Vec<_>, _>>()?;
        let mut chosen = Vec::new();
        for t in targets.split(',').filter(|s| !s.trim().is_empty()) {
            let kind = TargetKind::parse(t).ok_or_else(|| {
                format!("unknown target {t:?} (direct, llmproxy, llmproxy-log, nginx, haproxy, llmproxy-2w, llmproxy-epoll, llmproxy-tls, llmproxy-keys, llmproxy-redis, llmproxy-base, nginx-ids)")
            })?;
            if !chosen.contains(&kind) {
                chosen.push(kind);
            }
        }
        // Always in the same order: direct first (the baseline the others are compared with).
        let targets: Vec<TargetKind> = TargetKind::ALL
            .into_iter()
            .filter(|k| chosen.contains(k))
            .collect();
        let startup_runs = startup
            .trim()
            .parse()
            .map_err(|_| format!("LOAD_STARTUP_RUNS: {startup:?} is not a number"))?;
        let sdk_headers = switch("LOAD_CLIENT_HEADERS", ("six", "sdk"))?;
        let client_usage = switch("LOAD_CLIENT_USAGE", ("none", "running"))?;
        let rounds = match rounds.trim().parse::<usize>() {
            Ok(n) if (1..=20).contains(&n) => n,
            _ => {
                return Err(format!(
                    "LOAD_ROUNDS: {rounds:?} must be a number in 1..=20"
                ))
            }
        };
        Ok(Options {
            bin: find_llmproxy()?,
            base_bin: std::env::var_os("LOAD_BASE_BIN").map(PathBuf::from),
            base_hook: env("LOAD_BASE_HOOK").is_some_and(|v| v != "0"),
            nginx: find_program("LOAD_NGINX", "nginx"),
            haproxy: find_program("LOAD_HAPROXY", "haproxy"),
            secs,
            warmup,
            workloads,
            targets,
            startup_runs,
            rounds,
            out,
            keep_tmp,
            perf,
            perf_stat,
            sdk_headers,
            client_usage,
        })
    }
}

pub(crate) fn find_llmproxy() -> Result<PathBuf, String> {
    pub(crate) const BUILD_FIRST: &str = "this benchmark builds nothing: run `cargo build --release` first \
                               (with the same CARGO_TARGET_DIR), or point LLMPROXY_BIN at the binary";
    if let Some(p) = std::env::var_os("LLMPROXY_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "LLMPROXY_BIN={} does not exist; {BUILD_FIRST}",
                p.display()
            ))
        };
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        let dir = if dir.is_absolute() {
            dir
        } else {
            manifest.join(dir)
        };
        candidates.push(dir.join("release/llmproxy"));
    }
    candidates.push(manifest.join("target/release/llmproxy"));
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    Err(format!(
        "llmproxy binary not found (looked at {}); {BUILD_FIRST}",
        looked.join(", ")
    ))
}

/// A comparison proxy: `$var` if set (`off` or `0`: none), else `name` on PATH or in /usr/sbin
/// (where Debian puts nginx and haproxy, often not on a user's PATH).
pub(crate) fn find_program(var: &str, name: &str) -> Option<PathBuf> {
    match std::env::var(var) {
        Ok(v) if v.eq_ignore_ascii_case("off") || v == "0" => return None,
        Ok(v) if !v.trim().is_empty() => return Some(PathBuf::from(v)),
        _ => {}
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Newest modification time of any file under `dir` (to warn about a stale binary).
pub(crate) fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest: Option<SystemTime> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry.metadata().ok().and_then(|m| m.modified().ok())
        };
        newest = newest.max(t);
    }
    newest
}

/// An environment variable that takes one of two words: false for the first (or unset), true
/// for the second.
fn switch(name: &str, (off, on): (&str, &str)) -> Result<bool, String> {
    let value = std::env::var(name).ok();
    match value.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(false),
        Some(v) if v == off => Ok(false),
        Some(v) if v == on => Ok(true),
        Some(other) => Err(format!("{name}: {other:?} must be `{off}` or `{on}`")),
    }
}
