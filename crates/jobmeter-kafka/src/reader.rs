//! Reading partitions from a given offset to their end, with
//! `read_committed`: how state is restored from the changelog and how the
//! accounts table is loaded.

use crate::client::KafkaSettings;
use crate::KafkaAdapterError;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// Client context of readers: end-of-partition events are expected (they
/// are how a reader knows it is done), so they are not logged as errors.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReaderContext;

impl rdkafka::ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        );
        if !eof {
            tracing::error!(%error, reason, "librdkafka reader error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderContext {}

/// A partition's watermarks, retried while its leader is not known yet (a
/// topic created a moment ago, a broker restarting) up to `deadline`.
pub fn watermarks<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
    deadline: Duration,
) -> Result<(i64, i64), KafkaAdapterError> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok(w) => return Ok(w),
            Err(e) if started.elapsed() < deadline && transient(&e) => {
                tracing::debug!(error = %e, topic, partition, "watermarks not available yet; retrying");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                return Err(KafkaAdapterError::Op {
                    op: "fetch watermarks",
                    source: e,
                })
            }
        }
    }
}

/// An error retrying cannot mend: the broker does not let this principal
/// read the topic or use the group, or did not authenticate it.
pub fn refused(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::TopicAuthorizationFailed
                | C::GroupAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::TransactionalIdAuthorizationFailed
                | C::SaslAuthenticationFailed
                | C::Authentication
        )
    )
}

/// Errors that go away once leadership settles.
fn transient(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::NotLeaderForPartition
                | C::LeaderNotAvailable
                | C::UnknownTopicOrPartition
                | C::UnknownPartition
                | C::UnknownTopic
                | C::RequestTimedOut
                | C::OperationTimedOut
                | C::BrokerTransportFailure
                | C::AllBrokersDown
        )
    )
}

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
    /// Headers (name, value as UTF-8, lossy).
    pub headers: Vec<(String, String)>,
    /// The record's timestamp in milliseconds (CreateTime or
    /// LogAppendTime, whichever the topic keeps), if it has one.
    pub timestamp_ms: Option<i64>,
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
    f: impl FnMut(Record),
) -> Result<u64, KafkaAdapterError> {
    if partitions.is_empty() {
        return Ok(0);
    }
    Reader::new(settings, client_id)?.read_to_end(topic, partitions, deadline, f)
}

/// Like [`read_to_end`], but each partition stops before `until` (an
/// exclusive offset, e.g. a consumer group's committed position) when given.
pub fn read_range(
    settings: &KafkaSettings,
    client_id: &str,
    topic: &str,
    partitions: &[(i32, Option<i64>, Option<i64>)],
    deadline: Duration,
    f: impl FnMut(Record),
) -> Result<u64, KafkaAdapterError> {
    if partitions.is_empty() {
        return Ok(0);
    }
    Reader::new(settings, client_id)?.read_range(topic, partitions, deadline, f)
}

/// One reader client for several reads one after another (a restore
/// worker's partitions): the client, its connection and metadata are set
/// up once, which is most of the time a small partition takes.
pub struct Reader {
    consumer: BaseConsumer<ReaderContext>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

impl Reader {
    /// A reader client named `client_id`.
    pub fn new(settings: &KafkaSettings, client_id: &str) -> Result<Reader, KafkaAdapterError> {
        let consumer: BaseConsumer<ReaderContext> = settings
            .reader(client_id)
            .create_with_context(ReaderContext)
            .map_err(|source| KafkaAdapterError::Client { what: "reader", source })?;
        Ok(Reader { consumer })
    }

    /// A partition's watermarks (see [`watermarks`]).
    pub fn watermarks(&self, topic: &str, partition: i32, deadline: Duration) -> Result<(i64, i64), KafkaAdapterError> {
        watermarks(&self.consumer, topic, partition, deadline)
    }

    /// [`read_to_end`] with this client.
    pub fn read_to_end(
        &self,
        topic: &str,
        partitions: &[(i32, Option<i64>)],
        deadline: Duration,
        f: impl FnMut(Record),
    ) -> Result<u64, KafkaAdapterError> {
        let parts: Vec<(i32, Option<i64>, Option<i64>)> = partitions.iter().map(|(p, o)| (*p, *o, None)).collect();
        self.read_range(topic, &parts, deadline, f)
    }

    /// [`read_range`] with this client. The partitions are unassigned
    /// again when it returns (whatever was fetched beyond is dropped).
    pub fn read_range(
        &self,
        topic: &str,
        partitions: &[(i32, Option<i64>, Option<i64>)],
        deadline: Duration,
        f: impl FnMut(Record),
    ) -> Result<u64, KafkaAdapterError> {
        let r = self.read_assigned(topic, partitions, deadline, f);
        if let Err(e) = self.consumer.unassign() {
            tracing::warn!(error = %e, topic, "reader unassign failed");
        }
        r
    }

    fn read_assigned(
        &self,
        topic: &str,
        partitions: &[(i32, Option<i64>, Option<i64>)],
        deadline: Duration,
        mut f: impl FnMut(Record),
    ) -> Result<u64, KafkaAdapterError> {
        let consumer = &self.consumer;
        let mut tpl = TopicPartitionList::new();
        let mut remaining = std::collections::HashMap::new();
        for (p, from, until) in partitions {
            let (low, high) = watermarks(consumer, topic, *p, deadline)?;
            let start = from.map_or(low, |o| o.max(low));
            let end = until.map_or(high, |u| u.min(high));
            if start >= end {
                continue;
            }
            tpl.add_partition_offset(topic, *p, Offset::Offset(start))
                .map_err(KafkaAdapterError::op("assign reader"))?;
            remaining.insert(*p, end);
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
                    let end = remaining.get(&m.partition()).copied();
                    let Some(end) = end else { continue };
                    if m.offset() >= end {
                        remaining.remove(&m.partition());
                        continue;
                    }
                    if m.offset() + 1 >= end {
                        remaining.remove(&m.partition());
                    }
                    n += 1;
                    f(Record {
                        partition: m.partition(),
                        offset: m.offset(),
                        timestamp_ms: m.timestamp().to_millis(),
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                        headers: m
                            .headers()
                            .map(|h| {
                                h.iter()
                                    .map(|x| {
                                        (
                                            x.key.to_owned(),
                                            String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                                        )
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    });
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    let Some(&end) = remaining.get(&p) else { continue };
                    let pos = consumer
                        .position()
                        .ok()
                        .and_then(|t| t.find_partition(topic, p).and_then(|e| e.offset().to_raw()))
                        .unwrap_or(-1);
                    // Past the end measured at the start (its last record may
                    // be a transaction marker, which is never delivered): done,
                    // without another round trip.
                    if pos >= end {
                        remaining.remove(&p);
                        continue;
                    }
                    // With read_committed, the end is the last stable offset; if
                    // a transaction is still open past it, keep waiting for it to
                    // end so that no committed record is missed.
                    let (_, high) = watermarks(consumer, topic, p, deadline)?;
                    if pos >= end.min(high) {
                        remaining.remove(&p);
                    }
                }
                Some(Err(e)) if refused(&e) => {
                    return Err(KafkaAdapterError::Op {
                        op: "reading (the broker refused this principal: see its ACLs)",
                        source: e,
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, topic, "reader poll error; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        Ok(n)
    }
}
