//! What is read from the kernel to measure a run: CPU seconds, RSS/HWM/PSS and context switches
//! of given PIDs, busy and steal ticks of CPUs 0 and 1, TCP segments sent; the percentiles; the
//! optional `perf record`. Read-only: it never signals or changes a process (perf runs under a
//! `Proc` guard). Everything comes from /proc, and a file that cannot be read counts as 0, because
//! a process may exit between two samples and a run must not fail for it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::process::Proc;

pub(crate) fn clk_tck() -> f64 {
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
pub(crate) fn proc_stat_fields(pid: i32) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&text).map(|(_, fields)| fields)
}

/// A `stat` file's command name (between the parentheses) and the numbers after it.
fn stat_fields(text: &str) -> Option<(&str, Vec<u64>)> {
    let (open, close) = (text.find('(')?, text.rfind(')')?);
    let fields = text
        .get(close + 1..)?
        .split_whitespace()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .collect();
    Some((text.get(open + 1..close)?, fields))
}

pub(crate) fn cpu_secs(pid: i32) -> f64 {
    proc_stat_fields(pid)
        .filter(|f| f.len() > 12)
        .map(|f| (f[11] + f[12]) as f64 / clk_tck())
        .unwrap_or(0.0)
}

/// `VmRSS` / `VmHWM` etc. from /proc/PID/status, in KiB.
pub(crate) fn status_kib(pid: i32, key: &str) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub(crate) fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

