//! What is measured — direct (no proxy), llmproxy (plain, with access log, two workers, epoll
//! driver, client TLS), nginx, HAProxy — and the mock backend behind them: their configuration, how each is started
//! and pinned (proxy on CPU 0, mock on CPU 1) and the readiness probe (a real proxied request
//! answered 200, which is also the startup figure). Every llmproxy default stays except what a
//! fair comparison needs, said beside each setting: a change here changes what BENCHMARKS.md
//! compares.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memchr::memmem;

use crate::hook::Receiver;
use crate::http::blocking_request_tls;
use crate::measure::children_of;
use crate::process::{free_port, tail, Proc};
use crate::workload::{chat_request, Workload, TOKENS};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum TargetKind {
    Direct,
    Llmproxy,
    LlmproxyLog,
    Nginx,
    /// HAProxy (issue 17), configured like nginx: the other C proxy llmproxy is held against.
    Haproxy,
    Llmproxy2w,
    /// llmproxy with `io_driver: epoll`: what io_uring is worth, in the same run.
    LlmproxyEpoll,
    /// Opt-in: the clients' key configured with `rpm`/`tpm` far above the load, per-process
    /// buckets (`ratelimit.store: local`): the request path of a rate-limited key.
    LlmproxyKeys,
    /// Opt-in: the same with `ratelimit.store: redis` against a redis-server the benchmark starts
    /// (pinned with the mock): what sharing the limits costs the request path.
    LlmproxyRedis,
    /// llmproxy with client TLS on `listen` (issue 16): what TLS costs, against `Llmproxy`.
    LlmproxyTls,
    /// llmproxy as the README's first snippet runs it: every usage event delivered to a webhook
    /// (this process's receiver, `hook`) through a disk spool. Its CPU includes the delivery
    /// thread's; the run checks that every request answered reached the receiver.
    LlmproxyHook,
    /// Opt-in: plain `llmproxy`'s configuration run by another binary (`LOAD_BASE_BIN`, an older
    /// build): before and after a change, in the same run.
    LlmproxyBase,
    /// Opt-in: llmproxy with `usage.inject_include_usage: false`: the backend is not asked for
    /// usage (neither the final usage chunk nor the running usage of every chunk), so streams are
    /// billed what the proxy counts. What exact billing of every stream costs, proxy and backend.
    LlmproxyNoInject,
    /// Opt-in: nginx adding what llmproxy adds to every exchange (`X-Forwarded-For` and
    /// `X-Request-Id` upstream, `X-Request-Id` to the client): what those headers cost the load
    /// side, apart from the proxy.
    NginxIds,
}

impl TargetKind {
    pub(crate) const ALL: [TargetKind; 14] = [
        TargetKind::Direct,
        TargetKind::Llmproxy,
        TargetKind::LlmproxyLog,
        TargetKind::Nginx,
        TargetKind::Haproxy,
        TargetKind::Llmproxy2w,
        TargetKind::LlmproxyEpoll,
        TargetKind::LlmproxyKeys,
        TargetKind::LlmproxyRedis,
        TargetKind::LlmproxyTls,
        TargetKind::LlmproxyHook,
        TargetKind::LlmproxyBase,
        TargetKind::LlmproxyNoInject,
        TargetKind::NginxIds,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            TargetKind::Direct => "direct",
            TargetKind::Llmproxy => "llmproxy",
            TargetKind::LlmproxyLog => "llmproxy+log",
            TargetKind::Nginx => "nginx",
            TargetKind::Haproxy => "haproxy",
            TargetKind::Llmproxy2w => "llmproxy-2w",
            TargetKind::LlmproxyEpoll => "llmproxy-epoll",
            TargetKind::LlmproxyKeys => "llmproxy-keys",
            TargetKind::LlmproxyRedis => "llmproxy-redis",
            TargetKind::LlmproxyTls => "llmproxy-tls",
            TargetKind::LlmproxyHook => "llmproxy-hook",
            TargetKind::LlmproxyBase => "llmproxy-base",
            TargetKind::LlmproxyNoInject => "llmproxy-noinject",
            TargetKind::NginxIds => "nginx-ids",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<TargetKind> {
        match s.trim().to_ascii_lowercase().as_str() {
            "direct" => Some(TargetKind::Direct),
            "llmproxy" => Some(TargetKind::Llmproxy),
            "llmproxy-log" | "llmproxy+log" => Some(TargetKind::LlmproxyLog),
            "nginx" => Some(TargetKind::Nginx),
            "haproxy" => Some(TargetKind::Haproxy),
            "llmproxy-2w" | "llmproxy2w" => Some(TargetKind::Llmproxy2w),
            "llmproxy-epoll" => Some(TargetKind::LlmproxyEpoll),
            "llmproxy-keys" => Some(TargetKind::LlmproxyKeys),
            "llmproxy-redis" => Some(TargetKind::LlmproxyRedis),
            "llmproxy-tls" => Some(TargetKind::LlmproxyTls),
            "llmproxy-hook" => Some(TargetKind::LlmproxyHook),
            "llmproxy-base" => Some(TargetKind::LlmproxyBase),
            "llmproxy-noinject" => Some(TargetKind::LlmproxyNoInject),
            "nginx-ids" => Some(TargetKind::NginxIds),
            _ => None,
        }
    }
}

pub(crate) struct Ctx {
    /// The open-files limit every child inherits.
    pub(crate) nofile: u64,
    pub(crate) bin: PathBuf,
    /// `LOAD_BASE_BIN`: the binary of the `llmproxy-base` target.
    pub(crate) base_bin: Option<PathBuf>,
    /// `LOAD_BASE_HOOK`: `llmproxy-base` runs `llmproxy-hook`'s configuration.
    pub(crate) base_hook: bool,
    pub(crate) nginx: Option<PathBuf>,
    pub(crate) haproxy: Option<PathBuf>,
    pub(crate) tmp: PathBuf,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) tls: BenchTls,
}

