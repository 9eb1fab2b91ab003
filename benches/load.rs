//! Load benchmark (issue 6): llmproxy against nginx and a direct connection, in the same run, on
//! loopback. Results and method: BENCHMARKS.md.
//!
//! ```sh
//! cargo build --release && cargo bench --bench load
//! LOAD_SECS=5 LOAD_WORKLOADS=w1,w3 cargo bench --bench load
//! cargo bench --bench load -- --help
//! ```
//!
//! It builds nothing: it runs the release binary (`LLMPROXY_BIN`, else
//! `$CARGO_TARGET_DIR/release/llmproxy`, else `target/release/llmproxy` under the crate). Layout on
//! the two CPUs: the proxy under test on CPU 0 (`--cpus 0` and `taskset -c 0`; nginx with one
//! worker and `worker_cpu_affinity`), the mock backend (`llmproxy mock-backend`, `taskset -c 1`)
//! and this process's load generator (one monoio thread) on CPU 1. Each run is bounded (warm-up +
//! `LOAD_SECS`), every process started here is stopped by its PID when its guard drops (also on a
//! panic or Ctrl-C), and with `PR_SET_PDEATHSIG` if this process is killed outright.
//!
//! Per run it reports completed requests per second, latency p50/p99/p99.9 (request written →
//! last body byte), for streams the time to the first token and the gaps between tokens, errors,
//! and the proxy's CPU seconds (utime+stime of all its threads and processes, /proc/PID/stat) and
//! memory (VmRSS at the end of the window, VmHWM) — hence CPU µs per request. It also reports how
//! busy CPU 0 and CPU 1 were with processes that are not part of the run (other builds on a shared
//! machine), which says how far to trust a figure.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use memchr::memmem;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};

const HELP: &str = "\
load benchmark: llmproxy vs nginx vs direct (see BENCHMARKS.md)

  cargo build --release && cargo bench --bench load [-- OPTIONS]

Options (each also settable by the environment variable in brackets):
  --secs S          measured seconds per run             [LOAD_SECS, default 10]
  --warmup S        unmeasured seconds before each run   [LOAD_WARMUP_SECS, default 1]
  --workloads LIST  w1,w2,w3 and the opt-in w4 (10,000 streams at 1 token/s)
                                                         [LOAD_WORKLOADS, default w1,w2,w3]
  --targets LIST    direct,llmproxy,llmproxy-log,nginx,llmproxy-2w,llmproxy-epoll
                                                         [LOAD_TARGETS, default all of them]
  --startup-runs N  timed starts for the startup figure  [LOAD_STARTUP_RUNS, default 5; 0 = skip]
  --out PATH        also write the report (Markdown)     [LOAD_OUT]
  --keep-tmp        keep configs and logs                [LOAD_KEEP_TMP=1]
  --perf DIR        record `perf record -e cpu-clock -g` of each proxy during its window into
                    DIR/perf-<workload>-<target>.data (figures of those runs include perf's cost)
                                                         [LOAD_PERF]
Environment only:
  LLMPROXY_BIN      llmproxy binary (default $CARGO_TARGET_DIR/release/llmproxy, then
                    target/release/llmproxy in the crate)
  LOAD_NGINX        nginx binary (default: `nginx` on PATH or /usr/sbin/nginx; `off` skips nginx)
  LOAD_W1_CONNS=64 LOAD_W2_CONNS=64 LOAD_W3_STREAMS=256 LOAD_W4_STREAMS=10000
";

/// The SSE bytes that mark one content token in an OpenAI chat stream (the mock's tokens are
/// `tok0 `, `tok1 `, ...; the role chunk carries `"content":""` and does not match).
const TOKEN_MARK: &[u8] = br#""content":"tok"#;
/// Tokens per generation (the mock's completion length for every workload but w4).
const TOKENS: u32 = 16;

macro_rules! outln {
    ($out:expr) => {{ $out.push('\n'); }};
    ($out:expr, $($arg:tt)*) => {{ let _ = writeln!($out, $($arg)*); }};
}

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TargetKind {
    Direct,
    Llmproxy,
    LlmproxyLog,
    Nginx,
    Llmproxy2w,
    /// llmproxy with `io_driver: epoll`: what io_uring is worth, in the same run.
    LlmproxyEpoll,
}

impl TargetKind {
    const ALL: [TargetKind; 6] = [
        TargetKind::Direct,
        TargetKind::Llmproxy,
        TargetKind::LlmproxyLog,
        TargetKind::Nginx,
        TargetKind::Llmproxy2w,
        TargetKind::LlmproxyEpoll,
    ];

    fn name(self) -> &'static str {
        match self {
            TargetKind::Direct => "direct",
            TargetKind::Llmproxy => "llmproxy",
            TargetKind::LlmproxyLog => "llmproxy+log",
            TargetKind::Nginx => "nginx",
            TargetKind::Llmproxy2w => "llmproxy-2w",
            TargetKind::LlmproxyEpoll => "llmproxy-epoll",
        }
    }

    fn parse(s: &str) -> Option<TargetKind> {
        match s.trim().to_ascii_lowercase().as_str() {
            "direct" => Some(TargetKind::Direct),
            "llmproxy" => Some(TargetKind::Llmproxy),
            "llmproxy-log" | "llmproxy+log" => Some(TargetKind::LlmproxyLog),
            "nginx" => Some(TargetKind::Nginx),
            "llmproxy-2w" | "llmproxy2w" => Some(TargetKind::Llmproxy2w),
            "llmproxy-epoll" => Some(TargetKind::LlmproxyEpoll),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
struct Workload {
    id: &'static str,
    title: String,
    conns: usize,
    stream: bool,
    /// Completion tokens per request (`max_tokens`).
    tokens: u32,
    token_delay_ms: u64,
    /// A request not finished within this is an error (None: streams meant to outlive the run).
    timeout: Option<Duration>,
    /// Connections are opened spread over this time, before the warm-up.
    ramp: Duration,
}

fn env_usize(name: &str, default: usize) -> Result<usize, String> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

fn workload(id: &str) -> Result<Workload, String> {
    Ok(match id.trim().to_ascii_lowercase().as_str() {
        "w1" => {
            let conns = env_usize("LOAD_W1_CONNS", 64)?;
            Workload {
                id: "w1",
                title: format!("W1 non-streaming chat, {conns} connections"),
                conns,
                stream: false,
                tokens: TOKENS,
                token_delay_ms: 0,
                timeout: Some(Duration::from_secs(5)),
                ramp: Duration::ZERO,
            }
        }
        "w2" => {
            let conns = env_usize("LOAD_W2_CONNS", 64)?;
            Workload {
                id: "w2",
                title: format!(
                    "W2 streaming chat, {TOKENS} tokens at 0 ms/token, {conns} connections"
                ),
                conns,
                stream: true,
                tokens: TOKENS,
                token_delay_ms: 0,
                timeout: Some(Duration::from_secs(5)),
                ramp: Duration::ZERO,
            }
        }
        "w3" => {
            let conns = env_usize("LOAD_W3_STREAMS", 256)?;
            Workload {
                id: "w3",
                title: format!("W3 {conns} concurrent streams, {TOKENS} tokens at 20 ms/token"),
                conns,
                stream: true,
                tokens: TOKENS,
                token_delay_ms: 20,
                timeout: Some(Duration::from_secs(5)),
                ramp: Duration::ZERO,
            }
        }
        "w4" => {
            let conns = env_usize("LOAD_W4_STREAMS", 10_000)?;
            Workload {
                id: "w4",
                title: format!("W4 {conns} concurrent idle-ish streams, 1 token/s"),
                conns,
                stream: true,
                // Longer than any run: every stream stays open for the whole window.
                tokens: 100_000,
                token_delay_ms: 1000,
                timeout: None,
                ramp: Duration::from_secs(3),
            }
        }
        other => return Err(format!("unknown workload {other:?} (w1, w2, w3, w4)")),
    })
}

struct Options {
    bin: PathBuf,
    nginx: Option<PathBuf>,
    secs: f64,
    warmup: f64,
    workloads: Vec<Workload>,
    targets: Vec<TargetKind>,
    startup_runs: usize,
    out: Option<PathBuf>,
    keep_tmp: bool,
    perf: Option<PathBuf>,
}

impl Options {
    fn parse() -> Result<Options, String> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let mut secs = env("LOAD_SECS").unwrap_or_else(|| "10".into());
        let mut warmup = env("LOAD_WARMUP_SECS").unwrap_or_else(|| "1".into());
        let mut workloads = env("LOAD_WORKLOADS").unwrap_or_else(|| "w1,w2,w3".into());
        let mut targets = env("LOAD_TARGETS").unwrap_or_else(|| {
            "direct,llmproxy,llmproxy-log,nginx,llmproxy-2w,llmproxy-epoll".into()
        });
        let mut startup = env("LOAD_STARTUP_RUNS").unwrap_or_else(|| "5".into());
        let mut out = env("LOAD_OUT").map(PathBuf::from);
        let mut keep_tmp = env("LOAD_KEEP_TMP").is_some_and(|v| v != "0");
        let mut perf = env("LOAD_PERF").map(PathBuf::from);

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
                "--out" => out = Some(PathBuf::from(value("--out")?)),
                "--keep-tmp" => keep_tmp = true,
                "--perf" => perf = Some(PathBuf::from(value("--perf")?)),
                other => return Err(format!("unknown argument {other:?}\n\n{HELP}")),
            }
        }
        let seconds = |name: &str, v: &str, min: f64| -> Result<f64, String> {
            match v.trim().parse::<f64>() {
                Ok(s) if s >= min && s <= 3600.0 => Ok(s),
                _ => Err(format!(
                    "{name}: {v:?} must be a number of seconds in {min}..=3600"
                )),
            }
        };
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
                format!("unknown target {t:?} (direct, llmproxy, llmproxy-log, nginx, llmproxy-2w, llmproxy-epoll)")
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
        Ok(Options {
            bin: find_llmproxy()?,
            nginx: find_nginx(),
            secs,
            warmup,
            workloads,
            targets,
            startup_runs,
            out,
            keep_tmp,
            perf,
        })
    }
}

