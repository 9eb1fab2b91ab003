//! The processes and files this benchmark creates, each behind a guard that removes it: a child
//! is stopped by its own PID, never by name (other people's processes on a shared machine are left
//! alone), with `PR_SET_PDEATHSIG` for when this process is killed outright; the temp directory
//! goes with its guard. Also the process-wide things a run needs (open-files limit, CPUs 0 and 1,
//! free ports) and the sleep that Ctrl-C interrupts.

use std::io;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A process started by this benchmark; stopped by its PID when dropped (SIGTERM, then SIGKILL
/// after 3 s). `extra` are PIDs it started itself (nginx workers), killed by PID if still there.
pub(crate) struct Proc {
    pub(crate) name: String,
    pub(crate) child: Child,
    pub(crate) extra: Vec<i32>,
}

impl Proc {
    pub(crate) fn spawn(name: &str, mut cmd: Command) -> Result<Proc, String> {
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

    pub(crate) fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(i32::MAX)
    }

    pub(crate) fn has_exited(&mut self) -> bool {
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

/// The open-files limit every process of the run gets, and what set it.
pub(crate) struct Nofile {
    pub(crate) limit: u64,
    /// For the report: what was asked for, and why it is not more.
    pub(crate) note: String,
}

/// What W4 needs: 10,000 streams are 20,000 sockets in the proxy, 10,000 here and in the mock.
const NOFILE_WANTED: u64 = 65_536;

/// Raises the open-files limit, soft and hard, as far as allowed (children inherit it). Raising
/// the hard limit needs CAP_SYS_RESOURCE; the kernel's ceiling is /proc/sys/fs/nr_open.
pub(crate) fn raise_nofile() -> Nofile {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Nofile {
                limit: 0,
                note: "getrlimit failed".into(),
            };
        }
        let hard = lim.rlim_max;
        let want = hard.max(NOFILE_WANTED.min(nr_open.unwrap_or(NOFILE_WANTED)));
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: want,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return Nofile {
                limit: want,
                note: format!("soft and hard raised to {want} (hard was {hard})"),
            };
        }
        let err = std::io::Error::last_os_error();
        lim.rlim_cur = hard;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        let cap = if has_cap_sys_resource() {
            "with"
        } else {
            "without"
        };
        Nofile {
            limit: hard,
            note: format!(
                "soft raised to the hard limit {hard}; raising the hard limit to {want} failed ({err}): \
                 this process runs {cap} CAP_SYS_RESOURCE, the kernel allows {}",
                nr_open.map_or("?".into(), |n| n.to_string())
            ),
        }
    }
}

/// Whether this process may raise a hard resource limit (CAP_SYS_RESOURCE, bit 24 of CapEff).
fn has_cap_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

/// The CPUs this process may run on (it needs 0 and 1).
pub(crate) fn allowed_cpus() -> Vec<usize> {
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

pub(crate) struct TempDir {
    pub(crate) path: PathBuf,
    pub(crate) keep: bool,
}

impl TempDir {
    pub(crate) fn new(keep: bool) -> Result<TempDir, String> {
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

pub(crate) fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub(crate) fn sleep_until(t: Instant, stop: &AtomicBool) -> Result<(), String> {
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

/// The process name the kernel reports (`/proc/PID/comm`).
pub(crate) fn proc_comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()
}
