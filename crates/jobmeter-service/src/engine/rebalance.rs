//! Rebalances: partitions assigned (with their repartition partitions, at
//! the group's committed offsets) and revoked (after the open batch is
//! committed).

use super::{Engine, EngineError};
use jobmeter_kafka::repartition::Lane;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, ConsumerGroupMetadata};
use rdkafka::{ClientContext, TopicPartitionList};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// All the consumer context may do to the pipeline on a rebalance. The
/// callbacks run on the pipeline thread, inside its `poll`; a revocation
/// must commit the open batch before the partitions go (under the
/// generation that still owns them), which is why the context reaches the
/// engine at all, and why only through these two calls.
pub trait Rebalance: Send + std::fmt::Debug {
    /// Partitions given to this instance (input and repartition, at the
    /// group's committed offsets), or why they could not be placed (the
    /// pipeline is then rebuilt and joins again).
    fn assigned(&mut self, tpl: &TopicPartitionList, failure: Option<EngineError>);
    /// Partitions taken away: the open batch is committed under `group`
    /// and every batch in commit is waited for, then they are forgotten.
    fn revoked(&mut self, group: Option<ConsumerGroupMetadata>, tpl: &TopicPartitionList);
}

impl Rebalance for Engine {
    fn assigned(&mut self, tpl: &TopicPartitionList, failure: Option<EngineError>) {
        if let Some(f) = failure {
            self.failed = Some(f);
        }
        self.on_assign(tpl);
    }

    fn revoked(&mut self, group: Option<ConsumerGroupMetadata>, tpl: &TopicPartitionList) {
        self.on_revoke(group, tpl);
    }
}

impl Engine {
    /// Partitions given to this instance; `tpl` holds the group's committed
    /// input offsets (where each partition's lane resumes).
    fn on_assign(&mut self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            if e.topic() == self.cfg.topics.repartition {
                self.forget_remote(e.partition());
                if let Some(o) = e.offset().to_raw().filter(|o| *o >= 0) {
                    self.rp_read.insert(e.partition(), o);
                }
            }
            if e.topic() == self.cfg.topics.job_events {
                let resume = e.offset().to_raw().filter(|o| *o >= 0).unwrap_or(0);
                self.lanes.insert(e.partition(), Lane::new(resume));
                self.assigned.insert(e.partition());
                if !self.meters.contains_key(&e.partition()) {
                    self.to_restore.insert(e.partition());
                }
            }
        }
        self.epoch += 1;
        self.metrics.set_assigned(self.assigned.len());
        self.metrics.set_ready(false);
        tracing::info!(partitions = ?self.assigned, "partitions assigned");
    }

    fn on_revoke(&mut self, group: Option<ConsumerGroupMetadata>, tpl: &TopicPartitionList) {
        if let Err(e) = self.commit_and_wait_with(|| group) {
            tracing::error!(error = %e, "commit on revoke failed");
            self.abort();
            self.failed = Some(e);
        }
        for e in tpl.elements() {
            let p = e.partition();
            self.assigned.remove(&p);
            self.to_restore.remove(&p);
            self.meters.remove(&p);
            self.lanes.remove(&p);
            self.forget_remote(p);
            self.sources.remove(&p);
            if self.failing_write().remove(&p).is_some() {
                self.metrics
                    .state
                    .partition_failed
                    .with_label_values(&[&p.to_string()])
                    .set(0);
            }
            self.owned
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&p);
            self.metrics
                .billing
                .open_jobs
                .with_label_values(&[&p.to_string()])
                .set(0);
        }
        self.epoch += 1;
        self.metrics.set_assigned(self.assigned.len());
        tracing::info!(revoked = tpl.count(), remaining = ?self.assigned, "partitions revoked");
    }
}

/// The consumer context: forwards rebalances to the engine, and gives the
/// instance that is assigned input partition `p` repartition partition `p`
/// too (the group assigns the input topic only, so this holds whatever the
/// assignor), at the group's committed offsets for both.
#[derive(Debug)]
pub struct MeterContext {
    /// The engine as a rebalance sees it, shared with the poll loop (which
    /// never holds the lock while polling, so callbacks can take it).
    pub engine: Arc<Mutex<dyn Rebalance>>,
    /// Input topic.
    pub input_topic: String,
    /// Repartition topic.
    pub repartition_topic: String,
}

impl MeterContext {
    /// The input partitions of `tpl` with their repartition partitions.
    pub fn with_repartition(&self, tpl: &TopicPartitionList) -> TopicPartitionList {
        let mut full = TopicPartitionList::new();
        for e in tpl.elements() {
            if e.topic() == self.input_topic {
                full.add_partition(&self.input_topic, e.partition());
                full.add_partition(&self.repartition_topic, e.partition());
            }
        }
        full
    }

    fn engine(&self) -> std::sync::MutexGuard<'_, dyn Rebalance + 'static> {
        self.engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ClientContext for MeterContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        // End-of-partition events are expected (the merge asks for them).
        let eof = matches!(
            error,
            rdkafka::error::KafkaError::PartitionEOF(_)
                | rdkafka::error::KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        );
        if !eof {
            tracing::error!(%error, reason, "librdkafka error");
        }
    }
}

impl ConsumerContext for MeterContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::consumer::RebalanceProtocol;
        use rdkafka::types::RDKafkaRespErr;
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let full = self.with_repartition(tpl);
                let (full, fetched) = match consumer.committed_offsets(full.clone(), Duration::from_secs(30)) {
                    Ok(c) => (c, Ok(())),
                    Err(e) => (full, Err(e)),
                };
                // Paused until the poll loop has given each partition its
                // own queue (records fetched before that would reach the
                // main queue in fetch order, partition after partition).
                let assigned = if cooperative {
                    consumer.incremental_assign(&full)
                } else {
                    consumer.assign(&full)
                }
                .and_then(|()| consumer.pause(&full));
                // Without the committed positions the lanes cannot be
                // placed: the pipeline is rebuilt and joins again.
                let failure = fetched.and(assigned).err().map(|source| {
                    EngineError::Kafka(jobmeter_kafka::KafkaAdapterError::Op {
                        op: "assigning partitions at their committed offsets",
                        source,
                    })
                });
                self.engine().assigned(&full, failure);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.engine().revoked(consumer.group_metadata(), tpl);
                let r = if cooperative {
                    consumer.incremental_unassign(&self.with_repartition(tpl))
                } else {
                    consumer.unassign()
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                if let Err(e) = consumer.unassign() {
                    tracing::warn!(error = %e, "unassign failed");
                }
            }
        }
    }
}
