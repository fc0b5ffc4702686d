//! # jobmeter-kafka: the Kafka adapter
//!
//! Everything jobmeter does with Kafka, behind small types: topic names and
//! creation ([`topics`]), client configuration ([`client`]), the
//! transactional producer with librdkafka's error classes ([`txn`]), reading
//! a partition to its end for restores and global tables ([`reader`]),
//! producing under backpressure ([`produce`]), dead-letter records
//! ([`dlq`]), the state changelog's record keys ([`changelog`]), Kafka's
//! murmur2 partitioner, which decides the partition that meters an account
//! ([`partitioner`]), and the repartition topic's forwarded records and
//! order markers ([`repartition`]).
//!
//! Blocking librdkafka calls (transactions, flush, poll) are made from
//! dedicated threads by the caller, never from async worker threads.
//!
//! ## Must never depend on
//! RocksDB (`jobmeter-store`), HTTP, the service or the tools; billing
//! rules stay in `jobmeter-core` (`./dev test` checks it).

pub mod changelog;
pub mod client;
pub mod dlq;
pub mod group;
pub mod partitioner;
pub mod produce;
pub mod reader;
pub mod repartition;
pub mod topics;
pub mod txn;

/// Errors of the Kafka adapter, each saying what was being done.
#[derive(Debug, thiserror::Error)]
pub enum KafkaAdapterError {
    /// A client could not be created (bad settings).
    #[error("creating the Kafka {what}: {source}")]
    Client {
        /// Which client.
        what: &'static str,
        /// librdkafka's error.
        source: rdkafka::error::KafkaError,
    },
    /// A topic could not be created or has the wrong shape.
    #[error("topic {topic}: {message}")]
    Topic {
        /// The topic.
        topic: String,
        /// What is wrong.
        message: String,
    },
    /// A Kafka operation failed.
    #[error("{op}: {source}")]
    Op {
        /// What was being done.
        op: &'static str,
        /// librdkafka's error.
        source: rdkafka::error::KafkaError,
    },
    /// A wait ran out.
    #[error("{op}: timed out after {seconds}s")]
    Timeout {
        /// What was being waited for.
        op: &'static str,
        /// How long.
        seconds: u64,
    },
}

impl KafkaAdapterError {
    pub(crate) fn op(op: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> KafkaAdapterError {
        move |source| KafkaAdapterError::Op { op, source }
    }
}
