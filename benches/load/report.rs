//! The Markdown report: machine and source header, one table per workload with ratios against
//! nginx, HAProxy and direct, the startup table, and the issue 6 and 17 targets each with a verdict (holds /
//! MISSED / not measured). Pure formatting over finished results: it never measures or starts a
//! target (the header only reads /proc, `--version` output and the git state).

use std::fmt::Write as _;
use std::process::{Command, Stdio};

use crate::measure::loadavg;
use crate::options::Options;
use crate::process::Nofile;
use crate::profile::{Profile, DOINGS};
use crate::run::{RunResult, Startup};
use crate::workload::{Workload, TOKENS};

pub(crate) fn f1(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.1}"))
}

pub(crate) fn f2(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}"))
}

pub(crate) fn thousands(v: f64) -> String {
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

pub(crate) fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

pub(crate) fn find<'a>(results: &'a [RunResult], name: &str) -> Option<&'a RunResult> {
    results
        .iter()
        .find(|r| r.target == name && r.failed.is_none())
}

pub(crate) fn table(out: &mut String, wl: &Workload, results: &[RunResult]) {
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
    for reference in ["nginx", "haproxy"] {
        let Some(c) = find(results, reference) else {
            continue;
        };
        for name in ["llmproxy", "llmproxy+log", "llmproxy-epoll"] {
            let Some(l) = find(results, name) else {
                continue;
            };
            if wl.id == "w4" {
                outln!(
                    out,
                    "- {name} / {reference}: RSS ×{}, proxy CPU ×{}",
                    f2(ratio(l.rss_mb(), c.rss_mb())),
                    f2(ratio(l.cpu_pct(), c.cpu_pct())),
                );
            } else {
                outln!(
                    out,
                    "- {name} / {reference}: req/s ×{}, CPU per request ×{}, latency p99 ×{}, RSS ×{}",
                    f2(ratio(Some(l.rps()), Some(c.rps()))),
                    f2(ratio(l.cpu_us_per_req(), c.cpu_us_per_req())),
                    f2(ratio(l.lat[1], c.lat[1])),
                    f2(ratio(l.rss_mb(), c.rss_mb())),
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
    if let (Some(new), Some(base)) = (find(results, "llmproxy"), find(results, "llmproxy-base")) {
        outln!(
            out,
            "- llmproxy / llmproxy-base (this build / LOAD_BASE_BIN): RSS {} / {} MB, errors {} / {}, CPU per request ×{}",
            f1(new.rss_mb()),
            f1(base.rss_mb()),
            new.errors,
            base.errors,
            f2(ratio(new.cpu_us_per_req(), base.cpu_us_per_req())),
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
    profile_table(out, results);
}

/// `--perf`: where each proxy's CPU went, in µs per request (the shares of its samples times
/// its CPU per request in the same window, perf's own cost included).
fn profile_table(out: &mut String, results: &[RunResult]) {
    // (target, its profile, its CPU per request)
    let profiled: Vec<(&RunResult, &Profile, f64)> = results
        .iter()
        .filter_map(|r| Some((r, r.profile.as_ref()?, r.cpu_us_per_req()?)))
        .collect();
    if profiled.is_empty() {
        return;
    }
    let names: Vec<&str> = profiled.iter().map(|p| p.0.target.as_str()).collect();
    outln!(
        out,
        "Where the CPU went, µs per request (`perf record` samples by the operation they ran under; `benches/load/profile.rs`):"
    );
    outln!(out);
    outln!(out, "| | {} |", names.join(" | "));
    outln!(out, "|---|{}", "---:|".repeat(names.len()));
    for d in DOINGS {
        let cells: Vec<String> = profiled
            .iter()
            .map(|(_, (shares, _), cpu)| {
                let share = shares.iter().find(|(x, _)| *x == d).map_or(0.0, |s| s.1);
                format!("{:.1}", share * cpu)
            })
            .collect();
        outln!(out, "| {} | {} |", d.label(), cells.join(" | "));
    }
    let totals: Vec<String> = profiled.iter().map(|p| format!("{:.1}", p.2)).collect();
    outln!(out, "| **CPU µs/req** | {} |", totals.join(" | "));
    let samples: Vec<String> = profiled.iter().map(|p| p.1 .1.to_string()).collect();
    outln!(out, "| samples | {} |", samples.join(" | "));
    outln!(out);
}

pub(crate) enum Verdict {
    Holds,
    Misses,
    Unknown,
}

pub(crate) fn verdict(ok: Option<bool>) -> Verdict {
    match ok {
        Some(true) => Verdict::Holds,
        Some(false) => Verdict::Misses,
        None => Verdict::Unknown,
    }
}

pub(crate) fn targets_section(
    out: &mut String,
    all: &[(Workload, Vec<RunResult>)],
    startup: &[Startup],
) {
    outln!(out, "### Issue 6 and 17 targets, as measured in this run");
    outln!(out);
    if let Some((w, _)) = all.iter().find(|(w, _)| w.id != "w4" && w.tokens != TOKENS) {
        outln!(
            out,
            "Not judged: the targets are set for {TOKENS} tokens a generation, and this run's \
             were {} (LOAD_TOKENS).",
            w.tokens
        );
        outln!(out);
        return;
    }
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
            // Issue 17: at or below the cheaper of the two C proxies (whichever ran).
            let cheaper = cheaper_cpu(results);
            let cpu = l.and_then(|l| l.cpu_us_per_req()).zip(cheaper);
            line(
                format!(
                    "{} {name}: CPU per request ≤ the cheaper of nginx and HAProxy — {}",
                    id.to_uppercase(),
                    cpu.map_or("–".into(), |(a, (b, who))| format!(
                        "{a:.1} µs vs {who}'s {b:.1} µs (×{:.2})",
                        a / b
                    ))
                ),
                verdict(cpu.map(|(a, (b, _))| a <= b)),
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
    let idle = startup
        .iter()
        .find(|s| s.target == "llmproxy")
        .map(|s| s.idle.rss_kib as f64 / 1024.0);
    match get("w4").and_then(|r| find(r, "llmproxy")) {
        Some(l) => line(
            format!(
                "W4 llmproxy: 10,000 streams at 1 token/s held, RSS ≤ 150 MB, no errors — {} streams open at end, {:.1} MB, {} errors{}",
                thousands(l.streaming_at_end as f64),
                l.rss_mb().unwrap_or(0.0),
                l.errors,
                // Fewer streams than asked (the open-files limit): what 10,000 would take at
                // this run's memory per open request above the idle proxy (every open client
                // connection holds one; a stream not yet answered holds as much as one that is).
                match (idle, l.rss_mb()) {
                    (Some(idle), Some(rss)) if (1..10_000).contains(&l.connections_at_end) => {
                        let per = (rss - idle) / l.connections_at_end as f64;
                        format!(
                            "; {:.1} KB per open request above the idle {idle:.1} MB: {:.1} MB at 10,000",
                            per * 1024.0,
                            idle + per * 10_000.0
                        )
                    }
                    _ => String::new(),
                }
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

/// One round's llmproxy against the cheaper C proxy of that round: CPU µs per request of each,
/// and whose the cheaper figure is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RoundCpu {
    pub(crate) llmproxy: f64,
    pub(crate) cheaper: f64,
    pub(crate) who: &'static str,
}

/// Per round (in order), llmproxy's CPU per request against the cheaper of nginx and HAProxy in
/// the same round; rounds where either is missing are left out. The medians can sit on either
/// side of 1 while the rounds do too: this says how often each side won.
pub(crate) fn round_cpu(rounds: &[Vec<RunResult>]) -> Vec<RoundCpu> {
    rounds
        .iter()
        .filter_map(|r| {
            let llmproxy = find(r, "llmproxy")?.cpu_us_per_req()?;
            let (cheaper, who) = cheaper_cpu(r)?;
            Some(RoundCpu {
                llmproxy,
                cheaper,
                who,
            })
        })
        .collect()
}

/// With several rounds: llmproxy's CPU per request against the cheaper C proxy round by round,
/// and in how many rounds it was at or below it (the verdicts above are on the medians).
pub(crate) fn rounds_section(out: &mut String, per_round: &[(Workload, Vec<RoundCpu>)]) {
    if per_round.iter().all(|(_, r)| r.len() < 2) {
        return;
    }
    outln!(
        out,
        "### llmproxy's CPU per request against the cheaper of nginx and HAProxy, round by round"
    );
    outln!(out);
    for (wl, rounds) in per_round.iter().filter(|(_, r)| r.len() >= 2) {
        let each: Vec<String> = rounds
            .iter()
            .map(|r| {
                format!(
                    "×{:.2} ({:.1} / {} {:.1})",
                    r.llmproxy / r.cheaper,
                    r.llmproxy,
                    r.who,
                    r.cheaper
                )
            })
            .collect();
        let at_or_below = rounds.iter().filter(|r| r.llmproxy <= r.cheaper).count();
        outln!(
            out,
            "- {}: {}; at or below in {at_or_below} of {} rounds",
            wl.id.to_uppercase(),
            each.join(", "),
            rounds.len()
        );
    }
    outln!(out);
}

/// Checks `round_cpu` and `rounds_section` on made-up rounds (run by `cargo test --benches`).
pub(crate) fn self_check() {
    use crate::measure::Usage;
    let run = |target: &str, cpu_us: f64| RunResult {
        target: target.into(),
        secs: 8.0,
        ok: 8_000,
        proxy: Some((
            Usage::default(),
            Usage {
                cpu: cpu_us * 8_000.0 / 1e6,
                ..Usage::default()
            },
        )),
        ..RunResult::default()
    };
    let rounds = vec![
        vec![
            run("llmproxy", 12.4),
            run("nginx", 12.2),
            run("haproxy", 12.8),
        ],
        vec![
            run("llmproxy", 12.0),
            run("nginx", 12.5),
            run("haproxy", 12.1),
        ],
        // No C proxy in this round: left out.
        vec![run("llmproxy", 12.0)],
    ];
    let r = round_cpu(&rounds);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].who, "nginx");
    assert_eq!(r[1].who, "haproxy");
    assert!((r[0].cheaper - 12.2).abs() < 1e-9 && (r[1].llmproxy - 12.0).abs() < 1e-9);
    let mut out = String::new();
    let wl = crate::workload::workload("w1").unwrap_or_else(|e| panic!("{e}"));
    rounds_section(&mut out, &[(wl, r)]);
    assert!(
        out.contains("- W1: ×1.02 (12.4 / nginx 12.2), ×0.99 (12.0 / haproxy 12.1); at or below in 1 of 2 rounds"),
        "{out}"
    );
    // W3's TTFT p99 gets its longer window unless LOAD_W3_SECS says otherwise; the others run
    // LOAD_SECS.
    if std::env::var_os("LOAD_W3_SECS").is_none() {
        let w3 = crate::workload::workload("w3").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(w3.window_secs(8.0), 30.0);
        assert_eq!(w3.window_secs(60.0), 60.0);
    }
    let w1 = crate::workload::workload("w1").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(w1.window_secs(8.0), 8.0);
    eprintln!("load benchmark: report self-check passed");
}

/// The lower CPU per request of nginx and HAProxy in this workload, and whose it is.
pub(crate) fn cheaper_cpu(results: &[RunResult]) -> Option<(f64, &'static str)> {
    ["nginx", "haproxy"]
        .into_iter()
        .filter_map(|name| Some((find(results, name)?.cpu_us_per_req()?, name)))
        .min_by(|a, b| a.0.total_cmp(&b.0))
}

pub(crate) fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some(s[s.len() / 2])
}

pub(crate) fn machine_header(out: &mut String, opts: &Options, nofile: &Nofile, cpus: usize) {
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
    let haproxy = opts
        .haproxy
        .as_ref()
        .map_or("not installed".to_string(), |h| {
            Command::new(h)
                .arg("-v")
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_string()
                })
                .unwrap_or_else(|e| format!("{}: {e}", h.display()))
        });
    outln!(out, "- nginx: {nginx}");
    outln!(out, "- haproxy: {haproxy}");
    outln!(
        out,
        "- runs: {} s measured{} after {} s warm-up, closed loop (W6: open loop), keep-alive{}{}; proxy on CPU 0, mock backend + load generator on CPU 1; open files limit {} ({})",
        opts.secs,
        longer_windows(opts),
        opts.warmup,
        if opts.sdk_headers {
            ", requests with the OpenAI SDK's 17 headers"
        } else {
            ""
        },
        if opts.client_usage {
            ", streams asking for running usage themselves (LOAD_CLIENT_USAGE=running)"
        } else {
            ""
        },
        nofile.limit,
        nofile.note
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

/// The workloads measured over a longer window than `LOAD_SECS`, for the run's header:
/// " (W3: 30 s)", or nothing.
fn longer_windows(opts: &Options) -> String {
    let longer: Vec<String> = opts
        .workloads
        .iter()
        .filter(|w| w.window_secs(opts.secs) > opts.secs)
        .map(|w| {
            format!(
                "{}: {} s",
                w.id.to_ascii_uppercase(),
                w.window_secs(opts.secs)
            )
        })
        .collect();
    if longer.is_empty() {
        String::new()
    } else {
        format!(" ({})", longer.join(", "))
    }
}

/// The commit of the working tree and whether src/ differs from it (read-only git commands).
pub(crate) fn source_state() -> String {
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

pub(crate) fn status_line(file: &str, key: &str) -> String {
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

/// The startup and idle-memory table (nothing when no startup was measured).
pub(crate) fn startup_table(out: &mut String, startup: &[Startup], runs: usize) {
    if startup.is_empty() {
        return;
    }
    outln!(out, "### Startup and idle");
    outln!(out);
    outln!(
            out,
            "| target | start → first proxied 200, median (min–max) of {} | idle RSS / peak MB (1 s after one request) |",
            runs
        );
    outln!(out, "|---|---:|---:|");
    for s in startup {
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
            "nginx figures are master + worker; HAProxy is one process (`-db`, one thread). Startup includes fork/exec of `taskset` and the program."
        );
    outln!(out);
}

/// Issue 16's targets: llmproxy with client TLS against plaintext llmproxy in the same run. The
/// stream memory is compared both as the whole RSS and above the idle proxy's RSS (the startup
/// figure), since the fixed part is the same for both.
pub(crate) fn tls_section(
    out: &mut String,
    all: &[(Workload, Vec<RunResult>)],
    startup: &[Startup],
) {
    let get = |id: &str| {
        all.iter()
            .find(|(w, _)| w.id == id)
            .map(|(_, r)| r.as_slice())
    };
    let pair = |id: &str| get(id).and_then(|r| find(r, "llmproxy-tls").zip(find(r, "llmproxy")));
    if pair("w1").is_none() && pair("w4").is_none() {
        return;
    }
    // Reported, not a target: what TLS costs the proxy per request; unlike req/s it does not
    // depend on whether the proxy's CPU was the bottleneck in this run.
    let cpu = pair("w1").and_then(|(t, p)| t.cpu_us_per_req().zip(p.cpu_us_per_req()));
    outln!(out);
    outln!(out, "### Issue 16 (TLS) targets, as measured in this run");
    outln!(out);
    let mut line = |what: String, v: Verdict| {
        let tag = match v {
            Verdict::Holds => "holds",
            Verdict::Misses => "MISSED",
            Verdict::Unknown => "not measured",
        };
        outln!(out, "- [{tag}] {what}");
    };
    let rps = pair("w1").map(|(t, p)| (t.rps(), p.rps()));
    line(
        format!(
            "W1 over TLS (keep-alive): req/s ≥ 0.8× plaintext — {}",
            rps.map_or("–".into(), |(t, p)| format!(
                "{} vs {} (×{:.2})",
                thousands(t),
                thousands(p),
                t / p
            ))
        ),
        verdict(rps.map(|(t, p)| t >= 0.8 * p)),
    );
    match pair("w4") {
        Some((t, p)) => {
            let (tr, pr) = (t.rss_mb().unwrap_or(0.0), p.rss_mb().unwrap_or(0.0));
            let idle = startup
                .iter()
                .find(|s| s.target == "llmproxy")
                .map(|s| s.idle.rss_kib as f64 / 1024.0);
            let above = idle.map(|i| (tr - i, pr - i));
            line(
                format!(
                    "W4 {} TLS streams vs {} plaintext: memory < 2× — RSS {tr:.1} MB vs {pr:.1} MB (×{:.2}){}; errors {} vs {}",
                    thousands(t.streaming_at_end as f64),
                    thousands(p.streaming_at_end as f64),
                    tr / pr,
                    above.map_or(String::new(), |(a, b)| format!(
                        ", above the idle proxy's {:.1} MB: {a:.1} MB vs {b:.1} MB (×{:.2})",
                        idle.unwrap_or(0.0),
                        a / b
                    )),
                    t.errors,
                    p.errors
                ),
                verdict(Some(match above {
                    Some((a, b)) => a < 2.0 * b,
                    None => tr < 2.0 * pr,
                })),
            );
        }
        None => line(
            "W4 TLS streams' memory (LOAD_WORKLOADS=w4 LOAD_W4_STREAMS=2000)".into(),
            Verdict::Unknown,
        ),
    }
    if let Some((a, b)) = cpu {
        outln!(
            out,
            "- [reported] W1 proxy CPU per request, TLS vs plaintext — {a:.1} µs vs {b:.1} µs (×{:.2})",
            a / b
        );
    }
}
