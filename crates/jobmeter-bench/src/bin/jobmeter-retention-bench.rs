//! Benchmark of the meter against retention: throughput and memory while a
//! partition's store fills with millions of finished jobs. Not a test: it
//! measures and prints.
//!
//! ```text
//! cargo build --release --bins
//! target/release/jobmeter-retention-bench --jobs 10000000 --dir /tmp/retention
//! target/release/jobmeter-retention-bench --jobs 1000000 --finished-jobs memory --dir /tmp/retention-mem
//! ```
//!
//! One partition's meter and its RocksDB store, in this process, without
//! Kafka (what Kafka costs does not depend on retention): short jobs
//! (start, a heartbeat every 30 s, stop; 1–60 s) of 2,000 pay-as-you-go
//! accounts, about 100 starting a second of event time (10 million jobs
//! span 28 hours, all within the 35-day retention), and duplicates: half
//! of them a recent job's start, half a start drawn from every job so far
//! (most of them long finished, so read back from the store). Batches of
//! `--batch` events are committed to RocksDB one batch late, as the
//! service's committer does (here on the same thread, timed apart).
//!
//! Every million jobs it prints: jobs retained, jobs in memory, events/s
//! and µs an event for applying (parse + meter), µs an event for the
//! batch's state (encoding + RocksDB write), resident memory. At the end:
//! peak resident memory (VmHWM), and a restart: the meter restored from the
//! store (how long, how many records, resident memory after).

use jobmeter_core::archive::JobArchive;
use jobmeter_core::state::StateChange;
use jobmeter_core::*;
use jobmeter_store::{Archive, Store, StoreOptions};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, clap::Parser)]
struct Args {
    /// Jobs to run through the meter.
    #[arg(long, default_value_t = 1_000_000)]
    jobs: u64,
    /// The store's directory (emptied first).
    #[arg(long)]
    dir: PathBuf,
    /// `store` (finished jobs in RocksDB) or `memory` (every job held).
    #[arg(long, default_value = "store")]
    finished_jobs: String,
    /// Events a batch.
    #[arg(long, default_value_t = 5_000)]
    batch: usize,
    /// Duplicates per thousand events.
    #[arg(long, default_value_t = 45)]
    duplicates_permille: u64,
    /// RocksDB block cache, MiB.
    #[arg(long, default_value_t = 64)]
    block_cache_mib: usize,
    /// Print a line every this many jobs.
    #[arg(long, default_value_t = 1_000_000)]
    report_every: u64,
}

/// A small, fixed PRNG (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Start,
    Heartbeat,
    Stop,
}

/// The fleet, generated as event time goes on.
struct Fleet {
    rng: Rng,
    t0: i64,
    next_job: u64,
    jobs: u64,
    /// (time, job, kind, stop time) of events to come.
    due: BinaryHeap<Reverse<(i64, u64, Kind, i64)>>,
    seq: u64,
    dup_permille: u64,
}

impl Fleet {
    fn new(jobs: u64, dup_permille: u64) -> Fleet {
        Fleet {
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            t0: Timestamp::parse("2024-05-02T00:00:00Z").map_or(0, |t| t.0),
            next_job: 0,
            jobs,
            due: BinaryHeap::new(),
            seq: 0,
            dup_permille: dup_permille.min(1000),
        }
    }

    fn event(&mut self, kind: Kind, job: u64, time: i64, id: u64) -> String {
        let ty = match kind {
            Kind::Start => "job.started",
            Kind::Heartbeat => "job.heartbeat",
            Kind::Stop => "job.stopped",
        };
        format!(
            r#"{{"specversion":"1.0","id":"ev-{id}","source":"gpu-{}","type":"{ty}","time":"{}","subject":"job-{job}","data":{{"account_id":"acct-{}","kind":"inference","model":"llm-7b","status":"succeeded"}}}}"#,
            job % 64,
            Timestamp(time),
            job % 2000,
        )
    }

    /// The start event of `job`, exactly as it was first sent.
    fn start_of(&mut self, job: u64) -> String {
        let time = self.t0 + (job as i64) * 10;
        self.event(Kind::Start, job, time, job * 1000)
    }

