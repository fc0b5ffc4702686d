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
//! from the input records, the state and the accounts table. The table is
//! tailed live, so a batch applied again after a crash can see an account
//! record that arrived in between; that changes nothing the aborted attempt
//! published (it was never visible), but a rebuild reproduces the live run
//! exactly only when account records arrive ahead of the usage they govern,
//! which the contract asks of them (a late record is counted as `late`).
//!
//! A zombie (an instance that lost its partitions but does not know yet) is
//! fenced twice: by the transactional id (a restarted instance) and by the
//! consumer group generation carried in `send_offsets_to_transaction`
//! (KIP-447), so its commit fails and its outputs stay invisible.
//!
//! On a rebalance, the revoke callback commits the open batch and waits for
//! every batch in commit before the partitions go; assigned partitions are
//! restored before their first event is applied.
//!
//! ## Pipelining
//! The steps after "apply" run on a committer thread, one batch at a time
//! and in order, while the pipeline thread applies the next batch's events
//! to its in-memory meters. Each batch is still exactly one transaction
//! followed by one RocksDB write, so the table above holds per batch. If a
//! commit fails, the committer aborts it and refuses later batches; the
//! pipeline then discards its in-memory meters (which may be ahead of what
//! was committed) and is rebuilt from durable state, as after a crash.

use super::metrics::Metrics;
use jobmeter_core::state::{StateChange, Table};
use jobmeter_core::{AccountBook, Context, Meter, MeterConfig, Origin, Output, PlanCatalog, RateCard, Stats};
use jobmeter_kafka::client::KafkaSettings;
use jobmeter_kafka::reader::read_to_end;
use jobmeter_kafka::repartition::{is_marker, Lane, Marker, Source};
use jobmeter_kafka::topics::Topics;
use jobmeter_kafka::txn::{tag_changelog, Outgoing, TxnError, TxnProducer, TAG_OUTPUT};
use jobmeter_store::Store;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::Message;
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
    /// The committer thread is gone.
    #[error("the committer thread stopped")]
    CommitterGone,
    /// A batch's commit has not finished in time: a Kafka call hangs
    /// (seen after a broker restart, inside `send_offsets_to_transaction`).
    /// The pipeline is rebuilt; its new producer, with the same
    /// transactional id, fences the stuck one.
    #[error("a batch commit has not finished in {seconds} s (a Kafka call hangs); rebuilding the pipeline, which fences the stuck producer")]
    CommitStalled {
        /// How long the pipeline waited.
        seconds: u64,
    },
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
    /// How long the pipeline waits for the committer to take a batch (or
    /// finish every batch) before it gives up on it as stuck.
    pub commit_stall_after: Duration,
    /// Partitions of the input topic (which accounts each partition's
    /// meter bills the pro fee to when they have no usage).
    pub input_partitions: i32,
}

