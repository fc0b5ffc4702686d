//! End-to-end benchmark harness of the streaming meter against a real
//! Kafka broker. Not a test: it measures and prints.
//!
//! ```text
//! cargo build --release --bins
//! target/release/jobmeter-bench --jobs 40000 --rate 10000 --latency-seconds 30
//! ```
//!
//! 1. **Ceiling**: N simulated events are produced to a fresh input topic;
//!    a plain rdkafka consumer reads them all, doing nothing: events/s
//!    (the median of `--ceiling-runs` reads with jobmeter's consumer
//!    settings, and one read with librdkafka's default
//!    `fetch.queue.backoff.ms`, printed as (c')).
//! 2. **Throughput**: `jobmeter run` (exactly-once on) is started on that
//!    backlog; sustained events/s is measured from its first committed
//!    batch to the last (start-up — process, accounts table, group join —
//!    is reported apart, and in the wall-clock figure). Peak resident
//!    memory (VmHWM) is reported.
//! 3. **Latency**: on a fresh prefix with a running meter, events are
//!    produced at a steady rate; after a warm-up (not counted), for every
//!    job stop, the time from its produce call to its charge being visible
//!    to a `read_committed` consumer is recorded: p50, p99, max.
//! 4. **Restore** (printed as (d)): the throughput run's meter is
//!    started again on an empty state directory and restores every
//!    partition from the changelog: records, seconds spent restoring, and
//!    how long until it is ready (`--restore-runs` times, each on a new
//!    directory).
//! 5. **The exactly-once limits** (printed as (e) and (f), after the
//!    throughput run): a pass-through reads the same backlog read_committed
//!    and publishes what the meter published, in as many transactions,
//!    with no billing (e); then again, also writing the meter's changelog
//!    state changes to a RocksDB store after each commit (f). The meter's
//!    rate and CPU an event are compared with both.
//!
//! `--placement` sets how the backlog's records sit on partitions (a fleet
//! of murmur2, librdkafka-default, keyless or mixed clients);
//! `--instances N` runs the throughput with N meters in one group;
//! `--shape realistic --minutes M` makes the backlog an outage of M minutes
//! leaves at the realistic fleet's rate (the catch-up time).

use jobmeter_bench::passthrough::{self, Volume};
use jobmeter_bench::process_cpu_seconds;
use jobmeter_core::state::StateChange;
use jobmeter_kafka::client::{brokers_from_env, KafkaSettings};
use jobmeter_offline::simulate::{accounts, events, FleetOptions};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Parser)]
struct Args {
    /// The throughput backlog's workload.
    #[arg(long, value_enum, default_value_t = Shape::Classic)]
    shape: Shape,
    /// Jobs in the throughput backlog (default: 40,000 for `classic`,
    /// about 12 events per job; 216,574 for `realistic`, about 4.4).
    #[arg(long)]
    jobs: Option<usize>,
    /// Steady input rate for the latency run, events/s.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Length of the latency run.
    #[arg(long, default_value_t = 30)]
    latency_seconds: u64,
    /// Steady input before the latency run whose stops are not counted
    /// (first transactions, first writes to fresh partitions, connections).
    #[arg(long, default_value_t = 5)]
    warmup_seconds: u64,
    /// Input partitions.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Times the ceiling is measured (the median is used).
    #[arg(long, default_value_t = 3)]
    ceiling_runs: usize,
    /// The jobmeter binary (default: next to this one).
    #[arg(long)]
    jobmeter: Option<PathBuf>,
    /// Extra `--set key=value` for the meter.
    #[arg(long = "set")]
    sets: Vec<String>,
    /// How the backlog's event records are placed on partitions (the
    /// throughput run): `misrouted` puts every event on another partition
    /// than its account's.
    #[arg(long, value_enum, default_value_t = jobmeter_ops::tools::Placement::Murmur2)]
    placement: jobmeter_ops::tools::Placement,
    /// Keep the run's topics (`bench-<time>-*`) instead of deleting them
    /// at the end.
    #[arg(long)]
    keep_topics: bool,
    /// Instead of the runs above, measure the accounts table at this many
    /// account records: first start (forwarding and loading), restart, and
    /// a second instance joining (rebalance), with peak memory of each.
    #[arg(long)]
    accounts: Option<usize>,
    /// With `--accounts`: per mille of the accounts on pro (the rest free).
    #[arg(long, default_value_t = 10)]
    pro_permille: usize,
    /// Times the restore (d) is measured, each on a new empty state
    /// directory.
    #[arg(long, default_value_t = 1)]
    restore_runs: usize,
    /// The broker's process id, when it runs on this machine (the local
    /// broker's is in `~/.cache/jobmeter/kafka-run-9092/broker.pid`): its
    /// CPU time per event is reported for the ceiling and throughput runs.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Meter instances of the throughput run (one consumer group; each on
    /// its own state directory and port): with two or more, events of
    /// accounts held elsewhere cross through the repartition topic.
    #[arg(long, default_value_t = 1)]
    instances: u16,
    /// With `--shape realistic`: job starts spread over this many minutes
    /// at the realistic fleet's rate (216,574 jobs in 12 hours, unless
    /// `--jobs` says otherwise): the backlog an outage of that length
    /// leaves.
    #[arg(long)]
    minutes: Option<u32>,
    /// Stop after the throughput run (a): no restore (d), no latency (b).
    #[arg(long)]
    throughput_only: bool,
    /// Price overrides written to the adjustments topic with the backlog
    /// (spread over the fleet's accounts, windows across its time span),
    /// so that the throughput run rates every event against them.
    #[arg(long, default_value_t = 0)]
    overrides: usize,
    /// Before the ceiling, run the exactly-once pass-through once over the
    /// backlog, untimed, so that a broker started a moment ago has
    /// compiled its produce, fetch and transaction paths before anything is
    /// measured.
    #[arg(long)]
    warm_broker: bool,
    /// Skip the exactly-once pass-throughs (e) and (f) after the
    /// throughput run.
    #[arg(long)]
    no_passthrough: bool,
}

