//! A reader for the few gauges routing needs from the Prometheus text exposition format. It
//! walks lines once, skips comments (`# HELP`, `# TYPE`, anything else after `#`), steps over
//! label sets (quoted values may hold `}`, `,` and escaped quotes), and ignores samples whose
//! value is not a finite number (NaN, ±Inf) or cannot be read. It never fails: a body with none
//! of the known gauges yields `None`.

use super::EngineLoad;

/// One sample: metric name, the raw text between the braces (may be empty), value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sample<'a> {
    pub(crate) name: &'a str,
    pub(crate) labels: &'a str,
    pub(crate) value: f64,
}

/// Every readable sample in `text`, in order.
pub(crate) fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines().filter_map(sample)
}

fn sample(line: &str) -> Option<Sample<'_>> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = "";
    if rest.starts_with('{') {
        let close = label_set_end(rest)?;
        labels = &rest[1..close];
        rest = &rest[close + 1..];
    }
    // The value, then an optional timestamp.
    let value = rest.split_ascii_whitespace().next()?.parse::<f64>().ok()?;
    if name.is_empty() {
        return None;
    }
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Index of the `}` closing the label set that `s` starts with, honouring quotes and escapes.
fn label_set_end(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, b) in s.bytes().enumerate().skip(1) {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// What a gauge means for routing.
#[derive(Clone, Copy)]
enum Field {
    Waiting,
    Running,
    Kv,
}

/// The gauges read, per engine (see notes/backends.md). Counts are summed over label sets (a
/// server with several engines or models reports one series each); KV use takes the fullest.
const GAUGES: &[(&str, Field)] = &[
    ("vllm:num_requests_waiting", Field::Waiting),
    ("vllm:num_requests_running", Field::Running),
    ("vllm:kv_cache_usage_perc", Field::Kv),
    ("vllm:gpu_cache_usage_perc", Field::Kv),
    ("tgi_queue_size", Field::Waiting),
    ("tgi_batch_current_size", Field::Running),
    ("sglang:num_queue_reqs", Field::Waiting),
    ("sglang:num_running_reqs", Field::Running),
    ("sglang:token_usage", Field::Kv),
    ("llamacpp:requests_deferred", Field::Waiting),
    ("llamacpp:requests_processing", Field::Running),
    ("llamacpp:kv_cache_usage_ratio", Field::Kv),
];

/// For the fuzz target: `engine_load` as (waiting, running, KV use).
pub fn fuzz_engine_load(text: &str) -> Option<(f64, f64, Option<f64>)> {
    engine_load(text).map(|l| (l.waiting, l.running, l.kv_usage))
}

/// The engine load in a `/metrics` body, or `None` if it has none of the known gauges.
pub(crate) fn engine_load(text: &str) -> Option<EngineLoad> {
    let mut load = EngineLoad::default();
    let mut found = false;
    for s in samples(text) {
        if !s.value.is_finite() {
            continue;
        }
        let Some((_, field)) = GAUGES.iter().find(|(n, _)| *n == s.name) else {
            continue;
        };
        found = true;
        match field {
            Field::Waiting => load.waiting += s.value.max(0.0),
            Field::Running => load.running += s.value.max(0.0),
            Field::Kv => {
                let v = s.value.clamp(0.0, 1.0);
                load.kv_usage = Some(load.kv_usage.map_or(v, |k| k.max(v)));
            }
        }
    }
    found.then_some(load)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_with_labels_comments_and_odd_values() {
        let text = "# HELP vllm:num_requests_waiting Number of requests waiting.\n\
            # TYPE vllm:num_requests_waiting gauge\n\
            vllm:num_requests_waiting{model_name=\"a}b,\\\"c\",engine=\"0\"} 3 1700000000000\n\
            \n   plain 1.5e1\n\
            bad_value{x=\"1\"} abc\n\
            nan_value NaN\n\
            inf_value +Inf\n\
            unterminated{x=\"1\" 5\n\
            # a free comment\n";
        let got: Vec<Sample> = samples(text).collect();
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0].name, "vllm:num_requests_waiting");
        assert_eq!(got[0].labels, "model_name=\"a}b,\\\"c\",engine=\"0\"");
        assert_eq!(got[0].value, 3.0);
        assert_eq!(got[1].name, "plain");
        assert_eq!(got[1].value, 15.0);
        assert!(got[2].value.is_nan());
        assert_eq!(got[3].value, f64::INFINITY);
    }

    #[test]
    fn vllm_sums_engines_and_takes_the_fullest_cache() {
        let text = "vllm:num_requests_waiting{engine=\"0\"} 2\n\
            vllm:num_requests_waiting{engine=\"1\"} 5\n\
            vllm:num_requests_running{engine=\"0\"} 8\n\
            vllm:kv_cache_usage_perc{engine=\"0\"} 0.25\n\
            vllm:kv_cache_usage_perc{engine=\"1\"} 0.75\n\
            vllm:num_requests_waiting_by_reason{reason=\"x\"} 100\n";
        let l = engine_load(text).unwrap();
        assert_eq!(l.waiting, 7.0);
        assert_eq!(l.running, 8.0);
        assert_eq!(l.kv_usage, Some(0.75));
    }

    #[test]
    fn older_vllm_tgi_sglang_and_llamacpp() {
        let l = engine_load("vllm:gpu_cache_usage_perc{m=\"x\"} 0.4\n").unwrap();
        assert_eq!(l.kv_usage, Some(0.4));
        let l = engine_load("tgi_queue_size 4\ntgi_batch_current_size 12\n").unwrap();
        assert_eq!((l.waiting, l.running, l.kv_usage), (4.0, 12.0, None));
        let l = engine_load(
            "sglang:num_queue_reqs{tp_rank=\"0\"} 1\nsglang:num_running_reqs{tp_rank=\"0\"} 2\n\
             sglang:token_usage{tp_rank=\"0\"} 0.9\n",
        )
        .unwrap();
        assert_eq!((l.waiting, l.running, l.kv_usage), (1.0, 2.0, Some(0.9)));
        let l =
            engine_load("llamacpp:requests_processing 3\nllamacpp:requests_deferred 1\n").unwrap();
        assert_eq!((l.waiting, l.running), (1.0, 3.0));
    }

    #[test]
    fn nothing_known_or_garbage_is_none_and_bad_values_are_skipped() {
        assert_eq!(engine_load(""), None);
        assert_eq!(engine_load("<html>not metrics</html>"), None);
        assert_eq!(engine_load("process_cpu_seconds_total 12\n"), None);
        let l = engine_load(
            "vllm:num_requests_waiting NaN\nvllm:num_requests_waiting 2\n\
             vllm:kv_cache_usage_perc +Inf\nvllm:num_requests_running -3\n",
        )
        .unwrap();
        assert_eq!((l.waiting, l.running, l.kv_usage), (2.0, 0.0, None));
        // Out-of-range KV values are clamped, never trusted blindly.
        let l = engine_load("vllm:kv_cache_usage_perc 7\n").unwrap();
        assert_eq!(l.kv_usage, Some(1.0));
    }
}