fn find_llmproxy() -> Result<PathBuf, String> {
    const BUILD_FIRST: &str = "this benchmark builds nothing: run `cargo build --release` first \
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

fn find_nginx() -> Option<PathBuf> {
    match std::env::var("LOAD_NGINX") {
        Ok(v) if v.eq_ignore_ascii_case("off") || v == "0" => return None,
        Ok(v) if !v.trim().is_empty() => return Some(PathBuf::from(v)),
        _ => {}
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

/// Newest modification time of any file under `dir` (to warn about a stale binary).
fn newest_mtime(dir: &Path) -> Option<SystemTime> {
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

// ---------------------------------------------------------------------------------------------
// Processes: guards, /proc sampling
// ---------------------------------------------------------------------------------------------

/// A process started by this benchmark; stopped by its PID when dropped (SIGTERM, then SIGKILL
/// after 3 s). `extra` are PIDs it started itself (nginx workers), killed by PID if still there.
struct Proc {
    name: String,
    child: Child,
    extra: Vec<i32>,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command) -> Result<Proc, String> {
        // SAFETY: the closure runs in the forked child before exec and only makes one
        // async-signal-safe system call. PR_SET_PDEATHSIG survives the exec of taskset and of the
        // program it starts, so the child dies with this process even if it is SIGKILLed.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            extra: Vec::new(),
        })
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(i32::MAX)
    }

    fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.pid();
        if !self.has_exited() {
            // SAFETY: plain kill(2) on the PID of our own, not yet reaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while !self.has_exited() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !self.has_exited() {
                eprintln!(
                    "  {} (pid {pid}) ignored SIGTERM for 3 s: SIGKILL",
                    self.name
                );
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        for &w in &self.extra {
            // Only if that PID still is the same program (a recycled PID is left alone).
            if proc_comm(w).is_some_and(|c| self.name.starts_with(c.trim())) {
                // SAFETY: kill(2) on a PID we checked still runs the program we started.
                unsafe { libc::kill(w, libc::SIGKILL) };
            }
        }
    }
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Fields of /proc/PID/stat after the command name: [0] = state, [1] = ppid, [11] = utime,
/// [12] = stime (clock ticks, all threads of the process).
fn proc_stat_fields(pid: i32) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(
        rest.split_whitespace()
            .map(|f| f.parse::<u64>().unwrap_or(0))
            .collect(),
    )
}

fn proc_comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()
}

fn cpu_secs(pid: i32) -> f64 {
    proc_stat_fields(pid)
        .filter(|f| f.len() > 12)
        .map(|f| (f[11] + f[12]) as f64 / clk_tck())
        .unwrap_or(0.0)
}

/// `VmRSS` / `VmHWM` etc. from /proc/PID/status, in KiB.
fn status_kib(pid: i32, key: &str) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn children_of(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| {
            proc_stat_fields(p)
                .is_some_and(|f| f.len() > 1 && f[1] == u64::try_from(pid).unwrap_or(0))
        })
        .collect()
}

#[derive(Clone, Copy, Default, Debug)]
struct Usage {
    cpu: f64,
    rss_kib: u64,
    hwm_kib: u64,
    /// Proportional set size (shared pages split between the processes sharing them): the fair
    /// sum over nginx's master and worker.
    pss_kib: u64,
}

/// CPU seconds and memory summed over processes (nginx: master + worker).
fn usage(pids: &[i32]) -> Usage {
    let mut u = Usage::default();
    for &p in pids {
        u.cpu += cpu_secs(p);
        u.rss_kib += status_kib(p, "VmRSS");
        u.hwm_kib += status_kib(p, "VmHWM");
        u.pss_kib += pss_kib(p);
    }
    u
}

/// Busy and steal ticks of CPU 0 and CPU 1 from /proc/stat.
#[derive(Clone, Copy, Default)]
struct CpuTicks {
    busy: [u64; 2],
    steal: [u64; 2],
}

/// Context switches (voluntary + involuntary) of every thread of a process.
fn switches(pid: i32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .map(|t| {
            let status = t.path().join("status");
            let text = std::fs::read_to_string(status).unwrap_or_default();
            text.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// TCP segments sent, from /proc/net/snmp (this network namespace; loopback traffic of the
/// run dominates it).
fn tcp_out_segs() -> u64 {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut rows = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "OutSegs")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Everything read from /proc at the start and at the end of a window.
struct Sample {
    segments: u64,
    proxy: Usage,
    load: Usage,
    ticks: CpuTicks,
    proxy_switches: u64,
    load_switches: u64,
}

impl Sample {
    fn take(proxy: &[i32], load: &[i32]) -> Sample {
        Sample {
            segments: tcp_out_segs(),
            proxy: usage(proxy),
            load: Usage {
                cpu: load.iter().map(|&p| cpu_secs(p)).sum(),
                ..Usage::default()
            },
            ticks: cpu_ticks(),
            proxy_switches: proxy.iter().map(|&p| switches(p)).sum(),
            load_switches: load.iter().map(|&p| switches(p)).sum(),
        }
    }
}

fn cpu_ticks() -> CpuTicks {
    let mut t = CpuTicks::default();
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return t;
    };
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let cpu = match it.next() {
            Some("cpu0") => 0,
            Some("cpu1") => 1,
            _ => continue,
        };
        let v: Vec<u64> = it.map(|f| f.parse().unwrap_or(0)).collect();
        // user nice system idle iowait irq softirq steal ...
        if v.len() >= 8 {
            t.busy[cpu] = v[0] + v[1] + v[2] + v[5] + v[6];
            t.steal[cpu] = v[7];
        }
    }
    t
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Raise the open-file limit as far as allowed (children inherit it): w4 needs ~20,000 sockets
/// in the proxy and 10,000 here.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        let want = lim.rlim_max.max(65_536);
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: want,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return want;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        lim.rlim_cur
    }
}

/// The CPUs this process may run on (it needs 0 and 1).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills a zeroed, correctly sized cpu_set_t.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    fn new(keep: bool) -> Result<TempDir, String> {
        let path = std::env::temp_dir().join(format!("llmproxy-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(TempDir { path, keep })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("configs and logs kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Starting the mock, llmproxy, nginx
// ---------------------------------------------------------------------------------------------

struct Ctx {
    /// The open-files limit every child inherits.
    nofile: u64,
    bin: PathBuf,
    nginx: Option<PathBuf>,
    tmp: PathBuf,
    stop: Arc<AtomicBool>,
}

struct Mock {
    proc: Proc,
    addr: SocketAddr,
}

fn start_mock(ctx: &Ctx, wl: &Workload) -> Result<Mock, String> {
    let log = ctx.tmp.join(format!("mock-{}.log", wl.id));
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1"])
        .arg(&ctx.bin)
        .args(["mock-backend", "--port", "0", "--ttft-ms", "0"])
        .args(["--token-delay-ms", &wl.token_delay_ms.to_string()])
        .args(["--tokens", &wl.tokens.to_string()])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&log).map_err(|e| e.to_string())?);
    let mut proc = Proc::spawn("llmproxy mock-backend", cmd)?;
    let stdout = proc.child.stdout.take().ok_or("mock stdout missing")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        // Keep draining until the mock exits.
        for _ in lines {}
    });
    let line = rx.recv_timeout(Duration::from_secs(10)).map_err(|_| {
        format!(
            "mock backend did not report its address within 10 s: {}",
            tail(&log, 5)
        )
    })?;
    let addr = line
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("unexpected mock output {line:?}"))?;
    Ok(Mock { proc, addr })
}

/// A target ready to take load.
struct Running {
    addr: SocketAddr,
    /// None for `direct`.
    proc: Option<Proc>,
    /// The processes whose CPU and memory are the proxy's (nginx: master and worker).
    pids: Vec<i32>,
    /// From just before spawning to the first proxied 200.
    ready_after: Duration,
    log: Option<PathBuf>,
}

fn chat_body(stream: bool, tokens: u32) -> String {
    format!(
        r#"{{"model":"mock-model","messages":[{{"role":"system","content":"You are a helpful assistant."}},{{"role":"user","content":"Write a short poem about load balancers."}}],"max_tokens":{tokens},"temperature":0.7{}}}"#,
        if stream { r#","stream":true"# } else { "" }
    )
}

/// The request every client sends (an OpenAI SDK-like set of headers, with an API key so the
/// proxy's key hashing runs too).
fn chat_request(addr: SocketAddr, stream: bool, tokens: u32) -> Bytes {
    let body = chat_body(stream, tokens);
    let accept = if stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    Bytes::from(format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: llmproxy-load/1\r\n\
         Accept: {accept}\r\nAuthorization: Bearer sk-bench-0123456789abcdef\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ))
}

fn start_target(
    ctx: &Ctx,
    kind: TargetKind,
    mock: SocketAddr,
    tag: &str,
    conns: usize,
) -> Result<Running, String> {
    match kind {
        TargetKind::Direct => Ok(Running {
            addr: mock,
            proc: None,
            pids: Vec::new(),
            ready_after: Duration::ZERO,
            log: None,
        }),
        TargetKind::Llmproxy => start_llmproxy(ctx, mock, false, "0", "auto", tag, conns),
        TargetKind::LlmproxyLog => start_llmproxy(ctx, mock, true, "0", "auto", tag, conns),
        TargetKind::Llmproxy2w => start_llmproxy(ctx, mock, false, "0,1", "auto", tag, conns),
        TargetKind::LlmproxyEpoll => start_llmproxy(ctx, mock, false, "0", "epoll", tag, conns),
        TargetKind::Nginx => start_nginx(ctx, mock, tag, conns),
    }
}

