//! The transactional producer: one per meter instance, carrying outputs,
//! state changelog records and input offsets in one transaction per batch.
//!
//! Error handling follows librdkafka's classes ("Transactional Producer →
//! Error handling" in its INTRODUCTION.md): a *retriable* error is retried
//! here a few times; an *abortable* error means the transaction must be
//! aborted and the input rewound to the last committed position; a *fatal*
//! error (or one with none of the three flags, such as a flush timeout)
//! means the producer must be destroyed. The caller decides how to recover;
//! jobmeter rebuilds its pipeline from durable state in both cases.

use crate::client::KafkaSettings;
use crate::KafkaAdapterError;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, TopicPartitionList};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// What a failed transactional call requires of the caller.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// Abort the transaction, rewind the input, begin again.
    #[error("transaction must be aborted: {0}")]
    Abortable(KafkaError),
    /// Destroy the producer (fenced by a newer instance, or unrecoverable).
    #[error("fatal producer error: {0}")]
    Fatal(KafkaError),
}

impl TxnError {
    /// The class of `e` after retries: abortable or fatal.
    pub fn classify(e: KafkaError) -> TxnError {
        match &e {
            KafkaError::Transaction(rd) if rd.is_fatal() => TxnError::Fatal(e),
            KafkaError::Transaction(rd) if rd.txn_requires_abort() || rd.is_retriable() => TxnError::Abortable(e),
            // A flush timeout inside commit, a delivery failure, a full
            // queue that never drained: the transaction cannot commit.
            KafkaError::Flush(_) | KafkaError::MessageProduction(_) => TxnError::Abortable(e),
            _ => TxnError::Fatal(e),
        }
    }

    fn retriable(e: &KafkaError) -> bool {
        matches!(e, KafkaError::Transaction(rd) if rd.is_retriable() && !rd.txn_requires_abort() && !rd.is_fatal())
    }
}

/// Records delivery results: the highest offset written to each changelog
/// partition, and the first delivery failure.
#[derive(Debug, Default)]
pub struct DeliveryTracker {
    changelog: Mutex<HashMap<i32, i64>>,
    failure: Mutex<Option<String>>,
}

/// Delivery tag of an output record.
pub const TAG_OUTPUT: usize = 0;

/// One record for [`TxnProducer::send`].
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Key.
    pub key: &'a [u8],
    /// Value (`None`: a tombstone).
    pub payload: Option<&'a [u8]>,
    /// Headers.
    pub headers: Option<OwnedHeaders>,
    /// Partition (`None`: the partitioner's choice).
    pub partition: Option<i32>,
    /// Record timestamp (`None`: now).
    pub timestamp_ms: Option<i64>,
    /// Delivery tag ([`TAG_OUTPUT`] or [`tag_changelog`]).
    pub tag: usize,
}

/// Delivery tag of a changelog record for `partition`.
pub fn tag_changelog(partition: i32) -> usize {
    partition as usize + 1
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: usize) {
        match result {
            Ok(m) if tag > TAG_OUTPUT => {
                if let Ok(mut map) = self.changelog.lock() {
                    let e = map.entry(m.partition()).or_insert(-1);
                    *e = (*e).max(m.offset());
                }
            }
            Ok(_) => {}
            Err((e, _)) => {
                if let Ok(mut f) = self.failure.lock() {
                    f.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
}

/// A transactional producer.
pub struct TxnProducer {
    producer: ThreadedProducer<DeliveryTracker>,
    timeout: Duration,
}

impl std::fmt::Debug for TxnProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxnProducer").field("timeout", &self.timeout).finish()
    }
}

fn with_retries<T>(mut f: impl FnMut() -> Result<T, KafkaError>) -> Result<T, TxnError> {
    let mut attempt = 0;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if TxnError::retriable(&e) && attempt < 5 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(100 * attempt));
            }
            Err(e) => return Err(TxnError::classify(e)),
        }
    }
}

impl TxnProducer {
    /// Creates the producer of `transactional_id` and initialises
    /// transactions, which fences any older producer with the same id and
    /// aborts its open transaction.
    pub fn new(
        settings: &KafkaSettings,
        transactional_id: &str,
        transaction_timeout: Duration,
    ) -> Result<Self, KafkaAdapterError> {
        let producer: ThreadedProducer<DeliveryTracker> = settings
            .transactional_producer(transactional_id, transaction_timeout.as_millis() as u64)
            .create_with_context(DeliveryTracker::default())
            .map_err(|source| KafkaAdapterError::Client {
                what: "transactional producer",
                source,
            })?;
        let p = TxnProducer {
            producer,
            timeout: transaction_timeout,
        };
        with_retries(|| p.producer.init_transactions(p.timeout)).map_err(|e| KafkaAdapterError::Op {
            op: "init transactions",
            source: match e {
                TxnError::Abortable(k) | TxnError::Fatal(k) => k,
            },
        })?;
        Ok(p)
    }

