//! The pipeline thread: a consumer and an engine, rebuilt from durable
//! state after any failure, and the poll loop that hands records to the
//! engine in the merge order of [`jobmeter_core::order`] across the
//! partitions it reads.

use super::engine::{Engine, EngineConfig, EngineError, MeterContext, Rebalance};
use super::Deps;
use jobmeter_kafka::topics::partition_count;
use jobmeter_kafka::txn::TxnProducer;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Runs one pipeline until `stop` is cancelled. A failure rebuilds the
/// pipeline from durable state after a backoff (doubling to 15 s); it
/// never ends the pipeline, so this returns only on stop.
pub(super) fn pipeline_loop(deps: &Deps, stop: &CancellationToken, ready: &AtomicBool) {
    let mut backoff = Duration::from_millis(500);
    loop {
        match run_pipeline(deps, stop, ready) {
            Ok(()) => return,
            Err(e) => {
                ready.store(false, Ordering::SeqCst);
                deps.metrics.restarts.inc();
                tracing::error!(error = %e, backoff_ms = backoff.as_millis() as u64, "pipeline failed; rebuilding it from durable state");
                let until = Instant::now() + backoff;
                while Instant::now() < until {
                    if stop.is_cancelled() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                backoff = (backoff * 2).min(Duration::from_secs(15));
            }
        }
    }
}

/// Stops fetching partitions whose state cannot be restored.
fn pause_failed<C: rdkafka::consumer::ConsumerContext>(consumer: &BaseConsumer<C>, topics: &[&str], parts: Vec<i32>) {
    if parts.is_empty() {
        return;
    }
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in &parts {
        for topic in topics {
            tpl.add_partition(topic, *p);
        }
    }
    if let Err(e) = consumer.pause(&tpl) {
        tracing::warn!(error = %e, partitions = ?parts, "could not pause failing partitions; their records are skipped");
    }
}

fn run_pipeline(deps: &Deps, stop: &CancellationToken, ready: &AtomicBool) -> Result<(), EngineError> {
    let cfg = &deps.cfg;
    let txn_timeout = cfg.kafka.transaction_timeout.std();
    let producer = TxnProducer::new(&deps.settings, &cfg.transactional_id(), txn_timeout)?;
    let ecfg = EngineConfig {
        topics: deps.topics.clone(),
        settings: deps.settings.clone(),
        instance_id: cfg.instance_id.clone(),
        batch_max_events: cfg.batch.max_events,
        batch_interval: cfg.batch.interval.std(),
        meter: cfg.meter_config(),
        archive: cfg.state.finished_jobs == super::config::FinishedJobs::Store,
        max_local_age: cfg.state.max_local_age.std(),
        restore_deadline: txn_timeout * 4,
        commit_stall_after: txn_timeout * 4,
        input_partitions: match deps.input_partitions.load(Ordering::Relaxed) {
            0 => partition_count(&deps.settings, &deps.topics.job_events)?,
            n => n,
        },
    };
    let engine = Engine::new(
        ecfg,
        deps.billing.clone(),
        producer,
        deps.store.clone(),
        deps.metrics.clone(),
        deps.owned.clone(),
        deps.failing.clone(),
    );
    let engine = Arc::new(Mutex::new(engine));
    let consumer: Arc<BaseConsumer<MeterContext>> = Arc::new(
        deps.settings
            .group_consumer(
                &cfg.kafka.group_id,
                &jobmeter_kafka::group::member_client_id(&cfg.instance_id, &cfg.advertised_url()),
            )
            // End-of-partition events tell the merge below that a partition
            // has nothing more to offer for now.
            .set("enable.partition.eof", "true")
            // Static membership: an instance restarted under its id (after
            // a crash, an upgrade) takes its partitions back at once,
            // without a rebalance that would hand them to others meanwhile;
            // the old incarnation, if alive, is fenced.
            .set("group.instance.id", &cfg.instance_id)
            .create_with_context(MeterContext {
                engine: engine.clone() as Arc<Mutex<dyn Rebalance>>,
                input_topic: deps.topics.job_events.clone(),
                repartition_topic: deps.topics.repartition.clone(),
            })
            .map_err(|source| jobmeter_kafka::KafkaAdapterError::Client {
                what: "consumer",
                source,
            })?,
    );
    consumer
        .subscribe(&[&deps.topics.job_events])
        .map_err(|source| jobmeter_kafka::KafkaAdapterError::Op {
            op: "subscribe",
            source,
        })?;
    let lock = || engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let result = loop {
        // One round per assignment: each assigned partition's input and
        // repartition records get their own queue, and the loop hands the
        // engine the queued record with the smallest timestamp first.
        match merge_round(deps, &consumer, &lock, stop, ready) {
            Ok(true) => continue,
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    if result.is_err() {
        lock().abort();
    }
    ready.store(false, Ordering::SeqCst);
    deps.metrics.set_ready(false);
    // The next incarnation retries every partition it is given. Other
    // pipelines of the instance keep theirs.
    let mine = lock().assigned().clone();
    deps.failing
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|p, _| !mine.contains(p));
    deps.owned
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|p| !mine.contains(p));
    deps.metrics.set_assigned(0);
    consumer.unsubscribe();
    drop(consumer);
    result
}

/// When the poll loop last did its periodic chores.
struct Chores {
    report: Instant,
    resume: Instant,
}

impl Chores {
    fn new() -> Chores {
        Chores {
            report: Instant::now(),
            resume: Instant::now(),
        }
    }
}

/// How often the poll loop resumes every partition it meters.
const RESUME_EVERY: Duration = Duration::from_secs(1);

/// Resumes every partition this pipeline meters (both topics; not the
/// failing ones, which stay paused). A no-op for a partition that is not
/// paused. It repairs a race in librdkafka: `resume` skips a partition
/// whose pause (from the rebalance callback, a moment before) has not
/// been applied yet, and the pause then holds for good — the partition
/// never fetches again and nothing reports it (seen on a backlog: one
/// partition of six left 84,546 events unread for six minutes, every
/// pipeline ready).
fn keep_resumed(deps: &Deps, consumer: &BaseConsumer<MeterContext>, e: &Engine) {
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in e.assigned().iter().filter(|p| !e.is_failing(**p)) {
        tpl.add_partition(&deps.topics.job_events, *p);
        tpl.add_partition(&deps.topics.repartition, *p);
    }
    if tpl.count() > 0 {
        if let Err(err) = consumer.resume(&tpl) {
            tracing::warn!(error = %err, "could not resume the metered partitions");
        }
    }
}

/// What every turn of the poll loop ends with: readiness, pausing newly
/// failed partitions, committing a due batch, the local gauges, keeping
/// the metered partitions resumed.
fn after_step(
    deps: &Deps,
    consumer: &BaseConsumer<MeterContext>,
    e: &mut Engine,
    ready: &AtomicBool,
    chores: &mut Chores,
) -> Result<(), EngineError> {
    ready.store(e.ready(), Ordering::SeqCst);
    pause_failed(
        consumer,
        &[&deps.topics.job_events, &deps.topics.repartition],
        e.take_newly_failed(),
    );
    if e.batch_due() {
        e.commit(consumer)?;
    }
    if chores.report.elapsed() > Duration::from_secs(5) {
        e.report_local();
        chores.report = Instant::now();
    }
    if chores.resume.elapsed() > RESUME_EVERY {
        keep_resumed(deps, consumer, e);
        chores.resume = Instant::now();
    }
    Ok(())
}

/// How often the merge asks the broker where an idle partition ends.
const HW_CHECK_EVERY: Duration = Duration::from_millis(500);

/// True when partition `p` of `topic` holds nothing this consumer has not
/// read: it is empty, or the position is at its high watermark (asked of
/// the broker). False when either is unknown.
fn read_to_end(consumer: &BaseConsumer<MeterContext>, pos: &rdkafka::TopicPartitionList, topic: &str, p: i32) -> bool {
    let Ok((low, high)) = consumer.fetch_watermarks(topic, p, Duration::from_millis(500)) else {
        return false;
    };
    let position = pos.find_partition(topic, p).and_then(|x| x.offset().to_raw());
    low >= high || position.is_some_and(|pos| pos >= 0 && pos >= high)
}

/// After this long in a merge round, a repartition partition counts as
/// read to its end even if its end was never reported.
const RP_END_AFTER: Duration = Duration::from_secs(2);

/// How long the merge waits for one partition before it says so in the
/// log (then once per [`WAIT_LOG_EVERY`] while the wait goes on).
const WAIT_LOG_AFTER: Duration = Duration::from_secs(5);
/// See [`WAIT_LOG_AFTER`].
const WAIT_LOG_EVERY: Duration = Duration::from_secs(30);

/// The queue the merge is waiting for, since when, and when that was last
/// counted and logged.
struct Waiting {
    queue: usize,
    since: Instant,
    counted: Instant,
    logged: Option<Instant>,
}

impl Waiting {
    /// The merge goes on: the time since the wait was last counted is
    /// counted too (a wait that one fetch ends is still a wait).
    fn end(slot: &mut Option<Waiting>, deps: &Deps) {
        if let Some(w) = slot.take() {
            deps.metrics
                .merge_wait_seconds
                .inc_by(Instant::now().duration_since(w.counted).as_secs_f64());
        }
    }

    /// The merge waits for `queue` (of `topic`, partition `p`): counts the
    /// time in `jobmeter_merge_wait_seconds_total`, and says so in the log
    /// when the wait is long.
    fn on(slot: &mut Option<Waiting>, queue: usize, topic: &str, p: i32, deps: &Deps) {
        let now = Instant::now();
        let w = match slot {
            Some(w) if w.queue == queue => w,
            _ => slot.insert(Waiting {
                queue,
                since: now,
                counted: now,
                logged: None,
            }),
        };
        deps.metrics
            .merge_wait_seconds
            .inc_by(now.duration_since(w.counted).as_secs_f64());
        w.counted = now;
        if now.duration_since(w.since) >= WAIT_LOG_AFTER
            && w.logged.is_none_or(|t| now.duration_since(t) >= WAIT_LOG_EVERY)
        {
            w.logged = Some(now);
            tracing::warn!(
                topic,
                partition = p,
                waited_seconds = now.duration_since(w.since).as_secs(),
                "stream time held back: this partition has records in Kafka that are not fetched yet, and they may come before the records waiting to be applied (the meter waits rather than bill past them; see jobmeter_merge_wait_seconds_total)"
            );
        }
    }
}

/// How many records of one input partition the merge reads ahead of what
/// it has applied, at most (what it holds in memory; the partition is not
/// read further until its head is taken).
const READ_AHEAD: usize = 8_192;

/// How many records of one input partition one turn of the merge reads.
const READ_AHEAD_TURN: usize = 1_024;

/// A record read ahead by the merge: its event (parsed once), merge key and
/// meter, and whether it was forwarded already.
struct ReadRecord<'q> {
    msg: rdkafka::message::BorrowedMessage<'q>,
    parsed: Option<jobmeter_core::JobEvent>,
    head: jobmeter_core::order::Head,
    forwarded: bool,
}