fn start_llmproxy(
    ctx: &Ctx,
    mock: SocketAddr,
    access_log: bool,
    cpus: &str,
    io_driver: &str,
    tag: &str,
    conns: usize,
) -> Result<Running, String> {
    let port = free_port()?;
    let pool = conns.max(64);
    let config = ctx.tmp.join(format!("llmproxy-{tag}.yaml"));
    // Everything at its default except: the address, no drain on stop, an idle upstream pool of
    // one connection per client connection (the default 64 is below w3/w4's concurrency; nginx
    // gets the same `keepalive`), and the access log per configuration.
    // Usage extraction, include_usage injection and metrics are on (their defaults).
    let yaml = format!(
        "listen: \"127.0.0.1:{port}\"\n\
         shutdown_grace: 0s\n\
         io_driver: {io_driver}\n\
         backends:\n  - url: \"http://{mock}\"\n\
         pool:\n  max_idle_per_backend: {pool}\n\
         usage:\n  inject_include_usage: true\n\
         logging:\n  level: info\n  format: json\n  access_log: {access_log}\n"
    );
    std::fs::write(&config, yaml).map_err(|e| e.to_string())?;
    // The access log goes to stderr, redirected to a file (a real file, not /dev/null, so its
    // cost is the cost of a production log).
    let log = ctx.tmp.join(format!("llmproxy-{tag}.log"));
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", cpus])
        .arg(&ctx.bin)
        .arg("--config")
        .arg(&config)
        .args(["--cpus", cpus])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).map_err(|e| e.to_string())?);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    let mut proc = Proc::spawn("llmproxy", cmd)?;
    let ready_after = wait_ready(addr, &mut proc, started, &log)?;
    Ok(Running {
        addr,
        pids: vec![proc.pid()],
        proc: Some(proc),
        ready_after,
        log: Some(log),
    })
}

fn start_nginx(ctx: &Ctx, mock: SocketAddr, tag: &str, conns: usize) -> Result<Running, String> {
    let nginx = ctx.nginx.as_ref().ok_or("nginx is not installed")?;
    let port = free_port()?;
    let prefix = ctx.tmp.join(format!("nginx-{tag}"));
    std::fs::create_dir_all(&prefix).map_err(|e| e.to_string())?;
    let p = prefix.display();
    // Enough for every client and upstream connection, and no more: nginx allocates and touches
    // its connection table at startup, so a needlessly large one would inflate its RSS.
    // (With 2 × conns + 128, nginx ran out at 9,500 streams: "worker_connections are not
    // enough, reusing connections".)
    let nofile = ctx.nofile;
    // Idle upstream connections kept, as for llmproxy: one per client connection.
    let pool = conns.max(64);
    let worker_connections = (2 * conns + 1024).min(usize::try_from(nofile).unwrap_or(usize::MAX));
    // A plain reverse proxy: one worker pinned to CPU 0, upstream keep-alive, HTTP/1.1 upstream,
    // no response buffering, no logs; keep-alive request limits lifted on both sides (nginx's
    // default of 1000 requests per connection would make the clients reconnect, llmproxy has
    // no such limit).
    let conf = format!(
        "daemon off;\n\
         master_process on;\n\
         worker_processes 1;\n\
         worker_cpu_affinity 01;\n\
         worker_rlimit_nofile {nofile};\n\
         pid {p}/nginx.pid;\n\
         error_log {p}/error.log warn;\n\
         events {{\n    worker_connections {worker_connections};\n}}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   client_body_temp_path {p}/client_body;\n\
         \x20   proxy_temp_path {p}/proxy;\n\
         \x20   fastcgi_temp_path {p}/fastcgi;\n\
         \x20   uwsgi_temp_path {p}/uwsgi;\n\
         \x20   scgi_temp_path {p}/scgi;\n\
         \x20   keepalive_timeout 75s;\n\
         \x20   keepalive_requests 1000000000;\n\
         \x20   upstream backend {{\n\
         \x20       server {mock};\n\
         \x20       keepalive {pool};\n\
         \x20       keepalive_requests 1000000000;\n\
         \x20       keepalive_timeout 60s;\n\
         \x20   }}\n\
         \x20   server {{\n\
         \x20       listen 127.0.0.1:{port} backlog=4096;\n\
         \x20       location / {{\n\
         \x20           proxy_pass http://backend;\n\
         \x20           proxy_http_version 1.1;\n\
         \x20           proxy_set_header Connection \"\";\n\
         \x20           proxy_buffering off;\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n"
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
    let log = File::create(prefix.join("stderr.log")).map_err(|e| e.to_string())?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"])
        .arg(nginx)
        .arg("-p")
        .arg(format!("{p}/"))
        .arg("-e")
        .arg(prefix.join("error.log"))
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    let mut proc = Proc::spawn("nginx", cmd)?;
    let ready_after = wait_ready(addr, &mut proc, started, &prefix.join("error.log"))?;
    let master = proc.pid();
    let deadline = Instant::now() + Duration::from_secs(5);
    let workers = loop {
        let w = children_of(master);
        if !w.is_empty() || Instant::now() > deadline {
            break w;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if workers.is_empty() {
        return Err("nginx: no worker process found".into());
    }
    proc.extra = workers.clone();
    let mut pids = vec![master];
    pids.extend(workers);
    Ok(Running {
        addr,
        proc: Some(proc),
        pids,
        ready_after,
        log: Some(prefix.join("error.log")),
    })
}

/// Poll with a real proxied request (non-streaming chat) until it answers 200.
fn wait_ready(
    addr: SocketAddr,
    proc: &mut Proc,
    started: Instant,
    log: &Path,
) -> Result<Duration, String> {
    // The same request as W1's, answered at once whatever the workload's token delay (the
    // mock's per-request knob; proxies forward the header).
    let w1 = chat_request(addr, false, TOKENS);
    let split = memmem::find(&w1, b"\r\n").unwrap_or(0) + 2;
    let mut req = w1[..split].to_vec();
    req.extend_from_slice(b"x-mock-token-delay-ms: 0\r\n");
    req.extend_from_slice(&w1[split..]);
    let deadline = started + Duration::from_secs(10);
    let mut last: String;
    loop {
        match blocking_request(addr, &req, Duration::from_secs(2)) {
            Ok((200, _)) => return Ok(started.elapsed()),
            Ok((status, body)) => {
                last = format!("status {status}: {}", String::from_utf8_lossy(&body))
            }
            Err(e) => last = e.to_string(),
        }
        if proc.has_exited() {
            return Err(format!(
                "{} exited during startup; log:\n{}",
                proc.name,
                tail(log, 10)
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} not ready within 10 s ({last}); log:\n{}",
                proc.name,
                tail(log, 10)
            ));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// One request on a fresh blocking connection; returns the status and the (de-chunked) body.
fn blocking_request(addr: SocketAddr, req: &[u8], timeout: Duration) -> io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    s.write_all(req)?;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16384];
    let mut fill = |buf: &mut Vec<u8>| -> io::Result<()> {
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
        Ok(())
    };
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let head = loop {
        match parse_head(&buf) {
            Ok(Some(h)) => break h,
            Ok(None) => fill(&mut buf)?,
            Err(_) => return Err(bad("malformed response head")),
        }
    };
    let mut pos = head.len;
    let mut body = Vec::new();
    match head.body {
        BodyKind::None => {}
        BodyKind::Length(n) => {
            while buf.len() - pos < n {
                fill(&mut buf)?;
            }
            body.extend_from_slice(&buf[pos..pos + n]);
        }
        BodyKind::Chunked => {
            let mut dec = Chunked::default();
            loop {
                pos += dec
                    .feed(&buf[pos..], &mut |d| body.extend_from_slice(d))
                    .map_err(|_| bad("malformed chunked body"))?;
                if dec.done() {
                    break;
                }
                fill(&mut buf)?;
            }
        }
        BodyKind::UntilClose => {
            while fill(&mut buf).is_ok() {}
            body.extend_from_slice(&buf[pos..]);
        }
    }
    Ok((head.status, body))
}

fn get(addr: SocketAddr, path: &str) -> io::Result<(u16, Vec<u8>)> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    blocking_request(addr, req.as_bytes(), Duration::from_secs(5))
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 response parsing (shared by the probe and the load generator)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

#[derive(Debug)]
struct Head {
    len: usize,
    status: u16,
    body: BodyKind,
    close: bool,
}

fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn parse_head(b: &[u8]) -> Result<Option<Head>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(b) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if b.len() > 64 * 1024 => return Err(Failure::Protocol),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Failure::Protocol),
    };
    let status = resp.code.unwrap_or(0);
    let mut close = resp.version == Some(0);
    let mut length = None;
    let mut chunked = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_none() {
                return Err(Failure::Protocol);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = has_token(h.value, "chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            if has_token(h.value, "close") {
                close = true;
            } else if has_token(h.value, "keep-alive") {
                close = false;
            }
        }
    }
    let body = if status < 200 || status == 204 || status == 304 {
        BodyKind::None
    } else if chunked {
        BodyKind::Chunked
    } else if let Some(n) = length {
        BodyKind::Length(n)
    } else {
        close = true;
        BodyKind::UntilClose
    };
    Ok(Some(Head {
        len,
        status,
        body,
        close,
    }))
}

#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(usize),
    Crlf,
    Trailer,
    Done,
}

/// Incremental `Transfer-Encoding: chunked` decoder: body bytes are handed out as soon as they
/// arrive, not per complete chunk.
#[derive(Default)]
struct Chunked {
    state: ChunkState,
}

