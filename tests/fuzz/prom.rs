//! The Prometheus text reader behind `least_load` (`control::engine::prom`), which reads each
//! backend's `/metrics`. Properties: no panic on any text; what it returns is usable for routing
//! whatever the body says (counts never negative or NaN, KV use within 0..=1); reading is
//! deterministic; comment lines change nothing.

use llmproxy::fuzzing::engine_load;

use crate::engine::{feature, Target};

pub const TARGET: Target = Target {
    name: "engine_metrics",
    dict: &[
        b"\n",
        b"# HELP x y\n",
        b"# TYPE vllm:num_requests_waiting gauge\n",
        b"vllm:num_requests_waiting",
        b"vllm:num_requests_running",
        b"vllm:kv_cache_usage_perc",
        b"tgi_queue_size",
        b"sglang:token_usage",
        b"llamacpp:requests_processing",
        b"{model_name=\"m\"}",
        b"{a=\"}\\\",\"}",
        b" 3",
        b" -1",
        b" NaN",
        b" +Inf",
        b" 1e308",
        b" 0.5 1700000000000",
        b"{",
        b"}",
        b"\"",
        b"\\",
    ],
    max_len: 8 * 1024,
    check,
};

fn check(input: &[u8]) -> u64 {
    let Ok(text) = std::str::from_utf8(input) else {
        return feature("not utf-8");
    };
    let got = engine_load(text);
    if let Some((waiting, running, kv)) = got {
        assert!(waiting >= 0.0 && !waiting.is_nan(), "waiting {waiting}");
        assert!(running >= 0.0 && !running.is_nan(), "running {running}");
        if let Some(kv) = kv {
            assert!((0.0..=1.0).contains(&kv), "kv {kv}");
        }
    }
    assert_eq!(engine_load(text), got, "not deterministic");
    let commented = format!("# HELP padding a comment line\n{text}\n# EOF\n");
    assert_eq!(engine_load(&commented), got, "comments changed the reading");
    feature(got.map(|(w, r, k)| (w > 0.0, r > 0.0, k.is_some())))
}
