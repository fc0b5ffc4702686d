//! Reading partitions from a given offset to their end, with
//! `read_committed`: how state is restored from the changelog and how the
//! accounts table is loaded.

use crate::client::KafkaSettings;
use crate::KafkaAdapterError;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// Client context of readers: end-of-partition events are expected (they
/// are how a reader knows it is done), so they are not logged as errors.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReaderContext;

impl rdkafka::ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_)) {
            tracing::error!(%error, reason, "librdkafka reader error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderContext {}

/// One record read.
#[derive(Debug, Clone)]
pub struct Record {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Value bytes (`None`: a tombstone).
    pub value: Option<Vec<u8>>,
}

/// Reads `topic`'s `partitions` from their start offsets (`None`: the
/// beginning) up to the end as it is when called, handing each record to
/// `f`. Returns the number of records read.
pub fn read_to_end(
    settings: &KafkaSettings,
    client_id: &str,
    topic: &str,
    partitions: &[(i32, Option<i64>)],
    deadline: Duration,
    mut f: impl FnMut(Record),
) -> Result<u64, KafkaAdapterError> {
    if partitions.is_empty() {
        return Ok(0);
    }
    let consumer: BaseConsumer<ReaderContext> = settings
        .reader(client_id)
        .create_with_context(ReaderContext)
        .map_err(|source| KafkaAdapterError::Client { what: "reader", source })?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = std::collections::HashSet::new();
    for (p, from) in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, Duration::from_secs(10))
            .map_err(KafkaAdapterError::op("fetch watermarks"))?;
        let start = from.map_or(low, |o| o.max(low));
        if start >= high {
            continue;
        }
        tpl.add_partition_offset(topic, *p, Offset::Offset(start))
            .map_err(KafkaAdapterError::op("assign reader"))?;
        remaining.insert(*p);
    }
    if remaining.is_empty() {
        return Ok(0);
    }
    consumer.assign(&tpl).map_err(KafkaAdapterError::op("assign reader"))?;
    let started = Instant::now();
    let mut n = 0u64;
    while !remaining.is_empty() {
        if started.elapsed() > deadline {
            return Err(KafkaAdapterError::Timeout {
                op: "reading to the end of a partition",
                seconds: deadline.as_secs(),
            });
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Ok(m)) => {
                n += 1;
                f(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                });
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                // With read_committed, the end is the last stable offset; if
                // a transaction is still open past it, keep waiting for it to
                // end so that no committed record is missed.
                let (_, high) = consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .map_err(KafkaAdapterError::op("fetch watermarks"))?;
                let pos = consumer
                    .position()
                    .ok()
                    .and_then(|t| t.find_partition(topic, p).and_then(|e| e.offset().to_raw()))
                    .unwrap_or(-1);
                if pos >= high {
                    remaining.remove(&p);
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, topic, "reader poll error; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    Ok(n)
}