impl Chunked {
    fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consume what it can of `input`, passing body bytes to `on_data`; returns bytes consumed.
    fn feed(&mut self, input: &[u8], on_data: &mut impl FnMut(&[u8])) -> Result<usize, Failure> {
        let mut i = 0;
        loop {
            let rest = &input[i..];
            match self.state {
                ChunkState::Size => {
                    let Some(nl) = memchr::memchr(b'\n', rest) else {
                        return if rest.len() > 1024 {
                            Err(Failure::Protocol)
                        } else {
                            Ok(i)
                        };
                    };
                    let line = rest[..nl].strip_suffix(b"\r").unwrap_or(&rest[..nl]);
                    let hex = line
                        .split(|&b| b == b';')
                        .next()
                        .unwrap_or(b"")
                        .trim_ascii();
                    let size = std::str::from_utf8(hex)
                        .ok()
                        .and_then(|h| usize::from_str_radix(h, 16).ok())
                        .ok_or(Failure::Protocol)?;
                    i += nl + 1;
                    self.state = if size == 0 {
                        ChunkState::Trailer
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    let take = left.min(rest.len());
                    if take == 0 {
                        return Ok(i);
                    }
                    on_data(&rest[..take]);
                    i += take;
                    self.state = if take == left {
                        ChunkState::Crlf
                    } else {
                        ChunkState::Data(left - take)
                    };
                }
                ChunkState::Crlf => {
                    if rest.len() < 2 {
                        return Ok(i);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(Failure::Protocol);
                    }
                    i += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailer => {
                    let Some(nl) = memchr::memchr(b'\n', rest) else {
                        return Ok(i);
                    };
                    let empty = nl == 0 || (nl == 1 && rest[0] == b'\r');
                    i += nl + 1;
                    if empty {
                        self.state = ChunkState::Done;
                    }
                }
                ChunkState::Done => return Ok(i),
            }
        }
    }
}

/// Counts `TOKEN_MARK` in a byte stream delivered in pieces (a mark may straddle two pieces).
#[derive(Default)]
struct TokenMatcher {
    tail: [u8; 16],
    tail_len: usize,
}

impl TokenMatcher {
    fn count(&mut self, finder: &memmem::Finder<'_>, data: &[u8]) -> u32 {
        let k = TOKEN_MARK.len() - 1;
        let mut n = 0u32;
        if self.tail_len > 0 {
            let mut joint = [0u8; 32];
            let head = data.len().min(k);
            joint[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
            joint[self.tail_len..self.tail_len + head].copy_from_slice(&data[..head]);
            let joint = &joint[..self.tail_len + head];
            // Marks starting in the tail end in `data` (the tail is shorter than a mark).
            n += finder
                .find_iter(joint)
                .filter(|&at| at < self.tail_len)
                .count() as u32;
        }
        n += finder.find_iter(data).count() as u32;
        if data.len() >= k {
            self.tail[..k].copy_from_slice(&data[data.len() - k..]);
            self.tail_len = k;
        } else {
            let mut joint = [0u8; 32];
            joint[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
            joint[self.tail_len..self.tail_len + data.len()].copy_from_slice(data);
            let total = self.tail_len + data.len();
            let keep = total.min(k);
            self.tail[..keep].copy_from_slice(&joint[total - keep..total]);
            self.tail_len = keep;
        }
        n
    }
}

// ---------------------------------------------------------------------------------------------
// Load generator (monoio, one thread on CPU 1, closed loop over keep-alive connections)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Connect,
    Io,
    Closed,
    Status(u16),
    Protocol,
    Short,
    Timeout,
}

const FAILURE_KINDS: [&str; 7] = [
    "connect", "io", "closed", "status", "protocol", "short", "timeout",
];

impl Failure {
    fn index(self) -> usize {
        match self {
            Failure::Connect => 0,
            Failure::Io => 1,
            Failure::Closed => 2,
            Failure::Status(_) => 3,
            Failure::Protocol => 4,
            Failure::Short => 5,
            Failure::Timeout => 6,
        }
    }
}

struct Spec {
    addr: SocketAddr,
    conns: usize,
    request: Bytes,
    stream: bool,
    tokens: u32,
    record_gaps: bool,
    timeout: Option<Duration>,
    ramp: Duration,
    t0: Instant,
    t1: Instant,
    finder: memmem::Finder<'static>,
    stop: Arc<AtomicBool>,
}

impl Spec {
    fn in_window(&self, t: Instant) -> bool {
        t >= self.t0 && t < self.t1
    }
}

/// What the clients saw; samples only for events inside the measurement window.
#[derive(Default)]
struct Acc {
    ok: u64,
    lat_us: Vec<u32>,
    ttft_us: Vec<u32>,
    gap_us: Vec<u32>,
    errors: [u64; 7],
    warmup_errors: u64,
    first_error: Option<String>,
    tokens: u64,
    reconnects: u64,
    /// Streams that have had their first token and are still open.
    streaming: i64,
    streaming_at_end: i64,
    connections: i64,
    connections_at_end: i64,
    uring: bool,
    /// Client tasks still running 3 s after the window (their sockets may leak; should be 0).
    clients_left: usize,
}

impl Acc {
    fn fail(&mut self, spec: &Spec, f: Failure, at: Instant) {
        if spec.in_window(at) {
            self.errors[f.index()] += 1;
        } else if at < spec.t0 {
            self.warmup_errors += 1;
        } else {
            return;
        }
        if self.first_error.is_none() {
            self.first_error = Some(match f {
                Failure::Status(s) => format!("status {s}"),
                other => FAILURE_KINDS[other.index()].to_string(),
            });
        }
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

struct Conn {
    stream: monoio::net::TcpStream,
    buf: Vec<u8>,
    pos: usize,
    acc: Rc<RefCell<Acc>>,
}

impl Conn {
    async fn open(addr: SocketAddr, acc: &Rc<RefCell<Acc>>) -> io::Result<Conn> {
        let stream = monoio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        acc.borrow_mut().connections += 1;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(32 * 1024),
            pos: 0,
            acc: acc.clone(),
        })
    }

    /// Read more bytes after `buf[..len]`.
    async fn fill(&mut self) -> Result<(), Failure> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0 && self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(32 * 1024);
        }
        let buf = std::mem::take(&mut self.buf);
        let len = buf.len();
        let (res, slice) = self.stream.read(buf.slice_mut(len..)).await;
        self.buf = slice.into_inner();
        match res {
            Ok(0) => Err(Failure::Closed),
            Ok(_) => Ok(()),
            Err(_) => Err(Failure::Io),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Ok(mut acc) = self.acc.try_borrow_mut() {
            acc.connections -= 1;
        }
    }
}

/// Counts a stream as open from its first token until it ends (or is dropped).
struct StreamGauge<'a> {
    acc: &'a RefCell<Acc>,
    on: bool,
}

impl StreamGauge<'_> {
    fn start(&mut self) {
        if !self.on {
            self.on = true;
            self.acc.borrow_mut().streaming += 1;
        }
    }
}

impl Drop for StreamGauge<'_> {
    fn drop(&mut self) {
        if self.on {
            if let Ok(mut acc) = self.acc.try_borrow_mut() {
                acc.streaming -= 1;
            }
        }
    }
}

/// One request/response on `c`; Ok(true) when the connection may be reused.
async fn exchange(
    c: &mut Conn,
    spec: &Spec,
    acc: &RefCell<Acc>,
    start: Instant,
) -> Result<bool, Failure> {
    let (res, _) = c.stream.write_all(spec.request.clone()).await;
    res.map_err(|_| Failure::Io)?;
    let head = loop {
        if let Some(h) = parse_head(&c.buf[c.pos..])? {
            break h;
        }
        c.fill().await?;
    };
    c.pos += head.len;
    if head.status != 200 {
        return Err(Failure::Status(head.status));
    }
    let mut tokens = 0u32;
    let mut first: Option<Instant> = None;
    let mut last = start;
    let mut gauge = StreamGauge { acc, on: false };
    match head.body {
        BodyKind::None => {}
        BodyKind::Length(n) => {
            while c.buf.len() - c.pos < n {
                c.fill().await?;
            }
            c.pos += n;
        }
        BodyKind::Chunked => {
            let mut dec = Chunked::default();
            let mut matcher = TokenMatcher::default();
            loop {
                let now = Instant::now();
                let mut found = 0u32;
                let used = dec.feed(&c.buf[c.pos..], &mut |d| {
                    if spec.stream {
                        found += matcher.count(&spec.finder, d);
                    }
                })?;
                c.pos += used;
                if found > 0 {
                    if first.is_none() {
                        first = Some(now);
                        gauge.start();
                    }
                    let mut a = acc.borrow_mut();
                    if spec.in_window(now) {
                        a.tokens += u64::from(found);
                        if spec.record_gaps {
                            let previous = if tokens == 0 { None } else { Some(last) };
                            if let Some(prev) = previous {
                                a.gap_us.push(micros(now - prev));
                            }
                            for _ in 1..found {
                                a.gap_us.push(0);
                            }
                        }
                    }
                    tokens += found;
                    last = now;
                }
                if dec.done() {
                    break;
                }
                c.fill().await?;
            }
        }
        BodyKind::UntilClose => {
            while c.fill().await.is_ok() {}
            c.pos = c.buf.len();
        }
    }
    let end = Instant::now();
    if spec.stream && tokens != spec.tokens {
        return Err(Failure::Short);
    }
    if spec.in_window(end) {
        let mut a = acc.borrow_mut();
        a.ok += 1;
        a.lat_us.push(micros(end - start));
        if let Some(f) = first {
            a.ttft_us.push(micros(f - start));
        }
    }
    Ok(!head.close && head.body != BodyKind::UntilClose)
}