/// The TLS target's certificate (for `localhost`, from a CA made at start with rcgen, written
/// into the temporary directory) and the client config that trusts it.
pub(crate) struct BenchTls {
    cert: PathBuf,
    key: PathBuf,
    pub(crate) client: Arc<rustls::ClientConfig>,
}

impl BenchTls {
    pub(crate) fn new(dir: &Path) -> Result<BenchTls, String> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let e = |e: rcgen::Error| e.to_string();
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().map_err(e)?;
        let ca_cert = ca.self_signed(&ca_key).map_err(e)?;
        let issuer = Issuer::new(ca, ca_key);
        let leaf_key = KeyPair::generate().map_err(e)?;
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .map_err(e)?
            .signed_by(&leaf_key, &issuer)
            .map_err(e)?;
        let cert = dir.join("tls.crt");
        let key = dir.join("tls.key");
        std::fs::write(&cert, leaf.pem()).map_err(|e| e.to_string())?;
        std::fs::write(&key, leaf_key.serialize_pem()).map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca_cert.der().clone())
            .map_err(|e| e.to_string())?;
        // The proxy's defaults (TLS 1.3 preferred, ALPN http/1.1): what a client would get.
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(BenchTls {
            cert,
            key,
            client: Arc::new(client),
        })
    }
}

pub(crate) struct Mock {
    pub(crate) proc: Proc,
    pub(crate) addr: SocketAddr,
}

pub(crate) fn start_mock(ctx: &Ctx, wl: &Workload) -> Result<Mock, String> {
    let log = ctx.tmp.join(format!("mock-{}.log", wl.id));
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1"])
        .arg(&ctx.bin)
        .args(["mock-backend", "--port", "0", "--ttft-ms", "0"])
        .args(["--token-delay-ms", &wl.token_delay_ms.to_string()])
        .args(["--tokens", &wl.tokens.to_string()])
        .args(wl.burst.then_some("--burst"))
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
pub(crate) struct Running {
    pub(crate) addr: SocketAddr,
    /// None for `direct`.
    pub(crate) proc: Option<Proc>,
    /// The processes whose CPU and memory are the proxy's (nginx: master and worker).
    pub(crate) pids: Vec<i32>,
    /// From just before spawning to the first proxied 200.
    pub(crate) ready_after: Duration,
    pub(crate) log: Option<PathBuf>,
    /// A process the target needs (the redis-server of `llmproxy-redis`), stopped with it.
    pub(crate) sidecar: Option<Proc>,
    /// Some: the target speaks TLS and this is the client config to reach it.
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    /// The webhook receiver of `llmproxy-hook`.
    pub(crate) hook: Option<Receiver>,
}

pub(crate) fn start_target(
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
            sidecar: None,
            tls: None,
            hook: None,
        }),
        TargetKind::Llmproxy
        | TargetKind::LlmproxyLog
        | TargetKind::Llmproxy2w
        | TargetKind::LlmproxyEpoll
        | TargetKind::LlmproxyNoInject
        | TargetKind::LlmproxyTls => start_llmproxy(ctx, mock, kind, tag, conns, ""),
        TargetKind::LlmproxyBase if !ctx.base_hook => {
            start_llmproxy(ctx, mock, kind, tag, conns, "")
        }
        TargetKind::LlmproxyKeys => {
            let extra = format!("{BENCH_KEY_LIMITS}ratelimit:\n  store: local\n");
            start_llmproxy(ctx, mock, kind, tag, conns, &extra)
        }
        TargetKind::LlmproxyRedis => {
            let (redis, port) = start_redis(ctx, tag)?;
            let extra = format!(
                "{BENCH_KEY_LIMITS}ratelimit:\n  store: redis\n  \
                 redis_url: \"redis://127.0.0.1:{port}/0\"\n  sync_interval: 100ms\n"
            );
            let mut running = start_llmproxy(ctx, mock, kind, tag, conns, &extra)?;
            running.sidecar = Some(redis);
            Ok(running)
        }
        TargetKind::LlmproxyHook | TargetKind::LlmproxyBase => {
            let hook = Receiver::start()?;
            let spool = ctx.tmp.join(format!("spool-{tag}"));
            let extra = format!(
                "usage_hook:\n  enabled: true\n  url: \"http://{}/usage\"\n  spool_dir: \"{}\"\n",
                hook.addr,
                spool.display()
            );
            let mut running = start_llmproxy(ctx, mock, kind, tag, conns, &extra)?;
            running.hook = Some(hook);
            Ok(running)
        }
        TargetKind::Nginx => start_nginx(ctx, mock, tag, conns, false),
        TargetKind::NginxIds => start_nginx(ctx, mock, tag, conns, true),
        TargetKind::Haproxy => start_haproxy(ctx, mock, tag, conns),
    }
}

