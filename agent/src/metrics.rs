//! Metrics every credlet process exports beside its own families:
//! `credlet_build_info` and the standard `process_*` families (CPU time,
//! memory, file descriptors, threads, start time) that dashboards and
//! alerts written for any Prometheus-instrumented program expect.
//!
//! prometheus-client has no process collector, and the `metrics-process`
//! crate feeds the `metrics` facade rather than this registry; so the
//! collector here reads `/proc/self` on each scrape: `stat`, `limits` and
//! the `fd` directory, nothing else. Parsing is a pure function over the
//! file's text, tested without a process to look at.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

/// Registers `credlet_build_info{version, mode}` (always 1) and the
/// process collector.
pub fn register_common(registry: &mut Registry, mode: &'static str) {
    let info = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
    info.get_or_create(&vec![
        ("version", env!("CARGO_PKG_VERSION")),
        ("mode", mode),
    ])
    .set(1);
    registry.register(
        "credlet_build_info",
        "credlet's version and mode (agent or ca); always 1",
        info,
    );
    registry.register_collector(Box::new(ProcessCollector));
}

/// Linux reports `/proc/<pid>/stat` times in USER_HZ, which the kernel
/// fixes at 100 for user space on every architecture.
const TICKS_PER_SECOND: f64 = 100.0;

/// What one `/proc/self/stat` line says about the process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcStat {
    /// User + system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Threads.
    pub threads: i64,
    /// Start time after boot, in seconds.
    pub start_after_boot_seconds: f64,
    /// Virtual memory size, bytes.
    pub virtual_bytes: i64,
    /// Resident set, in pages.
    pub resident_pages: i64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted after its last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    // Fields from 3 (state) on; index i here is field i + 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).copied();
    let int = |n: usize| field(n)?.parse::<i64>().ok();
    let ticks = |n: usize| Some(field(n)?.parse::<u64>().ok()? as f64 / TICKS_PER_SECOND);
    Some(ProcStat {
        cpu_seconds: ticks(14)? + ticks(15)?,
        threads: int(20)?,
        start_after_boot_seconds: ticks(22)?,
        virtual_bytes: int(23)?,
        resident_pages: int(24)?,
    })
}

/// The soft limit on open files from `/proc/<pid>/limits`.
pub fn parse_max_fds(limits: &str) -> Option<i64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The boot time (`btime`) from `/proc/stat`, seconds since the epoch.
pub fn parse_boot_time(stat: &str) -> Option<f64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// The standard `process_*` families, read from `/proc/self` per scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let page = rustix::param::page_size() as i64;
        if let Some(stat) = read("/proc/self/stat").as_deref().and_then(parse_stat) {
            let cpu = ConstCounter::new(stat.cpu_seconds);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                cpu.metric_type(),
            )?)?;
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                stat.resident_pages * page,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                stat.virtual_bytes,
            )?;
            gauge(
                &mut encoder,
                "process_threads",
                "Number of OS threads in the process",
                stat.threads,
            )?;
            if let Some(boot) = read("/proc/stat").as_deref().and_then(parse_boot_time) {
                let start = ConstGauge::new(boot + stat.start_after_boot_seconds);
                start.encode(encoder.encode_descriptor(
                    "process_start_time_seconds",
                    "Start time of the process since the Unix epoch in seconds",
                    None,
                    start.metric_type(),
                )?)?;
            }
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle being read is one of them.
            let open = entries.count().saturating_sub(1);
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                i64::try_from(open).unwrap_or(i64::MAX),
            )?;
        }
        if let Some(max) = read("/proc/self/limits").as_deref().and_then(parse_max_fds) {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors",
                max,
            )?;
        }
        Ok(())
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_after_the_command_name() {
        // Field 2 holds spaces and a ')' of its own.
        let line = "4242 (cred let) x) S 1 4242 4242 0 -1 4194560 1200 0 0 0 \
                    250 150 0 0 20 0 7 0 12345 31457280 1536 18446744073709551615 \
                    1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                cpu_seconds: 4.0,
                threads: 7,
                start_after_boot_seconds: 123.45,
                virtual_bytes: 31_457_280,
                resident_pages: 1536,
            })
        );
        for bad in ["", "4242 (credlet", "4242 (credlet) S 1 2", "4242 (c) S x"] {
            assert_eq!(parse_stat(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn limits_and_boot_time_parse() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max cpu time              unlimited            unlimited            seconds\n\
                      Max open files            1048576              1048576              files\n";
        assert_eq!(parse_max_fds(limits), Some(1_048_576));
        assert_eq!(parse_max_fds("Max open files unlimited"), None);
        assert_eq!(
            parse_boot_time("cpu 1 2 3\nbtime 1765000000\n"),
            Some(1.765e9)
        );
        assert_eq!(parse_boot_time("cpu 1 2 3\n"), None);
    }

    #[test]
    fn this_process_is_described() {
        let mut registry = Registry::default();
        register_common(&mut registry, "agent");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for family in [
            "# TYPE credlet_build_info gauge",
            "# TYPE process_cpu_seconds counter",
            "# TYPE process_resident_memory_bytes gauge",
            "# TYPE process_open_fds gauge",
            "# TYPE process_max_fds gauge",
            "# TYPE process_start_time_seconds gauge",
        ] {
            assert!(text.contains(family), "{family} missing:\n{text}");
        }
        assert!(
            text.contains(&format!(
                "credlet_build_info{{version=\"{}\",mode=\"agent\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
    }
}