pub(crate) fn children_of(pid: i32) -> Vec<i32> {
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
pub(crate) struct Usage {
    pub(crate) cpu: f64,
    pub(crate) rss_kib: u64,
    pub(crate) hwm_kib: u64,
    /// Proportional set size (shared pages split between the processes sharing them): the fair
    /// sum over nginx's master and worker.
    pub(crate) pss_kib: u64,
}

/// CPU seconds and memory summed over processes (nginx: master + worker).
pub(crate) fn usage(pids: &[i32]) -> Usage {
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
pub(crate) struct CpuTicks {
    pub(crate) busy: [u64; 2],
    pub(crate) steal: [u64; 2],
}

/// Context switches (voluntary + involuntary) of every thread of a process.
pub(crate) fn switches(pid: i32) -> u64 {
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

/// llmproxy's threads by what they do, from their names (`comm`, cut to 15 bytes by the kernel):
/// the cores, the usage threads (intake and webhook sender), the log writer, and the rest
/// (control plane, health checks, scrapers, the main thread). Other programs' threads are not
/// named `llmproxy-*` and count as the rest.
pub(crate) const THREAD_GROUPS: [&str; 4] = ["cores", "usage", "log", "other"];

pub(crate) fn thread_group(comm: &str) -> usize {
    match comm.trim() {
        c if c.starts_with("llmproxy-core") => 0,
        c if c.starts_with("llmproxy-usage") => 1,
        c if c.starts_with("llmproxy-log") => 2,
        _ => 3,
    }
}

/// CPU clock ticks (utime + stime) of every thread of a process, summed by `thread_group`.
/// Ticks are 10 ms: over an 8 s window a thread group's share is good to about a tick.
pub(crate) fn thread_ticks(pid: i32) -> [u64; 4] {
    let mut sum = [0; 4];
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return sum;
    };
    for t in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        if let Some((comm, fields)) = stat_fields(&stat) {
            if let (Some(u), Some(s)) = (fields.get(11), fields.get(12)) {
                sum[thread_group(comm)] += u + s;
            }
        }
    }
    sum
}

/// TCP segments sent, from /proc/net/snmp (this network namespace; loopback traffic of the
/// run dominates it).
pub(crate) fn tcp_out_segs() -> u64 {
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
pub(crate) struct Sample {
    pub(crate) segments: u64,
    pub(crate) proxy: Usage,
    pub(crate) load: Usage,
    pub(crate) ticks: CpuTicks,
    pub(crate) proxy_switches: u64,
    pub(crate) load_switches: u64,
    /// The proxy's CPU ticks by `THREAD_GROUPS`.
    pub(crate) proxy_threads: [u64; 4],
}

impl Sample {
    pub(crate) fn take(proxy: &[i32], load: &[i32]) -> Sample {
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
            proxy_threads: proxy.iter().map(|&p| thread_ticks(p)).fold([0; 4], |a, t| {
                [a[0] + t[0], a[1] + t[1], a[2] + t[2], a[3] + t[3]]
            }),
        }
    }
}

pub(crate) fn cpu_ticks() -> CpuTicks {
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

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Nearest-rank percentiles p50, p99, p99.9 in milliseconds.
pub(crate) fn percentiles(samples: &mut [u32]) -> [Option<f64>; 3] {
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

/// The kernel's count of what a proxy asks of it, for `--perf-stat`: ring operations submitted
/// and completed, polls armed for operations that found their socket not ready, the deferred
/// task work that completes them, and system calls (`io_uring_enter` among them).
const STAT_EVENTS: &str = "io_uring:io_uring_submit_req,io_uring:io_uring_complete,\
io_uring:io_uring_poll_arm,io_uring:io_uring_task_work_run,io_uring:io_uring_local_work_run,\
raw_syscalls:sys_enter";

/// Where `start_perf` writes for a run tagged `tag`: `perf stat`'s counts or `perf record`'s
/// samples (read back by `profile`).
pub(crate) fn perf_file(dir: &Path, tag: &str, stat: bool) -> PathBuf {
    if stat {
        dir.join(format!("perf-stat-{tag}.txt"))
    } else {
        dir.join(format!("perf-{tag}.data"))
    }
}

/// `perf record` of the proxy's processes for the measurement window (perf itself on CPU 1), or
/// with `stat` their `perf stat` counts of `STAT_EVENTS`.
pub(crate) fn start_perf(
    dir: &Path,
    tag: &str,
    pids: &[i32],
    secs: f64,
    stat: bool,
) -> Option<Proc> {
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("perf: cannot create {}: {e}", dir.display());
        return None;
    }
    let pid_list: Vec<String> = pids.iter().map(i32::to_string).collect();
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1", "perf"]);
    if stat {
        cmd.args(["stat", "-x", ",", "-e", STAT_EVENTS, "-o"]);
    } else {
        cmd.args(["record", "-q", "-e", "cpu-clock", "-g", "-o"]);
    }
    cmd.arg(perf_file(dir, tag, stat));
    cmd.args(["-p", &pid_list.join(",")])
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

/// `cargo test --benches`: thread names map to their groups, and a named thread's CPU is found
/// under its group in /proc.
pub(crate) fn self_check() {
    for (comm, group) in [
        ("llmproxy-core-0", "cores"),
        ("llmproxy-core-1", "cores"),
        ("llmproxy-usage-", "usage"),
        ("llmproxy-log", "log"),
        ("llmproxy-plane", "other"),
        ("nginx", "other"),
        ("haproxy\n", "other"),
    ] {
        assert_eq!(THREAD_GROUPS[thread_group(comm)], group, "{comm:?}");
    }
    let pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    let before = thread_ticks(pid);
    let spun = std::thread::Builder::new()
        .name("llmproxy-usage-check".into())
        .spawn(move || {
            // 60 ms of CPU: at least a few 10 ms ticks.
            let start = std::time::Instant::now();
            let mut x = 0u64;
            while start.elapsed() < std::time::Duration::from_millis(60) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            // Read while the thread still exists (an exited thread leaves /proc/PID/task).
            thread_ticks(pid)
        })
        .expect("spawn the check thread")
        .join()
        .expect("the check thread");
    assert!(
        spun[1] > before[1],
        "the usage group's ticks did not grow: {before:?} -> {spun:?}"
    );
    println!("measure: thread groups ok ({:?} ticks by group)", spun);
}