/// The clients' key (`workload::chat_request` sends it) with limits the load never reaches: one
/// request per 60 ns and a token per 60 ps refill, so every request takes the limiter's whole
/// path and none is refused.
const BENCH_KEY_LIMITS: &str = "auth:\n  keys:\n    - name: bench\n      \
     key: \"sk-bench-0123456789abcdef\"\n      rpm: 1000000000\n      tpm: 1000000000000\n";

/// A redis-server for `llmproxy-redis`, pinned to CPU 1 with the mock, no persistence.
fn start_redis(ctx: &Ctx, tag: &str) -> Result<(Proc, u16), String> {
    let port = free_port()?;
    let log = ctx.tmp.join(format!("redis-{tag}.log"));
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1", "redis-server", "--port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdin(Stdio::null())
        .stdout(File::create(&log).map_err(|e| e.to_string())?)
        .stderr(Stdio::null());
    let proc = Proc::spawn("redis-server", cmd)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            return Err(format!("redis-server did not listen: {}", tail(&log, 5)));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((proc, port))
}

/// llmproxy in the configuration `kind` names: the access log, two workers, the epoll driver,
/// client TLS or a rate-limited key, one at a time, each against the plain `llmproxy`.
pub(crate) fn start_llmproxy(
    ctx: &Ctx,
    mock: SocketAddr,
    kind: TargetKind,
    tag: &str,
    conns: usize,
    extra: &str,
) -> Result<Running, String> {
    let access_log = kind == TargetKind::LlmproxyLog;
    let cpus = if kind == TargetKind::Llmproxy2w {
        "0,1"
    } else {
        "0"
    };
    let io_driver = if kind == TargetKind::LlmproxyEpoll {
        "epoll"
    } else {
        "auto"
    };
    let tls = kind == TargetKind::LlmproxyTls;
    let port = free_port()?;
    let pool = conns.max(64);
    let config = ctx.tmp.join(format!("llmproxy-{tag}.yaml"));
    // Everything at its default except: the address, no drain on stop, an idle upstream pool of
    // one connection per client connection (the default 64 is below w3/w4's concurrency; nginx
    // gets the same `keepalive`), and the access log per configuration.
    // Usage extraction, include_usage injection and metrics are on (their defaults).
    let inject = kind != TargetKind::LlmproxyNoInject;
    let yaml = format!(
        "listen: \"127.0.0.1:{port}\"\n\
         shutdown_grace: 0s\n\
         io_driver: {io_driver}\n\
         backends:\n  - url: \"http://{mock}\"\n\
         pool:\n  max_idle_per_backend: {pool}\n\
         usage:\n  inject_include_usage: {inject}\n\
         logging:\n  level: info\n  format: json\n  access_log: {access_log}\n{extra}"
    );
    // The TLS target: the same, with client TLS on listen (keep-alive connections, so the
    // handshake is paid once per connection, as a client with a pool would).
    let yaml = if tls {
        format!(
            "{yaml}tls:\n  cert_file: \"{}\"\n  key_file: \"{}\"\n",
            ctx.tls.cert.display(),
            ctx.tls.key.display()
        )
    } else {
        yaml
    };
    let client_tls = tls.then(|| ctx.tls.client.clone());
    std::fs::write(&config, yaml).map_err(|e| e.to_string())?;
    // The access log goes to stderr, redirected to a file (a real file, not /dev/null, so its
    // cost is the cost of a production log).
    let log = ctx.tmp.join(format!("llmproxy-{tag}.log"));
    let bin = match kind {
        TargetKind::LlmproxyBase => ctx
            .base_bin
            .as_ref()
            .ok_or("llmproxy-base needs LOAD_BASE_BIN")?,
        _ => &ctx.bin,
    };
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", cpus])
        .arg(bin)
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
    let ready_after = wait_ready(addr, &mut proc, started, &log, client_tls.as_ref())?;
    Ok(Running {
        addr,
        pids: vec![proc.pid()],
        proc: Some(proc),
        ready_after,
        log: Some(log),
        sidecar: None,
        tls: client_tls,
        hook: None,
    })
}

