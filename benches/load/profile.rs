//! What `--perf` recorded, read back into figures per request: where a proxy's CPU went, by what
//! it was doing (`perf record`'s call chains, one sample at a time), and, with `--perf-stat`, the
//! kernel's counts divided by the window's requests.
//!
//! Why by call chain rather than by function: on loopback a proxy's `send` also runs the peer's
//! receive and wakes the reader, and a `recv` sends the ACK and runs its arrival at the sender, so
//! a flat profile spreads one operation over fifty kernel functions (and a sample taken with
//! interrupts off lands on whichever `spin_unlock` turned them on again). Classified by the
//! operation a sample ran under, io_uring's ring work, epoll and system call entry sit side by
//! side with the TCP work every proxy does alike, which is the comparison issue 17 asks for.

use std::path::Path;
use std::process::{Command, Stdio};

/// What a proxy was doing, in the order the report's table lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Doing {
    User,
    SendOwn,
    SendPeerReceive,
    SendWake,
    RecvOwn,
    RecvAck,
    Ring,
    SyscallEpoll,
    ConnLife,
    Scheduler,
    OtherKernel,
}

pub(crate) const DOINGS: [Doing; 11] = [
    Doing::User,
    Doing::SendOwn,
    Doing::SendPeerReceive,
    Doing::SendWake,
    Doing::RecvOwn,
    Doing::RecvAck,
    Doing::Ring,
    Doing::SyscallEpoll,
    Doing::ConnLife,
    Doing::Scheduler,
    Doing::OtherKernel,
];

impl Doing {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Doing::User => "user space (the proxy's own code, libc)",
            Doing::SendOwn => "send: the sender's TCP/IP",
            Doing::SendPeerReceive => "send: the peer's receive (loopback, on this CPU)",
            Doing::SendWake => "send: waking the reader",
            Doing::RecvOwn => "recv: copy and TCP",
            Doing::RecvAck => "recv: the ACK it sends",
            Doing::Ring => "io_uring: submission, polls, completions",
            Doing::SyscallEpoll => "system call entry and exit, epoll",
            Doing::ConnLife => "accept, connect, close",
            Doing::Scheduler => "scheduler (sleeping, waking)",
            Doing::OtherKernel => "other kernel",
        }
    }
}

/// The share of a window's samples per `Doing` (summing to 1), and how many samples there were.
pub(crate) type Profile = (Vec<(Doing, f64)>, u64);

/// One sample's call chain, innermost frame first: (function, in the kernel).
pub(crate) fn classify(frames: &[(&str, bool)]) -> Doing {
    let Some(&(_, kernel)) = frames.first() else {
        return Doing::OtherKernel;
    };
    if !kernel {
        return Doing::User;
    }
    let has = |names: &[&str]| frames.iter().any(|(f, _)| names.contains(f));
    let wakes = [
        "sock_def_readable",
        "try_to_wake_up",
        "__wake_up_common",
        "ep_poll_callback",
        "io_poll_wake",
    ];
    let loopback_receive = ["net_rx_action", "process_backlog"];
    if has(&["tcp_sendmsg", "tcp_sendmsg_locked"]) {
        return if has(&wakes) {
            Doing::SendWake
        } else if has(&loopback_receive) {
            Doing::SendPeerReceive
        } else {
            Doing::SendOwn
        };
    }
    if has(&["tcp_recvmsg", "tcp_recvmsg_locked"]) {
        return if has(&["__tcp_transmit_skb", "tcp_send_ack", "__tcp_send_ack"]) {
            Doing::RecvAck
        } else {
            Doing::RecvOwn
        };
    }
    if has(&[
        "tcp_close",
        "__sock_release",
        "inet_accept",
        "do_accept",
        "__inet_stream_connect",
        "tcp_v4_connect",
    ]) {
        return Doing::ConnLife;
    }
    if has(&["schedule", "__schedule", "finish_task_switch.isra.0"]) {
        return Doing::Scheduler;
    }
    let named = |p: &str| frames.iter().any(|(f, _)| f.starts_with(p));
    if named("io_") || named("__io_") || has(&["__do_sys_io_uring_enter"]) {
        return Doing::Ring;
    }
    if named("ep_") || named("do_epoll") || has(&["do_syscall_64", "syscall_exit_to_user_mode"]) {
        return Doing::SyscallEpoll;
    }
    Doing::OtherKernel
}

/// `perf.data`'s `Profile`; `None` when perf cannot read the file.
pub(crate) fn shares(data: &Path) -> Option<Profile> {
    let out = Command::new("perf")
        .args(["script", "-F", "ip,sym,dso", "-i"])
        .arg(data)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let counts = count(&String::from_utf8_lossy(&out.stdout));
    let total: u64 = counts.iter().sum();
    (total > 0).then(|| {
        let shares = DOINGS
            .iter()
            .zip(&counts)
            .map(|(&d, &n)| (d, n as f64 / total as f64))
            .collect();
        (shares, total)
    })
}