/// Workload shapes of the throughput backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Shape {
    /// The original mix: 2,000 accounts, heartbeats every 10 s, 1.5 %
    /// fine-tunes, 5 % duplicates, 0.2 % malformed, within one month.
    Classic,
    /// An inference platform's fleet: many short jobs, 3 % fine-tunes,
    /// heartbeats every 30 s, 4.5 % duplicates, 1 % malformed, across a
    /// month boundary and a price change (`FleetOptions::realistic`).
    Realistic,
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let brokers = brokers_from_env();
    let settings = KafkaSettings::new(&brokers);
    let bin = match &args.jobmeter {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("jobmeter"),
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    println!("machine: {} cores, {}", num_cores(), cpu_model());
    if let Some(pid) = args.broker_pid {
        if process_cpu_seconds(pid).is_none() {
            anyhow::bail!("--broker-pid {pid}: no such process on this machine (the local broker's pid is in ~/.cache/jobmeter/kafka-run-9092/broker.pid)");
        }
    }
    if let Some(n) = args.accounts {
        println!("broker: {brokers}; partitions: {}", args.partitions);
        return accounts_scale(&args, &settings, &bin, n, stamp);
    }
    println!(
        "broker: {brokers}; partitions: {}; placement: {:?}; shape: {:?}",
        args.partitions, args.placement, args.shape
    );
    let b = Bench {
        args: &args,
        brokers,
        settings,
        bin,
        dir: tempdir()?,
    };
    // 1 + 2: backlog, ceiling, throughput.
    let prefix = format!("bench-{stamp}-tp");
    let events = b.backlog(&prefix)?;
    if args.warm_broker {
        b.warm_broker(&prefix, events)?;
    }
    let ceiling = b.ceiling(&prefix, events)?;
    let tp = b.throughput(&prefix, events, ceiling)?;
    let instances = tp.instances;
    if !args.no_passthrough {
        b.passthrough(&prefix, &tp, ceiling)?;
    }
    if args.throughput_only || instances > 1 {
        if instances > 1 && !args.throughput_only {
            // The restore and latency runs below are one instance's; the
            // stopped static members would hold their partitions until
            // their session times out.
            println!("(d) and (b) are measured with one instance only: run again without --instances");
        }
        if !args.keep_topics {
            delete_topics(&b.settings, &prefix)?;
        }
        return Ok(());
    }
    b.restores(&prefix)?;
    if !args.keep_topics {
        delete_topics(&b.settings, &prefix)?;
    }
    // 3: latency at a steady rate.
    let prefix = format!("bench-{stamp}-lat");
    b.latency(&prefix)?;
    if !args.keep_topics {
        delete_topics(&b.settings, &prefix)?;
    }
    let _ = std::fs::remove_dir_all(&b.dir);
    Ok(())
}

/// What every phase of the bench uses.
struct Bench<'a> {
    args: &'a Args,
    brokers: String,
    settings: KafkaSettings,
    bin: PathBuf,
    dir: PathBuf,
}

/// What the throughput run (a) measured.
struct Throughput {
    instances: u16,
    events: usize,
    /// Events/s from the first committed batch to the last.
    sustained: f64,
    /// The meters' CPU over the run, per event.
    cpu_us_per_event: f64,
    /// The meters' CPU from the first committed batch to the last, per
    /// event applied in that time (start-up left out, as the pass-through's
    /// set-up is).
    cpu_us_per_event_after_first: f64,
    /// Batches committed (one transaction each).
    transactions: u64,
}

/// The HTTP port of the first meter instance of the throughput and
/// restore runs (others count up from it), and of the latency run.
const TP_PORT: u16 = 19464;
const LATENCY_PORT: u16 = 19465;

