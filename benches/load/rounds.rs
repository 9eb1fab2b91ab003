//! Several rounds of one workload folded into one result per target, so that a target is judged
//! on the median of runs rather than on one run: on this 2-core machine the same binary's CPU per
//! request moves by ±5% between back-to-back runs, and W3's TTFT p99 by several milliseconds.

use crate::measure::Usage;
use crate::run::RunResult;
use crate::wire::PerRequest;

/// The median of the values present (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// One result per target (in the rounds' order) whose every figure is that figure's median over
/// the rounds the target completed: requests per second, CPU per request (and so CPU share),
/// latency, TTFT and token-gap percentiles, memory, the load side's figures; errors are summed.
/// A target that failed in every round stays failed. Each figure is its own median, so they need
/// not come from one run.
pub(crate) fn medians(rounds: &[Vec<RunResult>]) -> Vec<RunResult> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    (0..first.len())
        .map(|i| {
            let runs: Vec<&RunResult> = rounds
                .iter()
                .filter_map(|r| r.get(i))
                .filter(|r| r.failed.is_none())
                .collect();
            let target = first[i].target.clone();
            if runs.is_empty() {
                return RunResult {
                    target,
                    failed: first[i].failed.clone(),
                    ..RunResult::default()
                };
            }
            let m = |f: &dyn Fn(&RunResult) -> Option<f64>| {
                median(runs.iter().filter_map(|r| f(r)).collect())
            };
            let pct = |f: &dyn Fn(&RunResult) -> [Option<f64>; 3]| {
                [0, 1, 2].map(|k| m(&|r: &RunResult| f(r)[k]))
            };
            // Over a one-second window `ok` is the rate; the proxy's CPU seconds are then its CPU
            // per request times that rate, which makes CPU share and CPU per request the medians.
            let rps = m(&|r: &RunResult| Some(r.rps())).unwrap_or(0.0);
            let ok = rps.round() as u64;
            let kib = |f: &dyn Fn(&Usage) -> u64| {
                m(&|r: &RunResult| r.proxy.map(|(_, b)| f(&b) as f64))
                    .map_or(0, |v| v.round() as u64)
            };
            // A window without requests (W4's streams never finish) has no CPU per request: its
            // CPU is the median share, and its memory counts all the same.
            let cpu = match m(&|r: &RunResult| r.cpu_us_per_req()) {
                Some(us) => Some(us * ok as f64 / 1e6),
                None => m(&|r: &RunResult| r.cpu_pct()).map(|pct| pct / 100.0),
            };
            let proxy = cpu.map(|cpu| {
                let end = Usage {
                    cpu,
                    rss_kib: kib(&|u| u.rss_kib),
                    hwm_kib: kib(&|u| u.hwm_kib),
                    pss_kib: kib(&|u| u.pss_kib),
                };
                (Usage::default(), end)
            });
            // Segments by hop: each figure its own median, when every round has them.
            let wire = (0..8)
                .map(|k| m(&|r: &RunResult| r.wire.map(|w| w.fields()[k])))
                .collect::<Option<Vec<f64>>>()
                .and_then(|v| <[f64; 8]>::try_from(v).ok())
                .map(PerRequest::from_fields)
                .filter(|_| runs.iter().all(|r| r.wire.is_some()));
            let note = match &wire {
                Some(w) => format!("medians of {} rounds; {}", runs.len(), w.note()),
                None => format!("medians of {} rounds", runs.len()),
            };
            RunResult {
                target,
                failed: None,
                secs: 1.0,
                ok,
                lat: pct(&|r| r.lat),
                ttft: pct(&|r| r.ttft),
                gap: pct(&|r| r.gap),
                errors: runs.iter().map(|r| r.errors).sum(),
                proxy,
                load_cpu: m(&|r: &RunResult| Some(r.load_cpu)).unwrap_or(0.0),
                other_cpu: m(&|r: &RunResult| Some(r.other_cpu)).unwrap_or(0.0),
                steal: m(&|r: &RunResult| Some(r.steal)).unwrap_or(0.0),
                tokens: m(&|r: &RunResult| Some(r.tokens as f64 / r.secs))
                    .map_or(0, |v| v.round() as u64),
                streaming_at_end: m(&|r: &RunResult| Some(r.streaming_at_end as f64))
                    .map_or(0, |v| v.round() as i64),
                connections_at_end: m(&|r: &RunResult| Some(r.connections_at_end as f64))
                    .map_or(0, |v| v.round() as i64),
                note,
                wire,
                load_us_per_req: m(&|r: &RunResult| r.load_us_per_req),
                switches: None,
                segments: m(&|r: &RunResult| r.segments),
                ..RunResult::default()
            }
        })
        .collect()
}

