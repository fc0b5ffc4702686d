//! Small Kafka tools for demos and operators: producing a simulated fleet,
//! dumping a topic's committed records.

use anyhow::Context as _;
use jobmeter_kafka::client::KafkaSettings;
use jobmeter_kafka::reader::read_to_end;
use jobmeter_kafka::topics::{partition_count, Topics};
use jobmeter_offline::simulate::SimEvent;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use std::io::Write;
use std::time::{Duration, Instant};

pub use jobmeter_service::config::hostname;

/// How a producer places event records on partitions: what the workers of
/// a real fleet may do (the meter meters each account on its own partition
/// whatever they do; see `docs/topics.md`).
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
    /// A mixed fleet: each worker (the event's `source`) keeps one client
    /// for all its events — a third murmur2, a third librdkafka's default
    /// (CRC32 of the key), a third keyless (spread over the partitions).
    Mixed,
}

/// librdkafka's `consistent_random` partition for a key: CRC32 (IEEE) of
/// the key, modulo the partitions.
fn crc32_partition(key: &[u8], partitions: i32) -> i32 {
    let mut crc = 0xffff_ffffu32;
    for b in key {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    let crc = !crc;
    i32::try_from(crc % partitions.max(1).unsigned_abs()).unwrap_or(0)
}

/// Which client of a mixed fleet the worker of `json` uses (0 murmur2,
/// 1 librdkafka's default, 2 keyless).
fn mixed_client(json: &str) -> u64 {
    let source = json
        .split("\"source\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_default();
    source.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) % 3
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
    produce_fleet_placed(
        &KafkaSettings::new(brokers),
        topics,
        accounts,
        events,
        rate,
        Placement::Murmur2,
    )
}

/// [`produce_fleet`], placing event records as `placement` says.
pub fn produce_fleet_placed(
    settings: &KafkaSettings,
    topics: &Topics,
    accounts: &[(String, String)],
    events: &[SimEvent],
    rate: u64,
    placement: Placement,
) -> anyhow::Result<()> {
    for t in [&topics.accounts, &topics.job_events] {
        if partition_count(settings, t)? == 0 {
            anyhow::bail!(
                "topic {t} does not exist on {}: start `jobmeter run` first (it creates its topics)",
                settings.brokers
            );
        }
    }
    let partitions = partition_count(settings, &topics.job_events)?;
    let mut config = settings.producer();
    if placement == Placement::ConsistentRandom {
        config.set("partitioner", "consistent_random");
    }
    let producer: ThreadedProducer<DefaultProducerContext> = config.create().context("creating the producer")?;
    for (key, rec) in accounts {
        let rec = BaseRecord::to(&topics.accounts).payload(rec).key(key);
        jobmeter_kafka::produce::send_waiting(&producer, rec, None)?;
    }
    producer.flush(Duration::from_secs(30))?;
    let started = Instant::now();
    let mut bar = jobmeter_offline::progress::Progress::new(
        "produce",
        events.len() as u64,
        jobmeter_offline::progress::Unit::Items("events"),
    );
    let mut placer = Placer {
        placement,
        partitions,
        spread: 0,
    };
    for (i, e) in events.iter().enumerate() {
        // Events carry their own time as the record timestamp, as a
        // platform loading recorded history does: the meter checks one
        // against the other.
        let rec = placer
            .place(BaseRecord::to(&topics.job_events).payload(&e.json), &e.key, &e.json)
            .timestamp(e.time.0);
        jobmeter_kafka::produce::send_waiting(&producer, rec, None)?;
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
        settings.brokers,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `jobmeter dump`.
#[derive(Debug, clap::Args)]
pub struct DumpCmd {
    /// Topic to read.
    #[arg(long)]
    pub topic: String,
    /// How to reach Kafka (the meter's configuration).
    #[command(flatten)]
    pub kafka: jobmeter_service::KafkaArgs,
    /// Print only the last N records.
    #[arg(long)]
    pub last: Option<usize>,
    /// Start each line with the record's timestamp in milliseconds and a
    /// tab (the form `jobmeter replay --events` reads, so that a replay
    /// checks event times against record times as the meter did).
    #[arg(long)]
    pub timestamps: bool,
}

/// `jobmeter simulate`: the offline fleet flags, plus producing to Kafka.
#[derive(Debug, clap::Args)]
pub struct SimulateCmd {
    /// The fleet and the files it is written to.
    #[command(flatten)]
    pub fleet: jobmeter_offline::cli::FleetArgs,
    /// Produce to Kafka instead (accounts first, then events, keyed by
    /// account) when `--brokers` or `--config` is given: the client takes
    /// the meter's Kafka settings (`kafka.properties.*` for SASL or TLS, by
    /// `--set` or the file).
    #[command(flatten)]
    pub kafka: jobmeter_service::KafkaArgs,
    /// Topic prefix when producing to Kafka.
    #[arg(long, default_value = "jobmeter")]
    pub topic_prefix: String,
    /// Target events per second when producing to Kafka (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// How event records are placed on partitions when producing to Kafka,
    /// as different Kafka clients would (the meter's results do not depend
    /// on it).
    #[arg(long, value_enum, default_value_t = Placement::Murmur2)]
    pub placement: Placement,
}

impl DumpCmd {
    /// Prints the topic's committed records.
    pub fn run(&self) -> anyhow::Result<()> {
        let settings = self.kafka.load()?.kafka_settings();
        dump(&settings, &self.topic, self.last, self.timestamps)
    }
}

impl SimulateCmd {
    /// Writes the fleet to its files and/or produces it to Kafka.
    pub fn run(&self) -> anyhow::Result<()> {
        let fleet = self.fleet.generate()?;
        if self.kafka.brokers.is_some() || self.kafka.config.is_some() {
            let settings = self.kafka.load()?.kafka_settings();
            let topics = Topics::with_prefix(&self.topic_prefix);
            produce_fleet_placed(
                &settings,
                &topics,
                &fleet.accounts,
                &fleet.events,
                self.rate,
                self.placement,
            )?;
        } else if self.fleet.events_out.is_none() {
            anyhow::bail!("say where the fleet goes: --events-out FILE and/or --brokers HOST:PORT (or --config FILE)");
        }
        Ok(())
    }
}

/// Where an event record goes, as the clients of a [`Placement`] would put it.
struct Placer {
    placement: Placement,
    partitions: i32,
    /// The keyless client's next partition (it spreads records round robin).
    spread: i32,
}

impl Placer {
    /// `rec` (an event with account `key`) keyed and partitioned.
    fn place<'a>(
        &mut self,
        mut rec: BaseRecord<'a, str, str>,
        key: &'a str,
        payload: &str,
    ) -> BaseRecord<'a, str, str> {
        let n = self.partitions.max(1);
        let client = if self.placement == Placement::Mixed {
            mixed_client(payload)
        } else {
            0
        };
        if !(self.placement == Placement::Keyless || client == 2) {
            rec = rec.key(key);
        }
        match self.placement {
            Placement::Misrouted => {
                let own = jobmeter_kafka::partitioner::partition_for_key(key.as_bytes(), self.partitions);
                rec.partition((own + 1) % n)
            }
            Placement::Mixed => {
                let p = match client {
                    0 => jobmeter_kafka::partitioner::partition_for_key(key.as_bytes(), self.partitions),
                    1 => crc32_partition(key.as_bytes(), self.partitions),
                    _ => {
                        self.spread = (self.spread + 1) % n;
                        self.spread
                    }
                };
                rec.partition(p)
            }
            _ => rec,
        }
    }
}

/// Prints every committed record of `topic` as one JSON document per line
/// (the value as is when it is JSON; DLQ records with their headers).
pub fn dump(settings: &KafkaSettings, topic: &str, last: Option<usize>, timestamps: bool) -> anyhow::Result<()> {
    let n = partition_count(settings, topic)?;
    if n == 0 {
        anyhow::bail!("topic {topic} does not exist on {}", settings.brokers);
    }
    let parts: Vec<(i32, Option<i64>)> = (0..n).map(|p| (p, None)).collect();
    let mut lines = Vec::new();
    read_to_end(settings, "jobmeter-dump", topic, &parts, Duration::from_secs(60), |r| {
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
    })?;
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

#[cfg(test)]
mod tests {
    #[derive(clap::Parser)]
    struct Simulate {
        #[command(flatten)]
        cmd: super::SimulateCmd,
    }

    fn simulate(args: &[&str]) -> super::SimulateCmd {
        use clap::Parser;
        let argv = std::iter::once("simulate").chain(args.iter().copied());
        Simulate::try_parse_from(argv).unwrap_or_else(|e| panic!("{e}")).cmd
    }

    #[test]
    fn simulate_produces_with_the_meters_kafka_settings() {
        let cmd = simulate(&[
            "--jobs",
            "5",
            "--brokers",
            "127.0.0.1:9094",
            "--set",
            "kafka.properties.security.protocol=SASL_PLAINTEXT",
            "--set",
            "kafka.properties.sasl.mechanism=SCRAM-SHA-512",
        ]);
        let s = cmd.kafka.load().unwrap_or_else(|e| panic!("{e:?}")).kafka_settings();
        assert_eq!(s.brokers, "127.0.0.1:9094");
        assert_eq!(
            s.properties.get("security.protocol").map(String::as_str),
            Some("SASL_PLAINTEXT")
        );
        assert_eq!(
            s.properties.get("sasl.mechanism").map(String::as_str),
            Some("SCRAM-SHA-512")
        );
        // A malformed setting is an error before anything is produced.
        assert!(simulate(&["--brokers", "b:1", "--set", "no-equals-sign"])
            .kafka
            .load()
            .is_err());
        // Files only: no Kafka at all.
        let files = simulate(&["--events-out", "e.jsonl"]);
        assert!(files.kafka.brokers.is_none() && files.kafka.config.is_none());
    }

    #[test]
    fn the_default_client_partitions_by_crc32_and_a_worker_keeps_its_client() {
        // The check value of CRC-32 (IEEE): 0xcbf43926.
        assert_eq!(
            super::crc32_partition(b"123456789", 1_000),
            (0xcbf4_3926u32 % 1_000) as i32
        );
        assert_eq!(
            super::mixed_client(r#"{"id":"a","source":"gpu-worker/sim/node-3"}"#),
            super::mixed_client(r#"{"id":"b","source":"gpu-worker/sim/node-3"}"#)
        );
        let clients: std::collections::BTreeSet<u64> = (0..50)
            .map(|w| super::mixed_client(&format!(r#"{{"source":"gpu-worker/sim/node-{w}"}}"#)))
            .collect();
        assert_eq!(clients.len(), 3, "all three clients are used");
    }
}