    /// The next batch of events; empty when the fleet is done.
    fn batch(&mut self, n: usize, out: &mut Vec<String>) {
        out.clear();
        while out.len() < n {
            // A job starts every 10 ms of event time.
            let start_due = (self.next_job < self.jobs).then(|| self.t0 + (self.next_job as i64) * 10);
            let next = self.due.peek().map(|Reverse(e)| e.0);
            let take_start = match (start_due, next) {
                (Some(s), Some(d)) => s <= d,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => return,
            };
            if take_start {
                let job = self.next_job;
                self.next_job += 1;
                let start = self.t0 + (job as i64) * 10;
                let stop = start + 1_000 + self.rng.below(59_000) as i64;
                out.push(self.start_of(job));
                let first = if stop - start > 30_000 { start + 30_000 } else { stop };
                let kind = if first == stop { Kind::Stop } else { Kind::Heartbeat };
                self.due.push(Reverse((first, job, kind, stop)));
            } else if let Some(Reverse((time, job, kind, stop))) = self.due.pop() {
                self.seq += 1;
                let id = job * 1000 + self.seq % 999 + 1;
                out.push(self.event(kind, job, time, id));
                if kind == Kind::Heartbeat {
                    let next = (time + 30_000).min(stop);
                    let k = if next == stop { Kind::Stop } else { Kind::Heartbeat };
                    self.due.push(Reverse((next, job, k, stop)));
                }
            }
            if self.rng.below(1000) < self.dup_permille && self.next_job > 0 {
                let job = if self.rng.below(2) == 0 {
                    self.next_job - 1 - self.rng.below(self.next_job.min(1000))
                } else {
                    self.rng.below(self.next_job)
                };
                out.push(self.start_of(job));
            }
        }
    }
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let archive = match args.finished_jobs.as_str() {
        "store" => true,
        "memory" => false,
        other => anyhow::bail!("--finished-jobs: `{other}` is neither `store` nor `memory`"),
    };
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)?;
    }
    let options = StoreOptions {
        block_cache_bytes: args.block_cache_mib << 20,
        ..Default::default()
    };
    let store = Arc::new(Store::open_with(&args.dir, options)?);
    store.set_index_complete(0, archive)?;
    let rates = RateCard::from_toml(
        "[[versions]]\nversion = \"v1\"\neffective_from = \"2024-01-01T00:00:00Z\"\nfine_tune_per_second = \"0.001\"\nmodels.\"llm-7b\" = { per_second = \"0.0004\" }\n",
    )?;
    let plans = PlanCatalog::default();
    let book = AccountBook::new(&plans);
    let config = MeterConfig::default();
    let ctx = Context::new(&rates, &plans, &book, &config);
    let mut meter = Meter::tracking_changes();
    if archive {
        meter = meter.with_archive(Box::new(Archive::new(store.clone(), 0)));
    }
    let mut fleet = Fleet::new(args.jobs, args.duplicates_permille);
    println!(
        "jobs {} · finished jobs in {} · batch {} · duplicates {}‰ · block cache {} MiB",
        args.jobs, args.finished_jobs, args.batch, args.duplicates_permille, args.block_cache_mib
    );
    println!(
        "| jobs started | jobs in memory | events | apply, events/s | apply µs/event | state µs/event | RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|");
    let (mut events, mut window_events) = (0u64, 0u64);
    let (mut apply_t, mut state_t) = (Duration::ZERO, Duration::ZERO);
    let mut next_report = args.report_every;
    let mut in_commit: Vec<StateChange> = Vec::new();
    let mut raw = Vec::with_capacity(args.batch + 64);
    let mut out = Vec::new();
    let started = Instant::now();
    let mut offset = 0i64;
    loop {
        fleet.batch(args.batch, &mut raw);
        if raw.is_empty() {
            break;
        }
        let t = Instant::now();
        for r in &raw {
            meter.apply(&ctx, r.as_bytes(), None, &mut out)?;
            out.clear();
        }
        let t1 = Instant::now();
        offset += 1;
        store.commit(0, &in_commit, Some(offset))?;
        in_commit = meter.take_changes()?;
        meter.release_stored();
        apply_t += t1 - t;
        state_t += t1.elapsed();
        events += raw.len() as u64;
        window_events += raw.len() as u64;
        if fleet.next_job >= next_report || fleet.next_job >= args.jobs && fleet.due.is_empty() {
            let n = window_events as f64;
            println!(
                "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {} |",
                fleet.next_job,
                meter.known_jobs(),
                events,
                n / apply_t.as_secs_f64(),
                apply_t.as_secs_f64() * 1e6 / n,
                state_t.as_secs_f64() * 1e6 / n,
                status_kib("VmRSS:") / 1024
            );
            window_events = 0;
            apply_t = Duration::ZERO;
            state_t = Duration::ZERO;
            next_report += args.report_every;
        }
    }
    store.commit(0, &in_commit, Some(offset + 1))?;
    let s = meter.stats();
    println!(
        "\n{} events ({} accepted, {} duplicates, {} charges) in {:.1} s; peak RSS (VmHWM) {} MiB; store {} MiB on disk",
        events,
        s.events,
        s.duplicates,
        s.charges,
        started.elapsed().as_secs_f64(),
        status_kib("VmHWM:") / 1024,
        store.size_bytes() >> 20
    );
    drop(meter);
    restart(&store, archive, &config)
}

/// A restart of the partition: how long loading its meter takes, and
/// what it holds in memory; the archive still answers for the oldest job.
fn restart(store: &Arc<Store>, archive: bool, config: &MeterConfig) -> anyhow::Result<()> {
    let t = Instant::now();
    let st = store.load_meter_state(0, archive)?;
    let records = st.records.len();
    let mut restored = Meter::restore(st.records, config)?;
    if archive {
        restored = restored.with_archive(Box::new(Archive::new(store.clone(), 0)));
    }
    println!(
        "restart: {records} records loaded, {} jobs in memory, {:.2} s; RSS {} MiB",
        restored.known_jobs(),
        t.elapsed().as_secs_f64(),
        status_kib("VmRSS:") / 1024
    );
    if archive {
        // The archive answers for the oldest job too.
        let a = Archive::new(store.clone(), 0);
        let first = (AccountId::from("acct-0"), JobId::from("job-0"));
        anyhow::ensure!(a.job(&first)?.is_some(), "the first job is not in the store");
    }
    Ok(())
}
