//! The exactly-once engine: per-partition meters, one Kafka transaction per
//! batch, RocksDB updated after each commit.
//!
//! ## The crash argument
//!
//! A batch is: consume events → apply them to the partitions' meters →
//! produce outputs and the state changelog records **in one transaction**
//! → add the input offsets to it → commit → write the same state changes
//! to RocksDB in one synced batch, with the changelog offset they reach.
//!
//! What the next start sees if the process dies between two steps:
//!
//! | dies… | Kafka | RocksDB | on restart |
//! |---|---|---|---|
//! | while applying/producing | open transaction, aborted when the new producer with the same transactional id calls `init_transactions` (or by timeout) | untouched | replays from the committed offsets: nothing was visible to `read_committed` readers, so nothing is doubled |
//! | after `send_offsets`, before commit | same: offsets are part of the transaction | untouched | same |
//! | after commit, before the RocksDB write | outputs, changelog and offsets visible | one batch behind | restore loads RocksDB, then replays the changelog after the stored offset: the state catches up exactly; input resumes after the committed offsets |
//! | during the RocksDB write | committed | the write batch is atomic: all or nothing | as above |
//! | after the RocksDB write | committed | current | nothing to do |
//!
//! Changelog records are whole values (upserts and tombstones) keyed by
//! state key, so replaying any suffix of the changelog on top of older
//! state converges to the same state. Outputs are derived deterministically
//! from inputs and state, so a replayed batch produces identical records.
//!
//! A zombie (an instance that lost its partitions but does not know yet) is
//! fenced twice: by the transactional id (a restarted instance) and by the
//! consumer group generation carried in `send_offsets_to_transaction`
//! (KIP-447), so its commit fails and its outputs stay invisible.
//!
//! On a rebalance, the revoke callback commits the open batch before the
//! partitions go; assigned partitions are restored before their first event
//! is applied.

