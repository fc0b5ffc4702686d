//! The adjustments forwarder: pricing adjustments reach the meter that
//! bills their account, exactly once.
//!
//! Support tooling (and `jobmeter adjust`, and the usage API's `POST`)
//! writes adjustments to `<prefix>.adjustments`, keyed by account, with
//! whatever partitioner. Every instance runs a forwarder, a member of the
//! consumer group `<group>.adjustments`, which copies each record into the
//! repartition partition of its account's meter (murmur2 of the account id
//! over the input's partitions, as for events), with the record's origin
//! in its headers, **in one Kafka transaction with the forwarder's consumer
//! offsets**. An aborted transaction is invisible to the meters (they read
//! `read_committed`), so each record is forwarded once.
//!
//! The meter applies a forwarded adjustment as soon as it reads it, in its
//! own batch transaction, like the job events of that batch; the
//! repartition topic's markers record where it was applied among them, so
//! `jobmeter rebuild` applies it at the same place. An adjustment is
//! deduplicated by `adjustment_id` per account, forever, by the meter.
//!
//! A record without a valid `account_id` cannot be routed: the forwarder
//! dead-letters it with the reason, in the same transaction. Everything
//! else is checked by the meter, which dead-letters what it refuses with
//! the field named.

use jobmeter_kafka::client::KafkaSettings;
use jobmeter_kafka::txn::{Outgoing, TxnError, TxnProducer, TAG_OUTPUT};
use jobmeter_kafka::KafkaAdapterError;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The consumer group of the adjustments forwarders of the meter's group.
pub fn forwarder_group(group: &str) -> String {
    format!("{group}.adjustments")
}

/// Records forwarded in one transaction, at most.
const BATCH: usize = 500;

/// How long a poll waits for the first record of a batch.
const POLL: Duration = Duration::from_millis(100);

/// The transaction timeout of the forwarder's producer.
const TXN_TIMEOUT: Duration = Duration::from_secs(60);

/// The first and the longest pause after a failure before starting again.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(15);

/// What a forwarder reads and writes.
#[derive(Debug, Clone)]
pub struct Forwarding {
    /// Kafka settings.
    pub settings: KafkaSettings,
    /// Its consumer group.
    pub group: String,
    /// Its client id.
    pub client_id: String,
    /// Its producer's transactional id (one per instance).
    pub transactional_id: String,
    /// The adjustments topic.
    pub source: String,
    /// The repartition topic (one partition per input partition).
    pub repartition: String,
    /// The dead-letter topic.
    pub dlq: String,
    /// Partitions of the input topic (0 until start-up knows).
    pub partitions: Arc<AtomicI32>,
}

/// Why a forwarder starts again.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// A client could not be created, or a consumer call failed.
    #[error(transparent)]
    Kafka(#[from] KafkaAdapterError),
    /// The transaction failed (it is aborted; the records are read again).
    #[error(transparent)]
    Txn(#[from] TxnError),
    /// The consumer is not in its group yet.
    #[error("consumer group metadata unavailable")]
    NoGroup,
}

/// Forwards adjustments until `stop` (runs on its own thread). A failure
/// drops the consumer and the producer and starts again from the group's
/// committed offsets; the new producer, with the same transactional id,
/// aborts what the old one left open.
pub fn forward(f: &Forwarding, stop: &CancellationToken) {
    let mut backoff = RETRY_FIRST;
    while !stop.is_cancelled() {
        match forward_until_error(f, stop) {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "adjustments forwarder: starting again from the committed offsets");
                let until = std::time::Instant::now() + backoff;
                while !stop.is_cancelled() && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(50));
                }
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

fn forward_until_error(f: &Forwarding, stop: &CancellationToken) -> Result<(), ForwardError> {
    let consumer: BaseConsumer = f
        .settings
        .group_consumer(&f.group, &f.client_id)
        .create()
        .map_err(|source| KafkaAdapterError::Client {
            what: "adjustments forwarder",
            source,
        })?;
    consumer
        .subscribe(&[&f.source])
        .map_err(|source| KafkaAdapterError::Op {
            op: "subscribe to the adjustments topic",
            source,
        })?;
    let producer = TxnProducer::new(&f.settings, &f.transactional_id, TXN_TIMEOUT)?;
    let mut batch: Vec<OwnedMessage> = Vec::with_capacity(BATCH);
    while !stop.is_cancelled() {
        let partitions = f.partitions.load(Ordering::Relaxed);
        if partitions <= 0 {
            // Where records go is not known yet: read nothing.
            std::thread::sleep(POLL);
            continue;
        }
        batch.clear();
        let mut timeout = POLL;
        while batch.len() < BATCH {
            match consumer.poll(timeout) {
                Some(Ok(m)) => batch.push(m.detach()),
                Some(Err(KafkaError::PartitionEOF(_))) | None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "adjustments forwarder");
                    break;
                }
            }
            timeout = Duration::ZERO;
        }
        if batch.is_empty() {
            continue;
        }
        let group = consumer.group_metadata().ok_or(ForwardError::NoGroup)?;
        producer.begin()?;
        let sent = send_batch(f, &producer, &batch, partitions).and_then(|offsets| {
            producer.send_offsets(&offsets, &group)?;
            producer.commit()
        });
        if let Err(e) = sent {
            let _ = producer.abort();
            return Err(e.into());
        }
        tracing::debug!(records = batch.len(), "adjustments forwarded");
    }
    Ok(())
}

