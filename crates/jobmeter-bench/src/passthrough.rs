//! The exactly-once limit: what reading a backlog read_committed and
//! publishing a given volume in transactions costs with no billing at all.
//!
//! The pass-through reads every event of the input topic, and for each
//! transaction of `events_per_txn` events writes its share of `records`
//! records of `bytes` bytes in all (keyed like the input, to a topic with as
//! many partitions), then commits them with the consumer's offsets in the
//! same transaction — the I/O the meter does, with jobmeter's producer and
//! consumer settings, and nothing else.
//!
//! Given a [`StoreOfRecord`], it also writes each transaction's share of the
//! meter's state changes to a RocksDB store after the commit, as the meter
//! does (one synced batch through [`jobmeter_store::Store`]): the cost of
//! exactly-once I/O plus a store of record, still with no billing.

use jobmeter_core::state::StateChange;
use jobmeter_kafka::client::KafkaSettings;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// What the meter published over a run, to be published again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Input events read.
    pub events: u64,
    /// Records written (outputs, changelog, internal topics).
    pub records: u64,
    /// Their key and value bytes.
    pub bytes: u64,
    /// Transactions committed.
    pub transactions: u64,
    /// Values written in turn (a sample of what the meter published, so
    /// that they compress as the meter's do); empty: `bytes / records`
    /// bytes of text each.
    pub sample: Vec<Vec<u8>>,
}

/// A store of record for the pass-through: the store, and the state
/// changes to write to it (by partition, in the order the meter made them).
pub type StoreOfRecord<'a> = (&'a jobmeter_store::Store, &'a [(i32, StateChange)]);

/// One pass-through run.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Events read per second, first record to last commit.
    pub events_per_second: f64,
    /// This process's CPU seconds over the run (every thread).
    pub cpu_seconds: f64,
    /// Records written.
    pub records: u64,
    /// Their key and value bytes.
    pub bytes: u64,
    /// Transactions committed.
    pub transactions: u64,
    /// State changes written to the store.
    pub state_rows: u64,
}

/// Reads `input` (partitions `0..partitions`) from the start and publishes
/// `volume` to `output`, exactly once, as a transactional producer named
/// `transactional_id` in the consumer group `group`; with `store`, also
/// writes its state changes, each transaction's share after its commit.
pub fn run(
    settings: &KafkaSettings,
    (input, output): (&str, &str),
    partitions: i32,
    (group, transactional_id): (&str, &str),
    volume: Volume,
    store: Option<StoreOfRecord<'_>>,
) -> anyhow::Result<Run> {
    let consumer: BaseConsumer = settings.group_consumer(group, "bench-passthrough").create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(input, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let producer: ThreadedProducer<DefaultProducerContext> =
        settings.transactional_producer(transactional_id, 60_000).create()?;
    producer.init_transactions(Duration::from_secs(30))?;
    let per_txn = volume.events.div_ceil(volume.transactions.max(1)).max(1);
    let record_bytes = (volume.bytes / volume.records.max(1)).max(1) as usize;
    let filler = vec![vec![b'x'; record_bytes]];
    let values = if volume.sample.is_empty() {
        &filler
    } else {
        &volume.sample
    };
    let mut bytes = 0u64;
    let timeout = Duration::from_secs(60);
    // Each partition's changes apart, in order (a batch takes a slice of
    // each), and which partition each change in turn belongs to: split
    // here, before the clock starts, so that no change is copied while it
    // runs.
    let (store, order, mut by_partition) = match store {
        Some((store, changes)) => {
            let mut parts: BTreeMap<i32, (Vec<StateChange>, usize)> = BTreeMap::new();
            for (p, c) in changes {
                parts.entry(*p).or_default().0.push(c.clone());
            }
            (Some(store), changes.iter().map(|(p, _)| *p).collect(), parts)
        }
        None => (None, Vec::new(), BTreeMap::new()),
    };
    let mut stored = 0usize;
    let cpu0 = self_cpu_seconds();
    let (mut read, mut written, mut txns) = (0u64, 0u64, 0u64);
    let mut started: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(1800);
    while read < volume.events {
        producer.begin_transaction()?;
        let mut next: HashMap<i32, i64> = HashMap::new();
        let mut in_txn = 0u64;
        while in_txn < per_txn && read < volume.events {
            if Instant::now() > deadline {
                anyhow::bail!("pass-through read only {read} of {} events", volume.events);
            }
            let Some(m) = consumer.poll(Duration::from_millis(100)) else {
                if in_txn > 0 {
                    break;
                }
                continue;
            };
            let m = m?;
            started.get_or_insert_with(Instant::now);
            // This event's share of the records: the running total of
            // records due after it, less what was written.
            let due = (read + 1) * volume.records / volume.events.max(1);
            for i in written..due {
                let payload = &values[i as usize % values.len()];
                let mut rec = BaseRecord::<[u8], [u8]>::to(output).payload(payload.as_slice());
                if let Some(k) = m.key() {
                    rec = rec.key(k);
                    bytes += k.len() as u64;
                }
                bytes += payload.len() as u64;
                jobmeter_kafka::produce::send_waiting(&producer, rec, None)?;
            }
            written = written.max(due);
            next.insert(m.partition(), m.offset() + 1);
            read += 1;
            in_txn += 1;
        }
        let mut offsets = TopicPartitionList::new();
        for (p, o) in &next {
            offsets.add_partition_offset(input, *p, Offset::Offset(*o))?;
        }
        producer.send_offsets_to_transaction(
            &offsets,
            &consumer
                .group_metadata()
                .ok_or_else(|| anyhow::anyhow!("no group metadata"))?,
            timeout,
        )?;
        producer.commit_transaction(timeout)?;
        txns += 1;
        if let Some(store) = store {
            // This transaction's share of the state changes, as one synced
            // batch with each partition's progress, after the commit.
            let due = usize::try_from(read * order.len() as u64 / volume.events.max(1))?;
            let mut take: BTreeMap<i32, usize> = BTreeMap::new();
            for p in &order[stored..due] {
                *take.entry(*p).or_default() += 1;
            }
            stored = due;
            let mut steps: Vec<(i32, &[StateChange], Option<i64>)> = Vec::new();
            for (p, (changes, from)) in &mut by_partition {
                let n = take.get(p).copied().unwrap_or(0);
                if n > 0 {
                    steps.push((*p, &changes[*from..*from + n], Some(i64::try_from(txns)?)));
                    *from += n;
                }
            }
            store.commit_many(&steps)?;
        }
    }
    let secs = started.map_or(1e-3, |t| t.elapsed().as_secs_f64().max(1e-3));
    Ok(Run {
        events_per_second: read as f64 / secs,
        cpu_seconds: self_cpu_seconds() - cpu0,
        records: written,
        bytes,
        transactions: txns,
        state_rows: stored as u64,
    })
}

/// This process's user + system CPU seconds so far.
fn self_cpu_seconds() -> f64 {
    crate::process_cpu_seconds(std::process::id()).unwrap_or(0.0)
}