/// One input partition as the merge reads it: the records read and not yet
/// taken, in offset order; the partition's watermark through the last one
/// read (`None` before the first read); whether it has reached the end of
/// what Kafka holds.
/// `firsts[d]` holds the merge keys of the records read for partition
/// `d`'s meter, in order: what the partition holds back of that meter.
#[derive(Default)]
struct ReadAhead<'q> {
    buf: std::collections::VecDeque<ReadRecord<'q>>,
    firsts: Vec<std::collections::VecDeque<jobmeter_core::order::MergeKey>>,
    watermark: Option<Option<jobmeter_core::Timestamp>>,
    at_end: bool,
}

impl<'q> ReadAhead<'q> {
    /// Takes the next record read.
    fn pop(&mut self) -> Option<ReadRecord<'q>> {
        let x = self.buf.pop_front()?;
        if let Some(d) = x.head.dest {
            if let Some(keys) = usize::try_from(d).ok().and_then(|d| self.firsts.get_mut(d)) {
                keys.pop_front();
            }
        }
        Some(x)
    }

    fn push(&mut self, x: ReadRecord<'q>) {
        if let Some(d) = x.head.dest.and_then(|d| usize::try_from(d).ok()) {
            if self.firsts.len() <= d {
                self.firsts.resize_with(d + 1, Default::default);
            }
            self.firsts[d].push_back(x.head.key);
        }
        self.buf.push_back(x);
    }

    /// Reads up to `max` more records of partition `p` from `queue`, while
    /// fewer than [`READ_AHEAD`] wait. Each is keyed as it is read, and a
    /// record for a meter held elsewhere is forwarded at once.
    fn fill(
        &mut self,
        e: &mut Engine,
        p: i32,
        queue: &'q rdkafka::consumer::base_consumer::PartitionQueue<MeterContext>,
        max: usize,
    ) -> Result<(), EngineError> {
        use rdkafka::message::Message;
        if e.is_failing(p) {
            self.at_end = true;
            return Ok(());
        }
        for _ in 0..max {
            if self.buf.len() >= READ_AHEAD {
                break;
            }
            match queue.poll(Duration::ZERO) {
                Some(Ok(m)) => {
                    let parsed = jobmeter_core::parse_job_event(m.payload().unwrap_or_default()).ok();
                    let key = e.read_key(&m, parsed.as_ref(), &mut self.watermark)?;
                    let forwarded = e.forward_ahead(&m, parsed.as_ref(), key)?;
                    let dest = if forwarded { None } else { e.dest(p, parsed.as_ref()) };
                    self.push(ReadRecord {
                        msg: m,
                        parsed,
                        head: jobmeter_core::order::Head { key, dest },
                        forwarded,
                    });
                    self.at_end = false;
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                    self.at_end = true;
                    break;
                }
                Some(Err(err)) => {
                    tracing::warn!(error = %err, partition = p, "consumer error");
                    break;
                }
                None => break,
            }
        }
        Ok(())
    }

    /// The smallest merge key the partition's next unread record can have
    /// (`None` when `p` is not metered here).
    fn bound(&self, e: &Engine, p: i32) -> Option<(i64, i32)> {
        match self.watermark {
            Some(w) => Some(jobmeter_core::order::MergeKey::bound(w, p)),
            None => e.input_bound(p),
        }
    }
}

