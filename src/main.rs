//! CLI → config → start threads → wait for signals → drain → exit.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
// No unsafe code, as in the library, but for `allocator` (see its header).
#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use llmproxy::config::{self, Config};
use llmproxy::telemetry::logging;
use llmproxy::{mock, runtime};

mod allocator;
mod demo;

/// mimalloc rather than glibc's malloc: measured cheaper per request (see Cargo.toml and
/// `allocator`).
#[global_allocator]
static GLOBAL: allocator::Mimalloc = allocator::Mimalloc;

/// Thread-per-core io_uring reverse proxy for self-hosted LLM inference servers
/// (vLLM, TGI, SGLang, llama.cpp, any OpenAI-compatible server).
#[derive(Parser)]
#[command(
    name = "llmproxy",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args)]
struct RunArgs {
    /// Configuration file (YAML).
    #[arg(short, long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Worker threads (one event loop each). Default: CPUs available to the process.
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Pin one worker per listed CPU, e.g. `0-3,8`.
    #[arg(long, value_name = "LIST")]
    cpus: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file and exit (0 = valid, 1 = errors printed). Warnings (such as
    /// a backend name that does not resolve from here) are printed and do not fail the check.
    Check {
        /// The configuration file (or give it as --config PATH).
        #[arg(
            value_name = "PATH",
            required_unless_present = "config",
            conflicts_with = "config"
        )]
        path: Option<PathBuf>,
        #[arg(short, long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Ask a running proxy to re-read its config file (POST /admin/reload); same as SIGHUP.
    /// Give either --config or --admin.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["config", "admin"])))]
    Reload {
        /// The running proxy's config: the request goes to its admin_listen (else its listen).
        #[arg(short, long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Address of the admin endpoint instead, e.g. 127.0.0.1:9901 (http:// may be given).
        #[arg(long, value_name = "HOST:PORT")]
        admin: Option<String>,
    },
    /// Run the whole system on loopback: two simulated backends and the proxy.
    Demo {
        /// Proxy port on 127.0.0.1.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[arg(long, value_name = "N")]
        workers: Option<usize>,
    },
    /// Run a simulated OpenAI-compatible backend (for tests, demos and benchmarks).
    MockBackend {
        /// Address to bind (e.g. 0.0.0.0 inside a container).
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Delay before the first token.
        #[arg(long, default_value_t = 0)]
        ttft_ms: u64,
        /// Delay between tokens.
        #[arg(long, default_value_t = 0)]
        token_delay_ms: u64,
        /// With no delays, write a whole stream at once (head, events, end) instead of one
        /// write per event.
        #[arg(long)]
        burst: bool,
        /// Completion tokens when a request sets no max_tokens.
        #[arg(long, default_value_t = 16)]
        tokens: u32,
        /// Model name it reports.
        #[arg(long, default_value = "mock-model")]
        model: String,
        /// vllm:num_requests_waiting its /metrics reports (also settable via /mock/control).
        #[arg(long, default_value_t = 0.0)]
        engine_waiting: f64,
        /// vllm:kv_cache_usage_perc its /metrics reports, 0-1.
        #[arg(long, default_value_t = 0.0)]
        engine_kv_usage: f64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Panics are contained per connection; make them visible in the structured log.
    std::panic::set_hook(Box::new(|info| log::error!("panic: {info}")));
    let result = match cli.command {
        Some(Command::Check { path, config }) => match path.or(config) {
            Some(p) => check(&p),
            None => Err(anyhow::anyhow!(
                "give the configuration file: llmproxy check PATH"
            )),
        },
        Some(Command::Demo { port, workers }) => demo(port, workers),
        Some(Command::Reload { config, admin }) => reload(config.as_deref(), admin),
        Some(Command::MockBackend {
            host,
            port,
            ttft_ms,
            token_delay_ms,
            burst,
            tokens,
            model,
            engine_waiting,
            engine_kv_usage,
        }) => mock::run(mock::MockOptions {
            host,
            port,
            ttft: Duration::from_millis(ttft_ms),
            token_delay: Duration::from_millis(token_delay_ms),
            burst,
            tokens,
            model,
            engine: mock::EngineKnobs {
                waiting: engine_waiting,
                kv_usage: engine_kv_usage,
                ..mock::EngineKnobs::default()
            },
        })
        .map(|()| ExitCode::SUCCESS),
        None => run(cli.run),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Once logging is set up the error goes to the log, in its format (where an
            // operator's log collector finds it); before that, or with logging off, to stderr.
            // Never both: one error, one line.
            if log::log_enabled!(log::Level::Error) {
                log::error!("{e:#}");
                log::logger().flush();
            } else {
                eprintln!("llmproxy: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let cfg = match load(path) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("{e:#}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if let Err(e) = runtime::preflight(&cfg) {
        eprintln!("{}: {e:#}", path.display());
        return Ok(ExitCode::FAILURE);
    }
    for w in runtime::warnings(&cfg) {
        eprintln!("{}: warning: {w}", path.display());
    }
    let n = cfg.backends.len();
    println!(
        "{}: ok ({n} {}, strategy {})",
        path.display(),
        if n == 1 { "backend" } else { "backends" },
        cfg.strategy.as_str()
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads and validates the config file; the error names the path once (an I/O error already
/// carries it) and lists every problem, one per line.
fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| match e {
        config::ConfigError::Io { .. } => anyhow::anyhow!("{e}"),
        config::ConfigError::Invalid(lines) => anyhow::anyhow!(
            "{}: invalid configuration:\n  {}",
            path.display(),
            lines.join("\n  ")
        ),
    })
}

fn apply_overrides(
    cfg: &mut Config,
    workers: Option<usize>,
    cpus: Option<String>,
) -> anyhow::Result<()> {
    if let Some(list) = cpus {
        cfg.cpus = Some(config::parse_cpu_list(&list).map_err(|e| anyhow::anyhow!("--cpus: {e}"))?);
        cfg.workers = 0;
    }
    if let Some(n) = workers {
        if n == 0 {
            anyhow::bail!("--workers must be at least 1");
        }
        cfg.workers = n;
    }
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let Some(path) = args.config else {
        anyhow::bail!("--config PATH is required (or try `llmproxy demo`; see --help)");
    };
    let mut cfg = load(&path)?;
    apply_overrides(&mut cfg, args.workers, args.cpus)?;
    logging::init(cfg.logging.level, cfg.logging.format);
    serve(cfg, Some(path), |_| {})
}

/// `llmproxy reload`: POSTs /admin/reload to the proxy the config describes.
fn reload(config: Option<&std::path::Path>, admin: Option<String>) -> anyhow::Result<ExitCode> {
    let target = match (admin, config) {
        (Some(a), _) => admin_authority(&a),
        (None, Some(path)) => {
            let cfg = load(path)?;
            let mut addr = cfg.admin_listen.unwrap_or(cfg.listen);
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            addr.to_string()
        }
        (None, None) => anyhow::bail!("give --config PATH or --admin HOST:PORT"),
    };
    let url = format!("http://{target}/admin/reload");
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(70))
        .build();
    match agent.post(&url).call() {
        Ok(resp) => {
            println!("{}", resp.into_string().unwrap_or_default().trim());
            Ok(ExitCode::SUCCESS)
        }
        Err(ureq::Error::Status(code, resp)) => {
            eprintln!(
                "llmproxy: reload failed ({code}): {}",
                resp.into_string().unwrap_or_default().trim()
            );
            Ok(ExitCode::FAILURE)
        }
        // ureq's error already names the URL.
        Err(e) => anyhow::bail!("{e}"),
    }
}

/// `--admin` as HOST:PORT, also when given as a URL (`http://host:port/`).
fn admin_authority(admin: &str) -> String {
    let a = admin.trim();
    let a = a
        .strip_prefix("http://")
        .or_else(|| a.strip_prefix("HTTP://"))
        .unwrap_or(a);
    a.split('/').next().unwrap_or(a).to_string()
}

/// Runs the proxy until a stop signal; `started` is told the bound address.
fn serve(cfg: Config, path: Option<PathBuf>, started: fn(SocketAddr)) -> anyhow::Result<ExitCode> {
    let grace = cfg.shutdown_grace;
    // Registered before any thread starts so every thread inherits the mask-free default and the
    // main thread is the one that sees SIGTERM/SIGINT/SIGHUP.
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).context("installing signal handlers")?;
    let mut running = runtime::start_with(cfg, path)?;
    log::info!(
        "llmproxy {} listening on {} ({} workers, {} driver){}",
        env!("CARGO_PKG_VERSION"),
        running.addr(),
        running.workers(),
        running.driver(),
        running
            .admin_addr()
            .map(|a| format!(", admin on {a}"))
            .unwrap_or_default()
    );
    log::info!("{}", running.banner());
    log::logger().flush();
    started(running.addr());
    if running.driver() == "epoll" {
        log::warn!(
            "io_uring is unavailable (seccomp or kernel); running on epoll, which costs throughput"
        );
    }
    let mut signal = SIGTERM;
    for s in signals.forever() {
        if s != SIGHUP {
            signal = s;
            break;
        }
        log::info!("received SIGHUP; reloading the configuration");
        match running.reload() {
            Ok(summary) => log::info!(
                "reload done: version {}, added {:?}, removed {:?}, updated {:?}",
                summary.version,
                summary.added,
                summary.removed,
                summary.updated
            ),
            Err(e) => log::error!("reload failed, the running configuration stays: {e}"),
        }
    }
    log::info!(
        "received {}; draining (grace {:?})",
        if signal == SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        },
        grace
    );
    let started = std::time::Instant::now();
    running.begin_drain();
    let drained = running.wait_drained(grace);
    running.stop_health();
    // Cores push their last events on their next tick; then usage gets what is left of the grace
    // period (at least a moment) to reach the webhook. Undelivered events stay in the spool.
    std::thread::sleep(Duration::from_millis(150));
    let deadline = started
        .checked_add(grace)
        .unwrap_or(started)
        .max(std::time::Instant::now() + Duration::from_secs(2));
    running.flush_usage(deadline);
    if drained {
        log::info!("drained; exiting");
    } else {
        log::warn!(
            "grace period over with {} requests still in flight; exiting",
            running.in_flight()
        );
    }
    log::logger().flush();
    Ok(ExitCode::SUCCESS)
}

fn demo(port: u16, workers: Option<usize>) -> anyhow::Result<ExitCode> {
    let mut cfg = demo::config(port)?;
    apply_overrides(&mut cfg, workers, None)?;
    logging::init(cfg.logging.level, cfg.logging.format);
    serve(cfg, None, demo::announce)
}
