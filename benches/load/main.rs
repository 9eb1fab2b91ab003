//! Load benchmark (issues 6 and 17): llmproxy against nginx, HAProxy and a direct connection, in
//! the same run, on loopback. Results and method: BENCHMARKS.md.
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
//! worker and `worker_cpu_affinity`, HAProxy with `nbthread 1` and `cpu-map`), the mock backend (`llmproxy mock-backend`, `taskset -c 1`)
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
//!
//! This file owns the order of a run (startup figures, then each workload against each target)
//! and the progress lines on stderr; measuring is `run`'s and `measure`'s, the tables `report`'s.
//! The parts:
//! - `options`: command line and environment; `workload`: W1..W5 and the request they send;
//! - `targets`: what is measured (direct, llmproxy in its configurations, nginx, HAProxy) and how each is
//!   configured, started and probed until ready; `process`: the PID guards those run under;
//! - `client`: the load generator; `http`: its HTTP/1.1 response reading (llmproxy::http1);
//! - `measure`: /proc sampling and perf; `profile`: what perf recorded, per request;
//!   `run`: one target under one workload, turned into
//!   figures; `report`: the Markdown tables and the issue 6 verdicts.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `writeln!` into the report `String` (formatting into a String cannot fail).
macro_rules! outln {
    ($out:expr) => {{ $out.push('\n'); }};
    ($out:expr, $($arg:tt)*) => {{ let _ = writeln!($out, $($arg)*); }};
}

mod client;
mod hook;
mod http;
mod measure;
mod options;
mod process;
mod profile;
mod report;
mod rounds;
mod run;
mod targets;
mod wire;
mod workload;

use options::Options;
use process::{allowed_cpus, raise_nofile, TempDir};
use report::{machine_header, startup_table, table, targets_section, thousands};
use run::{measure_startup, run_target, RunResult};
use targets::{start_mock, Ctx, TargetKind};
use workload::{workload, Workload};

