//! # jobmeter-bench: the benchmark harnesses
//!
//! Two binaries, kept out of the crates that ship: `jobmeter-bench` runs
//! the meter end to end against a real broker (ceiling, exactly-once
//! throughput, restore, latency, accounts at scale) and
//! `jobmeter-retention-bench` measures finished jobs kept in RocksDB at
//! millions of jobs. `BENCHMARKS.md` gives the commands and the figures.
//! Nothing depends on this crate.