/// Produces each record of `batch` to its account's repartition partition
/// (or, without a valid account, to the dead-letter topic); returns the
/// consumer offsets to commit with them.
fn send_batch(
    f: &Forwarding,
    producer: &TxnProducer,
    batch: &[OwnedMessage],
    partitions: i32,
) -> Result<TopicPartitionList, TxnError> {
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    for m in batch {
        let payload = m.payload().unwrap_or_default();
        let (topic, partition, key, headers) = match jobmeter_core::adjust::adjustment_account(payload) {
            Ok(account) => (
                f.repartition.as_str(),
                Some(jobmeter_kafka::partitioner::partition_for_key(
                    account.as_str().as_bytes(),
                    partitions,
                )),
                account.as_str().as_bytes().to_vec(),
                jobmeter_kafka::repartition::forward_headers(m.headers(), &f.source, m.partition(), m.offset(), None),
            ),
            Err(inv) => {
                tracing::warn!(reason = inv.reason.as_str(), detail = %inv.detail, partition = m.partition(), offset = m.offset(), "adjustment dead-lettered: it names no valid account");
                (
                    f.dlq.as_str(),
                    None,
                    m.key().unwrap_or_default().to_vec(),
                    jobmeter_kafka::dlq::headers(
                        inv.reason.as_str(),
                        &inv.detail,
                        &f.source,
                        m.partition(),
                        m.offset(),
                    ),
                )
            }
        };
        producer.send(Outgoing {
            topic,
            key: &key,
            payload: Some(payload),
            headers: Some(headers),
            partition,
            timestamp_ms: m.timestamp().to_millis(),
            tag: TAG_OUTPUT,
        })?;
        next.insert(m.partition(), m.offset() + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in next {
        tpl.add_partition_offset(&f.source, p, Offset::Offset(o))
            .map_err(TxnError::classify)?;
    }
    Ok(tpl)
}

/// Writes adjustments to the adjustments topic, each checked first as the
/// meter will check it (the API's `POST` and `jobmeter adjust`). Records
/// are keyed by account with murmur2, so one account's adjustments keep
/// their order (an `override_end` after the override it ends).
pub struct Writer {
    producer: rdkafka::producer::FutureProducer,
    topic: String,
    rates: Arc<jobmeter_core::RateCard>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("topic", &self.topic).finish()
    }
}

/// How long a write waits for the broker's acknowledgement.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

impl Writer {
    /// A writer to `topic`, checking selectors against `rates`.
    pub fn new(
        settings: &KafkaSettings,
        topic: String,
        rates: Arc<jobmeter_core::RateCard>,
    ) -> Result<Writer, KafkaAdapterError> {
        let producer = settings
            .producer()
            .create()
            .map_err(|source| KafkaAdapterError::Client {
                what: "adjustments writer",
                source,
            })?;
        Ok(Writer { producer, topic, rates })
    }

    /// The topic written to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Checks a record as the meter will (every field; not whether its id
    /// was used before, which only the account's meter knows).
    pub fn check(&self, raw: &[u8]) -> Result<jobmeter_core::adjust::Adjustment, jobmeter_core::event::Invalid> {
        jobmeter_core::adjust::parse_adjustment(raw, &self.rates)
    }

    /// Writes a checked record, keyed by its account, and waits for the
    /// broker to acknowledge it: its partition and offset.
    pub async fn write(&self, a: &jobmeter_core::adjust::Adjustment, raw: &[u8]) -> Result<(i32, i64), KafkaError> {
        let record = rdkafka::producer::FutureRecord::to(&self.topic)
            .key(a.account_id.as_str())
            .payload(raw);
        self.producer
            .send(record, WRITE_TIMEOUT)
            .await
            .map(|d| (d.partition, d.offset))
            .map_err(|(e, _)| e)
    }
}
