//! # jobmeter-bench: the benchmark harnesses
//!
//! Two binaries, kept out of the crates that ship: `jobmeter-bench` runs
//! the meter end to end against a real broker (ceiling, exactly-once
//! throughput, restore, latency, accounts at scale) and
//! `jobmeter-retention-bench` measures finished jobs kept in RocksDB at
//! millions of jobs. `BENCHMARKS.md` gives the commands and the figures.
//! Nothing depends on this crate.

pub mod passthrough;

/// User + system CPU seconds of a running process so far, from
/// `/proc/<pid>/stat` (clock ticks of 10 ms); `None` when there is no such
/// process to read.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Some((ticks(11) + ticks(12)) / 100.0)
}