/// Partitions that cannot be restored, with the reason (shared with `/readyz`).
pub type FailingPartitions = Arc<RwLock<BTreeMap<i32, String>>>;

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
    committer: Committer,
    store: Arc<Store>,
    metrics: Metrics,
    meters: HashMap<i32, PartitionMeter>,
    assigned: BTreeSet<i32>,
    to_restore: BTreeSet<i32>,
    /// Changes at every assignment or revocation (the poll loop then
    /// rebuilds its per-partition queues).
    epoch: u64,
    /// Partitions held and restored, shared with the usage API.
    owned: Arc<std::sync::RwLock<BTreeSet<i32>>>,
    /// Assigned partitions whose stored state cannot be decoded, with the
    /// reason; shared with `/readyz`. They are not metered (and their
    /// offsets never move) until a rebalance or restart retries them.
    failing: FailingPartitions,
    /// Partitions that failed since the poll loop last paused them.
    newly_failed: Vec<i32>,
    batch_started: Instant,
    batch_events: usize,
    next_offsets: BTreeMap<i32, i64>,
    /// Repartition offsets to commit with the batch.
    next_rp_offsets: BTreeMap<i32, i64>,
    /// Per assigned partition: where its two inputs interleave.
    lanes: HashMap<i32, Lane>,
    records: Vec<OutRecord>,
    charges_by_kind: [u64; 3],
    rerouted_by_cause: [u64; 3],
    /// When each cause of rerouting was last logged.
    reroute_logged: [Option<Instant>; 3],
    /// When an event last arrived on another partition than its account's.
    rerouted_at: Option<Instant>,
    limits_by_label: BTreeMap<(&'static str, String), u64>,
    out: Vec<Output>,
    input_topic: Arc<str>,
    repartition_topic: Arc<str>,
    /// An error raised inside a rebalance callback, surfaced by the loop.
    pub failed: Option<EngineError>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("assigned", &self.assigned)
            .field("records", &self.records.len())
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
        failing: FailingPartitions,
    ) -> Engine {
        let committer = Committer::start(
            producer,
            store.clone(),
            metrics.clone(),
            cfg.topics.changelog.clone(),
            cfg.commit_stall_after,
        );
        Engine {
            input_topic: cfg.topics.job_events.as_str().into(),
            repartition_topic: cfg.topics.repartition.as_str().into(),
            cfg,
            billing,
            committer,
            store,
            metrics,
            meters: HashMap::new(),
            assigned: BTreeSet::new(),
            to_restore: BTreeSet::new(),
            epoch: 0,
            owned,
            failing,
            newly_failed: Vec::new(),
            batch_started: Instant::now(),
            batch_events: 0,
            next_offsets: BTreeMap::new(),
            next_rp_offsets: BTreeMap::new(),
            lanes: HashMap::new(),
            records: Vec::new(),
            charges_by_kind: [0; 3],
            rerouted_by_cause: [0; 3],
            reroute_logged: [None; 3],
            rerouted_at: None,
            limits_by_label: BTreeMap::new(),
            out: Vec::new(),
            failed: None,
        }
    }

    /// True when every assigned partition is restored (and none failed).
    pub fn ready(&self) -> bool {
        !self.assigned.is_empty() && self.to_restore.is_empty() && self.failing_read().is_empty()
    }

    fn failing_read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<i32, String>> {
        self.failing.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn failing_write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<i32, String>> {
        self.failing.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Partitions that failed to restore since the last call: the poll
    /// loop pauses them so their records are not fetched in vain.
    pub fn take_newly_failed(&mut self) -> Vec<i32> {
        std::mem::take(&mut self.newly_failed)
    }

    /// Stored state of `p` cannot be read back: only `p` stops. Its
    /// records are skipped without advancing its offsets, so nothing is
    /// lost; every other partition goes on metering.
    fn fail_partition(&mut self, p: i32, e: &jobmeter_core::state::DecodeError) {
        tracing::error!(
            partition = p,
            table = e.table,
            key = %e.key,
            error = %e,
            "partition stopped: its stored state cannot be decoded; every other partition goes on. Recover with `jobmeter rebuild`, then restart"
        );
        self.metrics
            .partition_failed
            .with_label_values(&[&p.to_string()])
            .set(1);
        self.failing_write().insert(p, e.to_string());
        self.newly_failed.push(p);
    }

    /// Partitions assigned to this instance.
    pub fn assigned(&self) -> &BTreeSet<i32> {
        &self.assigned
    }

    /// Changes whenever partitions are assigned or revoked.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The start of a poll-loop turn: surfaces an error raised in a
    /// rebalance callback, says whether the assignment changed since
    /// `epoch` (`true`: the loop starts a new round), and restores the
    /// partitions waiting for it.
    pub fn begin_turn(&mut self, epoch: u64) -> Result<bool, EngineError> {
        if let Some(err) = self.failed.take() {
            return Err(err);
        }
        if self.epoch != epoch {
            return Ok(true);
        }
        self.restore_pending()?;
        Ok(false)
    }

    /// True while events keep arriving on other partitions than their
    /// accounts' (within the last 10 minutes): the poll loop then keeps
    /// the partitions in event-time step.
    pub fn rerouting(&self) -> bool {
        self.rerouted_at.is_some_and(|t| t.elapsed() < Duration::from_secs(600))
    }

    /// True when `p`'s stored state cannot be decoded (it is not metered).
    pub fn is_failing(&self, p: i32) -> bool {
        self.failing_read().contains_key(&p)
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

    /// Loads a partition's state, or marks it failing when a stored record
    /// cannot be decoded (other errors, such as Kafka's, stop the pipeline,
    /// which is then rebuilt and retries).
    fn restore(&mut self, p: i32) -> Result<(), EngineError> {
        match self.load_partition(p) {
            Err(EngineError::State(e)) => {
                self.fail_partition(p, &e);
                Ok(())
            }
            r => r,
        }
    }

    /// RocksDB, then the changelog after the offset RocksDB reflects.
    fn load_partition(&mut self, p: i32) -> Result<(), EngineError> {
        let t0 = Instant::now();
        let mut st = self.store.load(p)?;
        let now_ms = jobmeter_core::Timestamp::now().0;
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

    /// Takes one record (input or repartition), adding what it yields to
    /// the open batch.
    ///
    /// Every event is metered by the partition its account belongs to
    /// (Kafka's murmur2 of `data.account_id`, whatever partition it
    /// arrived on): applied here when that partition is this instance's,
    /// forwarded through the repartition topic when it is another's. A
    /// record that is not a valid event is dead-lettered where it arrived.
    pub fn process<M: Message>(&mut self, msg: &M) -> Result<(), EngineError> {
        let parsed = jobmeter_core::parse_job_event(msg.payload().unwrap_or_default()).ok();
        self.process_parsed(msg, parsed)
    }

    /// [`Engine::process`] with the record's event already parsed (`None`:
    /// not a valid event, or a marker).
    pub fn process_parsed<M: Message>(
        &mut self,
        msg: &M,
        parsed: Option<jobmeter_core::JobEvent>,
    ) -> Result<(), EngineError> {
        let p = msg.partition();
        if !self.local(p)? {
            // A failing partition has no meter: its records are not
            // metered and its offset does not move, so a restart after the
            // repair reads them again.
            return Ok(());
        }
        if self.batch_events == 0 {
            self.batch_started = Instant::now();
        }
        self.batch_events += 1;
        self.metrics.consumed.inc();
        let o = msg.offset();
        let record_time = msg.timestamp().to_millis().map(jobmeter_core::Timestamp);
        let payload = msg.payload().unwrap_or_default();
        if msg.topic() == &*self.repartition_topic {
            self.next_rp_offsets.insert(p, o + 1);
            if is_marker(msg.headers()) {
                return Ok(());
            }
            let headers = msg.headers().map(|h| {
                use rdkafka::message::Headers;
                h.iter()
                    .map(|x| (x.key, x.value.unwrap_or_default()))
                    .collect::<Vec<_>>()
            });
            let (topic, partition, offset) = headers
                .and_then(jobmeter_kafka::repartition::source_of)
                .map_or_else(|| (self.repartition_topic.clone(), p, o), |(t, p, o)| (t.into(), p, o));
            let origin = Origin {
                topic,
                partition,
                offset,
                record_time,
            };
            self.lane(p, o).applied(Source::Forwarded, o);
            return self.apply(p, payload, parsed, &origin, msg.key());
        }
        self.next_offsets.insert(p, o + 1);
        let origin = Origin {
            topic: self.input_topic.clone(),
            partition: p,
            offset: o,
            record_time,
        };
        let target = parsed.as_ref().map_or(p, |ev| self.owner(ev));
        if target == p {
            self.lane(p, o).applied(Source::Own, o);
            return self.apply(p, payload, parsed, &origin, msg.key());
        }
        self.lane(p, o).passed_on(o);
        let Some(ev) = parsed else { return Ok(()) };
        self.note_rerouted(msg, &ev, target);
        if self.local(target)? {
            self.lane(target, 0).applied(Source::Input(p), o);
            self.apply(target, payload, Some(ev), &origin, msg.key())
        } else {
            self.forward(msg, &ev, target);
            Ok(())
        }
    }

    /// The partition that meters `ev`'s account.
    fn owner(&self, ev: &jobmeter_core::JobEvent) -> i32 {
        jobmeter_core::partition::partition_for_key(ev.account.as_str().as_bytes(), self.cfg.input_partitions)
    }

    /// When the record should be applied relative to the others of this
    /// instance: its event time, or as soon as possible (`i64::MIN`) for a
    /// record whose time cannot move stream time (not a valid event, a
    /// time the meter will refuse as implausible, a marker).
    pub fn merge_key<M: Message>(&self, msg: &M, parsed: Option<&jobmeter_core::JobEvent>) -> i64 {
        let Some(ev) = parsed else { return i64::MIN };
        match msg.timestamp().to_millis() {
            Some(rt) if !self.cfg.meter.plausible(ev.time, jobmeter_core::Timestamp(rt)) => i64::MIN,
            _ => ev.time.0,
        }
    }

    /// True when partition `p` is metered here: assigned and restored
    /// (restored now if it was waiting), and not failing.
    fn local(&mut self, p: i32) -> Result<bool, EngineError> {
        if self.meters.contains_key(&p) {
            return Ok(true);
        }
        if !self.assigned.contains(&p) || self.failing_read().contains_key(&p) {
            return Ok(false);
        }
        self.to_restore.remove(&p);
        self.restore(p)?;
        Ok(self.meters.contains_key(&p))
    }

    /// The lane of `p` (created at assignment; `offset` is where a lane
    /// that is somehow missing starts).
    fn lane(&mut self, p: i32, offset: i64) -> &mut Lane {
        self.lanes.entry(p).or_insert_with(|| Lane::new(offset))
    }

    /// Applies one event to partition `p`'s meter: parsed already, or
    /// parsed here from `payload` (a reject is dead-lettered).
    fn apply(
        &mut self,
        p: i32,
        payload: &[u8],
        parsed: Option<jobmeter_core::JobEvent>,
        origin: &Origin,
        key: Option<&[u8]>,
    ) -> Result<(), EngineError> {
        {
            let book = self
                .billing
                .accounts
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let ctx = Context::new(&self.billing.rates, &self.billing.plans, &book, &self.cfg.meter)
                .with_partition(p, self.cfg.input_partitions);
            if let Some(pm) = self.meters.get_mut(&p) {
                match parsed {
                    Some(ev) => pm.meter.apply_event(&ctx, ev, payload, Some(origin), &mut self.out),
                    None => pm.meter.apply(&ctx, payload, Some(origin), &mut self.out),
                }
                if let Some(t) = pm.meter.stream_time() {
                    self.billing
                        .newest_event_ms
                        .fetch_max(t.0, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        let mut out = std::mem::take(&mut self.out);
        for o in out.drain(..) {
            self.produce_output(o, key)?;
        }
        self.out = out;
        Ok(())
    }

    /// Counts an event that arrived on another partition than its
    /// account's, and says so in the log (at most once a minute per cause).
    fn note_rerouted<M: Message>(&mut self, msg: &M, ev: &jobmeter_core::JobEvent, owner: i32) {
        let account = ev.account.as_str().as_bytes();
        let cause = match msg.key() {
            None => Reroute::Keyless,
            Some(k) if k == account => Reroute::Partitioner,
            Some(_) => Reroute::KeyNotAccount,
        };
        self.rerouted_by_cause[cause as usize] += 1;
        self.rerouted_at = Some(Instant::now());
        let logged = &mut self.reroute_logged[cause as usize];
        if logged.is_some_and(|t| t.elapsed() < REROUTE_LOG_EVERY) {
            return;
        }
        *logged = Some(Instant::now());
        #[derive(serde::Deserialize)]
        struct Source<'a> {
            #[serde(borrow)]
            source: Option<std::borrow::Cow<'a, str>>,
        }
        let source = serde_json::from_slice::<Source<'_>>(msg.payload().unwrap_or_default())
            .ok()
            .and_then(|s| s.source.map(|s| s.into_owned()))
            .unwrap_or_default();
        tracing::warn!(
            source = %source,
            cause = cause.as_str(),
            partition = msg.partition(),
            owner,
            account = %ev.account,
            key = %String::from_utf8_lossy(msg.key().unwrap_or_default()),
            "events arrive on a partition other than their account's (Kafka's murmur2 of data.account_id); each is metered by its account's partition, so nothing is lost or doubled, but the producer should key records by account_id with the murmur2 partitioner to spare the detour (logged at most once a minute per cause; see jobmeter_events_rerouted_total)"
        );
    }

    /// Forwards an input record unchanged to the repartition partition of
    /// the partition that meters its account (same transaction as its
    /// input offset, so exactly once), keeping its timestamp and naming
    /// where it came from in headers.
    fn forward<M: Message>(&mut self, msg: &M, ev: &jobmeter_core::JobEvent, owner: i32) {
        let headers = jobmeter_kafka::repartition::forward_headers(
            msg.headers(),
            &self.input_topic,
            msg.partition(),
            msg.offset(),
        );
        self.records.push(OutRecord {
            topic: self.cfg.topics.repartition.clone(),
            key: ev.account.as_str().as_bytes().to_vec(),
            payload: Some(msg.payload().unwrap_or_default().to_vec()),
            headers: Some(headers),
            partition: Some(owner),
            timestamp_ms: msg.timestamp().to_millis(),
            tag: TAG_OUTPUT,
        });
    }

    /// Adds partition `p`'s marker to the open batch.
    fn push_marker(&mut self, p: i32, m: Marker) {
        self.records.push(OutRecord {
            topic: self.cfg.topics.repartition.clone(),
            key: Vec::new(),
            payload: Some(m.encode()),
            headers: Some(Marker::headers()),
            partition: Some(p),
            timestamp_ms: None,
            tag: TAG_OUTPUT,
        });
    }

    fn produce_output(&mut self, o: Output, input_key: Option<&[u8]>) -> Result<(), EngineError> {
        let t = &self.cfg.topics;
        let json = |v: &dyn erased::Json| v.to_vec();
        let rec = |topic: &str, key: &[u8], payload: Vec<u8>| OutRecord {
            topic: topic.to_owned(),
            key: key.to_vec(),
            payload: Some(payload),
            headers: None,
            partition: None,
            timestamp_ms: None,
            tag: TAG_OUTPUT,
        };
        let r = match o {
            Output::Charge(c) => {
                if let Some(i) = jobmeter_core::JobKind::ALL.iter().position(|k| *k == c.kind) {
                    self.charges_by_kind[i] += 1;
                }
                rec(&t.charges, c.account_id.as_str().as_bytes(), json(&c)?)
            }
            Output::Limit(l) => {
                let threshold = l.threshold_pct.map_or_else(|| "amount".to_owned(), |p| p.to_string());
                *self.limits_by_label.entry((l.limit.as_str(), threshold)).or_default() += 1;
                rec(&t.limits, l.account_id.as_str().as_bytes(), json(&l)?)
            }
            Output::Statement(st) => rec(&t.statements, st.account_id.as_str().as_bytes(), json(&st)?),
            Output::Reject(r) => {
                let (topic, partition, offset) = r
                    .origin
                    .as_ref()
                    .map_or((t.job_events.as_str(), -1, -1), |o| (&*o.topic, o.partition, o.offset));
                let headers = jobmeter_kafka::dlq::headers(r.reason.as_str(), &r.detail, topic, partition, offset);
                OutRecord {
                    headers: Some(headers),
                    ..rec(&t.dlq, input_key.unwrap_or_default(), r.raw)
                }
            }
        };
        self.records.push(r);
        Ok(())
    }

    /// True when the open batch should be committed.
    pub fn batch_due(&self) -> bool {
        self.batch_events > 0
            && (self.batch_events >= self.cfg.batch_max_events
                || self.batch_started.elapsed() >= self.cfg.batch_interval)
    }

    /// Hands the open batch to the committer, which commits it while the
    /// pipeline goes on with the next one. Waits while the committer is
    /// still busy with the previous batch (at most one batch in commit and
    /// one being built). Returns an earlier batch's commit failure.
    pub fn commit<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> Result<(), EngineError> {
        self.committer.check()?;
        if self.batch_events == 0 {
            return Ok(());
        }
        let markers: Vec<(i32, Marker)> = self
            .lanes
            .iter_mut()
            .filter_map(|(p, lane)| lane.take_marker().map(|m| (*p, m)))
            .collect();
        for (p, m) in markers {
            self.push_marker(p, m);
        }
        // A record of one partition may change another's meter: take the
        // changes of every meter (untouched ones have none).
        let mut changes: Vec<(i32, Vec<StateChange>)> = Vec::new();
        let mut stats = Vec::new();
        let mut parts: Vec<i32> = self.meters.keys().copied().collect();
        parts.sort_unstable();
        for p in parts {
            let Some(pm) = self.meters.get_mut(&p) else { continue };
            let ch = pm.meter.take_changes()?;
            if ch.is_empty() && pm.meter.stats() == &pm.reported {
                continue;
            }
            changes.push((p, ch));
            let now = pm.meter.stats().clone();
            stats.push((
                p,
                std::mem::replace(&mut pm.reported, now.clone()),
                now,
                pm.meter.open_jobs(),
            ));
        }
        let group = consumer.group_metadata().ok_or(EngineError::NoGroup)?;
        let mut offsets: Vec<(String, i32, i64)> = Vec::new();
        for (p, o) in std::mem::take(&mut self.next_offsets) {
            offsets.push((self.cfg.topics.job_events.clone(), p, o));
        }
        for (p, o) in std::mem::take(&mut self.next_rp_offsets) {
            offsets.push((self.cfg.topics.repartition.clone(), p, o));
        }
        let batch = Batch {
            records: std::mem::take(&mut self.records),
            changes,
            offsets,
            group,
            events: self.batch_events,
            stats,
            charges_by_kind: std::mem::take(&mut self.charges_by_kind),
            rerouted_by_cause: std::mem::take(&mut self.rerouted_by_cause),
            limits_by_label: std::mem::take(&mut self.limits_by_label),
        };
        self.batch_events = 0;
        let t = Instant::now();
        let r = self.committer.submit(batch);
        self.metrics
            .commit_seconds
            .with_label_values(&["handover"])
            .observe(t.elapsed().as_secs_f64());
        r
    }

    /// Commits the open batch and waits until every batch handed over is
    /// committed (shutdown, revoke).
    pub fn commit_and_wait<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> Result<(), EngineError> {
        self.commit(consumer)?;
        self.committer.wait()
    }

    /// Drops the open batch (its transaction was never begun; a failed
    /// commit is aborted by the committer).
    pub fn abort(&mut self) {
        self.records.clear();
        self.limits_by_label.clear();
        self.charges_by_kind = [0; 3];
        self.rerouted_by_cause = [0; 3];
        self.next_offsets.clear();
        self.next_rp_offsets.clear();
        self.batch_events = 0;
    }

    /// Partitions given to this instance; `tpl` holds the group's committed
    /// input offsets (where each partition's lane resumes).
    fn on_assign(&mut self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
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
        self.metrics.assigned_partitions.set(self.assigned.len() as i64);
        self.metrics.ready.set(0);
        tracing::info!(partitions = ?self.assigned, "partitions assigned");
    }

    fn on_revoke<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, tpl: &TopicPartitionList) {
        if let Err(e) = self.commit_and_wait(consumer) {
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
            if self.failing_write().remove(&p).is_some() {
                self.metrics
                    .partition_failed
                    .with_label_values(&[&p.to_string()])
                    .set(0);
            }
            self.owned
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&p);
            self.metrics.open_jobs.with_label_values(&[&p.to_string()]).set(0);
        }
        self.epoch += 1;
        self.metrics.assigned_partitions.set(self.assigned.len() as i64);
        tracing::info!(revoked = tpl.count(), remaining = ?self.assigned, "partitions revoked");
    }

    /// Updates the gauges that need no network call.
    pub fn report_local(&self) {
        self.metrics.store_bytes.set(self.store.size_bytes() as i64);
        self.metrics.producer_queue.set(i64::from(self.committer.queue_depth()));
    }
}

/// One output or changelog record, encoded, waiting for its transaction.
struct OutRecord {
    topic: String,
    key: Vec<u8>,
    payload: Option<Vec<u8>>,
    headers: Option<rdkafka::message::OwnedHeaders>,
    partition: Option<i32>,
    timestamp_ms: Option<i64>,
    tag: usize,
}

/// Why an input record was forwarded (the label of
/// `jobmeter_events_rerouted_total`).
#[derive(Debug, Clone, Copy)]
enum Reroute {
    /// The record has no key.
    Keyless = 0,
    /// Keyed by the account, but by a partitioner other than murmur2.
    Partitioner = 1,
    /// Keyed by something other than the account.
    KeyNotAccount = 2,
}

impl Reroute {
    const ALL: [Reroute; 3] = [Reroute::Keyless, Reroute::Partitioner, Reroute::KeyNotAccount];

    fn as_str(self) -> &'static str {
        match self {
            Reroute::Keyless => "keyless",
            Reroute::Partitioner => "partitioner",
            Reroute::KeyNotAccount => "key_not_account",
        }
    }
}

/// How often the warning about forwarded records is logged, per cause.
const REROUTE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Everything one transaction carries.
struct Batch {
    records: Vec<OutRecord>,
    changes: Vec<(i32, Vec<StateChange>)>,
    /// Input and repartition offsets: (topic, partition, next offset).
    offsets: Vec<(String, i32, i64)>,
    group: rdkafka::consumer::ConsumerGroupMetadata,
    events: usize,
    /// Per partition: stats reported before, stats now, open jobs.
    stats: Vec<(i32, Stats, Stats, usize)>,
    charges_by_kind: [u64; 3],
    rerouted_by_cause: [u64; 3],
    limits_by_label: BTreeMap<(&'static str, String), u64>,
}

enum ToCommitter {
    Batch(Box<Batch>),
    Wait(std::sync::mpsc::SyncSender<()>),
}

/// The committer: a thread that owns the transactional producer and runs
/// each batch's transaction (begin, produce outputs and changelog records,
/// add offsets, commit) and then the RocksDB write, one batch at a time and
/// in order, while the pipeline builds the next batch. The crash argument
/// above holds per batch unchanged; the overlap only hides the commit's
/// round trips and the fsync behind the next batch's work.
///
/// Every call into librdkafka has a timeout, but one has been seen to hang
/// regardless (`send_offsets_to_transaction` after a broker restart). So
/// the pipeline never waits for the committer longer than `stall_after`:
/// it then fails with [`EngineError::CommitStalled`], the pipeline is
/// rebuilt from durable state as after a crash, and the stuck thread is
/// left behind (not joined) while the new producer fences its transaction.
struct Committer {
    tx: Option<std::sync::mpsc::SyncSender<ToCommitter>>,
    thread: Option<std::thread::JoinHandle<()>>,
    failed: Arc<Mutex<Option<EngineError>>>,
    queue_depth: Arc<std::sync::atomic::AtomicI32>,
    stall_after: Duration,
    /// Set once a stall is detected: later calls fail at once.
    stalled: std::sync::atomic::AtomicBool,
    /// Set by the thread when it ends.
    finished: Arc<std::sync::atomic::AtomicBool>,
}

impl Committer {
    fn start(
        producer: TxnProducer,
        store: Arc<Store>,
        metrics: Metrics,
        changelog: String,
        stall_after: Duration,
    ) -> Committer {
        // Capacity 0: a hand-over waits until the committer takes it, so at
        // most one batch is being committed while one is being built.
        let (tx, rx) = std::sync::mpsc::sync_channel::<ToCommitter>(0);
        let failed: Arc<Mutex<Option<EngineError>>> = Arc::default();
        let queue_depth: Arc<std::sync::atomic::AtomicI32> = Arc::default();
        let (f, q) = (failed.clone(), queue_depth.clone());
        let finished: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let done = finished.clone();
        let thread = std::thread::Builder::new()
            .name("jobmeter-commit".into())
            .spawn(move || {
                let _finished = SetOnDrop(done);
                for msg in rx {
                    match msg {
                        ToCommitter::Batch(b) => {
                            let ok = f.lock().map(|x| x.is_none()).unwrap_or(false);
                            if !ok {
                                continue;
                            }
                            if let Err(e) = commit_batch(&producer, &store, &metrics, &changelog, *b) {
                                if let Err(a) = producer.abort() {
                                    tracing::warn!(error = %a, "abort failed; the transaction will time out");
                                }
                                if let Ok(mut x) = f.lock() {
                                    *x = Some(e);
                                }
                            }
                            q.store(producer.in_flight(), std::sync::atomic::Ordering::Relaxed);
                        }
                        ToCommitter::Wait(reply) => {
                            let _ = reply.send(());
                        }
                    }
                }
            })
            .ok();
        Committer {
            tx: Some(tx),
            thread,
            failed,
            queue_depth,
            stall_after,
            stalled: std::sync::atomic::AtomicBool::new(false),
            finished,
        }
    }

    fn stall(&self) -> EngineError {
        self.stalled.store(true, std::sync::atomic::Ordering::SeqCst);
        EngineError::CommitStalled {
            seconds: self.stall_after.as_secs(),
        }
    }

    fn check(&self) -> Result<(), EngineError> {
        match self.failed.lock().ok().and_then(|mut f| f.take()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Hands `m` over, waiting at most `stall_after` for the committer to
    /// take it (the channel is a rendezvous: it takes it when idle).
    fn send(&self, mut m: ToCommitter) -> Result<(), EngineError> {
        if self.stalled.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(EngineError::CommitStalled {
                seconds: self.stall_after.as_secs(),
            });
        }
        let tx = self.tx.as_ref().ok_or(EngineError::CommitterGone)?;
        let deadline = Instant::now() + self.stall_after;
        loop {
            match tx.try_send(m) {
                Ok(()) => return Ok(()),
                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return Err(EngineError::CommitterGone),
                Err(std::sync::mpsc::TrySendError::Full(back)) => {
                    if Instant::now() >= deadline {
                        return Err(self.stall());
                    }
                    m = back;
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
    }

    fn submit(&self, b: Batch) -> Result<(), EngineError> {
        self.send(ToCommitter::Batch(Box::new(b)))
    }

    /// Waits until every batch handed over is committed.
    fn wait(&self) -> Result<(), EngineError> {
        let (reply, done) = std::sync::mpsc::sync_channel(1);
        self.send(ToCommitter::Wait(reply))?;
        match done.recv_timeout(self.stall_after) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return Err(self.stall()),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(EngineError::CommitterGone),
        }
        self.check()
    }

    fn queue_depth(&self) -> i32 {
        self.queue_depth.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.tx = None;
        let Some(t) = self.thread.take() else { return };
        // A thread stuck inside a Kafka call is left behind, not joined:
        // the next producer with the same transactional id fences it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.finished.load(std::sync::atomic::Ordering::SeqCst) {
            if self.stalled.load(std::sync::atomic::Ordering::SeqCst) || Instant::now() >= deadline {
                tracing::warn!("leaving a stuck committer thread behind; the new producer fences its transaction");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = t.join();
    }
}

/// Sets the flag when dropped (the committer thread's end, however it ends).
struct SetOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// One batch's transaction, then its RocksDB write.
fn commit_batch(
    producer: &TxnProducer,
    store: &Store,
    metrics: &Metrics,
    changelog: &str,
    b: Batch,
) -> Result<(), EngineError> {
    let t0 = Instant::now();
    producer.begin()?;
    for r in b.records {
        producer.send(Outgoing {
            topic: &r.topic,
            key: &r.key,
            payload: r.payload.as_deref(),
            headers: r.headers,
            partition: r.partition,
            timestamp_ms: r.timestamp_ms,
            tag: r.tag,
        })?;
    }
    for (p, ch) in &b.changes {
        for c in ch {
            let key = jobmeter_core::state::changelog::key(c.table, &c.key);
            producer.send(Outgoing {
                topic: changelog,
                key: &key,
                payload: c.value.as_deref(),
                headers: None,
                partition: Some(*p),
                timestamp_ms: None,
                tag: tag_changelog(*p),
            })?;
        }
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, p, o) in &b.offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o)).map_err(|e| {
            EngineError::Kafka(jobmeter_kafka::KafkaAdapterError::Op {
                op: "offsets",
                source: e,
            })
        })?;
    }
    let t_off = Instant::now();
    producer.send_offsets(&tpl, &b.group)?;
    let t_commit = Instant::now();
    let changelog_offsets = producer.commit()?;
    let t1 = Instant::now();
    let steps: Vec<(i32, &[StateChange], Option<i64>)> = b
        .changes
        .iter()
        .map(|(p, ch)| (*p, ch.as_slice(), changelog_offsets.get(p).copied()))
        .collect();
    store.commit_many(&steps)?;
    let step = |name: &str, d: Duration| {
        metrics
            .commit_seconds
            .with_label_values(&[name])
            .observe(d.as_secs_f64())
    };
    step("produce", t_off - t0);
    step("offsets", t_commit - t_off);
    step("commit", t1 - t_commit);
    step("store", t1.elapsed());
    metrics.batch_events.observe(b.events as f64);
    for (p, before, now, open) in &b.stats {
        metrics.add_stats(before, now);
        metrics.open_jobs.with_label_values(&[&p.to_string()]).set(*open as i64);
    }
    for ((limit, threshold), n) in &b.limits_by_label {
        metrics
            .limit_events
            .with_label_values(&[*limit, threshold.as_str()])
            .inc_by(*n);
    }
    for (cause, n) in Reroute::ALL.iter().zip(b.rerouted_by_cause) {
        if n > 0 {
            metrics.rerouted.with_label_values(&[cause.as_str()]).inc_by(n);
        }
    }
    for (i, n) in b.charges_by_kind.iter().enumerate() {
        if *n > 0 {
            metrics
                .charges
                .with_label_values(&[jobmeter_core::JobKind::ALL[i].as_str()])
                .inc_by(*n);
        }
    }
    Ok(())
}

/// Which partition meters an input record that arrived on `arrival`: its
/// account's (Kafka's murmur2 of `data.account_id` over `partitions`), or
/// `arrival` itself for a record that is not a valid event (it is
/// dead-lettered where it arrived). Returns the event when it parsed.
pub(crate) fn route(payload: &[u8], arrival: i32, partitions: i32) -> (i32, Option<jobmeter_core::JobEvent>) {
    match jobmeter_core::parse_job_event(payload) {
        Ok(ev) => (
            jobmeter_core::partition::partition_for_key(ev.account.as_str().as_bytes(), partitions),
            Some(ev),
        ),
        Err(_) => (arrival, None),
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

/// The consumer context: forwards rebalances to the engine, and gives the
/// instance that is assigned input partition `p` repartition partition `p`
/// too (the group assigns the input topic only, so this holds whatever the
/// assignor), at the group's committed offsets for both.
#[derive(Debug)]
pub struct MeterContext {
    /// The engine, shared with the poll loop (which never holds the lock
    /// while polling, so callbacks can take it).
    pub engine: Arc<Mutex<Engine>>,
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

    fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
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
                let mut e = self.engine();
                if let Err(source) = fetched.and(assigned) {
                    // Without the committed positions the lanes cannot be
                    // placed: the pipeline is rebuilt and joins again.
                    e.failed = Some(EngineError::Kafka(jobmeter_kafka::KafkaAdapterError::Op {
                        op: "assigning partitions at their committed offsets",
                        source,
                    }));
                }
                e.on_assign(&full);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.engine().on_revoke(consumer, tpl);
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