/// One of the merge's queues as [`jobmeter_core::order::pick`] sees it: an
/// input partition read ahead (every record read is at hand, with its
/// meter; `bound` and `ended` say what it may still deliver), or a queue
/// of records forwarded by another instance.
enum View<'a, 'q> {
    Input {
        r: &'a ReadAhead<'q>,
        bound: Option<(i64, i32)>,
        ended: bool,
    },
    Other(jobmeter_core::order::QueueState),
}

impl jobmeter_core::order::MergeQueue for View<'_, '_> {
    fn head(&self) -> Option<jobmeter_core::order::Head> {
        match self {
            View::Input { r, .. } => r.buf.front().map(|x| x.head),
            View::Other(q) => q.head(),
        }
    }

    /// A partition read ahead holds back a meter with the first record it
    /// read for it, or, when it read none, with its bound until it has
    /// read all Kafka holds.
    fn first_for(&self, dest: i32) -> Option<(jobmeter_core::order::MergeKey, bool)> {
        match self {
            View::Input { r, bound, ended } => usize::try_from(dest)
                .ok()
                .and_then(|d| r.firsts.get(d))
                .and_then(|keys| keys.front())
                .map(|k| (*k, true))
                .or_else(|| (!ended).then(|| (jobmeter_core::order::MergeKey::below(*bound), false))),
            View::Other(q) => q.first_for(dest),
        }
    }
}