/// Open files a proxy needs besides two sockets per stream (see the W4 cap in `run`).
const NOFILE_MARGIN: u64 = 64;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        client::self_check();
        hook::self_check();
        http::self_check();
        measure::self_check();
        profile::self_check();
        rounds::self_check();
        report::self_check();
        wire::self_check();
        workload::self_check();
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
        options::newest_mtime(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src")),
    ) {
        if src_t > bin_t {
            eprintln!(
                "warning: {} is older than the newest file in src/: run `cargo build --release` to measure the current code",
                opts.bin.display()
            );
        }
    }
    let nofile_set = raise_nofile();
    let nofile = nofile_set.limit;
    // The orchestration (this thread) stays off the proxy's CPU; children are pinned explicitly.
    monoio::utils::bind_to_cpu_set([1]).map_err(|e| format!("cannot pin to CPU 1: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| e.to_string())?;
    }
    let tmp = TempDir::new(opts.keep_tmp)?;
    let ctx = Ctx {
        bin: opts.bin.clone(),
        base_bin: opts.base_bin.clone(),
        base_hook: opts.base_hook,
        nginx: opts.nginx.clone(),
        haproxy: opts.haproxy.clone(),
        tmp: tmp.path.clone(),
        stop: stop.clone(),
        nofile,
        tls: targets::BenchTls::new(&tmp.path)?,
    };
    let mut targets = opts.targets.clone();
    if ctx.nginx.is_none() && targets.contains(&TargetKind::Nginx) {
        eprintln!(
            "nginx not found (apt-get install -y nginx-light) or LOAD_NGINX=off: skipping the nginx target"
        );
    }
    if ctx.haproxy.is_none() && targets.contains(&TargetKind::Haproxy) {
        eprintln!(
            "haproxy not found (apt-get install -y haproxy) or LOAD_HAPROXY=off: skipping the haproxy target"
        );
    }
    if ctx.nginx.is_none() {
        targets.retain(|t| !matches!(t, TargetKind::Nginx | TargetKind::NginxIds));
    }
    if ctx.haproxy.is_none() {
        targets.retain(|t| *t != TargetKind::Haproxy);
    }

    let mut out = String::new();
    machine_header(&mut out, opts, &nofile_set, cpus.len());

    // Startup and idle memory.
    let mut startup = Vec::new();
    if opts.startup_runs > 0 {
        let base = workload("w1")?;
        let mock = start_mock(&ctx, &base)?;
        for kind in [TargetKind::Llmproxy, TargetKind::Nginx, TargetKind::Haproxy] {
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
        startup_table(&mut out, &startup, opts.startup_runs);
    }

    let mut all = Vec::new();
    let mut per_round = Vec::new();
    for wl in &opts.workloads {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let mut wl = wl.clone();
        // A proxy holds two sockets per stream; keep below the open-files limit (containers
        // often cap it and only a privileged process may raise it). The margin is the proxies'
        // own descriptors: llmproxy's listeners, ring, eventfds, log and stdio (about 20), and
        // HAProxy's 14 beyond two per connection.
        let most = usize::try_from(nofile.saturating_sub(NOFILE_MARGIN) / 2).unwrap_or(usize::MAX);
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
        eprintln!(
            "[{}] {} (load average {})",
            wl.id,
            wl.title,
            measure::loadavg()
        );
        let mock = start_mock(&ctx, wl)?;
        let mut rounds = Vec::new();
        for round in 1..=opts.rounds {
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
                log_result(wl, &r);
                results.push(r);
            }
            let mut titled = wl.clone();
            if opts.rounds > 1 {
                titled.title = format!("{} — round {round} of {}", wl.title, opts.rounds);
            }
            table(&mut out, &titled, &results);
            rounds.push(results);
        }
        drop(mock);
        per_round.push((wl.clone(), report::round_cpu(&rounds)));
        let results = if opts.rounds > 1 {
            let medians = rounds::medians(&rounds);
            let mut titled = wl.clone();
            titled.title = format!("{} — medians of {} rounds", wl.title, opts.rounds);
            table(&mut out, &titled, &medians);
            medians
        } else {
            rounds.pop().unwrap_or_default()
        };
        all.push((wl.clone(), results));
    }
    if stop.load(Ordering::Relaxed) {
        return Err("interrupted; every process started was stopped".into());
    }
    targets_section(&mut out, &all, &startup);
    report::rounds_section(&mut out, &per_round);
    report::tls_section(&mut out, &all, &startup);
    outln!(out, "- load average at end: {}", measure::loadavg());
    outln!(
        out,
        "- columns: latency = request written → last body byte; TTFT = request written → first content token; \
         proxy CPU = utime+stime of the proxy's processes during the window (100% = one core); \
         RSS end = VmRSS near the end of the window (the last tenth, at most 0.25 s before it, \
         while every stream is still open), peak = VmHWM; load side CPU = mock backend + load \
         generator (both on CPU 1); other CPU = time CPUs 0 and 1 spent on processes outside this benchmark (noise)."
    );
    Ok(out)
}

/// The one-line progress report of a run, on stderr.
fn log_result(wl: &Workload, r: &RunResult) {
    match &r.failed {
        Some(e) => eprintln!("[{}] {}: FAILED: {e}", wl.id, r.target),
        None => eprintln!(
            "[{}] {:<13} {:>9} req/s  p99 {:>7} ms  TTFT p99 {:>7} ms  errors {}  proxy CPU {:>5}  {:>6} µs/req  RSS {} MB  other CPU {:.0}%",
            wl.id,
            r.target,
            thousands(r.rps()),
            report::f2(r.lat[1]),
            report::f2(r.ttft[1]),
            r.errors,
            r.cpu_pct().map_or("–".into(), |c| format!("{c:.0}%")),
            report::f1(r.cpu_us_per_req()),
            report::f1(r.rss_mb()),
            r.other_cpu
        ),
    }
}
