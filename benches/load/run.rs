//! One target under one workload, from start to figures: it starts the target, the load
//! generator and (optionally) perf, samples /proc at both edges of the window, and turns the
//! client's `Acc` and the samples into a `RunResult` with its notes; also the startup and idle
//! memory figures. It never formats a table (`report` does), and it returns only once the mock is
//! idle again, so each run starts on equal terms.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use memchr::memmem;

use crate::client::{spawn_load, Spec, FAILURE_KINDS, LATE};
use crate::hook;
use crate::http::get;
use crate::measure::{
    clk_tck, percentiles, perf_file, start_perf, usage, Sample, Usage, THREAD_GROUPS,
};
use crate::options::Options;
use crate::process::sleep_until;
use crate::profile;
use crate::targets::{start_target, Ctx, Mock, TargetKind};
use crate::wire;
use crate::workload::{chat_request, Workload, TOKEN_MARK};

#[derive(Default)]
pub(crate) struct RunResult {
    pub(crate) target: String,
    pub(crate) failed: Option<String>,
    pub(crate) secs: f64,
    pub(crate) ok: u64,
    pub(crate) lat: [Option<f64>; 3],
    pub(crate) ttft: [Option<f64>; 3],
    pub(crate) gap: [Option<f64>; 3],
    pub(crate) errors: u64,
    pub(crate) error_note: String,
    pub(crate) proxy: Option<(Usage, Usage)>,
    pub(crate) load_cpu: f64,
    pub(crate) other_cpu: f64,
    pub(crate) steal: f64,
    pub(crate) tokens: u64,
    pub(crate) streaming_at_end: i64,
    pub(crate) connections_at_end: i64,
    pub(crate) note: String,
    /// CPU time of the mock backend and the load generator per completed request.
    pub(crate) load_us_per_req: Option<f64>,
    /// Context switches per completed request: (proxy, load side).
    pub(crate) switches: Option<(f64, f64)>,
    /// TCP segments sent (all hops) per completed request.
    pub(crate) segments: Option<f64>,
    /// The same, split by the proxy's two hops and direction (`wire`).
    pub(crate) wire: Option<wire::PerRequest>,
    /// `llmproxy-hook`: what the webhook receiver held once the proxy's usage settled.
    pub(crate) hook: Option<hook::Settled>,
    /// `--perf`: the share of the window's samples by what the proxy was doing, and their count.
    pub(crate) profile: Option<profile::Profile>,
}

/// How long after the window the hook target's events may take to reach the receiver (the
/// batches' flush interval is 1 s; the spool may hold a backlog from the window).
const HOOK_SETTLE: Duration = Duration::from_secs(20);

impl RunResult {
    pub(crate) fn rps(&self) -> f64 {
        self.ok as f64 / self.secs
    }

    pub(crate) fn proxy_cpu(&self) -> Option<f64> {
        self.proxy.map(|(a, b)| b.cpu - a.cpu)
    }

    pub(crate) fn cpu_pct(&self) -> Option<f64> {
        self.proxy_cpu().map(|c| 100.0 * c / self.secs)
    }

    pub(crate) fn cpu_us_per_req(&self) -> Option<f64> {
        self.proxy_cpu()
            .filter(|_| self.ok > 0)
            .map(|c| c * 1e6 / self.ok as f64)
    }

    pub(crate) fn pss_mb(&self) -> Option<f64> {
        self.proxy.map(|(_, b)| b.pss_kib as f64 / 1024.0)
    }

    pub(crate) fn rss_mb(&self) -> Option<f64> {
        self.proxy.map(|(_, b)| b.rss_kib as f64 / 1024.0)
    }

    pub(crate) fn hwm_mb(&self) -> Option<f64> {
        self.proxy.map(|(_, b)| b.hwm_kib as f64 / 1024.0)
    }
}

