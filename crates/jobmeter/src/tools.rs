//! Small Kafka tools for demos and operators: producing a simulated fleet,
//! dumping a topic's committed records.

use crate::simulate::SimEvent;
use anyhow::Context as _;
use jobmeter_kafka::client::KafkaSettings;
use jobmeter_kafka::reader::read_to_end;
use jobmeter_kafka::topics::{partition_count, Topics};
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use std::io::Write;
use std::time::{Duration, Instant};

/// This machine's name: `$HOSTNAME`, else `/etc/hostname`, else `localhost`
/// (event sources of `jobmeter emit`, the advertised URL of a wildcard listener).
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// How a producer places event records on partitions: what the workers of
/// a real fleet may do (the meter meters each account on its own partition
/// whatever they do; see the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Placement {
    /// Keyed by account, Kafka's murmur2 partitioner (Java's default; the
    /// partition that meters the account).
    #[default]
    Murmur2,
    /// Keyed by account, librdkafka's default `consistent_random` (CRC32).
    ConsistentRandom,
    /// No key.
    Keyless,
    /// Keyed by account, always on the partition after the account's own:
    /// every event is on the wrong partition (a benchmark's worst case).
    Misrouted,
}

/// Produces account records, then events (keyed by account), at `rate`
/// events per second (0: as fast as possible). The topics must exist
/// (`jobmeter run` creates them).
pub fn produce_fleet(
    brokers: &str,
    topics: &Topics,
    accounts: &[(String, String)],
    events: &[SimEvent],
    rate: u64,
) -> anyhow::Result<()> {
    produce_fleet_placed(brokers, topics, accounts, events, rate, Placement::Murmur2)
}

/// [`produce_fleet`], placing event records as `placement` says.
pub fn produce_fleet_placed(
    brokers: &str,
    topics: &Topics,
    accounts: &[(String, String)],
    events: &[SimEvent],
    rate: u64,
    placement: Placement,
) -> anyhow::Result<()> {
    let settings = KafkaSettings::new(brokers);
    for t in [&topics.accounts, &topics.job_events] {
        if partition_count(&settings, t)? == 0 {
            anyhow::bail!("topic {t} does not exist on {brokers}: start `jobmeter run` first (it creates its topics)");
        }
    }
    let partitions = partition_count(&settings, &topics.job_events)?;
    let mut config = settings.producer();
    if placement == Placement::ConsistentRandom {
        config.set("partitioner", "consistent_random");
    }
    let producer: ThreadedProducer<DefaultProducerContext> = config.create().context("creating the producer")?;
    // Events carry their own time as the record timestamp, as a platform
    // loading recorded history does: the meter checks one against the other.
    let send = |topic: &str, key: &str, payload: &str, timestamp: Option<i64>| -> anyhow::Result<()> {
        let event = topic == topics.job_events;
        let mut rec = BaseRecord::to(topic).payload(payload);
        if !(event && placement == Placement::Keyless) {
            rec = rec.key(key);
        }
        if event && placement == Placement::Misrouted {
            let own = jobmeter_kafka::partitioner::partition_for_key(key.as_bytes(), partitions);
            rec = rec.partition((own + 1) % partitions.max(1));
        }
        if let Some(ms) = timestamp {
            rec = rec.timestamp(ms);
        }
        jobmeter_kafka::produce::send_waiting(&producer, rec, None)?;
        Ok(())
    };
    for (key, rec) in accounts {
        send(&topics.accounts, key, rec, None)?;
    }
    producer.flush(Duration::from_secs(30))?;
    let started = Instant::now();
    let mut bar =
        crate::progress::Progress::new("produce", events.len() as u64, crate::progress::Unit::Items("events"));
    for (i, e) in events.iter().enumerate() {
        send(&topics.job_events, &e.key, &e.json, Some(e.time.0))?;
        if rate > 0 {
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            let el = started.elapsed();
            if due > el {
                std::thread::sleep(due - el);
            }
        }
        if i % 1024 == 0 {
            bar.set(i as u64);
        }
    }
    producer.flush(Duration::from_secs(60))?;
    bar.set(events.len() as u64);
    bar.finish();
    eprintln!(
        "produced {} account records and {} events to {} in {:.1}s",
        accounts.len(),
        events.len(),
        brokers,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Prints every committed record of `topic` as one JSON document per line
/// (the value as is when it is JSON; DLQ records with their headers).
pub fn dump(brokers: &str, topic: &str, last: Option<usize>, timestamps: bool) -> anyhow::Result<()> {
    let settings = KafkaSettings::new(brokers);
    let n = partition_count(&settings, topic)?;
    if n == 0 {
        anyhow::bail!("topic {topic} does not exist on {brokers}");
    }
    let parts: Vec<(i32, Option<i64>)> = (0..n).map(|p| (p, None)).collect();
    let mut lines = Vec::new();
    read_to_end(
        &settings,
        "jobmeter-dump",
        topic,
        &parts,
        Duration::from_secs(60),
        |r| {
            let v = r
                .value
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .into_owned();
            lines.push(match (timestamps, r.timestamp_ms) {
                (true, Some(ms)) => format!("{ms}\t{v}"),
                _ => v,
            });
        },
    )?;
    let skip = last.map_or(0, |l| lines.len().saturating_sub(l));
    let mut out = std::io::stdout().lock();
    for l in &lines[skip..] {
        match writeln!(out, "{l}") {
            Ok(()) => {}
            // `jobmeter dump … | head` closes the pipe early: not an error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
