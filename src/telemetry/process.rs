//! The standard `process_*` metrics, read from `/proc/self` at each scrape. Hand-written rather
//! than the prometheus crate's `process` collector, which counts `process_cpu_seconds_total` in
//! whole seconds (an integer counter): a proxy that spends 0.3 s of CPU per second showed 0, 0,
//! 1, 0 … and its CPU graphs were steps. Here it is the kernel's own resolution (clock ticks of
//! 10 ms). Linux only, like the rest of the proxy; a file that cannot be read leaves its metric
//! out of that scrape rather than failing it.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Gauge, Opts};

/// Clock ticks per second of `/proc/<pid>/stat`'s times: `USER_HZ`, 100 on every Linux
/// architecture we build for (it is part of the kernel's ABI, whatever `CONFIG_HZ` is).
const USER_HZ: f64 = 100.0;

pub(crate) struct ProcessCollector {
    cpu: Counter,
    open_fds: Gauge,
    max_fds: Gauge,
    virtual_memory: Gauge,
    resident_memory: Gauge,
    start_time: Gauge,
    threads: Gauge,
    descs: Vec<Desc>,
}

impl ProcessCollector {
    pub(crate) fn new() -> prometheus::Result<Self> {
        let cpu = Counter::with_opts(Opts::new(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
        ))?;
        let gauge = |name: &str, help: &str| Gauge::with_opts(Opts::new(name, help));
        let c = ProcessCollector {
            cpu,
            open_fds: gauge("process_open_fds", "Number of open file descriptors.")?,
            max_fds: gauge(
                "process_max_fds",
                "Maximum number of open file descriptors.",
            )?,
            virtual_memory: gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
            )?,
            resident_memory: gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
            )?,
            start_time: gauge(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
            )?,
            threads: gauge("process_threads", "Number of OS threads in the process.")?,
            descs: Vec::new(),
        };
        let descs = c
            .metrics()
            .iter()
            .flat_map(|m| m.desc().into_iter().cloned())
            .collect();
        Ok(ProcessCollector { descs, ..c })
    }

    fn metrics(&self) -> [&dyn Collector; 7] {
        [
            &self.cpu,
            &self.open_fds,
            &self.max_fds,
            &self.virtual_memory,
            &self.resident_memory,
            &self.start_time,
            &self.threads,
        ]
    }

    fn refresh(&self) {
        if let Some(stat) = Stat::read() {
            let cpu = stat.cpu_ticks as f64 / USER_HZ;
            // A counter only goes up; the kernel's ticks never go back.
            let seen = self.cpu.get();
            if cpu > seen {
                self.cpu.inc_by(cpu - seen);
            }
            self.virtual_memory.set(stat.vsize as f64);
            self.threads.set(stat.threads as f64);
            if let Some(boot) = boot_time() {
                self.start_time
                    .set(boot + stat.start_ticks as f64 / USER_HZ);
            }
        }
        if let Some(kib) = status_kib("VmRSS:") {
            self.resident_memory.set(kib as f64 * 1024.0);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as f64);
        }
        if let Some(max) = max_open_files() {
            self.max_fds.set(max as f64);
        }
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        self.metrics().iter().flat_map(|m| m.collect()).collect()
    }
}

/// The fields of `/proc/self/stat` used here.
struct Stat {
    cpu_ticks: u64,
    threads: u64,
    start_ticks: u64,
    vsize: u64,
}

impl Stat {
    fn read() -> Option<Stat> {
        Stat::parse(&std::fs::read_to_string("/proc/self/stat").ok()?)
    }

    /// The command name (field 2) may hold spaces and parentheses: fields are counted after
    /// its last `)`.
    fn parse(text: &str) -> Option<Stat> {
        let rest = &text[text.rfind(')')? + 1..];
        // Field 3 (state) is the first after the name; the kernel numbers fields from 1.
        let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
        let at = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Stat {
            cpu_ticks: at(14)?.checked_add(at(15)?)?,
            threads: at(20)?,
            start_ticks: at(22)?,
            vsize: at(23)?,
        })
    }
}

fn status_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

fn boot_time() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("btime "))?;
    line["btime ".len()..].trim().parse().ok()
}

fn max_open_files() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "4242 (llm (proxy) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    123 45 0 0 20 0 7 0 98765 1234567 890 18446744073709551615";
        let s = Stat::parse(line).unwrap();
        assert_eq!(
            (s.cpu_ticks, s.threads, s.start_ticks, s.vsize),
            (168, 7, 98765, 1234567)
        );
        assert!(Stat::parse("garbage").is_none());
    }

    #[test]
    fn cpu_seconds_have_the_kernel_resolution_not_whole_seconds() {
        let c = ProcessCollector::new().unwrap();
        let cpu = |families: &[prometheus::proto::MetricFamily]| {
            families
                .iter()
                .find(|f| f.get_name() == "process_cpu_seconds_total")
                .map(|f| f.get_metric()[0].get_counter().get_value())
                .unwrap()
        };
        let before = cpu(&c.collect());
        // Burn a little CPU, more than a tick, much less than a second.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let families = c.collect();
        // The difference, not the total: a total in ticks is a whole number of seconds once in
        // a hundred runs (the test failed so); whole-second counting would show 0 or 1 here.
        let burnt = cpu(&families) - before;
        assert!(
            burnt > 0.0 && burnt < 1.0,
            "cpu {before} then {}",
            cpu(&families)
        );
        for name in [
            "process_open_fds",
            "process_max_fds",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_start_time_seconds",
            "process_threads",
        ] {
            assert!(families.iter().any(|f| f.get_name() == name), "{name}");
        }
    }
}