    /// Begins a transaction.
    pub fn begin(&self) -> Result<(), TxnError> {
        if let Ok(mut f) = self.producer.context().failure.lock() {
            *f = None;
        }
        if let Ok(mut m) = self.producer.context().changelog.lock() {
            m.clear();
        }
        self.producer.begin_transaction().map_err(TxnError::classify)
    }

    /// Produces one record in the open transaction. When the local queue is
    /// full this waits for it to drain (backpressure), up to the
    /// transaction timeout.
    pub fn send(&self, out: Outgoing<'_>) -> Result<(), TxnError> {
        let mut record = BaseRecord::with_opaque_to(out.topic, out.tag).key(out.key);
        if let Some(p) = out.payload {
            record = record.payload(p);
        }
        if let Some(h) = out.headers {
            record = record.headers(h);
        }
        if let Some(p) = out.partition {
            record = record.partition(p);
        }
        if let Some(t) = out.timestamp_ms {
            record = record.timestamp(t);
        }
        crate::produce::send_waiting(&self.producer, record, Some(self.timeout)).map_err(TxnError::classify)
    }

    /// Adds the consumer offsets to the open transaction.
    pub fn send_offsets(&self, offsets: &TopicPartitionList, group: &ConsumerGroupMetadata) -> Result<(), TxnError> {
        if offsets.count() > 0 {
            with_retries(|| self.producer.send_offsets_to_transaction(offsets, group, self.timeout))?;
        }
        Ok(())
    }

    /// Commits the open transaction. On success returns the highest
    /// changelog offset written per partition.
    pub fn commit(&self) -> Result<HashMap<i32, i64>, TxnError> {
        // rust-rdkafka's commit_transaction first flushes by polling the
        // event queue for up to 100 ms at a time; with a ThreadedProducer
        // the background thread serves that queue, so that poll always
        // waited its full 100 ms. Wait for the queue to drain here instead
        // (the background thread delivers the reports), so the flush inside
        // commit_transaction finds nothing to wait for.
        let started = std::time::Instant::now();
        while self.producer.in_flight_count() > 0 {
            if started.elapsed() > self.timeout {
                return Err(TxnError::Abortable(KafkaError::Flush(
                    RDKafkaErrorCode::RequestTimedOut,
                )));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        with_retries(|| self.producer.commit_transaction(self.timeout))?;
        if let Some(f) = self.producer.context().failure.lock().ok().and_then(|mut f| f.take()) {
            // A delivery failed yet the commit succeeded: cannot happen with
            // idempotence on, but never ignore it silently.
            tracing::error!(failure = %f, "delivery failed inside a committed transaction");
            return Err(TxnError::Fatal(KafkaError::MessageProduction(RDKafkaErrorCode::Fail)));
        }
        Ok(self
            .producer
            .context()
            .changelog
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default())
    }

    /// Aborts the open transaction.
    pub fn abort(&self) -> Result<(), TxnError> {
        with_retries(|| self.producer.abort_transaction(self.timeout))
    }

    /// Messages waiting in the local queue (for the queue-depth metric).
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }
}

/// A transactional producer as the exactly-once pipeline drives it: one
/// transaction at a time, begun, filled, given the input offsets and
/// committed (or aborted). [`TxnProducer`] is the real one; tests put in
/// its place a producer that fails a chosen step.
pub trait Transactional: Send + 'static {
    /// What [`Transactional::send_offsets`] needs to fence zombies (the
    /// consumer group's metadata for the real producer).
    type Group: Send + 'static;
    /// Begins a transaction.
    fn begin(&self) -> Result<(), TxnError>;
    /// Produces one record in the open transaction.
    fn send(&self, out: Outgoing<'_>) -> Result<(), TxnError>;
    /// Adds the consumer offsets to the open transaction.
    fn send_offsets(&self, offsets: &TopicPartitionList, group: &Self::Group) -> Result<(), TxnError>;
    /// Commits; returns the highest changelog offset written per partition.
    fn commit(&self) -> Result<HashMap<i32, i64>, TxnError>;
    /// Aborts the open transaction.
    fn abort(&self) -> Result<(), TxnError>;
    /// Records waiting in the local queue.
    fn in_flight(&self) -> i32;
}

impl Transactional for TxnProducer {
    type Group = ConsumerGroupMetadata;

    fn begin(&self) -> Result<(), TxnError> {
        TxnProducer::begin(self)
    }

    fn send(&self, out: Outgoing<'_>) -> Result<(), TxnError> {
        TxnProducer::send(self, out)
    }

    fn send_offsets(&self, offsets: &TopicPartitionList, group: &ConsumerGroupMetadata) -> Result<(), TxnError> {
        TxnProducer::send_offsets(self, offsets, group)
    }

    fn commit(&self) -> Result<HashMap<i32, i64>, TxnError> {
        TxnProducer::commit(self)
    }

    fn abort(&self) -> Result<(), TxnError> {
        TxnProducer::abort(self)
    }

    fn in_flight(&self) -> i32 {
        TxnProducer::in_flight(self)
    }
}