/// Samples per `DOINGS` entry in `perf script -F ip,sym,dso` output: one block of frames per
/// sample, blocks separated by blank lines, a frame as `ADDRESS SYMBOL+OFFSET (DSO)`.
fn count(script: &str) -> Vec<u64> {
    let mut counts = vec![0u64; DOINGS.len()];
    let mut frames: Vec<(&str, bool)> = Vec::new();
    let mut flush = |frames: &mut Vec<(&str, bool)>| {
        if !frames.is_empty() {
            let d = classify(frames);
            if let Some(i) = DOINGS.iter().position(|&x| x == d) {
                counts[i] += 1;
            }
            frames.clear();
        }
    };
    for line in script.lines() {
        let line = line.trim();
        if line.is_empty() {
            flush(&mut frames);
            continue;
        }
        let Some((_, rest)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let (sym, dso) = rest.rsplit_once(" (").unwrap_or((rest, ""));
        let sym = sym.split("+0x").next().unwrap_or(sym).trim();
        frames.push((sym, dso.starts_with("[kernel")));
    }
    flush(&mut frames);
    counts
}

/// `perf stat -x ,` output (`COUNT,,EVENT,...` lines) divided by `requests`, as a note:
/// "per request: io_uring_submit_req 28.8, …".
pub(crate) fn stat_note(text: &str, requests: u64) -> Option<String> {
    if requests == 0 {
        return None;
    }
    let per: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split(',');
            let n: f64 = f.next()?.trim().parse().ok()?;
            let event = f.nth(1)?;
            let name = event.rsplit(':').next().unwrap_or(event);
            Some(format!("{name} {:.2}", n / requests as f64))
        })
        .collect();
    (!per.is_empty()).then(|| format!("kernel counts per request: {}", per.join(", ")))
}

/// `cargo test --benches`: samples land where the operation they ran under says, and perf's
/// text is read as perf writes it.
pub(crate) fn self_check() {
    let k = |names: &[&'static str]| -> Vec<(&'static str, bool)> {
        names.iter().map(|&n| (n, true)).collect()
    };
    let cases: [(Vec<(&str, bool)>, Doing); 9] = [
        (vec![("memcpy", false)], Doing::User),
        (
            k(&[
                "_copy_to_iter",
                "tcp_recvmsg_locked",
                "io_recv",
                "io_issue_sqe",
            ]),
            Doing::RecvOwn,
        ),
        (
            k(&["__tcp_transmit_skb", "tcp_recvmsg_locked", "sock_recvmsg"]),
            Doing::RecvAck,
        ),
        (
            k(&[
                "_raw_spin_unlock_irqrestore",
                "sock_def_readable",
                "tcp_v4_rcv",
                "net_rx_action",
                "tcp_sendmsg",
            ]),
            Doing::SendWake,
        ),
        (
            k(&[
                "tcp_v4_rcv",
                "process_backlog",
                "net_rx_action",
                "tcp_sendmsg",
            ]),
            Doing::SendPeerReceive,
        ),
        (
            k(&["__alloc_skb", "tcp_sendmsg_locked", "io_send"]),
            Doing::SendOwn,
        ),
        (
            k(&["fget", "io_file_get_normal", "io_submit_sqes"]),
            Doing::Ring,
        ),
        (
            k(&["ep_poll", "do_epoll_wait", "do_syscall_64"]),
            Doing::SyscallEpoll,
        ),
        (
            k(&["finish_task_switch.isra.0", "schedule", "io_cqring_wait"]),
            Doing::Scheduler,
        ),
    ];
    for (frames, want) in &cases {
        assert_eq!(classify(frames), *want, "{frames:?}");
    }
    let script = "\
\tffffffff81e83f96 kmalloc_reserve+0xa6 ([kernel.kallsyms])
\tffffffff8206586e tcp_sendmsg_locked+0x5fe ([kernel.kallsyms])
\t          101829 syscall+0x19 (/usr/lib/x86_64-linux-gnu/libc.so.6)

\t          31d541 llmproxy::proxy::forward::forward::{{closure}}+0x9ac1 (/bin/llmproxy)

\tffffffff81b7f352 io_submit_sqes+0x212 ([kernel.kallsyms])
";
    let counts = count(script);
    let at = |d: Doing| DOINGS.iter().position(|&x| x == d).map(|i| counts[i]);
    assert_eq!(at(Doing::SendOwn), Some(1));
    assert_eq!(at(Doing::User), Some(1));
    assert_eq!(at(Doing::Ring), Some(1));
    assert_eq!(counts.iter().sum::<u64>(), 3);
    let stat = "# started on Mon Dec  7 19:29:35 2026\n\n1378607,,io_uring:io_uring_submit_req,7487578898,100.00,,\n34712,,raw_syscalls:sys_enter,7487578898,100.00,,\n";
    assert_eq!(
        stat_note(stat, 47947).as_deref(),
        Some("kernel counts per request: io_uring_submit_req 28.75, sys_enter 0.72")
    );
    assert_eq!(stat_note(stat, 0), None);
    assert_eq!(stat_note("# nothing\n", 10), None);
    eprintln!("load benchmark: profile self-check passed");
}