pub(crate) fn run_target(
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
    let window_secs = wl.window_secs(opts.secs);
    let t1 = t0 + Duration::from_secs_f64(window_secs);
    let spec = Spec {
        addr: running.addr,
        conns: wl.conns,
        request: chat_request(
            running.addr,
            wl.stream,
            wl.tokens,
            opts.sdk_headers,
            opts.client_usage,
        ),
        stream: wl.stream,
        tokens: wl.tokens,
        record_gaps: wl.token_delay_ms > 0,
        timeout: wl.timeout,
        ramp: wl.ramp,
        t0,
        t1,
        finder: memmem::Finder::new(TOKEN_MARK),
        stop: ctx.stop.clone(),
        tls: running.tls.clone(),
        period: wl
            .rate
            .map(|rate| Duration::from_secs_f64(wl.conns as f64 / rate)),
    };
    let load = spawn_load(spec);
    let load_pids = [mock.proc.pid(), self_pid];
    // The proxy's sockets by hop and the requests the mock completed (not for `direct`: no
    // proxy), read after the CPU figures.
    let hops = || {
        if running.pids.is_empty() {
            return None;
        }
        let sockets = wire::snapshot(running.addr.port(), mock.addr.port())?;
        Some((sockets, mock_stat(mock.addr, "completed")?))
    };
    let hops_end = t1 - Duration::from_secs_f64((window_secs / 10.0).min(0.25));
    let window =
        sleep_until(t0, &ctx.stop).map(|()| (Sample::take(&running.pids, &load_pids), hops()));
    let mut perf = match (&opts.perf, window.is_ok() && !running.pids.is_empty()) {
        (Some(dir), true) => start_perf(dir, &tag, &running.pids, window_secs, opts.perf_stat),
        _ => None,
    };
    let end = window.and_then(|start| {
        sleep_until(hops_end, &ctx.stop)?;
        let hops = hops();
        // Memory while every stream is still open: at t1 the load generator starts closing
        // them, and a sample taken then raced the teardown (W4 read 50 MB for 117 MB held).
        let held = usage(&running.pids);
        sleep_until(t1, &ctx.stop)?;
        let mut last = Sample::take(&running.pids, &load_pids);
        last.proxy = Usage {
            cpu: last.proxy.cpu,
            hwm_kib: last.proxy.hwm_kib,
            ..held
        };
        Ok((start, (last, hops)))
    });
    let acc = load
        .join()
        .map_err(|_| "load generator panicked".to_string())??;
    let recorded = perf.as_mut().map(|p| {
        // perf stops by itself after the window; give it time to write its file.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !p.has_exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        p.has_exited()
    });
    drop(perf);
    let ((s0, wire0), (s1, wire1)) = end?;
    // Billing's side, after the window's figures were taken (waiting costs the proxy nothing
    // that is measured).
    let settled = running
        .hook
        .as_ref()
        .map(|h| hook::settle(h, running.addr, t1, HOOK_SETTLE));
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
    r.wire = match (&wire0, &wire1) {
        (Some((a, n0)), Some((b, n1))) => wire::per_request(a, b, n1.saturating_sub(*n0)),
        _ => None,
    };
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
    if let Some(w) = &r.wire {
        notes.push(w.note());
    }
    // Where llmproxy's CPU went, by thread (C proxies' threads are not named so: skipped).
    let threads: Vec<f64> = (0..THREAD_GROUPS.len())
        .map(|g| s1.proxy_threads[g].saturating_sub(s0.proxy_threads[g]) as f64 / tick)
        .collect();
    if r.ok > 0 && threads[..3].iter().any(|&c| c > 0.0) {
        let per: Vec<String> = THREAD_GROUPS
            .iter()
            .zip(&threads)
            .map(|(name, secs)| format!("{name} {:.2}", secs * 1e6 / r.ok as f64))
            .collect();
        notes.push(format!("CPU µs/req by thread: {}", per.join(", ")));
    }
    if let (Some(dir), Some(true)) = (&opts.perf, recorded) {
        let file = perf_file(dir, &tag, opts.perf_stat);
        if opts.perf_stat {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            if let Some(note) = profile::stat_note(&text, r.ok) {
                notes.push(note);
            }
        } else {
            r.profile = profile::shares(&file);
        }
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
    if let Some(rate) = wl.rate {
        let late = if acc.due == 0 {
            0.0
        } else {
            acc.late as f64 * 100.0 / acc.due as f64
        };
        notes.push(format!(
            "offered {rate:.0} req/s ({} due in the window), {late:.1}% of them started over {} ms late",
            acc.due,
            LATE.as_millis()
        ));
        if late > 1.0 {
            eprintln!(
                "[{}] warning: {} fell behind the offered rate ({late:.1}% late starts): its \
                 figures are not at the offered rate",
                wl.id,
                kind.name()
            );
        }
    }
    if let Some(settled) = &settled {
        notes.push(settled.note());
        if !settled.complete() {
            eprintln!("[{}] warning: {}", wl.id, settled.note());
        }
    }
    r.hook = settled;
    if matches!(
        kind,
        TargetKind::Llmproxy
            | TargetKind::LlmproxyLog
            | TargetKind::LlmproxyHook
            | TargetKind::Llmproxy2w
            | TargetKind::LlmproxyEpoll
            | TargetKind::LlmproxyNoInject
            | TargetKind::LlmproxyKeys
            | TargetKind::LlmproxyRedis
            | TargetKind::LlmproxyBase
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
pub(crate) fn mock_stat(mock: SocketAddr, key: &str) -> Option<u64> {
    get(mock, "/mock/stats")
        .ok()
        .and_then(|(_, body)| serde_json::from_slice::<serde_json::Value>(&body).ok())
        .and_then(|v| v.get(key)?.as_u64())
}

/// Wait until the mock reports no request in progress; Some(active) if it does not get there.
pub(crate) fn wait_mock_idle(mock: SocketAddr, limit: Duration) -> Option<u64> {
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

/// Driver and usage accounting as llmproxy's own /metrics reports them after a run (shows that
/// usage extraction really ran).
pub(crate) fn llmproxy_metrics_note(addr: SocketAddr) -> String {
    let Ok((200, body)) = get(addr, "/metrics") else {
        return "metrics: unavailable".into();
    };
    let text = String::from_utf8_lossy(&body);
    let mut driver = "?".to_string();
    let mut completion = 0.0;
    let value = |line: &str| {
        line.rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Rate-limit targets: refusals (must be none) and the Redis syncs behind them.
    let (mut rejected, mut syncs, mut sync_secs, mut sync_errors) = (0.0, None, 0.0, 0.0);
    for line in text.lines() {
        if line.starts_with("llmproxy_rejected_total{") {
            rejected += value(line);
        } else if line.starts_with("llmproxy_ratelimit_sync_seconds_count") {
            syncs = Some(value(line));
        } else if line.starts_with("llmproxy_ratelimit_sync_seconds_sum") {
            sync_secs = value(line);
        } else if line.starts_with("llmproxy_ratelimit_sync_errors_total") {
            sync_errors = value(line);
        }
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
    let mut note = format!(
        "llmproxy driver {driver}, usage extracted: {completion:.0} completion tokens counted"
    );
    if rejected > 0.0 {
        note.push_str(&format!(", {rejected:.0} requests rejected"));
    }
    if let Some(n) = syncs.filter(|n| *n > 0.0) {
        note.push_str(&format!(
            ", {n:.0} Redis syncs of {:.2} ms mean, {sync_errors:.0} failed",
            sync_secs / n * 1e3
        ));
    }
    note
}

pub(crate) struct Startup {
    pub(crate) target: &'static str,
    pub(crate) times_ms: Vec<f64>,
    pub(crate) idle: Usage,
}

pub(crate) fn measure_startup(
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