use super::metrics::Metrics;
use jobmeter_core::state::{StateChange, Table};
use jobmeter_core::{AccountBook, Context, Meter, MeterConfig, Origin, Output, PlanCatalog, RateCard, Stats};
use jobmeter_kafka::client::KafkaSettings;
use jobmeter_kafka::reader::read_to_end;
use jobmeter_kafka::topics::Topics;
use jobmeter_kafka::txn::{tag_changelog, TxnError, TxnProducer, TAG_OUTPUT};
use jobmeter_store::Store;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Errors that stop the pipeline (it is then rebuilt from durable state).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A transaction failed.
    #[error("kafka transaction: {0}")]
    Txn(#[from] TxnError),
    /// The Kafka adapter failed.
    #[error("kafka: {0}")]
    Kafka(#[from] jobmeter_kafka::KafkaAdapterError),
    /// The state store failed.
    #[error("state store: {0}")]
    Store(#[from] jobmeter_store::StoreError),
    /// State could not be encoded or decoded.
    #[error("state codec: {0}")]
    State(#[from] jobmeter_core::state::DecodeError),
    /// The consumer has no group metadata (not in a group yet).
    #[error("consumer group metadata unavailable")]
    NoGroup,
    /// An output could not be encoded.
    #[error("encoding an output: {0}")]
    Encode(#[from] serde_json::Error),
}

/// What the engine needs besides its Kafka clients.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Topic names.
    pub topics: Topics,
    /// Kafka settings (for restore readers).
    pub settings: KafkaSettings,
    /// Instance id (client ids).
    pub instance_id: String,
    /// Commit after this many events.
    pub batch_max_events: usize,
    /// Commit this long after the batch's first event.
    pub batch_interval: Duration,
    /// Event-time timeouts.
    pub meter: MeterConfig,
    /// Local state older than this is restored from the changelog in full.
    pub max_local_age: Duration,
    /// How long a restore may wait for the changelog's end.
    pub restore_deadline: Duration,
}

/// Read-only billing data shared by every partition.
#[derive(Debug, Clone)]
pub struct Billing {
    /// Prices.
    pub rates: Arc<RateCard>,
    /// Plan terms.
    pub plans: Arc<PlanCatalog>,
    /// The accounts table, kept current by the accounts reader.
    pub accounts: Arc<RwLock<AccountBook>>,
    /// Newest event time seen by any local meter (late account records).
    pub newest_event_ms: Arc<std::sync::atomic::AtomicI64>,
}

struct PartitionMeter {
    meter: Meter,
    reported: Stats,
}

/// The engine: state of one pipeline incarnation.
pub struct Engine {
    cfg: EngineConfig,
    billing: Billing,
    producer: TxnProducer,
    store: Arc<Store>,
    metrics: Metrics,
    meters: HashMap<i32, PartitionMeter>,
    assigned: BTreeSet<i32>,
    to_restore: BTreeSet<i32>,
    /// Partitions held and restored, shared with the usage API.
    owned: Arc<std::sync::RwLock<BTreeSet<i32>>>,
    in_txn: bool,
    batch_started: Instant,
    batch_events: usize,
    next_offsets: BTreeMap<i32, i64>,
    out: Vec<Output>,
    input_topic: Arc<str>,
    /// An error raised inside a rebalance callback, surfaced by the loop.
    pub failed: Option<EngineError>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("assigned", &self.assigned)
            .field("in_txn", &self.in_txn)
            .field("batch_events", &self.batch_events)
            .finish()
    }
}

impl Engine {
    /// A new engine around a producer that has initialised transactions.
    pub fn new(
        cfg: EngineConfig,
        billing: Billing,
        producer: TxnProducer,
        store: Arc<Store>,
        metrics: Metrics,
        owned: Arc<std::sync::RwLock<BTreeSet<i32>>>,
    ) -> Engine {
        Engine {
            input_topic: cfg.topics.job_events.as_str().into(),
            cfg,
            billing,
            producer,
            store,
            metrics,
            meters: HashMap::new(),
            assigned: BTreeSet::new(),
            to_restore: BTreeSet::new(),
            owned,
            in_txn: false,
            batch_started: Instant::now(),
            batch_events: 0,
            next_offsets: BTreeMap::new(),
            out: Vec::new(),
            failed: None,
        }
    }

    /// True when every assigned partition is restored.
    pub fn ready(&self) -> bool {
        !self.assigned.is_empty() && self.to_restore.is_empty()
    }

    /// Partitions assigned to this instance.
    pub fn assigned(&self) -> &BTreeSet<i32> {
        &self.assigned
    }

    /// Restores every partition assigned and not yet restored.
    pub fn restore_pending(&mut self) -> Result<(), EngineError> {
        while let Some(p) = self.to_restore.pop_first() {
            if let Err(e) = self.restore(p) {
                self.to_restore.insert(p);
                return Err(e);
            }
        }
        self.metrics.ready.set(i64::from(self.ready()));
        Ok(())
    }

    /// Loads a partition's state: RocksDB, then the changelog after the
    /// offset RocksDB reflects.
    fn restore(&mut self, p: i32) -> Result<(), EngineError> {
        let t0 = Instant::now();
        let mut st = self.store.load(p)?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        if st
            .written_at_ms
            .is_some_and(|w| now_ms - w > self.cfg.max_local_age.as_millis() as i64)
        {
            tracing::warn!(
                partition = p,
                "local state is older than state.max_local_age; restoring from the changelog in full"
            );
            self.store.drop_partition(p)?;
            st = Default::default();
        }
        let from_store = st.records.len();
        let mut map: StateMap = st.records.into_iter().map(|(t, k, v)| ((t, k), v)).collect();
        let mut replayed: Vec<StateChange> = Vec::new();
        let mut last = st.changelog_offset;
        let n = read_to_end(
            &self.cfg.settings,
            &format!("{}-restore-{p}", self.cfg.instance_id),
            &self.cfg.topics.changelog,
            &[(p, st.changelog_offset.map(|o| o + 1))],
            self.cfg.restore_deadline,
            |rec| {
                last = Some(rec.offset);
                replayed.extend(overlay(&mut map, rec));
            },
        )?;
        if n > 0 {
            self.store.commit(p, &replayed, last)?;
        }
        let meter = Meter::restore(map.into_iter().map(|((t, k), v)| (t, k, v)), &self.cfg.meter)?;
        let secs = t0.elapsed().as_secs_f64();
        self.metrics.restore_seconds.observe(secs);
        self.metrics.restored_records.inc_by(n);
        self.metrics
            .open_jobs
            .with_label_values(&[&p.to_string()])
            .set(meter.open_jobs() as i64);
        tracing::info!(
            partition = p,
            from_store,
            changelog_records = n,
            seconds = secs,
            "partition restored"
        );
        let reported = meter.stats().clone();
        self.meters.insert(p, PartitionMeter { meter, reported });
        self.owned
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(p);
        Ok(())
    }

    /// Applies one input record, producing its outputs in the open
    /// transaction (begun here if none is open).
    pub fn process(&mut self, msg: &BorrowedMessage<'_>) -> Result<(), EngineError> {
        let p = msg.partition();
        if !self.meters.contains_key(&p) {
            self.to_restore.remove(&p);
            self.restore(p)?;
        }
        if !self.in_txn {
            self.producer.begin()?;
            self.in_txn = true;
            self.batch_started = Instant::now();
        }
        let origin = Origin {
            topic: self.input_topic.clone(),
            partition: p,
            offset: msg.offset(),
        };
        let payload = msg.payload().unwrap_or_default();
        {
            let book = self
                .billing
                .accounts
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let ctx = Context::new(&self.billing.rates, &self.billing.plans, &book, &self.cfg.meter);
            if let Some(pm) = self.meters.get_mut(&p) {
                pm.meter.apply(&ctx, payload, Some(&origin), &mut self.out);
                if let Some(t) = pm.meter.stream_time() {
                    self.billing
                        .newest_event_ms
                        .fetch_max(t.0, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        let mut out = std::mem::take(&mut self.out);
        for o in out.drain(..) {
            self.produce_output(o, msg.key())?;
        }
        self.out = out;
        self.next_offsets.insert(p, msg.offset() + 1);
        self.batch_events += 1;
        self.metrics.consumed.inc();
        Ok(())
    }

    fn produce_output(&mut self, o: Output, input_key: Option<&[u8]>) -> Result<(), EngineError> {
        let t = &self.cfg.topics;
        let json = |v: &dyn erased::Json| v.to_vec();
        match o {
            Output::Charge(c) => {
                self.metrics.charges.with_label_values(&[c.kind.as_str()]).inc();
                let v = json(&c)?;
                self.producer.send(
                    &t.charges,
                    c.account_id.as_str().as_bytes(),
                    Some(&v),
                    None,
                    None,
                    TAG_OUTPUT,
                )?;
            }
            Output::Limit(l) => {
                let v = json(&l)?;
                self.producer.send(
                    &t.limits,
                    l.account_id.as_str().as_bytes(),
                    Some(&v),
                    None,
                    None,
                    TAG_OUTPUT,
                )?;
            }
            Output::Statement(s) => {
                let v = json(&s)?;
                self.producer.send(
                    &t.statements,
                    s.account_id.as_str().as_bytes(),
                    Some(&v),
                    None,
                    None,
                    TAG_OUTPUT,
                )?;
            }
            Output::Reject(r) => {
                let (topic, partition, offset) = r
                    .origin
                    .as_ref()
                    .map_or((t.job_events.as_str(), -1, -1), |o| (&*o.topic, o.partition, o.offset));
                let headers = jobmeter_kafka::dlq::headers(r.reason.as_str(), &r.detail, topic, partition, offset);
                self.producer.send(
                    &t.dlq,
                    input_key.unwrap_or_default(),
                    Some(&r.raw),
                    Some(headers),
                    None,
                    TAG_OUTPUT,
                )?;
            }
        }
        Ok(())
    }

    /// True when the open batch should be committed.
    pub fn batch_due(&self) -> bool {
        self.in_txn
            && (self.batch_events >= self.cfg.batch_max_events
                || self.batch_started.elapsed() >= self.cfg.batch_interval)
    }

    /// Commits the open batch: changelog records, offsets, transaction
    /// commit, then RocksDB.
    pub fn commit<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> Result<(), EngineError> {
        if !self.in_txn {
            return Ok(());
        }
        let t0 = Instant::now();
        let mut changes: Vec<(i32, Vec<StateChange>)> = Vec::new();
        for p in self.next_offsets.keys().copied().collect::<Vec<_>>() {
            let Some(pm) = self.meters.get_mut(&p) else { continue };
            let ch = pm.meter.take_changes()?;
            for c in &ch {
                let key = jobmeter_core::state::changelog::key(c.table, &c.key);
                self.producer.send(
                    &self.cfg.topics.changelog,
                    &key,
                    c.value.as_deref(),
                    None,
                    Some(p),
                    tag_changelog(p),
                )?;
            }
            changes.push((p, ch));
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &self.next_offsets {
            tpl.add_partition_offset(&self.cfg.topics.job_events, *p, Offset::Offset(*o))
                .map_err(|e| {
                    EngineError::Kafka(jobmeter_kafka::KafkaAdapterError::Op {
                        op: "offsets",
                        source: e,
                    })
                })?;
        }
        let group = consumer.group_metadata().ok_or(EngineError::NoGroup)?;
        let t_off = Instant::now();
        self.producer.send_offsets(&tpl, &group)?;
        let t_commit = Instant::now();
        let changelog_offsets = self.producer.commit()?;
        self.in_txn = false;
        let t1 = Instant::now();
        self.metrics
            .commit_seconds
            .with_label_values(&["produce"])
            .observe((t_off - t0).as_secs_f64());
        self.metrics
            .commit_seconds
            .with_label_values(&["offsets"])
            .observe((t_commit - t_off).as_secs_f64());
        let steps: Vec<(i32, &[StateChange], Option<i64>)> = changes
            .iter()
            .map(|(p, ch)| (*p, ch.as_slice(), changelog_offsets.get(p).copied()))
            .collect();
        self.store.commit_many(&steps)?;
        self.metrics
            .commit_seconds
            .with_label_values(&["commit"])
            .observe((t1 - t_commit).as_secs_f64());
        self.metrics
            .commit_seconds
            .with_label_values(&["store"])
            .observe(t1.elapsed().as_secs_f64());
        self.metrics.batch_events.observe(self.batch_events as f64);
        for (p, pm) in self.meters.iter_mut() {
            if self.next_offsets.contains_key(p) {
                let now = pm.meter.stats().clone();
                self.metrics.add_stats(&pm.reported, &now);
                pm.reported = now;
                self.metrics
                    .open_jobs
                    .with_label_values(&[&p.to_string()])
                    .set(pm.meter.open_jobs() as i64);
            }
        }
        self.metrics.producer_queue.set(i64::from(self.producer.in_flight()));
        self.batch_events = 0;
        self.next_offsets.clear();
        Ok(())
    }

    /// Aborts the open transaction (best effort, before a rebuild).
    pub fn abort(&mut self) {
        if self.in_txn {
            if let Err(e) = self.producer.abort() {
                tracing::warn!(error = %e, "abort failed; the transaction will time out");
            }
            self.in_txn = false;
        }
    }

    fn on_assign(&mut self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            if e.topic() == self.cfg.topics.job_events {
                self.assigned.insert(e.partition());
                if !self.meters.contains_key(&e.partition()) {
                    self.to_restore.insert(e.partition());
                }
            }
        }
        self.metrics.assigned_partitions.set(self.assigned.len() as i64);
        self.metrics.ready.set(0);
        tracing::info!(partitions = ?self.assigned, "partitions assigned");
    }

    fn on_revoke<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, tpl: &TopicPartitionList) {
        if let Err(e) = self.commit(consumer) {
            tracing::error!(error = %e, "commit on revoke failed");
            self.abort();
            self.failed = Some(e);
        }
        for e in tpl.elements() {
            let p = e.partition();
            self.assigned.remove(&p);
            self.to_restore.remove(&p);
            self.meters.remove(&p);
            self.owned
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&p);
            self.metrics.open_jobs.with_label_values(&[&p.to_string()]).set(0);
        }
        self.metrics.assigned_partitions.set(self.assigned.len() as i64);
        tracing::info!(revoked = tpl.count(), remaining = ?self.assigned, "partitions revoked");
    }

    /// Updates the gauges that need no network call.
    pub fn report_local(&self) {
        self.metrics.store_bytes.set(self.store.size_bytes() as i64);
        self.metrics.producer_queue.set(i64::from(self.producer.in_flight()));
    }
}

/// State records by (table, key), as restored.
pub(crate) type StateMap = BTreeMap<(Table, Vec<u8>), Vec<u8>>;

/// Applies one changelog record to `map` (an upsert, or a delete for a
/// tombstone) and returns it as a state change; `None` for a malformed key.
pub(crate) fn overlay(map: &mut StateMap, rec: jobmeter_kafka::reader::Record) -> Option<StateChange> {
    let key = rec.key?;
    let (table, k) = jobmeter_core::state::changelog::split(&key)?;
    let entry = (table, k.to_vec());
    match &rec.value {
        Some(v) => {
            map.insert(entry, v.clone());
        }
        None => {
            map.remove(&entry);
        }
    }
    Some(StateChange {
        table,
        key: k.to_vec(),
        value: rec.value,
    })
}

/// JSON encoding of outputs without naming each type.
mod erased {
    pub(super) trait Json {
        fn to_vec(&self) -> Result<Vec<u8>, serde_json::Error>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_vec(&self) -> Result<Vec<u8>, serde_json::Error> {
            serde_json::to_vec(self)
        }
    }
}

/// The consumer context: forwards rebalances to the engine.
#[derive(Debug)]
pub struct MeterContext {
    /// The engine, shared with the poll loop (which never holds the lock
    /// while polling, so callbacks can take it).
    pub engine: Arc<Mutex<Engine>>,
}

impl ClientContext for MeterContext {}

impl ConsumerContext for MeterContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut e = self.engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            e.on_revoke(consumer, tpl);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut e = self.engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            e.on_assign(tpl);
        }
    }
}