/// Counts the client tasks still running (they end by themselves at the end of the window).
struct Live(Rc<std::cell::Cell<usize>>);

impl Live {
    fn new(count: &Rc<std::cell::Cell<usize>>) -> Live {
        count.set(count.get() + 1);
        Live(count.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// One client: a keep-alive connection, one request at a time, until the end of the window. Every
/// wait is bounded by the end of the window, so the task ends then and closes its connection
/// (dropping the runtime instead would leave sockets open and the backend streaming into them).
async fn client(idx: usize, spec: Rc<Spec>, acc: Rc<RefCell<Acc>>, live: Live) {
    let _live = live;
    if !spec.ramp.is_zero() {
        monoio::time::sleep(spec.ramp.mul_f64(idx as f64 / spec.conns as f64)).await;
    }
    let mut conn: Option<Conn> = None;
    loop {
        let now = Instant::now();
        if now >= spec.t1 {
            break;
        }
        let mut c = match conn.take() {
            Some(c) => c,
            None => match monoio::time::timeout(spec.t1 - now, Conn::open(spec.addr, &acc)).await {
                Err(_) => break,
                Ok(Ok(c)) => c,
                Ok(Err(_)) => {
                    acc.borrow_mut()
                        .fail(&spec, Failure::Connect, Instant::now());
                    monoio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let start = Instant::now();
        let left = spec.t1.saturating_duration_since(start);
        let (limit, at_deadline) = match spec.timeout {
            Some(limit) if limit < left => (limit, false),
            _ => (left, true),
        };
        let result = match monoio::time::timeout(limit, exchange(&mut c, &spec, &acc, start)).await
        {
            Ok(result) => result,
            Err(_) if at_deadline => break,
            Err(_) => Err(Failure::Timeout),
        };
        match result {
            Ok(true) => conn = Some(c),
            Ok(false) => acc.borrow_mut().reconnects += 1,
            Err(f) => {
                acc.borrow_mut().fail(&spec, f, Instant::now());
                // The connection is dropped; a failing target is not hammered in a tight loop.
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

fn spawn_load(spec: Spec) -> std::thread::JoinHandle<Result<Acc, String>> {
    std::thread::Builder::new()
        .name("loadgen".into())
        .spawn(move || {
            let _ = monoio::utils::bind_to_cpu_set([1]);
            let entries = u32::try_from((spec.conns * 2).next_power_of_two())
                .unwrap_or(32768)
                .clamp(1024, 32768);
            let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .with_entries(entries)
                .enable_timer()
                .build()
                .map_err(|e| format!("load generator runtime: {e}"))?;
            let expected = (spec.t1 - spec.t0).as_secs_f64();
            let acc = Rc::new(RefCell::new(Acc {
                lat_us: Vec::with_capacity((expected * 60_000.0) as usize),
                ..Acc::default()
            }));
            let spec = Rc::new(spec);
            let live = Rc::new(std::cell::Cell::new(0usize));
            let result = rt.block_on(async {
                acc.borrow_mut().uring = !monoio::utils::is_legacy();
                for i in 0..spec.conns {
                    monoio::spawn(client(i, spec.clone(), acc.clone(), Live::new(&live)));
                }
                // Wake just before the end of the window to see how many streams are open
                // (the clients stop at its end).
                let snapshot = spec.t1 - (spec.t1 - spec.t0).min(Duration::from_millis(20));
                loop {
                    let now = Instant::now();
                    if now >= snapshot || spec.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    monoio::time::sleep((snapshot - now).min(Duration::from_millis(50))).await;
                }
                let mut result = {
                    let mut a = acc.borrow_mut();
                    a.streaming_at_end = a.streaming;
                    a.connections_at_end = a.connections;
                    std::mem::take(&mut *a)
                };
                // Let the clients see the deadline and close their connections.
                let give_up = Instant::now() + Duration::from_secs(3);
                while live.get() > 0 && Instant::now() < give_up {
                    monoio::time::sleep(Duration::from_millis(5)).await;
                }
                result.clients_left = live.get();
                result
            });
            drop(rt);
            Ok(result)
        })
        .expect("spawn load generator thread")
}

// ---------------------------------------------------------------------------------------------
// One run: a target under one workload
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct RunResult {
    target: String,
    failed: Option<String>,
    secs: f64,
    ok: u64,
    lat: [Option<f64>; 3],
    ttft: [Option<f64>; 3],
    gap: [Option<f64>; 3],
    errors: u64,
    error_note: String,
    proxy: Option<(Usage, Usage)>,
    load_cpu: f64,
    other_cpu: f64,
    steal: f64,
    tokens: u64,
    streaming_at_end: i64,
    connections_at_end: i64,
    note: String,
    /// CPU time of the mock backend and the load generator per completed request.
    load_us_per_req: Option<f64>,
    /// Context switches per completed request: (proxy, load side).
    switches: Option<(f64, f64)>,
    /// TCP segments sent (all hops) per completed request.
    segments: Option<f64>,
}

impl RunResult {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.secs
    }

    fn proxy_cpu(&self) -> Option<f64> {
        self.proxy.map(|(a, b)| b.cpu - a.cpu)
    }

    fn cpu_pct(&self) -> Option<f64> {
        self.proxy_cpu().map(|c| 100.0 * c / self.secs)
    }

    fn cpu_us_per_req(&self) -> Option<f64> {
        self.proxy_cpu()
            .filter(|_| self.ok > 0)
            .map(|c| c * 1e6 / self.ok as f64)
    }

    fn pss_mb(&self) -> Option<f64> {
        self.proxy.map(|(_, b)| b.pss_kib as f64 / 1024.0)
    }

    fn rss_mb(&self) -> Option<f64> {
        self.proxy.map(|(_, b)| b.rss_kib as f64 / 1024.0)
    }

    fn hwm_mb(&self) -> Option<f64> {
        self.proxy.map(|(_, b)| b.hwm_kib as f64 / 1024.0)
    }
}

/// Nearest-rank percentiles p50, p99, p99.9 in milliseconds.
fn percentiles(samples: &mut [u32]) -> [Option<f64>; 3] {
    samples.sort_unstable();
    let at = |p: f64| -> Option<f64> {
        if samples.is_empty() {
            return None;
        }
        let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
        Some(f64::from(samples[rank.clamp(1, samples.len()) - 1]) / 1000.0)
    };
    [at(50.0), at(99.0), at(99.9)]
}

fn sleep_until(t: Instant, stop: &AtomicBool) -> Result<(), String> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err("interrupted".into());
        }
        let now = Instant::now();
        if now >= t {
            return Ok(());
        }
        std::thread::sleep((t - now).min(Duration::from_millis(50)));
    }
}

fn run_target(
    ctx: &Ctx,
    opts: &Options,
    wl: &Workload,
    kind: TargetKind,
    mock: &Mock,
) -> Result<RunResult, String> {
    let tag = format!("{}-{}", wl.id, kind.name().replace('+', "-"));
    let conns_before = mock_stat(mock.addr, "connections");
    let mut running = start_target(ctx, kind, mock.addr, &tag, wl.conns)?;
    let self_pid = i32::try_from(std::process::id()).unwrap_or(0);
    let warmup = Duration::from_secs_f64(opts.warmup);
    let t0 = Instant::now() + wl.ramp + warmup;
    let t1 = t0 + Duration::from_secs_f64(opts.secs);
    let spec = Spec {
        addr: running.addr,
        conns: wl.conns,
        request: chat_request(running.addr, wl.stream, wl.tokens),
        stream: wl.stream,
        tokens: wl.tokens,
        record_gaps: wl.token_delay_ms > 0,
        timeout: wl.timeout,
        ramp: wl.ramp,
        t0,
        t1,
        finder: memmem::Finder::new(TOKEN_MARK),
        stop: ctx.stop.clone(),
    };
    let load = spawn_load(spec);
    let load_pids = [mock.proc.pid(), self_pid];
    let window = sleep_until(t0, &ctx.stop).map(|()| Sample::take(&running.pids, &load_pids));
    let mut perf = match (&opts.perf, window.is_ok() && !running.pids.is_empty()) {
        (Some(dir), true) => start_perf(dir, &tag, &running.pids, opts.secs),
        _ => None,
    };
    let end = window.and_then(|start| {
        sleep_until(t1, &ctx.stop)?;
        Ok((start, Sample::take(&running.pids, &load_pids)))
    });
    let acc = load
        .join()
        .map_err(|_| "load generator panicked".to_string())??;
    if let Some(p) = perf.as_mut() {
        // perf stops by itself after the window; give it time to write its file.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !p.has_exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(perf);
    let (s0, s1) = end?;
    let secs = (t1 - t0).as_secs_f64();
    let mut acc = acc;

    let mut r = RunResult {
        target: kind.name().to_string(),
        secs,
        ok: acc.ok,
        lat: percentiles(&mut acc.lat_us),
        ttft: percentiles(&mut acc.ttft_us),
        gap: percentiles(&mut acc.gap_us),
        errors: acc.errors.iter().sum(),
        tokens: acc.tokens,
        streaming_at_end: acc.streaming_at_end,
        connections_at_end: acc.connections_at_end,
        ..RunResult::default()
    };
    if let Some(max) = acc.gap_us.last() {
        r.gap[2] = Some(f64::from(*max) / 1000.0);
    }
    let tick = clk_tck();
    let load_cpu = s1.load.cpu - s0.load.cpu;
    let proxy_cpu = s1.proxy.cpu - s0.proxy.cpu;
    let busy: u64 = (0..2).map(|i| s1.ticks.busy[i] - s0.ticks.busy[i]).sum();
    let steal: u64 = (0..2).map(|i| s1.ticks.steal[i] - s0.ticks.steal[i]).sum();
    r.load_cpu = 100.0 * load_cpu / secs;
    r.other_cpu = (100.0 * (busy as f64 / tick - load_cpu - proxy_cpu) / secs).max(0.0);
    r.steal = 100.0 * steal as f64 / tick / secs;
    r.load_us_per_req = (r.ok > 0).then(|| load_cpu * 1e6 / r.ok as f64);
    r.segments = (r.ok > 0).then(|| s1.segments.saturating_sub(s0.segments) as f64 / r.ok as f64);
    r.switches = (r.ok > 0).then(|| {
        let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / r.ok as f64;
        (
            per(s0.proxy_switches, s1.proxy_switches),
            per(s0.load_switches, s1.load_switches),
        )
    });
    if !running.pids.is_empty() {
        r.proxy = Some((s0.proxy, s1.proxy));
    }
    let mut parts = Vec::new();
    for (i, n) in acc.errors.iter().enumerate() {
        if *n > 0 {
            parts.push(format!("{} {n}", FAILURE_KINDS[i]));
        }
    }
    if acc.warmup_errors > 0 {
        parts.push(format!("{} during warm-up", acc.warmup_errors));
    }
    if let Some(first) = &acc.first_error {
        parts.push(format!("first: {first}"));
    }
    r.error_note = parts.join(", ");

    let mut notes = vec![format!(
        "load generator on {}",
        if acc.uring { "io_uring" } else { "epoll" }
    )];
    if let Some(us) = r.load_us_per_req {
        notes.push(format!("load side {us:.1} µs CPU/req"));
    }
    if let (Some(a), Some(b)) = (conns_before, mock_stat(mock.addr, "connections")) {
        // Includes the readiness probe's and this query's own connections.
        notes.push(format!(
            "backend accepted {} connections",
            b.saturating_sub(a)
        ));
    }
    if let Some(segs) = r.segments {
        notes.push(format!("{segs:.1} TCP segments/req"));
    }
    if let Some((proxy, load)) = r.switches {
        if running.pids.is_empty() {
            notes.push(format!("context switches/req: load side {load:.2}"));
        } else {
            notes.push(format!(
                "context switches/req: proxy {proxy:.2}, load side {load:.2}"
            ));
        }
    }
    if acc.clients_left > 0 {
        notes.push(format!(
            "{} clients had not stopped 3 s after the window",
            acc.clients_left
        ));
    }
    if acc.reconnects > 0 {
        notes.push(format!("{} reconnects (Connection: close)", acc.reconnects));
    }
    if matches!(
        kind,
        TargetKind::Llmproxy
            | TargetKind::LlmproxyLog
            | TargetKind::Llmproxy2w
            | TargetKind::LlmproxyEpoll
    ) {
        notes.push(llmproxy_metrics_note(running.addr));
        if kind == TargetKind::LlmproxyLog {
            if let Some(log) = &running.log {
                let bytes = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
                notes.push(format!("access log {:.1} MB written", bytes as f64 / 1e6));
            }
        }
    }
    r.note = notes.join("; ");
    if let Some(proc) = running.proc.as_mut() {
        if proc.has_exited() {
            r.note.push_str("; THE PROXY EXITED DURING THE RUN");
        }
    }
    drop(running);
    // The next run must start against an idle backend.
    if let Some(active) = wait_mock_idle(mock.addr, Duration::from_secs(10)) {
        eprintln!(
            "[{}] warning: the mock backend still serves {active} requests 10 s after the run",
            wl.id
        );
    }
    Ok(r)
}

/// One counter of the mock's `/mock/stats`.
fn mock_stat(mock: SocketAddr, key: &str) -> Option<u64> {
    get(mock, "/mock/stats")
        .ok()
        .and_then(|(_, body)| serde_json::from_slice::<serde_json::Value>(&body).ok())
        .and_then(|v| v.get(key)?.as_u64())
}

/// Wait until the mock reports no request in progress; Some(active) if it does not get there.
fn wait_mock_idle(mock: SocketAddr, limit: Duration) -> Option<u64> {
    let deadline = Instant::now() + limit;
    loop {
        let active = mock_stat(mock, "active");
        match active {
            Some(0) => return None,
            other if Instant::now() > deadline => return Some(other.unwrap_or(u64::MAX)),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// `perf record` of the proxy's processes for the measurement window (perf itself on CPU 1).
fn start_perf(dir: &Path, tag: &str, pids: &[i32], secs: f64) -> Option<Proc> {
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("perf: cannot create {}: {e}", dir.display());
        return None;
    }
    let pid_list: Vec<String> = pids.iter().map(i32::to_string).collect();
    let mut cmd = Command::new("taskset");
    cmd.args([
        "-c",
        "1",
        "perf",
        "record",
        "-q",
        "-e",
        "cpu-clock",
        "-g",
        "-o",
    ])
    .arg(dir.join(format!("perf-{tag}.data")))
    .args(["-p", &pid_list.join(",")])
    .args(["--", "sleep", &format!("{secs}")])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    match Proc::spawn("perf", cmd) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("perf: {e}");
            None
        }
    }
}

/// Driver and usage accounting as llmproxy's own /metrics reports them after a run (shows that
/// usage extraction really ran).
fn llmproxy_metrics_note(addr: SocketAddr) -> String {
    let Ok((200, body)) = get(addr, "/metrics") else {
        return "metrics: unavailable".into();
    };
    let text = String::from_utf8_lossy(&body);
    let mut driver = "?".to_string();
    let mut completion = 0.0;
    for line in text.lines() {
        if line.starts_with("llmproxy_build_info{") {
            if let Some(d) = line.split("driver=\"").nth(1) {
                driver = d.split('"').next().unwrap_or("?").to_string();
            }
        } else if line.starts_with("llmproxy_tokens_total{") && line.contains("type=\"completion\"")
        {
            completion += line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    format!("llmproxy driver {driver}, usage extracted: {completion:.0} completion tokens counted")
}

// ---------------------------------------------------------------------------------------------
// Startup and idle
// ---------------------------------------------------------------------------------------------

struct Startup {
    target: &'static str,
    times_ms: Vec<f64>,
    idle: Usage,
}

fn measure_startup(
    ctx: &Ctx,
    kind: TargetKind,
    mock: SocketAddr,
    runs: usize,
) -> Result<Startup, String> {
    let mut times = Vec::new();
    let mut idle = Usage::default();
    for i in 0..runs {
        let running = start_target(ctx, kind, mock, &format!("startup-{}-{i}", kind.name()), 64)?;
        times.push(running.ready_after.as_secs_f64() * 1000.0);
        if i == 0 {
            sleep_until(Instant::now() + Duration::from_secs(1), &ctx.stop)?;
            idle = usage(&running.pids);
        }
    }
    Ok(Startup {
        target: kind.name(),
        times_ms: times,
        idle,
    })
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn f1(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.1}"))
}

fn f2(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}"))
}

fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string().into_bytes();
    let groups: Vec<&str> = digits
        .rchunks(3)
        .rev()
        .map(|g| std::str::from_utf8(g).unwrap_or("?"))
        .collect();
    let out = groups.join(",");
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn find<'a>(results: &'a [RunResult], name: &str) -> Option<&'a RunResult> {
    results
        .iter()
        .find(|r| r.target == name && r.failed.is_none())
}

fn table(out: &mut String, wl: &Workload, results: &[RunResult]) {
    outln!(out, "### {}", wl.title);
    outln!(out);
    let direct = find(results, "direct");
    if wl.id == "w4" {
        outln!(
            out,
            "| target | streams open at end | connections at end | tokens/s | errors | proxy CPU | RSS end / peak MB | PSS MB | load side CPU | other CPU |"
        );
        outln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in results {
            if let Some(why) = &r.failed {
                outln!(
                    out,
                    "| {} | not run: {} |||||||",
                    r.target,
                    why.replace('\n', " ")
                );
                continue;
            }
            outln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} / {} | {} | {:.0}% | {:.0}% |",
                r.target,
                thousands(r.streaming_at_end as f64),
                thousands(r.connections_at_end as f64),
                thousands(r.tokens as f64 / r.secs),
                r.errors,
                r.cpu_pct().map_or("–".into(), |c| format!("{c:.0}%")),
                f1(r.rss_mb()),
                f1(r.hwm_mb()),
                f1(r.pss_mb()),
                r.load_cpu,
                r.other_cpu,
            );
        }
    } else {
        let mut hdr = String::from("| target | req/s | latency p50 / p99 / p99.9 ms |");
        let mut sep = String::from("|---|---:|---:|");
        if wl.stream {
            hdr.push_str(" TTFT p50 / p99 ms | added TTFT p50 / p99 ms |");
            sep.push_str("---:|---:|");
        }
        if wl.token_delay_ms > 0 {
            hdr.push_str(" token gap p99 / max ms |");
            sep.push_str("---:|");
        }
        hdr.push_str(
            " errors | proxy CPU | CPU µs/req | RSS end / peak MB | PSS MB | load side CPU | other CPU |",
        );
        sep.push_str("---:|---:|---:|---:|---:|---:|---:|");
        outln!(out, "{hdr}");
        outln!(out, "{sep}");
        for r in results {
            if let Some(why) = &r.failed {
                outln!(
                    out,
                    "| {} | not run: {} |",
                    r.target,
                    why.replace('\n', " ")
                );
                continue;
            }
            let mut row = format!(
                "| {} | {} | {} / {} / {} |",
                r.target,
                thousands(r.rps()),
                f2(r.lat[0]),
                f2(r.lat[1]),
                f2(r.lat[2])
            );
            if wl.stream {
                let added = |i: usize| -> Option<f64> {
                    direct
                        .filter(|d| d.target != r.target)
                        .and_then(|d| Some(r.ttft[i]? - d.ttft[i]?))
                };
                let _ = write!(
                    row,
                    " {} / {} | {} |",
                    f2(r.ttft[0]),
                    f2(r.ttft[1]),
                    if r.target == "direct" {
                        "(baseline)".to_string()
                    } else {
                        format!(
                            "{} / {}",
                            added(0).map_or("–".into(), |v| format!("{v:+.2}")),
                            added(1).map_or("–".into(), |v| format!("{v:+.2}"))
                        )
                    }
                );
            }
            if wl.token_delay_ms > 0 {
                let _ = write!(row, " {} / {} |", f1(r.gap[1]), f1(r.gap[2]));
            }
            let _ = write!(
                row,
                " {} | {} | {} | {} | {} | {:.0}% | {:.0}% |",
                r.errors,
                r.cpu_pct().map_or("–".into(), |c| format!("{c:.0}%")),
                f1(r.cpu_us_per_req()),
                r.rss_mb().map_or("–".into(), |_| format!(
                    "{} / {}",
                    f1(r.rss_mb()),
                    f1(r.hwm_mb())
                )),
                f1(r.pss_mb()),
                r.load_cpu,
                r.other_cpu
            );
            outln!(out, "{row}");
        }
    }
    outln!(out);
    if let Some(nginx) = find(results, "nginx") {
        for name in ["llmproxy", "llmproxy+log", "llmproxy-epoll"] {
            let Some(l) = find(results, name) else {
                continue;
            };
            if wl.id == "w4" {
                outln!(
                    out,
                    "- {name} / nginx: RSS ×{}, proxy CPU ×{}",
                    f2(ratio(l.rss_mb(), nginx.rss_mb())),
                    f2(ratio(l.cpu_pct(), nginx.cpu_pct())),
                );
            } else {
                outln!(
                    out,
                    "- {name} / nginx: req/s ×{}, CPU per request ×{}, latency p99 ×{}, RSS ×{}",
                    f2(ratio(Some(l.rps()), Some(nginx.rps()))),
                    f2(ratio(l.cpu_us_per_req(), nginx.cpu_us_per_req())),
                    f2(ratio(l.lat[1], nginx.lat[1])),
                    f2(ratio(l.rss_mb(), nginx.rss_mb())),
                );
            }
        }
    }
    if let (Some(on), Some(off)) = (find(results, "llmproxy+log"), find(results, "llmproxy")) {
        if let (Some(a), Some(b)) = (on.cpu_us_per_req(), off.cpu_us_per_req()) {
            outln!(
                out,
                "- access log on / off (llmproxy): CPU per request {a:.1} / {b:.1} µs (+{:.1} µs)",
                a - b
            );
        }
    }
    let epoll = find(results, "llmproxy-epoll").filter(|_| wl.id != "w4");
    if let (Some(epoll), Some(uring)) = (epoll, find(results, "llmproxy")) {
        outln!(
            out,
            "- io_uring / epoll (llmproxy): CPU per request ×{}, req/s ×{}, load side CPU per request ×{}",
            f2(ratio(uring.cpu_us_per_req(), epoll.cpu_us_per_req())),
            f2(ratio(Some(uring.rps()), Some(epoll.rps()))),
            f2(ratio(uring.load_us_per_req, epoll.load_us_per_req)),
        );
    }
    if let (Some(two), Some(one)) = (find(results, "llmproxy-2w"), find(results, "llmproxy")) {
        outln!(
            out,
            "- scaling, llmproxy 2 workers (CPUs 0,1, sharing CPU 1 with the load side) / 1 worker: req/s ×{}",
            f2(ratio(Some(two.rps()), Some(one.rps())))
        );
    }
    for r in results {
        if r.failed.is_some() {
            continue;
        }
        let mut line = format!("- {}: {} requests in {:.1} s", r.target, r.ok, r.secs);
        if !r.error_note.is_empty() {
            let _ = write!(line, "; errors: {}", r.error_note);
        }
        if !r.note.is_empty() {
            let _ = write!(line, "; {}", r.note);
        }
        if r.steal >= 1.0 {
            let _ = write!(line, "; CPU steal {:.0}%", r.steal);
        }
        outln!(out, "{line}");
    }
    outln!(out);
}

enum Verdict {
    Holds,
    Misses,
    Unknown,
}

fn verdict(ok: Option<bool>) -> Verdict {
    match ok {
        Some(true) => Verdict::Holds,
        Some(false) => Verdict::Misses,
        None => Verdict::Unknown,
    }
}

fn targets_section(out: &mut String, all: &[(Workload, Vec<RunResult>)], startup: &[Startup]) {
    outln!(out, "### Issue 6 targets, as measured in this run");
    outln!(out);
    let mut line = |what: String, v: Verdict| {
        let tag = match v {
            Verdict::Holds => "holds",
            Verdict::Misses => "MISSED",
            Verdict::Unknown => "not measured",
        };
        outln!(out, "- [{tag}] {what}");
    };
    let get = |id: &str| {
        all.iter()
            .find(|(w, _)| w.id == id)
            .map(|(_, r)| r.as_slice())
    };
    for id in ["w1", "w2"] {
        let Some(results) = get(id) else { continue };
        let nginx = find(results, "nginx");
        for name in ["llmproxy", "llmproxy+log"] {
            let l = find(results, name);
            let rps = l.zip(nginx).map(|(l, n)| (l.rps(), n.rps()));
            line(
                format!(
                    "{} {name}: req/s ≥ nginx's — {}",
                    id.to_uppercase(),
                    rps.map_or("–".into(), |(a, b)| format!(
                        "{} vs {}",
                        thousands(a),
                        thousands(b)
                    ))
                ),
                verdict(rps.map(|(a, b)| a >= b)),
            );
            let cpu = l
                .and_then(|l| l.cpu_us_per_req())
                .zip(nginx.and_then(|n| n.cpu_us_per_req()));
            line(
                format!(
                    "{} {name}: CPU per request ≤ 0.7× nginx's — {}",
                    id.to_uppercase(),
                    cpu.map_or("–".into(), |(a, b)| format!(
                        "{a:.1} µs vs {b:.1} µs (×{:.2})",
                        a / b
                    ))
                ),
                verdict(cpu.map(|(a, b)| a <= 0.7 * b)),
            );
        }
    }
    if let Some(results) = get("w3") {
        let direct = find(results, "direct");
        for name in ["llmproxy", "llmproxy+log"] {
            let l = find(results, name);
            let added = l
                .zip(direct)
                .and_then(|(l, d)| Some(l.ttft[1]? - d.ttft[1]?));
            line(
                format!(
                    "W3 {name}: added TTFT p99 ≤ 1 ms over direct — {}",
                    added.map_or("–".into(), |a| format!("{a:+.2} ms"))
                ),
                verdict(added.map(|a| a <= 1.0)),
            );
        }
        let rss = find(results, "llmproxy").and_then(|l| l.rss_mb());
        line(
            format!(
                "W3 llmproxy: RSS ≤ 16 MB at 256 streams — {}",
                rss.map_or("–".into(), |r| format!("{r:.1} MB"))
            ),
            verdict(rss.map(|r| r <= 16.0)),
        );
    } else {
        line("W3 (not in this run)".into(), Verdict::Unknown);
    }
    match get("w4").and_then(|r| find(r, "llmproxy")) {
        Some(l) => line(
            format!(
                "W4 llmproxy: 10,000 streams at 1 token/s held, RSS ≤ 150 MB, no errors — {} streams open at end, {:.1} MB, {} errors",
                thousands(l.streaming_at_end as f64),
                l.rss_mb().unwrap_or(0.0),
                l.errors
            ),
            match (l.streaming_at_end, l.rss_mb().unwrap_or(f64::MAX), l.errors) {
                // Over the memory bound already, or errors: missed whatever the count.
                (_, rss, errors) if rss > 150.0 || errors > 0 => Verdict::Misses,
                (open, _, _) if open >= 10_000 => Verdict::Holds,
                // Fewer streams than the target (open-files limit): not shown either way.
                _ => Verdict::Unknown,
            },
        ),
        None => line(
            "W4 10,000 idle-ish streams (opt-in: LOAD_WORKLOADS=w4)".into(),
            Verdict::Unknown,
        ),
    }
    for id in ["w1", "w2"] {
        if let Some(results) = get(id) {
            let r = find(results, "llmproxy-2w")
                .zip(find(results, "llmproxy"))
                .map(|(a, b)| a.rps() / b.rps());
            line(
                format!(
                    "{} scaling: req/s 2 workers / 1 worker reported — {}",
                    id.to_uppercase(),
                    r.map_or("–".into(), |v| format!("×{v:.2}"))
                ),
                verdict(r.map(|_| true)),
            );
        }
    }
    match startup.iter().find(|s| s.target == "llmproxy") {
        Some(s) => {
            let rss = s.idle.rss_kib as f64 / 1024.0;
            line(
                format!("Idle llmproxy: RSS ≤ 8 MB — {rss:.1} MB"),
                verdict(Some(rss <= 8.0)),
            );
            let med = median(&s.times_ms);
            line(
                format!(
                    "llmproxy startup to first accepted request ≤ 50 ms — median {} ms",
                    f1(med)
                ),
                verdict(med.map(|m| m <= 50.0)),
            );
        }
        None => line(
            "Idle RSS and startup (not in this run)".into(),
            Verdict::Unknown,
        ),
    }
    outln!(out);
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some(s[s.len() / 2])
}

fn machine_header(out: &mut String, opts: &Options, nofile: u64, cpus: usize) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let mem = status_line("/proc/meminfo", "MemTotal");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = Command::new(&opts.bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let nginx = opts
        .nginx
        .as_ref()
        .map_or("not installed".to_string(), |n| {
            Command::new(n)
                .arg("-v")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
                .unwrap_or_else(|e| format!("{}: {e}", n.display()))
        });
    outln!(out, "## Load benchmark run");
    outln!(out);
    outln!(
        out,
        "- machine: {model}, {} CPUs usable, {mem}, Linux {}",
        cpus,
        kernel.trim()
    );
    outln!(
        out,
        "- llmproxy: {version} ({}), source {}",
        opts.bin.display(),
        source_state()
    );
    outln!(out, "- nginx: {nginx}");
    outln!(
        out,
        "- runs: {} s measured after {} s warm-up, closed loop, keep-alive; proxy on CPU 0, mock backend + load generator on CPU 1; open files limit {nofile}",
        opts.secs, opts.warmup
    );
    outln!(out, "- load average at start: {}", loadavg());
    if let Some(dir) = &opts.perf {
        outln!(
            out,
            "- perf recording ON ({}): the proxies' figures include its sampling cost",
            dir.display()
        );
    }
    outln!(out);
}

/// The commit of the working tree and whether src/ differs from it (read-only git commands).
fn source_state() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("--no-optional-locks")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(commit) => {
            let changed =
                git(&["status", "--porcelain", "--", "src"]).map_or(0, |s| s.lines().count());
            if changed > 0 {
                format!("commit {commit} + uncommitted changes in {changed} file(s) under src/")
            } else {
                format!("commit {commit}")
            }
        }
        None => "unknown (not a git checkout)".into(),
    }
}

fn status_line(file: &str, key: &str) -> String {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':').map(str::trim))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or("? RAM".into(), |kib| {
            format!("{:.1} GiB RAM", kib / 1024.0 / 1024.0)
        })
}

