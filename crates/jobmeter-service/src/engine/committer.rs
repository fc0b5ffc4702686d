//! The committer thread: each batch's transaction, then its RocksDB write.

use super::EngineError;
use super::Reroute;
use crate::metrics::Metrics;
use jobmeter_core::state::StateChange;
use jobmeter_core::Stats;
use jobmeter_kafka::txn::{tag_changelog, Outgoing, Transactional};
use jobmeter_store::StateStore;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One output or changelog record, encoded, waiting for its transaction.
pub(super) struct OutRecord {
    pub(super) topic: String,
    pub(super) key: Vec<u8>,
    pub(super) payload: Option<Vec<u8>>,
    pub(super) headers: Option<rdkafka::message::OwnedHeaders>,
    pub(super) partition: Option<i32>,
    pub(super) timestamp_ms: Option<i64>,
    pub(super) tag: usize,
}

/// Everything one transaction carries; `G` is what fences zombies (the
/// consumer group's metadata).
pub(super) struct Batch<G> {
    pub(super) records: Vec<OutRecord>,
    pub(super) changes: Vec<(i32, Vec<StateChange>)>,
    /// Input and repartition offsets: (topic, partition, next offset).
    pub(super) offsets: Vec<(String, i32, i64)>,
    pub(super) group: G,
    pub(super) events: usize,
    /// Per partition: stats reported before, stats now, open jobs.
    pub(super) stats: Vec<(i32, Stats, Stats, usize)>,
    pub(super) charges_by_kind: [u64; 3],
    pub(super) rerouted_by_cause: [u64; 3],
    pub(super) limits_by_label: BTreeMap<(&'static str, String), u64>,
}

pub(super) enum ToCommitter<G> {
    Batch(Box<Batch<G>>),
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
pub(super) struct Committer<G> {
    pub(super) tx: Option<std::sync::mpsc::SyncSender<ToCommitter<G>>>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
    pub(super) failed: Arc<Mutex<Option<EngineError>>>,
    pub(super) queue_depth: Arc<std::sync::atomic::AtomicI32>,
    pub(super) stall_after: Duration,
    /// Set once a stall is detected: later calls fail at once.
    pub(super) stalled: std::sync::atomic::AtomicBool,
    /// Set by the thread when it ends.
    pub(super) finished: Arc<std::sync::atomic::AtomicBool>,
    /// True while the thread commits a batch.
    pub(super) busy: Arc<std::sync::atomic::AtomicBool>,
}

impl<G: Send + 'static> Committer<G> {
    pub(super) fn start<T: Transactional<Group = G>, S: StateStore>(
        producer: T,
        store: Arc<S>,
        metrics: Metrics,
        changelog: String,
        stall_after: Duration,
    ) -> Committer<G> {
        // Capacity 0: a hand-over waits until the committer takes it, so at
        // most one batch is being committed while one is being built.
        let (tx, rx) = std::sync::mpsc::sync_channel::<ToCommitter<G>>(0);
        let failed: Arc<Mutex<Option<EngineError>>> = Arc::default();
        let queue_depth: Arc<std::sync::atomic::AtomicI32> = Arc::default();
        let (f, q) = (failed.clone(), queue_depth.clone());
        let finished: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let done = finished.clone();
        let busy: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let in_commit = busy.clone();
        let thread = std::thread::Builder::new()
            .name("jobmeter-commit".into())
            .spawn(move || {
                let _finished = SetOnDrop(done);
                for msg in rx {
                    match msg {
                        ToCommitter::Batch(b) => {
                            let _idle_after = SetFalseOnDrop(&in_commit);
                            let ok = f.lock().map(|x| x.is_none()).unwrap_or(false);
                            if !ok {
                                continue;
                            }
                            if let Err(e) = commit_batch(&producer, &*store, &metrics, &changelog, *b) {
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
            busy,
        }
    }

    /// True while a batch handed over is being committed: a batch handed
    /// over now would wait for it.
    pub(super) fn busy(&self) -> bool {
        self.busy.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(super) fn stall(&self) -> EngineError {
        self.stalled.store(true, std::sync::atomic::Ordering::SeqCst);
        EngineError::CommitStalled {
            seconds: self.stall_after.as_secs(),
        }
    }

    pub(super) fn check(&self) -> Result<(), EngineError> {
        match self.failed.lock().ok().and_then(|mut f| f.take()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Hands `m` over, waiting at most `stall_after` for the committer to
    /// take it (the channel is a rendezvous: it takes it when idle).
    pub(super) fn send(&self, mut m: ToCommitter<G>) -> Result<(), EngineError> {
        if self.stalled.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(EngineError::CommitStalled {
                seconds: self.stall_after.as_secs(),
            });
        }
        let tx = self.tx.as_ref().ok_or(EngineError::CommitterGone)?;
        let deadline = Instant::now() + self.stall_after;
        let batch = matches!(m, ToCommitter::Batch(_));
        loop {
            // Set before the hand-over, so the pipeline never sees the
            // committer idle while it holds a batch.
            if batch {
                self.busy.store(true, std::sync::atomic::Ordering::Release);
            }
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

    pub(super) fn submit(&self, b: Batch<G>) -> Result<(), EngineError> {
        self.send(ToCommitter::Batch(Box::new(b)))
    }

    /// Waits until every batch handed over is committed.
    pub(super) fn wait(&self) -> Result<(), EngineError> {
        let (reply, done) = std::sync::mpsc::sync_channel(1);
        self.send(ToCommitter::Wait(reply))?;
        match done.recv_timeout(self.stall_after) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return Err(self.stall()),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(EngineError::CommitterGone),
        }
        self.check()
    }

    pub(super) fn queue_depth(&self) -> i32 {
        self.queue_depth.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl<G> Drop for Committer<G> {
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
pub(super) struct SetOnDrop(Arc<std::sync::atomic::AtomicBool>);

/// Clears a flag when dropped (also when a commit panics).
struct SetFalseOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for SetFalseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// One batch's transaction, then its state-store write (the steps of the
/// crash table in `engine/mod.rs`, in order).
pub(super) fn commit_batch<T: Transactional, S: StateStore + ?Sized>(
    producer: &T,
    store: &S,
    metrics: &Metrics,
    changelog: &str,
    mut b: Batch<T::Group>,
) -> Result<(), EngineError> {
    let t0 = Instant::now();
    producer.begin()?;
    send_records(producer, changelog, std::mem::take(&mut b.records), &b.changes)?;
    let tpl = offsets_of(&b)?;
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
            .commit
            .commit_seconds
            .with_label_values(&[name])
            .observe(d.as_secs_f64())
    };
    step("produce", t_off - t0);
    step("offsets", t_commit - t_off);
    step("commit", t1 - t_commit);
    step("store", t1.elapsed());
    committed(metrics, &b);
    Ok(())
}

/// The batch's outputs, then its changelog records (the local indexes go
/// to the store only), into the open transaction.
fn send_records<T: Transactional>(
    producer: &T,
    changelog: &str,
    records: Vec<OutRecord>,
    changes: &[(i32, Vec<StateChange>)],
) -> Result<(), EngineError> {
    for r in records {
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
    let mut key = Vec::new();
    for (p, ch) in changes {
        for c in ch.iter().filter(|c| !c.table.is_local()) {
            jobmeter_kafka::changelog::key_into(&mut key, c.table, &c.key);
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
    Ok(())
}

/// The input offsets the batch reaches, as the transaction commits them.
fn offsets_of<G>(b: &Batch<G>) -> Result<TopicPartitionList, EngineError> {
    let mut tpl = TopicPartitionList::new();
    for (topic, p, o) in &b.offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o)).map_err(|e| {
            EngineError::Kafka(jobmeter_kafka::KafkaAdapterError::Op {
                op: "offsets",
                source: e,
            })
        })?;
    }
    Ok(tpl)
}

/// A batch is committed: the offsets the usage API reports, and the
/// counters it adds to.
fn committed<G>(metrics: &Metrics, b: &Batch<G>) {
    {
        let mut committed = metrics
            .committed
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (topic, p, o) in &b.offsets {
            committed.insert((topic.clone(), *p), *o);
        }
    }
    metrics.commit.batch_events.observe(b.events as f64);
    for (p, before, now, open) in &b.stats {
        metrics.add_stats(before, now);
        metrics
            .billing
            .open_jobs
            .with_label_values(&[&p.to_string()])
            .set(*open as i64);
    }
    for ((limit, threshold), n) in &b.limits_by_label {
        metrics
            .billing
            .limit_events
            .with_label_values(&[*limit, threshold.as_str()])
            .inc_by(*n);
    }
    for (cause, n) in Reroute::ALL.iter().zip(b.rerouted_by_cause) {
        if n > 0 {
            metrics.input.rerouted.with_label_values(&[cause.as_str()]).inc_by(n);
        }
    }
    for (i, n) in b.charges_by_kind.iter().enumerate() {
        if *n > 0 {
            metrics
                .billing
                .charges
                .with_label_values(&[jobmeter_core::JobKind::ALL[i].as_str()])
                .inc_by(*n);
        }
    }
}

/// The crash table of `engine/mod.rs`, step by step: a producer that fails
/// a chosen step of the transaction and an in-memory store that fails its
/// write stand in for Kafka and RocksDB, and each test asserts what a
/// restart would see (records visible to `read_committed` readers, the
/// group's committed offsets, and the state the restore rebuilds).
#[cfg(test)]
mod tests {
    use super::super::restore::CatchUp;
    use super::*;
    use jobmeter_core::state::Table;
    use jobmeter_kafka::reader::Record;
    use jobmeter_kafka::txn::{TxnError, TAG_OUTPUT};
    use jobmeter_store::MemStore;
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use std::collections::HashMap;

    const CHANGELOG: &str = "t.changelog";

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Step {
        Begin,
        Send,
        SendOffsets,
        Commit,
    }

    /// One produced record: topic, partition, offset, key, value.
    type Rec = (String, i32, i64, Vec<u8>, Option<Vec<u8>>);

    /// One record of the open transaction: topic, partition, key, value.
    type Pending = (String, i32, Vec<u8>, Option<Vec<u8>>);

    /// What the fake broker holds.
    #[derive(Debug, Default)]
    struct Broker {
        open: Vec<Pending>,
        open_offsets: Vec<(String, i32, i64)>,
        /// Committed records, as `read_committed` readers see them.
        visible: Vec<Rec>,
        /// The group's committed offsets.
        committed: BTreeMap<(String, i32), i64>,
        next_offset: HashMap<(String, i32), i64>,
        begins: usize,
        aborts: usize,
    }

    #[derive(Debug, Clone)]
    struct FakeTxn {
        broker: Arc<Mutex<Broker>>,
        fail_at: Arc<Mutex<Option<Step>>>,
        /// Held by a test to keep a commit from finishing.
        gate: Arc<Mutex<()>>,
    }

    impl FakeTxn {
        fn new() -> FakeTxn {
            FakeTxn {
                broker: Arc::default(),
                fail_at: Arc::default(),
                gate: Arc::default(),
            }
        }

        fn fail(&self, step: Option<Step>) {
            *self.fail_at.lock().expect("lock") = step;
        }

        fn step(&self, s: Step) -> Result<(), TxnError> {
            if *self.fail_at.lock().expect("lock") == Some(s) {
                return Err(TxnError::Abortable(KafkaError::MessageProduction(
                    RDKafkaErrorCode::Fail,
                )));
            }
            Ok(())
        }

        fn broker(&self) -> std::sync::MutexGuard<'_, Broker> {
            self.broker.lock().expect("lock")
        }
    }

    impl Transactional for FakeTxn {
        type Group = ();

        fn begin(&self) -> Result<(), TxnError> {
            self.step(Step::Begin)?;
            let mut b = self.broker();
            b.open.clear();
            b.open_offsets.clear();
            b.begins += 1;
            Ok(())
        }

        fn send(&self, out: Outgoing<'_>) -> Result<(), TxnError> {
            self.step(Step::Send)?;
            let partition = out.partition.unwrap_or(0);
            self.broker().open.push((
                out.topic.to_owned(),
                partition,
                out.key.to_vec(),
                out.payload.map(<[u8]>::to_vec),
            ));
            Ok(())
        }

        fn send_offsets(&self, offsets: &TopicPartitionList, _: &()) -> Result<(), TxnError> {
            self.step(Step::SendOffsets)?;
            let mut b = self.broker();
            for e in offsets.elements() {
                let o = e.offset().to_raw().expect("an offset");
                b.open_offsets.push((e.topic().to_owned(), e.partition(), o));
            }
            Ok(())
        }

        fn commit(&self) -> Result<HashMap<i32, i64>, TxnError> {
            let _gate = self.gate.lock().expect("gate");
            self.step(Step::Commit)?;
            let mut b = self.broker();
            let mut changelog = HashMap::new();
            for (topic, p, k, v) in std::mem::take(&mut b.open) {
                let next = b.next_offset.entry((topic.clone(), p)).or_insert(0);
                let o = *next;
                *next += 1;
                if topic == CHANGELOG {
                    changelog.insert(p, o);
                }
                b.visible.push((topic, p, o, k, v));
            }
            for (topic, p, o) in std::mem::take(&mut b.open_offsets) {
                b.committed.insert((topic, p), o);
            }
            Ok(changelog)
        }

        fn abort(&self) -> Result<(), TxnError> {
            let mut b = self.broker();
            b.open.clear();
            b.open_offsets.clear();
            b.aborts += 1;
            Ok(())
        }

        fn in_flight(&self) -> i32 {
            0
        }
    }

    fn metrics() -> Metrics {
        Metrics::new(&prometheus::Registry::new()).expect("metrics")
    }

    /// A batch of partition 0: one charge, two state upserts and a delete,
    /// input offsets up to `next_input`.
    fn batch(n: u8, next_input: i64) -> Batch<()> {
        let change = |k: &str, v: Option<&str>| StateChange {
            table: Table::Jobs,
            key: k.as_bytes().to_vec(),
            value: v.map(|v| v.as_bytes().to_vec()),
        };
        Batch {
            records: vec![OutRecord {
                topic: "t.charges".into(),
                key: b"acct".to_vec(),
                payload: Some(format!("charge-{n}").into_bytes()),
                headers: None,
                partition: Some(0),
                timestamp_ms: None,
                tag: TAG_OUTPUT,
            }],
            changes: vec![(
                0,
                vec![
                    change(&format!("job-{n}"), Some("open")),
                    change("account", Some(&format!("total-{n}"))),
                    change(&format!("job-{}", n.wrapping_sub(1)), None),
                ],
            )],
            offsets: vec![("t.job-events".into(), 0, next_input)],
            group: (),
            events: 1,
            stats: Vec::new(),
            charges_by_kind: [0; 3],
            rerouted_by_cause: [0; 3],
            limits_by_label: BTreeMap::new(),
        }
    }

    /// What a restart rebuilds for partition 0: the store, caught up with
    /// the committed changelog records after the offset it reflects (the
    /// restore's own code).
    fn restart_state(txn: &FakeTxn, store: &MemStore) -> BTreeMap<(Table, Vec<u8>), Vec<u8>> {
        let mut up = CatchUp::new(store.load(0).expect("load"));
        let from = up.from.unwrap_or(0);
        let records: Vec<Record> = txn
            .broker()
            .visible
            .iter()
            .filter(|(t, p, o, _, _)| t == CHANGELOG && *p == 0 && *o >= from)
            .map(|(_, p, o, k, v)| Record {
                partition: *p,
                offset: *o,
                key: Some(k.clone()),
                value: v.clone(),
                headers: Vec::new(),
                timestamp_ms: None,
            })
            .collect();
        for r in records {
            up.record(r);
        }
        up.map
    }

    fn charges(txn: &FakeTxn) -> Vec<String> {
        txn.broker()
            .visible
            .iter()
            .filter(|(t, ..)| t == "t.charges")
            .map(|(.., v)| String::from_utf8_lossy(v.as_deref().unwrap_or_default()).into_owned())
            .collect()
    }

    fn committed_input(txn: &FakeTxn) -> Option<i64> {
        txn.broker().committed.get(&("t.job-events".to_owned(), 0)).copied()
    }

    /// The state of batches `0..=n` applied in order.
    fn state_after(n: u8) -> BTreeMap<(Table, Vec<u8>), Vec<u8>> {
        let store = MemStore::new();
        for i in 0..=n {
            let b = batch(i, 0);
            let steps: Vec<(i32, &[StateChange], Option<i64>)> =
                b.changes.iter().map(|(p, c)| (*p, c.as_slice(), None)).collect();
            store.commit_many(&steps).expect("write");
        }
        CatchUp::new(store.load(0).expect("load")).map
    }

    #[test]
    fn a_committed_batch_is_visible_once_and_stored_with_its_changelog_offset() {
        let (txn, store) = (FakeTxn::new(), MemStore::new());
        commit_batch(&txn, &store, &metrics(), CHANGELOG, batch(0, 10)).expect("commit");
        commit_batch(&txn, &store, &metrics(), CHANGELOG, batch(1, 20)).expect("commit");
        assert_eq!(charges(&txn), ["charge-0", "charge-1"]);
        assert_eq!(committed_input(&txn), Some(20));
        let st = store.load(0).expect("load");
        assert_eq!(st.changelog_offset, Some(5), "six changelog records, offsets 0..=5");
        assert_eq!(CatchUp::new(st).map, state_after(1));
        assert_eq!(restart_state(&txn, &store), state_after(1), "nothing left to replay");
    }

    /// Dies while producing, after `send_offsets`, or in the commit:
    /// nothing is visible, the offsets do not move (the input is read
    /// again), the store is untouched.
    #[test]
    fn a_failure_before_the_commit_leaves_nothing_a_restart_would_see() {
        for step in [Step::Begin, Step::Send, Step::SendOffsets, Step::Commit] {
            let (txn, store) = (FakeTxn::new(), MemStore::new());
            commit_batch(&txn, &store, &metrics(), CHANGELOG, batch(0, 10)).expect("commit");
            txn.fail(Some(step));
            let err = commit_batch(&txn, &store, &metrics(), CHANGELOG, batch(1, 20));
            assert!(matches!(err, Err(EngineError::Txn(_))), "{step:?}: {err:?}");
            txn.abort().expect("abort");
            assert_eq!(charges(&txn), ["charge-0"], "{step:?}");
            assert_eq!(
                committed_input(&txn),
                Some(10),
                "{step:?}: the input resumes at batch 1"
            );
            assert_eq!(restart_state(&txn, &store), state_after(0), "{step:?}");
            // The replay after the restart commits batch 1 once.
            txn.fail(None);
            commit_batch(&txn, &store, &metrics(), CHANGELOG, batch(1, 20)).expect("commit");
            assert_eq!(charges(&txn), ["charge-0", "charge-1"], "{step:?}");
            assert_eq!(restart_state(&txn, &store), state_after(1), "{step:?}");
        }
    }

    /// Dies after the commit, before (or during) the store write: Kafka has
    /// the batch, the store is one batch behind, and the restore catches it
    /// up from the changelog; the input resumes after the batch.
    #[test]
    fn a_failure_after_the_commit_is_caught_up_from_the_changelog() {
        let (txn, store) = (FakeTxn::new(), MemStore::new());
        commit_batch(&txn, &store, &metrics(), CHANGELOG, batch(0, 10)).expect("commit");
        store.fail_writes(true);
        let err = commit_batch(&txn, &store, &metrics(), CHANGELOG, batch(1, 20));
        assert!(matches!(err, Err(EngineError::Store(_))), "{err:?}");
        assert_eq!(charges(&txn), ["charge-0", "charge-1"]);
        assert_eq!(committed_input(&txn), Some(20), "batch 1 is not read again");
        let st = store.load(0).expect("load");
        assert_eq!(st.changelog_offset, Some(2), "the store is one batch behind");
        assert_eq!(CatchUp::new(st).map, state_after(0));
        assert_eq!(restart_state(&txn, &store), state_after(1));
    }

    /// A committer thread over a fake broker and an in-memory store.
    fn committer() -> (FakeTxn, Arc<MemStore>, Committer<()>) {
        let (txn, store) = (FakeTxn::new(), Arc::new(MemStore::new()));
        let c = Committer::start(
            txn.clone(),
            store.clone(),
            metrics(),
            CHANGELOG.into(),
            Duration::from_secs(5),
        );
        (txn, store, c)
    }

    /// The pipeline lets a batch grow while the committer is busy: busy
    /// from the hand-over until the commit and store write are done.
    #[test]
    fn the_committer_is_busy_exactly_while_it_commits() {
        let (txn, _store, c) = committer();
        assert!(!c.busy());
        let held = txn.gate.lock().expect("gate");
        c.submit(batch(0, 10)).expect("hand over");
        assert!(c.busy(), "handed over, not committed");
        std::thread::sleep(Duration::from_millis(50));
        assert!(c.busy(), "the commit cannot finish");
        drop(held);
        c.wait().expect("committed");
        assert!(!c.busy());
        assert_eq!(charges(&txn), ["charge-0"]);
    }

    /// The committer thread aborts a failed batch and refuses every later
    /// one; the pipeline learns of the failure at its next hand-over.
    #[test]
    fn the_committer_aborts_a_failed_batch_and_refuses_later_ones() {
        let (txn, store, c) = committer();
        c.submit(batch(0, 10)).expect("hand over");
        c.wait().expect("committed");
        txn.fail(Some(Step::Send));
        c.submit(batch(1, 20)).expect("hand over");
        // Taken once the failed one is done (a rendezvous), then skipped.
        c.submit(batch(2, 30)).expect("hand over");
        let err = c.wait();
        assert!(matches!(err, Err(EngineError::Txn(_))), "{err:?}");
        assert_eq!(txn.broker().begins, 2, "batch 2 never began");
        assert_eq!(txn.broker().aborts, 1);
        assert_eq!(charges(&txn), ["charge-0"]);
        assert_eq!(committed_input(&txn), Some(10));
        assert_eq!(restart_state(&txn, &store), state_after(0));
    }
}