impl Bench<'_> {
    /// The broker's CPU seconds so far, when `--broker-pid` names it.
    fn broker_cpu(&self) -> Option<f64> {
        self.args.broker_pid.map(cpu_seconds)
    }

    /// The fleet of the throughput backlog, as `--shape` and `--minutes` say.
    fn fleet(&self) -> FleetOptions {
        let args = self.args;
        match args.shape {
            Shape::Classic => FleetOptions {
                jobs: args.jobs.unwrap_or(40_000),
                accounts: 2_000,
                mean_gap_ms: 50,
                ..FleetOptions::default()
            },
            Shape::Realistic => match args.minutes {
                None => FleetOptions::realistic(args.jobs.unwrap_or(216_574)),
                Some(m) => {
                    let m = i64::from(m.max(1));
                    let jobs = args.jobs.unwrap_or((216_574 * m as usize).div_ceil(720));
                    FleetOptions {
                        mean_gap_ms: (m * 60_000 / jobs.max(1) as i64).max(1),
                        ..FleetOptions::realistic(jobs)
                    }
                }
            },
        }
    }

    /// The meter's topics (a meter run creates them, then stops), then the
    /// whole backlog, so that the meter starts on a full topic. Returns how
    /// many events it holds.
    fn backlog(&self, prefix: &str) -> anyhow::Result<usize> {
        let args = self.args;
        let mut meter = start_meter(
            &self.bin,
            prefix,
            &self.dir.join("tp"),
            args.partitions,
            &args.sets,
            TP_PORT,
        )?;
        wait_ready(&mut meter, TP_PORT)?;
        let opts = self.fleet();
        let evs = events(&opts);
        let accs = accounts(&opts);
        println!(
            "workload: {:?}, {} jobs, {} accounts, {} events (heartbeats every {} s)",
            args.shape,
            opts.jobs,
            opts.accounts,
            evs.len(),
            opts.heartbeat_interval_ms / 1000
        );
        drop(meter);
        let topics = jobmeter_kafka::topics::Topics::with_prefix(prefix);
        let t0 = Instant::now();
        jobmeter_ops::tools::produce_fleet_placed(
            &jobmeter_kafka::client::KafkaSettings::new(&self.brokers),
            &topics,
            &accs,
            &evs,
            0,
            args.placement,
        )?;
        println!("produced {} events in {:.1}s", evs.len(), t0.elapsed().as_secs_f64());
        if args.overrides > 0 {
            self.overrides(&topics, &opts, &accs)?;
        }
        Ok(evs.len())
    }

    /// `--overrides`: price overrides on the fleet's accounts, round robin,
    /// of every selector shape, each over a window of a few hours inside the
    /// fleet's span (at most 1,000 an account, the meter's bound).
    fn overrides(
        &self,
        topics: &jobmeter_kafka::topics::Topics,
        opts: &FleetOptions,
        accs: &[(String, String)],
    ) -> anyhow::Result<()> {
        let mut ids: Vec<&str> = accs.iter().map(|(k, _)| k.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let n = self.args.overrides;
        if ids.is_empty() || n > ids.len() * jobmeter_core::adjust::MAX_OVERRIDES_PER_ACCOUNT {
            anyhow::bail!("--overrides {n}: at most 1,000 an account over {} accounts", ids.len());
        }
        let producer: ThreadedProducer<DefaultProducerContext> = self.settings.producer().create()?;
        let hour = 3_600_000;
        for i in 0..n {
            let account = ids[i % ids.len()];
            let from = jobmeter_core::Timestamp(opts.start.0 + (i as i64 * 7_919 % 12) * hour);
            let until = jobmeter_core::Timestamp(from.0 + (1 + i as i64 % 5) * hour);
            let selector = match i % 3 {
                0 => "{}",
                1 => r#"{"kind":"inference"}"#,
                _ => r#"{"kind":"fine_tune"}"#,
            };
            let price = if i % 2 == 0 {
                r#""multiplier":"0.9""#
            } else {
                r#""rate_per_second":"0.0004""#
            };
            let rec = format!(
                r#"{{"adjustment_id":"bench-{i}","account_id":"{account}","type":"price_override","selector":{selector},{price},"effective_from":"{from}","effective_until":"{until}","reason":"bench","requested_by":"bench"}}"#
            );
            jobmeter_kafka::produce::send_waiting(
                &producer,
                BaseRecord::<str, str>::to(&topics.adjustments)
                    .key(account)
                    .payload(&rec),
                None,
            )?;
        }
        producer.flush(Duration::from_secs(60))?;
        println!("produced {n} price overrides over {} accounts", ids.len().min(n));
        Ok(())
    }

    /// (c): a plain consumer reads the backlog, doing nothing; the median
    /// of `--ceiling-runs` reads, events/s.
    fn ceiling(&self, prefix: &str, n: usize) -> anyhow::Result<f64> {
        let args = self.args;
        let topic = format!("{prefix}.job-events");
        let mut reads = Vec::new();
        let (c_broker, c_machine) = (self.broker_cpu(), MachineCpu::now());
        for _ in 0..args.ceiling_runs.max(1) {
            reads.push(raw_consume_rate(&self.settings, &topic, args.partitions, n, false)?);
        }
        let c_share = CpuShare::since(c_broker, self.broker_cpu(), &c_machine, reads.len() * n);
        let untuned = raw_consume_rate(&self.settings, &topic, args.partitions, n, true)?;
        let mut sorted = reads.clone();
        sorted.sort_by(f64::total_cmp);
        let ceiling = sorted[sorted.len() / 2];
        println!(
            "(c) ceiling: plain consumer read {} events at {:.0} events/s (median of {} reads: {})",
            n,
            ceiling,
            reads.len(),
            reads.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")
        );
        println!("(c) during the ceiling reads: {c_share}");
        println!(
            "(c') the same plain consumer with librdkafka's default fetch.queue.backoff.ms (1 s): {untuned:.0} events/s (one read)"
        );
        Ok(ceiling)
    }

    /// Starts `--instances` meters on the backlog (one group).
    fn start_instances(&self, prefix: &str) -> anyhow::Result<(Vec<u16>, Vec<MeterChild>)> {
        let args = self.args;
        let instances = args.instances.max(1);
        let ports: Vec<u16> = (0..instances).map(|i| TP_PORT + i).collect();
        let meters = ports
            .iter()
            .enumerate()
            .map(|(i, port)| match instances {
                1 => start_meter(
                    &self.bin,
                    prefix,
                    &self.dir.join("tp"),
                    args.partitions,
                    &args.sets,
                    *port,
                ),
                _ => start_meter_as(
                    &self.bin,
                    prefix,
                    &format!("{prefix}-{i}"),
                    &self.dir.join(format!("tp-{i}")),
                    args.partitions,
                    &args.sets,
                    *port,
                ),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok((ports, meters))
    }

    /// (w): the pass-through once over the backlog, untimed, publishing as
    /// many records as events (150 bytes each) in transactions of 5,000.
    fn warm_broker(&self, prefix: &str, events: usize) -> anyhow::Result<()> {
        let n = events as u64;
        let volume = Volume {
            events: n,
            records: n,
            bytes: 150 * n,
            transactions: n.div_ceil(5_000),
            sample: Vec::new(),
        };
        let t = Instant::now();
        let (c_broker, c_machine) = (self.broker_cpu(), MachineCpu::now());
        let run = self.passthrough_run(prefix, "warmup", volume, None)?;
        println!(
            "(w) broker warm-up (not measured): the pass-through over the backlog in {:.1}s, {:.0} events/s; {}",
            t.elapsed().as_secs_f64(),
            run.events_per_second,
            CpuShare::since(c_broker, self.broker_cpu(), &c_machine, events)
        );
        Ok(())
    }

    /// One pass-through run over the backlog of `prefix` into
    /// `<prefix>.<name>` (created with the input's partitions).
    fn passthrough_run(
        &self,
        prefix: &str,
        name: &str,
        volume: Volume,
        store: Option<passthrough::StoreOfRecord<'_>>,
    ) -> anyhow::Result<passthrough::Run> {
        let output = format!("{prefix}.{name}");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(jobmeter_kafka::topics::create_topic(
            &self.settings,
            &output,
            self.args.partitions,
            1,
        ))?;
        passthrough::run(
            &self.settings,
            (&format!("{prefix}.job-events"), &output),
            self.args.partitions,
            (&format!("{prefix}-{name}"), &format!("{prefix}-{name}")),
            volume,
            store,
        )
    }

    /// (e): what the meter published in (a) — records and bytes of its
    /// outputs, changelog and internal topics, and its transactions — is
    /// published again by the pass-through, with no billing; the meter's
    /// rate and CPU are compared with it and with the ceiling.
    fn passthrough(&self, prefix: &str, tp: &Throughput, ceiling: f64) -> anyhow::Result<()> {
        let topics = jobmeter_kafka::topics::Topics::with_prefix(prefix);
        let (mut records, mut bytes) = (0u64, 0u64);
        // Every 16th value, up to 65,536 of them, written again in turn.
        let mut sample = Vec::new();
        // The changelog's state changes, for (f)'s store of record.
        let mut state: Vec<(i32, i64, StateChange)> = Vec::new();
        for t in [
            &topics.charges,
            &topics.limits,
            &topics.statements,
            &topics.dlq,
            &topics.commands,
            &topics.changelog,
            &topics.repartition,
            &topics.accounts_by_partition,
            &topics.pro_subscribers,
        ] {
            let parts = jobmeter_kafka::topics::partition_count(&self.settings, t)?;
            let all: Vec<(i32, Option<i64>)> = (0..parts).map(|p| (p, None)).collect();
            jobmeter_kafka::reader::read_to_end(
                &self.settings,
                "bench-published",
                t,
                &all,
                Duration::from_secs(600),
                |r| {
                    records += 1;
                    bytes += (r.key.as_ref().map_or(0, Vec::len) + r.value.as_ref().map_or(0, Vec::len)) as u64;
                    if *t == topics.changelog {
                        if let Some((table, key)) = r.key.as_deref().and_then(jobmeter_kafka::changelog::split) {
                            let change = StateChange {
                                table,
                                key: key.to_vec(),
                                value: r.value.clone(),
                            };
                            state.push((r.partition, r.offset, change));
                        }
                    }
                    if records % 16 == 0 && sample.len() < 65_536 {
                        sample.extend(r.value);
                    }
                },
            )?;
        }
        let volume = Volume {
            events: tp.events as u64,
            records,
            bytes,
            transactions: tp.transactions.max(1),
            sample,
        };
        let txns = volume.transactions;
        let (c_broker, c_machine) = (self.broker_cpu(), MachineCpu::now());
        let run = self.passthrough_run(prefix, "passthrough", volume.clone(), None)?;
        let share = CpuShare::since(c_broker, self.broker_cpu(), &c_machine, tp.events);
        let pt_us = 1e6 * run.cpu_seconds / tp.events.max(1) as f64;
        println!(
            "(e) exactly-once pass-through: {:.0} events/s, {pt_us:.1} µs CPU/event; (a) published {records} records, {bytes} bytes in {txns} transactions; (e) wrote {} records, {} bytes (values sampled from (a)'s) in {} transactions of {} events; {share}",
            run.events_per_second,
            run.records,
            run.bytes,
            run.transactions,
            tp.events as u64 / txns,
        );
        println!(
            "(a)/(e) the meter: {:.2}× the exactly-once pass-through, {:.2}× the plain-consumer ceiling; meter CPU/event {:.2}× the pass-through's ({:.2}× after the first commit)",
            tp.sustained / run.events_per_second,
            tp.sustained / ceiling,
            tp.cpu_us_per_event / pt_us.max(1e-9),
            tp.cpu_us_per_event_after_first / pt_us.max(1e-9),
        );
        self.passthrough_with_store(prefix, tp, volume, state)
    }

    /// (f): (e) again, also writing the meter's state changes (its
    /// changelog, read back) to a RocksDB store of record after each
    /// commit, spread over the transactions as the meter made them.
    fn passthrough_with_store(
        &self,
        prefix: &str,
        tp: &Throughput,
        volume: Volume,
        mut state: Vec<(i32, i64, StateChange)>,
    ) -> anyhow::Result<()> {
        // Each partition's changes in order, the partitions interleaved as
        // the meter's batches interleave them: by the share of the
        // partition's changelog read so far.
        let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
        for (p, o, _) in &state {
            let e = ends.entry(*p).or_default();
            *e = (*e).max(*o + 1);
        }
        state.sort_by_key(|(p, o, _)| {
            let end = ends.get(p).copied().unwrap_or(1).max(1);
            (i128::from(*o) * 1_000_000 / i128::from(end), *p, *o)
        });
        let rows = state.len();
        let store = jobmeter_store::Store::open(&self.dir.join("passthrough-store"))?;
        let state: Vec<(i32, StateChange)> = state.into_iter().map(|(p, _, c)| (p, c)).collect();
        let (c_broker, c_machine) = (self.broker_cpu(), MachineCpu::now());
        let run = self.passthrough_run(prefix, "passthrough-store", volume, Some((&store, &state)))?;
        let share = CpuShare::since(c_broker, self.broker_cpu(), &c_machine, tp.events);
        let us = 1e6 * run.cpu_seconds / tp.events.max(1) as f64;
        println!(
            "(f) exactly-once pass-through with a store of record: {:.0} events/s, {us:.1} µs CPU/event; (e)'s records and transactions, and {} of (a)'s {rows} changelog state changes written to RocksDB, one synced batch after each commit; {share}",
            run.events_per_second, run.state_rows,
        );
        println!(
            "(a)/(f) the meter: {:.2}× the pass-through with a store of record; meter CPU/event {:.2}× its CPU ({:.2}× after the first commit)",
            tp.sustained / run.events_per_second,
            tp.cpu_us_per_event / us.max(1e-9),
            tp.cpu_us_per_event_after_first / us.max(1e-9),
        );
        Ok(())
    }

    /// (a): the meter(s) on the backlog of `n` events, from process start
    /// to the last commit.
    fn throughput(&self, prefix: &str, n: usize, ceiling: f64) -> anyhow::Result<Throughput> {
        let (a_broker, a_machine) = (self.broker_cpu(), MachineCpu::now());
        let t1 = Instant::now();
        let (ports, mut meters) = self.start_instances(prefix)?;
        // Every instance counts the events its own meters applied: the sum
        // is the backlog once each is applied somewhere.
        let consumed_all = || {
            ports
                .iter()
                .map(|p| metric(*p, "jobmeter_events_total").unwrap_or(0.0))
                .sum::<f64>()
        };
        let total = n as f64;
        // The first committed batch: from here on the meter is at work
        // (before it: process start, accounts table, group join, restore).
        let mut first: Option<(Instant, f64)> = None;
        // The meters' CPU up to then, so the cost of the work after it can
        // be told from start-up's.
        let mut cpu_first = 0.0;
        loop {
            let consumed = consumed_all();
            if first.is_none() && consumed > 0.0 {
                first = Some((Instant::now(), consumed));
                cpu_first = meters.iter().map(|m| cpu_seconds(m.id())).sum();
            }
            if consumed >= total {
                break;
            }
            if t1.elapsed() > Duration::from_secs(1800) {
                anyhow::bail!("the meter did not finish the backlog in 30 minutes");
            }
            for m in &mut meters {
                m.check_alive()?;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let end = Instant::now();
        if std::env::var_os("JOBMETER_BENCH_VERBOSE").is_some() {
            for line in metrics_text(TP_PORT).lines().filter(|l| {
                l.starts_with("jobmeter_commit_seconds_sum") || l.starts_with("jobmeter_commit_seconds_count")
            }) {
                println!("  {line}");
            }
        }
        let secs = (end - t1).as_secs_f64();
        let (t_first, n_first) = first.unwrap_or((t1, 0.0));
        let sustained = (total - n_first) / (end - t_first).as_secs_f64().max(1e-3);
        let rss: u64 = meters.iter().map(|m| peak_rss_kib(m.id())).sum();
        // The meters' own CPU time (user + system, every thread), so the
        // cost per event can be compared across runs whatever else the
        // machine did.
        let cpu: f64 = meters.iter().map(|m| cpu_seconds(m.id())).sum();
        let after_first = 1e6 * (cpu - cpu_first) / (total - n_first).max(1.0);
        println!(
            "(a) throughput: {:.0} events/s sustained ({:.0} % of the ceiling), from the first committed batch to the last; {} events in {:.2}s = {:.0} events/s counting start-up ({:.2}s to the first commit); peak RSS {} MiB; meter CPU {:.2}s = {:.1} µs/event ({cpu_first:.2}s to the first commit; {after_first:.1} µs/event after it)",
            sustained,
            100.0 * sustained / ceiling,
            n,
            secs,
            total / secs,
            (t_first - t1).as_secs_f64(),
            rss / 1024,
            cpu,
            1e6 * cpu / total
        );
        println!(
            "(a) during the run (start-up included): {}",
            CpuShare::since(a_broker, self.broker_cpu(), &a_machine, n)
        );
        if self.args.overrides > 0 {
            let read: f64 = ports
                .iter()
                .map(|p| metric(*p, "jobmeter_adjustments_read_total").unwrap_or(0.0))
                .sum();
            println!("(a) pricing adjustments read and applied by the meters: {read:.0}");
        }
        let transactions = ports
            .iter()
            .map(|p| metric(*p, "jobmeter_batch_events_count").unwrap_or(0.0))
            .sum::<f64>() as u64;
        drop(meters);
        Ok(Throughput {
            instances: ports.len() as u16,
            events: n,
            sustained,
            cpu_us_per_event: 1e6 * cpu / total,
            cpu_us_per_event_after_first: after_first,
            transactions,
        })
    }

    /// (d): the same instance on an empty state directory restores every
    /// partition from the changelog before it is ready.
    fn restores(&self, prefix: &str) -> anyhow::Result<()> {
        let args = self.args;
        for run in 0..args.restore_runs.max(1) {
            let t_r = Instant::now();
            let mut meter = start_meter(
                &self.bin,
                prefix,
                &self.dir.join(format!("tp-restore-{run}")),
                args.partitions,
                &args.sets,
                TP_PORT,
            )?;
            wait_ready_within(&mut meter, TP_PORT, Duration::from_secs(1800))?;
            let ready_after = t_r.elapsed().as_secs_f64();
            let records = metric(TP_PORT, "jobmeter_restored_records_total").unwrap_or(0.0);
            let restoring = metric(TP_PORT, "jobmeter_restore_seconds_sum").unwrap_or(0.0);
            let partitions = metric(TP_PORT, "jobmeter_restore_seconds_count").unwrap_or(0.0);
            println!(
                "(d) restore: {records:.0} changelog records of {partitions:.0} partitions in {restoring:.2}s of restoring = {:.0} records/s; ready {ready_after:.2}s after start; peak RSS {} MiB",
                records / restoring.max(1e-3),
                peak_rss_kib(meter.id()) / 1024
            );
            drop(meter);
        }
        Ok(())
    }

    /// (b): events produced at `--rate`; after the warm-up, the time from
    /// each stop's send to its charge being visible (read_committed).
    fn latency(&self, prefix: &str) -> anyhow::Result<()> {
        let args = self.args;
        let mut meter = start_meter(
            &self.bin,
            prefix,
            &self.dir.join("lat"),
            args.partitions,
            &args.sets,
            LATENCY_PORT,
        )?;
        wait_ready(&mut meter, LATENCY_PORT)?;
        let topics = jobmeter_kafka::topics::Topics::with_prefix(prefix);
        let n_events = (args.rate * (args.warmup_seconds + args.latency_seconds)) as usize;
        let lat_opts = FleetOptions {
            seed: 9,
            jobs: n_events / 12 + 1,
            accounts: 2_000,
            mean_gap_ms: 50,
            duplicate_permille: 0,
            reorder_permille: 0,
            lost_stop_permille: 0,
            bad_permille: 0,
            ..FleetOptions::default()
        };
        let evs = events(&lat_opts);
        let evs = &evs[..n_events.min(evs.len())];
        let probe = Arc::new(LatencyProbe::default());
        let reader = probe.clone().read_charges(&self.settings, &topics.charges)?;
        let producer: ThreadedProducer<DefaultProducerContext> =
            self.settings.producer().set("linger.ms", "1").create()?;
        for (k, r) in &accounts(&lat_opts) {
            producer
                .send(BaseRecord::to(&topics.accounts).key(k).payload(r))
                .map_err(|(e, _)| e)?;
        }
        producer.flush(Duration::from_secs(10))?;
        let t2 = Instant::now();
        let warmup_events = (args.rate * args.warmup_seconds) as usize;
        for (i, e) in evs.iter().enumerate() {
            let due = Duration::from_micros(i as u64 * 1_000_000 / args.rate);
            let el = t2.elapsed();
            if due > el {
                std::thread::sleep(due - el);
            }
            if i >= warmup_events && e.json.contains("\"job.stopped\"") {
                let job = serde_json::from_str::<serde_json::Value>(&e.json)?["subject"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                probe.sent(job)?;
            }
            let rec = BaseRecord::to(&topics.job_events)
                .key(&e.key)
                .payload(&e.json)
                .timestamp(e.time.0);
            jobmeter_kafka::produce::send_waiting(&producer, rec, None)?;
        }
        producer.flush(Duration::from_secs(30))?;
        let achieved = evs.len() as f64 / t2.elapsed().as_secs_f64();
        let t2 = t2 + Duration::from_secs(args.warmup_seconds);
        std::thread::sleep(Duration::from_secs(3));
        probe.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
        if std::env::var_os("JOBMETER_BENCH_VERBOSE").is_some() {
            for line in metrics_text(LATENCY_PORT)
                .lines()
                .filter(|l| l.starts_with("jobmeter_commit_seconds_bucket"))
            {
                println!("  {line}");
            }
        }
        let lat = probe.report(t2)?;
        let pct = |q: f64| {
            lat.get(((lat.len() as f64 - 1.0) * q).round() as usize)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        println!(
            "(b) latency at {:.0} events/s for {}s after {}s of warm-up: {} stops measured; stop produced -> charge visible (read_committed): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; peak RSS {} MiB",
            achieved,
            args.latency_seconds,
            args.warmup_seconds,
            lat.len(),
            pct(0.5),
            pct(0.99),
            lat.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            peak_rss_kib(meter.id()) / 1024
        );
        drop(meter);
        Ok(())
    }
}

/// Stops sent (by job) and the charges seen for them: the latency run's
/// measurements.
#[derive(Default)]
struct LatencyProbe {
    sent: Mutex<HashMap<String, Instant>>,
    seen: Mutex<Vec<(Instant, Duration)>>,
    stop: std::sync::atomic::AtomicBool,
}

impl LatencyProbe {
    /// Job `job`'s stop is being sent now.
    fn sent(&self, job: String) -> anyhow::Result<()> {
        self.sent
            .lock()
            .map_err(|_| anyhow::anyhow!("lock"))?
            .insert(job, Instant::now());
        Ok(())
    }

    /// Reads `topic` (read_committed) on a thread of its own until stopped,
    /// noting when each sent job's charge becomes visible.
    fn read_charges(
        self: Arc<Self>,
        settings: &KafkaSettings,
        topic: &str,
    ) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
        let (settings, topic) = (settings.clone(), topic.to_owned());
        let parts = jobmeter_kafka::topics::partition_count(&settings, &topic)?;
        Ok(std::thread::spawn(move || -> anyhow::Result<()> {
            // Measures visibility, so the reader itself must not wait long
            // per fetch (librdkafka's default fetch.wait.max.ms is 500 ms).
            let consumer: BaseConsumer = settings
                .reader("bench-latency")
                .set("fetch.wait.max.ms", "10")
                .create()?;
            let mut tpl = TopicPartitionList::new();
            for p in 0..parts {
                tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
            }
            consumer.assign(&tpl)?;
            while !self.stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                    let now = Instant::now();
                    let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
                    let job = v["job_id"].as_str().unwrap_or_default().to_owned();
                    if let Some(t) = self.sent.lock().map_err(|_| anyhow::anyhow!("lock"))?.remove(&job) {
                        self.seen
                            .lock()
                            .map_err(|_| anyhow::anyhow!("lock"))?
                            .push((t, now - t));
                    }
                }
            }
            Ok(())
        }))
    }

    /// The latencies measured, sorted; says how many stops had no charge
    /// (and, verbose, when the slow ones were sent, from `t2`).
    fn report(&self, t2: Instant) -> anyhow::Result<Vec<Duration>> {
        let samples = self.seen.lock().map_err(|_| anyhow::anyhow!("lock"))?.clone();
        let unmatched = self.sent.lock().map_err(|_| anyhow::anyhow!("lock"))?.len();
        if unmatched > 0 {
            println!("  {unmatched} stops sent after the warm-up had no charge visible (jobs whose start was never sent, or not billed)");
        }
        if std::env::var_os("JOBMETER_BENCH_VERBOSE").is_some() {
            // When the slow ones were sent: clustered (a stall) or spread out?
            let mut slow: std::collections::BTreeMap<u64, (usize, f64)> = std::collections::BTreeMap::new();
            for (sent_at, d) in &samples {
                if *d > Duration::from_millis(200) {
                    let e = slow.entry(sent_at.duration_since(t2).as_secs()).or_default();
                    e.0 += 1;
                    e.1 = e.1.max(d.as_secs_f64() * 1000.0);
                }
            }
            println!("  stops over 200 ms by second of the run (count, max ms): {slow:?}");
        }
        let mut lat: Vec<Duration> = samples.iter().map(|x| x.1).collect();
        lat.sort();
        Ok(lat)
    }
}

/// The accounts table at scale: `n` records on the accounts topic (the
/// meter's topics created first), then (1) a first start on them, (2) a
/// restart, (3) a second instance joining while the first runs. For each:
/// seconds from process start until ready, account records stored by that
/// instance, peak RSS.
fn accounts_scale(args: &Args, settings: &KafkaSettings, bin: &PathBuf, n: usize, stamp: u64) -> anyhow::Result<()> {
    let prefix = format!("bench-{stamp}-acc");
    let topics = jobmeter_kafka::topics::Topics::with_prefix(&prefix);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let layout = jobmeter_kafka::topics::TopicLayout {
        partitions: args.partitions,
        output_partitions: args.partitions,
        replication: 1,
    };
    rt.block_on(jobmeter_kafka::topics::ensure_topics(settings, &topics, &layout))?;
    let producer: ThreadedProducer<DefaultProducerContext> = settings.producer().create()?;
    let t0 = Instant::now();
    let mut pro = 0usize;
    for i in 0..n {
        let account = format!("acct-{i:09}");
        let plan = if (i * 7919) % 1000 < args.pro_permille {
            pro += 1;
            "pro"
        } else {
            "free"
        };
        let value = format!(r#"{{"account_id":"{account}","plan":"{plan}","effective_from":"2024-01-01T00:00:00Z"}}"#);
        jobmeter_kafka::produce::send_waiting(
            &producer,
            BaseRecord::to(&topics.accounts)
                .key(account.as_bytes())
                .payload(value.as_bytes()),
            None,
        )?;
    }
    producer.flush(Duration::from_secs(120))?;
    println!(
        "produced {n} account records ({pro} pro) in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let dir = tempdir()?;
    let run = |what: &str, state: &str, port: u16, others: &[u16]| -> anyhow::Result<MeterChild> {
        let t = Instant::now();
        // Each instance its own id (transactional ids, group membership).
        let mut m = start_meter_as(
            bin,
            &prefix,
            &format!("{prefix}-{state}"),
            &dir.join(state),
            args.partitions,
            &args.sets,
            port,
        )?;
        wait_ready_within(&mut m, port, Duration::from_secs(1800))?;
        let ready_at = t.elapsed().as_secs_f64();
        // A joining instance is ready before the group has moved
        // partitions to it: wait until every instance is ready again and
        // what it stored has settled.
        let mut stored = -1.0;
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = applied(port);
            let all_ready = others
                .iter()
                .chain([&port])
                .all(|p| metric(*p, "jobmeter_ready") == Some(1.0));
            if all_ready && now == stored && metric(port, "jobmeter_assigned_partitions").unwrap_or(1.0) > 0.0 {
                break;
            }
            stored = now;
        }
        println!(
            "{what}: ready after {:.2}s (settled after {:.2}s); account records stored: {}; partitions assigned: {}; pro subscribers known: {}; accounts cached: {}; peak RSS {} MiB",
            ready_at,
            t.elapsed().as_secs_f64(),
            stored,
            metric(port, "jobmeter_assigned_partitions").unwrap_or(f64::NAN),
            metric(port, "jobmeter_pro_subscribers").unwrap_or(f64::NAN),
            metric(port, "jobmeter_accounts").unwrap_or(f64::NAN),
            peak_rss_kib(m.id()) / 1024
        );
        Ok(m)
    };
    let first = run("(1) first start, empty state", "a", 19464, &[])?;
    drop(first);
    let first = run("(2) restart on its state", "a", 19464, &[])?;
    let second = run("(3) a second instance joins, empty state", "b", 19465, &[19464])?;
    println!(
        "    first instance after the rebalance: partitions assigned {}, peak RSS {} MiB",
        metric(19464, "jobmeter_assigned_partitions").unwrap_or(f64::NAN),
        peak_rss_kib(first.id()) / 1024
    );
    drop(second);
    drop(first);
    if !args.keep_topics {
        delete_topics(settings, &prefix)?;
    }
    Ok(())
}

/// Account records an instance stored (`applied`).
fn applied(port: u16) -> f64 {
    metrics_text(port)
        .lines()
        .find(|l| l.starts_with(r#"jobmeter_account_records_total{outcome="applied"}"#))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}

/// A run's topics would otherwise stay on the broker, which starts slower
/// with every thousand partitions it keeps.
fn delete_topics(settings: &KafkaSettings, prefix: &str) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let deleted = rt.block_on(jobmeter_kafka::topics::delete_prefixed(settings, prefix))?;
    println!("deleted the {} topics of {prefix}", deleted.len());
    Ok(())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("jobmeter-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// A meter child process, terminated when dropped (also on errors).
struct MeterChild(Child);

impl MeterChild {
    fn id(&self) -> u32 {
        self.0.id()
    }

    /// An error when the meter has exited (it refused its configuration,
    /// or crashed): a bench waiting on its metrics would wait forever.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.0.try_wait()? {
            Some(status) => anyhow::bail!(
                "the meter (pid {}) exited with {status}: see its log (the state directory's .log file)",
                self.0.id()
            ),
            None => Ok(()),
        }
    }
}

impl Drop for MeterChild {
    fn drop(&mut self) {
        terminate(&mut self.0);
    }
}

fn start_meter(
    bin: &PathBuf,
    prefix: &str,
    state: &std::path::Path,
    partitions: i32,
    sets: &[String],
    port: u16,
) -> anyhow::Result<MeterChild> {
    start_meter_as(bin, prefix, prefix, state, partitions, sets, port)
}

fn start_meter_as(
    bin: &PathBuf,
    prefix: &str,
    instance: &str,
    state: &std::path::Path,
    partitions: i32,
    sets: &[String],
    port: u16,
) -> anyhow::Result<MeterChild> {
    let log = std::fs::File::create(state.with_extension("log"))?;
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .args(["--state-dir", &state.display().to_string()])
        .args(["--http-listen", &format!("127.0.0.1:{port}")])
        .args(["--instance-id", instance])
        .args(["--set", &format!("topics.prefix={prefix}")])
        .args(["--set", &format!("topics.partitions={partitions}")])
        .args(["--set", "billing.plans=config/plans.toml"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    Ok(MeterChild(
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()?,
    ))
}

fn terminate(c: &mut Child) {
    let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
    let _ = c.wait();
}

fn wait_ready(m: &mut MeterChild, port: u16) -> anyhow::Result<()> {
    wait_ready_within(m, port, Duration::from_secs(120))
}

fn wait_ready_within(m: &mut MeterChild, port: u16, limit: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if metric(port, "jobmeter_ready") == Some(1.0) {
            return Ok(());
        }
        m.check_alive()?;
        std::thread::sleep(Duration::from_millis(200));
    }
    anyhow::bail!("the meter on port {port} did not become ready")
}

fn metrics_text(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    if write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_err() {
        return String::new();
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf
}

fn metric(port: u16, name: &str) -> Option<f64> {
    let buf = metrics_text(port);
    let mut total = None;
    for line in buf.lines().filter(|l| !l.starts_with('#')) {
        let Some((k, v)) = line.rsplit_once(' ') else { continue };
        if k.split('{').next() == Some(name) {
            *total.get_or_insert(0.0) += v.parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}

/// How fast one plain read_committed consumer reads the topic, with
/// jobmeter's consumer settings, or with librdkafka's default
/// `fetch.queue.backoff.ms` when `default_backoff` (the plain consumer a
/// user would write without tuning it).
fn raw_consume_rate(
    settings: &KafkaSettings,
    topic: &str,
    partitions: i32,
    n: usize,
    default_backoff: bool,
) -> anyhow::Result<f64> {
    let mut config = settings.reader("bench-ceiling");
    config.set("enable.partition.eof", "false");
    if default_backoff {
        config.set("fetch.queue.backoff.ms", "1000");
    }
    let consumer: BaseConsumer = config.create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let t = Instant::now();
    let mut got = 0usize;
    while got < n {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            got += 1;
        }
        if t.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("plain consumer read only {got} of {n}");
        }
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU seconds of a running process so far, from
/// `/proc/<pid>/stat` (clock ticks of 10 ms).
fn cpu_seconds(pid: u32) -> f64 {
    process_cpu_seconds(pid).unwrap_or(0.0)
}

/// The whole machine's CPU time from `/proc/stat`: busy and total ticks
/// over all cores (idle and iowait count as not busy).
struct MachineCpu {
    busy: u64,
    total: u64,
}

impl MachineCpu {
    fn now() -> Self {
        let line = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned))
            .unwrap_or_default();
        let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        let total: u64 = f.iter().take(8).sum();
        let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
        Self {
            busy: total.saturating_sub(idle),
            total,
        }
    }
}

/// Where the machine's CPU went over a measured stretch: how busy all its
/// cores were, and the broker's CPU time per event.
struct CpuShare {
    busy_percent: f64,
    broker_us_per_event: Option<f64>,
}

impl CpuShare {
    fn since(broker_before: Option<f64>, broker_after: Option<f64>, machine: &MachineCpu, events: usize) -> Self {
        let now = MachineCpu::now();
        let total = now.total.saturating_sub(machine.total).max(1) as f64;
        let broker_us_per_event = match (broker_before, broker_after) {
            (Some(b), Some(a)) => Some(1e6 * (a - b) / events.max(1) as f64),
            _ => None,
        };
        Self {
            busy_percent: 100.0 * now.busy.saturating_sub(machine.busy) as f64 / total,
            broker_us_per_event,
        }
    }
}

impl std::fmt::Display for CpuShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "machine {:.0} % busy (all cores)", self.busy_percent)?;
        match self.broker_us_per_event {
            Some(us) => write!(f, "; broker CPU {us:.1} µs/event"),
            None => write!(f, "; broker CPU not measured (--broker-pid)"),
        }
    }
}

fn num_cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
