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
//! The committer's unit tests (`committer.rs`) fail each step on purpose,
//! through the [`jobmeter_kafka::txn::Transactional`] and
//! [`jobmeter_store::StateStore`] seams, and assert what a restart sees.
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
//! ## Files
//! `mod.rs` takes records and applies them; `routing.rs` decides which
//! partition meters a record (and forwards it when another instance holds
//! that partition); `batch.rs` encodes outputs and hands each batch over;
//! `committer.rs` runs its transaction and store write; `restore.rs` loads
//! a partition; `rebalance.rs` handles assignments and revocations.
//!
//! ## Pipelining
//! The steps after "apply" run on a committer thread, one batch at a time
//! and in order, while the pipeline thread applies the next batch's events
//! to its in-memory meters. Each batch is still exactly one transaction
//! followed by one RocksDB write, so the table above holds per batch. If a
//! commit fails, the committer aborts it and refuses later batches; the
//! pipeline then discards its in-memory meters (which may be ahead of what
//! was committed) and is rebuilt from durable state, as after a crash.

mod batch;
mod committer;
mod merge;
mod rebalance;
mod restore;
mod routing;

pub use rebalance::{MeterContext, Rebalance};
pub use restore::{overlay, StateMap};
pub use routing::route;

use super::metrics::Metrics;
use committer::Committer;
use committer::OutRecord;
use jobmeter_core::archive::ArchiveError;
use jobmeter_core::fasthash::FastMap;
use jobmeter_core::{ApplyError, Context, Meter, MeterConfig, Origin, Output, PlanCatalog, RateCard, Stats};
use jobmeter_kafka::client::KafkaSettings;
use jobmeter_kafka::partitioner::partition_for_key;
use jobmeter_kafka::repartition::{is_marker, Lane, Source};
use jobmeter_kafka::topics::Topics;
use jobmeter_kafka::txn::{TxnError, TxnProducer};
use jobmeter_store::Store;
use rdkafka::message::Message;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
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
    /// A restore worker thread panicked.
    #[error("a restore thread panicked")]
    RestorePanicked,
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
    /// A finished job could not be read back from the store; the open
    /// batch is dropped and the pipeline rebuilt from durable state.
    #[error("{0}")]
    Archive(#[from] jobmeter_core::archive::ArchiveError),
    /// An account's records could not be read from the store; the open
    /// batch is dropped and the pipeline rebuilt.
    #[error("accounts: {0}")]
    Accounts(#[from] jobmeter_core::LookupError),
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
    /// Finished jobs live in the store, not in memory (`state.finished_jobs`).
    pub archive: bool,
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
    /// The accounts of the owned partitions and the pro subscribers.
    pub accounts: Arc<crate::accounts::StoredAccounts>,
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
    committer: Committer<rdkafka::consumer::ConsumerGroupMetadata>,
    store: Arc<Store>,
    metrics: Metrics,
    meters: FastMap<i32, PartitionMeter>,
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
    lanes: FastMap<i32, Lane>,
    records: Vec<OutRecord>,
    charges_by_kind: [u64; 3],
    rerouted_by_cause: [u64; 3],
    /// When each cause of rerouting was last logged.
    reroute_logged: [Option<Instant>; 3],
    limits_by_label: BTreeMap<(&'static str, String), u64>,
    out: Vec<Output>,
    input_topic: Arc<str>,
    repartition_topic: Arc<str>,
    /// Records forwarded from here are pricing adjustments.
    adjustments_topic: Arc<str>,
    /// Per (meter, input partition read elsewhere): the records forwarded
    /// from there and what its forwarder said (see `merge.rs`).
    remote: BTreeMap<(i32, i32), merge::Remote>,
    /// Per meter: the repartition offsets read and waiting to be applied.
    rp_pending: HashMap<i32, BTreeSet<i64>>,
    /// Per meter: the next repartition offset to read.
    rp_read: HashMap<i32, i64>,
    /// Meters whose repartition partition was read to its end since they
    /// were assigned.
    rp_at_end: BTreeSet<i32>,
    /// Meters whose merge bookkeeping changed since the last commit.
    remote_dirty: BTreeSet<i32>,
    /// What the poll loop says of the input partitions it reads (bound,
    /// caught up), and what was last written as progress.
    sources: BTreeMap<i32, (i64, bool)>,
    published: BTreeMap<i32, (i64, bool)>,
    /// When progress was last written.
    progress_at: Instant,
    /// An error raised inside a rebalance callback, surfaced by the loop.
    pub failed: Option<EngineError>,
    /// The account ids of the events read ahead, shared between events.
    pub(crate) account_ids: jobmeter_core::AccountIds,
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
            adjustments_topic: cfg.topics.adjustments.as_str().into(),
            cfg,
            billing,
            committer,
            store,
            metrics,
            meters: FastMap::default(),
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
            lanes: FastMap::default(),
            records: Vec::new(),
            charges_by_kind: [0; 3],
            rerouted_by_cause: [0; 3],
            account_ids: jobmeter_core::AccountIds::default(),
            reroute_logged: [None; 3],
            limits_by_label: BTreeMap::new(),
            out: Vec::new(),
            remote: BTreeMap::new(),
            rp_pending: HashMap::new(),
            rp_read: HashMap::new(),
            rp_at_end: BTreeSet::new(),
            remote_dirty: BTreeSet::new(),
            sources: BTreeMap::new(),
            published: BTreeMap::new(),
            progress_at: Instant::now(),
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

    /// True when `p`'s stored state cannot be decoded (it is not metered).
    pub fn is_failing(&self, p: i32) -> bool {
        self.failing_read().contains_key(&p)
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
        self.process_read(msg, parsed, false)
    }

    /// [`Engine::process_parsed`] for an input record read ahead by the
    /// merge: `forwarded` when [`Engine::forward_ahead`] forwarded it
    /// already (then only its partition's bookkeeping is left to do).
    pub fn process_read<M: Message>(
        &mut self,
        msg: &M,
        parsed: Option<jobmeter_core::JobEvent>,
        forwarded: bool,
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
        self.metrics.input.consumed.inc();
        if msg.topic() == &*self.repartition_topic {
            return self.process_forwarded(msg, parsed);
        }
        let o = msg.offset();
        let record_time = msg.timestamp().to_millis().map(jobmeter_core::Timestamp);
        let payload = msg.payload().unwrap_or_default();
        self.next_offsets.insert(p, o + 1);
        let target = parsed.as_ref().map_or(p, |ev| self.owner(ev));
        // Every record read moves its partition's input watermark, wherever
        // it is applied (the merge keys of the partition's later records).
        let merge_time = parsed
            .as_ref()
            .and_then(|ev| jobmeter_core::order::merge_time(&self.cfg.meter, ev.time, record_time));
        let watermark = self.meters.get_mut(&p).and_then(|pm| {
            if let Some(t) = merge_time {
                pm.meter.raise_input_watermark(t);
            }
            pm.meter.input_watermark()
        });
        let origin = Origin {
            topic: self.input_topic.clone(),
            partition: p,
            offset: o,
            record_time,
        };
        if target == p {
            self.lane(p, o).applied(Source::Own, o);
            return self.apply(p, payload, parsed, &origin, msg.key());
        }
        self.lane(p, o).passed_on(o);
        let Some(ev) = parsed else { return Ok(()) };
        if forwarded {
            return Ok(());
        }
        self.note_rerouted(msg, &ev, target);
        if self.local(target)? {
            if !self.first_from(target, p, o) {
                // Forwarded before this instance held `target`, and applied
                // from there.
                return Ok(());
            }
            self.lane(target, 0).applied(Source::Input(p), o);
            self.apply(target, payload, Some(ev), &origin, msg.key())
        } else {
            self.forward(msg, &ev, target, watermark);
            Ok(())
        }
    }

    /// A record another instance forwarded to partition `p` (local), read
    /// from `p`'s repartition partition: applied to `p`'s meter unless it
    /// is a marker or a progress report.
    fn process_forwarded<M: Message>(
        &mut self,
        msg: &M,
        parsed: Option<jobmeter_core::JobEvent>,
    ) -> Result<(), EngineError> {
        let (p, o) = (msg.partition(), msg.offset());
        let record_time = msg.timestamp().to_millis().map(jobmeter_core::Timestamp);
        self.next_rp_offsets.insert(p, o + 1);
        if is_marker(msg.headers()) || jobmeter_kafka::repartition::is_progress(msg.headers()) {
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
        // A run of forwarded records must not cover one still waiting.
        let pending = self
            .lanes
            .get(&p)
            .and_then(Lane::last_run_end)
            .is_some_and(|to| self.rp_waiting(p, to, o));
        self.lane(p, o).applied_unless(Source::Forwarded, o, |_| pending);
        self.apply(p, msg.payload().unwrap_or_default(), parsed, &origin, msg.key())
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
            let book: &dyn jobmeter_core::Accounts = &*self.billing.accounts;
            let ctx = Context::new(&self.billing.rates, &self.billing.plans, book, &self.cfg.meter).with_partition(
                p,
                self.cfg.input_partitions,
                partition_for_key,
            );
            if let Some(pm) = self.meters.get_mut(&p) {
                let applied = match parsed {
                    Some(ev) => pm.meter.apply_event(&ctx, ev, payload, Some(origin), &mut self.out),
                    None if origin.topic == self.adjustments_topic => {
                        self.metrics.input.adjustments.inc();
                        pm.meter.apply_adjustment(&ctx, payload, Some(origin), &mut self.out)
                    }
                    None => pm.meter.apply(&ctx, payload, Some(origin), &mut self.out),
                };
                // A fact the meter needs could not be read: the open batch
                // (which holds the other partitions' work too, in one
                // Kafka transaction) is dropped and the pipeline rebuilt
                // from durable state. What cannot be decoded marks the
                // partition first, so that the rebuilt pipeline sets only
                // it aside (like a record found at restore) and the others
                // go on; a failed read is retried by the rebuild.
                match applied {
                    Ok(()) => {}
                    Err(ApplyError::Archive(ArchiveError::Corrupt(e))) => {
                        self.store.mark_corrupt(p, &e.to_string())?;
                        return Err(EngineError::State(e));
                    }
                    Err(ApplyError::Lookup(e)) if e.corrupt => {
                        self.store.mark_corrupt(p, &e.to_string())?;
                        return Err(e.into());
                    }
                    Err(ApplyError::Lookup(e)) => return Err(e.into()),
                    Err(ApplyError::Archive(e)) => return Err(e.into()),
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

    /// Updates the gauges that need no network call.
    pub fn report_local(&self) {
        self.metrics.state.store_bytes.set(self.store.size_bytes() as i64);
        self.metrics.set_producer_queue(i64::from(self.committer.queue_depth()));
    }
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

impl From<crate::accounts::CatchUpError> for EngineError {
    fn from(e: crate::accounts::CatchUpError) -> Self {
        match e {
            crate::accounts::CatchUpError::Kafka(k) => EngineError::Kafka(k),
            crate::accounts::CatchUpError::Store(s) => EngineError::Store(s),
        }
    }
}