// ---------------------------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------------------------

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        self_check();
        return;
    }
    let opts = match Options::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("load benchmark: {e}");
            std::process::exit(2);
        }
    };
    match run(&opts) {
        Ok(report) => {
            print!("{report}");
            if let Some(path) = &opts.out {
                if let Err(e) = std::fs::write(path, &report) {
                    eprintln!("cannot write {}: {e}", path.display());
                }
            }
        }
        Err(e) => {
            eprintln!("load benchmark failed: {e}");
            std::process::exit(1);
        }
    }
}

fn run(opts: &Options) -> Result<String, String> {
    let cpus = allowed_cpus();
    if !cpus.contains(&0) || !cpus.contains(&1) {
        return Err(format!(
            "needs CPUs 0 and 1 (the proxy on 0, backend and load on 1); this process may use {cpus:?}"
        ));
    }
    if let (Ok(bin_t), Some(src_t)) = (
        std::fs::metadata(&opts.bin).and_then(|m| m.modified()),
        newest_mtime(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src")),
    ) {
        if src_t > bin_t {
            eprintln!(
                "warning: {} is older than the newest file in src/: run `cargo build --release` to measure the current code",
                opts.bin.display()
            );
        }
    }
    let nofile = raise_nofile();
    // The orchestration (this thread) stays off the proxy's CPU; children are pinned explicitly.
    monoio::utils::bind_to_cpu_set([1]).map_err(|e| format!("cannot pin to CPU 1: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| e.to_string())?;
    }
    let tmp = TempDir::new(opts.keep_tmp)?;
    let ctx = Ctx {
        bin: opts.bin.clone(),
        nginx: opts.nginx.clone(),
        tmp: tmp.path.clone(),
        stop: stop.clone(),
        nofile,
    };
    let mut targets = opts.targets.clone();
    if ctx.nginx.is_none() && targets.contains(&TargetKind::Nginx) {
        eprintln!("nginx is not installed (apt-get install -y nginx): comparing with direct only");
    }
    if ctx.nginx.is_none() {
        targets.retain(|t| *t != TargetKind::Nginx);
    }

    let mut out = String::new();
    machine_header(&mut out, opts, nofile, cpus.len());

    // Startup and idle memory.
    let mut startup = Vec::new();
    if opts.startup_runs > 0 {
        let base = workload("w1")?;
        let mock = start_mock(&ctx, &base)?;
        for kind in [TargetKind::Llmproxy, TargetKind::Nginx] {
            if !targets.contains(&kind) {
                continue;
            }
            eprintln!("[startup] {} × {}", kind.name(), opts.startup_runs);
            match measure_startup(&ctx, kind, mock.addr, opts.startup_runs) {
                Ok(s) => startup.push(s),
                Err(e) => eprintln!("[startup] {}: {e}", kind.name()),
            }
        }
        drop(mock);
        if !startup.is_empty() {
            outln!(out, "### Startup and idle");
            outln!(out);
            outln!(
                out,
                "| target | start → first proxied 200, median (min–max) of {} | idle RSS / peak MB (1 s after one request) |",
                opts.startup_runs
            );
            outln!(out, "|---|---:|---:|");
            for s in &startup {
                let min = s.times_ms.iter().copied().fold(f64::INFINITY, f64::min);
                let max = s.times_ms.iter().copied().fold(0.0, f64::max);
                outln!(
                    out,
                    "| {} | {} ms ({min:.1}–{max:.1}) | {:.1} / {:.1} |",
                    s.target,
                    f1(median(&s.times_ms)),
                    s.idle.rss_kib as f64 / 1024.0,
                    s.idle.hwm_kib as f64 / 1024.0
                );
            }
            outln!(out);
            outln!(
                out,
                "nginx figures are master + worker. Startup includes fork/exec of `taskset` and the program."
            );
            outln!(out);
        }
    }

    let mut all = Vec::new();
    for wl in &opts.workloads {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let mut wl = wl.clone();
        // A proxy holds two sockets per stream; keep below the open-files limit (containers
        // often cap it and only a privileged process may raise it).
        let most = usize::try_from(nofile.saturating_sub(1000) / 2).unwrap_or(usize::MAX);
        if wl.id == "w4" && wl.conns > most {
            eprintln!(
                "[w4] {} streams need about {} open files in the proxy; the limit is {nofile}: running {most}",
                wl.conns,
                2 * wl.conns + 100
            );
            wl.title = format!(
                "W4 {} concurrent idle-ish streams, 1 token/s (asked for {}; capped by the open-files limit {nofile})",
                thousands(most as f64),
                thousands(wl.conns as f64)
            );
            wl.conns = most;
        }
        let wl = &wl;
        eprintln!("[{}] {} (load average {})", wl.id, wl.title, loadavg());
        let mock = start_mock(&ctx, wl)?;
        let mut results = Vec::new();
        for &kind in &targets {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let r = run_target(&ctx, opts, wl, kind, &mock).unwrap_or_else(|e| RunResult {
                target: kind.name().to_string(),
                failed: Some(e),
                ..RunResult::default()
            });
            match &r.failed {
                Some(e) => eprintln!("[{}] {}: FAILED: {e}", wl.id, r.target),
                None => eprintln!(
                    "[{}] {:<13} {:>9} req/s  p99 {:>7} ms  TTFT p99 {:>7} ms  errors {}  proxy CPU {:>5}  {:>6} µs/req  RSS {} MB  other CPU {:.0}%",
                    wl.id,
                    r.target,
                    thousands(r.rps()),
                    f2(r.lat[1]),
                    f2(r.ttft[1]),
                    r.errors,
                    r.cpu_pct().map_or("–".into(), |c| format!("{c:.0}%")),
                    f1(r.cpu_us_per_req()),
                    f1(r.rss_mb()),
                    r.other_cpu
                ),
            }
            results.push(r);
        }
        drop(mock);
        table(&mut out, wl, &results);
        all.push((wl.clone(), results));
    }
    if stop.load(Ordering::Relaxed) {
        return Err("interrupted; every process started was stopped".into());
    }
    targets_section(&mut out, &all, &startup);
    outln!(out, "- load average at end: {}", loadavg());
    outln!(
        out,
        "- columns: latency = request written → last body byte; TTFT = request written → first content token; \
         proxy CPU = utime+stime of the proxy's processes during the window (100% = one core); \
         RSS end = VmRSS at the end of the window, peak = VmHWM; load side CPU = mock backend + load generator \
         (both on CPU 1); other CPU = time CPUs 0 and 1 spent on processes outside this benchmark (noise)."
    );
    Ok(out)
}

/// Run when started without `--bench` (that is by `cargo test --benches` / `--all-targets`, as
/// criterion does): check the response parsing quickly instead of starting a three-minute
/// benchmark.
fn self_check() {
    let event = |i: u32| format!("data: {{\"delta\":{{\"content\":\"tok{i} \"}}}}\n\n");
    let mut body = Vec::new();
    for i in 0..2 {
        let e = event(i);
        body.extend_from_slice(format!("{:x}\r\n{e}\r\n", e.len()).as_bytes());
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let finder = memmem::Finder::new(TOKEN_MARK);
    for step in 1..body.len() {
        let mut dec = Chunked::default();
        let mut m = TokenMatcher::default();
        let mut buf = Vec::new();
        let mut pos = 0;
        let mut n = 0;
        for piece in body.chunks(step) {
            buf.extend_from_slice(piece);
            pos += dec
                .feed(&buf[pos..], &mut |d| n += m.count(&finder, d))
                .expect("valid chunked body");
        }
        assert!(dec.done(), "pieces of {step}: body not complete");
        assert_eq!(n, 2, "pieces of {step}: tokens");
        assert_eq!(pos, body.len());
    }
    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello";
    let h = parse_head(head).expect("valid").expect("complete");
    assert_eq!(
        (h.status, h.body, h.close),
        (200, BodyKind::Length(5), true)
    );
    println!("load benchmark: parser self-check passed (run it with `cargo bench --bench load`)");
}
