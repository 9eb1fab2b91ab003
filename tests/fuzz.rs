//! Fuzz targets for every parser the proxy owns, on stable Rust (the engine: `fuzz/engine.rs`).
//!
//! `cargo test --test fuzz` replays each target's corpus (`fuzz/corpus/<target>/`) and fuzzes it
//! for 2 s; CI runs `FUZZ_SECONDS=60 cargo test --test fuzz`. The seed is fixed unless
//! `FUZZ_SEED=clock` (or another number) says otherwise.

#[path = "fuzz/chunked.rs"]
mod chunked;
#[path = "fuzz/config.rs"]
mod config;
#[path = "fuzz/dns.rs"]
mod dns;
#[path = "fuzz/engine.rs"]
mod engine;
#[path = "fuzz/head.rs"]
mod head;
#[path = "fuzz/prom.rs"]
mod prom;
#[path = "fuzz/rewrite.rs"]
mod rewrite;
#[path = "fuzz/sse.rs"]
mod sse;

#[test]
fn fuzz_http_head() {
    engine::run(&head::TARGET);
}

#[test]
fn fuzz_chunked() {
    engine::run(&chunked::TARGET);
}

#[test]
fn fuzz_sse_usage() {
    engine::run(&sse::TARGET);
}

#[test]
fn fuzz_include_usage() {
    engine::run(&rewrite::TARGET);
}

#[test]
fn fuzz_config() {
    engine::run(&config::TARGET);
}

#[test]
fn fuzz_dns_answer() {
    engine::run(&dns::TARGET);
}

#[test]
fn fuzz_engine_metrics() {
    engine::run(&prom::TARGET);
}
