//! The vLLM-style `/metrics` the mock serves for the proxy's `least_load` scraper: the three
//! gauges it reads, with the values `/mock/control` set (running defaults to the requests being
//! served right now; with a batch size set, to those in the batch, and the ones queued for it
//! add to waiting). The text is built per scrape; it is never on the inference path.

use std::sync::atomic::Ordering;

use super::{state::Server, wire::Reply};

pub(super) fn metrics(server: &Server) -> Reply {
    let model = server
        .opts
        .model
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    let e = server.engine.get();
    let batch = &server.batch;
    let served = if e.max_running > 0.0 {
        batch.running() as f64
    } else {
        server.stats.active.load(Ordering::Relaxed) as f64
    };
    let running = e.running.unwrap_or(served);
    let (waiting, kv) = (e.waiting + batch.waiting() as f64, e.kv_usage);
    let body = format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{model_name=\"{model}\"}} {running}\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{model_name=\"{model}\"}} {waiting}\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{model_name=\"{model}\"}} {kv}\n"
    );
    Reply {
        status: 200,
        content_type: "text/plain; version=0.0.4",
        headers: Vec::new(),
        body: body.into_bytes(),
    }
}