pub(crate) fn start_nginx(
    ctx: &Ctx,
    mock: SocketAddr,
    tag: &str,
    conns: usize,
    ids: bool,
) -> Result<Running, String> {
    let nginx = ctx.nginx.as_ref().ok_or("nginx is not installed")?;
    let ids = if ids {
        "            proxy_set_header X-Forwarded-For $remote_addr;\n\
                     proxy_set_header X-Request-Id $request_id;\n\
                     add_header X-Request-Id $request_id always;\n"
    } else {
        ""
    };
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
         {ids}\
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
    let ready_after = wait_ready(addr, &mut proc, started, &prefix.join("error.log"), None)?;
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
        sidecar: None,
        tls: None,
        hook: None,
    })
}

/// HAProxy as a plain reverse proxy, set up like nginx: one thread pinned to CPU 0 (`nbthread 1`,
/// `cpu-map`, and `taskset`), `mode http` with keep-alive on both sides, idle server connections
/// shared between clients (`http-reuse always`), `option http-no-delay` (no Nagle-style merging
/// of small writes: every SSE event goes out when it arrives, as with llmproxy and nginx's
/// `proxy_buffering off`), no logging, and timeouts longer than any stream of the run. Buffers are
/// HAProxy's defaults (`tune.bufsize` 16 KiB, allocated only while data is in flight).
/// `benches/callgrind.sh` writes the same settings for its HAProxy runs: keep the two in step.
pub(crate) fn start_haproxy(
    ctx: &Ctx,
    mock: SocketAddr,
    tag: &str,
    conns: usize,
) -> Result<Running, String> {
    let haproxy = ctx.haproxy.as_ref().ok_or("haproxy is not installed")?;
    let port = free_port()?;
    let dir = ctx.tmp.join(format!("haproxy-{tag}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // HAProxy sizes its file descriptors from `maxconn` (2 × maxconn + 14 with this
    // configuration) and refuses to start when that is above an open-files limit it cannot
    // raise (`strict-limits`, its default): every connection the run opens, within the limit.
    let nofile = usize::try_from(ctx.nofile).unwrap_or(usize::MAX);
    let maxconn = (conns + 1024).min(nofile.saturating_sub(32) / 2);
    let conf = format!(
        "global
             nbthread 1
             cpu-map 1/1 0
             maxconn {maxconn}
         defaults
             mode http
             option http-keep-alive
             option http-no-delay
             http-reuse always
             timeout connect 5s
             timeout client 1h
             timeout server 1h
             timeout http-request 10s
             timeout http-keep-alive 75s
         frontend bench
             bind 127.0.0.1:{port} backlog 4096
             maxconn {maxconn}
             default_backend mock
         backend mock
             server mock {mock}
"
    );
    let conf_path = dir.join("haproxy.cfg");
    std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
    let log_path = dir.join("stderr.log");
    let log = File::create(&log_path).map_err(|e| e.to_string())?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    // `-db`: foreground, one process (no master-worker), so its PID is the proxy's.
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"])
        .arg(haproxy)
        .args(["-db", "-f"])
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    let mut proc = Proc::spawn("haproxy", cmd)?;
    let ready_after = wait_ready(addr, &mut proc, started, &log_path, None)?;
    Ok(Running {
        addr,
        pids: vec![proc.pid()],
        proc: Some(proc),
        ready_after,
        log: Some(log_path),
        sidecar: None,
        tls: None,
        hook: None,
    })
}

/// Poll with a real proxied request (non-streaming chat) until it answers 200.
pub(crate) fn wait_ready(
    addr: SocketAddr,
    proc: &mut Proc,
    started: Instant,
    log: &Path,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Duration, String> {
    // The same request as W1's, answered at once whatever the workload's token delay (the
    // mock's per-request knob; proxies forward the header).
    let w1 = chat_request(addr, false, TOKENS, false, false);
    let split = memmem::find(&w1, b"\r\n").unwrap_or(0) + 2;
    let mut req = w1[..split].to_vec();
    req.extend_from_slice(b"x-mock-token-delay-ms: 0\r\n");
    req.extend_from_slice(&w1[split..]);
    let deadline = started + Duration::from_secs(10);
    let mut last: String;
    loop {
        match blocking_request_tls(addr, &req, Duration::from_secs(2), tls) {
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
