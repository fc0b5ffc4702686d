//! The accounts table: every instance reads the whole accounts topic
//! (`read_committed`, from the beginning) into an in-memory
//! [`AccountBook`], first to its end before metering starts, then by
//! tailing it.
//!
//! A record is expected ahead of the usage it governs; one that arrives
//! later does not re-rate charges already emitted. Such records are logged
//! and counted (`jobmeter_account_records_total{outcome="late"}`): a record
//! whose `effective_from` is earlier than the newest event time the meter
//! had seen when the record arrived.

use jobmeter_core::{AccountBook, AccountRecord};
use jobmeter_kafka::client::KafkaSettings;
use jobmeter_kafka::reader::read_to_end;
use prometheus::{IntCounterVec, Opts, Registry};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Counters of the accounts table.
#[derive(Debug, Clone)]
pub struct AccountsMetrics {
    records: IntCounterVec,
}

impl AccountsMetrics {
    /// Registers into `r`.
    pub fn new(r: &Registry) -> Result<Self, prometheus::Error> {
        let records = IntCounterVec::new(
            Opts::new(
                "jobmeter_account_records_total",
                "Account records read, by outcome (applied, late, invalid)",
            ),
            &["outcome"],
        )?;
        r.register(Box::new(records.clone()))?;
        for o in ["applied", "late", "invalid"] {
            records.with_label_values(&[o]);
        }
        Ok(AccountsMetrics { records })
    }
}

/// The shared table plus what the tailer needs.
#[derive(Debug, Clone)]
pub struct AccountsTable {
    /// The book every meter reads.
    pub book: Arc<RwLock<AccountBook>>,
    /// Newest event time (ms) any local meter has seen, to detect late records.
    pub newest_event_ms: Arc<AtomicI64>,
    metrics: AccountsMetrics,
}

impl AccountsTable {
    /// An empty table.
    pub fn new(book: AccountBook, metrics: AccountsMetrics) -> Self {
        AccountsTable {
            book: Arc::new(RwLock::new(book)),
            newest_event_ms: Arc::new(AtomicI64::new(i64::MIN)),
            metrics,
        }
    }

    fn apply(&self, bytes: Option<&[u8]>) {
        let Some(bytes) = bytes else { return };
        match AccountRecord::parse(bytes) {
            Ok(r) => {
                let late = r.effective_from.0 < self.newest_event_ms.load(Ordering::Relaxed);
                if late {
                    tracing::warn!(account = %r.account_id, effective_from = %r.effective_from, "account record arrived after usage it would govern; charges already emitted are not re-rated");
                    self.metrics.records.with_label_values(&["late"]).inc();
                }
                let mut book = self.book.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                book.insert(r);
                self.metrics.records.with_label_values(&["applied"]).inc();
            }
            Err(e) => {
                tracing::warn!(reason = %e.reason, detail = %e.detail, "invalid account record ignored");
                self.metrics.records.with_label_values(&["invalid"]).inc();
            }
        }
    }

    /// Reads the whole topic to its current end. Returns the next offset of
    /// each partition.
    pub fn load(
        &self,
        settings: &KafkaSettings,
        client_id: &str,
        topic: &str,
        partitions: i32,
    ) -> Result<HashMap<i32, i64>, jobmeter_kafka::KafkaAdapterError> {
        let parts: Vec<(i32, Option<i64>)> = (0..partitions).map(|p| (p, None)).collect();
        let mut next = HashMap::new();
        read_to_end(settings, client_id, topic, &parts, Duration::from_secs(300), |rec| {
            next.insert(rec.partition, rec.offset + 1);
            self.apply(rec.value.as_deref());
        })?;
        Ok(next)
    }

    /// Tails the topic from `next` until `stop` is set (runs on its own thread).
    pub fn tail(
        &self,
        settings: &KafkaSettings,
        client_id: &str,
        topic: &str,
        partitions: i32,
        next: HashMap<i32, i64>,
        stop: Arc<AtomicBool>,
    ) {
        let consumer: BaseConsumer<jobmeter_kafka::reader::ReaderContext> = match settings
            .reader(client_id)
            .create_with_context(jobmeter_kafka::reader::ReaderContext)
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot create the accounts tailer");
                return;
            }
        };
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            let off = next.get(&p).map_or(Offset::Beginning, |o| Offset::Offset(*o));
            if let Err(e) = tpl.add_partition_offset(topic, p, off) {
                tracing::error!(error = %e, "accounts tailer assignment");
                return;
            }
        }
        if let Err(e) = consumer.assign(&tpl) {
            tracing::error!(error = %e, "accounts tailer assignment");
            return;
        }
        while !stop.load(Ordering::Relaxed) {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => self.apply(m.payload()),
                Some(Err(KafkaError::PartitionEOF(_))) | None => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "accounts tailer");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }
}