/// The merge's queues: the input partitions (`ends[i]`: their bound, and
/// whether they have nothing left to read), then the forwarded ones.
fn views<'a, 'q>(
    ins: &'a [ReadAhead<'q>],
    ends: &[(Option<(i64, i32)>, bool)],
    remote: &[((i32, i32), jobmeter_core::order::QueueState)],
    out: &mut Vec<View<'a, 'q>>,
) {
    out.clear();
    out.extend(ins.iter().zip(ends).map(|(r, (bound, ended))| View::Input {
        r,
        bound: *bound,
        ended: *ended,
    }));
    out.extend(remote.iter().map(|(_, s)| View::Other(*s)));
}

/// Runs the pipeline for one assignment. Records are handed to the engine
/// in the merge order of [`jobmeter_core::order`] across this instance's
/// partitions: a record goes once no other queue can still deliver a
/// smaller one for its meter ([`jobmeter_core::order::pick`]), and the run
/// of its partition's records that follows goes while they sort below what
/// the others may deliver ([`jobmeter_core::order::run_limit`]); a queue
/// that may deliver a smaller one is waited for, however long its fetch
/// takes. Each input partition is read ahead of the merge ([`ReadAhead`]):
/// what it holds back of a meter is known from what was read (a fleet that
/// places every event on its account's partition holds back no meter but
/// its own with a record read), and what another instance's meter bills is
/// forwarded as soon as it is read, so that what this instance publishes
/// of the partition is how far it has read it. Returns `Ok(true)` when the
/// assignment changed, `Ok(false)` on shutdown.
fn merge_round<'e>(
    deps: &Deps,
    consumer: &Arc<BaseConsumer<MeterContext>>,
    lock: &dyn Fn() -> std::sync::MutexGuard<'e, Engine>,
    stop: &CancellationToken,
    ready: &AtomicBool,
) -> Result<bool, EngineError> {
    use jobmeter_core::order::{pick, run_limit, MergeKey, Pick, QueueState};
    let (epoch, assigned) = {
        let mut e = lock();
        // Restored first: a restored partition may say its records are
        // applied in the merge order.
        let epoch = e.epoch();
        if e.begin_turn(epoch)? {
            return Ok(true);
        }
        (e.epoch(), e.assigned().clone())
    };
    // Records fetched before the queues were split wait in the main queue:
    // they come first (they precede whatever the split queues hold).
    while let Some(m) = consumer.poll(Duration::ZERO) {
        if let Ok(m) = m {
            lock().process(&m)?;
        }
    }
    // The input partitions read here are merge queues; each repartition
    // partition is read as it comes, its forwarded records queued by the
    // input partition they came from (the engine's remote queues).
    let mut inputs = Vec::new();
    let mut forwarded = Vec::new();
    let mut resume = rdkafka::TopicPartitionList::new();
    for p in &assigned {
        if let Some(q) = consumer.split_partition_queue(&deps.topics.job_events, *p) {
            inputs.push((*p, q));
            resume.add_partition(&deps.topics.job_events, *p);
        }
        if let Some(q) = consumer.split_partition_queue(&deps.topics.repartition, *p) {
            forwarded.push((*p, q));
            resume.add_partition(&deps.topics.repartition, *p);
        }
    }
    // Assigned partitions start paused (see the rebalance callback).
    consumer
        .resume(&resume)
        .map_err(|source| jobmeter_kafka::KafkaAdapterError::Op {
            op: "resume partitions",
            source,
        })?;
    let mut ins: Vec<ReadAhead<'_>> = inputs.iter().map(|_| ReadAhead::default()).collect();
    let mut ends: Vec<(Option<(i64, i32)>, bool)> = Vec::new();
    let mut remote: Vec<((i32, i32), QueueState)> = Vec::new();
    let mut waiting: Option<Waiting> = None;
    let mut last_main = Instant::now();
    let mut chores = Chores::new();
    let mut last_ends = Instant::now();
    let round_started = Instant::now();
    // The first check of where the partitions end comes at once.
    let mut last_hw = Instant::now().checked_sub(HW_CHECK_EVERY).unwrap_or_else(Instant::now);
    let mut idle = false;
    loop {
        if stop.is_cancelled() {
            lock().commit_and_wait(consumer)?;
            tracing::info!("last batch committed");
            return Ok(false);
        }
        if idle || last_main.elapsed() >= Duration::from_millis(5) {
            // Serves rebalances and errors (the records come from the
            // partition queues).
            let mut timeout = if idle { Duration::from_millis(2) } else { Duration::ZERO };
            for _ in 0..64 {
                match consumer.poll(timeout) {
                    Some(Ok(m)) => lock().process(&m)?,
                    Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
                    Some(Err(err)) => tracing::warn!(error = %err, "consumer error"),
                    None => break,
                }
                timeout = Duration::ZERO;
            }
            last_main = Instant::now();
        }
        let mut e = lock();
        if e.begin_turn(epoch)? {
            return Ok(true);
        }
        // What other instances forwarded, and their progress. A repartition
        // partition whose end was reported before its queue was split
        // reports none again: after RP_END_AFTER with nothing more read it
        // counts as read to its end.
        let rp_settled = round_started.elapsed() >= RP_END_AFTER;
        for (p, q) in &forwarded {
            if rp_settled {
                e.repartition_at_end(*p);
            }
            if e.is_failing(*p) {
                continue;
            }
            for _ in 0..4096 {
                match q.poll(Duration::ZERO) {
                    Some(Ok(m)) => e.read_repartition(&m)?,
                    Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                        e.repartition_at_end(*p);
                        break;
                    }
                    Some(Err(err)) => tracing::warn!(error = %err, partition = *p, "consumer error"),
                    None => break,
                }
            }
        }
        // A queue at its end is asked again at most once a millisecond (it
        // holds nothing back meanwhile); the others whenever they are empty.
        let ends_due = idle || last_ends.elapsed() >= Duration::from_millis(1);
        if ends_due {
            last_ends = Instant::now();
        }
        idle = false;
        // A partition's end is reported once: one reported before this
        // round began is found from the position and the high watermark
        // instead (asked of the broker at most twice a second).
        let rp_open = |e: &Engine, p: i32| !e.repartition_read_to_end(p) && !e.is_failing(p);
        if last_hw.elapsed() >= HW_CHECK_EVERY
            && (ins.iter().any(|r| !r.at_end && r.buf.is_empty()) || forwarded.iter().any(|(p, _)| rp_open(&e, *p)))
        {
            last_hw = Instant::now();
            if let Ok(pos) = consumer.position() {
                for (r, (p, _)) in ins.iter_mut().zip(&inputs) {
                    if !r.at_end && r.buf.is_empty() {
                        r.at_end = read_to_end(consumer, &pos, &deps.topics.job_events, *p);
                    }
                }
                // A meter waits for its repartition partition to be read to
                // its end (records forwarded before this round); an empty
                // one is at its end at once.
                for (p, _) in &forwarded {
                    if rp_open(&e, *p) && read_to_end(consumer, &pos, &deps.topics.repartition, *p) {
                        e.repartition_at_end(*p);
                    }
                }
            }
        }
        for (r, (p, q)) in ins.iter_mut().zip(&inputs) {
            if !r.at_end || ends_due {
                r.fill(&mut e, *p, q, READ_AHEAD_TURN)?;
            }
        }
        for _ in 0..4096 {
            e.remote_queues(&mut remote);
            ends.clear();
            ends.extend(
                ins.iter()
                    .zip(&inputs)
                    .map(|(r, (p, _))| (r.bound(&e, *p), r.at_end || e.is_failing(*p))),
            );
            let picked = {
                let mut v = Vec::with_capacity(ins.len() + remote.len());
                views(&ins, &ends, &remote, &mut v);
                pick(&v)
            };
            match picked {
                Pick::Take(i) if i < inputs.len() => {
                    Waiting::end(&mut waiting, deps);
                    // The head, then the run of this partition's records
                    // that sort below what any other queue may still
                    // deliver for their meter (the other queues do not
                    // change meanwhile).
                    let (p, q) = &inputs[i];
                    let mut limits: Vec<(i32, Option<MergeKey>)> = Vec::new();
                    for _ in 0..READ_AHEAD_TURN {
                        let Some(x) = ins[i].pop() else { break };
                        e.process_read(&x.msg, x.parsed, x.forwarded)?;
                        if ins[i].buf.is_empty() {
                            ins[i].fill(&mut e, *p, q, READ_AHEAD_TURN)?;
                        }
                        let Some(next) = ins[i].buf.front().map(|h| h.head) else {
                            break;
                        };
                        let Some(d) = next.dest.filter(|_| next.key != MergeKey::FIRST) else {
                            continue;
                        };
                        let limit = match limits.iter().find(|(x, _)| *x == d) {
                            Some((_, l)) => *l,
                            None => {
                                let mut v = Vec::with_capacity(ins.len() + remote.len());
                                views(&ins, &ends, &remote, &mut v);
                                let l = run_limit(&v, i, d);
                                limits.push((d, l));
                                l
                            }
                        };
                        if limit.is_some_and(|l| next.key >= l) {
                            break;
                        }
                    }
                }
                Pick::Take(i) => {
                    Waiting::end(&mut waiting, deps);
                    let ((p, q), _) = remote[i - inputs.len()];
                    e.take_remote(p, q)?;
                }
                Pick::Wait(j) => {
                    let (topic, p) = match inputs.get(j) {
                        Some((p, _)) => (deps.topics.job_events.as_str(), *p),
                        None => (deps.topics.repartition.as_str(), remote[j - inputs.len()].0 .0),
                    };
                    Waiting::on(&mut waiting, j, topic, p, deps);
                    idle = true;
                    break;
                }
                Pick::Fetch => {
                    Waiting::end(&mut waiting, deps);
                    idle = true;
                    break;
                }
            }
            if e.batch_due() {
                break;
            }
        }
        // What this instance says of its inputs to the meters of others:
        // how far it has read each (every record read whose account's
        // partition is held elsewhere is forwarded already), and whether
        // that is all Kafka holds.
        for (r, (p, _)) in ins.iter().zip(&inputs) {
            if let Some(b) = r.bound(&e, *p) {
                e.set_source_state(*p, b.0, r.at_end);
            }
        }
        after_step(deps, consumer, &mut e, ready, &mut chores)?;
    }
}