/// Checks `medians` on made-up rounds (run by `cargo test --benches`, which runs this benchmark
/// without `--bench`: see `main`).
pub(crate) fn self_check() {
    let run = |rps: f64, cpu_us: f64, ttft_p99: f64| {
        let ok = (rps * 8.0) as u64;
        RunResult {
            target: "llmproxy".into(),
            secs: 8.0,
            ok,
            ttft: [Some(1.0), Some(ttft_p99), None],
            proxy: Some((
                Usage::default(),
                Usage {
                    cpu: cpu_us * ok as f64 / 1e6,
                    rss_kib: 10_240,
                    ..Usage::default()
                },
            )),
            ..RunResult::default()
        }
    };
    // Every figure is its own median.
    let rounds = vec![
        vec![run(1000.0, 12.0, 5.0)],
        vec![run(1100.0, 11.0, 1.0)],
        vec![run(900.0, 13.0, 2.0)],
    ];
    let m = medians(&rounds);
    assert_eq!(m.len(), 1);
    assert!((m[0].rps() - 1000.0).abs() < 0.5, "{}", m[0].rps());
    let cpu = m[0].cpu_us_per_req().unwrap_or(0.0);
    assert!((cpu - 12.0).abs() < 0.05, "{cpu}");
    assert_eq!(m[0].ttft[1], Some(2.0));
    assert_eq!(m[0].ttft[2], None);
    assert_eq!(m[0].rss_mb(), Some(10.0));
    assert!((m[0].cpu_pct().unwrap_or(0.0) - 1.2).abs() < 0.01);
    // Failed rounds are left out; a target failed in every round stays failed.
    let failed = || RunResult {
        target: "nginx".into(),
        failed: Some("no".into()),
        ..RunResult::default()
    };
    assert!(medians(&[vec![failed()], vec![failed()]])[0]
        .failed
        .is_some());
    let m = medians(&[vec![run(1000.0, 12.0, 5.0)], vec![failed()]]);
    assert!(m[0].failed.is_none());
    assert!((m[0].cpu_us_per_req().unwrap_or(0.0) - 12.0).abs() < 0.05);
    // Segments by hop: each figure its own median, and said in the medians' note.
    let hops = |k: f64| PerRequest::from_fields([1.0, 3.0, 12.0 + k, 0.0, 1.0, 8.0 - k, 21.0, 0.0]);
    let with_hops = |k: f64| RunResult {
        wire: Some(hops(k)),
        ..run(1000.0, 12.0, 5.0)
    };
    let m = medians(&[
        vec![with_hops(0.0)],
        vec![with_hops(2.0)],
        vec![with_hops(1.0)],
    ]);
    assert_eq!(m[0].wire, Some(hops(1.0)));
    assert!(m[0].note.contains("segments/req by hop"), "{}", m[0].note);
    // A round without them: no median claimed.
    let m = medians(&[vec![with_hops(0.0)], vec![run(1000.0, 12.0, 5.0)]]);
    assert_eq!(m[0].wire, None);
    // W4: streams that never finish (no requests), memory and CPU share still their medians.
    let held = |mib: u64, cpu: f64| RunResult {
        target: "llmproxy".into(),
        secs: 8.0,
        proxy: Some((
            Usage::default(),
            Usage {
                cpu: cpu * 8.0,
                rss_kib: mib * 1024,
                ..Usage::default()
            },
        )),
        ..RunResult::default()
    };
    let m = medians(&[
        vec![held(117, 0.24)],
        vec![held(50, 0.26)],
        vec![held(116, 0.25)],
    ]);
    assert_eq!(m[0].rss_mb(), Some(116.0));
    assert!((m[0].cpu_pct().unwrap_or(0.0) - 25.0).abs() < 0.01);
    assert_eq!(m[0].cpu_us_per_req(), None);
    eprintln!("load benchmark: rounds self-check passed");
}
