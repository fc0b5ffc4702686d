//! The committer thread: each batch's transaction, then its RocksDB write.

use super::batch::OutRecord;
use super::routing::Reroute;
use super::EngineError;
use crate::service::metrics::Metrics;
use jobmeter_core::state::StateChange;
use jobmeter_core::Stats;
use jobmeter_kafka::txn::{tag_changelog, Outgoing, TxnProducer};
use jobmeter_store::Store;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Everything one transaction carries.
pub(super) struct Batch {
    pub(super) records: Vec<OutRecord>,
    pub(super) changes: Vec<(i32, Vec<StateChange>)>,
    /// Input and repartition offsets: (topic, partition, next offset).
    pub(super) offsets: Vec<(String, i32, i64)>,
    pub(super) group: rdkafka::consumer::ConsumerGroupMetadata,
    pub(super) events: usize,
    /// Per partition: stats reported before, stats now, open jobs.
    pub(super) stats: Vec<(i32, Stats, Stats, usize)>,
    pub(super) charges_by_kind: [u64; 3],
    pub(super) rerouted_by_cause: [u64; 3],
    pub(super) limits_by_label: BTreeMap<(&'static str, String), u64>,
}

pub(super) enum ToCommitter {
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
pub(super) struct Committer {
    pub(super) tx: Option<std::sync::mpsc::SyncSender<ToCommitter>>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
    pub(super) failed: Arc<Mutex<Option<EngineError>>>,
    pub(super) queue_depth: Arc<std::sync::atomic::AtomicI32>,
    pub(super) stall_after: Duration,
    /// Set once a stall is detected: later calls fail at once.
    pub(super) stalled: std::sync::atomic::AtomicBool,
    /// Set by the thread when it ends.
    pub(super) finished: Arc<std::sync::atomic::AtomicBool>,
}

impl Committer {
    pub(super) fn start(
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
    pub(super) fn send(&self, mut m: ToCommitter) -> Result<(), EngineError> {
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

    pub(super) fn submit(&self, b: Batch) -> Result<(), EngineError> {
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
pub(super) struct SetOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// One batch's transaction, then its RocksDB write.
pub(super) fn commit_batch(
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
